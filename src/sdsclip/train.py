"""Training loops, one per DVC stage: student pretraining, teacher pretraining and SDS-CLIP fine-tuning.

All three read the validated WebDataset shards through ``sdsclip.data.pair_loader`` and run on
accelerate. In the real configuration (a local open_clip checkpoint / Stable Diffusion directory) the two
pretraining stages only verify the configured weights and record their hashes.

``finetune`` (both ``train_baseline`` and ``train_sds``) is the production loop: data-parallel over any
number of processes (accelerate DDP; ``sdsclip.distributed`` for torchrun / Kubeflow PyTorchJob), resumable
from atomic safetensors checkpoints (``sdsclip.checkpoint``), with the frozen teacher's text conditioning
cached per caption, and per-step loss terms to DVCLive (DVC plots) and MLflow. Every check that needs no
compute (params, data, teacher layout, student weights, checkpoint compatibility) runs before any step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from open_clip.loss import ClipLoss
from tqdm.auto import tqdm

from sdsclip import checkpoint as ckpt
from sdsclip.config import OptimConfig, Params, TeacherConfig, params_to_dict
from sdsclip.data import DataError, check_batchable, count_dataset, pair_loader
from sdsclip.distributed import normalize_dist_env
from sdsclip.errors import UserError
from sdsclip.hashing import file_sha256, files_digest, tree_sha256  # noqa: F401 - importers use train.*
from sdsclip.models.student import (
    STUDENT_WEIGHTS,
    Student,
    build_student,
    load_student,
    save_student,
    trainable_clip_parameters,
)
from sdsclip.models.teacher import (
    TEACHER_META,
    Teacher,
    TextConditioningCache,
    build_tiny_teacher,
    caption_vocabulary,
    check_t_range,
    check_teacher_dir,
    check_teacher_weights,
    latent_shape_of,
    load_teacher,
    save_teacher,
    teacher_files,
    teacher_pixels,
)
from sdsclip.sds import LatentProjection, StudentWithSigma, sds_clip_objective, select_trainable

log = logging.getLogger(__name__)


class TrainError(UserError, ValueError):
    """A training request that cannot run; the message is one line for the user."""


# ------------------------------------------------------------------------------------------ helpers


def make_accelerator(params: Params, mixed_precision: str = "no") -> Accelerator:
    """An accelerate Accelerator; multi-process when launched so (torchrun, accelerate launch, PyTorchJob)."""
    from accelerate.utils import DistributedDataParallelKwargs

    normalize_dist_env()
    # Buffers (open_clip's attention masks) are constants: no need to re-broadcast them every forward.
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    return Accelerator(cpu=params.device == "cpu", mixed_precision=mixed_precision, kwargs_handlers=[ddp])


class LossLog:
    """Per-step loss terms as DVC plots (DVCLive TSVs) plus a summary JSON.

    ``resume_step > 0`` continues an interrupted run's curves: rows from that step on (logged after the
    checkpoint the run resumes from) are dropped, and numbering goes on from it."""

    def __init__(self, out_dir: Path, resume_step: int = 0):
        from dvclive import Live

        if resume_step:
            _truncate_tsvs(Path(out_dir) / "plots" / "metrics", resume_step)
        self.live = Live(str(out_dir), save_dvc_exp=False, dvcyaml=None, report=None, resume=bool(resume_step))
        if resume_step:
            self.live.step = resume_step

    def log(self, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.live.log_metric(name, value)
        self.live.next_step()

    def close(self) -> None:
        self.live.end()


def _truncate_tsvs(metrics_dir: Path, step: int) -> None:
    for tsv in metrics_dir.rglob("*.tsv") if metrics_dir.is_dir() else []:
        lines = tsv.read_text().splitlines(keepends=True)
        if not lines:
            continue
        col = lines[0].rstrip("\n").split("\t").index("step")
        kept = [ln for ln in lines[1:] if ln.strip() and int(ln.split("\t")[col]) < step]
        tsv.write_text(lines[0] + "".join(kept))


class MlflowLog:
    """Per-step loss terms to MLflow (params.registry.tracking_uri / experiment), buffered into batches."""

    def __init__(self, params: Params, run_name: str, run_id: str | None = None, flush_every: int = 50):
        import os

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        from mlflow import MlflowClient
        from mlflow.entities import Param

        from sdsclip.register import _flatten, experiment_id, resolve_tracking_uri

        tracking_uri = resolve_tracking_uri(params)  # MLFLOW_TRACKING_URI wins
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.flush_every, self.buffer = flush_every, []
        if run_id is not None:
            try:
                self.run_id = self.client.get_run(run_id).info.run_id
                return
            except Exception:  # a resumed run whose MLflow store moved: start a new MLflow run
                pass
        exp_id = experiment_id(self.client, params.registry.experiment, tracking_uri)
        self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
        flat = [Param(k, str(v)[:500]) for k, v in _flatten(params_to_dict(params)).items()]
        for i in range(0, len(flat), 100):
            self.client.log_batch(self.run_id, params=flat[i : i + 100])

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.buffer += [Metric(k, float(v), now, step) for k, v in values.items()]
        if len(self.buffer) >= self.flush_every * max(1, len(values)):
            self.flush()

    def flush(self) -> None:
        for i in range(0, len(self.buffer), 1000):
            self.client.log_batch(self.run_id, metrics=self.buffer[i : i + 1000])
        self.buffer = []

    def close(self, summary: dict[str, Any] | None = None) -> None:
        self.flush()
        for key, value in (summary or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.client.log_metric(self.run_id, f"final.{key}", float(value))
        self.client.set_terminated(self.run_id, "FINISHED")


def _optimizer(params_list: list[torch.nn.Parameter], opt: OptimConfig | Any, lr: float | None = None):
    return torch.optim.AdamW(params_list, lr=lr or opt.lr, weight_decay=opt.weight_decay)


def _cycle(loader) -> Iterator:
    while True:
        yield from loader


def _loader(
    params: Params,
    shards: Path,
    accepted: Path,
    transform: Callable,
    batch_size: int,
    seed: int,
    batching: str = "random",
):
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


def student_transform(student: Student) -> Callable:
    return student.preprocess


def teacher_transform(image_size: int) -> Callable:
    from torchvision import transforms

    return transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size), transforms.ToTensor()])


# ------------------------------------------------------------------------------- student pretraining


def pretrain_student(
    params: Params, shards: Path, accepted: Path, out_dir: Path, log_dir: Path | None = None
) -> dict[str, Any]:
    """Contrastive pretraining from scratch (embedded default) or verification of a local checkpoint."""
    cfg = params.student
    if cfg.checkpoint:
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

    set_seed(params.seed)
    accelerator = make_accelerator(params)
    student = build_student(cfg.arch)
    model = student.model
    opt = cfg.pretrain
    optimizer = _optimizer([p for p in model.parameters() if p.requires_grad], opt)
    lr_sched = get_scheduler("cosine", optimizer, num_warmup_steps=opt.warmup_steps, num_training_steps=opt.steps)
    model, optimizer, lr_sched = accelerator.prepare(model, optimizer, lr_sched)
    batches = _loader(params, shards, accepted, student.preprocess, opt.batch_size, params.seed, opt.batching)
    contrastive = ClipLoss()
    log = LossLog(log_dir or out_dir / "dvclive")
    model.train()
    started = time.time()
    for _ in tqdm(range(opt.steps), desc="pretrain_student", mininterval=5):
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
    student.model = accelerator.unwrap_model(model)
    meta = {
        "source": "pretrained_from_scratch",
        "steps": opt.steps,
        "final_loss": float(loss.detach()),
        "batching": opt.batching,
    }
    if cfg.text_order_steps:  # research option (README "Headroom"): an order-sensitive text tower, image frozen
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


def _accepted_captions(accepted: Path) -> list[str]:
    import pandas as pd

    return pd.read_csv(accepted, usecols=["caption"], keep_default_na=False)["caption"].astype(str).tolist()


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
    from sdsclip.synth import hard_negative_caption

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
        kinds = (torch.rand(len(captions), generator=gen) < 0.5).tolist()  # object swap or colour swap
        if cfg.hard_negative_swap == "both":
            negatives = [
                hard_negative_caption(c, k) or hard_negative_caption(c, not k) for c, k in zip(captions, kinds)
            ]
        else:
            negatives = [hard_negative_caption(c, cfg.hard_negative_swap == "object") for c in captions]
        eligible = (t >= cfg.hard_negative_t_min).tolist()
        idx = [i for i, n in enumerate(negatives) if n and eligible[i]]
        parts["hard_negative_rows"] = float(len(idx))
        if idx:
            pos = errors[idx]
            neg = teacher.denoising_loss(
                latents[idx], teacher.encode_text([negatives[i] for i in idx]), t[idx], noise[idx]
            )
            rank = F.relu(pos - neg + cfg.hard_negative_margin * pos.detach()).mean()
            loss = loss + cfg.hard_negative_weight * rank
            parts["loss_hard_negative"] = rank.item()
            parts["hard_negative_order_correct"] = float((neg > pos).float().mean())
    return loss, parts


def pretrain_teacher(
    params: Params, shards: Path, accepted: Path, out_dir: Path, log_dir: Path | None = None
) -> dict[str, Any]:
    """Text-conditioned denoising from scratch (embedded default) or verification of a local SD dir."""
    cfg = params.teacher
    if cfg.pretrained_dir:
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

    set_seed(params.seed)
    accelerator = make_accelerator(params)
    teacher = build_tiny_teacher(cfg, caption_vocabulary(_accepted_captions(accepted)))
    opt = cfg.pretrain
    modules = teacher.trainable_modules()
    optimizer = _optimizer(list(modules.parameters()), opt)
    lr_sched = get_scheduler("cosine", optimizer, num_warmup_steps=opt.warmup_steps, num_training_steps=opt.steps)
    modules, optimizer, lr_sched = accelerator.prepare(modules, optimizer, lr_sched)
    teacher.to(accelerator.device)
    batches = _loader(
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


def _teacher_source(ref: Path) -> tuple[Path, str | None, int | None]:
    """(directory, latent, image_size) of what pretrain_teacher wrote: the tiny teacher itself, or a
    pointer (teacher.json, source pretrained_dir) to a local Stable Diffusion directory."""
    meta_path = Path(ref) / TEACHER_META
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("source") == "pretrained_dir":
            return Path(meta["pretrained_dir"]), meta.get("latent"), meta.get("image_size")
    return Path(ref), None, None


def resolve_teacher(ref: Path, with_vae: bool = True) -> Teacher:
    """Load what pretrain_teacher wrote: the tiny teacher itself or a pointer to a local SD directory."""
    root, latent, image_size = _teacher_source(ref)
    return load_teacher(root, latent=latent, image_size=image_size, with_vae=with_vae)


def _latent_shape_from(teacher_ref: Path) -> tuple[int, int, int]:
    """The UNet's input shape read from its config: the control never runs (or loads) the teacher."""
    return latent_shape_of(_teacher_source(teacher_ref)[0])


