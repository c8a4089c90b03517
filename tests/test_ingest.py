"""sdsclip.ingest: COCO captions -> WebDataset shards + manifest + quarantine, on tiny fixtures built here.

Real layouts (2014 / 2017 names, images/{split}/ or {split}/), bad input of every kind (each with its reason
code), image conversions, fsspec URLs (memory://), resumability after an interruption, and the CLI's one-line
errors."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sdsclip.ingest as ingest_mod
from sdsclip.config import IngestConfig
from sdsclip.ingest import (
    ANNOTATION_REASONS,
    IMAGE_REASONS,
    MANIFEST_COLUMNS,
    QUARANTINE_COLUMNS,
    IngestError,
    ingest_coco,
    ingest_split,
)

N_IMAGES = 12
CAPTIONS = 3


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png16_rgb(width: int, height: int, rgb16: tuple[int, int, int]) -> bytes:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one): signature, IHDR, IDAT, IEND."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = b"\x00" + struct.pack(">HHH", *rgb16) * width
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(row * height))
        + chunk(b"IEND", b"")
    )


def _image_bytes(i: int, size: int = 32) -> tuple[bytes, str]:
    """Image i: a solid colour; alternating JPEG / PNG in modes RGB, L, RGBA."""
    value = 10 + 20 * i
    kind = i % 4
    if kind == 0:
        return encode(Image.new("RGB", (size, size), (value, 255 - value, 7)), "JPEG"), "jpg"
    if kind == 1:
        return encode(Image.new("RGB", (size, size + 4), (value, 0, 0)), "PNG"), "png"
    if kind == 2:
        return encode(Image.new("L", (size, size), value), "PNG"), "png"
    return encode(Image.new("RGBA", (size, size), (value, 3, 4, 200)), "PNG"), "png"


def make_coco(
    root: Path,
    n_images: int = N_IMAGES,
    captions: int = CAPTIONS,
    split: str = "train",
    naming: str = "{id:012d}.{ext}",
    image_dir: str = "images/{split}",
) -> dict:
    """A tiny MS-COCO captions split: root/annotations/captions_{split}.json + root/<image_dir>/."""
    img_dir = root / image_dir.format(split=split)
    img_dir.mkdir(parents=True)
    (root / "annotations").mkdir()
    images, anns = [], []
    for i in range(1, n_images + 1):
        image_id = 100 + i * 7  # non-contiguous ids, as in COCO
        data, ext = _image_bytes(i)
        name = naming.format(id=image_id, ext=ext, split=split)
        (img_dir / name).write_bytes(data)
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
        images.append(
            {
                "id": image_id,
                "file_name": name,
                "width": w,
                "height": h,
                "license": 1,
                "flickr_url": "",
                "coco_url": "",
                "date_captured": "2013-11-14 16:28:13",
            }
        )
        for k in range(captions):
            anns.append({"id": image_id * 10 + k, "image_id": image_id, "caption": f"caption {k} of image {image_id}"})
    anns.reverse()  # ingest must sort, not rely on input order
    coco = {"info": {"description": "fixture"}, "licenses": [], "images": images, "annotations": anns}
    ann_path = root / "annotations" / f"captions_{split}.json"
    ann_path.write_text(json.dumps(coco))
    return {"json": ann_path, "images": img_dir, "coco": coco, "root": root}


def _write_coco(fx: dict) -> None:
    fx["json"].write_text(json.dumps(fx["coco"]))


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _run(fx: dict, out, shard_size: int = 5, workers: int = 2, **cfg) -> dict:
    return ingest_coco(fx["json"], fx["images"], out, IngestConfig(shard_size=shard_size, workers=workers, **cfg))


def _file_summary(s: dict) -> dict:
    return {k: v for k, v in s.items() if k not in ("shards_reused", "seconds")}


def _members(tar_path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def _tree(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


# -- layout, shards, manifest ---------------------------------------------------------------------------------


def test_shards_readable_by_webdataset(tmp_path):
    import webdataset as wds

    fx = make_coco(tmp_path / "coco")
    out = tmp_path / "out"
    summary = _run(fx, out, shard_size=5)
    shards = sorted(out.glob("shard-*.tar"))
    assert [p.name for p in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert summary["shards"] == summary["shards_planned"] == 3

    samples = list(wds.WebDataset([str(p) for p in shards], shardshuffle=False, empty_check=False))
    ids = sorted(img["id"] for img in fx["coco"]["images"])
    assert [s["__key__"] for s in samples] == [f"{i:012d}" for i in ids]
    by_id = {img["id"]: img for img in fx["coco"]["images"]}
    for s in samples:
        meta = json.loads(s["json"])
        img = by_id[meta["image_id"]]
        source = (fx["images"] / img["file_name"]).read_bytes()
        ext = img["file_name"].rsplit(".", 1)[1]
        assert set(k for k in s if not k.startswith("__")) == {ext, "json"}
        with Image.open(io.BytesIO(source)) as src:
            mode = src.mode
            want = np.asarray(src.convert("RGB"))
        if mode == "RGB":  # already 8-bit RGB and upright: the original bytes, not re-encoded
            assert s[ext] == source and meta["conversion"] == "none"
        else:  # converted: an RGB PNG of exactly the converted pixels
            assert meta["conversion"] == f"{mode}->RGB" and ext == "png"
            with Image.open(io.BytesIO(s[ext])) as stored:
                assert stored.mode == "RGB" and np.array_equal(np.asarray(stored), want)
        assert meta["file_name"] == img["file_name"]
        assert (meta["width"], meta["height"]) == (img["width"], img["height"])
        want_caps = sorted((a["id"], a["caption"]) for a in fx["coco"]["annotations"] if a["image_id"] == img["id"])
        assert [(c["id"], c["caption"]) for c in meta["captions"]] == want_caps


def test_manifest_rows_hashes_and_lineage(tmp_path):
    fx = make_coco(tmp_path / "coco")
    out = tmp_path / "out"
    summary = _run(fx, out)
    rows = _rows(out / "manifest.csv")
    assert list(rows[0]) == MANIFEST_COLUMNS
    assert len(rows) == N_IMAGES * CAPTIONS == summary["annotations_written"]
    assert [int(r["annotation_id"]) for r in rows] == sorted(a["id"] for a in fx["coco"]["annotations"])
    by_id = {img["id"]: img for img in fx["coco"]["images"]}
    seen = set()
    for r in rows:
        img = by_id[int(r["image_id"])]
        data = (fx["images"] / img["file_name"]).read_bytes()
        assert r["sha256"] == hashlib.sha256(data).hexdigest()  # lineage: the SOURCE file
        assert int(r["bytes"]) == len(data)
        stored = _members(out / r["shard"])[f"{r['key']}.{'jpg' if r['format'] == 'JPEG' else 'png'}"]
        assert r["stored_sha256"] == hashlib.sha256(stored).hexdigest() and int(r["stored_bytes"]) == len(stored)
        assert (r["conversion"] == "none") == (r["stored_sha256"] == r["sha256"])
        assert (int(r["width"]), int(r["height"])) == (img["width"], img["height"])
        assert r["key"] == f"{img['id']:012d}"
        assert Path(r["source"]) == fx["images"] / img["file_name"]
        assert r["caption"] == f"caption {int(r['annotation_id']) % 10} of image {img['id']}"
        seen.add((r["mode"], r["format"], r["conversion"]))
    assert seen == {
        ("RGB", "JPEG", "none"),
        ("RGB", "PNG", "none"),
        ("L", "PNG", "L->RGB"),
        ("RGBA", "PNG", "RGBA->RGB"),
    }
    assert _rows(out / "ingest_quarantine.csv") == []
    assert _file_summary(summary) == json.loads((out / "ingest_summary.json").read_text())
    assert summary["images_in"] == summary["images_written"] == N_IMAGES
    assert summary["quarantined"] == {} and summary["images_dropped"] == {}
    assert summary["conversions"] == {"L->RGB": 3, "RGBA->RGB": 3, "none": 6}


@pytest.mark.parametrize(
    "naming,image_dir,split",
    [
        ("COCO_{split}_{id:012d}.{ext}", "{split}", "train2014"),  # official 2014 zip layout
        ("{id:012d}.{ext}", "{split}", "train2017"),  # official 2017 zip layout
        ("{id:012d}.{ext}", "images/{split}", "train2017"),  # this repo's layout
    ],
)
def test_real_coco_layouts(tmp_path, naming, image_dir, split):
    fx = make_coco(tmp_path / "coco", n_images=4, captions=5, split=split, naming=naming, image_dir=image_dir)
    s = ingest_split(fx["root"], split, tmp_path / "out", IngestConfig(shard_size=3, workers=1))
    assert s["images_written"] == 4 and s["annotations_written"] == 20 and s["annotations_in"] == 20
    rows = _rows(tmp_path / "out" / "manifest.csv")
    assert {r["file_name"] for r in rows} == {img["file_name"] for img in fx["coco"]["images"]}
    if split == "train2014":
        assert all(r["file_name"].startswith("COCO_train2014_000000") for r in rows)
    assert all(r["key"] == f"{int(r['image_id']):012d}" for r in rows)  # same keys whatever the naming
    assert all(Path(r["source"]).parent == fx["images"] for r in rows)


def test_missing_image_folder_names_both_layouts(tmp_path):
    fx = make_coco(tmp_path / "coco", n_images=1, split="val2017", image_dir="{split}")
    (fx["images"] / fx["coco"]["images"][0]["file_name"]).unlink()
    fx["images"].rmdir()
    with pytest.raises(IngestError, match=r"image folder not found \(expected images/<split>/ or <split>/"):
        ingest_split(fx["root"], "val2017", tmp_path / "out", IngestConfig())


def test_deterministic_across_runs_and_worker_counts(tmp_path):
    fx = make_coco(tmp_path / "coco")
    a, b = tmp_path / "a", tmp_path / "b"
    _run(fx, a, shard_size=4, workers=1)
    _run(fx, b, shard_size=4, workers=3)
    assert _tree(a) == _tree(b)
    assert len(list(a.glob("shard-*.tar"))) == 3


def test_rerun_replaces_stale_shards(tmp_path):
    fx = make_coco(tmp_path / "coco")
    out = tmp_path / "out"
    _run(fx, out, shard_size=1)
    assert len(list(out.glob("shard-*.tar"))) == N_IMAGES
    s = _run(fx, out, shard_size=100)
    assert [p.name for p in out.glob("shard-*.tar")] == ["shard-000000.tar"]
    assert [p.name for p in (out / "_parts").iterdir()] == ["shard-000000.json"]
    assert s["shards_reused"] == 0 and len(_rows(out / "manifest.csv")) == N_IMAGES * CAPTIONS


# -- bad input ------------------------------------------------------------------------------------------------


def test_bad_inputs_are_quarantined_and_counts_add_up(tmp_path):
    fx = make_coco(tmp_path / "coco", n_images=13)
    coco = fx["coco"]
    imgs = {img["id"]: img for img in coco["images"]}
    ids = sorted(imgs)
    path = lambda i: fx["images"] / imgs[i]["file_name"]  # noqa: E731

    path(ids[0]).unlink()  # missing_file
    data = path(ids[1]).read_bytes()  # ids[1] is a PNG
    path(ids[1]).write_bytes(data[: len(data) // 2])  # truncated PNG -> undecodable_image
    path(ids[2]).write_bytes(b"")  # empty_file
    assert imgs[ids[3]]["file_name"].endswith(".jpg")  # ids[3] is a JPEG (i % 4 == 0)
    jpg = path(ids[3]).read_bytes()
    path(ids[3]).write_bytes(jpg[: len(jpg) - 40])  # truncated JPEG -> undecodable_image
    path(ids[4]).write_bytes(b"<html>this is not an image</html>" * 10)  # not_an_image (named .png)
    Image.new("RGB", (64, 64), (1, 2, 3)).save(path(ids[5]), format="PNG")  # > max_image_pixels (40 x 40)
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != ids[6]]  # no_caption
    png = bytearray(path(ids[8]).read_bytes())  # ids[8]: PNG, bit flipped in IDAT
    idat = png.index(b"IDAT")
    png[idat + 6] ^= 0xFF
    path(ids[8]).write_bytes(bytes(png))  # corrupt PNG -> undecodable_image
    jpg = bytearray(path(ids[11]).read_bytes())  # ids[11]: JPEG, header destroyed
    jpg[3:40] = b"\x00" * 37
    path(ids[11]).write_bytes(bytes(jpg))  # corrupt JPEG -> undecodable_image
    png = bytearray(path(ids[12]).read_bytes())  # ids[12]: PNG, IHDR chunk mangled
    png[12:16] = b"XXXX"
    path(ids[12]).write_bytes(bytes(png))  # corrupt PNG header -> undecodable_image
    (fx["images"] / "a_folder.png").mkdir()
    n_valid_before = len(coco["annotations"])
    coco["annotations"] += [
        {"id": 999001, "image_id": 424242, "caption": "orphan caption"},  # unknown_image_id
        {"id": coco["annotations"][0]["id"], "image_id": ids[7], "caption": "dup"},  # duplicate_annotation_id
        {"id": 999002, "image_id": ids[7], "caption": 12345},  # bad_caption_type
        {"id": 999003, "image_id": ids[7], "caption": None},  # bad_caption_type
        {"image_id": ids[7], "caption": "no id"},  # bad_annotation_record
        {"id": 999004, "image_id": ids[7], "caption": ""},  # empty_caption
        {"id": 999005, "image_id": ids[7], "caption": " \t\n "},  # empty_caption (whitespace)
        {"id": 999006, "image_id": ids[7], "caption": "bell\x07 in caption"},  # invalid_caption_text
        {"id": 999007, "image_id": ids[7], "caption": "NONUTF8"},  # invalid_caption_text (below)
        {"id": 999008, "image_id": ids[7], "caption": "long " * 500},  # fine here: GX judges length
        {"id": 999009, "image_id": 777777, "caption": "a folder named .png"},  # unreadable_file
    ]
    coco["images"].append({"id": ids[9], "file_name": imgs[ids[9]]["file_name"]})  # duplicate_image_id
    coco["images"].append({"id": 5555, "file_name": "../escape.png"})  # bad_image_record
    coco["images"].append({"id": 777777, "file_name": "a_folder.png"})
    # a caption whose bytes are not UTF-8 (latin-1 'café'), inside an otherwise valid UTF-8 file
    fx["json"].write_bytes(json.dumps(coco).encode("utf-8").replace(b'"NONUTF8"', b'"caf\xe9 au lait"'))

    out = tmp_path / "out"
    s = _run(fx, out, shard_size=3, max_image_pixels=40 * 40)
    q = _rows(out / "ingest_quarantine.csv")
    assert q and list(q[0]) == QUARANTINE_COLUMNS
    assert {r["reason"] for r in q} <= set(ANNOTATION_REASONS) | set(IMAGE_REASONS)
    reasons_by_image: dict[str, set] = {}
    for r in q:
        reasons_by_image.setdefault(r["image_id"], set()).add(r["reason"])
    assert reasons_by_image[str(ids[0])] == {"missing_file"}
    assert reasons_by_image[str(ids[1])] == {"undecodable_image"}
    assert reasons_by_image[str(ids[2])] == {"empty_file"}
    assert reasons_by_image[str(ids[3])] == {"undecodable_image"}
    assert reasons_by_image[str(ids[4])] == {"not_an_image"}
    assert reasons_by_image[str(ids[5])] == {"decompression_bomb"}
    assert reasons_by_image[str(ids[6])] == {"no_caption"}
    assert reasons_by_image[str(ids[8])] == {"undecodable_image"}
    assert reasons_by_image[str(ids[11])] == {"undecodable_image"}
    assert reasons_by_image[str(ids[12])] == {"undecodable_image"}
    assert reasons_by_image["424242"] == {"unknown_image_id"}
    assert reasons_by_image["777777"] == {"unreadable_file"}
    assert reasons_by_image[str(ids[7])] == {
        "duplicate_annotation_id",
        "bad_caption_type",
        "bad_annotation_record",
        "empty_caption",
        "invalid_caption_text",
    }
    assert reasons_by_image[str(ids[9])] == {"duplicate_image_id"}
    assert reasons_by_image["5555"] == {"bad_image_record"}
    no_cap = [r for r in q if r["reason"] == "no_caption"]
    assert len(no_cap) == 1 and no_cap[0]["annotation_id"] == "" and no_cap[0]["level"] == "image"
    assert all(r["detail"] and "\n" not in r["detail"] for r in q)
    by_ann = {r["annotation_id"]: r for r in q if r["annotation_id"]}
    assert "whitespace" in by_ann["999005"]["detail"] and "U+0007" in by_ann["999006"]["detail"]
    assert by_ann["999007"]["caption"] == "caf\\udce9 au lait" and "not valid UTF-8" in by_ann["999007"]["detail"]
    assert "64x64 = 4096 px > ingest.max_image_pixels (1600)" in next(
        r["detail"] for r in q if r["reason"] == "decompression_bomb"
    )

    assert s["quarantined"] == {
        "missing_file": CAPTIONS,
        "undecodable_image": 5 * CAPTIONS,
        "empty_file": CAPTIONS,
        "not_an_image": CAPTIONS,
        "decompression_bomb": CAPTIONS,
        "no_caption": 1,
        "unknown_image_id": 1,
        "duplicate_annotation_id": 1,
        "bad_caption_type": 2,
        "bad_annotation_record": 1,
        "empty_caption": 2,
        "invalid_caption_text": 2,
        "duplicate_image_id": 1,
        "bad_image_record": 1,
        "unreadable_file": 1,
    }
    assert s["images_dropped"] == {
        "missing_file": 1,
        "undecodable_image": 5,
        "empty_file": 1,
        "not_an_image": 1,
        "decompression_bomb": 1,
        "no_caption": 1,
        "duplicate_image_id": 1,
        "bad_image_record": 1,
        "unreadable_file": 1,
    }
    good_images = [ids[7], ids[9], ids[10]]
    assert s["images_written"] == len(good_images)
    # the invariant, per record: everything in the file is either written or quarantined
    assert s["images_in"] == len(coco["images"]) == s["images_written"] + sum(s["images_dropped"].values())
    assert s["annotations_in"] == len(coco["annotations"]) == n_valid_before + 11
    assert s["annotations_written"] + s["annotations_quarantined"] == s["annotations_in"]
    assert s["annotations_quarantined"] == sum(1 for r in q if r["level"] == "annotation")

    rows = _rows(out / "manifest.csv")
    assert len(rows) == s["annotations_written"] == len(good_images) * CAPTIONS + 1  # + the long caption
    assert {int(r["image_id"]) for r in rows} == set(good_images)
    assert "dup" not in {r["caption"] for r in rows}
    assert _file_summary(s) == json.loads((out / "ingest_summary.json").read_text())
    # planned shards (ids[6] has no caption): [0,1,2] all bad -> no tar; [3,4,5] all bad; [7,8,9] -> ids[7],
    # ids[9]; [10,11,12] -> ids[10]; [the folder] all bad
    assert s["shards_planned"] == 5 and sorted(p.name for p in out.glob("shard-*.tar")) == [
        "shard-000002.tar",
        "shard-000003.tar",
    ]


def test_image_modes_are_converted_to_rgb_and_recorded(tmp_path):
    """CMYK / RGBA / palette (with transparency) / grey / 1-bit / 16-bit grey / 16-bit RGB / grey JPEG:
    stored as 8-bit RGB PNG with the conversion named; 8-bit RGB keeps its bytes."""
    fx = make_coco(tmp_path / "coco", n_images=10, captions=1)
    imgs = sorted(fx["coco"]["images"], key=lambda im: im["id"])
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    grey16 = np.full((8, 8), 40000, dtype=np.uint16)
    cases = [  # (bytes, mode column, conversion, expected RGB of pixel (0, 0))
        (encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"), "CMYK", "CMYK->RGB", None),
        (encode(Image.new("RGBA", (8, 8), (10, 20, 30, 0)), "PNG"), "RGBA", "RGBA->RGB", (10, 20, 30)),
        (encode(palette, "PNG", transparency=0), "P", "P->RGB", (200, 100, 50)),
        (encode(Image.new("L", (8, 8), 77), "PNG"), "L", "L->RGB", (77, 77, 77)),
        (encode(Image.new("1", (8, 8), 1), "PNG"), "1", "1->RGB", (255, 255, 255)),
        (encode(Image.fromarray(grey16), "PNG"), "I;16", "I;16->RGB", (156, 156, 156)),  # 40000 >> 8, not clipped
        (png16_rgb(8, 8, (65535, 32768, 0)), "RGB;16", "RGB;16->RGB", (255, 128, 0)),
        (encode(Image.new("L", (8, 8), 90), "JPEG"), "L", "L->RGB", None),
        (encode(Image.new("LA", (8, 8), (60, 255)), "PNG"), "LA", "LA->RGB", (60, 60, 60)),
        (encode(Image.new("RGB", (8, 8), (1, 2, 3)), "PNG"), "RGB", "none", (1, 2, 3)),
    ]
    for img, (data, *_rest) in zip(imgs, cases):
        (fx["images"] / img["file_name"]).write_bytes(data)
    out = tmp_path / "out"
    s = _run(fx, out, shard_size=100)
    assert s["images_written"] == 10 and s["quarantined"] == {}
    rows = {int(r["image_id"]): r for r in _rows(out / "manifest.csv")}
    members = _members(out / "shard-000000.tar")
    for img, (data, mode, conversion, pixel) in zip(imgs, cases):
        r = rows[img["id"]]
        assert (r["mode"], r["conversion"]) == (mode, conversion), img["file_name"]
        assert r["sha256"] == hashlib.sha256(data).hexdigest()
        ext = "png" if conversion != "none" or r["format"] == "PNG" else "jpg"
        stored = members[f"{r['key']}.{ext}"]
        assert r["stored_sha256"] == hashlib.sha256(stored).hexdigest()
        with Image.open(io.BytesIO(stored)) as im:
            assert im.mode == "RGB" and im.size == (8, 8) and im.format == "PNG"
            want = pixel or Image.open(io.BytesIO(data)).convert("RGB").getpixel((0, 0))
            assert im.getpixel((0, 0)) == tuple(want), conversion
        assert json.loads(members[f"{r['key']}.json"])["conversion"] == conversion
    assert s["conversions"]["none"] == 1 and s["conversions"]["L->RGB"] == 2


def test_exif_rotated_image_is_stored_upright(tmp_path):
    fx = make_coco(tmp_path / "coco", n_images=2, captions=1)
    img = sorted(fx["coco"]["images"], key=lambda im: im["id"])[0]
    raw = Image.new("RGB", (40, 20), (0, 0, 255))  # as the sensor wrote it: 40 wide, 20 high
    raw.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    data = encode(raw, "JPEG", exif=exif.tobytes(), quality=95)
    (fx["images"] / img["file_name"]).write_bytes(data)
    img["file_name"] = img["file_name"].replace(".png", ".jpg")
    (fx["images"] / img["file_name"]).write_bytes(data)
    _write_coco(fx)
    out = tmp_path / "out"
    _run(fx, out, workers=1)
    r = next(r for r in _rows(out / "manifest.csv") if int(r["image_id"]) == img["id"])
    assert r["conversion"] == "exif_transpose" and (r["width"], r["height"]) == ("20", "40")
    with Image.open(io.BytesIO(_members(out / r["shard"])[f"{r['key']}.png"])) as im:
        assert im.size == (20, 40) and not im.getexif().get(0x0112)
        top, bottom = im.getpixel((10, 5)), im.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60  # red on top: upright


def test_reencode_as_jpeg_with_quality_from_params(tmp_path):
    fx = make_coco(tmp_path / "coco", n_images=4, captions=1)
    out = tmp_path / "out"
    s = _run(fx, out, reencode_format="jpeg", reencode_quality=80)
    rows = _rows(out / "manifest.csv")
    converted = [r for r in rows if r["conversion"] != "none"]
    assert converted and s["conversions"]["none"] == len(rows) - len(converted)
    for r in converted:
        stored = _members(out / r["shard"])[f"{r['key']}.jpg"]
        assert stored[:3] == b"\xff\xd8\xff" and r["stored_sha256"] == hashlib.sha256(stored).hexdigest()


def test_streamed_file_gives_the_same_outputs_in_any_key_order_and_window(tmp_path, monkeypatch):
    """The annotations file is streamed record by record: annotations[] before images[], pretty-printed, read
    through a 7-character window, it gives the very files of the plain file read in one window."""
    from sdsclip import coco_json

    fx = make_coco(tmp_path / "coco", n_images=9)
    coco = fx["coco"]
    coco["annotations"].append({"id": 77, "image_id": coco["images"][0]["id"], "caption": "café crème 😀"})
    _write_coco(fx)
    _run(fx, tmp_path / "plain", shard_size=4)
    reordered = {"annotations": coco["annotations"], "licenses": [], "images": coco["images"], "info": coco["info"]}
    fx["json"].write_text(json.dumps(reordered, indent=2, ensure_ascii=False), encoding="utf-8")
    monkeypatch.setattr(coco_json, "CHUNK_CHARS", 7)
    monkeypatch.setattr(coco_json, "_MIN_BATCH_CHARS", 16)
    reads = []
    more = coco_json._Window.more
    monkeypatch.setattr(coco_json._Window, "more", lambda self: reads.append(1) or more(self))
    s = _run(fx, tmp_path / "streamed", shard_size=4)
    assert len(reads) >= fx["json"].stat().st_size // 7  # read 7 characters at a time, not loaded whole
    assert _tree(tmp_path / "streamed") == _tree(tmp_path / "plain")
    assert s["annotations_written"] == len(coco["annotations"]) and "café crème 😀" in {
        r["caption"] for r in _rows(tmp_path / "streamed" / "manifest.csv")
    }


def test_ids_beyond_64_bits_are_bad_records(tmp_path):
    fx = make_coco(tmp_path / "coco", n_images=2)
    coco = fx["coco"]
    coco["images"].append({"id": 2**64, "file_name": "huge.png"})
    coco["annotations"].append({"id": 2**70, "image_id": coco["images"][0]["id"], "caption": "huge id"})
    _write_coco(fx)
    s = _run(fx, tmp_path / "out")
    q = {r["detail"] for r in _rows(tmp_path / "out" / "ingest_quarantine.csv")}
    assert s["quarantined"] == {"bad_image_record": 1, "bad_annotation_record": 1}
    assert any("'id' is beyond the 64-bit range" in d and d.startswith("images[2]") for d in q)
    assert s["annotations_written"] + s["annotations_quarantined"] == s["annotations_in"]


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


@pytest.mark.parametrize(
    "payload,needle",
    [
        ("[]", "not an object"),
        ('{"images": {}, "annotations": []}', "'images' is a JSON dict"),
        ("", "empty file"),
        ("[" * 100000, "nested too deeply|not valid JSON"),
    ],
)
def test_wrong_types_raise(tmp_path, payload, needle):
    fx = make_coco(tmp_path / "coco")
    fx["json"].write_text(payload)
    with pytest.raises(IngestError, match=needle) as err:
        _run(fx, tmp_path / "out")
    assert "\n" not in str(err.value)


def test_missing_inputs_raise(tmp_path):
    fx = make_coco(tmp_path / "coco")
    with pytest.raises(IngestError, match="image folder not found"):
        ingest_coco(fx["json"], tmp_path / "nope", tmp_path / "out", IngestConfig())
    with pytest.raises(IngestError, match="annotations file not found"):
        ingest_coco(tmp_path / "none.json", fx["images"], tmp_path / "out", IngestConfig())


def test_cli_malformed_json_exits_2_with_one_line(tmp_path):
    from typer.testing import CliRunner

    from sdsclip.cli import app

    fx = make_coco(tmp_path / "coco", n_images=1)
    fx["json"].write_text('{"images": [}')
    params = tmp_path / "params.yaml"
    params.write_text("ingest:\n  splits: [train]\n")
    result = CliRunner().invoke(
        app, ["ingest", "--coco-root", str(fx["root"]), "--out", str(tmp_path / "out"), "--params", str(params)]
    )
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output
    assert lines[0].startswith("sdsclip ingest: error:") and str(fx["json"]) in lines[0]
    assert "not valid JSON (line 1 column 13" in lines[0]


# -- fsspec ---------------------------------------------------------------------------------------------------


def test_fsspec_memory_urls_in_and_out(tmp_path):
    """memory:// input and output (the code path of s3://, gs://): same shards and manifest as local paths."""
    import fsspec

    fx = make_coco(tmp_path / "coco", n_images=6)
    local = tmp_path / "local"
    ingest_split(fx["root"], "train", local, IngestConfig(shard_size=4, workers=2))

    mem = fsspec.filesystem("memory")
    root = "/sdsclip-test-coco"
    try:
        for p in fx["root"].rglob("*"):
            if p.is_file():
                mem.pipe(f"{root}/{p.relative_to(fx['root']).as_posix()}", p.read_bytes())
        s = ingest_split(
            f"memory://{root}", "train", f"memory://{root}-out/train", IngestConfig(shard_size=4, workers=2)
        )
        assert s["images_written"] == 6 and s["shards"] == 2
        out = f"{root}-out/train"
        for name in ("shard-000000.tar", "shard-000001.tar", "_parts/shard-000000.json"):
            local_bytes = (local / name).read_bytes()
            if name.endswith(".json"):  # parts name the source, which differs: compare the rest
                a, b = json.loads(mem.cat_file(f"{out}/{name}")), json.loads(local_bytes)
                assert {k: v for k, v in a.items() if k not in ("manifest_csv", "plan_sha256")} == {
                    k: v for k, v in b.items() if k not in ("manifest_csv", "plan_sha256")
                }
            else:
                assert mem.cat_file(f"{out}/{name}") == local_bytes, name
        mem_rows = list(csv.DictReader(io.StringIO(mem.cat_file(f"{out}/manifest.csv").decode())))
        local_rows = _rows(local / "manifest.csv")
        assert [r["source"] for r in mem_rows] == [f"memory://{root}/images/train/{r['file_name']}" for r in local_rows]
        assert [{**r, "source": ""} for r in mem_rows] == [{**r, "source": ""} for r in local_rows]
        assert json.loads(mem.cat_file(f"{out}/ingest_summary.json")) == _file_summary(s)
        assert not [p for p in mem.find(f"{root}-out") if p.endswith(".tmp")]
        again = ingest_split(f"memory://{root}", "train", f"memory://{root}-out/train", IngestConfig(shard_size=4))
        assert again["shards_reused"] == 2
    finally:
        for p in (root, f"{root}-out"):
            if mem.exists(p):
                mem.rm(p, recursive=True)


