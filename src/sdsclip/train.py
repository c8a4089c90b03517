"""SDS-CLIP fine-tuning, the ``train_baseline`` and ``train_sds`` stages: L = L_CLIP + lambda * L_SDS.

``finetune`` is the production loop: data-parallel over any number of processes (accelerate DDP;
``sdsclip.distributed`` for torchrun / Kubeflow PyTorchJob), resumable from atomic safetensors checkpoints
(``sdsclip.checkpoint``), with the frozen teacher's text conditioning cached per caption, and per-step loss
terms to DVCLive (DVC plots) and MLflow (``sdsclip.runlog``). Every check that needs no compute (params,
data, teacher layout, student weights, checkpoint compatibility) runs first, in ``preflight``.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from open_clip.loss import ClipLoss
from tqdm.auto import tqdm

from sdsclip import checkpoint as ckpt
from sdsclip.config import Params, TrainConfig
from sdsclip.data import DataError, check_batchable, count_dataset, pair_loader
from sdsclip.fingerprint import run_fingerprint
from sdsclip.models.student import Student, load_student, save_student, trainable_clip_parameters
from sdsclip.models.teacher import (
    Teacher,
    TextConditioningCache,
    check_t_range,
    check_teacher_dir,
    check_teacher_weights,
    latent_shape_of,
    load_teacher,
)
from sdsclip.runlog import LossLog, MlflowLog
from sdsclip.sds import LatentProjection, StudentWithSigma, sds_clip_objective, select_trainable
from sdsclip.teacher_ref import teacher_source
from sdsclip.train_common import TrainError, make_accelerator

log = logging.getLogger(__name__)

__all__ = ["FinetunePlan", "TrainError", "finetune", "gradient_norms", "preflight"]


# ------------------------------------------------------------------------------------------ preflight


@dataclass
class FinetunePlan:
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


def _dataset_steps(cfg: TrainConfig, shards: Path, accepted: Path) -> tuple[int, int]:
    """(pairs per epoch, total steps); DataError for a dataset that cannot fill a batch."""
    counts = count_dataset(shards, accepted)  # DataError: missing accepted.csv / shards
    n_pairs = counts.per_epoch(cfg.captions)  # pairs per epoch: all captions, or one per image
    if n_pairs == 0:
        raise DataError(f"{shards}: no accepted image-caption pairs (empty dataset; {accepted} accepts none)")
    check_batchable(counts, cfg.captions, cfg.batch_size, shards, "train.batch_size")
    total_steps = cfg.steps if cfg.steps is not None else (cfg.epochs or 0) * (n_pairs // cfg.batch_size)  # one set
    return n_pairs, total_steps


def _check_trainable(cfg: TrainConfig, student: Student, lambda_sds: float, name: str) -> None:
    """TrainError unless ``train.trainable`` gives this run something that has a loss to train."""
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


def _find_resume_point(plan: FinetunePlan, ckpt_dir: Path) -> None:
    """Set ``plan.resume_from`` / ``resume_meta`` to the newest checkpoint, refused unless the same run wrote it."""
    plan.resume_from = ckpt.latest_checkpoint(ckpt_dir)
    if plan.resume_from is None:
        return
    meta = ckpt.read_checkpoint_meta(plan.resume_from)
    changed = sorted(k for k in plan.fingerprint if meta.get("fingerprint", {}).get(k) != plan.fingerprint[k])
    if changed:
        raise TrainError(
            f"--resume: {plan.resume_from} was written by a different run ({', '.join(changed)} "
            f"changed); delete {ckpt_dir} or drop --resume"
        )
    plan.resume_meta = meta


def preflight(
    params: Params,
    student_ref: Path,
    teacher_ref: Path,
    shards: Path,
    accepted: Path,
    control: bool,
    resume: bool,
    checkpoint_dir: Path | None,
    out_dir: Path,
) -> FinetunePlan:
    """Every check that needs no training compute, cheapest first; each failure is one line."""
    cfg = params.train
    name = "train_baseline" if control else "train_sds"
    lambda_sds = 0.0 if control else cfg.lambda_sds
    if not lambda_sds >= 0:
        raise TrainError(f"train.lambda_sds must be >= 0 (got {lambda_sds})")
    n_pairs, total_steps = _dataset_steps(cfg, shards, accepted)
    teacher_root, latent, image_size = teacher_source(teacher_ref)
    teacher_root, _, latent = check_teacher_dir(teacher_root, latent)  # TeacherLoadError: layout
    check_t_range(teacher_root, cfg.t_min, cfg.t_max, "train.t_min", "train.t_max")  # both arms: same params
    if lambda_sds > 0:  # exactly the files finetune will load (no VAE); the control loads no teacher weights
        check_teacher_weights(teacher_root, latent, with_vae=False)  # WeightFileError: truncated/corrupt file
    latent_shape = latent_shape_of(teacher_root)
    student = load_student(student_ref)  # WeightFileError: corrupt file; StudentLoadError: does not fit the arch
    _check_trainable(cfg, student, lambda_sds, name)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else (Path(out_dir) / "checkpoints")
    plan = FinetunePlan(
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
        plan.fingerprint = run_fingerprint(params, lambda_sds, student_ref, teacher_root, shards, accepted)
    if resume:
        _find_resume_point(plan, ckpt_dir)
    return plan


# ------------------------------------------------------------------------------------------ set-up


@dataclass
class _Run:
    """The live pieces of one fine-tuning run, built once by ``_build_run``."""

    accelerator: Accelerator
    module: Any  # StudentWithSigma, prepared by accelerate
    unwrapped: StudentWithSigma
    optimizer: Any  # accelerate's wrapper of the AdamW
    lr_sched: Any
    gen: torch.Generator  # (t, eps) draws
    teacher: Teacher | None
    text_cond_of: TextConditioningCache | None
    contrastive: ClipLoss
    logit_scale: torch.Tensor
    ln_params: list[torch.nn.Parameter]
    start_step: int
    position: tuple[int, int]

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def rank_world(self) -> tuple[int, int]:
        return self.accelerator.process_index, self.accelerator.num_processes


def _accelerator_for(params: Params, plan: FinetunePlan) -> Accelerator:
    """The run's Accelerator, once the global batch splits over its processes and a step fits the device."""
    cfg = params.train
    accelerator = make_accelerator(params, cfg.mixed_precision)
    world = accelerator.num_processes
    if cfg.batch_size % world:
        raise TrainError(f"train.batch_size {cfg.batch_size} does not split evenly over {world} processes")
    from sdsclip.memory import check_step_memory

    # Before the teacher is loaded: a step that cannot fit the device stops here, with the knobs that shrink it.
    check_step_memory(
        cfg,
        plan.student.model_cfg or plan.student.arch,
        plan.teacher_root if plan.lambda_sds > 0 else None,
        plan.teacher_latent,
        plan.teacher_image_size,
        plan.latent_shape,
        plan.n_pairs,
        world,
        accelerator.device,
    )
    return accelerator