def _teacher_identity(root: Path) -> str:
    """Cheap identity of a teacher dir for checkpoint fingerprints: teacher.json (which records the sha256
    of a verified SD dir) or, for a bare SD dir, the file listing with sizes."""
    meta = root / TEACHER_META
    if meta.is_file():
        return hashlib.sha256(meta.read_bytes()).hexdigest()
    listing = sorted(f"{p.relative_to(root)}:{p.stat().st_size}" for p in root.rglob("*") if p.is_file())
    return hashlib.sha256("\n".join(listing).encode()).hexdigest()


# --------------------------------------------------------------------------- SDS-CLIP fine-tuning

# Knobs that do not change the trained weights: a checkpoint stays valid when only these differ.
_RESUME_NEUTRAL = (
    "checkpoint_every",
    "keep_checkpoints",
    "log_mlflow",
    "text_cache_size",
    "gradient_checkpointing",
    "loader_workers",
    "memory_check",
)  # loader_workers: the same batches for any value


@dataclass
class _Plan:
    """Everything finetune checked before spending compute."""

    name: str
    lambda_sds: float
    total_steps: int
    n_pairs: int
    teacher_root: Path
    teacher_latent: str | None
    teacher_image_size: int | None
    latent_shape: tuple[int, int, int]
    student: Student
    ckpt_dir: Path | None
    fingerprint: dict[str, str] = field(default_factory=dict)
    resume_from: Path | None = None
    resume_meta: dict[str, Any] = field(default_factory=dict)


