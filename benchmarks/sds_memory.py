"""Bytes saved for backward by one SDS-CLIP step at real size, measured on CPU, next to the preflight estimate.

For each setting (fp32, bf16 autocast, fp32 + UNet gradient checkpointing, bf16 + checkpointing) and
batch 1 and 2, one production step (sdsclip.sds: open_clip ViT-B-32 student with LayerNorm-only training
+ sigma, then L_SDS through a frozen UNet of Stable Diffusion 1.5's shape: 320/640/1280/1280, 4x64x64
latent, 77x768 conditioning, random weights, nothing downloaded) runs forward under
``torch.autograd.graph.saved_tensors_hooks`` counting the unique storages saved for backward (weights
excluded), then backward. batch 2 - batch 1 = per sample; the rest is the fixed cost (e.g. bf16 copies of
the frozen weights that conv/linear keep for their input gradient).

Then ``sdsclip.memory`` estimates the same counts on fake tensors (no compute) and the peak of a step at
batch 32 for each setting, the figures the `paper-*gb` profiles were chosen from.

    flock /tmp/sdsclip-heavy.lock python benchmarks/sds_memory.py          # ~3 min on 2 cores, ~12 GB RAM
    python benchmarks/sds_memory.py --reuse      # estimates only, against the committed measurement
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from sdsclip.memory import GIB, SETTINGS, SavedTensorCounter  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "sds_memory"
MEASURED = OUT / "measured_cpu.json"


def build_real(seed: int = 0):
    """ViT-B-32 student + sigma and a frozen SD-1.5-shaped teacher UNet, random init, on CPU."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from sdsclip.memory import SD15_SCHEDULER_CONFIG, SD15_UNET_CONFIG
    from sdsclip.models.student import build_student
    from sdsclip.models.teacher import Teacher
    from sdsclip.sds import LatentProjection, StudentWithSigma, select_trainable

    torch.manual_seed(seed)
    student = build_student("ViT-B-32")
    unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    teacher = Teacher(unet, None, None, DDPMScheduler(**SD15_SCHEDULER_CONFIG), latent="vae", image_size=512)
    teacher.freeze()
    sigma = LatentProjection(student.embed_dim, teacher.latent_shape)
    select_trainable(student.model, sigma)
    module = StudentWithSigma(student.model, sigma).eval()
    return student, module, teacher


def measure_one(student, module, teacher, batch: int, setting: str, backward: bool) -> dict:
    from open_clip.loss import ClipLoss

    from sdsclip.sds import sds_clip_objective, sds_loss

    bf16, ckpt = SETTINGS[setting]
    if ckpt:
        teacher.unet.enable_gradient_checkpointing()
    else:
        teacher.unet.disable_gradient_checkpointing()
    side = student.model.visual.image_size
    side = side[0] if isinstance(side, (tuple, list)) else side
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, side, side, generator=gen)
    tokens = student.tokenizer([f"a photo number {i}" for i in range(batch)])
    cond = torch.randn(batch, 77, teacher.unet.config.cross_attention_dim, generator=gen)
    counter = SavedTensorCounter.excluding(module, teacher.unet)
    logit_scale = module.clip.logit_scale.detach().exp()
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), counter():
        image_emb, text_emb, z = module(images, tokens, True)
        terms = sds_clip_objective(
            image_emb, text_emb, z, logit_scale, None, None, 0.0, 20, 980, contrastive=ClipLoss()
        )
        student_bytes = counter.bytes
        loss_sds = sds_loss(teacher, z, cond, 20, 980, 1, gen)
        loss = terms.clip + 0.001 * loss_sds
    forward_s = time.perf_counter() - t0
    row = {
        "student_saved_bytes": student_bytes,
        "unet_saved_bytes": counter.bytes - student_bytes,
        "forward_s": round(forward_s, 1),
    }
    if backward:
        t0 = time.perf_counter()
        loss.backward()
        row["backward_s"] = round(time.perf_counter() - t0, 1)
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        row["trainable_grads_finite"] = bool(all(g is not None and torch.isfinite(g).all() for g in grads))
        module.zero_grad(set_to_none=True)
    del loss, loss_sds, terms, z
    return row


