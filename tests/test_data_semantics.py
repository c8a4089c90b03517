"""What the training reader's epochs and batches mean: train.captions (all | one_per_image), no two captions of
one image in a global batch, and DataLoader workers that change nothing but speed."""

from __future__ import annotations

import csv
import io
import json
from itertools import islice

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from tiny_params import ROOT

from sdsclip.config import IngestConfig, params_from_dict
from sdsclip.data import (
    DataError,
    PairLoader,
    bag_key,
    count_dataset,
    count_pairs,
    distinct_batches,
    image_and_bag_keys,
    pair_loader,
)
from sdsclip.ingest import ingest_coco

N_IMAGES, CAPTIONS, SIDE = 40, 5, 8
NO_CAPTION = 40  # this image's captions are all rejected: it is no pair in either mode
ONE_CAPTION = 39  # only one accepted caption: one_per_image must always draw it


def _value(image_id: int) -> int:
    return 5 + 6 * image_id  # one solid grey level per image: a tensor says which image it is


def _image_of(caption: str) -> int:
    return int(caption.split()[1])


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> dict:
    """40 images x 5 captions (PNG and JPEG) through the real ingest, all accepted but image 40's captions and
    four of image 39's."""
    root = tmp_path_factory.mktemp("semantics")
    img_dir = root / "images"
    img_dir.mkdir()
    images, anns = [], []
    for i in range(1, N_IMAGES + 1):
        v = _value(i)
        fmt = "JPEG" if i % 2 else "PNG"
        name = f"{i:012d}.{'jpg' if fmt == 'JPEG' else 'png'}"
        buf = io.BytesIO()
        Image.new("RGB", (SIDE, SIDE), (v, v, v)).save(buf, format=fmt, **({"quality": 100} if fmt == "JPEG" else {}))
        (img_dir / name).write_bytes(buf.getvalue())
        images.append({"id": i, "file_name": name, "width": SIDE, "height": SIDE})
        anns += [{"id": i * 10 + k, "image_id": i, "caption": f"image {i} caption {k}"} for k in range(CAPTIONS)]
    ann = root / "captions.json"
    ann.write_text(json.dumps({"info": {}, "licenses": [], "images": images, "annotations": anns}))
    shards = root / "shards"
    ingest_coco(ann, img_dir, shards, IngestConfig(shard_size=7, workers=1))
    with (shards / "manifest.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    rows = [
        r
        for r in rows
        if int(r["image_id"]) != NO_CAPTION and (int(r["image_id"]) != ONE_CAPTION or r["annotation_id"].endswith("2"))
    ]
    accepted = root / "accepted.csv"
    with accepted.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return {"shards": shards, "accepted": accepted, "captions": {r["caption"] for r in rows}}


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def _loader(ds: dict, batch_size: int = 8, seed: int = 1, **kw) -> PairLoader:
    return pair_loader(
        ds["shards"],
        ds["accepted"],
        to_tensor,
        batch_size=batch_size,
        seed=seed,
        shuffle_buffer=kw.pop("shuffle_buffer", 60),
        **kw,
    )


def _check_pairing(images: torch.Tensor, captions: list[str]) -> None:
    for img, cap in zip(images, captions):
        assert abs(img.mean().item() * 255 - _value(_image_of(cap))) < 3, cap  # the caption's own image


# ------------------------------------------------------------------------------- train.captions