def _fingerprint(
    params: Params, lambda_sds: float, student_ref: Path, teacher_root: Path, shards: Path, accepted: Path
) -> dict[str, str]:
    train = {k: v for k, v in params_to_dict(params)["train"].items() if k not in _RESUME_NEUTRAL}
    shard_list = sorted(f"{p.name}:{p.stat().st_size}" for p in Path(shards).glob("shard-*.tar"))
    return {
        "train": json.dumps(train, sort_keys=True),
        "seed": str(params.seed),
        "lambda_sds": repr(lambda_sds),
        "student": file_sha256(Path(student_ref) / STUDENT_WEIGHTS),
        "teacher": _teacher_identity(teacher_root),
        "data": hashlib.sha256((file_sha256(Path(accepted)) + "\n".join(shard_list)).encode()).hexdigest(),
    }


def _preflight(
    params: Params,
    student_ref: Path,
    teacher_ref: Path,
    shards: Path,
    accepted: Path,
    control: bool,
    resume: bool,
    checkpoint_dir: Path | None,
    out_dir: Path,
) -> _Plan:
    """Every check that needs no training compute, cheapest first; each failure is one line."""
    cfg = params.train
    name = "train_baseline" if control else "train_sds"
    lambda_sds = 0.0 if control else cfg.lambda_sds
    if not lambda_sds >= 0:
        raise TrainError(f"train.lambda_sds must be >= 0 (got {lambda_sds})")
    counts = count_dataset(shards, accepted)  # DataError: missing accepted.csv / shards
    n_pairs = counts.per_epoch(cfg.captions)  # pairs per epoch: all captions, or one per image
    if n_pairs == 0:
        raise DataError(f"{shards}: no accepted image-caption pairs (empty dataset; {accepted} accepts none)")
    check_batchable(counts, cfg.captions, cfg.batch_size, shards, "train.batch_size")
    total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * (n_pairs // cfg.batch_size)
    teacher_root, latent, image_size = _teacher_source(teacher_ref)
    teacher_root, _, latent = check_teacher_dir(teacher_root, latent)  # TeacherLoadError: layout
    check_t_range(teacher_root, cfg.t_min, cfg.t_max, "train.t_min", "train.t_max")  # both arms: same params
    if lambda_sds > 0:  # exactly the files finetune will load (no VAE); the control loads no teacher weights
        check_teacher_weights(teacher_root, latent, with_vae=False)  # WeightFileError: truncated/corrupt file
    latent_shape = latent_shape_of(teacher_root)
    student = load_student(student_ref)  # WeightFileError: corrupt file; StudentLoadError: does not fit the arch
    if cfg.trainable == "sigma_only" and lambda_sds == 0:
        raise TrainError(
            f"train.trainable: sigma_only trains nothing in {name} (lambda_sds 0: sigma has no loss); "
            "set train.trainable: image_layernorms"
        )
    if cfg.trainable != "sigma_only" and not trainable_clip_parameters(student.model, cfg.trainable):  # e.g. RN50
        lacks = {
            "image_layernorms": "image-tower LayerNorms (a ResNet has BatchNorms)",
            "image_norms": "image-tower normalization layers with affine parameters",
        }.get(cfg.trainable, "image-tower parameters")
        raise TrainError(
            f"train.trainable: {cfg.trainable}: student architecture {student.arch!r} has no {lacks}, so "
            "only sigma would train and CLIP would never change; set train.trainable: image_norms or "
            "image_tower"
        )
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else (Path(out_dir) / "checkpoints")
    plan = _Plan(
        name,
        lambda_sds,
        total_steps,
        n_pairs,
        teacher_root,
        latent,
        image_size,
        latent_shape,
        student,
        ckpt_dir if (cfg.checkpoint_every or resume) else None,
    )
    if plan.ckpt_dir is not None:
        plan.fingerprint = _fingerprint(params, lambda_sds, student_ref, teacher_root, shards, accepted)
    if resume:
        plan.resume_from = ckpt.latest_checkpoint(ckpt_dir)
        if plan.resume_from is not None:
            meta = ckpt.read_checkpoint_meta(plan.resume_from)
            changed = sorted(k for k in plan.fingerprint if meta.get("fingerprint", {}).get(k) != plan.fingerprint[k])
            if changed:
                raise TrainError(
                    f"--resume: {plan.resume_from} was written by a different run ({', '.join(changed)} "
                    f"changed); delete {ckpt_dir} or drop --resume"
                )
            plan.resume_meta = meta
    return plan


def gradient_norms(
    terms, lambda_sds: float, clip_params: list[torch.nn.Parameter], sigma_params: list[torch.nn.Parameter]
) -> dict[str, float]:
    """L2 norms of the gradient that L_CLIP and lambda * L_SDS each put on the trainable CLIP parameters and on
    sigma (keeps the graph for the step's own backward). Which term steers the LayerNorms is the question: under
    the paper's lambda 0.001 the SDS term may be a rounding error next to L_CLIP, while AdamW's normalised
    step trains sigma at full rate whatever lambda is."""
    out: dict[str, float] = {}
    for term_name, term in (("clip", terms.clip), ("sds", terms.sds * lambda_sds)):
        for group_name, group in (("clip_params", clip_params), ("sigma", sigma_params)):
            group = [p for p in group if p.requires_grad]
            if not group or not term.requires_grad:
                out[f"grad_norm_{term_name}_{group_name}"] = 0.0
                continue
            grads = torch.autograd.grad(term, group, retain_graph=True, allow_unused=True)
            out[f"grad_norm_{term_name}_{group_name}"] = float(
                torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None) or torch.zeros(()))
            )
    return out


