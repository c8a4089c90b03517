"""`sdsclip train` at production depth: real model loaders, the paper profile, cached teacher text
conditioning, bad input stopped before compute, SIGKILL + --resume, and 2-process DDP == 1 process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_params import ROOT
from train_helpers import TINY_TEACHER, make_dataset, make_models, train_params, vocabulary, write_params
from typer.testing import CliRunner

from sdsclip.config import ConfigError, Params, params_from_dict
from sdsclip.distributed import LaunchError, normalize_dist_env
from sdsclip.models.teacher import (
    TeacherLoadError,
    TextConditioningCache,
    build_tiny_teacher,
    check_teacher_dir,
    latent_shape_of,
)
from sdsclip.sds import LatentProjection

STEPS = 24  # 40 pairs / batch 8 = 5 batches per epoch: runs cross epoch boundaries, resume lands mid-epoch


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    shards, accepted = make_dataset(root, n_images=8, captions_per_image=5)
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


def _env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
    }
    return {
        **env,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(ROOT / "src"),
    }


def _train_cmd(w: dict, out: Path, params: Path, *extra: str) -> list[str]:
    return [
        "-m",
        "sdsclip.cli",
        "train",
        "--student",
        str(w["student"]),
        "--teacher",
        str(w["teacher"]),
        "--shards",
        str(w["shards"]),
        "--validated",
        str(w["validated"]),
        "--out",
        str(out),
        "--log-dir",
        str(out.parent / f"{out.name}-logs"),
        "--params",
        str(params),
        *extra,
    ]


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=300, **kw)
    assert proc.returncode == 0, f"{' '.join(args)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return {
        **{f"model.{k}": v for k, v in load_file(str(out / "model.safetensors")).items()},
        **{f"sigma.{k}": v for k, v in load_file(str(out / "sigma.safetensors")).items()},
    }


@pytest.fixture(scope="module")
def reference(world):
    """One uninterrupted single-process run (SDS arm, in this process: the same code `sdsclip train` runs),
    MLflow logging on."""
    from sdsclip import stages

    root = world["root"]
    params = write_params(root / "ref.yaml", train_params(root, steps=STEPS, checkpoint_every=5, log_mlflow=True))
    out = root / "reference"
    stages.train(
        params_from_dict(yaml.safe_load(params.read_text())),
        world["student"],
        world["teacher"],
        world["shards"],
        world["validated"],
        out,
        log_dir=root / "reference-logs",
    )
    return {"out": out, "params": params, "weights": _weights(out)}


# ------------------------------------------------------------------------------------- reader


def test_reader_splits_global_batches_by_rank_and_resumes_mid_epoch(world):
    from itertools import islice

    from torchvision.transforms.functional import to_tensor

    from sdsclip.data import pair_loader

    args = (world["shards"] / "train", world["validated"] / "train" / "accepted.csv", to_tensor, 8)
    full = list(islice(pair_loader(*args, seed=3).batches(), 12))  # 5 batches per epoch: crosses 2 epochs
    assert [(e, i) for e, i, _ in full][4:6] == [(0, 4), (1, 0)]
    halves = [list(islice(pair_loader(*args, seed=3, rank=r, world_size=2).batches(), 12)) for r in (0, 1)]
    for (_, _, (img, cap)), (_, _, (img0, cap0)), (_, _, (img1, cap1)) in zip(full, *halves):
        assert cap == cap0 + cap1 and torch.equal(img, torch.cat([img0, img1]))
    resumed = list(islice(pair_loader(*args, seed=3).batches(1, 3), 4))  # from epoch 1, batch 3
    assert [(e, i) for e, i, _ in resumed] == [(1, 3), (1, 4), (2, 0), (2, 1)]
    assert [b[1] for _, _, b in resumed] == [b[1] for _, _, b in full[8:12]]


# ------------------------------------------------------------------------------------- profiles


def test_paper_profile_is_selected_by_one_key():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert raw["profile"] is None and params_from_dict(raw).train.lambda_sds == 1.0  # embedded default
    raw["profile"] = "paper"
    p = params_from_dict(raw, "params.yaml")
    t = p.train
    assert (t.lambda_sds, t.lr, t.batch_size, t.epochs, t.steps) == (0.001, 5e-5, 32, 5, None)
    assert (t.t_min, t.t_max, t.noise_draws, t.warmup_steps, t.weight_decay, t.sigma_lr) == (20, 980, 1, 0, 0.0, None)
    assert p.profile == "paper" and p.student == Params().student  # only `train` changes
    assert params_from_dict(p.model_dump(mode="json")) == p  # resolved params re-validate to themselves
    raw["profile"] = "nope"
    with pytest.raises(ConfigError, match=r"profile: unknown profile 'nope' .*shipped: paper"):
        params_from_dict(raw)


def test_profile_file_and_step_budget_are_checked(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {lr: 0.1}\nstudent: {arch: ViT-B-32}\n")
    raw["profile"] = str(bad)
    with pytest.raises(ConfigError, match=r"bad\.yaml: student: a profile may only set train"):
        params_from_dict(raw)
    bad.write_text("train: {lr: -1}\n")
    with pytest.raises(ConfigError, match=r"\+ .*bad\.yaml: train\.lr: Input should be greater than 0"):
        params_from_dict(raw, "params.yaml")
    raw["profile"] = None
    raw["train"]["epochs"] = 3  # steps is also set
    with pytest.raises(ConfigError, match=r"set exactly one of steps \(150\) and epochs \(3\)"):
        params_from_dict(raw)


# --------------------------------------------------------------------------- teacher conditioning


def test_text_conditioning_is_encoded_once_per_caption_and_equals_fresh():
    torch.manual_seed(0)
    teacher = build_tiny_teacher(Params(teacher=TINY_TEACHER).teacher, vocabulary()).freeze()
    calls = []
    encode = teacher.encode_text
    teacher.encode_text = lambda caps: (calls.append(list(caps)), encode(caps))[1]
    cache = TextConditioningCache(teacher, max_entries=3)
    a, b, c, d = "a red circle left of a blue square", "a blue square", "a green triangle", "a yellow circle"
    first = cache([a, b, a])
    assert calls == [[a, b]]  # distinct captions, one batch
    again = cache([b, a, a, b])
    assert calls == [[a, b]]  # all cached: the text encoder did not run
    with torch.no_grad():
        fresh = encode([a, b, a])
    assert torch.allclose(first, fresh, atol=1e-6) and torch.equal(again[1], first[0])
    cache([c, d])  # LRU of 3: a (used before the last b) is evicted, b stays
    assert len(cache) == 3 and calls[-1] == [c, d]
    cache([b])
    assert calls[-1] == [c, d]
    cache([a])
    assert calls[-1] == [a] and cache.encoded == 5
    per_step = TextConditioningCache(teacher, max_entries=0)
    per_step([a, a])
    per_step([a])
    assert calls[-2:] == [[a, a], [a]]  # the per-step baseline encodes every call


def test_v_and_sample_prediction_teachers_score_epsilon_error():
    """An SD 2.x-style v-prediction (or x0) UNet that predicts its target exactly has zero eps error."""
    torch.manual_seed(0)
    teacher = build_tiny_teacher(Params(teacher=TINY_TEACHER).teacher, vocabulary()).freeze()
    z = torch.randn(3, *teacher.latent_shape)
    noise = torch.randn_like(z)
    t = torch.tensor([50, 400, 900])
    cond = teacher.encode_text(["a red circle"] * 3).detach()
    abar = teacher.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)

    class Oracle(torch.nn.Module):
        def __init__(self, out):
            super().__init__()
            self.out, self.config = out, teacher.unet.config

        def forward(self, *args, **kw):
            return type("Out", (), {"sample": self.out})()

    for kind, target in (
        ("v_prediction", abar.sqrt() * noise - (1 - abar).sqrt() * z),
        ("sample", z),
        ("epsilon", noise),
    ):
        teacher.scheduler.register_to_config(prediction_type=kind)
        teacher.unet = Oracle(target)
        assert teacher.epsilon_error(z, cond, t, noise).max() < 1e-8, kind


# ----------------------------------------------------------------- real loaders (SD-shaped, tiny)


def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def make_sd_dir(root: Path, max_tokens: int = 16) -> Path:
    """A Stable Diffusion directory with SD's layout and component classes, every part tiny and random,
    written with each component's own save_pretrained (the tokenizer as SD ships it: vocab.json + merges.txt)."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    sd = Path(root) / "sd"
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
    PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1
    ).save_pretrained(sd / "scheduler")
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
                "safety_checker": [None, None],
                "feature_extractor": [None, None],
            }
        )
    )
    return sd