def _frozen_teacher(cfg: TrainConfig, plan: FinetunePlan) -> Teacher | None:
    """The frozen teacher (no VAE: SDS never needs it); None for the control, which never loads it."""
    if plan.lambda_sds <= 0:
        return None
    teacher = load_teacher(plan.teacher_root, plan.teacher_latent, plan.teacher_image_size, with_vae=False)
    teacher.freeze()
    if cfg.gradient_checkpointing and cfg.sds_gradient == "jacobian_free":
        log.info(
            "train.gradient_checkpointing: a no-op for the UNet with train.sds_gradient: jacobian_free "
            "(its forward runs without autograd, nothing is kept to recompute)"
        )
    elif cfg.gradient_checkpointing:
        teacher.enable_gradient_checkpointing()
    return teacher


def _trainable_module(cfg: TrainConfig, plan: FinetunePlan, with_teacher: bool):
    """(student + sigma module, its trainable CLIP parameters, AdamW, cosine schedule)."""
    model = plan.student.model
    # sigma exists in both arms so that the control differs from SDS-CLIP in lambda alone.
    sigma = LatentProjection(plan.student.embed_dim, plan.latent_shape)
    trainable = select_trainable(model, sigma, cfg.trainable)
    if not with_teacher:
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
    return module, ln_params, optimizer, lr_sched


