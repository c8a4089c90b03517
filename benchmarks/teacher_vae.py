"""Peak memory and time of the teacher's VAE encode (TeacherScorer.latents) at Stable Diffusion 1.5's shape.

An AutoencoderKL with SD-1.5's config (128/256/512/512, 2 layers per block, 512 px; random weights, nothing
downloaded) encodes a batch of 512 px images once per setting (fp32 / bf16 autocast, batch 1 and 2), each in a
fresh subprocess so the peak is its own: CUDA max_memory_allocated on a GPU, else the rise of peak RSS over the
loaded model. batch 2 - batch 1 = per image; that times 128 is what one unchunked call at eval.batch_size
needed, vae_batch_size 8 what it needs now. The bf16 latents are compared with fp32 (relative L2 error).

    flock /tmp/sdsclip-heavy.lock python benchmarks/teacher_vae.py            # CPU: ~2-4 min on 2 cores
    python benchmarks/teacher_vae.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    sample_size=512,
)
GIB = 2**30


def one(device: str, precision: str, batch: int, size: int, out: Path) -> None:
    from diffusers import AutoencoderKL

    from sdsclip.scoring import vae_autocast_dtype

    torch.manual_seed(0)
    vae = AutoencoderKL(**SD15_VAE).to(device).eval().requires_grad_(False)
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).mul(2).sub(1).to(device)
    dtype = vae_autocast_dtype(precision, device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    with torch.no_grad(), torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
        z = vae.encode(x).latent_dist.mean.float()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    torch.save({"peak": peak, "seconds": time.perf_counter() - start, "z": z[:1].cpu()}, out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--one", nargs=3, metavar=("PRECISION", "BATCH", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        one(args.device, args.one[0], int(args.one[1]), args.size, Path(args.one[2]))
        return
    precisions = ["fp32", "bf16"]
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in precisions:
            for batch in (1, 2):
                out = Path(tmp, f"{precision}_{batch}.pt")
                subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--device",
                        args.device,
                        "--size",
                        str(args.size),
                        "--one",
                        precision,
                        str(batch),
                        str(out),
                    ],
                    check=True,
                )
                runs[(precision, batch)] = torch.load(out, weights_only=True)  # tensors + numbers only
    ref = runs[("fp32", 1)]["z"]
    rows = []
    for precision in precisions:
        per_image = runs[(precision, 2)]["peak"] - runs[(precision, 1)]["peak"]
        fixed = runs[(precision, 1)]["peak"] - per_image
        rows.append(
            {
                "precision": precision,
                "peak_batch1_gib": round(runs[(precision, 1)]["peak"] / GIB, 3),
                "per_image_gib": round(per_image / GIB, 3),
                "est_batch128_gib": round((fixed + 128 * per_image) / GIB, 1),
                "est_batch8_gib": round((fixed + 8 * per_image) / GIB, 2),
                "seconds_batch2": round(runs[(precision, 2)]["seconds"], 2),
                "rel_l2_vs_fp32": float((runs[(precision, 1)]["z"] - ref).norm() / ref.norm()),
            }
        )
    print(json.dumps({"device": args.device, "size": args.size, "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
