"""A tiny variant of the shipped params.yaml for end-to-end tests (seconds per stage on 2 CPU cores)."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

TINY_OVERRIDES = {
    "device": "cpu",
    "world": {
        "pretrain_images": 160,
        "train_images": 64,
        "winoground_items": 12,
        "aro_relation_items": 8,
        "aro_attribution_items": 8,
        "coco_order_images": 4,
        "zeroshot_per_class": 2,
    },
    "ingest": {"shard_size": 50, "workers": 1},
    "student": {"pretrain": {"steps": 4, "batch_size": 16, "warmup_steps": 1}},
    "teacher": {"pretrain": {"steps": 4, "batch_size": 16, "warmup_steps": 1}},
    "train": {"steps": 3, "batch_size": 8, "warmup_steps": 1},
    "eval": {"teacher_draws": 2, "batch_size": 64, "sugarcrepe_world_items": 10, "aro_attribution_min_count": 2},
}


def merge(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def tiny_params(**extra) -> dict:
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())
    return merge(merge(shipped, TINY_OVERRIDES), extra)