def _restore_weights(path: Path, module, optimizer, lr_sched) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a checkpoint's trainable parameters, optimizer and schedule; returns its (tensors, meta)."""
    tensors, meta = ckpt.load_checkpoint(path)
    named = dict(module.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            if key.startswith("param."):
                named[key[len("param.") :]].copy_(value)
    optimizer.load_state_dict(ckpt.optimizer_from_flat(tensors, meta["optimizer"]))
    lr_sched.load_state_dict(meta["lr_scheduler"])
    return tensors, meta


def _build_run(params: Params, plan: FinetunePlan, accelerator: Accelerator) -> _Run:
    """Seed, load the teacher, build student + sigma and the optimizer, resume from the checkpoint if any."""
    cfg = params.train
    set_seed(params.seed)
    teacher = _frozen_teacher(cfg, plan)
    module, ln_params, optimizer, lr_sched = _trainable_module(cfg, plan, teacher is not None)
    gen = torch.Generator().manual_seed(params.seed + 1)  # (t, eps) draws: same stream on every process
    start_step, position = 0, (0, 0)
    if plan.resume_from is not None:
        tensors, meta = _restore_weights(plan.resume_from, module, optimizer, lr_sched)
        start_step, position = int(meta["step"]), tuple(meta["data_position"])
    module, optimizer = accelerator.prepare(module, optimizer)
    if plan.resume_from is not None:  # after prepare: accelerate's own seeding must not override them
        ckpt.rng_from_flat(tensors, meta["rng"], gen)
    elif accelerator.is_main_process and plan.ckpt_dir is not None:
        ckpt.clear_checkpoints(plan.ckpt_dir)
    unwrapped = accelerator.unwrap_model(module)
    logit_scale = unwrapped.clip.logit_scale.detach().exp()
    if teacher is not None:
        teacher.to(accelerator.device)
    text_cond_of = TextConditioningCache(teacher, cfg.text_cache_size) if teacher is not None else None
    rank, world = accelerator.process_index, accelerator.num_processes
    contrastive = ClipLoss(local_loss=world > 1, gather_with_grad=world > 1, rank=rank, world_size=world)
    return _Run(
        accelerator,
        module,
        unwrapped,
        optimizer,
        lr_sched,
        gen,
        teacher,
        text_cond_of,
        contrastive,
        logit_scale,
        ln_params,
        start_step,
        position,
    )


def _batch_stream(params: Params, shards: Path, accepted: Path, plan: FinetunePlan, run: _Run) -> Iterator:
    """(epoch, index, (images, captions)) of this process's share, from the run's data position on."""
    cfg = params.train
    rank, world = run.rank_world
    loader = pair_loader(
        shards,
        accepted,
        plan.student.preprocess,
        cfg.batch_size,
        params.seed,
        rank=rank,
        world_size=world,
        batching=cfg.batching,
        captions=cfg.captions,
        num_workers=cfg.loader_workers,
        pin_memory=run.accelerator.device.type == "cuda",
    )
    return loader.batches(*run.position)


# ------------------------------------------------------------------------------------------ steps


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


def _sds_step(
    run: _Run, cfg: TrainConfig, plan: FinetunePlan, step: int, images: torch.Tensor, captions: list[str]
) -> tuple[dict[str, float], float]:
    """One optimizer step on one batch; returns (logged values, seconds spent in the gradient-norm probe)."""
    accelerator, (rank, world) = run.accelerator, run.rank_world
    images = images.to(accelerator.device, non_blocking=True)
    tokens = plan.student.tokenizer(captions).to(accelerator.device)
    text_cond = run.text_cond_of(captions) if run.text_cond_of is not None else None
    with accelerator.autocast():
        image_emb, text_emb, z = run.module(images, tokens, run.teacher is not None)
        terms = sds_clip_objective(
            image_emb,
            text_emb,
            z,
            run.logit_scale,
            run.teacher,
            text_cond,
            plan.lambda_sds,
            cfg.t_min,
            cfg.t_max,
            cfg.noise_draws,
            run.gen,
            run.contrastive,
            (rank, world),
            cfg.sds_gradient,
            cfg.sds_weighting,
        )
    probe, probe_seconds = {}, 0.0
    if cfg.grad_norm_every and world == 1 and step % cfg.grad_norm_every == 0:
        probe_started = time.time()
        probe = gradient_norms(terms, plan.lambda_sds, run.ln_params, list(run.unwrapped.sigma.parameters()))
        probe_seconds = time.time() - probe_started
    accelerator.backward(terms.total)
    if step < cfg.sigma_first_steps:  # sigma first: CLIP's step is a no-op until sigma has been fitted
        run.optimizer.param_groups[0]["lr"] = 0.0
    run.optimizer.step()
    if not run.optimizer.step_was_skipped:  # fp16 overflow: the schedule waits too
        run.lr_sched.step()
    run.optimizer.zero_grad(set_to_none=True)
    stacked = torch.stack([terms.total.detach(), terms.clip.detach(), terms.sds.detach()]).float()
    if world > 1:
        stacked = accelerator.reduce(stacked, "mean")  # each process holds its share of the global loss
    total, clip, sds = stacked.tolist()
    values = {"loss": total, "loss_clip": clip, "loss_sds": sds, "lr": run.lr_sched.get_last_lr()[0]}
    if z is not None:  # the latent sigma hands the teacher, against the N(0, 1)-ish latents it was trained on
        values.update(z_mean=float(z.detach().float().mean()), z_std=float(z.detach().float().std()))
    values.update(probe)
    return values, probe_seconds


def _save_checkpoint(
    run: _Run,
    plan: FinetunePlan,
    cfg: TrainConfig,
    step: int,
    position: tuple[int, int],
    values: dict[str, float],
    mlflow_run_id: str | None,
) -> None:
    """A resumable checkpoint after ``step`` steps (main process only; none without a checkpoint dir)."""
    if not run.main or plan.ckpt_dir is None:
        return
    tensors = {f"param.{n}": p for n, p in run.unwrapped.named_parameters() if p.requires_grad}
    opt_tensors, opt_meta = ckpt.optimizer_to_flat(run.optimizer.optimizer)
    rng_tensors, rng_meta = ckpt.rng_to_flat(run.gen)
    meta = {
        "fingerprint": plan.fingerprint,
        "data_position": list(position),
        "optimizer": opt_meta,
        "lr_scheduler": run.lr_sched.state_dict(),
        "rng": rng_meta,
        "world_size": run.rank_world[1],
        "total_steps": plan.total_steps,
        "mlflow_run_id": mlflow_run_id,
        "last_values": values,
    }
    ckpt.save_checkpoint(plan.ckpt_dir, step, {**tensors, **opt_tensors, **rng_tensors}, meta, cfg.keep_checkpoints)


def _train_steps(
    run: _Run,
    cfg: TrainConfig,
    plan: FinetunePlan,
    stream: Iterator,
    logs: tuple[LossLog | None, MlflowLog | None],
    keep_final: bool,
) -> tuple[dict[str, float], float]:
    """Steps start_step .. total_steps, logged and checkpointed; returns (last values, probe seconds)."""
    log, mlflow_log = logs
    mlflow_run_id = mlflow_log.run_id if mlflow_log else None
    values = dict(plan.resume_meta.get("last_values", {}))
    position, probe_seconds = run.position, 0.0
    bar = tqdm(total=plan.total_steps, initial=run.start_step, desc=plan.name, mininterval=2, disable=not run.main)
    for step in range(run.start_step, plan.total_steps):
        epoch, index, (images, captions) = next(stream)
        values, probe_s = _sds_step(run, cfg, plan, step, images, captions)
        probe_seconds += probe_s
        position = (epoch, index + 1)
        if run.main and log is not None:  # the main process holds the logs
            log.log(values)
            if mlflow_log:
                mlflow_log.log(step, values)
            total, clip, sds = values["loss"], values["loss_clip"], values["loss_sds"]
            bar.set_postfix(loss=f"{total:.4f}", clip=f"{clip:.4f}", sds=f"{sds:.4f}", refresh=False)
            bar.update(1)
        done = step + 1
        if cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or (done == plan.total_steps and keep_final)):
            _save_checkpoint(run, plan, cfg, done, position, values, mlflow_run_id)
    bar.close()
    return values, probe_seconds


