"""Training loops, one per DVC stage: student pretraining, teacher pretraining and SDS-CLIP fine-tuning.

All three read the validated WebDataset shards through ``sdsclip.data.pair_loader`` and run on
accelerate. In the real configuration (a local open_clip checkpoint / Stable Diffusion directory) the two
pretraining stages only verify the configured weights and record their hashes.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from open_clip.loss import ClipLoss
from tqdm.auto import tqdm

from sdsclip.config import OptimConfig, Params
from sdsclip.data import pair_loader
from sdsclip.models.student import Student, build_student, load_student, save_student
from sdsclip.models.teacher import (
    Teacher,
    build_tiny_teacher,
    caption_vocabulary,
    load_teacher,
    save_teacher,
    teacher_pixels,
)
from sdsclip.sds import LatentProjection, select_trainable, sds_clip_loss


class TrainError(ValueError):
    """A training request that cannot run; the message is one line for the user."""


# ------------------------------------------------------------------------------------------ helpers


def make_accelerator(params: Params, mixed_precision: str = "no") -> Accelerator:
    return Accelerator(cpu=params.device == "cpu", mixed_precision=mixed_precision)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_sha256(root: Path) -> str:
    """Hash of every file under root (relative paths + contents), order-independent of the filesystem."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


class LossLog:
    """Per-step loss terms as DVC plots (DVCLive TSVs) plus a summary JSON."""

    def __init__(self, out_dir: Path):
        from dvclive import Live

        self.live = Live(str(out_dir), save_dvc_exp=False, dvcyaml=None, report=None)

    def log(self, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.live.log_metric(name, value)
        self.live.next_step()

    def close(self) -> None:
        self.live.end()


def _optimizer(params_list: list[torch.nn.Parameter], opt: OptimConfig | Any, lr: float | None = None):
    return torch.optim.AdamW(params_list, lr=lr or opt.lr, weight_decay=opt.weight_decay)


def _cycle(loader) -> Iterator:
    while True:
        yield from loader


def _loader(params: Params, shards: Path, accepted: Path, transform: Callable, batch_size: int, seed: int):
    return iter(_cycle(pair_loader(shards, accepted, transform, batch_size=batch_size, seed=seed)))


def student_transform(student: Student) -> Callable:
    return student.preprocess


def teacher_transform(image_size: int) -> Callable:
    from torchvision import transforms

    return transforms.Compose(
        [transforms.Resize(image_size), transforms.CenterCrop(image_size), transforms.ToTensor()]
    )


# ------------------------------------------------------------------------------- student pretraining


def pretrain_student(
    params: Params, shards: Path, accepted: Path, out_dir: Path, log_dir: Path | None = None
) -> dict[str, Any]:
    """Contrastive pretraining from scratch (embedded default) or verification of a local checkpoint."""
    cfg = params.student
    if cfg.checkpoint:
        student = build_student(cfg.arch, cfg.checkpoint)
        meta = {"source": "checkpoint", "checkpoint": str(Path(cfg.checkpoint).resolve()),
                "sha256": file_sha256(Path(cfg.checkpoint))}
        save_student(student, out_dir, meta)
        return meta

    set_seed(params.seed)
    accelerator = make_accelerator(params)
    student = build_student(cfg.arch)
    model = student.model
    opt = cfg.pretrain
    optimizer = _optimizer([p for p in model.parameters() if p.requires_grad], opt)
    lr_sched = get_scheduler("cosine", optimizer, num_warmup_steps=opt.warmup_steps, num_training_steps=opt.steps)
    model, optimizer, lr_sched = accelerator.prepare(model, optimizer, lr_sched)
    batches = _loader(params, shards, accepted, student.preprocess, opt.batch_size, params.seed)
    contrastive = ClipLoss()
    log = LossLog(log_dir or out_dir / "dvclive")
    model.train()
    started = time.time()
    for step in tqdm(range(opt.steps), desc="pretrain_student", mininterval=5):
        images, captions = next(batches)
        images = images.to(accelerator.device)
        tokens = student.tokenizer(captions).to(accelerator.device)
        img = F.normalize(model.encode_image(images), dim=-1)
        txt = F.normalize(model.encode_text(tokens), dim=-1)
        loss = contrastive(img, txt, model.logit_scale.exp())
        accelerator.backward(loss)
        optimizer.step()
        lr_sched.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # CLIP's clamp keeps the temperature from diverging
            accelerator.unwrap_model(model).logit_scale.clamp_(0, 4.6052)
        log.log({"loss_clip": loss.item()})
    log.close()
    student.model = accelerator.unwrap_model(model).eval()
    meta = {"source": "pretrained_from_scratch", "steps": opt.steps, "final_loss": float(loss),
            "seconds": round(time.time() - started, 1)}
    save_student(student, out_dir, meta)
    return meta


# ------------------------------------------------------------------------------- teacher pretraining


def _accepted_captions(accepted: Path) -> list[str]:
    import pandas as pd

    return pd.read_csv(accepted, usecols=["caption"], keep_default_na=False)["caption"].astype(str).tolist()


def pretrain_teacher(
    params: Params, shards: Path, accepted: Path, out_dir: Path, log_dir: Path | None = None
) -> dict[str, Any]:
    """Text-conditioned denoising from scratch (embedded default) or verification of a local SD dir."""
    cfg = params.teacher
    if cfg.pretrained_dir:
        teacher = load_teacher(cfg.pretrained_dir, latent=cfg.latent, image_size=cfg.image_size)
        meta = {"source": "pretrained_dir", "pretrained_dir": str(Path(cfg.pretrained_dir).resolve()),
                "sha256": tree_sha256(Path(cfg.pretrained_dir)), "latent_shape": list(teacher.latent_shape)}
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "teacher.json").write_text(json.dumps({**meta, "latent": teacher.latent,
                                                          "image_size": teacher.image_size}, indent=2) + "\n")
        return meta

    set_seed(params.seed)
    accelerator = make_accelerator(params)
    teacher = build_tiny_teacher(cfg, caption_vocabulary(_accepted_captions(accepted)))
    opt = cfg.pretrain
    modules = torch.nn.ModuleDict({"unet": teacher.unet, "text_encoder": teacher.text_encoder})
    optimizer = _optimizer(list(modules.parameters()), opt)
    lr_sched = get_scheduler("cosine", optimizer, num_warmup_steps=opt.warmup_steps, num_training_steps=opt.steps)
    modules, optimizer, lr_sched = accelerator.prepare(modules, optimizer, lr_sched)
    teacher.to(accelerator.device)
    batches = _loader(params, shards, accepted, teacher_transform(cfg.image_size), opt.batch_size, params.seed)
    gen = torch.Generator().manual_seed(params.seed)
    log = LossLog(log_dir or out_dir / "dvclive")
    n_timesteps = teacher.scheduler.config.num_train_timesteps
    modules.train()
    started = time.time()
    for step in tqdm(range(opt.steps), desc="pretrain_teacher", mininterval=5):
        images, captions = next(batches)
        # Caption dropout: the model also learns the unconditional score (classifier-free guidance style).
        drop = torch.rand(len(captions), generator=gen) < cfg.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        latents = teacher.encode_images(teacher_pixels(images))
        cond = teacher.encode_text(captions)
        t = torch.randint(0, n_timesteps, (latents.shape[0],), generator=gen).to(latents.device)
        noise = torch.randn(latents.shape, generator=gen).to(latents.device)
        loss = teacher.epsilon_error(latents, cond, t, noise).mean()
        accelerator.backward(loss)
        optimizer.step()
        lr_sched.step()
        optimizer.zero_grad(set_to_none=True)
        log.log({"loss_denoise": loss.item()})
    log.close()
    teacher.to("cpu")
    meta = {"source": "pretrained_from_scratch", "steps": opt.steps, "final_loss": float(loss),
            "seconds": round(time.time() - started, 1)}
    save_teacher(teacher.freeze(), out_dir, meta)
    return meta


