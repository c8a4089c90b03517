"""train.sds_gradient: jacobian_free: the surrogate's gradient on z is exactly 2/(N D) w(t) (eps_hat - eps), it
agrees with the full gradient for an identity-Jacobian teacher up to sqrt(abar_t) / w(t) (sdsclip.sds.SDS_WEIGHTS),
the UNet keeps nothing for backward and gets no gradient, the memory estimate follows, and DDP / SIGKILL + resume
stay exact in this mode."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
import yaml
from diffusers import DDPMScheduler
from safetensors.torch import load_file
from test_science import _shipped, fake_stages  # noqa: F401 - fake_stages: the science fixture
from test_train import _env, _run, _train_cmd, _weights, world  # noqa: F401 - world: the shared fixture
from train_helpers import train_params, write_params

from sdsclip import memory
from sdsclip.config import Params, params_from_dict
from sdsclip.models.teacher import Teacher, build_tiny_teacher, latent_shape_of
from sdsclip.sds import SDS_WEIGHTS, draw_t_and_noise, sds_loss

CAPTIONS = ["a red circle left of a blue square", "a blue square above a red circle", "a red circle", "a square"]
MODES = ("full", "jacobian_free")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    teacher = build_tiny_teacher(Params().teacher, sorted({w for c in CAPTIONS for w in c.split()})).freeze()
    with torch.no_grad():
        cond = teacher.encode_text(CAPTIONS)
    z = torch.randn(len(CAPTIONS), *teacher.latent_shape, generator=torch.Generator().manual_seed(3))
    return teacher, cond, z


def _grad(teacher, z, cond, gradient, weighting="constant", draws=1, seed=7):
    z = z.clone().requires_grad_(True)
    loss = sds_loss(
        teacher, z, cond, 20, 980, draws, torch.Generator().manual_seed(seed), gradient=gradient, weighting=weighting
    )
    (g,) = torch.autograd.grad(loss, z)
    return loss.detach(), g


@pytest.mark.parametrize("weighting", sorted(SDS_WEIGHTS))
def test_surrogate_gradient_is_weighted_residual_element_by_element(tiny, weighting):
    teacher, cond, z = tiny
    loss, g = _grad(teacher, z, cond, "jacobian_free", weighting)
    t, noise = draw_t_and_noise(z.shape[0], tuple(z.shape[1:]), 20, 980, torch.Generator().manual_seed(7))
    with torch.no_grad():
        residual = teacher.epsilon_prediction(z, cond, t, noise) - noise
    abar = teacher.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = SDS_WEIGHTS[weighting](abar) * residual
    n, d = z.shape[0], z[0].numel()
    torch.testing.assert_close(g * (n * d / 2), expected, rtol=1e-6, atol=1e-7)
    # the logged value is the real denoising error, the same number the full loss reports
    full_loss, _ = _grad(teacher, z, cond, "full")
    assert loss.item() == full_loss.item()
    assert loss.item() == residual.pow(2).flatten(1).mean(1).mean().item()


class _LinearUNet(torch.nn.Module):
    """eps_hat(x_t) = x_t + b: a stand-in UNet whose Jacobian is the identity."""

    def __init__(self, shape):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(5)))
        self.config = SimpleNamespace(out_channels=shape[0], sample_size=shape[1], class_embed_type=None)

    def forward(self, x, t, encoder_hidden_states=None, class_labels=None):
        return SimpleNamespace(sample=x + self.bias)


def test_identity_jacobian_full_and_jacobian_free_agree_up_to_sqrt_abar_over_w():
    shape = (4, 8, 8)
    teacher = Teacher(_LinearUNet(shape), None, None, DDPMScheduler(), latent="vae", image_size=64).freeze()
    z = torch.randn(3, *shape, generator=torch.Generator().manual_seed(2))
    cond = torch.zeros(3, 5, 8)
    _, g_full = _grad(teacher, z, cond, "full")
    t, _ = draw_t_and_noise(z.shape[0], shape, 20, 980, torch.Generator().manual_seed(7))
    abar = teacher.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert (g_full.abs() > 0).all() and len(set(t.tolist())) == 3
    for weighting in SDS_WEIGHTS:  # per sample: full = sqrt(abar_t) / w(t) x jacobian_free, element by element
        _, g_jf = _grad(teacher, z, cond, "jacobian_free", weighting)
        factor = abar.sqrt() / SDS_WEIGHTS[weighting](abar)
        torch.testing.assert_close(g_full, factor * g_jf, rtol=1e-5, atol=1e-9)


def _count_unet_saves(teacher, z, cond, gradient):
    """(tensors saved for backward while the UNet's forward runs, the loss): saved_tensors_hooks + UNet hooks."""
    inside, saved = [False], [0]

    def pack(t):
        if inside[0]:
            saved[0] += 1
        return t

    pre = teacher.unet.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
    post = teacher.unet.register_forward_hook(lambda *_: inside.__setitem__(0, False))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = sds_loss(teacher, z, cond, 20, 980, 1, torch.Generator().manual_seed(1), gradient=gradient)
    finally:
        pre.remove()
        post.remove()
    return saved[0], loss


@pytest.mark.parametrize("checkpointing", [False, True])
def test_jacobian_free_unet_saves_nothing_and_gets_no_gradient(checkpointing):
    torch.manual_seed(0)
    teacher = build_tiny_teacher(Params().teacher, sorted({w for c in CAPTIONS for w in c.split()})).freeze()
    if checkpointing:
        teacher.enable_gradient_checkpointing()
    with torch.no_grad():
        cond = teacher.encode_text(CAPTIONS)
    teacher.unet.requires_grad_(True)  # as if unfrozen: only the mode can keep gradients away from it
    counts = {}
    for mode in MODES:
        teacher.unet.zero_grad(set_to_none=True)
        z = torch.randn(len(CAPTIONS), *teacher.latent_shape, requires_grad=True)
        counts[mode], loss = _count_unet_saves(teacher, z, cond, mode)
        loss.backward()
        got = [p.grad for p in teacher.unet.parameters() if p.grad is not None]
        assert z.grad is not None and z.grad.abs().sum() > 0
        if mode == "full":
            assert got, "the full loss back-propagates into the UNet: the check can see gradients"
        else:
            assert not got
    assert counts["full"] > 0 and counts["jacobian_free"] == 0


def test_bf16_keeps_z_and_the_gradient_fp32(tiny):
    teacher, cond, z = tiny
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_jf, g_jf = _grad(teacher, z, cond, "jacobian_free")
        loss_full, _ = _grad(teacher, z, cond, "full")
    assert g_jf.dtype == torch.float32 and loss_jf.dtype == torch.float32 and torch.isfinite(g_jf).all()
    assert loss_jf.item() == loss_full.item()  # the same bf16 UNet forward, the same fp32 error


def test_memory_estimate_counts_no_unet_activations(tmp_path):
    from train_helpers import make_models

    _, teacher_dir = make_models(tmp_path)
    spec = memory.TeacherSpec.from_dir(teacher_dir)
    latent_elements = torch.Size(latent_shape_of(teacher_dir)).numel()
    est = {}
    for mode, ckpt in (("full", False), ("full", True), ("jacobian_free", False), ("jacobian_free", True)):
        cfg = Params().train.model_copy(update={"batch_size": 4, "sds_gradient": mode, "gradient_checkpointing": ckpt})
        est[mode, ckpt] = memory.estimate_step(cfg, "sdsclip-tiny-vit", spec, device_type="cpu")
    assert est["full", False].unet_saved > est["full", True].unet_saved > 0
    for ckpt in (False, True):  # checkpointing is a no-op for the UNet in this mode
        e = est["jacobian_free", ckpt]
        # nothing of the UNet: only the surrogate's fp32 gradient for z, one latent per sample
        assert e.unet_saved == 4 * latent_elements * 4 and e.setting == "fp32+jacobian_free"
        assert 0 < e.recompute  # the no-grad forward's working set, bounded by the largest segment
        assert e.peak < est["full", False].peak


# --------------------------------------------------------------- DDP and SIGKILL + resume in this mode

STEPS = 24


@pytest.fixture(scope="module")
def jf_reference(world):  # noqa: F811
    from sdsclip import stages

    root = world["root"]
    raw = train_params(
        root, steps=STEPS, checkpoint_every=5, sds_gradient="jacobian_free", sds_weighting="one_minus_alpha_bar"
    )
    params = write_params(root / "jf_ref.yaml", raw)
    out = root / "jf_reference"
    stages.train(
        params_from_dict(yaml.safe_load(params.read_text())),
        world["student"],
        world["teacher"],
        world["shards"],
        world["validated"],
        out,
        log_dir=root / "jf_reference-logs",
    )
    return {"out": out, "params": params, "raw": raw, "weights": _weights(out)}


@pytest.mark.slow
def test_jacobian_free_run_logs_the_real_error(world, jf_reference):  # noqa: F811
    meta = json.loads((jf_reference["out"] / "student.json").read_text())
    assert meta["steps"] == STEPS
    rows = (jf_reference["out"].parent / "jf_reference-logs" / "plots" / "metrics" / "loss_sds.tsv").read_text()
    sds = [float(r.split("\t")[1]) for r in rows.splitlines()[1:]]
    assert len(sds) == STEPS and all(0 < v < 10 for v in sds)  # an eps error (~1 for a random UNet), not 0


@pytest.mark.slow
def test_jacobian_free_sigkill_then_resume_is_bit_identical(world, jf_reference, tmp_path):  # noqa: F811
    raw = json.loads(json.dumps(jf_reference["raw"]))
    raw["train"].update(checkpoint_every=2)
    params = write_params(tmp_path / "p.yaml", raw)
    out, ckpts = tmp_path / "killed", tmp_path / "ckpt"
    proc = subprocess.Popen(
        [sys.executable, *_train_cmd(world, out, params, "--checkpoint-dir", str(ckpts))],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not (ckpts / "step-00000004.safetensors").exists():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "model.safetensors").exists()
    done = _run([sys.executable, *_train_cmd(world, out, params, "--checkpoint-dir", str(ckpts), "--resume")])
    assert 4 <= json.loads(done.stdout[done.stdout.index("{") :])["resumed_from_step"] < STEPS
    got = _weights(out)
    for key, value in jf_reference["weights"].items():
        assert torch.equal(got[key], value), key


@pytest.mark.slow
def test_jacobian_free_two_process_ddp_matches_one_process(world, jf_reference, tmp_path):  # noqa: F811
    raw = json.loads(json.dumps(jf_reference["raw"]))
    raw["train"].update(checkpoint_every=0)
    params = write_params(tmp_path / "p.yaml", raw)
    out = tmp_path / "ddp"
    _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            *_train_cmd(world, out, params),
        ]
    )
    assert json.loads((out / "student.json").read_text())["processes"] == 2
    got = _weights(out)
    worst = max((got[k].double() - v.double()).abs().max().item() for k, v in jf_reference["weights"].items())
    initial = load_file(str(world["student"] / "model.safetensors"))
    moved = max((jf_reference["weights"][f"model.{k}"] - v).abs().max().item() for k, v in initial.items())
    assert worst <= 1e-5 and moved > 50 * 1e-5, (worst, moved)


def test_a_science_arm_sets_sds_gradient(tmp_path, fake_stages, monkeypatch):  # noqa: F811
    from sdsclip import science, stages

    seen, inner = [], stages.train

    def train(params, *args, **kw):
        seen.append((params.train.lambda_sds, params.train.sds_gradient))
        return inner(params, *args, **kw)

    monkeypatch.setattr(stages, "train", train)
    raw = _shipped()
    raw["science"] = {**raw["science"], "seeds": [0], "lambdas": [1.0], "sds_gradients": ["full", "jacobian_free"]}
    summary = science.run_science(params_from_dict(raw), tmp_path / "sci", log=lambda line: None)
    assert sorted(seen) == [(0.0, "full"), (1.0, "full"), (1.0, "jacobian_free")]
    assert set(summary["arms"]) == {"control", "sds_lambda_1", "sds_lambda_1_jacobian_free"}