def test_one_per_image_epoch_holds_each_image_once_with_a_drawn_accepted_caption(coco):
    images_with_pairs = N_IMAGES - 1
    assert count_dataset(coco["shards"], coco["accepted"]).images == images_with_pairs
    assert count_pairs(coco["shards"], coco["accepted"], "one_per_image") == images_with_pairs
    assert count_pairs(coco["shards"], coco["accepted"]) == len(coco["captions"]) == 38 * CAPTIONS + 1
    loader = _loader(coco, batch_size=6, captions="one_per_image")
    assert loader.n_pairs == images_with_pairs and loader.batches_per_epoch == images_with_pairs // 6 == 6
    stream = list(islice(loader.batches(), 6 * 6))  # six epochs
    assert [(e, i) for e, i, _ in stream] == [(e, i) for e in range(6) for i in range(6)]
    draws = []
    for epoch in range(6):
        caps = [c for _, _, (_, cs) in stream[epoch * 6 : (epoch + 1) * 6] for c in cs]
        for _, _, (imgs, cs) in stream[epoch * 6 : (epoch + 1) * 6]:
            _check_pairing(imgs, cs)
        ids = [_image_of(c) for c in caps]
        assert len(ids) == len(set(ids)) == 36 and NO_CAPTION not in ids  # each image at most once (3 dropped)
        assert set(caps) <= coco["captions"]  # only accepted captions; image 39 only ever its one
        draws.append({_image_of(c): c for c in caps})
        assert all(c == "image 39 caption 2" for c in caps if _image_of(c) == ONE_CAPTION)
    # the caption of an image is drawn afresh each epoch: some image shows several of its captions
    per_image = {i: {d[i] for d in draws if i in d} for i in range(1, 39)}
    assert max(len(c) for c in per_image.values()) >= 3
    again = list(islice(_loader(coco, batch_size=6, captions="one_per_image").batches(), 12))
    assert [b[1] for _, _, b in again] == [b[1] for _, _, b in stream[:12]]  # seeded by (seed, epoch)


def test_one_per_image_resumes_and_splits_over_ranks_exactly(coco):
    full = list(islice(_loader(coco, batch_size=6, captions="one_per_image").batches(), 12))
    resumed = list(islice(_loader(coco, batch_size=6, captions="one_per_image").batches(1, 2), 4))
    assert [(e, i) for e, i, _ in resumed] == [(1, 2), (1, 3), (1, 4), (1, 5)]
    _same(resumed, full[8:12])
    halves = [
        list(islice(_loader(coco, batch_size=6, captions="one_per_image", rank=r, world_size=2).batches(), 9))
        for r in (0, 1)
    ]
    for (_, _, (img, cap)), (_, _, (i0, c0)), (_, _, (i1, c1)) in zip(full, *halves):
        assert cap == c0 + c1 and torch.equal(img, torch.cat([i0, i1]))