@pytest.mark.slow
def test_stable_diffusion_dir_through_the_real_loaders(world, tmp_path, monkeypatch):
    """params teacher.pretrained_dir -> pretrain_teacher (verify + hash) -> finetune (UNet, text encoder,
    scheduler; no VAE; sigma shaped like the UNet input) -> TeacherScorer (images through the VAE)."""
    from PIL import Image

    import sdsclip.train as train_mod
    from sdsclip import stages
    from sdsclip.scoring import TeacherScorer, load_scorer

    sd = make_sd_dir(tmp_path)
    raw = train_params(tmp_path, steps=None, epochs=1, text_cache_size=16, gradient_checkpointing=True)
    raw["teacher"] = {**raw["teacher"], "pretrained_dir": str(sd), "latent": "vae", "image_size": 16}
    params = params_from_dict(raw)
    meta = stages.pretrain_teacher(params, world["shards"], world["validated"], tmp_path / "teacher")
    assert meta["source"] == "pretrained_dir" and len(meta["sha256"]) == 64 and meta["latent_shape"] == [4, 8, 8]

    loaded = []
    real_load = train_mod.load_teacher
    monkeypatch.setattr(train_mod, "load_teacher", lambda *a, **kw: loaded.append(real_load(*a, **kw)) or loaded[-1])
    out = tmp_path / "sds"
    result = stages.train(params, world["student"], tmp_path / "teacher", world["shards"], world["validated"], out)
    (teacher,) = loaded
    assert teacher.vae is None  # SDS never needs the VAE: z = sigma(f_theta(x))
    assert not teacher.unet.training and not any(p.requires_grad for p in teacher.unet.parameters())
    assert not any(p.requires_grad for p in teacher.text_encoder.parameters())
    assert teacher.unet.is_gradient_checkpointing
    assert result["steps"] == 5 and result["latent_shape"] == [4, 8, 8]  # epochs=1: 40 pairs // batch 8
    assert result["loss_sds"] > 0 and result["text_conditioning_encoded"] <= 40  # once per distinct caption
    assert load_file(str(out / "sigma.safetensors"))["linear.weight"].shape == (4 * 8 * 8, 64)
    assert not (out / "checkpoints").exists()

    scorer = load_scorer(tmp_path / "teacher", params)
    assert isinstance(scorer, TeacherScorer) and scorer.teacher.vae is not None
    encoded = []
    real_encode = scorer.teacher.vae.encode
    scorer.teacher.vae.encode = lambda x: (encoded.append(x.shape), real_encode(x))[1]
    images = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    assert scorer.latents(images).shape == (2, 4, 8, 8) and encoded == [(2, 3, 16, 16)]
    scores = scorer.score(images, ["a red circle", "a blue square"], [(0, 0), (0, 1), (1, 0), (1, 1)])
    assert scores.shape == (4,) and torch.isfinite(scores).all()


