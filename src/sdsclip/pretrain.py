"""Pretraining stages: the student's contrastive loop and the tiny teacher's denoising loop.

In the real configuration (a local open_clip checkpoint / Stable Diffusion directory) both only verify the
configured weights and record their hashes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from open_clip.loss import ClipLoss
from tqdm.auto import tqdm

from sdsclip.config import OptimConfig, Params, StudentConfig, TeacherConfig
from sdsclip.data import pair_loader
from sdsclip.hashing import file_sha256, files_digest
from sdsclip.models.student import Student, build_student, save_student
from sdsclip.models.teacher import (
    Teacher,
    build_tiny_teacher,
    caption_vocabulary,
    load_teacher,
    save_teacher,
    teacher_files,
    teacher_pixels,
)
from sdsclip.runlog import LossLog
from sdsclip.train_common import TrainError, make_accelerator

# ------------------------------------------------------------------------------------------ helpers


def pretrain_optimizer(params_list: list[torch.nn.Parameter], opt: OptimConfig | Any, lr: float | None = None):
    """AdamW with the pretraining section's lr (or ``lr``) and weight decay."""
    return torch.optim.AdamW(params_list, lr=lr or opt.lr, weight_decay=opt.weight_decay)


def _cycle(loader) -> Iterator:
    while True:
        yield from loader


def pretrain_loader(
    params: Params,
    shards: Path,
    accepted: Path,
    transform: Callable,
    batch_size: int,
    seed: int,
    batching: str = "random",
):
    """(images, captions) batches of the accepted pairs, epoch after epoch without end."""
    return iter(
        _cycle(
            pair_loader(
                shards,
                accepted,
                transform,
                batch_size=batch_size,
                seed=seed,
                batching=batching,
                num_workers=params.train.loader_workers,
            )
        )
    )


def accepted_captions(accepted: Path) -> list[str]:
    """Every caption of accepted.csv, in file order."""
    import pandas as pd

    return pd.read_csv(accepted, usecols=["caption"], keep_default_na=False)["caption"].astype(str).tolist()


def student_transform(student: Student) -> Callable:
    return student.preprocess


def teacher_transform(image_size: int) -> Callable:
    from torchvision import transforms

    return transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size), transforms.ToTensor()])


# ------------------------------------------------------------------------------- student pretraining


def _verify_student_checkpoint(cfg: StudentConfig, out_dir: Path) -> dict[str, Any]:
    """Load the configured checkpoint, record its hash and save it as the pretrained student."""
    assert cfg.checkpoint is not None  # the checkpoint branch of pretrain_student
    student = build_student(cfg.arch, cfg.checkpoint)
    ckpt_path = Path(cfg.checkpoint)  # a file, or a Hugging Face CLIPModel directory
    meta = {"source": "checkpoint", "checkpoint": str(ckpt_path.resolve())}
    if ckpt_path.is_dir():  # hash what was loaded, not the TF / Flax siblings of a hub snapshot
        from sdsclip.models.hf_clip import loaded_files

        digest = files_digest(ckpt_path, loaded_files(ckpt_path))
        meta.update(sha256=digest["sha256"], hashed_files=digest["files"])
    else:
        meta["sha256"] = file_sha256(ckpt_path)
    save_student(student, out_dir, meta)
    return meta


def _contrastive_steps(student: Student, model, accelerator, optimizer, lr_sched, batches, steps: int, log):
    """``steps`` CLIP-loss steps; returns the last loss."""
    contrastive = ClipLoss()
    model.train()
    for _ in tqdm(range(steps), desc="pretrain_student", mininterval=5):
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
    return loss