# -- resumability ---------------------------------------------------------------------------------------------


def test_resume_after_interruption_matches_clean_run(tmp_path, monkeypatch):
    fx = make_coco(tmp_path / "coco", n_images=10)
    clean = tmp_path / "clean"
    _run(fx, clean, shard_size=2)

    out = tmp_path / "out"
    real_commit = ingest_mod.commit_shard
    commits = []

    def interrupted(out_loc, shard):
        if len(commits) == 3:
            raise KeyboardInterrupt("simulated kill while writing shard 3")
        commits.append(shard.index)
        real_commit(out_loc, shard)

    monkeypatch.setattr(ingest_mod, "commit_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(fx, out, shard_size=2)
    monkeypatch.setattr(ingest_mod, "commit_shard", real_commit)
    assert commits == [0, 1, 2]
    assert sorted(p.name for p in out.glob("shard-*")) == [
        "shard-000000.tar",
        "shard-000001.tar",
        "shard-000002.tar",
    ]  # no half-written .tmp left
    assert not (out / "manifest.csv").exists()  # no manifest that disagrees with the shards
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("shard-*.tar")}

    probed = []
    real_probe = ingest_mod.probe_image
    monkeypatch.setattr(ingest_mod, "probe_image", lambda path, *a: probed.append(path) or real_probe(path, *a))
    s = _run(fx, out, shard_size=2)
    assert s["shards_reused"] == 3 and len(probed) == 4  # only the 2 unfinished shards' images were decoded
    for name, stat in before.items():  # finished shards were not rewritten
        p = out / name
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == stat, name
    assert _tree(out) == _tree(clean)  # shards, parts, manifest, quarantine, summary: byte-identical


