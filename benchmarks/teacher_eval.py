"""The teacher as a matcher: Winoground and ARO scoring throughput against the pure batched UNet forward over
the same (image, caption, t, eps) draws, in one run (a benchmark, not a test).

    python benchmarks/teacher_eval.py [--items 64] [--draws 4] [--batch-size 128] [--repeats 3]

A: the benchmark end to end with a TeacherScorer (``evaluate_winoground`` / ``evaluate_aro``: read the set,
   decode, encode latents, text conditioning, every (pair, draw) job through the UNet, metrics, files).
B: exactly the UNet calls A made, replayed: each ``Teacher.epsilon_error`` call of A is recorded once
   (its latents, conditioning, t and eps), then timed alone, back to back.
Reported per benchmark: best-of-R seconds of A and B and B / A (the share of A's time that is UNet forward;
target >= 0.9), UNet jobs per second. Then the batching check: every score of A with eval batch size 1 and
with --batch-size, max |difference| (shared draws are the metric's definition: the same (t, eps) for every
image and caption, whatever the batch).

The teacher is the tiny UNet (random init, teacher.tiny of params.yaml) on a synthetic world of --items
Winoground items (and ARO sets of --items // 2); on a GPU machine pass --device cuda.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def setup(items: int, tmp: Path):
    from sdsclip.config import WorldConfig, load_params
    from sdsclip.models.teacher import build_tiny_teacher, caption_vocabulary
    from sdsclip.synth import generate_world

    params = load_params(ROOT / "params.yaml")
    world = WorldConfig(
        image_size=params.teacher.image_size,
        pretrain_images=1,
        train_images=1,
        winoground_items=items,
        aro_relation_items=max(items // 2, 2),
        aro_attribution_items=max(items // 2, 2),
        coco_order_images=max(items // 8, 2),
        zeroshot_per_class=1,
    )
    generate_world(world, tmp / "world", seed=0, families=["winoground", "aro"])
    captions = [
        json.loads(line)[key]
        for line in (tmp / "world" / "winoground" / "examples.jsonl").open()
        for key in ("caption_0", "caption_1")
    ]
    torch.manual_seed(0)
    teacher = build_tiny_teacher(params.teacher, caption_vocabulary(captions + ["a red cube", "the"]))
    return params, teacher, tmp / "world"


def scorer_for(params, teacher, draws: int, batch_size: int, device: str):
    from sdsclip.scoring import TeacherScorer

    ev = params.eval
    return TeacherScorer(
        teacher,
        draws,
        ev.teacher_t_min,
        ev.teacher_t_max,
        seed=0,
        batch_size=batch_size,
        device=device,
        vae_batch_size=ev.vae_batch_size,
        vae_precision=ev.vae_precision,
        image_uncond_correction=ev.teacher_image_uncond_correction,
    )


def run_benchmark(name: str, scorer, world: Path, out: Path) -> dict:
    from sdsclip.evaluate.aro import evaluate_aro
    from sdsclip.evaluate.winoground import evaluate_winoground

    if name == "winoground":
        return evaluate_winoground(scorer, world / "winoground", out / "wino.json", out / "wino.jsonl")
    # the Visual Genome sets: COCO-/Flickr30k-Order score caption perturbations, not more teacher work per item
    return evaluate_aro(scorer, world / "aro", out / "aro.json", datasets=["vg_relation", "vg_attribution"])


class Recorder:
    """Wraps Teacher.epsilon_error: records each call's inputs (once) and the seconds spent inside."""

    def __init__(self, teacher):
        self.teacher, self.inner = teacher, teacher.epsilon_error
        self.calls: list[tuple[torch.Tensor, ...]] = []
        self.record = False

    def __call__(self, z, cond, t, noise):
        if self.record:
            self.calls.append((z.clone(), cond.clone(), t.clone(), noise.clone()))
        return self.inner(z, cond, t, noise)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_end_to_end(name, scorer, world, out, device) -> float:
    synchronize(device)
    started = time.perf_counter()
    run_benchmark(name, scorer, world, out)
    synchronize(device)
    return time.perf_counter() - started


@torch.no_grad()
def time_replay(teacher, calls, device) -> float:
    synchronize(device)
    started = time.perf_counter()
    for z, cond, t, noise in calls:
        teacher.epsilon_error(z, cond, t, noise)
    synchronize(device)
    return time.perf_counter() - started


def all_scores(name: str, out: Path) -> list[float]:
    if name == "winoground":
        return [json.loads(line)["score"] for line in (out / "wino.jsonl").read_text().splitlines()]
    result = json.loads((out / "aro.json").read_text())
    return [v for k, v in sorted(_flat(result).items()) if isinstance(v, float)]


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--draws", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        params, teacher, world = setup(args.items, tmp)
        print(
            f"{platform.node()}: torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}; "
            f"{args.items} Winoground items, {args.draws} draws, batch {args.batch_size}"
        )
        print(
            f"{'benchmark':<11} {'A end-to-end s':>15} {'B UNet only s':>14} {'B/A':>6} {'jobs':>6} "
            f"{'jobs/s A':>9} {'max |score diff| batch 1':>25}"
        )
        for name in ("winoground", "aro"):
            scorer = scorer_for(params, teacher, args.draws, args.batch_size, args.device)
            recorder = Recorder(scorer.teacher)
            scorer.teacher.epsilon_error = recorder
            out = tmp / name
            out.mkdir()
            recorder.record = True
            run_benchmark(name, scorer, world, out)  # warm-up + the calls to replay
            recorder.record = False
            reference = all_scores(name, out)
            jobs = sum(call[0].shape[0] for call in recorder.calls)
            a = b = float("inf")
            for _ in range(args.repeats):  # interleaved: both see the same machine load
                a = min(a, time_end_to_end(name, scorer, world, out, args.device))
                b = min(b, time_replay(scorer.teacher, recorder.calls, args.device))
            one = scorer_for(params, teacher, args.draws, 1, args.device)
            run_benchmark(name, one, world, out)
            diff = max((abs(x - y) for x, y in zip(all_scores(name, out), reference, strict=True)), default=0.0)
            print(f"{name:<11} {a:>15.3f} {b:>14.3f} {b / a:>6.2f} {jobs:>6} {jobs / a:>9.0f} {diff:>25.2e}")
            scorer.teacher.epsilon_error = recorder.inner


if __name__ == "__main__":
    main()
