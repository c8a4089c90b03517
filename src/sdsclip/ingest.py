"""Ingest: an MS-COCO captions split -> deterministic, resumable WebDataset tar shards + a per-caption manifest.

Input (real MS-COCO 2014 / 2017 and the embedded synthetic world alike), each a local path or an fsspec URL
(``s3://``, ``gs://``, ``memory://`` ...; the protocol's fsspec package must be installed):
    annotations_json   ``annotations/captions_{split}.json`` with top-level ``images`` and ``annotations``
                       lists (``info`` / ``licenses`` are read if present but not needed); several captions per
                       image; any file names (``COCO_train2014_000000xxxxxx.jpg``, ``000000xxxxxx.jpg``, ...);
    images_dir         the folder holding ``images[].file_name`` (``images/{split}/`` or ``{split}/``, see
                       :func:`ingest_split`).

Output in ``out_dir`` (a local path or an fsspec URL):
    shard-{:06d}.tar         WebDataset shards. Images (sorted by id) are planned ``cfg.shard_size`` per shard;
                             a shard holds the planned images that passed (fewer when some were quarantined; no
                             file when none did). Sample key ``{image_id:012d}``; members ``<key>.<ext>`` and
                             ``<key>.json`` ({image_id, file_name, width, height, conversion, captions: [{id,
                             caption}]}). The image member is the ORIGINAL file when it is already 8-bit RGB and
                             upright (conversion ``none``); otherwise an RGB re-encode (``cfg.reencode_format``)
                             of the converted image. Tar headers carry mtime 0, fixed owner and mode, so the same
                             input gives byte-identical shards.
    manifest.csv             one row per accepted annotation (image-caption pair), columns MANIFEST_COLUMNS:
                             lineage (``source``, ``sha256`` and ``bytes`` of the SOURCE file), decoded ``mode``
                             and ``format``, the ``conversion`` applied, ``stored_sha256`` / ``stored_bytes`` of
                             the member in the shard, ``width`` / ``height`` as stored (after EXIF rotation).
    ingest_quarantine.csv    everything that could not go into a shard, columns QUARANTINE_COLUMNS; ``reason`` is
                             a code of ANNOTATION_REASONS / IMAGE_REASONS; ``level`` is ``annotation`` (one row per
                             dropped caption) or ``image`` (an image dropped while no caption of it was otherwise
                             usable, e.g. ``no_caption``).
    ingest_summary.json      the counts (per reason, per conversion); ``annotations_written +
                             annotations_quarantined == annotations_in`` is asserted before it is written.
    _parts/shard-{:06d}.json one per planned shard: the hash of its plan, the tar's size, its manifest
                             rows, quarantine rows and counts. The final files are assembled from these.

Streaming and parallel: images are read, hashed, decoded (and converted) by ``cfg.workers`` threads (PIL, zlib
and hashlib release the GIL), at most ``WINDOW_PER_WORKER * cfg.workers`` in flight (encoded bytes, ~120 KiB each
for COCO), and written in image-id order. Each worker also prepares the image's tar blocks and manifest lines, so
the writing thread only writes bytes. Memory does not grow with the split: the annotations file is streamed
record by record (:mod:`sdsclip.coco_json`) into a catalogue on disk (sqlite, in a temp folder: ~1.4x the
annotations file), from which the shards are planned and written, and the final files are streamed from it
and from the shards' parts.

Resumable and idempotent: a shard is written to ``<name>.tmp`` and renamed when complete, then its part is
written. A re-run (``cfg.resume``) keeps every shard whose part records the same plan (image ids, file names,
source sizes, captions, conversion settings) and whose tar still has the recorded size, and redoes the rest, so a
run interrupted anywhere ends, when re-run, with the same shards and manifest as an uninterrupted one. (A source
image replaced in place by one of exactly the same size is not detected: delete ``out_dir`` or set
``ingest.resume: false`` after such an edit.)
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import logging
import os
import re
import sqlite3
import tarfile
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any, TypeGuard

from sdsclip.coco_json import CocoJsonError, iter_records
from sdsclip.config import IngestConfig
from sdsclip.errors import UserError

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = [
    "annotation_id",
    "image_id",
    "file_name",
    "caption",
    "sha256",
    "bytes",
    "width",
    "height",
    "mode",
    "format",
    "conversion",
    "stored_sha256",
    "stored_bytes",
    "shard",
    "key",
    "source",
]
QUARANTINE_COLUMNS = ["reason", "level", "annotation_id", "image_id", "file_name", "caption", "source", "detail"]

# Reason codes. Annotation-level: the caption itself is unusable. Image-level: the image is unusable, so every
# caption pointing at it is quarantined with the image's reason (or one ``image`` row when it has none).
ANNOTATION_REASONS = (
    "bad_annotation_record",  # not an object, or 'id' not an integer
    "duplicate_annotation_id",  # an earlier annotation has the same id
    "unknown_image_id",  # image_id is not an id of images[]
    "bad_caption_type",  # caption missing or not a string
    "empty_caption",  # empty or whitespace only
    "invalid_caption_text",  # not valid UTF-8 (bytes that are not UTF-8 in the file) or control characters
)
IMAGE_REASONS = (
    "bad_image_record",  # not an object, 'id' not an integer, 'file_name' not a relative path
    "duplicate_image_id",  # an earlier image record has the same id
    "no_caption",  # no usable caption refers to the image
    "missing_file",  # file_name not found in the image folder
    "unreadable_file",  # the file exists but cannot be read (a directory, permissions, I/O error)
    "empty_file",  # zero bytes
    "not_an_image",  # no image format recognises the content (e.g. text or HTML named .jpg)
    "undecodable_image",  # recognised but corrupt or truncated
    "decompression_bomb",  # more pixels than ingest.max_image_pixels
)

SHARD_PATTERN = "shard-{:06d}.tar"
PARTS_DIR = "_parts"
PART_FORMAT = 3  # bump when the shard or part content changes for the same input: old parts are then redone
TAR_MTIME = 0  # fixed tar header time => reproducible shards
TAR_USER = TAR_GROUP = "sdsclip"
WINDOW_PER_WORKER = 32  # images in flight per decode worker
FINAL_FILES = ("manifest.csv", "ingest_quarantine.csv", "ingest_summary.json")

# PIL format name -> WebDataset extension of an image kept as it is.
_FORMAT_EXT = {
    "JPEG": "jpg",
    "MPO": "jpg",
    "PNG": "png",
    "GIF": "gif",
    "BMP": "bmp",
    "TIFF": "tiff",
    "WEBP": "webp",
    "PPM": "ppm",
}
_REENCODE = {"png": ("PNG", "png"), "jpeg": ("JPEG", "jpg")}
_SIXTEEN_BIT = re.compile(r";16")  # PIL raw modes of 16-bit-per-channel data: 'RGB;16B', 'I;16B', 'LA;16B'
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# A relative path that PurePosixPath leaves as it is (no '.', '..', empty or leading-dot parts): the fast path.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*(?:/[A-Za-z0-9_\-][A-Za-z0-9_.\-]*)*\Z")
_UPRIGHT = (None, 0, 1)  # EXIF orientation values that need no rotation
_IMAGE_MAGIC = (
    b"\xff\xd8\xff",
    b"\x89PNG",
    b"GIF8",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"RIFF",
)  # JPEG PNG GIF BMP TIFF WEBP


class IngestError(UserError):
    """The input cannot be ingested at all; the message is one line naming the file, the problem and the fix."""


# -- locations: local paths and fsspec URLs ------------------------------------------------------------------


def is_url(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


def join(root: str | os.PathLike, *parts: str) -> str:
    """``root/part/...`` for a local path (OS separators) or an fsspec URL (``/``, protocol kept)."""
    root = os.fspath(root)
    if is_url(root):
        return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(root, *parts))


@dataclass(frozen=True)
class Location:
    """A file or folder: its fsspec filesystem, the path on it, and the spelling the user gave (for messages
    and the manifest's ``source``, so a relative local path stays relative)."""

    fs: Any
    path: str
    shown: str

    @classmethod
    def of(cls, where: str | os.PathLike) -> Location:
        import fsspec

        shown = os.fspath(where)
        try:
            fs, path = fsspec.core.url_to_fs(shown)
        except (ImportError, ValueError) as err:  # unknown protocol or its package not installed
            raise IngestError(f"{shown}: cannot open this location ({_one_line(err)})") from None
        return cls(fs, path.rstrip("/") or path, shown)

    def child(self, name: str) -> Location:
        return Location(self.fs, f"{self.path}/{name}", join(self.shown, name))

    @property
    def local(self) -> bool:
        from fsspec.implementations.local import LocalFileSystem

        return isinstance(self.fs, LocalFileSystem)

    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.path)

    def write_atomic(self, data: bytes) -> None:
        tmp = self.path + ".tmp"
        with self.fs.open(tmp, "wb") as fh:
            fh.write(data)
        self.fs.mv(tmp, self.path)

    def remove(self) -> None:
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            pass