def test_rerun_is_idempotent_and_redoes_only_changed_shards(tmp_path):
    fx = make_coco(tmp_path / "coco", n_images=9)
    out = tmp_path / "out"
    first = _run(fx, out, shard_size=3)
    tree = _tree(out)
    again = _run(fx, out, shard_size=3)
    assert again["shards_reused"] == 3 and _tree(out) == tree
    assert _file_summary(again) == _file_summary(first)

    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    last = max(fx["coco"]["images"], key=lambda im: im["id"])  # in shard 2
    next(a for a in fx["coco"]["annotations"] if a["image_id"] == last["id"])["caption"] = "an edited caption"
    _write_coco(fx)
    edited = _run(fx, out, shard_size=3)
    assert edited["shards_reused"] == 2
    assert {p.name for p in out.glob("shard-*.tar") if p.stat().st_mtime_ns != mtimes[p.name]} == {"shard-000002.tar"}
    assert "an edited caption" in {r["caption"] for r in _rows(out / "manifest.csv")}

    # a source image replaced by a different one (other size) is noticed too
    big = Image.new("RGB", (48, 48), (9, 9, 9))
    first_img = min(fx["coco"]["images"], key=lambda im: im["id"])
    (fx["images"] / first_img["file_name"]).write_bytes(
        encode(big, "PNG" if first_img["file_name"].endswith("png") else "JPEG")
    )
    assert _run(fx, out, shard_size=3)["shards_reused"] == 2

    fresh = _run(fx, tmp_path / "fresh", shard_size=3)
    assert _tree(tmp_path / "fresh") == _tree(out) and fresh["shards_reused"] == 0
    assert _run(fx, out, shard_size=3, resume=False)["shards_reused"] == 0
    assert _tree(out) == _tree(tmp_path / "fresh")


