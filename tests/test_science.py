"""The `science` profile and `sdsclip science` runner (orchestration, caching, report) with fake stages."""

from __future__ import annotations

import json

import pytest
import yaml
from tiny_params import ROOT

from sdsclip import science
from sdsclip.config import ConfigError, params_from_dict


def _shipped(arms_only: bool = True) -> dict:
    """params.yaml; ``arms_only``: the control and the SDS sweep alone (no probes, no oracle ladder)."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    if arms_only:
        raw["science"] = {**raw["science"], "probes": [], "ladder": [], "sds_gradients": ["full"]}
    return raw


def test_science_profile_sets_an_experiment_and_paper_stays_train_only(tmp_path):
    raw = _shipped()
    raw["profile"] = "science"
    p = params_from_dict(raw, "params.yaml")
    assert p.student.pretrain.batching == "bag_distinct" and p.train.batching == "bag_distinct"
    assert p.teacher.tiny.unshuffle_factor == 4 and p.teacher.tiny.pooled_conditioning
    # the teacher that passed the binding diagnostic (README): caption map, high-noise share, object-swap ranking
    assert p.teacher.tiny.caption_map_channels > 0 and p.teacher.pretrain_high_t_share > 0
    assert p.teacher.hard_negative_weight > 0 and p.teacher.hard_negative_swap == "object"
    assert p.student.pretrain.lr == _shipped()["student"]["pretrain"]["lr"]  # nested keys merge one by one
    assert len(p.science.seeds) >= 3 and p.science.lambdas
    assert params_from_dict(p.model_dump(mode="json")) == p  # resolved params re-validate to themselves
    bad = tmp_path / "bad.yaml"
    bad.write_text("profile_scope: everything\ntrain: {lr: 0.1}\n")
    raw["profile"] = str(bad)
    with pytest.raises(ConfigError, match=r"bad\.yaml: profile_scope: must be 'experiment' or absent"):
        params_from_dict(raw)
    bad.write_text("profile_scope: experiment\nregistry: {alias: x}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: registry: a profile may only set world, student"):
        params_from_dict(raw)
    raw["profile"] = None
    raw["science"] = {**raw["science"], "lambdas": [0.0, 1.0]}
    with pytest.raises(ConfigError, match=r"science: .*lambdas must be > 0"):
        params_from_dict(raw)


ROWS = {
    "winoground": {
        "text_score": 0.5,
        "image_score": 0.4,
        "group_score": 0.3,
        "collapsed_tag.Object.group_score": 0.1,
        "collapsed_tag.Relation.group_score": 0.5,
        "collapsed_tag.Object.text_score": 0.2,
        "collapsed_tag.Relation.text_score": 0.6,
    },
    "aro": {"vg_relation.macro_accuracy": 0.5, "vg_attribution.macro_accuracy": 0.7, "coco_order.precision_at_1": 0.3},
    "zeroshot": {"acc1": 0.9},
}


@pytest.fixture
def fake_stages(monkeypatch):
    """Every expensive step replaced by a recorder; SDS runs score +0.1 per unit of lambda on object swaps."""
    calls: list[str] = []
    from sdsclip import diagnose, stages

    def touch(name):
        def run(params, *args, **kw):
            calls.append(name)
            return {"ok": name}

        return run

    for name in ("synth", "ingest", "validate", "pretrain_student", "pretrain_teacher"):
        monkeypatch.setattr(stages, name, touch(name))

    def train(params, student, teacher, shards, validated, out, control=False, log_dir=None):
        calls.append(f"train:{params.seed}:{params.train.lambda_sds}")
        out.mkdir(parents=True, exist_ok=True)
        (out / "lam").write_text(str(params.train.lambda_sds))
        return {
            "seconds": 1.0,
            "seconds_per_step": 0.5 if control else 2.0,
            "steps": 2,
            "loss_clip": 1.0,
            "loss_sds": 0.0,
        }

    def evaluate(params, model, out, holdout=None, oracle_train=None):
        calls.append(f"eval:{model.name}")
        rows = json.loads(json.dumps(ROWS))
        lam = float((model / "lam").read_text()) if (model / "lam").is_file() else 0.0
        rows["winoground"]["collapsed_tag.Object.group_score"] += 0.01 * lam + 0.001 * params.seed
        return rows

    def oracle(student, train_dir, out, rung, steps, batch_items, lr, seed, warmup_steps=10):
        calls.append(f"oracle:{seed}:{rung}:{student.name}")
        out.mkdir(parents=True, exist_ok=True)
        (out / "lam").write_text("30")  # the ceiling: +0.3 on object swaps
        return {"seconds": 1.0, "seconds_per_step": 0.25, "steps": steps, "loss_clip": 0.5}

    from sdsclip import headroom

    monkeypatch.setattr(stages, "train", train)
    monkeypatch.setattr(headroom, "oracle_finetune", oracle)
    monkeypatch.setattr(science, "evaluate_student", evaluate)

    def binding(params, ref, data, items=None, threshold=None):
        calls.append("diagnose")
        return {
            "text_score": 0.6,
            "image_score": 0.1,
            "group_score": 0.1,
            "swap_effect": 1e-3,
            "swap_effect_sem": 1e-4,
            "caption_effect": 1e-2,
            "swap_to_caption_ratio": 0.1,
            "threshold_text_score": 0.5,
            "passed": True,
            "n": 10,
            "by_tag": {},
        }

    monkeypatch.setattr(diagnose, "teacher_binding", binding)

    def shortcut(params, ref, data, items=None):
        calls.append("shortcut")
        return {
            "images": 4,
            "error_true_latent": 0.2,
            "error_swapped_caption": 0.21,
            "error_blank_canvas": 0.1,
            "error_mean_latent": 0.2,
            "blank_beats_true_fraction": 1.0,
            "latent_mean": -0.9,
            "latent_std": 0.3,
            "blank_latent_mean": -1.0,
        }

    monkeypatch.setattr(diagnose, "sds_shortcut", shortcut)
    return calls


def test_runner_runs_every_seed_and_arm_then_resumes_from_its_outputs(tmp_path, fake_stages):
    raw = _shipped()
    raw["science"] = {**raw["science"], "seeds": [0, 1, 2], "lambdas": [1.0, 10.0]}
    params = params_from_dict(raw)
    summary = science.run_science(params, tmp_path / "sci", log=lambda line: None)
    trains = sorted(c for c in fake_stages if c.startswith("train:"))
    assert trains == sorted(f"train:{s}:{lam}" for s in (0, 1, 2) for lam in (0.0, 1.0, 10.0))
    assert set(summary["arms"]) == {"control", "sds_lambda_1", "sds_lambda_10"}
    obj = "Wino group: object swap"
    assert summary["arms"]["control"]["subsets"][obj]["mean"] == pytest.approx(0.101)
    paired = summary["paired_vs_control"]["sds_lambda_10"][obj]
    assert paired["mean"] == pytest.approx(0.1) and paired["std"] == pytest.approx(0.0, abs=1e-12)
    assert summary["arms"]["sds_lambda_1"]["seconds_per_step"]["mean"] == 2.0
    report = tmp_path / "sci" / "report"
    md = (report / "science.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| arm | "))
    col = header.split(" | ").index("Wino group: object swap")
    row = {line.split(" | ")[0]: line.split(" | ") for line in md.splitlines() if line.startswith("| ")}
    assert row["| pretrained"][col] == "0.100" and row["| control"][col] == "0.101 ± 0.001"
    assert "+0.100 ± 0.000" in md  # paired difference (no per-item results here: mean ± std over seeds)
    assert (report / "science.png").stat().st_size > 1000 and json.loads((report / "science.json").read_text())
    # Re-run: everything is reused. A new lambda adds only its own runs.
    fake_stages.clear()
    science.run_science(params, tmp_path / "sci", log=lambda line: None)
    assert fake_stages == []
    raw["science"]["lambdas"] = [1.0, 10.0, 3.0]
    science.run_science(params_from_dict(raw), tmp_path / "sci", log=lambda line: None)
    assert sorted(c for c in fake_stages if c.startswith("train:")) == [f"train:{s}:3.0" for s in (0, 1, 2)]
    # A changed training knob invalidates the fine-tuning runs, not the world or the pretrained models.
    fake_stages.clear()
    raw["train"]["lr"] = 0.5
    science.run_science(params_from_dict(raw), tmp_path / "sci", log=lambda line: None)
    assert not {"synth", "ingest", "validate", "pretrain_student", "pretrain_teacher"} & set(fake_stages)
    assert len([c for c in fake_stages if c.startswith("train:")]) == 12
    # The diagnostic's pass rule changes no weights: only the diagnostic runs again.
    for knob, value in (("binding_min_text_score", 0.9), ("binding_each_tag", False)):
        fake_stages.clear()
        raw["teacher"][knob] = value
        science.run_science(params_from_dict(raw), tmp_path / "sci", log=lambda line: None)
        assert fake_stages == ["diagnose"]  # the shortcut check keys on the teacher, not the pass rule


def test_cli_science_applies_the_profile_and_reports_bad_params_in_one_line(tmp_path, fake_stages):
    from typer.testing import CliRunner

    from sdsclip.cli import app

    params_file = tmp_path / "params.yaml"
    raw = _shipped()
    raw["science"] = {**raw["science"], "seeds": [0], "lambdas": [1.0]}
    params_file.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(
        app, ["science", "--params", str(params_file), "--workdir", str(tmp_path / "w"), "--profile", "-"]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "w" / "report" / "science.md").is_file()
    assert sorted(c for c in fake_stages if c.startswith("train:")) == ["train:0:0.0", "train:0:1.0"]
    raw["science"]["lambdas"] = [-1.0]
    params_file.write_text(yaml.safe_dump(raw))
    bad = CliRunner().invoke(app, ["science", "--params", str(params_file), "--workdir", str(tmp_path / "w")])
    assert bad.exit_code == 2 and "science: " in bad.output and "lambdas must be > 0" in bad.output


def test_full_experiment_runs_probes_the_ladder_and_the_plain_students_premise(tmp_path, fake_stages, monkeypatch):
    from sdsclip import stages

    seen, inner = [], stages.train

    def train(params, *args, **kw):
        t = params.train
        seen.append((params.seed, t.lambda_sds, t.trainable, t.sigma_first_steps, t.t_min, t.t_max))
        return inner(params, *args, **kw)

    monkeypatch.setattr(stages, "train", train)
    raw = _shipped(arms_only=False)
    raw["student"]["text_order_steps"] = 5
    raw["science"] = {
        **raw["science"],
        "seeds": [0, 1],
        "lambdas": [1.0],
        "sds_gradients": ["full"],
        "probe_lambda": 2.0,
    }
    logged = []
    summary = science.run_science(params_from_dict(raw), tmp_path / "sci", log=logged.append)
    steps = raw["train"]["steps"]
    d = raw["train"]
    assert sorted(seen) == sorted(
        [(s, 0.0, "image_layernorms", 0, d["t_min"], d["t_max"]) for s in (0, 1)] * 2  # the control, both students
        + [(s, 1.0, "image_layernorms", 0, d["t_min"], d["t_max"]) for s in (0, 1)]
        + [(s, 2.0, "sigma_only", 0, d["t_min"], d["t_max"]) for s in (0, 1)]
        + [(s, 2.0, "image_layernorms", steps // 4, d["t_min"], d["t_max"]) for s in (0, 1)]
        + [(s, 2.0, "image_tower", 0, d["t_min"], d["t_max"]) for s in (0, 1)]
    )
    assert any("probe best_t skipped" in line for line in logged)  # the fake diagnostic has no per-t rows
    oracles = sorted(c for c in fake_stages if c.startswith("oracle:"))
    assert oracles == sorted(
        f"oracle:{s}:{r}:{d}"
        for s in (0, 1)
        for r in ("image_layernorms", "image_tower", "both_towers")
        for d in ("student_pretrained", "student_pretrained_text_order")
    )
    assert set(summary["arms"]) == {
        "control",
        "sds_lambda_1",
        "probe_sigma_only_lambda_2",
        "probe_sigma_first_lambda_2",
        "probe_image_tower_lambda_2",
        "oracle_a_image_layernorms",
        "oracle_b_image_tower",
        "negclip_c_both_towers",
    }
    obj = "Wino group: object swap"
    assert summary["arms"]["oracle_a_image_layernorms"]["subsets"][obj]["mean"] == pytest.approx(0.1 + 0.3 + 0.0005)
    assert set(summary["plain_student"]["arms"]) == {
        "control",
        "oracle_a_image_layernorms",
        "oracle_b_image_tower",
        "negclip_c_both_towers",
    }
    md = (tmp_path / "sci" / "report" / "science.md").read_text()
    assert "**0.1000 for a blank canvas** (lower on 100% of the images)" in md
    assert "## The plain student" in md and "| probe_sigma_only_lambda_2 (λ=2, trainable=sigma_only) |" in md
    # every run is cached by arm and student: a rerun trains nothing
    fake_stages.clear()
    science.run_science(params_from_dict(raw), tmp_path / "sci", log=lambda line: None)
    assert not [c for c in fake_stages if c.startswith(("train:", "oracle:", "pretrain"))]


def test_best_t_window_is_where_the_teacher_binds_object_order_best():
    rows = [
        {"t": t, "swap_effect": 0.0, "by_tag": {"Object-Swap": {"text_score": s}}}
        for t, s in ((100, 0.5), (300, 0.9), (500, 0.8), (700, 0.85), (900, 0.2))
    ]
    assert science.best_binding_t_window({"by_t": rows}) == {"t_min": 300, "t_max": 701}
    assert science.best_binding_t_window({}) is None


def test_paired_bootstrap_interval_covers_the_effect_and_excludes_zero_only_when_it_should():
    n = 60
    tags = ["Object-Swap", "Attribute-Color"] * (n // 2)
    ctrl = {"tag": tags, "text": [0] * n, "image": [0] * n, "group": [0] * n}
    wins = [1 if (i % 2 == 0 and i < 24) else 0 for i in range(n)]  # 12 of 30 object swaps
    arm = {"tag": tags, "text": wins, "image": [0] * n, "group": wins}
    out = science.paired_bootstrap(
        {0: {"world": arm}, 1: {"world": arm}}, {0: {"world": ctrl}, 1: {"world": ctrl}}, samples=500
    )
    row = out["object swap group"]
    assert row["mean"] == pytest.approx(0.4) and 0 < row["lo"] < 0.4 < row["hi"] and row["items"] == 30
    assert out["object swap image"] == {"mean": 0.0, "lo": 0.0, "hi": 0.0, "items": 30, "seeds": 2}
    assert "held-out object swap group" not in out  # no held-out items given


def test_oracle_and_holdout_seeds_must_differ_from_the_worlds(tmp_path, fake_stages):
    raw = _shipped()
    raw["science"] = {**raw["science"], "holdout_seed": raw["seed"]}
    with pytest.raises(ConfigError, match="must differ"):
        science.run_science(params_from_dict(raw), tmp_path / "sci", log=lambda line: None)