def test_sd15_latent_shape_is_read_from_the_unet_config(tmp_path):
    """SD-1.x at 512 px: sigma maps a CLIP embedding to 4 x 64 x 64, known without building the 860M UNet."""
    unet = tmp_path / "sd15" / "unet"
    unet.mkdir(parents=True)
    unet.joinpath("config.json").write_text(
        json.dumps(
            {
                "_class_name": "UNet2DConditionModel",
                "sample_size": 64,
                "in_channels": 4,
                "out_channels": 4,
                "block_out_channels": [320, 640, 1280, 1280],
                "cross_attention_dim": 768,
            }
        )
    )
    assert latent_shape_of(tmp_path / "sd15") == (4, 64, 64)
    assert LatentProjection(512, (4, 64, 64))(torch.randn(2, 512)).shape == (2, 4, 64, 64)
    with pytest.raises(
        TeacherLoadError,
        match=r"missing Stable Diffusion subfolder\(s\) text_encoder, tokenizer, "
        r"scheduler, vae",
    ):
        check_teacher_dir(tmp_path / "sd15", "vae")


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("case", ["wrong_arch", "missing_sd_subfolder", "negative_lambda", "empty_dataset"])
def test_bad_input_is_one_line_before_any_compute(case, world, tmp_path, monkeypatch):
    import shutil

    import sdsclip.train as train_mod
    from sdsclip.cli import app

    def no_compute(*a, **kw):
        raise AssertionError("compute was spent before the input was rejected")

    monkeypatch.setattr(train_mod, "make_accelerator", no_compute)
    raw = train_params(tmp_path)
    student, teacher, validated = world["student"], world["teacher"], world["validated"]
    expect = {
        "wrong_arch": r"does not fit architecture 'sdsclip-tiny-vit'",
        "missing_sd_subfolder": r"missing Stable Diffusion subfolder\(s\) unet",
        "negative_lambda": r"train\.lambda_sds: Input should be greater than or equal to 0 \(got -0\.5\)",
        "empty_dataset": r"no accepted image-caption pairs \(empty dataset",
    }[case]
    if case == "wrong_arch":  # weights of another architecture under this student.json
        from safetensors.torch import save_file

        student = tmp_path / "student"
        shutil.copytree(world["student"], student)
        save_file({"visual.conv1.weight": torch.zeros(8, 3, 4, 4)}, str(student / "model.safetensors"))
    elif case == "missing_sd_subfolder":
        sd = make_sd_dir(tmp_path)
        shutil.rmtree(sd / "unet")
        teacher = sd
    elif case == "negative_lambda":
        raw["train"]["lambda_sds"] = -0.5
    elif case == "empty_dataset":
        validated = tmp_path / "validated"
        (validated / "train").mkdir(parents=True)
        (validated / "train" / "accepted.csv").write_text("annotation_id,caption\n")
        monkeypatch.setattr(train_mod, "load_student", no_compute)  # stopped before even loading the student
    params = write_params(tmp_path / "p.yaml", raw)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--student",
            str(student),
            "--teacher",
            str(teacher),
            "--shards",
            str(world["shards"]),
            "--validated",
            str(validated),
            "--out",
            str(out),
            "--params",
            str(params),
        ],
    )
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdsclip train: error:"), result.output
    import re

    assert re.search(expect, lines[0]), lines[0]
    assert not out.exists()


