"""sdsclip.ingest: COCO captions -> WebDataset shards + manifest + quarantine, on tiny fixtures built here."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from sdsclip.config import IngestConfig
from sdsclip.ingest import MANIFEST_COLUMNS, QUARANTINE_COLUMNS, IngestError, ingest_coco

N_IMAGES = 12
CAPTIONS = 3


def _image_bytes(i: int, size: int = 32) -> tuple[bytes, str]:
    """Image i: a solid colour; alternating PNG (various modes) and JPEG, real COCO-style names."""
    value = 10 + 20 * i
    kind = i % 4
    if kind == 0:
        im, fmt, ext = Image.new("RGB", (size, size), (value, 255 - value, 7)), "JPEG", "jpg"
    elif kind == 1:
        im, fmt, ext = Image.new("RGB", (size, size + 4), (value, 0, 0)), "PNG", "png"
    elif kind == 2:
        im, fmt, ext = Image.new("L", (size, size), value), "PNG", "png"
    else:
        im, fmt, ext = Image.new("RGBA", (size, size), (value, 3, 4, 200)), "PNG", "png"
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue(), ext


def make_coco(root: Path, n_images: int = N_IMAGES, captions: int = CAPTIONS) -> dict:
    """A tiny MS-COCO captions split: root/annotations/captions_train.json + root/images/train/."""
    img_dir = root / "images" / "train"
    img_dir.mkdir(parents=True)
    (root / "annotations").mkdir()
    images, anns = [], []
    for i in range(1, n_images + 1):
        image_id = 100 + i * 7  # non-contiguous ids, as in COCO
        data, ext = _image_bytes(i)
        name = f"{image_id:012d}.{ext}"
        (img_dir / name).write_bytes(data)
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
        images.append({"id": image_id, "file_name": name, "width": w, "height": h, "license": 1,
                       "flickr_url": "", "coco_url": "", "date_captured": "2013-11-14 16:28:13"})
        for k in range(captions):
            anns.append({"id": image_id * 10 + k, "image_id": image_id, "caption": f"caption {k} of image {image_id}"})
    anns.reverse()  # ingest must sort, not rely on input order
    coco = {"info": {"description": "fixture"}, "licenses": [], "images": images, "annotations": anns}
    ann_path = root / "annotations" / "captions_train.json"
    ann_path.write_text(json.dumps(coco))
    return {"json": ann_path, "images": img_dir, "coco": coco}


def _write_coco(fx: dict) -> None:
    fx["json"].write_text(json.dumps(fx["coco"]))


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _run(fx: dict, out: Path, shard_size: int = 5, workers: int = 2) -> dict:
    return ingest_coco(fx["json"], fx["images"], out, IngestConfig(shard_size=shard_size, workers=workers))


def test_shards_readable_by_webdataset(tmp_path):
    import webdataset as wds

    fx = make_coco(tmp_path / "coco")
    out = tmp_path / "out"
    summary = _run(fx, out, shard_size=5)
    shards = sorted(out.glob("shard-*.tar"))
    assert [p.name for p in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert summary["shards"] == 3

    samples = list(wds.WebDataset([str(p) for p in shards], shardshuffle=False, empty_check=False))
    ids = sorted(img["id"] for img in fx["coco"]["images"])
    assert [s["__key__"] for s in samples] == [f"{i:012d}" for i in ids]
    by_id = {img["id"]: img for img in fx["coco"]["images"]}
    for s in samples:
        meta = json.loads(s["json"])
        img = by_id[meta["image_id"]]
        ext = img["file_name"].rsplit(".", 1)[1]
        assert set(k for k in s if not k.startswith("__")) == {ext, "json"}
        assert s[ext] == (fx["images"] / img["file_name"]).read_bytes()  # original bytes, not re-encoded
        assert meta["file_name"] == img["file_name"]
        assert (meta["width"], meta["height"]) == (img["width"], img["height"])
        want = sorted((a["id"], a["caption"]) for a in fx["coco"]["annotations"] if a["image_id"] == img["id"])
        assert [(c["id"], c["caption"]) for c in meta["captions"]] == want


def test_manifest_rows_and_hashes(tmp_path):
    fx = make_coco(tmp_path / "coco")
    out = tmp_path / "out"
    summary = _run(fx, out)
    rows = _rows(out / "manifest.csv")
    assert list(rows[0]) == MANIFEST_COLUMNS
    assert len(rows) == N_IMAGES * CAPTIONS == summary["annotations_written"]
    assert [int(r["annotation_id"]) for r in rows] == sorted(a["id"] for a in fx["coco"]["annotations"])
    by_id = {img["id"]: img for img in fx["coco"]["images"]}
    modes = set()
    for r in rows:
        img = by_id[int(r["image_id"])]
        data = (fx["images"] / img["file_name"]).read_bytes()
        assert r["sha256"] == hashlib.sha256(data).hexdigest()
        assert int(r["bytes"]) == len(data)
        assert (int(r["width"]), int(r["height"])) == (img["width"], img["height"])
        assert r["key"] == f"{img['id']:012d}"
        assert (out / r["shard"]).is_file()
        assert Path(r["source"]) == fx["images"] / img["file_name"]
        assert r["caption"] == f"caption {int(r['annotation_id']) % 10} of image {img['id']}"
        modes.add(r["mode"])
    assert modes == {"RGB", "L", "RGBA"}
    assert _rows(out / "ingest_quarantine.csv") == []
    assert summary == json.loads((out / "ingest_summary.json").read_text())
    assert summary["images_in"] == summary["images_written"] == N_IMAGES
    assert summary["quarantined"] == {} and summary["images_dropped"] == {}


def test_deterministic_across_runs_and_worker_counts(tmp_path):
    fx = make_coco(tmp_path / "coco")
    a, b = tmp_path / "a", tmp_path / "b"
    _run(fx, a, shard_size=4, workers=1)
    _run(fx, b, shard_size=4, workers=3)
    assert (a / "manifest.csv").read_bytes() == (b / "manifest.csv").read_bytes()
    shards_a = sorted(p.name for p in a.glob("shard-*.tar"))
    assert shards_a == sorted(p.name for p in b.glob("shard-*.tar")) and len(shards_a) == 3
    for name in shards_a:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_rerun_replaces_stale_shards(tmp_path):
    fx = make_coco(tmp_path / "coco")
    out = tmp_path / "out"
    _run(fx, out, shard_size=1)
    assert len(list(out.glob("shard-*.tar"))) == N_IMAGES
    _run(fx, out, shard_size=100)
    assert [p.name for p in out.glob("shard-*.tar")] == ["shard-000000.tar"]


def test_bad_inputs_are_quarantined_and_counts_add_up(tmp_path, monkeypatch):
    fx = make_coco(tmp_path / "coco", n_images=10)
    coco = fx["coco"]
    imgs = {img["id"]: img for img in coco["images"]}
    ids = sorted(imgs)
    path = lambda i: fx["images"] / imgs[i]["file_name"]  # noqa: E731

    path(ids[0]).unlink()                                              # missing_file
    data = path(ids[1]).read_bytes()                                   # ids[1] is a PNG
    path(ids[1]).write_bytes(data[: len(data) // 2])                   # truncated -> undecodable_image
    path(ids[2]).write_bytes(b"")                                      # empty_file
    assert imgs[ids[3]]["file_name"].endswith(".jpg")                 # ids[3] is a JPEG (i % 4 == 0)
    jpg = path(ids[3]).read_bytes()
    path(ids[3]).write_bytes(jpg[: len(jpg) - 40])                     # truncated JPEG -> undecodable_image
    path(ids[4]).write_bytes(b"this is not an image at all" * 10)      # undecodable_image
    big = Image.new("RGB", (64, 64), (1, 2, 3))
    big.save(path(ids[5]), format="PNG")                               # > patched MAX_IMAGE_PIXELS
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 40)
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != ids[6]]  # no_caption
    n_valid_before = len(coco["annotations"])
    coco["annotations"] += [
        {"id": 999001, "image_id": 424242, "caption": "orphan caption"},          # unknown_image_id
        {"id": coco["annotations"][0]["id"], "image_id": ids[7], "caption": "dup"},  # duplicate_annotation_id
        {"id": 999002, "image_id": ids[7], "caption": 12345},                      # bad_caption_type
        {"id": 999003, "image_id": ids[7], "caption": None},                       # bad_caption_type
        {"image_id": ids[7], "caption": "no id"},                                  # bad_annotation_record
    ]
    coco["images"].append({"id": ids[8], "file_name": imgs[ids[8]]["file_name"]})  # duplicate_image_id
    coco["images"].append({"id": 5555, "file_name": "../escape.png"})              # bad_image_record
    _write_coco(fx)

    out = tmp_path / "out"
    s = _run(fx, out, shard_size=3)
    q = _rows(out / "ingest_quarantine.csv")
    assert q and list(q[0]) == QUARANTINE_COLUMNS
    reasons_by_image = {}
    for r in q:
        reasons_by_image.setdefault(r["image_id"], set()).add(r["reason"])
    assert reasons_by_image[str(ids[0])] == {"missing_file"}
    assert reasons_by_image[str(ids[1])] == {"undecodable_image"}
    assert reasons_by_image[str(ids[2])] == {"empty_file"}
    assert reasons_by_image[str(ids[3])] == {"undecodable_image"}
    assert reasons_by_image[str(ids[4])] == {"undecodable_image"}
    assert reasons_by_image[str(ids[5])] == {"decompression_bomb"}
    assert reasons_by_image[str(ids[6])] == {"no_caption"}
    assert reasons_by_image["424242"] == {"unknown_image_id"}
    assert reasons_by_image[str(ids[7])] == {"duplicate_annotation_id", "bad_caption_type", "bad_annotation_record"}
    assert reasons_by_image[str(ids[8])] == {"duplicate_image_id"}
    assert reasons_by_image["5555"] == {"bad_image_record"}
    no_cap = [r for r in q if r["reason"] == "no_caption"]
    assert len(no_cap) == 1 and no_cap[0]["annotation_id"] == "" and no_cap[0]["level"] == "image"
    assert all(r["detail"] and "\n" not in r["detail"] for r in q)

    assert s["quarantined"] == {
        "missing_file": CAPTIONS, "undecodable_image": 3 * CAPTIONS, "empty_file": CAPTIONS,
        "decompression_bomb": CAPTIONS, "no_caption": 1, "unknown_image_id": 1, "duplicate_annotation_id": 1,
        "bad_caption_type": 2, "bad_annotation_record": 1, "duplicate_image_id": 1, "bad_image_record": 1,
    }
    assert s["images_dropped"] == {"missing_file": 1, "undecodable_image": 3, "empty_file": 1,
                                   "decompression_bomb": 1, "no_caption": 1, "duplicate_image_id": 1,
                                   "bad_image_record": 1}
    good_images = ids[7:]  # ids[7], ids[8], ids[9]
    assert s["images_written"] == len(good_images)
    assert s["images_in"] == len(coco["images"]) == s["images_written"] + sum(s["images_dropped"].values())
    assert s["annotations_in"] == len(coco["annotations"]) == n_valid_before + 5
    assert s["annotations_written"] + s["annotations_quarantined"] == s["annotations_in"]
    assert s["annotations_quarantined"] == sum(1 for r in q if r["level"] == "annotation")

    rows = _rows(out / "manifest.csv")
    assert len(rows) == s["annotations_written"] == len(good_images) * CAPTIONS
    assert {int(r["image_id"]) for r in rows} == set(good_images)
    assert "dup" not in {r["caption"] for r in rows}
    assert s == json.loads((out / "ingest_summary.json").read_text())


def test_malformed_json_raises_one_line_error(tmp_path):
    fx = make_coco(tmp_path / "coco")
    fx["json"].write_text('{"images": [1, 2,, "annotations": []}')
    with pytest.raises(IngestError) as err:
        _run(fx, tmp_path / "out")
    msg = str(err.value)
    assert str(fx["json"]) in msg and "not valid JSON" in msg and "line 1" in msg and "\n" not in msg


@pytest.mark.parametrize("drop", ["annotations", "images"])
def test_missing_top_level_key_raises(tmp_path, drop):
    fx = make_coco(tmp_path / "coco")
    del fx["coco"][drop]
    _write_coco(fx)
    with pytest.raises(IngestError) as err:
        _run(fx, tmp_path / "out")
    msg = str(err.value)
    assert str(fx["json"]) in msg and repr(drop) in msg and "missing top-level" in msg and "\n" not in msg


@pytest.mark.parametrize("payload,needle", [("[]", "not an object"), ('{"images": {}, "annotations": []}',
                                                                       "'images' is a JSON dict")])
def test_wrong_types_raise(tmp_path, payload, needle):
    fx = make_coco(tmp_path / "coco")
    fx["json"].write_text(payload)
    with pytest.raises(IngestError, match=needle):
        _run(fx, tmp_path / "out")


def test_missing_inputs_raise(tmp_path):
    fx = make_coco(tmp_path / "coco")
    with pytest.raises(IngestError, match="image folder not found"):
        ingest_coco(fx["json"], tmp_path / "nope", tmp_path / "out", IngestConfig())
    with pytest.raises(IngestError, match="annotations file not found"):
        ingest_coco(tmp_path / "none.json", fx["images"], tmp_path / "out", IngestConfig())
