"""Memory of an SDS-CLIP step (sdsclip.memory): the fake-tensor count equals the real count, matches the
committed SD-1.5 measurement, the preflight refuses a step that cannot fit, and the paper-*gb profiles fit."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from tiny_params import ROOT
from train_helpers import make_dataset, make_models, train_params

from sdsclip import memory
from sdsclip.config import Params, params_from_dict

MEASURED = ROOT / "benchmarks" / "results" / "sds_memory" / "measured_cpu.json"
PAPER_KEYS_FOR_MEMORY = {"mixed_precision", "gradient_checkpointing", "memory_check"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    student, teacher = make_models(root)
    shards, accepted = make_dataset(root, n_images=8, captions_per_image=2)
    return {"root": root, "student": student, "teacher": teacher, "shards": shards, "accepted": accepted}


def real_cpu_count(teacher_dir: Path, arch: str, batch: int, bf16: bool, ckpt: bool) -> tuple[int, int]:
    """(student, UNet) bytes saved for backward by one real SDS step on CPU, as sdsclip.train runs it."""
    from open_clip.loss import ClipLoss

    from sdsclip.models.student import build_student
    from sdsclip.models.teacher import load_teacher
    from sdsclip.sds import LatentProjection, StudentWithSigma, sds_clip_objective, sds_loss, select_trainable

    torch.manual_seed(0)
    student = build_student(arch)
    teacher = load_teacher(teacher_dir, with_vae=False).freeze()
    if ckpt:
        teacher.enable_gradient_checkpointing()
    sigma = LatentProjection(student.embed_dim, teacher.latent_shape)
    select_trainable(student.model, sigma)
    module = StudentWithSigma(student.model, sigma).eval()
    side = student.model.visual.image_size
    side = side[0] if isinstance(side, (tuple, list)) else side
    images, tokens = torch.randn(batch, 3, side, side), student.tokenizer(["a red circle"] * batch)
    with torch.no_grad():
        cond = teacher.encode_text(["a red circle left of a blue square"] * batch)
    counter = memory.SavedTensorCounter.excluding(module, teacher.unet, teacher.text_encoder)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), counter():
        image_emb, text_emb, z = module(images, tokens, True)
        terms = sds_clip_objective(
            image_emb, text_emb, z, module.clip.logit_scale.exp(), None, None, 0.0, 20, 980, contrastive=ClipLoss()
        )
        student_bytes = counter.bytes
        loss = terms.total + sds_loss(teacher, z, cond, 20, 980, 1, torch.Generator().manual_seed(1))
    loss.backward()  # the counted graph is a real, complete step
    assert sigma.linear.weight.grad is not None
    return student_bytes, counter.bytes - student_bytes


@pytest.mark.slow
@pytest.mark.parametrize("setting", list(memory.SETTINGS))
def test_fake_tensor_count_equals_the_real_cpu_count(setting, models):
    """The estimate runs the step on fake tensors (no compute, no memory): it must save exactly what the real
    step saves. (A meta-device forward does not: it takes the math attention kernel and ignores autocast.)"""
    bf16, ckpt = memory.SETTINGS[setting]
    spec = memory.TeacherSpec.from_dir(models["teacher"])
    for batch in (1, 3):
        student_real, unet_real = real_cpu_count(models["teacher"], "sdsclip-tiny-vit", batch, bf16, ckpt)
        fake = memory.count_step("sdsclip-tiny-vit", spec, batch, torch.bfloat16 if bf16 else None, ckpt, "cpu")
        assert (fake.student_saved, fake.unet_saved) == (student_real, unet_real), (setting, batch)
        assert unet_real > 0 and student_real > 0
    if ckpt:
        assert fake.recompute > 0


@pytest.mark.slow
@pytest.mark.parametrize("setting", list(memory.SETTINGS))
def test_sd15_estimate_is_within_10_percent_of_the_measured_step(setting):
    """Per-sample bytes of the fake count at SD-1.5 / ViT-B-32 shape vs benchmarks/sds_memory.py's real CPU run."""
    rows = json.loads(MEASURED.read_text())["settings"][setting]
    measured = sum(rows["2"][k] - rows["1"][k] for k in ("unet_saved_bytes", "student_saved_bytes"))
    bf16, ckpt = memory.SETTINGS[setting]
    one, two = (
        memory.count_step("ViT-B-32", memory.TeacherSpec.sd15(), b, torch.bfloat16 if bf16 else None, ckpt, "cpu")
        for b in (1, 2)
    )
    estimate = (two.unet_saved + two.student_saved) - (one.unet_saved + one.student_saved)
    assert abs(estimate / measured - 1) < 0.10, (setting, estimate / memory.GIB, measured / memory.GIB)