# ------------------------------------------------------------------------------ distributed launch


def test_launch_environments_map_to_torch_distributed():
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert normalize_dist_env(dict(torchrun)) == {}  # torchrun / accelerate launch: untouched
    pytorchjob = {"RANK": "3", "WORLD_SIZE": "4", "MASTER_ADDR": "job-master-0", "MASTER_PORT": "23456"}
    env = dict(pytorchjob)
    assert normalize_dist_env(env) == {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}  # one process per pod
    pet = {
        "PET_NNODES": "2",
        "PET_NODE_RANK": "1",
        "PET_MASTER_ADDR": "m",
        "PET_MASTER_PORT": "29400",
        "PET_NPROC_PER_NODE": "1",
    }
    env = dict(pet)
    normalize_dist_env(env)
    assert {k: env[k] for k in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")} == {
        "WORLD_SIZE": "2",
        "RANK": "1",
        "MASTER_ADDR": "m",
        "MASTER_PORT": "29400",
        "LOCAL_RANK": "0",
    }
    assert normalize_dist_env({}) == {}  # single process
    with pytest.raises(LaunchError, match="PET_NPROC_PER_NODE=4: .*torchrun"):
        normalize_dist_env({**pet, "PET_NPROC_PER_NODE": "4"})
    with pytest.raises(LaunchError, match="WORLD_SIZE=2 but MASTER_ADDR is not set"):
        normalize_dist_env({"WORLD_SIZE": "2", "RANK": "0", "MASTER_PORT": "1"})


# --------------------------------------------------------------- logging, SIGKILL + resume, DDP


