"""Ingest + validate throughput versus a plain decode of the same files (the issue's benchmark; not a test).

    .venv/bin/python benchmarks/ingest.py [--images 3000] [--size 640x480] [--workers 2] [--dir DIR]

Generates (once, cached in --dir) a COCO-format split of photo-like JPEGs (``--grey-fraction`` of them
greyscale, as ~1-2% of real COCO is: those are converted to RGB and re-encoded by ingest, an honest extra cost),
then measures in ONE process, with the same worker count and a warm page cache:

    plain    ThreadPoolExecutor(workers): PIL ``Image.open(path).convert("RGB")`` of every file
    ingest   sdsclip.ingest.ingest_coco (read + sha256 + full decode + conversion + tar shards + manifest)
    validate sdsclip.validate.validate_manifest (Great Expectations suite + Data Docs), reported with and
             without the one-off ``import great_expectations`` (a fixed cost per process, not per image)

and prints images/s for each and the ratios (ingest+validate throughput / plain-decode throughput; target
>= 0.8). The plain decode runs before and after the pipeline; the faster of the two is used (conservative).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image


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


def generate(root: Path, n: int, width: int, height: int, grey_fraction: float, captions: int, workers: int) -> Path:
    marker = root / f"generated-{n}-{width}x{height}-{grey_fraction}-{captions}.json"
    if marker.is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    img_dir = root / "images" / "train2017"
    img_dir.mkdir(parents=True)
    (root / "annotations").mkdir()
    grey_every = int(round(1 / grey_fraction)) if grey_fraction > 0 else 0

    def one(i: int) -> dict:
        image_id = 1000 + i
        name = f"{image_id:012d}.jpg"
        (img_dir / name).write_bytes(_photo(i, width, height, bool(grey_every) and i % grey_every == 0))
        return {"id": image_id, "file_name": name, "width": width, "height": height}

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        images = list(pool.map(one, range(n)))
    anns = [{"id": img["id"] * 10 + k, "image_id": img["id"],
             "caption": f"a photo number {img['id']} with caption variant {k}"} for img in images
            for k in range(captions)]
    (root / "annotations" / "captions_train2017.json").write_text(
        json.dumps({"info": {}, "licenses": [], "images": images, "annotations": anns}))
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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--size", default="640x480", help="WIDTHxHEIGHT (COCO images are ~640x480)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--captions", type=int, default=5)
    ap.add_argument("--grey-fraction", type=float, default=0.01)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/sdsclip-bench-ingest"))
    args = ap.parse_args(argv)
    width, height = (int(x) for x in args.size.lower().split("x"))

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from sdsclip.config import IngestConfig, ValidateConfig
    from sdsclip.ingest import ingest_coco

    coco = generate(args.dir / "coco", args.images, width, height, args.grey_fraction, args.captions, args.workers)
    img_dir = coco / "images" / "train2017"
    paths = sorted(img_dir.iterdir())
    total_bytes = sum(p.stat().st_size for p in paths)
    for p in paths:  # warm the page cache for everyone
        p.read_bytes()

    plain_1 = plain_decode(paths, args.workers)

    out, val = args.dir / "shards", args.dir / "validated"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(val, ignore_errors=True)
    t0 = time.perf_counter()
    s = ingest_coco(coco / "annotations" / "captions_train2017.json", img_dir, out,
                    IngestConfig(workers=args.workers, shard_size=args.shard_size, resume=False))
    t_ingest = time.perf_counter() - t0
    t0 = time.perf_counter()
    import great_expectations  # noqa: F401 - the one-off import, timed on its own

    t_import = time.perf_counter() - t0
    from sdsclip.validate import validate_manifest

    t0 = time.perf_counter()
    v = validate_manifest(out / "manifest.csv", val, ValidateConfig())
    t_validate = time.perf_counter() - t0

    plain_2 = plain_decode(paths, args.workers)
    t_plain = min(plain_1, plain_2)

    n = len(paths)
    rate = lambda seconds: n / seconds  # noqa: E731
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''} ".strip()
                   + f", {os.cpu_count()} CPUs visible, Python {platform.python_version()}, Pillow {Image.__version__}",
        "images": n, "size": f"{width}x{height}", "mean_kib": round(total_bytes / n / 1024, 1),
        "captions": s["annotations_in"], "workers": args.workers, "converted": n - s["conversions"].get("none", 0),
        "plain_decode_s": [round(plain_1, 3), round(plain_2, 3)],
        "ingest_s": round(t_ingest, 3), "gx_import_s": round(t_import, 3), "validate_s": round(t_validate, 3),
        "plain_img_per_s": round(rate(t_plain), 1),
        "ingest_img_per_s": round(rate(t_ingest), 1),
        "ingest_validate_img_per_s": round(rate(t_ingest + t_import + t_validate), 1),
        "ingest_validate_img_per_s_excl_gx_import": round(rate(t_ingest + t_validate), 1),
        "ratio_ingest_only": round(t_plain / t_ingest, 3),
        "ratio": round(t_plain / (t_ingest + t_import + t_validate), 3),
        "ratio_excl_gx_import": round(t_plain / (t_ingest + t_validate), 3),
        "validation_passed": v["passed"],
    }
    print(json.dumps(result, indent=2))
    print(f"plain decode      {result['plain_img_per_s']:8.1f} img/s")
    print(f"ingest            {result['ingest_img_per_s']:8.1f} img/s   ratio {result['ratio_ingest_only']:.3f}")
    print(f"ingest + validate {result['ingest_validate_img_per_s']:8.1f} img/s   ratio {result['ratio']:.3f} "
          f"(excluding the one-off GX import {t_import:.1f}s: {result['ratio_excl_gx_import']:.3f}; target >= 0.8)")
    return result


if __name__ == "__main__":
    main()