def resolve_teacher(ref: Path) -> Teacher:
    """Load what pretrain_teacher wrote: the tiny teacher itself or a pointer to a local SD directory."""
    meta_path = Path(ref) / "teacher.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("source") == "pretrained_dir":
            return load_teacher(meta["pretrained_dir"], latent=meta["latent"], image_size=meta["image_size"])
    return load_teacher(ref)


# --------------------------------------------------------------------------- SDS-CLIP fine-tuning


def finetune(
    params: Params,
    student_ref: Path,
    teacher_ref: Path,
    shards: Path,
    accepted: Path,
    out_dir: Path,
    control: bool = False,
    log_dir: Path | None = None,
) -> dict[str, Any]:
    """SDS-CLIP fine-tuning (``control=True``: the same run with lambda = 0, the paper's baseline)."""
    cfg = params.train
    lambda_sds = 0.0 if control else cfg.lambda_sds
    set_seed(params.seed)
    accelerator = make_accelerator(params, cfg.mixed_precision)
    student = load_student(student_ref)
    model = student.model
    # sigma exists in both arms so that the control differs from SDS-CLIP in lambda alone.
    teacher = resolve_teacher(teacher_ref).freeze() if lambda_sds > 0 else None
    latent_shape = teacher.latent_shape if teacher else _latent_shape_from(teacher_ref)
    sigma = LatentProjection(student.embed_dim, latent_shape)
    trainable = select_trainable(model, sigma)
    ln_params = trainable[: len(trainable) - len(list(sigma.parameters()))]
    optimizer = torch.optim.AdamW(
        [{"params": ln_params, "lr": cfg.lr}, {"params": list(sigma.parameters()), "lr": cfg.sigma_lr or cfg.lr}],
        weight_decay=cfg.weight_decay,
    )
    lr_sched = get_scheduler("cosine", optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps)
    model, sigma, optimizer, lr_sched = accelerator.prepare(model, sigma, optimizer, lr_sched)
    if teacher is not None:
        teacher.to(accelerator.device)
    batches = _loader(params, shards, accepted, student.preprocess, cfg.batch_size, params.seed)
    gen = torch.Generator().manual_seed(params.seed + 1)
    contrastive = ClipLoss()
    log = LossLog(log_dir or out_dir / "dvclive")
    # Only LayerNorms train; keep dropout etc. off so the control is deterministic.
    model.eval()
    started = time.time()
    terms = None
    name = "train_baseline" if control else "train_sds"
    for step in tqdm(range(cfg.steps), desc=name, mininterval=5):
        images, captions = next(batches)
        images = images.to(accelerator.device)
        tokens = student.tokenizer(captions).to(accelerator.device)
        text_cond = None
        if teacher is not None:
            with torch.no_grad():
                text_cond = teacher.encode_text(captions)
        with accelerator.autocast():
            terms = sds_clip_loss(
                model, sigma, teacher, images, tokens, text_cond, lambda_sds,
                cfg.t_min, cfg.t_max, cfg.noise_draws, gen, contrastive,
            )
        accelerator.backward(terms.total)
        optimizer.step()
        lr_sched.step()
        optimizer.zero_grad(set_to_none=True)
        log.log(terms.as_floats())
    log.close()
    seconds = time.time() - started
    student.model = accelerator.unwrap_model(model)
    sigma = accelerator.unwrap_model(sigma)
    meta = {
        "source": name, "lambda_sds": lambda_sds, "steps": cfg.steps, "seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / cfg.steps, 4), **(terms.as_floats() if terms else {}),
        "student_ref": str(student_ref), "teacher_ref": str(teacher_ref),
    }
    save_student(student, out_dir, meta)
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in sigma.state_dict().items()},
              str(out_dir / "sigma.safetensors"))
    return meta


def _latent_shape_from(teacher_ref: Path) -> tuple[int, int, int]:
    """The UNet's input shape read from its config: the control never runs (or loads) the teacher."""
    root = Path(teacher_ref)
    meta_path = root / "teacher.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()).get("source") == "pretrained_dir":
        root = Path(json.loads(meta_path.read_text())["pretrained_dir"])
    unet_cfg = json.loads((root / "unet" / "config.json").read_text())
    size = unet_cfg["sample_size"]
    size = size if isinstance(size, int) else size[0]
    return (unet_cfg["in_channels"], size, size)