@pytest.mark.slow
def test_losses_go_to_dvc_plots_and_mlflow(reference):
    from mlflow import MlflowClient

    logs = reference["out"].parent / "reference-logs" / "plots" / "metrics"
    for term in ("loss", "loss_clip", "loss_sds"):
        rows = (logs / f"{term}.tsv").read_text().splitlines()
        assert rows[0] == f"step\t{term}" and [int(r.split("\t")[0]) for r in rows[1:]] == list(range(STEPS))
    raw = yaml.safe_load(reference["params"].read_text())
    client = MlflowClient(tracking_uri=raw["registry"]["tracking_uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "train_sds"
    for term in ("loss", "loss_clip", "loss_sds", "lr"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, term)] == list(range(STEPS))
    assert run.data.params["train.lambda_sds"] == "1.0"


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_weights(world, reference, tmp_path):
    raw = train_params(world["root"], steps=STEPS, checkpoint_every=2, log_mlflow=False)
    params = write_params(tmp_path / "p.yaml", raw)
    out, ckpts = tmp_path / "killed", tmp_path / "ckpt"
    cmd = [sys.executable, *_train_cmd(world, out, params, "--checkpoint-dir", str(ckpts))]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (ckpts / "step-00000004.safetensors").exists():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    written = sorted(p.name for p in ckpts.iterdir() if not p.name.startswith("."))
    assert not (out / "model.safetensors").exists(), "the run finished before it was killed: not a resume test"
    assert written[-1] < f"step-{STEPS:08d}.safetensors" and len(written) <= 2  # keep_checkpoints
    for path in ckpts.glob("step-*.safetensors"):  # safetensors, no pickle: loads as plain tensors
        assert "param.sigma.linear.weight" in load_file(str(path))

    done = _run([sys.executable, *_train_cmd(world, out, params, "--checkpoint-dir", str(ckpts), "--resume")])
    result = json.loads(done.stdout[done.stdout.index("{") :])
    assert 4 <= result["resumed_from_step"] < STEPS
    got = _weights(out)
    assert got.keys() == reference["weights"].keys()
    for key, value in reference["weights"].items():
        assert torch.equal(got[key], value), key  # bit-identical on CPU with a fixed seed
    rows = (out.parent / "killed-logs" / "plots" / "metrics" / "loss.tsv").read_text().splitlines()[1:]
    assert [int(r.split("\t")[0]) for r in rows] == list(range(STEPS))  # curves continue, no duplicate steps

    # a changed recipe refuses the checkpoint (in-process: it is rejected before any compute)
    from sdsclip.cli import app

    raw["train"]["lr"] = 1e-3
    write_params(params, raw)
    bad = CliRunner().invoke(app, _train_cmd(world, out, params, "--checkpoint-dir", str(ckpts), "--resume")[2:])
    assert bad.exit_code == 2 and "was written by a different run (train changed)" in bad.output, bad.output


DDP_ATOL = 1e-5  # observed ~2e-7 here: float summation order (gathers, all-reduce) differs, nothing else


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(world, reference, tmp_path):
    """torchrun, 2 CPU processes (gloo), each 4 of the same global batch of 8 == 1 process with batch 8."""
    raw = yaml.safe_load(reference["params"].read_text())
    raw["train"].update(log_mlflow=False, checkpoint_every=0)  # neither changes the weights
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
    meta = json.loads((out / "student.json").read_text())
    assert meta["processes"] == 2 and meta["steps"] == STEPS
    got = _weights(out)
    worst = max((got[k].double() - v.double()).abs().max().item() for k, v in reference["weights"].items())
    initial = load_file(str(world["student"] / "model.safetensors"))
    moved = max((reference["weights"][f"model.{k}"] - v).abs().max().item() for k, v in initial.items())
    print(
        f"2-process DDP vs 1 process, max |delta weight| over model + sigma: {worst:.3g} "
        f"(training moved weights by up to {moved:.3g})"
    )
    assert worst <= DDP_ATOL and moved > 50 * DDP_ATOL
    ref_rows = (reference["out"].parent / "reference-logs" / "plots" / "metrics" / "loss.tsv").read_text()
    ddp_rows = (out.parent / "ddp-logs" / "plots" / "metrics" / "loss.tsv").read_text()
    ref_loss = [float(r.split("\t")[1]) for r in ref_rows.splitlines()[1:]]
    ddp_loss = [float(r.split("\t")[1]) for r in ddp_rows.splitlines()[1:]]
    assert ddp_loss == pytest.approx(ref_loss, rel=1e-5)  # the logged loss is the global batch's
