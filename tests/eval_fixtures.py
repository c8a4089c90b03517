"""Shared fixtures for the evaluation tests: a tiny synthetic world and deterministic fake scorers."""

import hashlib
from pathlib import Path

import torch

from sdsclip.config import WorldConfig
from sdsclip.synth import generate_world

TINY_WORLD = dict(
    image_size=32,
    pretrain_images=1,
    train_images=1,
    winoground_items=6,
    aro_relation_items=12,
    aro_attribution_items=12,
    coco_order_images=3,
    zeroshot_per_class=2,
)


def tiny_world(root: Path, seed: int = 0, **overrides) -> Path:
    generate_world(WorldConfig(**{**TINY_WORLD, **overrides}), Path(root), seed)
    return Path(root)


def hash_score(image, caption: str) -> float:
    """A deterministic 'similarity' of an image and a caption, independent of batching and order."""
    digest = hashlib.sha256(image.tobytes() + b"|" + caption.encode()).digest()
    return int.from_bytes(digest[:4], "little") / 2**32


class HashScorer:
    """Scores by hash_score; records every call so tests can check batching."""

    name = "hash"

    def __init__(self):
        self.calls = []

    def score(self, images, captions, pairs):
        self.calls.append((len(images), len(captions), len(pairs)))
        return torch.tensor([hash_score(images[i], captions[c]) for i, c in pairs], dtype=torch.float64)


class ConstantScorer:
    """Every pair scores the same: every comparison is a tie."""

    name = "constant"

    def score(self, images, captions, pairs):
        return torch.full((len(pairs),), 0.5, dtype=torch.float64)