def measure(batches: list[int], settings: list[str], backward: bool) -> dict:
    t0 = time.perf_counter()
    student, module, teacher = build_real()
    result = {
        "machine": f"CPU only: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
        f"torch {torch.__version__}",
        "build_s": round(time.perf_counter() - t0, 1),
        "settings": {},
    }
    for setting in settings:
        for batch in batches:
            row = measure_one(student, module, teacher, batch, setting, backward)
            result["settings"].setdefault(setting, {})[str(batch)] = row
            print(
                f"  measured {setting:<10} batch {batch}: unet {row['unet_saved_bytes'] / GIB:.3f} GiB, "
                f"student {row['student_saved_bytes'] / GIB:.4f} GiB  ({row['forward_s']} s fwd, "
                f"{row.get('backward_s', '-')} s bwd)",
                flush=True,
            )
            OUT.mkdir(parents=True, exist_ok=True)
            MEASURED.write_text(json.dumps(result, indent=2) + "\n")  # partial results survive a crash
    return result


def split(rows: dict, key: str) -> tuple[float, float]:
    """(per-sample, fixed) bytes from the batch-1 and batch-2 counts."""
    one, two = rows["1"][key], rows["2"][key]
    return two - one, one - (two - one)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reuse", action="store_true", help=f"skip the measurement, read {MEASURED}")
    parser.add_argument("--no-backward", action="store_true", help="forward (the count) only")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--batch", type=int, default=32, help="global batch of the peak estimates")
    args = parser.parse_args(argv)
    measured = json.loads(MEASURED.read_text()) if args.reuse else measure([1, 2], args.settings, not args.no_backward)
    from sdsclip.config import TrainConfig
    from sdsclip.memory import CARDS, TeacherSpec, count_step, estimate_sd15_vitb32

    print(
        f"\nBytes saved for backward by one SDS-CLIP step, SD-1.5-shaped UNet + ViT-B-32 "
        f"[{measured['machine']}]; estimate: the same step on fake CPU tensors (sdsclip.memory)"
    )
    print(
        f"{'setting':<11} {'UNet GiB/sample':>16} {'UNet fixed GiB':>15} {'student GiB/sample':>19} "
        f"{'estimate GiB/sample':>20} {'estimate/measured':>18}"
    )
    table = {}
    for setting in args.settings:
        rows = measured["settings"].get(setting)
        if not rows or "2" not in rows:
            continue
        unet_ps, unet_fixed = split(rows, "unet_saved_bytes")
        stud_ps, _ = split(rows, "student_saved_bytes")
        bf16, ckpt = SETTINGS[setting]
        dtype = torch.bfloat16 if bf16 else None
        one, two = (count_step("ViT-B-32", TeacherSpec.sd15(), b, dtype, ckpt, "cpu") for b in (1, 2))
        est_ps = (two.unet_saved + two.student_saved) - (one.unet_saved + one.student_saved)
        ratio = est_ps / (unet_ps + stud_ps)
        table[setting] = {
            "unet_per_sample_gib": unet_ps / GIB,
            "unet_fixed_gib": unet_fixed / GIB,
            "student_per_sample_gib": stud_ps / GIB,
            "estimate_per_sample_gib": est_ps / GIB,
            "estimate_over_measured": ratio,
        }
        print(
            f"{setting:<11} {unet_ps / GIB:16.3f} {unet_fixed / GIB:15.3f} {stud_ps / GIB:19.4f} "
            f"{est_ps / GIB:20.3f} {ratio:18.3f}"
        )

    print(
        f"\nEstimated peak of a step on CUDA (fake CUDA tensors, CUDA autocast policy, flash / memory-efficient "
        f"attention), global batch {args.batch} on 1 GPU, ~118k COCO pairs:"
    )
    peaks = {}
    print(f"{'setting':<11} {'peak GiB':>9}  {' '.join(f'{c:>6}' for c in CARDS)}  parts (GiB)")
    for setting, (bf16, ckpt) in SETTINGS.items():
        cfg = TrainConfig(batch_size=args.batch, mixed_precision="bf16" if bf16 else "no", gradient_checkpointing=ckpt)
        est = estimate_sd15_vitb32(cfg, n_pairs=118_287)
        peaks[setting] = est.as_dict()
        fits = " ".join(f"{'fits' if est.peak <= CARDS[c] else '-':>6}" for c in CARDS)
        print(f"{setting:<11} {est.peak / GIB:9.1f}  {fits}  {est.summary()}")
    result = {"measured": measured, "per_sample": table, "peak_estimates_cuda": peaks, "batch": args.batch}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "sds_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
