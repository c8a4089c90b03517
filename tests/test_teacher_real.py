"""The real teacher path, on a directory with Stable Diffusion 1.5's layout (every part tiny and random,
written with each component's own save_pretrained, plus the files a real download carries that the project
never loads): hashing only what is loaded, the t-range against the scheduler, fp32 noising under mixed
precision, the text-conditioning cache's copies, and truncated weight files stopped with one line."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from train_helpers import make_dataset, make_models, train_params, write_params
from typer.testing import CliRunner

from sdsclip.config import params_from_dict
from sdsclip.models.teacher import TeacherLoadError, TextConditioningCache, check_t_range, load_teacher, teacher_files

LOADED = {
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
}
JUNK = (
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.bin",
    "text_encoder/pytorch_model.bin",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "v1-5-pruned-emaonly.ckpt",
    "safety_checker/model.safetensors",
)
CAPTIONS = ["a red circle", "a blue square", "a red circle", "blue red"]


def _bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP byte-level BPE alphabet (what CLIPTokenizer's vocab.json is built on)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_sd_dir(root: Path, timesteps: int = 1000, max_tokens: int = 16) -> Path:
    """An SD-1.5-layout directory: unet / vae (diffusers), text_encoder (CLIPTextModel), a CLIPTokenizer
    (vocab.json + merges.txt), the scheduler config (PNDM as SD 1.5 ships it; DDPM when ``timesteps`` is
    not 1000), model_index.json, and never-loaded siblings (fp16 / .bin / .ckpt / safety_checker) of 1 MiB."""
    from diffusers import AutoencoderKL, DDPMScheduler, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    sd = Path(root)
    tok = sd / "tokenizer"
    tok.mkdir(parents=True)
    chars = _bytes_to_unicode()
    vocab = (
        chars
        + [c + "</w>" for c in chars]
        + ["re", "red</w>", "bl", "blu", "blue</w>", "<|startoftext|>", "<|endoftext|>"]
    )
    (tok / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (tok / "merges.txt").write_text("#version: 0.2\nr e\nre d</w>\nb l\nbl u\nblu e</w>\n")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (tok / "special_tokens_map.json").write_text(json.dumps(special))
    (tok / "tokenizer_config.json").write_text(
        json.dumps(
            {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_tokens, "do_lower_case": True, **special}
        )
    )
    CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=max_tokens,
            bos_token_id=len(vocab) - 2,
            eos_token_id=len(vocab) - 1,
            pad_token_id=len(vocab) - 1,
        )
    ).save_pretrained(sd / "text_encoder")
    UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ).save_pretrained(sd / "unet")
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    ).save_pretrained(sd / "vae")
    if timesteps == 1000:
        PNDMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1
        ).save_pretrained(sd / "scheduler")
    else:
        DDPMScheduler(num_train_timesteps=timesteps, beta_schedule="squaredcos_cap_v2").save_pretrained(
            sd / "scheduler"
        )
    (sd / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "_diffusers_version": "0.42.1",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", "PNDMScheduler"],
                "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
                "feature_extractor": ["transformers", "CLIPImageProcessor"],
            }
        )
    )
    (sd / "feature_extractor").mkdir()
    (sd / "feature_extractor" / "preprocessor_config.json").write_text("{}")
    (sd / "safety_checker").mkdir()
    (sd / "safety_checker" / "config.json").write_text("{}")
    junk = torch.Generator().manual_seed(1)
    for rel in JUNK:  # not valid weights: reading any of them would fail
        (sd / rel).write_bytes(torch.randint(0, 256, (1 << 20,), generator=junk, dtype=torch.uint8).numpy().tobytes())
    return sd


@pytest.fixture(scope="module")
def sd(tmp_path_factory) -> Path:
    return write_sd_dir(tmp_path_factory.mktemp("sd15") / "stable-diffusion-v1-5")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    shards, accepted = make_dataset(root, n_images=8, captions_per_image=2)
    (root / "validated" / "train").mkdir(parents=True)
    (root / "shards_root").mkdir()
    (root / "shards_root" / "train").symlink_to(shards)
    accepted.rename(root / "validated" / "train" / "accepted.csv")
    student, teacher = make_models(root)
    return {
        "root": root,
        "shards": root / "shards_root",
        "validated": root / "validated",
        "student": student,
        "teacher": teacher,
    }


def _sd_params(tmp: Path, sd: Path, **train) -> dict:
    raw = train_params(tmp, **train)
    raw["teacher"] = {**raw["teacher"], "pretrained_dir": str(sd), "latent": "vae", "image_size": 16}
    return raw


def _no_compute(*a, **kw):
    raise AssertionError("compute was spent before the input was rejected")


def _one_line(result, command: str) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sdsclip {command}: error:"), result.output
    return lines[0]


def _cli_train(w: dict, teacher: Path, params: Path, out: Path):
    from sdsclip.cli import app

    return CliRunner().invoke(
        app,
        [
            "train",
            "--student",
            str(w["student"]),
            "--teacher",
            str(teacher),
            "--shards",
            str(w["shards"]),
            "--validated",
            str(w["validated"]),
            "--out",
            str(out),
            "--params",
            str(params),
        ],
    )


def _cli_winoground(model: Path, params: Path, tmp: Path):
    from sdsclip.cli import app

    return CliRunner().invoke(
        app,
        [
            "evaluate",
            "winoground",
            "--data",
            str(tmp / "winoground"),
            "--model",
            str(model),
            "--out",
            str(tmp / "wino.json"),
            "--params",
            str(params),
        ],
    )


# ------------------------------------------------------------------------------------------ 1. hashing


def test_pretrain_teacher_hashes_only_loaded_files_once(sd, tmp_path, monkeypatch):
    import sdsclip.hashing as hashing
    from sdsclip.pretrain import pretrain_teacher

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    sd = Path(shutil.copytree(sd, tmp_path / "sd"))
    hashed: list[str] = []
    real = hashing.file_sha256
    monkeypatch.setattr(
        hashing, "file_sha256", lambda p: (hashed.append(Path(p).relative_to(sd.resolve()).as_posix()), real(p))[1]
    )
    params = params_from_dict(_sd_params(tmp_path, sd))

    def run(name: str) -> dict:
        pretrain_teacher(params, tmp_path / "unused", tmp_path / "unused.csv", tmp_path / name)
        return json.loads((tmp_path / name / "teacher.json").read_text())

    first = run("t1")
    assert sorted(hashed) == sorted(LOADED)  # every loaded file once; no fp16/.bin/.ckpt/safety_checker sibling
    assert not set(hashed) & set(JUNK)
    assert {f["path"] for f in first["hashed_files"]} == LOADED and re.fullmatch(r"[0-9a-f]{64}", first["sha256"])
    unet_w = next(f for f in first["hashed_files"] if f["path"] == "unet/diffusion_pytorch_model.safetensors")
    assert unet_w["sha256"] == real(sd / unet_w["path"]) and unet_w["bytes"] == (sd / unet_w["path"]).stat().st_size
    assert (tmp_path / "xdg" / "sdsclip" / "sha256-cache.json").is_file()

    hashed.clear()
    second = run("t2")
    assert hashed == [] and second["sha256"] == first["sha256"]  # all from the (path, size, mtime_ns) cache

    weight = sd / "unet" / "diffusion_pytorch_model.safetensors"
    st = weight.stat()
    os.utime(weight, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: content unknown, rehash it
    third = run("t3")
    assert hashed == ["unet/diffusion_pytorch_model.safetensors"] and third["sha256"] == first["sha256"]

    hashed.clear()
    index = sd / "model_index.json"
    index.write_text(index.read_text() + "\n")  # a loaded file that changed: the digest changes
    fourth = run("t4")
    assert hashed == ["model_index.json"] and fourth["sha256"] != first["sha256"]


def test_the_loaded_weight_files_follow_diffusers_and_transformers_preference(sd, tmp_path):
    sd = Path(shutil.copytree(sd, tmp_path / "sd"))
    assert set(teacher_files(sd, "vae", with_vae=True).all) == LOADED
    assert "vae/diffusion_pytorch_model.safetensors" not in teacher_files(sd, "vae", with_vae=False).weights
    (sd / "unet" / "diffusion_pytorch_model.safetensors").unlink()  # no safetensors: diffusers reads the .bin
    assert "unet/diffusion_pytorch_model.bin" in teacher_files(sd, "vae").weights
    (sd / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps(
            {
                "weight_map": {
                    "a": "diffusion_pytorch_model-00001-of-00002.safetensors",
                    "b": "diffusion_pytorch_model-00002-of-00002.safetensors",
                }
            }
        )
    )
    files = teacher_files(sd, "vae")  # a sharded index wins: the index and both shards
    assert "unet/diffusion_pytorch_model.safetensors.index.json" in files.configs
    assert [w for w in files.weights if w.startswith("unet/")] == [
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
    ]


# ------------------------------------------------------------------------------------- 2. t range


def test_t_range_is_checked_against_the_teachers_scheduler(world, tmp_path, monkeypatch):
    import sdsclip.train as train_mod
    from sdsclip.scoring import TeacherScorer, load_scorer

    sd100 = write_sd_dir(tmp_path / "sd100", timesteps=100)
    monkeypatch.setattr(train_mod, "make_accelerator", _no_compute)
    params = write_params(tmp_path / "p.yaml", _sd_params(tmp_path, sd100))  # train.t_max 980, eval 900
    line = _one_line(_cli_train(world, sd100, params, tmp_path / "out"), "train")
    assert "train.t_max = 980 is outside the teacher's timesteps 0..99" in line
    assert "num_train_timesteps 100" in line and "set train.t_max <= 99" in line
    assert not (tmp_path / "out").exists()
    # t is drawn in [t_min, t_max] INCLUSIVE: 100 is one past the last timestep, 99 the last one
    with pytest.raises(TeacherLoadError, match=r"train\.t_max = 100 is outside"):
        check_t_range(sd100, 20, 100, "train.t_min", "train.t_max")
    assert check_t_range(sd100, 20, 99, "train.t_min", "train.t_max") == 100

    with pytest.raises(AssertionError, match="compute was spent"):  # t_max 99 passes the whole preflight
        train_mod.finetune(
            params_from_dict(_sd_params(tmp_path, sd100, t_max=99)),
            world["student"],
            sd100,
            world["shards"] / "train",
            world["validated"] / "train" / "accepted.csv",
            tmp_path / "out99",
        )

    monkeypatch.setattr(load_teacher.__globals__["UNet2DConditionModel"], "from_pretrained", _no_compute)
    line = _one_line(_cli_winoground(sd100, params, tmp_path), "evaluate winoground")
    assert "eval.teacher_t_max = 900 is outside the teacher's timesteps 0..99" in line
    monkeypatch.undo()
    raw = _sd_params(tmp_path, sd100)
    raw["eval"] = {**raw["eval"], "teacher_t_min": 10, "teacher_t_max": 99, "teacher_draws": 2}
    scorer = load_scorer(sd100, params_from_dict(raw))
    assert isinstance(scorer, TeacherScorer) and scorer.t.tolist() == [10, 99]
    from PIL import Image

    scores = scorer.score([Image.new("RGB", (16, 16), "red")], ["a red circle", "blue"], [(0, 0), (0, 1)])
    assert torch.isfinite(scores).all()  # t = 99 is the last valid index of a 100-step schedule


# ---------------------------------------------------------------------------------- 3. mixed precision


def _autocast_on() -> bool:
    return torch.is_autocast_enabled("cpu")


def _sds_step(module, teacher, images, tokens, cond, bf16: bool, seen: dict):
    from sdsclip.sds import sds_loss

    module.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        _, _, z = module(images, tokens, True)
        z.retain_grad()
        loss = sds_loss(teacher, z, cond, 20, 980, 1, torch.Generator().manual_seed(3))
    loss.backward()
    return z, loss, dict(seen)


def test_bf16_autocast_runs_only_the_unet_in_low_precision(sd):
    """Under accelerate's autocast the UNet runs in bf16; z, eps, alpha_bar and x_t stay fp32, so x_t is the
    fp32 noising exactly, and loss and z-gradient stay within 2 % / 5 % of the fp32 step."""
    from sdsclip.models.student import build_student
    from sdsclip.sds import LatentProjection, StudentWithSigma, draw_t_and_noise

    torch.manual_seed(0)
    teacher = load_teacher(sd, "vae", with_vae=False).freeze()
    student = build_student("sdsclip-tiny-vit")
    module = StudentWithSigma(student.model, LatentProjection(student.embed_dim, teacher.latent_shape)).eval()
    seen: dict = {}

    def hook(_, args, kwargs):
        seen.update(x_t=args[0].detach().clone(), t=args[1].clone(), autocast=_autocast_on())

    teacher.unet.register_forward_pre_hook(hook, with_kwargs=True)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = student.tokenizer(CAPTIONS)
    with torch.no_grad():
        cond = teacher.encode_text(CAPTIONS)
    z32, loss32, fp32 = _sds_step(module, teacher, images, tokens, cond, False, seen)
    zbf, lossbf, bf = _sds_step(module, teacher, images, tokens, cond, True, seen)

    assert bf["autocast"] and not fp32["autocast"]  # the UNet did run under bf16 autocast
    assert zbf.dtype == torch.float32 and bf["x_t"].dtype == torch.float32
    t, noise = draw_t_and_noise(4, teacher.latent_shape, 20, 980, torch.Generator().manual_seed(3))
    assert torch.equal(bf["t"], t)
    abar = teacher.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert abar.dtype == torch.float32
    expected = teacher.scheduler.add_noise(zbf.detach(), noise, t)  # fp32, outside autocast
    assert torch.equal(bf["x_t"], expected)
    assert torch.allclose(expected, abar.sqrt() * zbf.detach() + (1 - abar).sqrt() * noise, atol=1e-6)
    assert abs(lossbf.item() - loss32.item()) <= 0.02 * loss32.item(), (lossbf.item(), loss32.item())
    rel = ((zbf.grad - z32.grad).norm() / z32.grad.norm()).item()
    assert rel <= 0.05, rel


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one AcceleratorState per process and refuses a second mixed_precision in it (a real
    run is one process per precision); reset it around a test that runs both."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.slow
def test_finetune_with_bf16_mixed_precision(world, tmp_path, monkeypatch, fresh_accelerate_state):
    """`train.mixed_precision: bf16` end to end (accelerate's autocast around the step, CPU bf16): the UNet
    sees autocast on and an fp32 x_t made from an fp32 z, and the run's losses track the fp32 run's (1 %)."""
    from accelerate.state import AcceleratorState

    import sdsclip.train as train_mod
    from sdsclip import stages

    seen: list[tuple[bool, torch.dtype]] = []
    real_load = train_mod.load_teacher

    def load(*a, **kw):
        teacher = real_load(*a, **kw)
        teacher.unet.register_forward_pre_hook(lambda _, args: seen.append((_autocast_on(), args[0].dtype)))
        return teacher

    sigma_out: list[torch.dtype] = []

    class RecordingSigma(train_mod.LatentProjection):
        def forward(self, image_embedding):
            z = super().forward(image_embedding)
            sigma_out.append(z.dtype)  # before accelerate's convert_outputs_to_fp32 could hide a bf16 z
            return z

    monkeypatch.setattr(train_mod, "load_teacher", load)
    monkeypatch.setattr(train_mod, "LatentProjection", RecordingSigma)
    results = {}
    for precision in ("no", "bf16"):
        seen.clear()
        AcceleratorState._reset_state(reset_partial_state=True)
        params = params_from_dict(train_params(tmp_path, steps=3, mixed_precision=precision))
        results[precision] = stages.train(
            params, world["student"], world["teacher"], world["shards"], world["validated"], tmp_path / precision
        )
        assert len(seen) == 3 and all(dtype == torch.float32 for _, dtype in seen)
        assert all(on == (precision == "bf16") for on, _ in seen)
        assert sigma_out == [torch.float32] * 3
        sigma_out.clear()
    bf, fp = results["bf16"], results["no"]
    assert torch.isfinite(torch.tensor([bf["loss"], bf["loss_sds"]])).all()
    assert abs(bf["loss_sds"] - fp["loss_sds"]) <= 0.01 * fp["loss_sds"], (bf["loss_sds"], fp["loss_sds"])
    assert abs(bf["loss_clip"] - fp["loss_clip"]) <= 0.01 * fp["loss_clip"], (bf["loss_clip"], fp["loss_clip"])


# -------------------------------------------------------------------------------- 4. text cache


def test_text_cache_keeps_copies_not_views_and_equals_no_cache(sd):
    teacher = load_teacher(sd, "vae", with_vae=False).freeze()
    outputs: list[torch.Tensor] = []
    encode = teacher.encode_text
    teacher.encode_text = lambda caps: (outputs.append(encode(caps)), outputs[-1])[1]
    cache = TextConditioningCache(teacher, max_entries=8)
    first = cache(CAPTIONS)
    (batch,) = outputs  # the 3 distinct captions, encoded as one batch
    assert batch.shape[0] == 3 and len(cache) == 3
    for row in cache._rows.values():
        assert row.untyped_storage().data_ptr() != batch.untyped_storage().data_ptr()
        assert row.untyped_storage().nbytes() == row.numel() * row.element_size()  # holds its own row only
    assert first.untyped_storage().data_ptr() != batch.untyped_storage().data_ptr()
    again = cache(CAPTIONS[::-1])
    assert len(outputs) == 1  # all hits
    with torch.no_grad():
        plain = TextConditioningCache(teacher, max_entries=0)(CAPTIONS)
    assert torch.equal(first, plain) and torch.equal(again, plain.flip(0))


# ----------------------------------------------------------------------------------- 5. broken files


@pytest.mark.parametrize("component", ["unet", "text_encoder", "vae"])
def test_truncated_teacher_weights_are_one_line_before_any_compute(component, sd, world, tmp_path, monkeypatch):
    import sdsclip.train as train_mod

    sd = Path(shutil.copytree(sd, tmp_path / "sd"))
    name = "model.safetensors" if component == "text_encoder" else "diffusion_pytorch_model.safetensors"
    weight = sd / component / name
    weight.write_bytes(weight.read_bytes()[: weight.stat().st_size // 2])  # an interrupted download
    monkeypatch.setattr(train_mod, "make_accelerator", _no_compute)
    for cls in ("UNet2DConditionModel", "AutoencoderKL"):
        monkeypatch.setattr(__import__("diffusers", fromlist=[cls]).__dict__[cls], "from_pretrained", _no_compute)
    params = write_params(tmp_path / "p.yaml", train_params(tmp_path))

    line = _one_line(_cli_winoground(sd, params, tmp_path), "evaluate winoground")
    assert f"{weight}: corrupt or truncated safetensors file" in line and "re-download" in line

    if component == "vae":  # SDS never loads the VAE: its preflight does not read it, so it reaches compute
        with pytest.raises(AssertionError, match="compute was spent"):
            train_mod.finetune(
                params_from_dict(train_params(tmp_path)),
                world["student"],
                sd,
                world["shards"] / "train",
                world["validated"] / "train" / "accepted.csv",
                tmp_path / "out",
            )
        return
    line = _one_line(_cli_train(world, sd, params, tmp_path / "out"), "train")
    assert f"{weight}: corrupt or truncated safetensors file" in line
    assert "teacher.pretrained_dir" in line and not (tmp_path / "out").exists()
