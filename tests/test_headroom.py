"""The headroom tools of the science experiment: oracle fine-tunes, the text-order pretraining loss, the student
diagnostic (`sdsclip diagnose student`), the image layout probe, and the fine-tuning probes (gradient norms,
z statistics, sigma first, sigma only)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_params import tiny_params
from train_helpers import make_dataset, make_models, train_params, write_params
from typer.testing import CliRunner

from sdsclip.cli import app
from sdsclip.config import WorldConfig, params_from_dict
from sdsclip.synth import CLASS_NAMES, generate_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("headroom")
    student, teacher = make_models(root)
    cfg = WorldConfig(
        image_size=32, winoground_items=12, aro_relation_items=8, aro_attribution_items=8, coco_order_images=4
    )
    generate_world(cfg, root / "train_items", seed=5, families=["winoground"])
    generate_world(cfg, root / "eval_items", seed=6, families=["winoground", "aro"])
    return {
        "root": root,
        "student": student,
        "teacher": teacher,
        "train": root / "train_items" / "winoground",
        "eval": root / "eval_items" / "winoground",
    }


def test_world_families_render_only_what_is_asked(world):
    assert sorted(p.name for p in (world["root"] / "eval_items").iterdir()) == ["aro", "winoground", "world.json"]
    assert json.loads((world["root"] / "eval_items" / "world.json").read_text())["families"] == ["winoground", "aro"]
    with pytest.raises(ValueError, match="unknown world families"):
        generate_world(WorldConfig(), world["root"] / "x", seed=1, families=["cifar"])


def test_text_order_targets_read_the_scene_in_canonical_order():
    from sdsclip.text_order import text_order_targets

    rc, bs = CLASS_NAMES.index("red circle"), CLASS_NAMES.index("blue square")
    t = text_order_targets(
        [
            "a red circle to the left of a blue square",
            "a blue square to the right of a red circle",
            "a blue square to the left of a red circle",
            "a red circle below a blue square",
            "a red circle and a blue square",
            "a red circle",
            "a dog on a sofa",
        ]
    )
    assert t[0].tolist() == [rc, bs, 0] and t[1].tolist() == [rc, bs, 0]  # a caption and its converse: one scene
    assert t[2].tolist() == [bs, rc, 0]  # the object swap: another scene
    assert t[3].tolist() == [bs, rc, 1]  # vertical: the top object first
    assert (t[4:] == -1).all()  # no order to read


def test_text_order_head_separates_swapped_captions_when_trained():
    """The loss is 0-gradient-free on non-relational batches and trains a read-out that tells swaps apart."""
    from sdsclip.text_order import TextOrderHead

    torch.manual_seed(0)
    head = TextOrderHead(8)
    emb = torch.randn(2, 8, requires_grad=True)
    caps = ["a red circle to the left of a blue square", "a blue square to the left of a red circle"]
    loss = head.loss(emb, caps)
    loss.backward()
    assert loss.item() > 0 and emb.grad.abs().sum() > 0
    assert head.loss(emb, ["a red circle", "a red circle and a blue square"]).item() == 0.0


def _tensors(model_dir):
    return load_file(str(model_dir / "model.safetensors"))


@pytest.mark.parametrize(
    "rung,moves,stays",
    [
        ("image_layernorms", ("visual.ln_pre",), ("visual.conv1", "transformer.", "token_embedding")),
        ("image_tower", ("visual.conv1", "visual.ln_pre"), ("transformer.", "token_embedding")),
        ("both_towers", ("visual.conv1", "transformer.", "token_embedding"), ("logit_scale",)),
    ],
)
def test_oracle_rungs_train_exactly_their_parameters(world, tmp_path, rung, moves, stays):
    from sdsclip.headroom import oracle_finetune

    meta = oracle_finetune(
        world["student"], world["train"], tmp_path / rung, rung, steps=3, batch_items=4, lr=1e-2, seed=0, warmup_steps=0
    )
    assert meta["rung"] == rung and meta["train_items"] == 12 and meta["seconds_per_step"] > 0
    before, after = _tensors(world["student"]), _tensors(tmp_path / rung)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    for prefix in moves:
        assert any(k.startswith(f"model.{prefix}") or k.startswith(prefix) for k in changed), (prefix, sorted(changed))
    for prefix in stays:
        assert not any(k.startswith(f"model.{prefix}") or k.startswith(prefix) for k in changed), (prefix, changed)
    with pytest.raises(ValueError, match="fewer than one batch"):
        oracle_finetune(world["student"], world["train"], tmp_path / "big", rung, 1, 100, 1e-2, 0)


def test_student_diagnostic_measures_both_towers_and_the_cli_prints_it(world, tmp_path):
    from sdsclip.diagnose import image_layout_probe, student_separation

    params = params_from_dict(tiny_params())
    result = student_separation(params, world["student"], world["eval"])
    assert result["n"] == 12 and set(result["by_tag"]) == {"Attribute-Color", "Object-Swap"}
    for row in result["by_tag"].values():
        assert 0 <= row["text_cosine_distance_min"] <= row["text_cosine_distance"] <= 2
        assert 0 <= row["captions_disagree"] <= 1 and 0 <= row["images_disagree"] <= 1
    probe = image_layout_probe(params, world["student"], world["train"], world["eval"], steps=20)
    assert probe["train_images"] == 24 and probe["eval_images"] == 24 and 0 <= probe["layout_probe_accuracy"] <= 1
    params_file = write_params(tmp_path / "params.yaml", tiny_params())
    out = tmp_path / "sep.json"
    res = CliRunner().invoke(
        app,
        [
            "diagnose",
            "student",
            "--model",
            str(world["student"]),
            "--data",
            str(world["eval"]),
            "--out",
            str(out),
            "--params",
            str(params_file),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "Object-Swap (n=6): text cos distance" in res.output
    assert json.loads(out.read_text())["by_tag"]["Object-Swap"]["n"] == 6
    bad = CliRunner().invoke(
        app,
        [
            "diagnose",
            "student",
            "--model",
            str(world["teacher"]),
            "--data",
            str(world["eval"]),
            "--params",
            str(params_file),
        ],
    )
    assert bad.exit_code == 2 and "not a student directory" in bad.output and "Traceback" not in bad.output


def _finetune(tmp_path, world, **train):
    from sdsclip.train import finetune

    shards, accepted = make_dataset(tmp_path / "data", n_images=8)
    params = params_from_dict(train_params(tmp_path, **train))
    out = tmp_path / "out"
    meta = finetune(params, world["student"], world["teacher"], shards, accepted, out, log_dir=tmp_path / "logs")
    return meta, out, tmp_path / "logs"


def test_gradient_norm_probe_and_z_statistics_are_logged(world, tmp_path):
    from sdsclip.science import training_curve

    meta, _, logs = _finetune(tmp_path, world, steps=4, lambda_sds=1.0, grad_norm_every=2)
    curve = training_curve(logs)
    for key in ("grad_norm_clip_clip_params", "grad_norm_sds_clip_params", "grad_norm_sds_sigma", "z_mean", "z_std"):
        assert key in curve, (key, curve)
    assert curve["grad_norm_sds_clip_params"] > 0 and curve["grad_norm_sds_sigma"] > 0
    assert curve["grad_norm_clip_sigma"] == 0.0  # L_CLIP does not depend on sigma
    rows = (logs / "plots" / "metrics" / "grad_norm_sds_sigma.tsv").read_text().splitlines()
    assert [r.split("\t")[0] for r in rows[1:]] == ["0", "2"]  # every grad_norm_every steps
    assert meta["grad_norm_probe_seconds"] >= 0 and "loss_sds_first" in curve


def test_sigma_first_holds_clip_until_sigma_is_fitted_and_sigma_only_freezes_clip(world, tmp_path):
    before = _tensors(world["student"])
    _, out, _ = _finetune(tmp_path / "first", world, steps=3, lambda_sds=1.0, sigma_first_steps=2, warmup_steps=0)
    moved = {k for k, v in _tensors(out).items() if not torch.equal(before[k], v)}
    assert moved and all("ln" in k for k in moved)  # the LayerNorms moved once, at step 3
    _, out, _ = _finetune(tmp_path / "only", world, steps=2, lambda_sds=1.0, trainable="sigma_only")
    assert all(torch.equal(before[k], v) for k, v in _tensors(out).items())
    assert (out / "sigma.safetensors").is_file()


def test_sigma_only_control_and_too_long_sigma_first_are_refused_in_one_line(world, tmp_path):
    from sdsclip.config import ConfigError
    from sdsclip.train import TrainError

    with pytest.raises(TrainError, match="sigma_only trains nothing"):
        _finetune(tmp_path, world, steps=2, lambda_sds=0.0, trainable="sigma_only")
    with pytest.raises(ConfigError, match=r"sigma_first_steps \(5\) must be < steps \(5\)"):
        params_from_dict(train_params(tmp_path, steps=5, sigma_first_steps=5))


def test_text_order_phase_trains_the_text_tower_alone_after_pretraining(tmp_path):
    from sdsclip.pretrain import pretrain_student

    shards, accepted = make_dataset(tmp_path / "data", n_images=8)
    raw = tiny_params(
        student={
            "text_order_steps": 2,
            "text_order_weight": 3.0,
            "pretrain": {"steps": 2, "batch_size": 4, "warmup_steps": 0},
        }
    )
    meta = pretrain_student(params_from_dict(raw), shards, accepted, tmp_path / "s", tmp_path / "logs")
    assert meta["text_order"]["steps"] == 2 and meta["text_order"]["weight"] == 3.0
    rows = (tmp_path / "logs" / "plots" / "metrics" / "loss_text_order.tsv").read_text().splitlines()
    assert [r.split("\t")[0] for r in rows[1:]] == ["2", "3"]  # after the 2 contrastive steps
    plain = pretrain_student(
        params_from_dict(tiny_params(student={"pretrain": {"steps": 2, "batch_size": 4, "warmup_steps": 0}})),
        shards,
        accepted,
        tmp_path / "p",
        tmp_path / "plogs",
    )
    assert "text_order" not in plain
    a, b = _tensors(tmp_path / "s"), _tensors(tmp_path / "p")
    visual = [k for k in a if ".visual." in f".{k}"]
    text = [k for k in a if "transformer." in k and "visual" not in k]
    assert visual and all(torch.equal(a[k], b[k]) for k in visual)  # the image tower: phase 1 only
    assert any(not torch.equal(a[k], b[k]) for k in text)
