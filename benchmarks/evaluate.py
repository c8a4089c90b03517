"""Benchmark (not a test): a full Winoground-format evaluation vs the pure batched model forward, in one run.

    .venv/bin/python benchmarks/evaluate.py [--data DIR] [--model STUDENT_DIR] [--items N] [--repeats R]

A: ``evaluate_winoground`` end to end: read examples.jsonl, decode and preprocess every image, tokenize every
   caption, encode both, compute the similarities, the metrics and subsets, write the metrics JSON and scores.
B: the pure forward over the same unique images and captions: ``encode_image`` / ``encode_text`` (+ normalize)
   in batches of eval.batch_size on tensors preprocessed and tokenized beforehand.
Reported: the best of R interleaved runs of each, overhead = A / B - 1 (target <= 20%), and the median over
runs of A_i / B_i - 1 (robust when other processes share the CPU).

Defaults: data/world/winoground and models/sds when present (after `make demo`); otherwise a synthetic world
of --items items (64 px) and a randomly initialised tiny student, generated in a temp dir. ``--arch ViT-B-32
--generate --items 32`` times a real-size architecture (random weights, nothing downloaded) instead.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def _setup(args, tmp: Path):
    from sdsclip.config import WorldConfig
    from sdsclip.models.student import build_student, load_student, save_student
    from sdsclip.synth import generate_world

    data = Path(args.data) if args.data else ROOT / "data" / "world" / "winoground"
    if args.generate or not (data / "examples.jsonl").is_file():
        world = WorldConfig(
            image_size=64,
            pretrain_images=1,
            train_images=1,
            winoground_items=args.items,
            aro_relation_items=1,
            aro_attribution_items=1,
            coco_order_images=1,
            zeroshot_per_class=1,
        )
        generate_world(world, tmp / "world", 0)
        data = tmp / "world" / "winoground"
    model = Path(args.model) if args.model else ROOT / "models" / "sds"
    if args.arch or not (model / "student.json").is_file():
        torch.manual_seed(0)  # randomly initialised: the timing does not depend on the weights
        model = save_student(build_student(args.arch or "sdsclip-tiny-vit"), tmp / "student")
    return data, model, load_student(model)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="Winoground dir (default: data/world/winoground, else a generated world)")
    parser.add_argument("--model", help="student dir (default: models/sds, else a random tiny student)")
    parser.add_argument("--items", type=int, default=400, help="items of the generated world (no --data)")
    parser.add_argument("--generate", action="store_true", help="use a generated world of --items items")
    parser.add_argument("--arch", help="a randomly initialised open_clip architecture instead (e.g. ViT-B-32)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from sdsclip.evaluate.winoground import evaluate_winoground, load_data
    from sdsclip.scoring import StudentScorer

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data_dir, model_dir, student = _setup(args, tmp)
        scorer = StudentScorer(student, args.batch_size, "cpu")
        data = load_data(data_dir)
        names = list(dict.fromkeys(n for e in data.examples for n in (e.image_0, e.image_1)))
        captions = list(dict.fromkeys(c for e in data.examples for c in (e.caption_0, e.caption_1)))
        pixels = torch.stack([student.preprocess(data.load_image(n)) for n in names])
        tokens = student.tokenizer(captions)
        model = student.model.eval()

        @torch.no_grad()
        def pure_forward() -> None:
            for i in range(0, len(pixels), args.batch_size):
                F.normalize(model.encode_image(pixels[i : i + args.batch_size]).float(), dim=-1)
            for i in range(0, len(tokens), args.batch_size):
                F.normalize(model.encode_text(tokens[i : i + args.batch_size]).float(), dim=-1)

        def full() -> None:
            evaluate_winoground(scorer, data_dir, tmp / "m.json", tmp / "s.jsonl")

        full(), pure_forward()  # warm-up (lazy init, allocator, file cache)
        times = {"full": [], "forward": []}
        for _ in range(args.repeats):  # interleaved, so load changes on a shared machine hit both alike
            for name, fn in (("full", full), ("forward", pure_forward)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        a, b = min(times["full"]), min(times["forward"])
        paired = sorted(x / y for x, y in zip(times["full"], times["forward"]))
        median_ratio = paired[len(paired) // 2]
        print(
            f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
            f"python {sys.version.split()[0]}, torch {torch.__version__}"
        )
        print(f"data: {data_dir} ({len(data.examples)} examples, {len(names)} images, {len(captions)} captions)")
        print(f"model: {model_dir} ({student.arch}), batch size {args.batch_size}, best of {args.repeats}")
        print(
            f"A full evaluate_winoground : {a * 1000:8.1f} ms   "
            f"(runs: {', '.join(f'{t * 1000:.0f}' for t in times['full'])})"
        )
        print(
            f"B pure batched forward     : {b * 1000:8.1f} ms   "
            f"(runs: {', '.join(f'{t * 1000:.0f}' for t in times['forward'])})"
        )
        print(f"overhead A/B - 1           : {100 * (a / b - 1):8.1f} %   best vs best (target <= 20%)")
        print(
            f"overhead, median of pairs  : {100 * (median_ratio - 1):8.1f} %   (each run of A / the run of B after it)"
        )


if __name__ == "__main__":
    main()
