"""Ingest: an MS-COCO captions split -> deterministic WebDataset tar shards + a per-caption manifest.

Input (real MS-COCO and the embedded synthetic world alike):
    annotations_json   ``annotations/captions_{split}.json`` with top-level ``images`` and ``annotations``
                       lists (``info`` / ``licenses`` are read if present but not needed);
    images_dir         ``images/{split}/`` holding ``images[].file_name``.

Output in ``out_dir``:
    shard-{:06d}.tar         WebDataset shards, ``cfg.shard_size`` images each, images sorted by id. Sample
                             key ``{image_id:012d}``; members ``<key>.<ext>`` (the ORIGINAL image bytes) and
                             ``<key>.json`` ({image_id, file_name, width, height, captions: [{id, caption}]}).
                             Tar headers carry mtime 0, fixed owner and mode, so the same input gives
                             byte-identical shards.
    manifest.csv             one row per accepted annotation (image-caption pair), columns MANIFEST_COLUMNS.
    ingest_quarantine.csv    everything that could not go into a shard, columns QUARANTINE_COLUMNS; ``level``
                             is ``annotation`` (one row per dropped caption) or ``image`` (an image dropped
                             while no caption of it was otherwise usable, e.g. ``no_caption``).
    ingest_summary.json      the counts returned by :func:`ingest_coco`.

Images are streamed: at most ``4 * cfg.workers`` images are in flight, read + hashed + decoded by a thread
pool (PIL and hashlib release the GIL), and written in image-id order.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from sdsclip.config import IngestConfig

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = [
    "annotation_id", "image_id", "file_name", "caption", "sha256", "bytes", "width", "height", "mode",
    "shard", "key", "source",
]
QUARANTINE_COLUMNS = ["reason", "level", "annotation_id", "image_id", "file_name", "caption", "source", "detail"]

# Reason codes. Annotation-level: the caption itself is unusable. Image-level: the image is unusable, so every
# caption pointing at it is quarantined with the image's reason (or one ``image`` row when it has none).
ANNOTATION_REASONS = ("bad_annotation_record", "duplicate_annotation_id", "unknown_image_id", "bad_caption_type")
IMAGE_REASONS = (
    "bad_image_record", "duplicate_image_id", "no_caption", "missing_file", "empty_file", "undecodable_image",
    "decompression_bomb",
)

SHARD_PATTERN = "shard-{:06d}.tar"
TAR_MTIME = 0  # fixed tar header time => reproducible shards
TAR_USER = TAR_GROUP = "sdsclip"

# PIL format name -> WebDataset extension, for files whose own suffix is not an image extension.
_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff", "WEBP": "webp",
               "PPM": "ppm"}


class IngestError(Exception):
    """The input cannot be ingested at all; the message is one line naming the file, the problem and the fix."""


@dataclass
class _Image:
    image_id: int
    file_name: str
    source: Path
    annotations: list[tuple[int, str]] = field(default_factory=list)  # (annotation id, caption)


@dataclass
class _Probe:
    ok: bool
    reason: str = ""
    detail: str = ""
    data: bytes = b""
    sha256: str = ""
    width: int = 0
    height: int = 0
    mode: str = ""
    ext: str = ""


def _one_line(text: Any, limit: int = 300) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _load_coco(path: Path) -> tuple[list[Any], list[Any]]:
    fix = "expected an MS-COCO captions file (top-level 'images' and 'annotations' lists)"
    if not path.is_file():
        raise IngestError(f"{path}: annotations file not found (check data.coco_root and ingest.splits)")
    try:
        with path.open("rb") as fh:
            raw = json.load(fh)
    except json.JSONDecodeError as err:
        raise IngestError(
            f"{path}: not valid JSON (line {err.lineno} column {err.colno}: {err.msg}); "
            f"re-export or re-download the file ({fix})"
        ) from None
    except UnicodeDecodeError as err:
        raise IngestError(f"{path}: not UTF-8 text ({_one_line(err)}); {fix}") from None
    except OSError as err:
        raise IngestError(f"{path}: cannot read ({_one_line(err)})") from None
    if not isinstance(raw, dict):
        raise IngestError(f"{path}: top level is a JSON {type(raw).__name__}, not an object; {fix}")
    missing = [k for k in ("images", "annotations") if k not in raw]
    if missing:
        raise IngestError(f"{path}: missing top-level key(s) {', '.join(map(repr, missing))}; {fix}")
    for key in ("images", "annotations"):
        if not isinstance(raw[key], list):
            raise IngestError(f"{path}: top-level '{key}' is a JSON {type(raw[key]).__name__}, not a list; {fix}")
    return raw["images"], raw["annotations"]


def _safe_file_name(name: Any) -> bool:
    if not isinstance(name, str) or not name.strip() or "\x00" in name or "\\" in name:
        return False
    p = PurePosixPath(name)
    return not p.is_absolute() and ".." not in p.parts


def _image_ext(file_name: str, pil_format: str | None) -> str:
    from webdataset.autodecode import IMAGE_EXTENSIONS

    ext = PurePosixPath(file_name).suffix.lower().lstrip(".")
    if ext and ext in IMAGE_EXTENSIONS:
        return ext
    return _FORMAT_EXT.get(pil_format or "", (pil_format or "img").lower())


def _probe(source: Path, file_name: str) -> _Probe:
    """Read, hash and fully decode one image. Runs in a worker thread; never raises."""
    from PIL import Image

    try:
        data = source.read_bytes()
    except FileNotFoundError:
        return _Probe(False, "missing_file", f"no such file: {source}")
    except (IsADirectoryError, PermissionError, OSError) as err:
        return _Probe(False, "missing_file", f"cannot read {source}: {_one_line(err)}")
    if not data:
        return _Probe(False, "empty_file", f"zero-byte file: {source}")
    sha = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and width * height > limit:
                return _Probe(False, "decompression_bomb",
                              f"{width}x{height} = {width * height} px > PIL.Image.MAX_IMAGE_PIXELS ({limit})")
            im.verify()  # structural checks (e.g. PNG chunk CRCs); the image is unusable afterwards
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # full decode: catches truncated / corrupt pixel data
            mode, fmt = im.mode, im.format
            width, height = im.size
    except Image.DecompressionBombError as err:
        return _Probe(False, "decompression_bomb", _one_line(err))
    except Exception as err:  # noqa: BLE001 - PIL raises many types on corrupt input
        return _Probe(False, "undecodable_image", f"{type(err).__name__}: {_one_line(err)}")
    return _Probe(True, data=data, sha256=sha, width=width, height=height, mode=mode,
                  ext=_image_ext(file_name, fmt))


def _ordered_map(fn, items: list[_Image], workers: int) -> Iterator[tuple[_Image, _Probe]]:
    """fn over items on a thread pool, results in input order, at most 4*workers in flight."""
    if workers <= 1:
        for item in items:
            yield item, fn(item.source, item.file_name)
        return
    window = 4 * workers
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ingest") as pool:
        pending: deque[tuple[_Image, Future]] = deque()
        it = iter(items)
        for item in it:
            pending.append((item, pool.submit(fn, item.source, item.file_name)))
            if len(pending) >= window:
                break
        while pending:
            item, fut = pending.popleft()
            res = fut.result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(fn, nxt.source, nxt.file_name)))
            yield item, res


class _Shards:
    """Writes samples to shard-NNNNNN.tar via webdataset.TarWriter, opening a new shard every `size` images."""

    def __init__(self, out_dir: Path, size: int):
        self.out_dir, self.size = out_dir, size
        self.writer = None
        self.index = -1
        self.count = 0

    @property
    def name(self) -> str:
        return SHARD_PATTERN.format(self.index)

    def write(self, sample: dict[str, Any]) -> str:
        import webdataset as wds

        if self.writer is None or self.count >= self.size:
            self.close()
            self.index += 1
            self.count = 0
            self.writer = wds.TarWriter(str(self.out_dir / self.name), encoder=False, mtime=TAR_MTIME,
                                        user=TAR_USER, group=TAR_GROUP, mode=0o444)
        self.writer.write(sample)
        self.count += 1
        return self.name

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    @property
    def n(self) -> int:
        return self.index + 1


def ingest_coco(annotations_json: Path, images_dir: Path, out_dir: Path, cfg: IngestConfig) -> dict:
    """COCO captions split -> WebDataset shards + manifest.csv + ingest_quarantine.csv + ingest_summary.json.

    Returns {"images_in", "images_written", "annotations_in", "annotations_written", "annotations_quarantined",
    "images_dropped": {reason: n}, "quarantined": {reason: rows}, "shards"}. Raises IngestError when the
    annotations file or the image folder cannot be used at all.
    """
    annotations_json, images_dir, out_dir = Path(annotations_json), Path(images_dir), Path(out_dir)
    t0 = time.perf_counter()
    images_raw, anns_raw = _load_coco(annotations_json)
    if not images_dir.is_dir():
        raise IngestError(f"{images_dir}: image folder not found (expected images/<split>/ next to annotations/)")
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("shard-*.tar"):
        stale.unlink()

    qrows: list[dict[str, Any]] = []

    def quarantine(reason: str, level: str, annotation_id: Any = "", image_id: Any = "", file_name: Any = "",
                   caption: Any = "", source: Any = "", detail: str = "") -> None:
        qrows.append({
            "reason": reason, "level": level, "annotation_id": annotation_id, "image_id": image_id,
            "file_name": file_name if isinstance(file_name, str) else json.dumps(file_name),
            "caption": caption if isinstance(caption, str) else json.dumps(caption),
            "source": str(source) if source else "", "detail": _one_line(detail),
        })

    # -- images[] -----------------------------------------------------------------------------------------
    images: dict[int, _Image] = {}
    bad_images: dict[int, tuple[str, str, Any]] = {}  # int id of an unusable record -> (reason, detail, name)
    images_dropped: Counter[str] = Counter()
    for i, rec in enumerate(images_raw):
        img_id = rec.get("id") if isinstance(rec, dict) else None
        name = rec.get("file_name") if isinstance(rec, dict) else None
        if not isinstance(rec, dict) or not _is_int(img_id) or not _safe_file_name(name):
            detail = (f"images[{i}]: " + ("not an object" if not isinstance(rec, dict) else
                      "'id' is not an integer" if not _is_int(img_id) else
                      "'file_name' is not a relative path inside the image folder"))
            images_dropped["bad_image_record"] += 1
            if _is_int(img_id) and img_id not in images and img_id not in bad_images:
                bad_images[img_id] = ("bad_image_record", detail, name)  # its captions are quarantined with it
            else:  # no usable id: nothing can point at it
                quarantine("bad_image_record", "image", image_id="" if img_id is None else img_id,
                           file_name="" if name is None else name, detail=detail)
            continue
        if img_id in images or img_id in bad_images:
            images_dropped["duplicate_image_id"] += 1
            quarantine("duplicate_image_id", "image", image_id=img_id, file_name=name, source=images_dir / name,
                       detail=f"images[{i}]: id {img_id} already used by an earlier record")
            continue
        images[img_id] = _Image(img_id, name, images_dir / name)

    # -- annotations[] ------------------------------------------------------------------------------------
    seen_ann: set[int] = set()
    bad_image_anns: dict[int, list[tuple[int, str]]] = {}
    for i, rec in enumerate(anns_raw):
        ann_id = rec.get("id") if isinstance(rec, dict) else None
        img_id = rec.get("image_id") if isinstance(rec, dict) else None
        caption = rec.get("caption") if isinstance(rec, dict) else None
        if not isinstance(rec, dict) or not _is_int(ann_id):
            what = "not an object" if not isinstance(rec, dict) else "'id' is not an integer"
            quarantine("bad_annotation_record", "annotation", annotation_id="" if ann_id is None else ann_id,
                       image_id="" if img_id is None else img_id, caption="" if caption is None else caption,
                       detail=f"annotations[{i}]: {what}")
            continue
        if ann_id in seen_ann:
            quarantine("duplicate_annotation_id", "annotation", annotation_id=ann_id,
                       image_id="" if img_id is None else img_id, caption="" if caption is None else caption,
                       detail=f"annotations[{i}]: id {ann_id} already used by an earlier annotation")
            continue
        seen_ann.add(ann_id)
        if _is_int(img_id) and img_id in bad_images:
            bad_image_anns.setdefault(img_id, []).append((ann_id, caption))
            continue
        if not _is_int(img_id) or img_id not in images:
            quarantine("unknown_image_id", "annotation", annotation_id=ann_id,
                       image_id="" if img_id is None else img_id, caption="" if caption is None else caption,
                       detail=f"annotations[{i}]: image_id {img_id!r} is not an id in images[]")
            continue
        if not isinstance(caption, str):
            quarantine("bad_caption_type", "annotation", annotation_id=ann_id, image_id=img_id,
                       file_name=images[img_id].file_name, caption="" if caption is None else caption,
                       detail=f"annotations[{i}]: caption is {type(caption).__name__}, not a string")
            continue
        images[img_id].annotations.append((ann_id, caption))

    for img_id in sorted(bad_images):
        reason, detail, name = bad_images[img_id]
        anns = sorted(bad_image_anns.get(img_id, []), key=lambda a: a[0])
        if not anns:
            quarantine(reason, "image", image_id=img_id, file_name="" if name is None else name, detail=detail)
        for ann_id, caption in anns:
            quarantine(reason, "annotation", annotation_id=ann_id, image_id=img_id,
                       file_name="" if name is None else name, caption="" if caption is None else caption,
                       detail=detail)

    todo: list[_Image] = []
    for img_id in sorted(images):
        img = images[img_id]
        if not img.annotations:
            images_dropped["no_caption"] += 1
            quarantine("no_caption", "image", image_id=img_id, file_name=img.file_name, source=img.source,
                       detail="no usable annotation refers to this image")
        else:
            img.annotations.sort(key=lambda a: a[0])
            todo.append(img)

    # -- images: read + hash + decode in parallel, write in id order --------------------------------------
    manifest_tmp = out_dir / "manifest.csv.tmp"
    shards = _Shards(out_dir, cfg.shard_size)
    images_written = annotations_written = 0
    try:
        with manifest_tmp.open("w", newline="", encoding="utf-8") as fh:
            mw = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
            mw.writeheader()
            for img, probe in _ordered_map(_probe, todo, cfg.workers):
                if not probe.ok:
                    images_dropped[probe.reason] += 1
                    for ann_id, caption in img.annotations:
                        quarantine(probe.reason, "annotation", annotation_id=ann_id, image_id=img.image_id,
                                   file_name=img.file_name, caption=caption, source=img.source,
                                   detail=probe.detail)
                    continue
                key = f"{img.image_id:012d}"
                meta = {
                    "image_id": img.image_id, "file_name": img.file_name,
                    "width": probe.width, "height": probe.height,
                    "captions": [{"id": a, "caption": c} for a, c in img.annotations],
                }
                shard = shards.write({
                    "__key__": key, probe.ext: probe.data,
                    "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"),
                })
                images_written += 1
                for ann_id, caption in img.annotations:
                    mw.writerow({
                        "annotation_id": ann_id, "image_id": img.image_id, "file_name": img.file_name,
                        "caption": caption, "sha256": probe.sha256, "bytes": len(probe.data),
                        "width": probe.width, "height": probe.height, "mode": probe.mode,
                        "shard": shard, "key": key, "source": str(img.source),
                    })
                    annotations_written += 1
    finally:
        shards.close()
    os.replace(manifest_tmp, out_dir / "manifest.csv")

    with (out_dir / "ingest_quarantine.csv").open("w", newline="", encoding="utf-8") as fh:
        qw = csv.DictWriter(fh, fieldnames=QUARANTINE_COLUMNS, lineterminator="\n")
        qw.writeheader()
        qw.writerows(qrows)

    annotations_quarantined = sum(1 for r in qrows if r["level"] == "annotation")
    summary = {
        "images_in": len(images_raw),
        "images_written": images_written,
        "images_dropped": dict(sorted(images_dropped.items())),
        "annotations_in": len(anns_raw),
        "annotations_written": annotations_written,
        "annotations_quarantined": annotations_quarantined,
        "quarantined": dict(sorted(Counter(r["reason"] for r in qrows).items())),
        "shards": shards.n,
    }
    if annotations_written + annotations_quarantined != len(anns_raw):
        raise AssertionError(f"ingest invariant broken: {annotations_written} written + {annotations_quarantined} "
                             f"quarantined != {len(anns_raw)} annotations in {annotations_json}")
    if images_written + sum(images_dropped.values()) != len(images_raw):
        raise AssertionError(f"ingest invariant broken: {images_written} images written + "
                             f"{sum(images_dropped.values())} dropped != {len(images_raw)} in {annotations_json}")
    (out_dir / "ingest_summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n",
                                                 encoding="utf-8")
    log.info("ingest %s: %d/%d images, %d/%d captions, %d shards, %.1fs", annotations_json.name, images_written,
             len(images_raw), annotations_written, len(anns_raw), shards.n, time.perf_counter() - t0)
    return summary
