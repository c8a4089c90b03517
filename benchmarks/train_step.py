"""Cost of one SDS-CLIP training step, measured side by side in one run (a benchmark, not a timed test).

    (a) SDS step          : the production step of sdsclip.train.finetune (student forward, sigma, frozen UNet
                            forward + backward into z, L_CLIP + lambda L_SDS backward, AdamW), text
                            conditioning from the warm per-caption cache
    (b) contrastive + UNet: the lambda = 0 step on the same batch, plus ONE frozen-UNet forward + backward on a
                            latent of the same shape with the same conditioning and (t, eps)
    (c) SDS, per-step text: (a) with the teacher's text encoder run on every step (cache off)

Reported: median step times, a/b (target <= 1.05: SDS adds nothing beyond its two parts), c/a (what the
cache saves), conditioning alone (encode vs cache lookup), and peak memory per variant (CUDA:
max_memory_allocated; CPU: peak RSS of a child process that runs only that variant).

Text-conditioning cache arm (train.text_cache_size): the SDS step with a 4096-entry cache vs none, side by
side on a caption STREAM, as training sees it: (t) random batches of the toy world's train captions (the
embedded demo; a few hundred distinct captions) and (c) COCO-like captions, all distinct (COCO: 590k
captions, each seen once per epoch, so an LRU of 4096 never hits). Reported: median step time per arm, their
ratio, the cache's hit rate, and the device memory the full cache would hold.

Jacobian-free arm (``--jacobian-free``; train.sds_gradient): jacobian_free / full SDS step time side by side
(tiny models on CPU, and at real shapes with ``--real-steps N``), bytes saved for backward per sample at
SD-1.5 + ViT-B-32 shapes (sdsclip.memory's fake-tensor count of the production step, so no compute) for full,
full + checkpointing and jacobian_free in fp32 and bf16, and the largest batch whose estimated peak fits an
80 GB card, per mode. Figures: benchmarks/results/jacobian_free/.

    python benchmarks/train_step.py                       # tiny embedded models, CPU, < 3 min on 2 cores
    python benchmarks/train_step.py --jacobian-free [--real-steps 1]
    python benchmarks/train_step.py --size real --device cuda --bf16 [--grad-checkpointing] [--batch 32]
        # ViT-B-32 + an SD-1.x-shaped UNet (4x64x64 latents, 77x768 conditioning), random weights: no download
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

CAPTION_WORDS = ("red", "green", "blue", "yellow", "circle", "square", "triangle")
RELATIONS = ("left of", "right of", "above", "below")


def captions(n: int, offset: int = 0) -> list[str]:
    out = []
    for i in range(offset, offset + n):
        a, b = CAPTION_WORDS[i % 4], CAPTION_WORDS[(i // 4 + 1) % 4]
        s1, s2 = CAPTION_WORDS[4 + i % 3], CAPTION_WORDS[4 + (i // 3 + 1) % 3]
        out.append(f"a {a} {s1} {RELATIONS[(i // 12) % 4]} a {b} {s2}")
    return out


@dataclass
class Bench:
    module: torch.nn.Module
    student: object
    teacher: object
    optimizer: torch.optim.Optimizer
    images: torch.Tensor
    tokens: torch.Tensor
    captions: list[str]
    device: torch.device
    autocast: object
    generator: torch.Generator


def build(size: str, batch: int, device: str, bf16: bool, grad_ckpt: bool, seed: int = 0) -> Bench:
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdsclip.config import Params
    from sdsclip.models.student import build_student
    from sdsclip.models.teacher import Teacher, build_tiny_teacher, build_word_tokenizer, caption_vocabulary
    from sdsclip.sds import LatentProjection, StudentWithSigma, select_trainable

    torch.manual_seed(seed)
    caps = captions(batch)
    vocab = caption_vocabulary(captions(64))
    if size == "tiny":  # the embedded default: what `make demo` trains
        params = Params()
        student = build_student(params.student.arch)
        teacher = build_tiny_teacher(params.teacher, vocab)
    else:  # real sizes with random weights: ViT-B-32 + Stable Diffusion 1.x-shaped UNet and text encoder
        student = build_student("ViT-B-32")
        tok = build_word_tokenizer(vocab, 77)
        text = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tok),
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=77,
                projection_dim=768,
            )
        )
        unet = UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            cross_attention_dim=768,
            attention_head_dim=8,
        )
        sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
        teacher = Teacher(unet, text, tok, sched, latent="vae", image_size=512)
    teacher.freeze()
    if grad_ckpt:
        teacher.enable_gradient_checkpointing()
    dev = torch.device(device)
    teacher.to(dev)
    sigma = LatentProjection(student.embed_dim, teacher.latent_shape)
    trainable = select_trainable(student.model, sigma)
    module = StudentWithSigma(student.model, sigma).to(dev).eval()
    optimizer = torch.optim.AdamW(trainable, lr=5e-5)
    side = student.model.visual.image_size
    side = side[0] if isinstance(side, (tuple, list)) else side
    images = torch.randn(batch, 3, side, side, device=dev)
    tokens = student.tokenizer(caps).to(dev)
    autocast = (
        (lambda: torch.autocast(dev.type, dtype=torch.bfloat16))
        if bf16
        else (lambda: torch.autocast(dev.type, enabled=False))
    )
    return Bench(
        module,
        student,
        teacher,
        optimizer,
        images,
        tokens,
        caps,
        dev,
        autocast,
        torch.Generator().manual_seed(seed + 1),
    )


def make_steps(b: Bench, lambda_sds: float = 1.0, t_range: tuple[int, int] = (20, 980)):
    from open_clip.loss import ClipLoss

    from sdsclip.models.teacher import TextConditioningCache
    from sdsclip.sds import sds_clip_objective, sds_loss

    contrastive = ClipLoss()
    logit_scale = b.module.clip.logit_scale.detach().exp()
    cached = TextConditioningCache(b.teacher, 4096)
    per_step = TextConditioningCache(b.teacher, 0)
    cached(b.captions)  # warm: in training every caption is encoded once, then looked up

    def sds_step(cond_of):
        cond = cond_of(b.captions)
        with b.autocast():
            image_emb, text_emb, z = b.module(b.images, b.tokens, True)
            terms = sds_clip_objective(
                image_emb, text_emb, z, logit_scale, b.teacher, cond, lambda_sds, *t_range, 1, b.generator, contrastive
            )
        terms.total.backward()
        b.optimizer.step()
        b.optimizer.zero_grad(set_to_none=True)

    def contrastive_plus_unet():
        with b.autocast():
            image_emb, text_emb, _ = b.module(b.images, b.tokens, False)
            terms = sds_clip_objective(
                image_emb, text_emb, None, logit_scale, None, None, 0.0, *t_range, 1, b.generator, contrastive
            )
        terms.total.backward()
        b.optimizer.step()
        b.optimizer.zero_grad(set_to_none=True)
        cond = cached(b.captions)
        z = torch.randn(len(b.captions), *b.teacher.latent_shape, device=b.device, requires_grad=True)
        with b.autocast():
            loss = sds_loss(b.teacher, z, cond, *t_range, 1, b.generator)
        loss.backward()

    def encode_only():
        with torch.no_grad():
            per_step(b.captions)

    def lookup_only():
        cached(b.captions)

    return {
        "a_sds_step": lambda: sds_step(cached),
        "b_contrastive_plus_unet": contrastive_plus_unet,
        "c_sds_step_per_step_text": lambda: sds_step(per_step),
        "text_encode": encode_only,
        "text_cache_lookup": lookup_only,
    }


def toy_world_caption_pool(seed: int = 0) -> list[str]:
    """The toy world's train captions (the COCO-style captions sdsclip.synth writes for world.train_images
    two-object scenes; the pixels are not rendered): what the embedded demo's fine-tuning batches draw from."""
    from sdsclip.config import Params
    from sdsclip.synth import coco_style_captions, family_rng, random_two_object_scene

    world = Params().world
    rng = family_rng(seed, "coco/train")
    return [
        c
        for _ in range(world.train_images)
        for c in coco_style_captions(rng, random_two_object_scene(rng, world), world.captions_per_image)
    ]