# ------------------------------------------------------------------------------------------ the run


def _open_logs(
    params: Params, plan: FinetunePlan, run: _Run, log_dir: Path | None, out_dir: Path
) -> tuple[LossLog | None, MlflowLog | None]:
    """(DVCLive log, MLflow log or None) on the main process; (None, None) on the others."""
    if not run.main:
        return None, None
    loss_log = LossLog(log_dir or out_dir / "dvclive", resume_step=run.start_step)
    mlflow_log = (
        MlflowLog(params, plan.name, plan.resume_meta.get("mlflow_run_id")) if params.train.log_mlflow else None
    )
    return loss_log, mlflow_log


def _run_meta(
    params: Params,
    plan: FinetunePlan,
    run: _Run,
    values: dict[str, float],
    seconds: float,
    probe_seconds: float,
    refs: tuple[Path, Path],
) -> dict[str, Any]:
    """The summary finetune returns and saves with the model."""
    cfg = params.train
    steps_run = plan.total_steps - run.start_step
    meta = {
        "source": plan.name,
        "lambda_sds": plan.lambda_sds,
        "steps": plan.total_steps,
        "epochs": cfg.epochs,
        "pairs": plan.n_pairs,
        "captions": cfg.captions,
        "batch_size": cfg.batch_size,
        "processes": run.rank_world[1],
        "resumed_from_step": run.start_step if plan.resume_from is not None else None,
        "seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / max(1, steps_run), 4),
        "grad_norm_probe_seconds": round(probe_seconds, 1),
        "latent_shape": list(plan.latent_shape),
        "profile": params.profile,
        **{k: v for k, v in values.items() if k != "lr"},
        "student_ref": str(refs[0]),
        "teacher_ref": str(refs[1]),
    }
    if run.text_cond_of is not None:
        meta["text_conditioning_encoded"] = run.text_cond_of.encoded
    return meta