def pretrain_student(
    params: Params, shards: Path, accepted: Path, out_dir: Path, log_dir: Path | None = None
) -> dict[str, Any]:
    """Contrastive pretraining from scratch (embedded default) or verification of a local checkpoint."""
    cfg = params.student
    if cfg.checkpoint:
        return _verify_student_checkpoint(cfg, out_dir)

    set_seed(params.seed)
    accelerator = make_accelerator(params)
    student = build_student(cfg.arch)
    model = student.model
    opt = cfg.pretrain
    optimizer = pretrain_optimizer([p for p in model.parameters() if p.requires_grad], opt)
    lr_sched = get_scheduler("cosine", optimizer, num_warmup_steps=opt.warmup_steps, num_training_steps=opt.steps)
    model, optimizer, lr_sched = accelerator.prepare(model, optimizer, lr_sched)
    batches = pretrain_loader(params, shards, accepted, student.preprocess, opt.batch_size, params.seed, opt.batching)
    log = LossLog(log_dir or out_dir / "dvclive")
    started = time.time()
    loss = _contrastive_steps(student, model, accelerator, optimizer, lr_sched, batches, opt.steps, log)
    student.model = accelerator.unwrap_model(model)
    meta = {
        "source": "pretrained_from_scratch",
        "steps": opt.steps,
        "final_loss": float(loss.detach()),
        "batching": opt.batching,
    }
    # Research option (docs/science.md "Headroom"): an order-sensitive text tower, image frozen.
    if cfg.text_order_steps:
        from sdsclip.text_order import text_order_phase

        meta["text_order"] = text_order_phase(
            student, batches, cfg.text_order_steps, cfg.text_order_weight, opt, accelerator.device, log
        )
    log.close()
    student.model = student.model.eval()
    meta["seconds"] = round(time.time() - started, 1)
    save_student(student, out_dir, meta)
    return meta


# ------------------------------------------------------------------------------- teacher pretraining


def _hard_negative_loss(
    teacher: Teacher,
    cfg: TeacherConfig,
    captions: list[str],
    latents: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    errors: torch.Tensor,
    gen: torch.Generator,
    parts: dict[str, float],
) -> torch.Tensor | None:
    """The ranking term of ``teacher_pretrain_loss`` (None when no row has a hard negative); fills ``parts``."""
    from sdsclip.synth import hard_negative_caption

    kinds = (torch.rand(len(captions), generator=gen) < 0.5).tolist()  # object swap or colour swap
    if cfg.hard_negative_swap == "both":
        negatives = [hard_negative_caption(c, k) or hard_negative_caption(c, not k) for c, k in zip(captions, kinds)]
    else:
        negatives = [hard_negative_caption(c, cfg.hard_negative_swap == "object") for c in captions]
    eligible = (t >= cfg.hard_negative_t_min).tolist()
    idx = [i for i, n in enumerate(negatives) if n and eligible[i]]
    parts["hard_negative_rows"] = float(len(idx))
    if not idx:
        return None
    pos = errors[idx]
    neg = teacher.denoising_loss(
        latents[idx], teacher.encode_text([cast(str, negatives[i]) for i in idx]), t[idx], noise[idx]
    )
    rank = F.relu(pos - neg + cfg.hard_negative_margin * pos.detach()).mean()
    parts["loss_hard_negative"] = rank.item()
    parts["hard_negative_order_correct"] = float((neg > pos).float().mean())
    return rank