def test_jpeg_verified_at_draft_scale_rejects_exactly_what_a_full_decode_rejects():
    """Upright RGB JPEGs are stored as they are and checked by a 1/8-scale decode (every coefficient is still
    entropy-decoded): over truncations, byte flips and deletions of baseline, progressive, 4:4:4 and
    restart-marker JPEGs, it must accept and reject exactly the files a full decode does."""
    import random
    from collections import Counter

    from sdsclip.ingest import ProbeOptions, probe_image

    def full_decode_ok(data: bytes) -> bool:
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
            return True
        except Exception:  # noqa: BLE001
            return False

    rng = random.Random(0)
    base = Image.fromarray((np.random.default_rng(0).random((96, 128, 3)) * 255).astype(np.uint8))
    variants = []
    for kwargs in ({}, {"progressive": True}, {"subsampling": 0, "quality": 95}, {"restart_marker_blocks": 4}):
        buf = io.BytesIO()
        base.save(buf, "JPEG", **kwargs)
        variants.append(buf.getvalue())
    opts = ProbeOptions(max_pixels=10**8, reencode="png", quality=90)
    outcomes = Counter()
    for data in variants:
        for k in range(60):
            x = bytearray(data)
            if k % 3 == 0:
                x = x[: rng.randrange(300, len(x))]
            elif k % 3 == 1:
                for _ in range(rng.randrange(1, 12)):
                    x[rng.randrange(400, len(x))] = rng.randrange(256)
            else:
                i = rng.randrange(400, len(x) - 60)
                del x[i : i + rng.randrange(1, 60)]
            probe = probe_image("f.jpg", "f.jpg", lambda _p, d=bytes(x): d, opts)
            expected = full_decode_ok(bytes(x))
            assert probe.ok == expected, (k, probe.reason, probe.detail)
            if probe.ok:
                assert probe.conversion == "none" and (probe.width, probe.height) == (128, 96)
            outcomes[probe.ok] += 1
    assert outcomes[True] > 20 and outcomes[False] > 50, outcomes  # both outcomes really exercised