def test_total_steps_from_epochs_follow_the_captions_mode(coco, tmp_path):
    from train_helpers import make_models

    import sdsclip.train as train_mod

    student, teacher = make_models(tmp_path)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert raw["train"]["captions"] == "all" and raw["train"]["loader_workers"] == 0  # the demo's meaning

    def plan(**train):
        run = {
            **raw,
            "train": {**raw["train"], "steps": None, "epochs": 5, "batch_size": 8, "checkpoint_every": 0, **train},
        }
        return train_mod.preflight(
            params_from_dict(run),
            student,
            teacher,
            coco["shards"],
            coco["accepted"],
            False,
            False,
            None,
            tmp_path / "out",
        )

    assert (plan().n_pairs, plan().total_steps) == (191, 5 * (191 // 8))
    assert (plan(captions="one_per_image").n_pairs, plan(captions="one_per_image").total_steps) == (39, 5 * (39 // 8))
    with pytest.raises(DataError, match=r"only 39 images per epoch, fewer than one batch of 40 \(train\.batch_size"):
        plan(captions="one_per_image", batch_size=40)
    with pytest.raises(
        DataError,
        match=r"only 39 images, fewer than one batch of 40 \(train\.batch_size\): a batch "
        r"never holds two captions of one image",
    ):
        plan(batch_size=40)  # 191 pairs, but a batch of 40 distinct images cannot be formed
    raw["profile"] = "paper"
    assert params_from_dict(raw).train.captions == "one_per_image"  # the paper's ~118k pairs: one per image


# ------------------------------------------------------------------ one image per global batch


def test_no_global_batch_holds_two_captions_of_one_image(coco, monkeypatch):
    loader = _loader(coco, batch_size=16)
    assert loader.batches_per_epoch == 191 // 16 == 11
    stream = list(islice(loader.batches(), 3 * 11))
    assert [(e, i) for e, i, _ in stream] == [(e, i) for e in range(3) for i in range(11)]  # no batch lost
    for epoch in range(3):
        caps = [c for _, _, (_, cs) in stream[epoch * 11 : (epoch + 1) * 11] for c in cs]
        assert len(caps) == len(set(caps)) == 176  # every pair at most once per epoch
    for _, _, (images, captions) in stream:
        _check_pairing(images, captions)
        assert len({_image_of(c) for c in captions}) == 16, captions
    # DDP: the ranks' slices together are the same image-distinct global batch
    halves = [list(islice(_loader(coco, batch_size=16, rank=r, world_size=2).batches(), 12)) for r in (0, 1)]
    for (_, _, (_, cap)), (_, _, (_, c0)), (_, _, (_, c1)) in zip(stream, *halves):
        assert cap == c0 + c1
    resumed = list(islice(_loader(coco, batch_size=16).batches(1, 9), 4))
    assert [b[1] for _, _, b in resumed] == [b[1] for _, _, b in stream[20:24]]
    # Not a property of the shuffle: without the reorder, the same stream's batches do hold such pairs.
    monkeypatch.setattr(PairLoader, "_keys_of", lambda self: (None, ""))
    plain = [cs for _, cs in islice(iter(_loader(coco, batch_size=16)), 11)]
    assert any(len({_image_of(c) for c in cs}) < 16 for cs in plain)


def test_bag_distinct_batches_are_also_image_distinct():
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "pink", "grey"]
    samples = [
        {
            "__key__": f"{i}/{k}",
            "__url__": "shard-0.tar",
            "__image__": str(i),
            "__caption__": f"a {colours[(i + k) % 8]} circle left of a {colours[(i * 3 + k + 1) % 8]} square",
        }
        for i in range(40)
        for k in range(5)
    ]
    out = list(distinct_batches(iter(samples), 8, 200, image_and_bag_keys, "{n}"))
    assert len(out) >= 8 * 15
    for start in range(0, len(out), 8):
        batch = out[start : start + 8]
        assert len({s["__image__"] for s in batch}) == 8 and len({bag_key(s["__caption__"]) for s in batch}) == 8
    assert len({s["__key__"] for s in out}) == len(out)


# --------------------------------------------------------------------------------- loader workers


def _same(a, b) -> None:
    assert [(e, i) for e, i, _ in a] == [(e, i) for e, i, _ in b]
    for (_, _, (ia, ca)), (_, _, (ib, cb)) in zip(a, b):
        assert ca == cb and torch.equal(ia, ib)


@pytest.mark.parametrize("captions", ["all", "one_per_image"])
def test_workers_give_the_single_process_batches_across_epochs_and_resumed(coco, captions):
    kw = {"batch_size": 8, "captions": captions}
    per_epoch = _loader(coco, **kw).batches_per_epoch
    n = per_epoch + 3  # crosses an epoch boundary
    single = list(islice(_loader(coco, **kw).batches(), n))
    assert [(e, i) for e, i, _ in single][per_epoch - 1 : per_epoch + 1] == [(0, per_epoch - 1), (1, 0)]
    _same(list(islice(_loader(coco, num_workers=2, **kw).batches(), n)), single)
    start = per_epoch - 2  # resumed mid-epoch, on an odd batch: the other worker serves the first one
    _same(list(islice(_loader(coco, num_workers=2, **kw).batches(0, start), 5)), single[start : start + 5])
    rank1 = list(islice(_loader(coco, num_workers=2, rank=1, world_size=2, **kw).batches(), 4))
    assert [b[1] for _, _, b in rank1] == [b[1][4:] for _, _, b in single[:4]]


def test_a_data_error_in_a_worker_is_one_line(tmp_path):
    import webdataset as wds

    shards = tmp_path / "shards"
    shards.mkdir()
    with wds.TarWriter(str(shards / "shard-000000.tar")) as tar:  # captions, but the image members are missing
        for i in range(8):
            tar.write(
                {"__key__": f"{i:012d}", "json": json.dumps({"captions": [{"id": i, "caption": "a cat"}]}).encode()}
            )
    accepted = tmp_path / "accepted.csv"
    accepted.write_text("annotation_id,caption\n" + "".join(f"{i},a cat\n" for i in range(8)))
    loader = pair_loader(shards, accepted, to_tensor, batch_size=2, seed=0, num_workers=2)
    with pytest.raises(DataError) as err:
        next(loader.batches())
    assert "shard-000000.tar: sample 0000000000" in str(err.value) and "has no image member" in str(err.value)
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)