def _params(models, **train) -> Params:
    return params_from_dict(train_params(models["root"], steps=1, **train))


def test_preflight_refuses_a_step_that_does_not_fit_and_passes_one_that_does(models, tmp_path, monkeypatch):
    import sdsclip.train as train_mod

    free = {"bytes": 1 << 20}
    monkeypatch.setattr(memory, "device_free_bytes", lambda device: free["bytes"])
    loaded = []
    real_load = train_mod.load_teacher
    monkeypatch.setattr(train_mod, "load_teacher", lambda *a, **kw: loaded.append(1) or real_load(*a, **kw))
    args = (models["student"], models["teacher"], models["shards"], models["accepted"])
    with pytest.raises(train_mod.TrainError) as err:
        train_mod.finetune(_params(models), *args, tmp_path / "refused")
    line = str(err.value)
    assert "\n" not in line and "GiB free" in line and "needs ~" in line
    for knob in (
        "train.mixed_precision: bf16",
        "train.gradient_checkpointing: true",
        "train.batch_size",
        "train.memory_check: warn | off",
    ):
        assert knob in line, line
    assert not loaded and not (tmp_path / "refused" / "model.safetensors").exists()  # before the teacher loads

    free["bytes"] = 1 << 40
    meta = train_mod.finetune(_params(models), *args, tmp_path / "ran")
    assert meta["steps"] == 1 and (tmp_path / "ran" / "model.safetensors").is_file()


def test_memory_check_warn_logs_and_off_skips(models, monkeypatch, caplog):
    from sdsclip.train import TrainError

    monkeypatch.setattr(memory, "device_free_bytes", lambda device: 1 << 20)
    cfg = _params(models).train
    kw = dict(teacher_root=models["teacher"], latent_shape=(12, 16, 16), n_pairs=16, device="cpu")
    with pytest.raises(TrainError):
        memory.check_step_memory(cfg, "sdsclip-tiny-vit", **kw)
    with caplog.at_level(logging.WARNING, logger="sdsclip.memory"):
        est = memory.check_step_memory(cfg.model_copy(update={"memory_check": "warn"}), "sdsclip-tiny-vit", **kw)
    assert est is not None and est.peak > 1 << 20 and "GiB free" in caplog.text
    assert memory.check_step_memory(cfg.model_copy(update={"memory_check": "off"}), "sdsclip-tiny-vit", **kw) is None
    # the control never loads the teacher: its estimate has no teacher weights and no UNet activations
    control = memory.estimate_step(cfg, "sdsclip-tiny-vit", None, device_type="cpu", latent_shape=(12, 16, 16))
    assert control.unet_saved == 0 and control.weights < est.weights


@pytest.mark.parametrize("card", list(memory.CARDS))
def test_card_profiles_are_the_paper_recipe_and_fit_their_card(card):
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())
    variant = params_from_dict({**shipped, "profile": f"paper-{card}"}).train
    paper = params_from_dict({**shipped, "profile": "paper"}).train
    same = {k: v for k, v in variant.model_dump().items() if k not in PAPER_KEYS_FOR_MEMORY}
    assert same == {k: v for k, v in paper.model_dump().items() if k not in PAPER_KEYS_FOR_MEMORY}
    est = memory.estimate_sd15_vitb32(variant, n_pairs=118_287)  # COCO train2017, one caption per image
    assert est.peak <= memory.CARDS[card], est.summary()
    comment = (Path(memory.__file__).parent / "profiles" / f"paper-{card}.yaml").read_text()
    assert f"{est.peak / memory.GIB:.1f} GiB, budget {memory.CARDS[card] / memory.GIB:.0f} GiB" in comment  # in step


def test_paper_fp32_needs_more_than_a_48gb_card():
    """Why the variants exist: the paper profile (fp32, no checkpointing) fits only the 80 GB budget."""
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())
    est = memory.estimate_sd15_vitb32(params_from_dict({**shipped, "profile": "paper"}).train, n_pairs=118_287)
    assert memory.CARDS["48gb"] < est.peak <= memory.CARDS["80gb"]