def caption_stream(kind: str, batch: int, n_batches: int, seed: int = 0) -> list[list[str]]:
    """``n_batches`` caption batches: ``toy`` = random batches of the toy world's pool; ``coco`` = every
    caption distinct (a COCO epoch: no caption comes back within 4096 entries)."""
    if kind == "toy":
        pool = toy_world_caption_pool(seed)
        gen = torch.Generator().manual_seed(seed)
        return [
            [pool[i] for i in torch.randint(0, len(pool), (batch,), generator=gen).tolist()] for _ in range(n_batches)
        ]
    words = [w for c in captions(64) for w in c.split()]
    return [
        [
            f"{' '.join(words[(k * 7 + j) % len(words)] for j in range(9))} number {k}"
            for k in range(i * batch, (i + 1) * batch)
        ]
        for i in range(n_batches)
    ]


def text_cache_arm(b: Bench, steps: int, warmup: int, entries: int = 4096) -> dict[str, dict]:
    """SDS step time with a warm-from-empty ``entries`` cache vs encoding every step, interleaved step by step
    on the same caption stream, for the toy world's captions and for all-distinct (COCO-like) captions."""
    from open_clip.loss import ClipLoss

    from sdsclip.models.teacher import TextConditioningCache
    from sdsclip.sds import sds_clip_objective

    contrastive = ClipLoss()
    logit_scale = b.module.clip.logit_scale.detach().exp()

    def step(cond_of, caps):
        tokens = b.student.tokenizer(caps).to(b.device)
        cond = cond_of(caps)
        with b.autocast():
            image_emb, text_emb, z = b.module(b.images, tokens, True)
            terms = sds_clip_objective(
                image_emb, text_emb, z, logit_scale, b.teacher, cond, 1.0, 20, 980, 1, b.generator, contrastive
            )
        terms.total.backward()
        b.optimizer.step()
        b.optimizer.zero_grad(set_to_none=True)

    out = {}
    for kind, label in (("toy", "toy_world"), ("coco", "coco_like_all_distinct")):
        stream = caption_stream(kind, len(b.captions), warmup + steps)
        arms = {"cache_on": TextConditioningCache(b.teacher, entries), "cache_off": TextConditioningCache(b.teacher, 0)}
        times: dict[str, list[float]] = {k: [] for k in arms}
        encoded_before_timing = 0
        for i, caps in enumerate(stream):
            if i == warmup:
                encoded_before_timing = arms["cache_on"].encoded
            for name in list(arms) if i % 2 == 0 else list(arms)[::-1]:
                _sync(b.device)
                t0 = time.perf_counter()
                step(arms[name], caps)
                _sync(b.device)
                if i >= warmup:
                    times[name].append(time.perf_counter() - t0)
        cache = arms["cache_on"]
        timed = steps * len(b.captions)
        with torch.no_grad():
            row = b.teacher.encode_text(stream[0][:1])[0]
        median = {k: statistics.median(v) for k, v in times.items()}
        out[label] = {
            "median_s": median,
            "ratio_off_over_on": median["cache_off"] / median["cache_on"],
            "hit_rate_timed_steps": 1 - (cache.encoded - encoded_before_timing) / timed,
            "distinct_captions_in_stream": len({c for caps in stream for c in caps}),
            "cache_entries_at_end": len(cache),
            "full_cache_mib": entries * row.numel() * row.element_size() / 2**20,
        }
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variants(b: Bench, steps: int, warmup: int) -> dict[str, float]:
    fns = make_steps(b)
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for i in range(warmup + steps):
        order = names[i % len(names) :] + names[: i % len(names)]  # rotate: no variant always runs first
        for name in order:
            _sync(b.device)
            t0 = time.perf_counter()
            fns[name]()
            _sync(b.device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def peak_memory(args, variant: str) -> float:
    """Peak memory (MiB) of ``variant``: CUDA allocator peak, or the peak RSS of a child process on CPU."""
    if args.device == "cuda":
        b = build(args.size, args.batch, args.device, args.bf16, args.grad_checkpointing)
        fn = make_steps(b)[variant]
        fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
        del b, fn
        torch.cuda.empty_cache()
        return peak
    cmd = (
        [
            sys.executable,
            __file__,
            "--memory-child",
            variant,
            "--size",
            args.size,
            "--batch",
            str(args.batch),
            "--device",
            args.device,
        ]
        + (["--bf16"] if args.bf16 else [])
        + (["--grad-checkpointing"] if args.grad_checkpointing else [])
    )
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rss_mib"]


def memory_child(args) -> None:
    """RSS sampled every 0.5 ms while 3 steps of one variant run, minus the RSS of the built models just
    before them (freed memory is reused by the next step, so later steps would hide the working set)."""
    import gc
    import threading

    import psutil

    b = build(args.size, args.batch, args.device, args.bf16, args.grad_checkpointing)
    fn = make_steps(b)[args.memory_child]
    proc = psutil.Process()
    gc.collect()
    base = peak = proc.memory_info().rss
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.0005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    for _ in range(3):
        fn()
    done.set()
    thread.join()
    print(
        json.dumps(
            {
                "peak_rss_mib": (peak - base) / 2**20,
                "models_rss_mib": base / 2**20,
                "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


def _mode_step(b: Bench, gradient: str):
    """One production SDS step (cached text conditioning) with train.sds_gradient = ``gradient``."""
    from open_clip.loss import ClipLoss

    from sdsclip.models.teacher import TextConditioningCache
    from sdsclip.sds import sds_clip_objective

    contrastive, cache = ClipLoss(), TextConditioningCache(b.teacher, 4096)
    logit_scale = b.module.clip.logit_scale.detach().exp()
    cache(b.captions)

    def step():
        cond = cache(b.captions)
        with b.autocast():
            image_emb, text_emb, z = b.module(b.images, b.tokens, True)
            terms = sds_clip_objective(
                image_emb,
                text_emb,
                z,
                logit_scale,
                b.teacher,
                cond,
                1.0,
                20,
                980,
                1,
                b.generator,
                contrastive,
                gradient=gradient,
            )
        terms.total.backward()
        b.optimizer.step()
        b.optimizer.zero_grad(set_to_none=True)

    return step


def time_modes(b: Bench, steps: int, warmup: int) -> dict[str, float]:
    """Median step time of full and jacobian_free on the same models and batch, interleaved step by step."""
    fns = {g: _mode_step(b, g) for g in ("full", "jacobian_free")}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + steps):
        for name in list(fns) if i % 2 == 0 else list(fns)[::-1]:
            _sync(b.device)
            t0 = time.perf_counter()
            fns[name]()
            _sync(b.device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


#: (label, train.sds_gradient, gradient checkpointing) of the memory comparison
JF_MODES = (("full", "full", False), ("full+ckpt", "full", True), ("jacobian_free", "jacobian_free", False))


def jacobian_free_memory(card: str = "80gb") -> dict:
    """Saved-for-backward bytes per sample (batch 2 - batch 1, fake CUDA tensors) and the largest local batch whose
    estimated peak (sdsclip.memory.estimate_step: weights + saved activations + recompute + grads/AdamW + 10 %
    margin + 1 GiB CUDA reserve) fits ``card``'s usable bytes (sdsclip.memory.CARDS), per mode, at SD-1.5 +
    ViT-B-32. The estimate is affine in the batch: fitted from batch 8 and 16, then checked at the answer."""
    from sdsclip.config import TrainConfig
    from sdsclip.memory import CARDS, GIB, TeacherSpec, count_step, estimate_step

    spec, arch, limit = TeacherSpec.sd15(), "ViT-B-32", CARDS[card]
    out: dict = {"card": card, "usable_gib": limit / GIB, "per_sample": {}, "largest_batch": {}}
    for precision, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        for label, gradient, ckpt in JF_MODES:
            c1, c2 = (count_step(arch, spec, n, dtype, ckpt, "cuda", sds_gradient=gradient) for n in (1, 2))
            key = f"{label}/{precision}"
            out["per_sample"][key] = {
                "saved_bytes": (c2.student_saved + c2.unet_saved) - (c1.student_saved + c1.unet_saved),
                "unet_saved_bytes": c2.unet_saved - c1.unet_saved,
                "student_saved_bytes": c2.student_saved - c1.student_saved,
            }

            def peak(n: int, gradient=gradient, ckpt=ckpt, dtype=dtype) -> int:  # this iteration's arm
                cfg = TrainConfig(
                    batch_size=max(n, 2),
                    sds_gradient=gradient,
                    gradient_checkpointing=ckpt,
                    mixed_precision="no" if dtype is None else "bf16",
                )
                return estimate_step(cfg, arch, spec, 1, "cuda").peak

            p8, p16 = peak(8), peak(16)
            slope = (p16 - p8) / 8
            best = int((limit - (p8 - 8 * slope)) // slope)
            while best > 2 and peak(best) > limit:  # the affine fit is checked on the real estimate
                best = int(best * 0.97)
            out["largest_batch"][key] = {
                "batch": best,
                "peak_gib_at_batch": peak(best) / GIB,
                "fixed_gib": (p8 - 8 * slope) / GIB,
                "gib_per_sample": slope / GIB,
            }
    return out


def jacobian_free_arm(args) -> dict:
    """The ``--jacobian-free`` run: step-time ratios and memory per mode, side by side (see the docstring)."""
    started = time.time()
    result: dict = {"machine": machine("cpu")}
    b = build("tiny", args.batch, "cpu", False, False)
    tiny = time_modes(b, args.steps, args.warmup)
    del b
    result["tiny_cpu"] = {
        "batch": args.batch,
        "steps": args.steps,
        "median_s": tiny,
        "ratio_jacobian_free_over_full": tiny["jacobian_free"] / tiny["full"],
    }
    if args.real_steps:
        b = build("real", 1, "cpu", False, False)
        real = time_modes(b, args.real_steps, 1)
        del b
        result["real_shapes_cpu"] = {
            "batch": 1,
            "steps": args.real_steps,
            "warmup": 1,
            "median_s": real,
            "ratio_jacobian_free_over_full": real["jacobian_free"] / real["full"],
        }
    result["memory_sd15_vitb32"] = jacobian_free_memory()
    result["wall_s"] = round(time.time() - started, 1)

    print(f"\nJacobian-free vs full SDS  [{result['machine']}]")
    for label, r in (
        ("tiny models, CPU", result["tiny_cpu"]),
        ("SD-1.5 + ViT-B-32, CPU", result.get("real_shapes_cpu")),
    ):
        if r:
            m = r["median_s"]
            print(
                f"  step time, {label}, batch {r['batch']}: full {m['full'] * 1000:.1f} ms, jacobian_free "
                f"{m['jacobian_free'] * 1000:.1f} ms -> ratio {r['ratio_jacobian_free_over_full']:.3f} (target <= 0.6)"
            )
    mem = result["memory_sd15_vitb32"]
    print(
        f"  SD-1.5 + ViT-B-32, fake CUDA tensors; largest batch: estimated peak <= {mem['usable_gib']:.0f} GiB "
        f"usable of an {mem['card']} card"
    )
    print(f"    {'mode':<24} {'saved MiB/sample':>17} {'UNet MiB/sample':>16} {'largest batch':>14}")
    for key, ps in mem["per_sample"].items():
        lb = mem["largest_batch"][key]
        print(
            f"    {key:<24} {ps['saved_bytes'] / 2**20:17.2f} {ps['unet_saved_bytes'] / 2**20:16.2f} {lb['batch']:14d}"
        )
    for precision in ("fp32", "bf16"):
        full, jf = mem["per_sample"][f"full/{precision}"], mem["per_sample"][f"jacobian_free/{precision}"]
        fb, jb = (
            mem["largest_batch"][f"full/{precision}"]["batch"],
            mem["largest_batch"][f"jacobian_free/{precision}"]["batch"],
        )
        cb = mem["largest_batch"][f"full+ckpt/{precision}"]["batch"]
        print(
            f"  {precision}: saved bytes/sample jacobian_free / full = {jf['saved_bytes'] / full['saved_bytes']:.4f} "
            f"(target <= 0.1); batch per card {jb} vs full {fb} ({jb / max(fb, 1):.1f}x, target >= 4x), "
            f"vs full+ckpt {cb} ({jb / max(cb, 1):.1f}x)"
        )
    print(f"  wall {result['wall_s']} s (MiB, GiB: 2^20, 2^30 bytes)")
    out = args.json or (Path(__file__).resolve().parent / "results" / "jacobian_free" / "jacobian_free.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def machine(device: str) -> str:
    cpu = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
        f"torch threads {torch.get_num_threads()}"
    )
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (+ {cpu})"
    try:
        load = os.getloadavg()[0]
        cpu += f", load avg {load:.1f}"
    except OSError:
        pass
    return f"CPU only: {cpu}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "real"], default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=25, help="timed steps per variant (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (train.mixed_precision: bf16)")
    parser.add_argument("--grad-checkpointing", action="store_true", help="UNet gradient checkpointing")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-cache-arm", action="store_true", help="skip the text-cache stream measurement")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument(
        "--jacobian-free",
        action="store_true",
        help="only the train.sds_gradient comparison (writes benchmarks/results/jacobian_free/)",
    )
    parser.add_argument(
        "--real-steps",
        type=int,
        default=0,
        help="--jacobian-free: also time N steps per mode at SD-1.5 + ViT-B-32 shapes, batch 1 (CPU)",
    )
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_child(args)
        return {}
    if args.jacobian_free:
        return jacobian_free_arm(args)

    started = time.time()
    b = build(args.size, args.batch, args.device, args.bf16, args.grad_checkpointing)
    t = time_variants(b, args.steps, args.warmup)
    cache_arm = None if args.no_cache_arm else text_cache_arm(b, args.steps, args.warmup)
    del b
    result = {
        "machine": machine(args.device),
        "size": args.size,
        "device": args.device,
        "batch": args.batch,
        "bf16": args.bf16,
        "grad_checkpointing": args.grad_checkpointing,
        "steps": args.steps,
        "median_s": t,
        "ratio_sds_over_contrastive_plus_unet": t["a_sds_step"] / t["b_contrastive_plus_unet"],
        "speedup_cached_text_step": t["c_sds_step_per_step_text"] / t["a_sds_step"],
        "speedup_cached_text_conditioning_alone": t["text_encode"] / t["text_cache_lookup"],
    }
    if cache_arm is not None:
        result["text_cache_4096"] = cache_arm
    if not args.no_memory:
        result["peak_memory_mib"] = {
            v: peak_memory(args, v) for v in ("a_sds_step", "b_contrastive_plus_unet", "c_sds_step_per_step_text")
        }
        result["memory_kind"] = (
            "torch.cuda.max_memory_allocated, models included"
            if args.device == "cuda"
            else "peak RSS during the first 3 steps above the built models' RSS, one child process per variant"
        )
    result["wall_s"] = round(time.time() - started, 1)

    print(f"\nSDS-CLIP train step benchmark  [{result['machine']}]")
    print(
        f"size={args.size} batch={args.batch} device={args.device} bf16={args.bf16} "
        f"grad_checkpointing={args.grad_checkpointing}; median of {args.steps} interleaved steps"
    )
    for k, v in t.items():
        print(f"  {k:<28} {v * 1000:9.2f} ms")
    verdict = "OK" if result["ratio_sds_over_contrastive_plus_unet"] <= 1.05 else "ABOVE TARGET"
    print(
        f"  (a) / (b)  SDS step vs contrastive + UNet fwd/bwd : {result['ratio_sds_over_contrastive_plus_unet']:.3f}"
        f"  (target <= 1.05: {verdict})"
    )
    print(f"  (c) / (a)  per-step vs cached text conditioning   : {result['speedup_cached_text_step']:.3f}x step")
    print(
        f"  encode / lookup, conditioning alone              : {result['speedup_cached_text_conditioning_alone']:.1f}x"
    )
    for label, arm in (cache_arm or {}).items():
        m = arm["median_s"]
        print(
            f"  text cache 4096 vs off, {label:<23}: step {m['cache_on'] * 1000:8.2f} ms vs "
            f"{m['cache_off'] * 1000:8.2f}"
            f" ms (off/on {arm['ratio_off_over_on']:.3f}), hit rate {arm['hit_rate_timed_steps']:.1%}, "
            f"{arm['distinct_captions_in_stream']} distinct captions, full cache {arm['full_cache_mib']:.1f} MiB"
        )
    if "peak_memory_mib" in result:
        print(f"  peak memory ({result['memory_kind']}):")
        for k, v in result["peak_memory_mib"].items():
            print(f"    {k:<28} {v:9.1f} MiB")
    print(f"  wall {result['wall_s']} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
