"""Bag-distinct batches (student.pretrain.batching / train.batching): batches without word-order hard negatives."""

from __future__ import annotations

import csv
import io
import json
from itertools import islice

import pytest
import torch
from PIL import Image

from sdsclip.config import IngestConfig, params_from_dict
from sdsclip.data import DataError, bag_distinct, bag_key, pair_loader
from sdsclip.ingest import ingest_coco

CAPTION = "a red circle to the left of a blue square"


def test_bag_key_collapses_order_and_relation_direction_only():
    swapped = "a blue square to the left of a red circle"  # Winoground object swap
    converse = "a blue square to the right of a red circle"  # the same scene, other words
    attribute_swap = "a blue circle to the left of a red square"
    assert bag_key(CAPTION) == bag_key(swapped) == bag_key(converse) == bag_key(attribute_swap)
    assert bag_key(CAPTION) == ("<horizontal>", "blue", "circle", "red", "square")
    assert bag_key("a red circle above a blue square") != bag_key(CAPTION)  # other axis
    assert bag_key("a red circle and a blue square") != bag_key(CAPTION)  # conjunctive
    assert bag_key("a red circle to the left of a blue triangle") != bag_key(CAPTION)


def _samples(captions):
    return [{"__key__": str(i), "__url__": "shard-0.tar", "__caption__": c} for i, c in enumerate(captions)]


def test_bag_distinct_reorders_into_distinct_full_batches_deterministically():
    bags = [
        "a red circle above a blue square",
        "a red circle and a blue square",
        CAPTION,
        "a green circle below a yellow triangle",
        "a green square and a red circle",
    ]
    # Runs of equal bags: random batches of 4 would hold hard negatives.
    captions = [
        bags[i // 3 % len(bags)] if i % 2 else bags[(i // 3 + 1) % len(bags)].replace("red", "red") for i in range(60)
    ]
    samples = _samples(captions)
    out = list(bag_distinct(iter(samples), batch_size=4, max_pending=40))
    assert len(out) % 4 == 0 and len(out) >= 40
    keys = [s["__key__"] for s in out]
    assert len(set(keys)) == len(keys)  # nothing emitted twice
    for start in range(0, len(out), 4):
        batch = out[start : start + 4]
        assert len({bag_key(s["__caption__"]) for s in batch}) == 4
    assert [s["__key__"] for s in bag_distinct(iter(samples), 4, 40)] == keys
    # random order of the same stream does hold a repeated bag in some batch of 4
    assert any(len({bag_key(s["__caption__"]) for s in samples[i : i + 4]}) < 4 for i in range(0, 60, 4))


def test_bag_distinct_stops_with_a_clear_error_when_bags_are_too_few():
    samples = _samples([CAPTION, "a red circle and a blue square"] * 30)
    with pytest.raises(DataError, match=r"bag_distinct batching: fewer than 4 distinct caption bags"):
        list(bag_distinct(iter(samples), batch_size=4, max_pending=10))


@pytest.fixture(scope="module")
def world_shards(tmp_path_factory):
    """24 images x 2 captions over 6 bags, ingested into WebDataset shards; all accepted."""
    root = tmp_path_factory.mktemp("bags")
    img_dir = root / "images"
    img_dir.mkdir()
    colours = ["red", "green", "blue", "yellow"]
    images, anns = [], []
    for i in range(1, 25):
        name = f"{i:012d}.png"
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (i * 9, 0, 0)).save(buf, format="PNG")
        (img_dir / name).write_bytes(buf.getvalue())
        images.append({"id": i, "file_name": name, "width": 8, "height": 8})
        a, b = colours[i % 3], colours[3]
        rel = ["to the left of", "above"][i % 2]
        anns += [
            {"id": i * 10, "image_id": i, "caption": f"a {a} circle {rel} a {b} square"},
            {"id": i * 10 + 1, "image_id": i, "caption": f"a {b} square {rel} a {a} circle"},
        ]
    ann = root / "captions.json"
    ann.write_text(json.dumps({"info": {}, "licenses": [], "images": images, "annotations": anns}))
    shards = root / "shards"
    ingest_coco(ann, img_dir, shards, IngestConfig(shard_size=8, workers=1))
    with (shards / "manifest.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    accepted = root / "accepted.csv"
    with accepted.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return shards, accepted


def _batch_bags(loader, n):
    return [[bag_key(c) for c in captions] for _, captions in islice(iter(loader), n)]


def test_loader_bag_distinct_batches_hold_no_hard_negatives(world_shards):
    shards, accepted = world_shards
    to_size = lambda im: torch.zeros(1)  # noqa: E731 - images are not under test here
    distinct = pair_loader(shards, accepted, to_size, batch_size=6, seed=3, batching="bag_distinct")
    batches = _batch_bags(distinct, 12)
    assert all(len(set(b)) == 6 for b in batches)
    assert batches == _batch_bags(distinct, 12)  # deterministic for a seed
    plain = pair_loader(shards, accepted, to_size, batch_size=6, seed=3)
    assert any(len(set(b)) < 6 for b in _batch_bags(plain, 12))  # random batches do hold them
    # DDP: each rank's slice of a global bag-distinct batch
    half = [
        pair_loader(shards, accepted, to_size, batch_size=6, seed=3, batching="bag_distinct", rank=r, world_size=2)
        for r in (0, 1)
    ]
    first = [next(iter(h))[1] for h in half]
    assert [bag_key(c) for c in first[0] + first[1]] == batches[0]


def test_batching_is_a_validated_param():
    assert (
        params_from_dict({"student": {"pretrain": {"batching": "bag_distinct"}}}).student.pretrain.batching
        == "bag_distinct"
    )
    from sdsclip.config import ConfigError

    with pytest.raises(ConfigError, match=r"student\.pretrain\.batching: Input should be 'random' or 'bag_distinct'"):
        params_from_dict({"student": {"pretrain": {"batching": "hard"}}})