def _save_outputs(
    plan: FinetunePlan, run: _Run, out_dir: Path, meta: dict[str, Any], logs: tuple, drop_checkpoints: bool
) -> None:
    """Main process: close the logs, write the student and sigma, remove checkpoints kept inside the model dir."""
    log, mlflow_log = logs
    log.close()
    plan.student.model = run.unwrapped.clip
    save_student(plan.student, out_dir, meta)
    from safetensors.torch import save_file

    save_file(
        {k: v.detach().cpu().contiguous() for k, v in run.unwrapped.sigma.state_dict().items()},
        str(out_dir / "sigma.safetensors"),
    )
    if mlflow_log:
        mlflow_log.close(meta)
    if drop_checkpoints and plan.ckpt_dir is not None:
        shutil.rmtree(plan.ckpt_dir, ignore_errors=True)  # the model directory holds only the model


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
    out_dir = Path(out_dir)
    plan = preflight(params, student_ref, teacher_ref, shards, accepted, control, resume, checkpoint_dir, out_dir)
    accelerator = _accelerator_for(params, plan)
    run = _build_run(params, plan, accelerator)
    stream = _batch_stream(params, shards, accepted, plan, run)
    logs = _open_logs(params, plan, run, log_dir, out_dir)
    # A checkpoint dir inside the model dir is removed after success, so the last one is not worth writing;
    # one outside it keeps a final checkpoint (a later --resume then just rewrites the same model).
    inside = plan.ckpt_dir is not None and plan.ckpt_dir.resolve().is_relative_to(out_dir.resolve())
    started = time.time()
    values, probe_seconds = _train_steps(run, params.train, plan, stream, logs, keep_final=not inside)
    seconds = time.time() - started - probe_seconds  # the cost of a step, without the gradient-norm probes
    meta = _run_meta(params, plan, run, values, seconds, probe_seconds, (student_ref, teacher_ref))
    if run.main:
        _save_outputs(plan, run, out_dir, meta, logs, drop_checkpoints=inside)
    accelerator.wait_for_everyone()
    return meta
