"""Ingest + validate throughput versus a plain decode of the same files (the issue's benchmark; not a test).

    python benchmarks/ingest.py [--images 3000] [--workers 2] [--dir DIR]
    python benchmarks/ingest.py --coco-train2017 [--dir DIR]     # 118,287 images, 591,753 captions

Generates (once, cached in --dir, which may live outside the repo) a COCO-format split of photo-like JPEGs:
``--images`` unique 640x480 photos (``--grey-fraction`` of them greyscale, as ~1-2% of real COCO is: ingest
converts those to RGB and re-encodes them, an honest extra cost), or with ``--coco-train2017`` the train2017
counts with COCO's spread of image sizes (SIZES: 640 on the long side, portrait and landscape) and of captions
per image (5, a few 6 or 7). At that size the files are made from a pool of 64 encoded photos per size, each
file made unique by a JPEG comment segment holding its id (own bytes and sha256, the same decode work as the
pool photo; encoding 118k photos would take half an hour here).

Then, with the same worker count, after ``sync`` and with a warm page cache:

    plain    ThreadPoolExecutor(workers): PIL ``Image.open(path).convert("RGB")`` of every file (what a
             loader does), run before and after the pipeline; the faster of the two is used (conservative)
    ingest   sdsclip.ingest.ingest_coco in a child process (read + sha256 + decode + conversions + tar shards +
             manifest): wall time and the child's peak RSS
    validate sdsclip.validate.validate_manifest in a child process (Great Expectations suite + Data Docs): wall
             time with and without the one-off ``import great_expectations`` (a fixed cost per process, not per
             image), peak RSS, Data Docs size

and prints images/s and the ratios (plain-decode time / ingest(+validate) time; target >= 0.8).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import platform
import resource
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

SRC = Path(__file__).resolve().parents[1] / "src"
COCO_TRAIN2017 = {"images": 118_287, "captions": 591_753}
# (width, height, weight): an approximation of MS-COCO train2017's most common image sizes.
SIZES = [
    (640, 480, 32),
    (640, 427, 20),
    (480, 640, 10),
    (640, 426, 7),
    (640, 428, 5),
    (427, 640, 5),
    (640, 425, 3),
    (500, 375, 3),
    (640, 360, 3),
    (612, 612, 2),
    (640, 640, 2),
    (375, 500, 2),
    (640, 512, 2),
    (640, 429, 2),
    (424, 640, 2),
]
POOL = 64


def _photo(i: int, width: int, height: int, grey: bool) -> bytes:
    """A photo-like JPEG: smooth random colour field (upscaled) + fine noise, ~quality 90 like COCO."""
    rng = np.random.default_rng(i)
    coarse = Image.fromarray(rng.integers(0, 256, (height // 32 + 1, width // 32 + 1, 3), dtype=np.uint8))
    field = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    noisy = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
    im = Image.fromarray(noisy)
    if grey:
        im = im.convert("L")
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _with_comment(jpeg: bytes, text: str) -> bytes:
    """The JPEG with a COM segment right after SOI: other bytes, the same pixels."""
    body = text.encode()
    return jpeg[:2] + b"\xff\xfe" + (len(body) + 2).to_bytes(2, "big") + body + jpeg[2:]


def _captions(rng: np.random.Generator, n: int) -> list[str]:
    words = [
        "a",
        "man",
        "woman",
        "dog",
        "cat",
        "red",
        "blue",
        "small",
        "large",
        "riding",
        "sitting",
        "on",
        "next",
        "to",
        "the",
        "table",
        "street",
        "bus",
        "train",
        "plate",
        "of",
        "food",
        "with",
        "two",
        "people",
        "field",
    ]
    return [" ".join(rng.choice(words, size=int(rng.integers(7, 14)))) for _ in range(n)]


def generate(root: Path, n: int, grey_fraction: float, captions: int, workers: int, coco_spread: bool) -> Path:
    marker = root / f"generated-{n}-{captions}-{grey_fraction}-{'coco' if coco_spread else '640x480'}.json"
    if marker.is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    img_dir = root / "images" / "train2017"
    img_dir.mkdir(parents=True)
    (root / "annotations").mkdir()
    grey_every = int(round(1 / grey_fraction)) if grey_fraction > 0 else 0
    rng = np.random.default_rng(0)
    if coco_spread:
        weights = np.array([w for *_, w in SIZES], dtype=float)
        size_of = rng.choice(len(SIZES), size=n, p=weights / weights.sum())
        with ThreadPoolExecutor(workers) as pool:
            photos = list(
                pool.map(lambda j: _photo(j, *SIZES[j // POOL][:2], grey=j % POOL == 0), range(len(SIZES) * POOL))
            )
    t0 = time.perf_counter()

    def one(i: int) -> dict:
        image_id = 1000 + i
        name = f"{image_id:012d}.jpg"
        if coco_spread:
            s = int(size_of[i])
            width, height = SIZES[s][:2]
            data = _with_comment(photos[s * POOL + i % POOL], f"sdsclip benchmark image {image_id}")
        else:
            width, height = 640, 480
            data = _photo(i, width, height, bool(grey_every) and i % grey_every == 0)
        (img_dir / name).write_bytes(data)
        return {"id": image_id, "file_name": name, "width": width, "height": height}

    with ThreadPoolExecutor(workers) as pool:
        images = list(pool.map(one, range(n), chunksize=64))
    per_image = np.full(n, captions // n)
    per_image[rng.choice(n, size=captions - int(per_image.sum()), replace=False)] += 1  # a few images get 6 or 7
    texts = iter(_captions(rng, captions))
    anns, ann_id = [], 1
    for img, k in zip(images, per_image):
        for _ in range(int(k)):
            anns.append({"id": ann_id, "image_id": img["id"], "caption": next(texts)})
            ann_id += 1
    (root / "annotations" / "captions_train2017.json").write_text(
        json.dumps({"info": {}, "licenses": [], "images": images, "annotations": anns})
    )
    marker.write_text(json.dumps({"seconds": round(time.perf_counter() - t0, 1)}))
    return root


def plain_decode(paths: list[Path], workers: int) -> float:
    def decode(p: Path) -> tuple[int, int]:
        with Image.open(p) as im:
            return im.convert("RGB").size

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(decode, paths, chunksize=16):
            pass
    return time.perf_counter() - t0


def _peak_rss_mib() -> float:
    """This process's own peak RSS. Not ru_maxrss: Linux carries the high-water mark across fork + exec, so a
    spawned child would report the parent's peak when that is higher (it was, at COCO size: 311 vs 127 MiB)."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _ingest_child(coco: str, out: str, workers: int, shard_size: int) -> dict:
    sys.path.insert(0, str(SRC))
    from sdsclip.config import IngestConfig
    from sdsclip.ingest import ingest_coco

    t0 = time.perf_counter()
    s = ingest_coco(
        f"{coco}/annotations/captions_train2017.json",
        f"{coco}/images/train2017",
        out,
        IngestConfig(workers=workers, shard_size=shard_size, resume=False),
    )
    return {"seconds": time.perf_counter() - t0, "peak_rss_mib": _peak_rss_mib(), "summary": s}