def _reader(loc: Location) -> Callable[[str], bytes]:
    if loc.local:

        def read_local(path: str) -> bytes:
            with open(path, "rb") as fh:
                return fh.read()

        return read_local
    return loc.fs.cat_file


# -- records --------------------------------------------------------------------------------------------------


@dataclass
class _Image:
    image_id: int
    file_name: str
    path: str  # on the image folder's filesystem
    source: str  # as shown in the manifest
    annotations: list[tuple[int, str]] = field(default_factory=list)  # (annotation id, caption)
    source_size: int | None = None  # from the image folder's listing (None: not listed)


@dataclass(frozen=True)
class ProbeOptions:
    """The ingest settings that decide what :func:`probe_image` stores."""

    max_pixels: int
    reencode: str
    quality: int


@dataclass
class ImageProbe:
    """What :func:`probe_image` found: the bytes to store and their lineage, or why the image is unusable."""

    ok: bool
    reason: str = ""
    detail: str = ""
    data: bytes = b""  # what goes into the shard
    sha256: str = ""  # of the source file
    size: int = 0  # of the source file
    width: int = 0  # as stored
    height: int = 0
    mode: str = ""  # decoded source mode ('RGB;16' etc. for 16-bit-per-channel data)
    format: str = ""  # source format (PIL name)
    conversion: str = "none"
    stored_sha256: str = ""
    ext: str = ""


def _one_line(text: Any, limit: int = 300) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _printable(value: Any) -> str:
    """Any value as UTF-8-safe text: strings with lone surrogates (undecodable bytes) get backslash escapes."""
    s = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


def _is_int(x: Any) -> TypeGuard[int]:
    return isinstance(x, int) and not isinstance(x, bool)


