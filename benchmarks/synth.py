"""World rendering throughput (a benchmark, not a timed test): images/s of ``generate_world`` versus a bare PIL
draw-and-PNG-encode loop of the same canvas size, in one run.

    .venv/bin/python benchmarks/synth.py [--images 1000] [--size 32]

The ratio (generate_world / bare PIL) says how much the generator adds beyond drawing and encoding pixels
(captions, annotation files, Winoground / ARO / zero-shot sets of minimal size).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw

from sdsclip.config import WorldConfig
from sdsclip.synth import generate_world


def bare_pil(n: int, size: int, out: Path) -> None:
    for i in range(n):
        im = Image.new("RGB", (size, size))
        ImageDraw.Draw(im).ellipse((2, 2, size // 3, size // 3), fill=(220, 30, 30))
        ImageDraw.Draw(im).rectangle((size // 2, size // 2, size - 3, size - 3), fill=(30, 30, 220))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        (out / f"{i}.png").write_bytes(buf.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--size", type=int, default=32)
    args = ap.parse_args()
    world = WorldConfig(
        image_size=args.size,
        pretrain_images=args.images,
        train_images=1,
        winoground_items=1,
        aro_relation_items=1,
        aro_attribution_items=1,
        coco_order_images=1,
        zeroshot_per_class=1,
    )
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        bare_pil(args.images, args.size, Path(tmp))
        t_bare = time.perf_counter() - t0
        t0 = time.perf_counter()
        generate_world(world, Path(tmp) / "world", 0)
        t_gen = time.perf_counter() - t0
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; {args.images} images of {args.size}px")
    print(f"bare PIL draw + PNG   : {args.images / t_bare:8.0f} images/s")
    print(f"generate_world        : {args.images / t_gen:8.0f} images/s")
    print(f"ratio generate / bare : {t_bare / t_gen:.2f} (throughput)")


if __name__ == "__main__":
    main()