def teacher_pretrain_loss(
    teacher: Teacher,
    cfg: TeacherConfig,
    images: torch.Tensor,
    captions: list[str],
    t_range: tuple[int, int],
    gen: torch.Generator,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One batch of tiny-teacher pretraining: the denoising loss (with caption dropout), plus, when
    ``teacher.hard_negative_weight`` > 0, a ranking loss on the same (t, eps) that asks the error under a
    word-order hard negative of each caption to exceed the error under the caption by a relative margin
    (hard-negative training of a diffusion matcher, as in Krojer et al. 2023, "Are Diffusion Models
    Vision-And-Language Reasoners?"). Returns (loss, logged parts)."""
    # Caption dropout: the model also learns the unconditional score (classifier-free guidance style).
    drop = torch.rand(len(captions), generator=gen) < cfg.caption_dropout
    captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
    latents = teacher.encode_images(teacher_pixels(images))
    t = torch.randint(t_range[0], t_range[1], (latents.shape[0],), generator=gen)
    if cfg.pretrain_high_t_share > 0:  # extra draws only then: the uniform default keeps its random stream
        high = torch.rand(len(t), generator=gen) < cfg.pretrain_high_t_share
        t = torch.where(high, torch.randint(cfg.pretrain_high_t_min, t_range[1], t.shape, generator=gen), t)
    t = t.to(latents.device)
    noise = torch.randn(latents.shape, generator=gen).to(latents.device)
    errors = teacher.denoising_loss(latents, teacher.encode_text(captions), t, noise)
    loss = errors.mean()
    parts = {"loss_denoise": loss.item()}
    if cfg.hard_negative_weight > 0:
        rank = _hard_negative_loss(teacher, cfg, captions, latents, t, noise, errors, gen, parts)
        if rank is not None:
            loss = loss + cfg.hard_negative_weight * rank
    return loss, parts


def _verify_teacher_dir(cfg: TeacherConfig, out_dir: Path) -> dict[str, Any]:
    """Load the configured SD directory, hash the files it read and write the pointer (teacher.json)."""
    assert cfg.pretrained_dir is not None  # the pretrained_dir branch of pretrain_teacher
    teacher = load_teacher(cfg.pretrained_dir, latent=cfg.latent, image_size=cfg.image_size)
    # Only the files load_teacher read (not fp16/.bin/.ckpt siblings, safety_checker, ...), each weight
    # file hashed once per (path, size, mtime) thanks to the cache in sdsclip.hashing.
    loaded = teacher_files(cfg.pretrained_dir, cfg.latent, with_vae=True)
    digest = files_digest(Path(cfg.pretrained_dir), loaded.all)
    meta = {
        "source": "pretrained_dir",
        "pretrained_dir": str(Path(cfg.pretrained_dir).resolve()),
        "sha256": digest["sha256"],
        "hashed_files": digest["files"],
        "latent_shape": list(teacher.latent_shape),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "teacher.json").write_text(
        json.dumps({**meta, "latent": teacher.latent, "image_size": teacher.image_size}, indent=2) + "\n"
    )
    return meta


def pretrain_teacher(
    params: Params, shards: Path, accepted: Path, out_dir: Path, log_dir: Path | None = None
) -> dict[str, Any]:
    """Text-conditioned denoising from scratch (embedded default) or verification of a local SD dir."""
    cfg = params.teacher
    if cfg.pretrained_dir:
        return _verify_teacher_dir(cfg, out_dir)

    set_seed(params.seed)
    accelerator = make_accelerator(params)
    teacher = build_tiny_teacher(cfg, caption_vocabulary(accepted_captions(accepted)))
    opt = cfg.pretrain
    modules = teacher.trainable_modules()
    optimizer = pretrain_optimizer(list(modules.parameters()), opt)
    lr_sched = get_scheduler("cosine", optimizer, num_warmup_steps=opt.warmup_steps, num_training_steps=opt.steps)
    modules, optimizer, lr_sched = accelerator.prepare(modules, optimizer, lr_sched)
    teacher.to(accelerator.device)
    batches = pretrain_loader(
        params, shards, accepted, teacher_transform(cfg.image_size), opt.batch_size, params.seed, opt.batching
    )
    gen = torch.Generator().manual_seed(params.seed)
    log = LossLog(log_dir or out_dir / "dvclive")
    n_timesteps = teacher.scheduler.config.num_train_timesteps
    t_lo, t_hi = cfg.pretrain_t_min, min(cfg.pretrain_t_max or n_timesteps, n_timesteps)
    if t_lo >= t_hi:
        raise TrainError(f"teacher.pretrain_t_min ({t_lo}) must be < pretrain_t_max ({t_hi})")
    modules.train()
    started = time.time()
    for _ in tqdm(range(opt.steps), desc="pretrain_teacher", mininterval=5):
        images, captions = next(batches)
        loss, parts = teacher_pretrain_loss(teacher, cfg, images, captions, (t_lo, t_hi), gen)
        accelerator.backward(loss)
        optimizer.step()
        lr_sched.step()
        optimizer.zero_grad(set_to_none=True)
        log.log(parts)
    log.close()
    teacher.to("cpu")
    meta = {
        "source": "pretrained_from_scratch",
        "steps": opt.steps,
        "final_loss": float(loss.detach()),
        "seconds": round(time.time() - started, 1),
    }
    save_teacher(teacher.freeze(), out_dir, meta)
    return meta