def _utf8_ok(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _safe_file_name(name: Any) -> TypeGuard[str]:
    if isinstance(name, str) and _PLAIN_NAME.match(name):
        return True
    if not isinstance(name, str) or not name.strip() or "\x00" in name or "\\" in name or not _utf8_ok(name):
        return False
    p = PurePosixPath(name)
    return not p.is_absolute() and ".." not in p.parts and bool(p.parts)


def _caption_problem(caption: str) -> tuple[str, str] | None:
    """(reason, detail) when a string caption is unusable as text, else None."""
    if not caption.strip():
        return "empty_caption", "empty caption" if not caption else "caption is whitespace only"
    if not caption.isascii() and not _utf8_ok(caption):  # (isascii: the common case, fast)
        bad = next(i for i, ch in enumerate(caption) if not _utf8_ok(ch))
        return "invalid_caption_text", f"caption is not valid UTF-8 (undecodable byte at character {bad})"
    m = _CONTROL.search(caption)
    if m:
        return "invalid_caption_text", f"caption contains control character U+{ord(m.group()):04X} at {m.start()}"
    return None


# -- one image: read, hash, decode, convert -------------------------------------------------------------------


def _bits16(im) -> bool:
    """16 bits per channel (PNG / TIFF raw modes like 'RGB;16B', 'I;16B'); PIL decodes 16-bit RGB(A) to 8 bits."""
    if im.mode.startswith("I;16"):
        return True
    for tile in getattr(im, "tile", None) or []:
        args = tile.args if hasattr(tile, "args") else tile[3]
        raw = args[0] if isinstance(args, tuple) and args else args
        if isinstance(raw, str) and _SIXTEEN_BIT.search(raw):
            return True
    return False


def _to_rgb(im, mode: str):
    """8-bit RGB of a decoded image. 16-bit / 32-bit integer grey is scaled (>> 8), not clipped; palette images
    with transparency go through RGBA; alpha is dropped (as ``Image.convert('RGB')`` and open_clip do)."""
    from PIL import Image

    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        import numpy as np

        grey = (np.clip(np.asarray(im, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode in ("P", "PA") and ("transparency" in im.info or mode == "PA"):
        im = im.convert("RGBA")
    return im.convert("RGB")


def _verify_jpeg_as_is(im, data: bytes, file_name: str, sha: str, size: int, fmt: str) -> ImageProbe:
    """An upright 8-bit RGB JPEG is stored unchanged, so its pixels are never needed here: decode it at 1/8
    scale (``draft``). libjpeg still entropy-decodes every coefficient of every scan, which is where truncated
    or corrupt data is detected (the rejections are the same as a full decode's, see tests/test_ingest.py),
    but skips the full-size IDCT, upsampling and colour conversion: ~40% less CPU per image."""
    width, height = im.size  # draft() shrinks im.size: the stored size is the header's
    try:
        with im:
            im.draft(im.mode, (1, 1))
            im.load()
    except Exception as err:  # noqa: BLE001 - PIL raises many types on corrupt input
        return ImageProbe(False, "undecodable_image", f"{type(err).__name__}: {_one_line(err)}", sha256=sha, size=size)
    return _stored_as_is(data, sha, size, width, height, "RGB", fmt, _FORMAT_EXT[fmt])


def _stored_as_is(data: bytes, sha: str, size: int, width: int, height: int, mode: str, fmt: str, ext: str):
    """The probe of an image whose source bytes go into the shard unchanged (conversion ``none``)."""
    return ImageProbe(
        True,
        data=data,
        sha256=sha,
        size=size,
        width=width,
        height=height,
        mode=mode,
        format=fmt,
        conversion="none",
        stored_sha256=sha,
        ext=ext,
    )


def probe_image(path: str, file_name: str, read: Callable[[str], bytes], opts: ProbeOptions) -> ImageProbe:
    """Read, hash, decode (every coefficient / pixel, see :func:`_verify_jpeg_as_is`) and, if needed, convert one
    image. Runs in a worker thread; never raises."""
    from PIL import Image, UnidentifiedImageError

    try:
        data = read(path)
    except FileNotFoundError:
        return ImageProbe(False, "missing_file", f"no such file: {file_name}")
    except IsADirectoryError:
        return ImageProbe(False, "unreadable_file", f"is a directory: {file_name}")
    except Exception as err:  # noqa: BLE001 - any backend's read error
        return ImageProbe(False, "unreadable_file", f"cannot read {file_name}: {type(err).__name__}: {_one_line(err)}")
    if not data:
        return ImageProbe(False, "empty_file", f"zero-byte file: {file_name}")
    sha, size = hashlib.sha256(data).hexdigest(), len(data)
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return _unidentified(data, file_name, sha, size)
    except Image.DecompressionBombError as err:
        return ImageProbe(False, "decompression_bomb", _one_line(err), sha256=sha, size=size)
    except Exception as err:  # noqa: BLE001 - PIL raises many types on corrupt headers
        return _undecodable(err, sha, size)
    return _decode(im, data, file_name, sha, size, opts)


def _undecodable(err: Exception, sha: str, size: int) -> ImageProbe:
    return ImageProbe(False, "undecodable_image", f"{type(err).__name__}: {_one_line(err)}", sha256=sha, size=size)


def _unidentified(data: bytes, file_name: str, sha: str, size: int) -> ImageProbe:
    """No PIL plugin accepts the file: a corrupt image if it starts with an image format's signature."""
    if data.startswith(_IMAGE_MAGIC):
        return ImageProbe(
            False,
            "undecodable_image",
            f"corrupt header: {file_name} starts like an image but no decoder accepts it (starts {data[:16]!r})",
            sha256=sha,
            size=size,
        )
    return ImageProbe(
        False,
        "not_an_image",
        f"no image format recognises {file_name} (starts {data[:16]!r})",
        sha256=sha,
        size=size,
    )


def _decode(im, data: bytes, file_name: str, sha: str, size: int, opts: ProbeOptions) -> ImageProbe:
    """The opened image checked against the pixel limit, decoded and converted; decode errors become reasons."""
    from PIL import Image

    try:
        return _check_and_convert(im, data, file_name, sha, size, opts)
    except Image.DecompressionBombError as err:
        return ImageProbe(False, "decompression_bomb", _one_line(err), sha256=sha, size=size)
    except ValueError as err:
        if "too large" in str(err).lower():  # PIL's decompressed-chunk limits (PNG text bombs)
            return ImageProbe(False, "decompression_bomb", _one_line(err), sha256=sha, size=size)
        return _undecodable(err, sha, size)
    except Exception as err:  # noqa: BLE001 - PIL raises many types on corrupt input
        return _undecodable(err, sha, size)


def _check_and_convert(im, data: bytes, file_name: str, sha: str, size: int, opts: ProbeOptions) -> ImageProbe:
    """Pixel limit on the header, then the JPEG fast path or a structural check and a full decode; may raise."""
    from PIL import Image

    width, height = im.size
    if width * height > opts.max_pixels:  # checked on the header, before any pixel is decoded
        im.close()
        return ImageProbe(
            False,
            "decompression_bomb",
            f"{width}x{height} = {width * height} px > ingest.max_image_pixels ({opts.max_pixels})",
            sha256=sha,
            size=size,
        )
    fmt, mode, sixteen = im.format or "", im.mode, _bits16(im)
    if fmt in ("JPEG", "MPO") and mode == "RGB" and im.getexif().get(0x0112) in _UPRIGHT:
        return _verify_jpeg_as_is(im, data, file_name, sha, size, fmt)
    if fmt != "JPEG":  # structural checks (PNG chunk CRCs ...); the image is unusable afterwards
        with im:
            im.verify()
        im = Image.open(io.BytesIO(data))
    return _decode_fully(im, data, sha, size, fmt, mode, sixteen, opts)


def _decode_fully(
    im, data: bytes, sha: str, size: int, fmt: str, mode: str, sixteen: bool, opts: ProbeOptions
) -> ImageProbe:
    """Decode every pixel (catches truncated / corrupt data); keep the file as it is when it is upright 8-bit RGB
    in a format the training reader knows, else re-encode the upright RGB conversion (``opts.reencode``)."""
    from PIL import ImageOps

    with im:
        im.load()  # full decode: catches truncated / corrupt pixel data
        orientation = im.getexif().get(0x0112) if fmt in ("JPEG", "MPO", "PNG", "TIFF", "WEBP") else None
        steps = []
        out = im
        if orientation not in _UPRIGHT:
            out = ImageOps.exif_transpose(out)
            steps.append("exif_transpose")
        shown_mode = mode + (";16" if sixteen and not mode.startswith("I") else "")
        if mode != "RGB" or sixteen:
            out = _to_rgb(out, mode)
            steps.append(f"{shown_mode}->RGB")
        ext = _FORMAT_EXT.get(fmt, "")
        if not steps and not ext:  # a format the training reader should not have to know
            steps.append(f"{fmt}->{_REENCODE[opts.reencode][0]}")
        width, height = out.size
        if not steps:
            return _stored_as_is(data, sha, size, width, height, shown_mode, fmt, ext)
        pil_fmt, ext = _REENCODE[opts.reencode]
        buf = io.BytesIO()
        if pil_fmt == "JPEG":
            out.save(buf, format="JPEG", quality=opts.quality)
        else:  # lossless; zlib level 1: ~3x faster than PIL's default 6 on photos, ~5% larger
            out.save(buf, format="PNG", compress_level=1)
        stored = buf.getvalue()
    return ImageProbe(
        True,
        data=stored,
        sha256=sha,
        size=size,
        width=width,
        height=height,
        mode=shown_mode,
        format=fmt,
        conversion="+".join(steps),
        stored_sha256=hashlib.sha256(stored).hexdigest(),
        ext=ext,
    )


@dataclass
class _Sample:
    """One image as its shard needs it, prepared in a worker thread so that the thread writing the shards only
    writes bytes (it would otherwise be the serial part that keeps the decode workers waiting)."""

    probe: ImageProbe
    tar_blocks: list[bytes] = field(default_factory=list)
    manifest_csv: str = ""
    annotations: int = 0


def _prepare(img: _Image, shard_name: str, read: Callable[[str], bytes], opts: ProbeOptions) -> _Sample:
    probe = probe_image(img.path, img.file_name, read, opts)
    if not probe.ok:
        return _Sample(probe)
    key = f"{img.image_id:012d}"
    meta = {
        "image_id": img.image_id,
        "file_name": img.file_name,
        "width": probe.width,
        "height": probe.height,
        "conversion": probe.conversion,
        "captions": [{"id": a, "caption": c} for a, c in img.annotations],
    }
    blocks = _TarWriter.members(
        key, {probe.ext: probe.data, "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")}
    )
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(
        [
            ann_id,
            img.image_id,
            img.file_name,
            caption,
            probe.sha256,
            probe.size,
            probe.width,
            probe.height,
            probe.mode,
            probe.format,
            probe.conversion,
            probe.stored_sha256,
            len(probe.data),
            shard_name,
            key,
            img.source,
        ]
        for ann_id, caption in img.annotations
    )  # the order of MANIFEST_COLUMNS
    return _Sample(probe, blocks, buf.getvalue(), len(img.annotations))


def _ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int) -> Iterator[tuple[Any, Any]]:
    """fn over items on a thread pool, results in input order, at most WINDOW_PER_WORKER*workers in flight. A deep
    window keeps the workers busy behind a slow item at the head (a re-encode takes ~10x a JPEG check)."""
    if workers <= 1:
        for item in items:
            yield item, fn(item)
        return
    window = WINDOW_PER_WORKER * workers
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ingest") as pool:
        pending: deque[tuple[Any, Future]] = deque()
        it = iter(items)
        for item in it:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) >= window:
                break
        try:
            while pending:
                item, fut = pending.popleft()
                res = fut.result()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(fn, nxt)))
                yield item, res
        finally:  # stopped early (an error downstream): do not decode the rest of the window
            for _, fut in pending:
                fut.cancel()