def _validate_child(manifest: str, out: str) -> dict:
    sys.path.insert(0, str(SRC))
    t0 = time.perf_counter()
    import great_expectations  # noqa: F401 - the one-off import, timed on its own

    t_import = time.perf_counter() - t0
    from sdsclip.config import ValidateConfig
    from sdsclip.validate import validate_manifest

    t0 = time.perf_counter()
    v = validate_manifest(manifest, out, ValidateConfig())
    return {
        "seconds": time.perf_counter() - t0,
        "gx_import_s": t_import,
        "peak_rss_mib": _peak_rss_mib(),
        "passed": v["passed"],
        "rows": v["rows_in"],
    }


def _in_child(fn, *args):
    """fn(*args) in a fresh interpreter (its own peak RSS, its own imports, as a pipeline stage runs)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--captions", type=int, default=None, help="default: 5 per image")
    ap.add_argument(
        "--coco-train2017",
        action="store_true",
        help=f"{COCO_TRAIN2017['images']:,} images, {COCO_TRAIN2017['captions']:,} captions, COCO's sizes",
    )
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--grey-fraction", type=float, default=0.01)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/sdsclip-bench-ingest"))
    ap.add_argument("--keep-shards", action="store_true", help="leave the shards in --dir (default: removed)")
    args = ap.parse_args(argv)
    if args.coco_train2017:
        args.images, args.captions = COCO_TRAIN2017["images"], COCO_TRAIN2017["captions"]
    captions = args.captions or 5 * args.images

    tag = "coco-train2017" if args.coco_train2017 else f"coco-{args.images}"
    coco = generate(args.dir / tag, args.images, args.grey_fraction, captions, args.workers, args.coco_train2017)
    img_dir = coco / "images" / "train2017"
    paths = sorted(img_dir.iterdir())
    total_bytes = sum(p.stat().st_size for p in paths)
    for p in paths:  # warm the page cache for everyone
        p.read_bytes()

    os.sync()
    plain_1 = plain_decode(paths, args.workers)

    out, val = args.dir / "shards", args.dir / "validated"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(val, ignore_errors=True)
    os.sync()
    ing = _in_child(_ingest_child, str(coco), str(out), args.workers, args.shard_size)
    os.sync()
    val_res = _in_child(_validate_child, str(out / "manifest.csv"), str(val))
    shards_bytes = _tree_bytes(out)
    docs_bytes = _tree_bytes(val / "data_docs")
    if not args.keep_shards:
        shutil.rmtree(out, ignore_errors=True)
    os.sync()
    plain_2 = plain_decode(paths, args.workers)
    t_plain = min(plain_1, plain_2)
    t_ingest, t_import, t_validate = ing["seconds"], val_res["gx_import_s"], val_res["seconds"]

    n = len(paths)
    rate = lambda seconds: n / seconds  # noqa: E731
    s = ing["summary"]
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''} ".strip()
        + f", {os.cpu_count()} CPUs visible, Python {platform.python_version()}, Pillow {Image.__version__}",
        "images": n,
        "captions": s["annotations_in"],
        "sizes": "COCO spread" if args.coco_train2017 else "640x480",
        "mean_kib": round(total_bytes / n / 1024, 1),
        "workers": args.workers,
        "shard_size": args.shard_size,
        "converted": n - s["conversions"].get("none", 0),
        "plain_decode_s": [round(plain_1, 3), round(plain_2, 3)],
        "ingest_s": round(t_ingest, 3),
        "gx_import_s": round(t_import, 3),
        "validate_s": round(t_validate, 3),
        "ingest_peak_rss_mib": round(ing["peak_rss_mib"], 1),
        "validate_peak_rss_mib": round(val_res["peak_rss_mib"], 1),
        "shards_mib": round(shards_bytes / 2**20, 1),
        "data_docs_kib": round(docs_bytes / 1024, 1),
        "plain_img_per_s": round(rate(t_plain), 1),
        "ingest_img_per_s": round(rate(t_ingest), 1),
        "ingest_validate_img_per_s": round(rate(t_ingest + t_import + t_validate), 1),
        "ratio_ingest_only": round(t_plain / t_ingest, 3),
        "ratio": round(t_plain / (t_ingest + t_import + t_validate), 3),
        "ratio_excl_gx_import": round(t_plain / (t_ingest + t_validate), 3),
        "validation_passed": val_res["passed"],
        "validated_rows": val_res["rows"],
    }
    print(json.dumps(result, indent=2))
    print(f"plain decode      {result['plain_img_per_s']:8.1f} img/s")
    print(
        f"ingest            {result['ingest_img_per_s']:8.1f} img/s   ratio {result['ratio_ingest_only']:.3f}   "
        f"peak RSS {result['ingest_peak_rss_mib']:.0f} MiB"
    )
    print(
        f"ingest + validate {result['ingest_validate_img_per_s']:8.1f} img/s   ratio {result['ratio']:.3f} "
        f"(excluding the one-off GX import {t_import:.1f}s: {result['ratio_excl_gx_import']:.3f}; target >= 0.8)   "
        f"validate peak RSS {result['validate_peak_rss_mib']:.0f} MiB, Data Docs {result['data_docs_kib']:.0f} KiB"
    )
    return result


if __name__ == "__main__":
    main()
