"""sdsclip.data: the training-side WebDataset reader over accepted image-caption pairs."""

from __future__ import annotations

import csv
import io
import json
from itertools import islice

import numpy as np
import pytest
import torch
from PIL import Image

from sdsclip.config import IngestConfig
from sdsclip.data import DataError, count_pairs, load_accepted_ids, pair_loader
from sdsclip.ingest import ingest_coco

N_IMAGES, CAPTIONS, SIDE = 12, 4, 16


def _value(image_id: int) -> int:
    return 10 + 15 * image_id  # each image is one solid grey level, so a tensor says which image it is


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    """Tiny COCO split (PNG in modes RGB / L / RGBA / P, and JPEG) ingested into 3 shards; every other
    annotation is accepted."""
    root = tmp_path_factory.mktemp("world")
    img_dir = root / "images"
    img_dir.mkdir()
    images, anns = [], []
    for i in range(1, N_IMAGES + 1):
        v = _value(i)
        rgb = Image.new("RGB", (SIDE, SIDE), (v, v, v))
        kind = i % 5
        im, fmt = {
            0: (rgb, "JPEG"),
            1: (rgb, "PNG"),
            2: (rgb.convert("L"), "PNG"),
            3: (rgb.convert("RGBA"), "PNG"),
            4: (rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        }[kind]
        name = f"{i:012d}.{'jpg' if fmt == 'JPEG' else 'png'}"
        buf = io.BytesIO()
        im.save(buf, format=fmt)
        (img_dir / name).write_bytes(buf.getvalue())
        images.append({"id": i, "file_name": name, "width": SIDE, "height": SIDE})
        anns += [{"id": i * 10 + k, "image_id": i, "caption": f"image {i} caption {k}"} for k in range(CAPTIONS)]
    ann = root / "captions.json"
    ann.write_text(json.dumps({"info": {}, "licenses": [], "images": images, "annotations": anns}))
    shards = root / "shards"
    ingest_coco(ann, img_dir, shards, IngestConfig(shard_size=5, workers=1))
    with (shards / "manifest.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    accepted_rows = [r for r in rows if int(r["annotation_id"]) % 2 == 0]
    accepted = root / "accepted.csv"
    with accepted.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(accepted_rows)
    return {
        "shards": shards,
        "accepted": accepted,
        "root": root,
        "columns": list(rows[0]),
        "captions": {r["caption"] for r in accepted_rows},
        "all_captions": {r["caption"] for r in rows},
    }


def to_tensor(image: Image.Image) -> torch.Tensor:
    assert image.mode == "RGB"
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def _loader(ds: dict, seed: int = 0, batch_size: int = 4, **kw):
    return pair_loader(
        ds["shards"],
        ds["accepted"],
        to_tensor,
        batch_size=batch_size,
        seed=seed,
        shuffle_buffer=kw.pop("shuffle_buffer", 50),
        **kw,
    )


def test_batches_shapes_and_image_caption_pairing(dataset):
    batches = list(islice(iter(_loader(dataset, batch_size=4)), 12))  # 48 pairs = two epochs
    for images, captions in batches:
        assert isinstance(images, torch.Tensor) and images.shape == (4, 3, SIDE, SIDE)
        assert images.dtype == torch.float32
        assert isinstance(captions, list) and len(captions) == 4 and all(isinstance(c, str) for c in captions)
        for img, cap in zip(images, captions):
            image_id = int(cap.split()[1])
            assert abs(img.mean().item() * 255 - _value(image_id)) < 3, cap  # the caption's own image


def test_only_accepted_captions_and_all_of_them(dataset):
    n = count_pairs(dataset["shards"], dataset["accepted"])
    assert n == len(dataset["captions"]) == N_IMAGES * CAPTIONS // 2
    assert count_pairs(dataset["shards"]) == N_IMAGES * CAPTIONS
    seen = set()
    for _, captions in islice(iter(_loader(dataset, batch_size=4)), 3 * n // 4):  # three epochs
        seen.update(captions)
    assert seen == dataset["captions"]
    assert not seen & (dataset["all_captions"] - dataset["captions"])


def test_epoch_is_a_permutation_and_partial_batches_dropped(dataset):
    n = len(dataset["captions"])  # 24 pairs, batch 5 -> 4 full batches per epoch, 4 pairs dropped
    batches = list(islice(iter(_loader(dataset, batch_size=5)), 8))
    first, second = [c for _, cs in batches[:4] for c in cs], [c for _, cs in batches[4:] for c in cs]
    assert len(set(first)) == len(first) == 20 and len(set(second)) == 20 and n == 24
    assert first != second  # epoch 2 reshuffled with its own seed


def test_same_seed_same_batches_different_seed_different(dataset):
    def first(seed, k=4, **kw):
        return list(islice(iter(_loader(dataset, seed=seed, **kw)), k))

    a, b, c = first(7), first(7), first(8)
    assert [cs for _, cs in a] == [cs for _, cs in b]
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(a, b))
    assert [cs for _, cs in a] != [cs for _, cs in c]
    loader = _loader(dataset, seed=7)
    assert [cs for _, cs in islice(iter(loader), 4)] == [cs for _, cs in islice(iter(loader), 4)]


def test_worker_processes_are_deterministic(dataset):
    def first(seed):
        return [cs for _, cs in islice(iter(_loader(dataset, seed=seed, num_workers=2)), 6)]

    a = first(3)
    assert a == first(3)
    assert {c for cs in a for c in cs} <= dataset["captions"]


def test_empty_dataset_errors_name_the_directory(dataset, tmp_path):
    empty = tmp_path / "accepted.csv"
    empty.write_text(",".join(dataset["columns"]) + "\n")
    assert load_accepted_ids(empty) == set()
    with pytest.raises(DataError, match="no accepted image-caption pairs") as err:
        pair_loader(dataset["shards"], empty, to_tensor, batch_size=2, seed=0)
    assert str(dataset["shards"]) in str(err.value)

    no_shards = tmp_path / "no_shards"
    no_shards.mkdir()
    with pytest.raises(DataError, match="no shard-") as err:
        pair_loader(no_shards, dataset["accepted"], to_tensor, batch_size=2, seed=0)
    assert str(no_shards) in str(err.value)

    with pytest.raises(DataError, match="fewer than one batch"):
        pair_loader(dataset["shards"], dataset["accepted"], to_tensor, batch_size=1000, seed=0)
    with pytest.raises(DataError, match="not found"):
        load_accepted_ids(tmp_path / "missing.csv")
