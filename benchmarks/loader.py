"""Training loader throughput versus ``train.loader_workers`` (not a test).

    .venv/bin/python benchmarks/loader.py [--images 300] [--size 640x480] [--workers 0 1 2] [--batches 40]

Generates a seeded COCO-format split of photo-like JPEGs in a temp dir (benchmarks/ingest.py's generator),
ingests it with ``sdsclip.ingest.ingest_coco`` and validates it with ``sdsclip.validate.validate_manifest``
(the project's own stages), then times ``sdsclip.data.pair_loader`` with open_clip's ViT-B-32 eval preprocess
(224 px: resize shorter side + center crop + normalize, what fine-tuning a ViT-B/32 student decodes to) for each
worker count, in ONE process, and prints images/s side by side with the ratio to 0 workers. The first batch
of each run (worker start-up) is left out of the rate and reported on its own. Every worker count must yield
the same captions in the same order (checked; the loader's determinism contract).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--size", default="640x480", help="WIDTHxHEIGHT (COCO images are ~640x480)")
    ap.add_argument("--captions", type=int, default=5, help="captions per image (COCO: 5)")
    ap.add_argument("--mode", default="all", choices=["all", "one_per_image"], help="train.captions")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=40, help="timed batches per worker count (after the first)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", type=Path, default=None, help="work dir (default: a fresh temp dir, removed after)")
    args = ap.parse_args(argv)
    width, height = (int(x) for x in args.size.lower().split("x"))

    root = Path(__file__).resolve().parents[1]
    sys.path[:0] = [str(root / "src"), str(root / "benchmarks")]
    import open_clip
    import torch
    from ingest import generate  # benchmarks/ingest.py: seeded photo-like JPEGs + COCO captions JSON

    from sdsclip.config import IngestConfig, ValidateConfig
    from sdsclip.data import pair_loader
    from sdsclip.ingest import ingest_coco
    from sdsclip.validate import validate_manifest

    tmp = tempfile.TemporaryDirectory(prefix="sdsclip-bench-loader-") if args.dir is None else None
    work = Path(tmp.name) if tmp else args.dir
    coco = generate(work / "coco", args.images, width, height, 0.0, args.captions, 2)
    shards, validated = work / "shards", work / "validated"
    ingest_coco(
        coco / "annotations" / "captions_train2017.json",
        coco / "images" / "train2017",
        shards,
        IngestConfig(workers=2, shard_size=100, resume=False),
    )
    summary = validate_manifest(shards / "manifest.csv", validated, ValidateConfig(data_docs=False))
    accepted = validated / "accepted.csv"
    for p in shards.glob("shard-*.tar"):  # warm the page cache for every run alike
        p.read_bytes()

    size = open_clip.get_model_config("ViT-B-32")["vision_cfg"]["image_size"]
    transform = open_clip.image_transform(size, is_train=False)  # ViT-B-32's eval preprocess (OpenAI mean/std)

    runs, reference = {}, None
    for workers in args.workers:
        loader = pair_loader(
            shards,
            accepted,
            transform,
            batch_size=args.batch_size,
            seed=args.seed,
            num_workers=workers,
            captions=args.mode,
        )
        stream = loader.batches()
        t0 = time.perf_counter()
        _, _, (images, _) = next(stream)
        first = time.perf_counter() - t0
        captions = []
        t0 = time.perf_counter()
        for _, _, (images, caps) in (next(stream) for _ in range(args.batches)):  # noqa: B007 (last batch checked below)
            captions.append(caps)
        seconds = time.perf_counter() - t0
        stream.close()  # shuts the DataLoader workers down before the next run
        assert tuple(images.shape[1:]) == (3, size, size), images.shape
        if reference is None:
            reference = captions
        elif captions != reference:
            raise SystemExit(f"loader_workers {workers}: other batches than loader_workers {args.workers[0]}")
        runs[workers] = {
            "first_batch_s": round(first, 3),
            "seconds": round(seconds, 3),
            "img_per_s": round(args.batches * args.batch_size / seconds, 1),
        }
    base = runs[args.workers[0]]["img_per_s"]
    for r in runs.values():
        r["ratio"] = round(r["img_per_s"] / base, 3)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs visible, Python {platform.python_version()}, "
        f"torch {torch.__version__}, torch threads {torch.get_num_threads()}",
        "images": args.images,
        "size": f"{width}x{height}",
        "captions": args.mode,
        "batch_size": args.batch_size,
        "timed_batches": args.batches,
        "transform": f"open_clip ViT-B-32 eval preprocess ({size} px)",
        "validation_passed": summary["passed"],
        "same_batches_for_every_worker_count": True,
        "runs": runs,
    }
    print(json.dumps(result, indent=2))
    print(f"{'loader_workers':>14} {'img/s':>8} {'ratio':>6} {'first batch s':>14}")
    for workers, r in runs.items():
        print(f"{workers:>14} {r['img_per_s']:>8.1f} {r['ratio']:>6.2f} {r['first_batch_s']:>14.2f}")
    if tmp:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
