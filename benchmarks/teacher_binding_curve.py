"""Learning curve of the tiny teacher's binding: pretrain it and run `sdsclip diagnose teacher` every K steps.

Used to choose the science profile's teacher (docs/science.md). Same loop as
``sdsclip.pretrain.pretrain_teacher`` (same data stream and ``teacher_pretrain_loss``), plus a diagnostic on the
first ``--items`` Winoground-format items at every ``--every`` steps; rows go to ``--out`` (JSON) as they come.

    OMP_NUM_THREADS=1 python benchmarks/teacher_binding_curve.py --shards data/shards --validated data/validated \
        --winoground data/world/winoground --steps 1500 --every 250 --profile science --out curve.json
    # one knob changed: --set teacher.tiny.pooled_conditioning=false

OMP_NUM_THREADS=1 matters on a shared 2-core machine: with two threads a UNet step was ~5x slower under load.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml


def _set(raw: dict, dotted: str) -> None:
    key, _, value = dotted.partition("=")
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = yaml.safe_load(value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--profile", default=None, help="profile applied over --params (e.g. science)")
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. teacher.tiny.unshuffle_factor=4"
    )
    ap.add_argument("--shards", type=Path, default=Path("data/shards"))
    ap.add_argument("--validated", type=Path, default=Path("data/validated"))
    ap.add_argument("--winoground", type=Path, default=Path("data/world/winoground"))
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--every", type=int, default=250)
    ap.add_argument("--items", type=int, default=100)
    ap.add_argument("--out", type=Path, default=Path("teacher_binding_curve.json"))
    args = ap.parse_args()

    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    from sdsclip.config import apply_profile, params_from_dict
    from sdsclip.diagnose import teacher_binding
    from sdsclip.models.teacher import build_tiny_teacher, caption_vocabulary, save_teacher
    from sdsclip.pretrain import (
        accepted_captions,
        pretrain_loader,
        pretrain_optimizer,
        teacher_pretrain_loss,
        teacher_transform,
    )

    raw = yaml.safe_load(args.params.read_text()) or {}
    if args.profile:  # merged here, so --set and --steps win over the profile's own keys
        raw, _ = apply_profile({**raw, "profile": args.profile})
        raw.pop("profile", None)
    for item in args.set:
        _set(raw, item)
    _set(raw, f"teacher.pretrain.steps={args.steps}")
    params = params_from_dict(raw, str(args.params))
    cfg, opt = params.teacher, params.teacher.pretrain
    split = params.data.pretrain_split
    shards, accepted = args.shards / split, args.validated / split / "accepted.csv"
    set_seed(params.seed)
    teacher = build_tiny_teacher(cfg, caption_vocabulary(accepted_captions(accepted)))
    modules = teacher.trainable_modules()
    optimizer = pretrain_optimizer(list(modules.parameters()), opt)
    lr_sched = get_scheduler("cosine", optimizer, num_warmup_steps=opt.warmup_steps, num_training_steps=opt.steps)
    batches = pretrain_loader(
        params, shards, accepted, teacher_transform(cfg.image_size), opt.batch_size, params.seed, opt.batching
    )
    gen = torch.Generator().manual_seed(params.seed)
    n_t = teacher.scheduler.config.num_train_timesteps
    lo, hi = cfg.pretrain_t_min, min(cfg.pretrain_t_max or n_t, n_t)
    work = args.out.with_suffix("")
    rows, losses, train_s = [], [], 0.0
    for step in range(1, opt.steps + 1):
        started = time.time()
        modules.train()
        images, captions = next(batches)
        loss, _ = teacher_pretrain_loss(teacher, cfg, images, captions, (lo, hi), gen)
        loss.backward()
        optimizer.step()
        lr_sched.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        train_s += time.time() - started
        if step % args.every and step != opt.steps:
            continue
        modules.eval()
        save_teacher(teacher, work / "teacher", {"steps": step})
        d = teacher_binding(params, work / "teacher", args.winoground, max_items=args.items)
        recent = losses[-args.every :]
        rows.append(
            {
                "step": step,
                "train_seconds": round(train_s, 1),
                "loss": sum(recent) / len(recent),
                **{
                    k: d[k]
                    for k in (
                        "text_score",
                        "swap_effect",
                        "swap_effect_sem",
                        "caption_effect",
                        "swap_to_caption_ratio",
                        "swap_positive_fraction",
                    )
                },
                "by_tag": {k: {m: v[m] for m in ("swap_effect", "text_score")} for k, v in d["by_tag"].items()},
                "by_t": {
                    r["t"]: {"text_score": r["text_score"], **{tag: v["text_score"] for tag, v in r["by_tag"].items()}}
                    for r in d["by_t"]
                },
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        args.out.write_text(
            json.dumps({"params": args.params.name, "profile": args.profile, "set": args.set, "rows": rows}, indent=1)
            + "\n"
        )


if __name__ == "__main__":
    main()