# -- shards and their parts -----------------------------------------------------------------------------------


class _TarWriter:
    """What WebDataset's ``TarWriter(fileobj, encoder=False, mtime=0, user, group, mode=0o444)`` writes, byte for
    byte (a USTAR tar, members ``<key>.<ext>`` in sorted order, padded to 10240-byte records), without importing
    webdataset (it pulls in torch: seconds of start-up) and without tarfile's 16 KiB copy loop per member."""

    def __init__(self, fileobj):
        self.fh, self.offset = fileobj, 0

    @staticmethod
    def members(key: str, sample: dict[str, bytes]) -> list[bytes]:
        """The tar blocks of one sample (header, data, padding per member); built in a worker thread."""
        blocks = []
        for ext in sorted(sample):
            data = sample[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o444
            info.uname, info.gname = TAR_USER, TAR_GROUP
            blocks += [info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"), data]
            pad = -len(data) % tarfile.BLOCKSIZE
            if pad:
                blocks.append(tarfile.NUL * pad)
        return blocks

    def write(self, blocks: list[bytes]) -> None:
        self.fh.writelines(blocks)
        self.offset += sum(map(len, blocks))

    def close(self) -> None:
        end = tarfile.NUL * (2 * tarfile.BLOCKSIZE)  # end-of-archive marker, then pad the last record
        end += tarfile.NUL * (-(self.offset + len(end)) % tarfile.RECORDSIZE)
        self.fh.write(end)
        self.offset += len(end)  # the tar's size


@dataclass
class ShardRun:
    """One planned shard being (re)written."""

    index: int
    plan_sha256: str
    tar: Location
    writer: Any = None
    fh: Any = None
    manifest_csv: list[str] = field(default_factory=list)  # manifest rows, CSV lines (no header)
    annotations: int = 0
    quarantine: list[dict[str, Any]] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    conversions: Counter = field(default_factory=Counter)
    images: int = 0

    @property
    def name(self) -> str:
        return SHARD_PATTERN.format(self.index)

    def write(self, sample: _Sample) -> None:
        if self.writer is None:
            self.fh = self.tar.fs.open(self.tar.path + ".tmp", "wb")
            self.writer = _TarWriter(self.fh)
        self.writer.write(sample.tar_blocks)
        self.manifest_csv.append(sample.manifest_csv)
        self.annotations += sample.annotations
        self.conversions[sample.probe.conversion] += 1
        self.images += 1

    def drop(self, img: _Image, probe: ImageProbe) -> None:
        """Quarantine every caption of an image that failed its probe."""
        self.dropped[probe.reason] += 1
        for ann_id, caption in img.annotations:
            self.quarantine.append(
                _quarantine_row(
                    probe.reason,
                    "annotation",
                    annotation_id=ann_id,
                    image_id=img.image_id,
                    file_name=img.file_name,
                    caption=caption,
                    source=img.source,
                    detail=probe.detail,
                )
            )

    def abort(self) -> None:
        """Drop the half-written shard (its .tmp file); the finished ones stay for a re-run."""
        if self.fh is None:
            return
        try:
            self.writer.close()  # else the tar stream flushes into a closed file when collected
        except Exception:  # noqa: BLE001 - already failing; the .tmp file is removed either way
            pass
        try:
            self.fh.close()
        finally:
            Location(self.tar.fs, self.tar.path + ".tmp", "").remove()


def _part_loc(out: Location, index: int) -> Location:
    return out.child(PARTS_DIR).child(SHARD_PATTERN.format(index)[: -len(".tar")] + ".json")


def commit_shard(out: Location, shard: ShardRun) -> None:
    """Close the shard's tar and rename it into place (or remove a stale one when no image passed), then write
    its part: after this the shard counts as finished."""
    if shard.writer is not None:
        shard.writer.close()
        shard.fh.close()
        shard.tar.fs.mv(shard.tar.path + ".tmp", shard.tar.path)
        tar_bytes = shard.writer.offset
    else:
        shard.tar.remove()
        tar_bytes = None
    part = {
        "format": PART_FORMAT,
        "plan_sha256": shard.plan_sha256,
        "shard": shard.name if tar_bytes else None,
        "tar_bytes": tar_bytes,
        "images": shard.images,
        "images_dropped": dict(sorted(shard.dropped.items())),
        "conversions": dict(sorted(shard.conversions.items())),
        "annotations": shard.annotations,
        "manifest_csv": "".join(shard.manifest_csv),
        "quarantine": shard.quarantine,
    }
    _part_loc(out, shard.index).write_atomic(
        json.dumps(part, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")
    )


def _read_part(out: Location, index: int) -> dict[str, Any] | None:
    try:
        part = json.loads(_part_loc(out, index).read_bytes())
    except (FileNotFoundError, ValueError, OSError):
        return None
    return part if isinstance(part, dict) else None


def _finished(out: Location, index: int, plan_sha256: str) -> bool:
    """The planned shard was completed by an earlier run with this very plan, and its tar is still in place."""
    part = _read_part(out, index)
    if part is None or part.get("format") != PART_FORMAT or part.get("plan_sha256") != plan_sha256:
        return False
    tar = out.child(SHARD_PATTERN.format(index))
    if part.get("tar_bytes") is None:
        return not tar.fs.exists(tar.path)
    try:
        return tar.fs.size(tar.path) == part["tar_bytes"]
    except (FileNotFoundError, OSError):
        return False


def _plan_sha256(index: int, images: list[_Image], opts: ProbeOptions) -> str:
    plan = {
        "format": PART_FORMAT,
        "shard": index,
        "max_pixels": opts.max_pixels,
        "reencode": opts.reencode,
        "quality": opts.quality if opts.reencode == "jpeg" else None,
        "images": [[img.image_id, img.file_name, img.source, img.source_size, img.annotations] for img in images],
    }
    return hashlib.sha256(json.dumps(plan, ensure_ascii=True, separators=(",", ":")).encode()).hexdigest()


def _source_sizes(images: Location) -> Iterator[tuple[str, int]]:
    """(file name relative to the image folder, size) for every file below it, from listings (no per-file
    request); a local folder is walked lazily."""
    if images.local:
        yield from _walk_sizes(images.path, "")
        return
    try:
        found = images.fs.find(images.path, detail=True)
    except (FileNotFoundError, OSError):
        return
    prefix = images.path.rstrip("/") + "/"
    for p, info in found.items():
        if p.startswith(prefix) and info.get("type", "file") == "file" and info.get("size") is not None:
            yield p[len(prefix) :], info["size"]


def _walk_sizes(folder: str, rel: str) -> Iterator[tuple[str, int]]:
    try:
        entries = os.scandir(folder)
    except OSError:
        return
    with entries:
        for entry in entries:
            try:
                if entry.is_dir():
                    yield from _walk_sizes(entry.path, f"{rel}{entry.name}/")
                elif entry.is_file():
                    yield f"{rel}{entry.name}", entry.stat().st_size
            except OSError:
                continue  # vanished or unreadable: the image's own read reports it


def _remove_stale(out: Location, planned: int) -> None:
    """Temp files of an interrupted run, and shards / parts numbered beyond this plan."""
    pat = re.compile(r"^shard-(\d{6})\.(tar|json)(\.tmp)?$")
    for folder in (out, out.child(PARTS_DIR)):
        try:
            names = [PurePosixPath(p).name for p in folder.fs.ls(folder.path, detail=False)]
        except (FileNotFoundError, OSError):
            continue
        for name in names:
            m = pat.match(name)
            if name.endswith(".tmp") or (m and int(m.group(1)) >= planned):
                folder.child(name).remove()


# -- the split ------------------------------------------------------------------------------------------------


def image_folder(coco_root: str | os.PathLike, split: str) -> str:
    """The split's image folder under ``coco_root``: ``images/{split}/`` (this repo's layout) if it exists,
    else ``{split}/`` (the layout of the official COCO zips: ``train2017/``, ``train2014/``)."""
    candidates = [join(coco_root, "images", split), join(coco_root, split)]
    for folder in candidates:
        loc = Location.of(folder)
        if loc.fs.isdir(loc.path):
            return folder
    return candidates[0]


def ingest_split(coco_root: str | os.PathLike, split: str, out_dir: str | os.PathLike, cfg: IngestConfig) -> dict:
    """``coco_root/annotations/captions_{split}.json`` + the split's image folder (:func:`image_folder`)."""
    return ingest_coco(
        join(coco_root, "annotations", f"captions_{split}.json"), image_folder(coco_root, split), out_dir, cfg
    )


def ingest_coco(
    annotations_json: str | os.PathLike, images_dir: str | os.PathLike, out_dir: str | os.PathLike, cfg: IngestConfig
) -> dict:
    """COCO captions split -> WebDataset shards + manifest.csv + ingest_quarantine.csv + ingest_summary.json.

    Returns the summary written to ingest_summary.json ({"images_in", "images_written", "images_dropped":
    {reason: n}, "annotations_in", "annotations_written", "annotations_quarantined", "quarantined": {reason:
    rows}, "conversions": {conversion: images}, "shards", "shards_planned"}) plus "shards_reused" (finished
    shards kept from an earlier run) and "seconds". Raises IngestError when the annotations file or the image
    folder cannot be used at all.
    """
    t0 = time.perf_counter()
    ann_loc, img_loc, out = Location.of(annotations_json), Location.of(images_dir), Location.of(out_dir)
    with tempfile.TemporaryDirectory(prefix="sdsclip-ingest-") as tmp, _Catalogue(tmp) as catalogue:
        catalogue.read(ann_loc, img_loc)
        plan = _plan_shards(catalogue, cfg)
        _prepare_out_dir(out, plan.planned)
        _write_shards(out, img_loc, catalogue, plan, cfg)
        totals = _assemble(out, plan.planned, catalogue)
    summary = _summarize(catalogue, totals, plan.planned, ann_loc.shown)
    out.child("ingest_summary.json").write_atomic(
        (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode("utf-8")
    )
    seconds = time.perf_counter() - t0
    log.info(
        "ingest %s: %d/%d images, %d/%d captions, %d shards (%d kept from an earlier run), %.1fs",
        ann_loc.shown,
        totals.images,
        catalogue.images_in,
        totals.annotations,
        catalogue.annotations_in,
        totals.shards,
        len(plan.reused),
        seconds,
    )
    return {**summary, "shards_reused": len(plan.reused), "seconds": round(seconds, 3)}


# -- the split's catalogue: every record checked, kept on disk ------------------------------------------------

# Quarantine rows are listed by (phase, k1, k2): the order ingest_quarantine.csv has always had.
_Q_IMAGE_RECORD = 0  # images[k1]: a record without a usable id, or a duplicate id
_Q_ANNOTATION = 1  # annotations[k1]: the caption itself (bad record, duplicate id, unknown image, bad text)
_Q_BAD_IMAGE = 2  # captions (k2 = annotation id) of the unusable image record with id k1
_Q_NO_CAPTION = 3  # image k1: no usable caption
_INT64 = (-(2**63), 2**63)
_BATCH = 10_000  # rows per executemany
_SCHEMA = """
PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF; PRAGMA temp_store = FILE; PRAGMA cache_size = -8000;
CREATE TABLE img (id INTEGER PRIMARY KEY, file_name TEXT, bad_reason TEXT, bad_detail TEXT, bad_name TEXT);
CREATE TABLE ann (pos INTEGER PRIMARY KEY, id INTEGER, image_id INTEGER, caption TEXT, raw TEXT);
CREATE TABLE cap (image_id INTEGER, ann_id INTEGER, caption TEXT);
CREATE TABLE quarantine (phase INTEGER, k1 INTEGER, k2 INTEGER, row TEXT);
CREATE TABLE size (name TEXT PRIMARY KEY, bytes INTEGER) WITHOUT ROWID;
"""


def _is_id(x: Any) -> TypeGuard[int]:
    """An integer id the catalogue can index (64-bit; not a bool)."""
    return type(x) is int and _INT64[0] <= x < _INT64[1]


def _id_problem(x: Any) -> str:
    return "'id' is not an integer" if not _is_int(x) else "'id' is beyond the 64-bit range"


class _Catalogue:
    """The split after checking every record, in a sqlite file in a temp folder, so that ingest's memory does not
    grow with the split: the images to ingest with their captions (:meth:`images`, by id), the quarantine rows
    so far (:meth:`quarantine_rows`, in the order ingest_quarantine.csv lists them) and the counts."""

    def __init__(self, folder: str):
        self.db = sqlite3.connect(os.path.join(folder, "catalogue.sqlite"))
        self.db.executescript(_SCHEMA)
        self.images_in = self.annotations_in = 0
        self.images_dropped: Counter[str] = Counter()
        self._quarantine: list[tuple[int, int, int, str]] = []
        self._anns: list[tuple[Any, ...]] = []

    def __enter__(self) -> _Catalogue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.db.close()

    def read(self, ann_loc: Location, img_loc: Location) -> None:
        """Stream the annotations file into the catalogue, then check the captions against the images."""
        for key, i, rec in _coco_records(ann_loc):
            if key == "images":
                self._add_image(i, rec, img_loc)
            else:
                self._add_annotation(i, rec)
        self._flush()
        if not img_loc.fs.isdir(img_loc.path):
            raise IngestError(
                f"{img_loc.shown}: image folder not found (expected images/<split>/ or <split>/ next to annotations/)"
            )
        self.db.execute("CREATE INDEX ann_id ON ann (id, pos)")
        self._check_annotations()
        self._quarantine_bad_images()
        self._quarantine_uncaptioned(img_loc)
        for rows in _batched(_source_sizes(img_loc)):
            self.db.executemany("INSERT OR IGNORE INTO size VALUES (?, ?)", rows)
        self._flush()

    # images[]: checked one by one (an id must be unique); kept by id ----------------------------------------

    def _add_image(self, i: int, rec: Any, img_loc: Location) -> None:
        self.images_in += 1
        img_id = rec.get("id") if isinstance(rec, dict) else None
        name = rec.get("file_name") if isinstance(rec, dict) else None
        if not isinstance(rec, dict) or not _is_id(img_id) or not _safe_file_name(name):
            detail = f"images[{i}]: " + (
                "not an object"
                if not isinstance(rec, dict)
                else _id_problem(img_id)
                if not _is_id(img_id)
                else "'file_name' is not a relative UTF-8 path inside the image folder"
            )
            self.images_dropped["bad_image_record"] += 1
            if _is_id(img_id) and self._insert_image(img_id, None, ("bad_image_record", detail, _printable(name))):
                return  # its captions are quarantined with it
            row = _quarantine_row(
                "bad_image_record",
                "image",
                image_id="" if img_id is None else _printable(img_id),
                file_name=name,
                detail=detail,
            )
            self._queue(_Q_IMAGE_RECORD, i, 0, row)
        elif not self._insert_image(img_id, name if _PLAIN_NAME.match(name) else PurePosixPath(name).as_posix(), None):
            detail = f"images[{i}]: id {img_id} already used by an earlier record"
            self._drop_image(_Q_IMAGE_RECORD, i, "duplicate_image_id", img_id, name, img_loc, detail)

    def _drop_image(
        self, phase: int, k1: int, reason: str, img_id: int, name: str, img_loc: Location, detail: str
    ) -> None:
        """An image record (with a usable file name) that is not ingested: counted, one ``image`` row."""
        self.images_dropped[reason] += 1
        row = _quarantine_row(
            reason, "image", image_id=img_id, file_name=name, source=join(img_loc.shown, name), detail=detail
        )
        self._queue(phase, k1, 0, row)

    def _insert_image(self, img_id: int, rel: str | None, bad: tuple[str, str, str] | None) -> bool:
        """Add the record; False when an earlier record has the id."""
        cur = self.db.execute("INSERT OR IGNORE INTO img VALUES (?, ?, ?, ?, ?)", (img_id, rel, *(bad or (None,) * 3)))
        return cur.rowcount == 1

    # annotations[]: stored as read (images[] may come later in the file), checked in one pass ----------------

    def _add_annotation(self, i: int, rec: Any) -> None:
        """A usable caption record is stored as its columns; anything else also as its JSON (``raw``), to be
        quarantined with the reason :meth:`_check_annotations` finds."""
        self.annotations_in += 1
        if type(rec) is dict:
            ann_id, img_id, caption = rec.get("id"), rec.get("image_id"), rec.get("caption")
            if _is_id(ann_id) and _is_id(img_id) and type(caption) is str and _caption_problem(caption) is None:
                self._anns.append((i, ann_id, img_id, caption, None))
            else:
                self._anns.append(
                    (i, ann_id if _is_id(ann_id) else None, img_id if _is_id(img_id) else None, None, json.dumps(rec))
                )
        else:
            self._anns.append((i, None, None, None, json.dumps(rec)))
        if len(self._anns) >= _BATCH:
            self._flush()

    def _check_annotations(self) -> None:
        """Attach every usable caption to its image (table cap, in image-id then annotation-id order); quarantine
        the others, in file order, with the first reason that applies (the order of ANNOTATION_REASONS, and
        captions of an unusable image record with that record's reason)."""
        earlier = "EXISTS (SELECT 1 FROM ann b WHERE b.id = a.id AND b.pos < a.pos)"
        self.db.execute(
            f"""INSERT INTO cap SELECT a.image_id, a.id, a.caption FROM ann a JOIN img i ON i.id = a.image_id
                WHERE a.raw IS NULL AND i.bad_reason IS NULL AND NOT {earlier} ORDER BY a.image_id, a.id"""
        )
        rows = self.db.execute(
            f"""SELECT a.pos, a.raw, a.id, a.image_id, a.caption, i.id IS NOT NULL, i.file_name, i.bad_reason,
                       i.bad_detail, i.bad_name, a.id IS NOT NULL AND {earlier}
                FROM ann a LEFT JOIN img i ON i.id = a.image_id
                WHERE a.raw IS NOT NULL OR i.id IS NULL OR i.bad_reason IS NOT NULL OR {earlier} ORDER BY a.pos"""
        )
        for pos, raw, ann_id, img_id, caption, known, name, bad, detail, bad_name, dup in rows:
            rec = json.loads(raw) if raw is not None else {"id": ann_id, "image_id": img_id, "caption": caption}
            if _is_id(img_id) and bad is not None and not dup and _is_id(ann_id):
                row = _quarantine_row(
                    bad, "annotation", annotation_id=ann_id, image_id=img_id, file_name=bad_name,
                    caption=rec.get("caption"), detail=detail,
                )  # fmt: skip
                self._queue(_Q_BAD_IMAGE, img_id, ann_id, row)  # listed after the annotation rows
            else:
                self._queue(_Q_ANNOTATION, pos, 0, _annotation_rejection(pos, rec, dup, name if known else None))
        self._flush()

    def _quarantine_bad_images(self) -> None:
        """An unusable image record none of whose captions was seen: one ``image`` row."""
        for img_id, reason, detail, name in self.db.execute(
            """SELECT id, bad_reason, bad_detail, bad_name FROM img WHERE bad_reason IS NOT NULL
               AND id NOT IN (SELECT k1 FROM quarantine WHERE phase = ?)""",
            (_Q_BAD_IMAGE,),
        ).fetchall():
            self._queue(_Q_BAD_IMAGE, img_id, 0, _quarantine_row(reason, "image", image_id=img_id, file_name=name,
                                                                  detail=detail))  # fmt: skip
        self._flush()

    def _quarantine_uncaptioned(self, img_loc: Location) -> None:
        for img_id, name in self.db.execute(
            """SELECT id, file_name FROM img WHERE bad_reason IS NULL
               AND id NOT IN (SELECT image_id FROM cap) ORDER BY id"""
        ).fetchall():
            detail = "no usable annotation refers to this image"
            self._drop_image(_Q_NO_CAPTION, img_id, "no_caption", img_id, name, img_loc, detail)

    def _queue(self, phase: int, k1: int, k2: int, row: dict[str, Any]) -> None:
        self._quarantine.append((phase, k1, k2, json.dumps(row)))
        if len(self._quarantine) >= _BATCH:
            self._flush()

    def _flush(self) -> None:
        if self._anns:
            self.db.executemany("INSERT INTO ann VALUES (?, ?, ?, ?, ?)", self._anns)
            self._anns.clear()
        if self._quarantine:
            self.db.executemany("INSERT INTO quarantine VALUES (?, ?, ?, ?)", self._quarantine)
            self._quarantine.clear()

    # reading it back ------------------------------------------------------------------------------------------

    def images_to_ingest(self) -> int:
        (n,) = self.db.execute("SELECT count(DISTINCT image_id) FROM cap").fetchone()
        return n

    def quarantine_rows(self) -> Iterator[dict[str, Any]]:
        for (row,) in self.db.execute("SELECT row FROM quarantine ORDER BY phase, k1, k2, rowid"):
            yield json.loads(row)

    def images(self, img_loc: Location) -> Iterator[_Image]:
        """The images to ingest, by id, each with its captions by annotation id and its listed size."""
        rows = self.db.execute(
            """SELECT c.image_id, i.file_name, s.bytes, c.ann_id, c.caption FROM cap c
               JOIN img i ON i.id = c.image_id LEFT JOIN size s ON s.name = i.file_name ORDER BY c.rowid"""
        )
        img: _Image | None = None
        for img_id, rel, size, ann_id, caption in rows:
            if img is None or img.image_id != img_id:
                if img is not None:
                    yield img
                img = _Image(img_id, rel, f"{img_loc.path}/{rel}", join(img_loc.shown, rel), source_size=size)
            img.annotations.append((ann_id, caption))
        if img is not None:
            yield img


def _coco_records(loc: Location) -> Iterator[tuple[str, int, Any]]:
    """coco_json.iter_records over the file, its failures as one-line IngestErrors naming the file."""
    path = loc.shown
    fix = "expected an MS-COCO captions file (top-level 'images' and 'annotations' lists)"
    try:
        with loc.fs.open(loc.path, "rb") as fh:
            yield from iter_records(fh)
    except FileNotFoundError:
        raise IngestError(f"{path}: annotations file not found (check data.coco_root and ingest.splits)") from None
    except IsADirectoryError:
        raise IngestError(f"{path}: is a directory, not an annotations file") from None
    except CocoJsonError as err:
        again = "; re-export or re-download the file" if err.syntax else ""
        raise IngestError(f"{path}: {err}{again} ({fix})" if again else f"{path}: {err}; {fix}") from None
    except UnicodeDecodeError as err:
        raise IngestError(f"{path}: not {err.encoding} text ({_one_line(err)}); {fix}") from None
    except OSError as err:
        raise IngestError(f"{path}: cannot read ({_one_line(err)})") from None


def _annotation_rejection(pos: int, rec: Any, dup: bool, file_name: str | None) -> dict[str, Any]:
    """The quarantine row of annotations[pos] (``rec``, not a caption of an unusable image record): the first of
    ANNOTATION_REASONS that applies. ``file_name``: of its image, None when the image id is unknown."""
    where = f"annotations[{pos}]"
    if not isinstance(rec, dict) or not _is_id(rec.get("id")):
        ann_id = rec.get("id") if isinstance(rec, dict) else None
        what = "not an object" if not isinstance(rec, dict) else _id_problem(ann_id)
        return _quarantine_row(
            "bad_annotation_record",
            "annotation",
            annotation_id="" if ann_id is None else _printable(ann_id),
            image_id=_shown_id(rec.get("image_id") if isinstance(rec, dict) else None),
            caption=rec.get("caption") if isinstance(rec, dict) else None,
            detail=f"{where}: {what}",
        )
    ann_id, img_id, caption = rec["id"], rec.get("image_id"), rec.get("caption")
    row = partial(_quarantine_row, annotation_id=ann_id, caption=caption)
    if dup:
        detail = f"{where}: id {ann_id} already used by an earlier annotation"
        return row("duplicate_annotation_id", "annotation", image_id=_shown_id(img_id), detail=detail)
    if file_name is None:
        detail = f"{where}: image_id {_printable(repr(img_id))} is not an id in images[]"
        return row("unknown_image_id", "annotation", image_id=_shown_id(img_id), detail=detail)
    if not isinstance(caption, str):
        detail = f"{where}: caption is {type(caption).__name__}, not a string"
        return row("bad_caption_type", "annotation", image_id=img_id, file_name=file_name, detail=detail)
    reason, detail = _caption_problem(caption) or ("", "")
    if not reason:
        raise AssertionError(f"ingest catalogue: {where} was rejected without a reason")
    return row(reason, "annotation", image_id=img_id, file_name=file_name, detail=f"{where}: {detail}")


def _shown_id(x: Any) -> Any:
    """An id as the quarantine file shows it: an int as is, nothing as '', anything else as printable JSON text."""
    return "" if x is None else x if _is_int(x) else _printable(x)


def _batched(items: Iterator[Any]) -> Iterator[list[Any]]:
    it = iter(items)
    while batch := list(itertools.islice(it, _BATCH)):
        yield batch


def _quarantine_row(
    reason: str,
    level: str,
    annotation_id: Any = "",
    image_id: Any = "",
    file_name: Any = "",
    caption: Any = "",
    source: Any = "",
    detail: str = "",
) -> dict[str, Any]:
    """One row of ingest_quarantine.csv (QUARANTINE_COLUMNS), every text made UTF-8-safe."""
    return {
        "reason": reason,
        "level": level,
        "annotation_id": annotation_id,
        "image_id": image_id,
        "file_name": _printable("" if file_name is None else file_name),
        "caption": _printable("" if caption is None else caption),
        "source": _printable(source) if source else "",
        "detail": _printable(_one_line(detail)),
    }


# -- planning, resuming, writing the shards -------------------------------------------------------------------


@dataclass
class _ShardPlan:
    """Images in id order, ``shard_size`` per shard; while writing, each shard's plan hash and the shards an earlier
    run finished with the same plan (kept)."""

    opts: ProbeOptions
    shard_size: int
    planned: int
    hashes: dict[int, str] = field(default_factory=dict)
    reused: set[int] = field(default_factory=set)


def _plan_shards(catalogue: _Catalogue, cfg: IngestConfig) -> _ShardPlan:
    opts = ProbeOptions(cfg.max_image_pixels, cfg.reencode_format, cfg.reencode_quality)
    return _ShardPlan(opts, cfg.shard_size, -(-catalogue.images_to_ingest() // cfg.shard_size))


def _prepare_out_dir(out: Location, planned: int) -> None:
    """Create the output folders, remove leftovers of an interrupted run and the final files (rewritten at the end:
    never a manifest that disagrees with the shards)."""
    out.fs.makedirs(out.path, exist_ok=True)
    out.fs.makedirs(out.child(PARTS_DIR).path, exist_ok=True)
    _remove_stale(out, planned)
    for name in FINAL_FILES:
        out.child(name).remove()


def _work(
    out: Location, img_loc: Location, catalogue: _Catalogue, plan: _ShardPlan, resume: bool
) -> Iterator[tuple[int, _Image]]:
    """(shard, image) for every image of a shard not kept: a shard is kept (``resume``) when an earlier run
    finished it with the same plan. One pass over the catalogue; plan.hashes / plan.reused filled on the way."""
    it = catalogue.images(img_loc)
    k = 0
    while chunk := list(itertools.islice(it, plan.shard_size)):
        plan.hashes[k] = _plan_sha256(k, chunk, plan.opts)
        if resume and _finished(out, k, plan.hashes[k]):
            plan.reused.add(k)
        else:
            yield from ((k, img) for img in chunk)
        k += 1


def _write_shards(out: Location, img_loc: Location, catalogue: _Catalogue, plan: _ShardPlan, cfg: IngestConfig) -> None:
    """Read + hash + decode + convert the images of every shard not kept, in parallel; write them in id order, each
    shard committed (tar renamed, part written) when its last image is in."""
    from PIL import Image

    read = _reader(img_loc)
    shard: ShardRun | None = None
    pil_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # ingest.max_image_pixels is checked on each header instead (process-wide)
    try:
        for (k, img), sample in _ordered_map(
            lambda item: _prepare(item[1], SHARD_PATTERN.format(item[0]), read, plan.opts),
            _work(out, img_loc, catalogue, plan, cfg.resume),
            cfg.workers,
        ):
            if shard is None or shard.index != k:
                if shard is not None:
                    commit_shard(out, shard)
                shard = ShardRun(k, plan.hashes[k], out.child(SHARD_PATTERN.format(k)))
            if sample.probe.ok:
                shard.write(sample)
            else:
                shard.drop(img, sample.probe)
        if shard is not None:
            commit_shard(out, shard)
            shard = None
    finally:
        Image.MAX_IMAGE_PIXELS = pil_limit
        if shard is not None:  # interrupted: drop the half-written shard; finished ones stay for a re-run
            shard.abort()


# -- the final files, assembled from the catalogue and the parts ----------------------------------------------


@dataclass
class _Totals:
    """What the shards' parts hold, summed, and what was quarantined (catalogue + parts)."""

    images: int = 0
    annotations: int = 0
    shards: int = 0  # shards with a tar (a shard whose images all failed has none)
    conversions: Counter[str] = field(default_factory=Counter)
    quarantined: Counter[str] = field(default_factory=Counter)  # reason -> rows
    annotations_quarantined: int = 0

    def count(self, row: dict[str, Any]) -> None:
        self.quarantined[row["reason"]] += 1
        self.annotations_quarantined += row["level"] == "annotation"


def _assemble(out: Location, planned: int, catalogue: _Catalogue) -> _Totals:
    """manifest.csv from the parts, in shard order; ingest_quarantine.csv: the catalogue's rows, then the parts'.
    Both are streamed (one part in memory at a time); the parts' dropped images are added to the catalogue's."""
    totals = _Totals()
    manifest, quarantine = out.child("manifest.csv"), out.child("ingest_quarantine.csv")
    with (
        out.fs.open(manifest.path + ".tmp", "w", encoding="utf-8", newline="") as mfh,
        out.fs.open(quarantine.path + ".tmp", "w", encoding="utf-8", newline="") as qfh,
    ):
        mfh.write(",".join(MANIFEST_COLUMNS) + "\n")
        qwriter = csv.DictWriter(qfh, fieldnames=QUARANTINE_COLUMNS, lineterminator="\n")
        qwriter.writeheader()
        for row in catalogue.quarantine_rows():
            qwriter.writerow(row)
            totals.count(row)
        for k in range(planned):
            part = _read_part(out, k)
            if part is None:
                raise IngestError(f"{_part_loc(out, k).shown}: shard part vanished while ingesting; re-run ingest")
            mfh.write(part["manifest_csv"])
            qwriter.writerows(part["quarantine"])
            for row in part["quarantine"]:
                totals.count(row)
            catalogue.images_dropped.update(part["images_dropped"])
            totals.conversions.update(part["conversions"])
            totals.images += part["images"]
            totals.annotations += part["annotations"]
            totals.shards += part["tar_bytes"] is not None
    out.fs.mv(quarantine.path + ".tmp", quarantine.path)
    out.fs.mv(manifest.path + ".tmp", manifest.path)
    return totals


def _summarize(catalogue: _Catalogue, totals: _Totals, planned: int, ann_shown: str) -> dict[str, Any]:
    """The counts of ingest_summary.json, after checking that every image and every caption is accounted for."""
    images_dropped, images_in, anns_in = catalogue.images_dropped, catalogue.images_in, catalogue.annotations_in
    summary = {
        "images_in": images_in,
        "images_written": totals.images,
        "images_dropped": dict(sorted(images_dropped.items())),
        "annotations_in": anns_in,
        "annotations_written": totals.annotations,
        "annotations_quarantined": totals.annotations_quarantined,
        "quarantined": dict(sorted(totals.quarantined.items())),
        "conversions": dict(sorted(totals.conversions.items())),
        "shards": totals.shards,
        "shards_planned": planned,
    }
    if totals.annotations + totals.annotations_quarantined != anns_in:
        raise AssertionError(
            f"ingest invariant broken: {totals.annotations} written + {totals.annotations_quarantined} "
            f"quarantined != {anns_in} annotations in {ann_shown}"
        )
    if totals.images + sum(images_dropped.values()) != images_in:
        raise AssertionError(
            f"ingest invariant broken: {totals.images} images written + "
            f"{sum(images_dropped.values())} dropped != {images_in} in {ann_shown}"
        )
    return summary