def finetune(
    params: Params,
    student_ref: Path,
    teacher_ref: Path,
    shards: Path,
    accepted: Path,
    out_dir: Path,
    control: bool = False,
    log_dir: Path | None = None,
    resume: bool = False,
    checkpoint_dir: Path | None = None,
) -> dict[str, Any]:
    """SDS-CLIP fine-tuning (``control=True``: the same run with lambda = 0, the paper's baseline).

    One code path for both arms and for 1 or N processes. ``resume``: continue from the newest checkpoint
    in ``checkpoint_dir`` (default ``out_dir/checkpoints``, removed after a successful run) if there is one
    written by the same configuration; without ``resume`` a run starts from step 0 and clears old ones."""
    cfg = params.train
    out_dir = Path(out_dir)
    plan = _preflight(params, student_ref, teacher_ref, shards, accepted, control, resume, checkpoint_dir, out_dir)
    lambda_sds, student = plan.lambda_sds, plan.student

    accelerator = make_accelerator(params, cfg.mixed_precision)
    rank, world = accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    if cfg.batch_size % world:
        raise TrainError(f"train.batch_size {cfg.batch_size} does not split evenly over {world} processes")
    from sdsclip.memory import check_step_memory

    # Before the teacher is loaded: a step that cannot fit the device stops here, with the knobs that shrink it.
    check_step_memory(
        cfg,
        student.model_cfg or student.arch,
        plan.teacher_root if lambda_sds > 0 else None,
        plan.teacher_latent,
        plan.teacher_image_size,
        plan.latent_shape,
        plan.n_pairs,
        world,
        accelerator.device,
    )
    set_seed(params.seed)
    model = student.model
    teacher = None
    if lambda_sds > 0:  # the control never loads the teacher; SDS never needs its VAE
        teacher = load_teacher(plan.teacher_root, plan.teacher_latent, plan.teacher_image_size, with_vae=False)
        teacher.freeze()
        if cfg.gradient_checkpointing and cfg.sds_gradient == "jacobian_free":
            log.info(
                "train.gradient_checkpointing: a no-op for the UNet with train.sds_gradient: jacobian_free "
                "(its forward runs without autograd, nothing is kept to recompute)"
            )
        elif cfg.gradient_checkpointing:
            teacher.enable_gradient_checkpointing()
    # sigma exists in both arms so that the control differs from SDS-CLIP in lambda alone.
    sigma = LatentProjection(student.embed_dim, plan.latent_shape)
    trainable = select_trainable(model, sigma, cfg.trainable)
    if teacher is None:
        sigma.requires_grad_(False)  # unused by the control's loss (and so left out of DDP's gradient sync)
    n_sigma = len(list(sigma.parameters()))
    ln_params = trainable[: len(trainable) - n_sigma]
    module = StudentWithSigma(model, sigma)
    module.eval()  # only LayerNorms train; dropout etc. stay off so both arms are deterministic
    optimizer = torch.optim.AdamW(
        [{"params": ln_params, "lr": cfg.lr}, {"params": list(sigma.parameters()), "lr": cfg.sigma_lr or cfg.lr}],
        weight_decay=cfg.weight_decay,
    )
    # Stepped by hand once per global step (accelerate's prepared scheduler would step once per process).
    lr_sched = get_scheduler(
        "cosine", optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=plan.total_steps
    )
    gen = torch.Generator().manual_seed(params.seed + 1)  # (t, eps) draws: same stream on every process
    start_step, position = 0, (0, 0)
    if plan.resume_from is not None:
        tensors, meta = ckpt.load_checkpoint(plan.resume_from)
        named = dict(module.named_parameters())
        with torch.no_grad():
            for key, value in tensors.items():
                if key.startswith("param."):
                    named[key[len("param.") :]].copy_(value)
        optimizer.load_state_dict(ckpt.optimizer_from_flat(tensors, meta["optimizer"]))
        lr_sched.load_state_dict(meta["lr_scheduler"])
        start_step, position = int(meta["step"]), tuple(meta["data_position"])
    module, optimizer = accelerator.prepare(module, optimizer)
    if plan.resume_from is not None:  # after prepare: accelerate's own seeding must not override them
        ckpt.rng_from_flat(tensors, meta["rng"], gen)
    elif main and plan.ckpt_dir is not None:
        ckpt.clear_checkpoints(plan.ckpt_dir)
    unwrapped = accelerator.unwrap_model(module)
    logit_scale = unwrapped.clip.logit_scale.detach().exp()
    if teacher is not None:
        teacher.to(accelerator.device)
    text_cond_of = TextConditioningCache(teacher, cfg.text_cache_size) if teacher is not None else None
    contrastive = ClipLoss(local_loss=world > 1, gather_with_grad=world > 1, rank=rank, world_size=world)
    loader = pair_loader(
        shards,
        accepted,
        student.preprocess,
        cfg.batch_size,
        params.seed,
        rank=rank,
        world_size=world,
        batching=cfg.batching,
        captions=cfg.captions,
        num_workers=cfg.loader_workers,
        pin_memory=accelerator.device.type == "cuda",
    )
    stream = loader.batches(*position)

    log = mlflow_log = None
    if main:
        log = LossLog(log_dir or out_dir / "dvclive", resume_step=start_step)
        if cfg.log_mlflow:
            mlflow_log = MlflowLog(params, plan.name, plan.resume_meta.get("mlflow_run_id"))

    def save(step: int) -> None:
        if not main or plan.ckpt_dir is None:
            return
        tensors = {f"param.{n}": p for n, p in unwrapped.named_parameters() if p.requires_grad}
        opt_tensors, opt_meta = ckpt.optimizer_to_flat(optimizer.optimizer)
        rng_tensors, rng_meta = ckpt.rng_to_flat(gen)
        meta = {
            "fingerprint": plan.fingerprint,
            "data_position": list(position),
            "optimizer": opt_meta,
            "lr_scheduler": lr_sched.state_dict(),
            "rng": rng_meta,
            "world_size": world,
            "total_steps": plan.total_steps,
            "mlflow_run_id": mlflow_log.run_id if mlflow_log else None,
            "last_values": values,
        }
        ckpt.save_checkpoint(plan.ckpt_dir, step, {**tensors, **opt_tensors, **rng_tensors}, meta, cfg.keep_checkpoints)

    # A checkpoint dir inside the model dir is removed after success, so the last one is not worth writing;
    # one outside it keeps a final checkpoint (a later --resume then just rewrites the same model).
    inside = plan.ckpt_dir is not None and plan.ckpt_dir.resolve().is_relative_to(out_dir.resolve())
    keep_final = not inside
    project = teacher is not None
    values = dict(plan.resume_meta.get("last_values", {}))
    probe_seconds = 0.0
    started = time.time()
    bar = tqdm(total=plan.total_steps, initial=start_step, desc=plan.name, mininterval=2, disable=not main)
    for step in range(start_step, plan.total_steps):
        epoch, index, (images, captions) = next(stream)
        images = images.to(accelerator.device, non_blocking=True)
        tokens = student.tokenizer(captions).to(accelerator.device)
        text_cond = text_cond_of(captions) if text_cond_of is not None else None
        with accelerator.autocast():
            image_emb, text_emb, z = module(images, tokens, project)
            terms = sds_clip_objective(
                image_emb,
                text_emb,
                z,
                logit_scale,
                teacher,
                text_cond,
                lambda_sds,
                cfg.t_min,
                cfg.t_max,
                cfg.noise_draws,
                gen,
                contrastive,
                (rank, world),
                cfg.sds_gradient,
                cfg.sds_weighting,
            )
        probe = {}
        if cfg.grad_norm_every and world == 1 and step % cfg.grad_norm_every == 0:
            probe_started = time.time()
            probe = gradient_norms(terms, lambda_sds, ln_params, list(unwrapped.sigma.parameters()))
            probe_seconds += time.time() - probe_started
        accelerator.backward(terms.total)
        if step < cfg.sigma_first_steps:  # sigma first: CLIP's step is a no-op until sigma has been fitted
            optimizer.param_groups[0]["lr"] = 0.0
        optimizer.step()
        if not optimizer.step_was_skipped:  # fp16 overflow: the schedule waits too
            lr_sched.step()
        optimizer.zero_grad(set_to_none=True)
        position = (epoch, index + 1)
        stacked = torch.stack([terms.total.detach(), terms.clip.detach(), terms.sds.detach()]).float()
        if world > 1:
            stacked = accelerator.reduce(stacked, "mean")  # each process holds its share of the global loss
        total, clip, sds = stacked.tolist()
        values = {"loss": total, "loss_clip": clip, "loss_sds": sds, "lr": lr_sched.get_last_lr()[0]}
        if z is not None:  # the latent sigma hands the teacher, against the N(0, 1)-ish latents it was trained on
            values.update(z_mean=float(z.detach().float().mean()), z_std=float(z.detach().float().std()))
        values.update(probe)
        if main:
            log.log(values)
            if mlflow_log:
                mlflow_log.log(step, values)
            bar.set_postfix(loss=f"{total:.4f}", clip=f"{clip:.4f}", sds=f"{sds:.4f}", refresh=False)
            bar.update(1)
        done = step + 1
        if cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or (done == plan.total_steps and keep_final)):
            save(done)
    bar.close()
    seconds = time.time() - started - probe_seconds  # the cost of a step, without the gradient-norm probes
    steps_run = plan.total_steps - start_step
    meta = {
        "source": plan.name,
        "lambda_sds": lambda_sds,
        "steps": plan.total_steps,
        "epochs": cfg.epochs,
        "pairs": plan.n_pairs,
        "captions": cfg.captions,
        "batch_size": cfg.batch_size,
        "processes": world,
        "resumed_from_step": start_step if plan.resume_from is not None else None,
        "seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / max(1, steps_run), 4),
        "grad_norm_probe_seconds": round(probe_seconds, 1),
        "latent_shape": list(plan.latent_shape),
        "profile": params.profile,
        **{k: v for k, v in values.items() if k != "lr"},
        "student_ref": str(student_ref),
        "teacher_ref": str(teacher_ref),
    }
    if text_cond_of is not None:
        meta["text_conditioning_encoded"] = text_cond_of.encoded
    if main:
        log.close()
        student.model = unwrapped.clip
        save_student(student, out_dir, meta)
        from safetensors.torch import save_file

        save_file(
            {k: v.detach().cpu().contiguous() for k, v in unwrapped.sigma.state_dict().items()},
            str(out_dir / "sigma.safetensors"),
        )
        if mlflow_log:
            mlflow_log.close(meta)
        if inside:
            shutil.rmtree(plan.ckpt_dir, ignore_errors=True)  # the model directory holds only the model
    accelerator.wait_for_everyone()
    return meta
