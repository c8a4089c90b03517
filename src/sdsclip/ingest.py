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
the writing thread only writes bytes. The annotations JSON is the only thing loaded whole.

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
import json
import logging
import os
import re
import tarfile
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TypeGuard

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


def _load_coco(loc: Location) -> tuple[list[Any], list[Any]]:
    path = loc.shown
    fix = "expected an MS-COCO captions file (top-level 'images' and 'annotations' lists)"
    try:
        raw_bytes = loc.read_bytes()
    except FileNotFoundError:
        raise IngestError(f"{path}: annotations file not found (check data.coco_root and ingest.splits)") from None
    except IsADirectoryError:
        raise IngestError(f"{path}: is a directory, not an annotations file") from None
    except OSError as err:
        raise IngestError(f"{path}: cannot read ({_one_line(err)})") from None
    if not raw_bytes.strip():
        raise IngestError(f"{path}: empty file; {fix}")
    encoding = json.detect_encoding(raw_bytes)
    try:
        # Bytes that are not UTF-8 inside a string become lone surrogates: that caption (or file name) is then
        # quarantined on its own instead of failing the whole split.
        text = raw_bytes.decode(encoding, "surrogateescape" if encoding.startswith("utf-8") else "strict")
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise IngestError(
            f"{path}: not valid JSON (line {err.lineno} column {err.colno}: {err.msg}); "
            f"re-export or re-download the file ({fix})"
        ) from None
    except UnicodeDecodeError as err:
        raise IngestError(f"{path}: not {encoding} text ({_one_line(err)}); {fix}") from None
    except RecursionError:
        raise IngestError(f"{path}: JSON nested too deeply; {fix}") from None
    if not isinstance(raw, dict):
        raise IngestError(f"{path}: top level is a JSON {type(raw).__name__}, not an object; {fix}")
    missing = [k for k in ("images", "annotations") if k not in raw]
    if missing:
        raise IngestError(f"{path}: missing top-level key(s) {', '.join(map(repr, missing))}; {fix}")
    for key in ("images", "annotations"):
        if not isinstance(raw[key], list):
            raise IngestError(f"{path}: top-level '{key}' is a JSON {type(raw[key]).__name__}, not a list; {fix}")
    return raw["images"], raw["annotations"]


def _safe_file_name(name: Any) -> TypeGuard[str]:
    if not isinstance(name, str) or not name.strip() or "\x00" in name or "\\" in name or not _utf8_ok(name):
        return False
    p = PurePosixPath(name)
    return not p.is_absolute() and ".." not in p.parts and bool(p.parts)


def _caption_problem(caption: str) -> tuple[str, str] | None:
    """(reason, detail) when a string caption is unusable as text, else None."""
    if not caption.strip():
        return "empty_caption", "empty caption" if not caption else "caption is whitespace only"
    if not _utf8_ok(caption):
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
    return ImageProbe(
        True,
        data=data,
        sha256=sha,
        size=size,
        width=width,
        height=height,
        mode="RGB",
        format=fmt,
        conversion="none",
        stored_sha256=sha,
        ext=_FORMAT_EXT[fmt],
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
            return ImageProbe(
                True,
                data=data,
                sha256=sha,
                size=size,
                width=width,
                height=height,
                mode=shown_mode,
                format=fmt,
                conversion="none",
                stored_sha256=sha,
                ext=ext,
            )
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


def _ordered_map(fn: Callable[[Any], Any], items: list[Any], workers: int) -> Iterator[tuple[Any, Any]]:
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


def _plan_sha256(index: int, images: list[_Image], sizes: dict[str, int], opts: ProbeOptions) -> str:
    plan = {
        "format": PART_FORMAT,
        "shard": index,
        "max_pixels": opts.max_pixels,
        "reencode": opts.reencode,
        "quality": opts.quality if opts.reencode == "jpeg" else None,
        "images": [
            [img.image_id, img.file_name, img.source, sizes.get(img.file_name), img.annotations] for img in images
        ],
    }
    return hashlib.sha256(json.dumps(plan, ensure_ascii=True, separators=(",", ":")).encode()).hexdigest()


def _source_sizes(images: Location) -> dict[str, int]:
    """file name (relative to the image folder) -> size, from one listing (no per-file request)."""
    try:
        found = images.fs.find(images.path, detail=True)
    except (FileNotFoundError, OSError):
        return {}
    prefix = images.path.rstrip("/") + "/"
    return {
        p[len(prefix) :]: info.get("size")
        for p, info in found.items()
        if p.startswith(prefix) and info.get("type", "file") == "file"
    }


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
    images_raw, anns_raw = _load_coco(ann_loc)
    if not img_loc.fs.isdir(img_loc.path):
        raise IngestError(
            f"{img_loc.shown}: image folder not found (expected images/<split>/ or <split>/ next to annotations/)"
        )
    catalogue = _catalogue(images_raw, anns_raw, img_loc)
    plan = _plan_shards(catalogue.todo, img_loc, cfg)
    _prepare_out_dir(out, plan, cfg.resume)
    _write_shards(out, img_loc, plan, cfg.workers)
    totals = _assemble_manifest(out, len(plan.shards), catalogue)
    _write_quarantine(out, catalogue.quarantine)
    summary = _summarize(catalogue, totals, len(images_raw), len(anns_raw), len(plan.shards), ann_loc.shown)
    out.child("ingest_summary.json").write_atomic(
        (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode("utf-8")
    )
    seconds = time.perf_counter() - t0
    log.info(
        "ingest %s: %d/%d images, %d/%d captions, %d shards (%d kept from an earlier run), %.1fs",
        ann_loc.shown,
        totals.images,
        len(images_raw),
        totals.annotations,
        len(anns_raw),
        totals.shards,
        len(plan.reused),
        seconds,
    )
    return {**summary, "shards_reused": len(plan.reused), "seconds": round(seconds, 3)}


# -- reading the annotations file's records -------------------------------------------------------------------


@dataclass
class _Catalogue:
    """The split after checking every record: the images to ingest (by id, their captions by annotation id),
    the quarantine rows so far and the images dropped per reason (the shards' parts add theirs later)."""

    todo: list[_Image] = field(default_factory=list)
    quarantine: list[dict[str, Any]] = field(default_factory=list)
    images_dropped: Counter[str] = field(default_factory=Counter)


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


def _catalogue(images_raw: list[Any], anns_raw: list[Any], img_loc: Location) -> _Catalogue:
    """Check images[] and annotations[]; quarantine what is unusable, in the order ingest_quarantine.csv lists it."""
    catalogue = _Catalogue()
    images, bad_images = _read_images(images_raw, img_loc, catalogue)
    bad_image_anns = _read_annotations(anns_raw, images, bad_images, catalogue.quarantine)
    _quarantine_bad_images(bad_images, bad_image_anns, catalogue.quarantine)
    catalogue.todo = _images_with_captions(images, catalogue)
    return catalogue


def _read_images(
    images_raw: list[Any], img_loc: Location, catalogue: _Catalogue
) -> tuple[dict[int, _Image], dict[int, tuple[str, str, Any]]]:
    """images[] -> (usable images by id, int id of an unusable record -> (reason, detail, file name)). An unusable
    record with an id keeps its captions for :func:`_quarantine_bad_images`; one without is quarantined here."""
    images: dict[int, _Image] = {}
    bad_images: dict[int, tuple[str, str, Any]] = {}
    for i, rec in enumerate(images_raw):
        img_id = rec.get("id") if isinstance(rec, dict) else None
        name = rec.get("file_name") if isinstance(rec, dict) else None
        if not isinstance(rec, dict) or not _is_int(img_id) or not _safe_file_name(name):
            detail = f"images[{i}]: " + (
                "not an object"
                if not isinstance(rec, dict)
                else "'id' is not an integer"
                if not _is_int(img_id)
                else "'file_name' is not a relative UTF-8 path inside the image folder"
            )
            catalogue.images_dropped["bad_image_record"] += 1
            if _is_int(img_id) and img_id not in images and img_id not in bad_images:
                bad_images[img_id] = ("bad_image_record", detail, name)  # its captions are quarantined with it
            else:  # no usable id: nothing can point at it
                catalogue.quarantine.append(
                    _quarantine_row(
                        "bad_image_record",
                        "image",
                        image_id="" if img_id is None else _printable(img_id),
                        file_name=name,
                        detail=detail,
                    )
                )
            continue
        if img_id in images or img_id in bad_images:
            catalogue.images_dropped["duplicate_image_id"] += 1
            catalogue.quarantine.append(
                _quarantine_row(
                    "duplicate_image_id",
                    "image",
                    image_id=img_id,
                    file_name=name,
                    source=join(img_loc.shown, name),
                    detail=f"images[{i}]: id {img_id} already used by an earlier record",
                )
            )
            continue
        rel = PurePosixPath(name).as_posix()
        images[img_id] = _Image(img_id, rel, f"{img_loc.path}/{rel}", join(img_loc.shown, rel))
    return images, bad_images


def _read_annotations(
    anns_raw: list[Any],
    images: dict[int, _Image],
    bad_images: dict[int, tuple[str, str, Any]],
    quarantine: list[dict[str, Any]],
) -> dict[int, list[tuple[int, Any]]]:
    """annotations[]: usable captions are added to their image; returns the captions of unusable image records
    (image id -> [(annotation id, caption)]), which are quarantined with their image."""
    seen_ann: set[int] = set()
    bad_image_anns: dict[int, list[tuple[int, Any]]] = {}
    for i, rec in enumerate(anns_raw):
        ann_id = rec.get("id") if isinstance(rec, dict) else None
        img_id = rec.get("image_id") if isinstance(rec, dict) else None
        caption = rec.get("caption") if isinstance(rec, dict) else None
        shown_img = "" if img_id is None else img_id if _is_int(img_id) else _printable(img_id)
        if not isinstance(rec, dict) or not _is_int(ann_id):
            what = "not an object" if not isinstance(rec, dict) else "'id' is not an integer"
            quarantine.append(
                _quarantine_row(
                    "bad_annotation_record",
                    "annotation",
                    annotation_id="" if ann_id is None else _printable(ann_id),
                    image_id=shown_img,
                    caption=caption,
                    detail=f"annotations[{i}]: {what}",
                )
            )
            continue
        if ann_id in seen_ann:
            quarantine.append(
                _quarantine_row(
                    "duplicate_annotation_id",
                    "annotation",
                    annotation_id=ann_id,
                    image_id=shown_img,
                    caption=caption,
                    detail=f"annotations[{i}]: id {ann_id} already used by an earlier annotation",
                )
            )
            continue
        seen_ann.add(ann_id)
        if _is_int(img_id) and img_id in bad_images:
            bad_image_anns.setdefault(img_id, []).append((ann_id, caption))
            continue
        rejected = _attach_caption(i, ann_id, img_id, shown_img, caption, images)
        if rejected:
            quarantine.append(rejected)
    return bad_image_anns


def _attach_caption(
    i: int, ann_id: int, img_id: Any, shown_img: Any, caption: Any, images: dict[int, _Image]
) -> dict[str, Any] | None:
    """Add annotations[i]'s caption to its image; or, when the image id is unknown or the caption unusable, return
    its quarantine row instead."""
    if not _is_int(img_id) or img_id not in images:
        return _quarantine_row(
            "unknown_image_id",
            "annotation",
            annotation_id=ann_id,
            image_id=shown_img,
            caption=caption,
            detail=f"annotations[{i}]: image_id {_printable(repr(img_id))} is not an id in images[]",
        )
    img = images[img_id]
    if not isinstance(caption, str):
        return _quarantine_row(
            "bad_caption_type",
            "annotation",
            annotation_id=ann_id,
            image_id=img_id,
            file_name=img.file_name,
            caption=caption,
            detail=f"annotations[{i}]: caption is {type(caption).__name__}, not a string",
        )
    problem = _caption_problem(caption)
    if problem:
        return _quarantine_row(
            problem[0],
            "annotation",
            annotation_id=ann_id,
            image_id=img_id,
            file_name=img.file_name,
            caption=caption,
            detail=f"annotations[{i}]: {problem[1]}",
        )
    img.annotations.append((ann_id, caption))
    return None


def _quarantine_bad_images(
    bad_images: dict[int, tuple[str, str, Any]],
    bad_image_anns: dict[int, list[tuple[int, Any]]],
    quarantine: list[dict[str, Any]],
) -> None:
    """Every caption of an unusable image record, with the record's reason (one ``image`` row when it has none)."""
    for img_id in sorted(bad_images):
        reason, detail, name = bad_images[img_id]
        anns = sorted(bad_image_anns.get(img_id, []), key=lambda a: a[0])
        if not anns:
            quarantine.append(_quarantine_row(reason, "image", image_id=img_id, file_name=name, detail=detail))
        for ann_id, caption in anns:
            quarantine.append(
                _quarantine_row(
                    reason,
                    "annotation",
                    annotation_id=ann_id,
                    image_id=img_id,
                    file_name=name,
                    caption=caption,
                    detail=detail,
                )
            )


def _images_with_captions(images: dict[int, _Image], catalogue: _Catalogue) -> list[_Image]:
    """The images to ingest, by id, their captions by annotation id; an image without one is quarantined."""
    todo: list[_Image] = []
    for img_id in sorted(images):
        img = images[img_id]
        if not img.annotations:
            catalogue.images_dropped["no_caption"] += 1
            catalogue.quarantine.append(
                _quarantine_row(
                    "no_caption",
                    "image",
                    image_id=img_id,
                    file_name=img.file_name,
                    source=img.source,
                    detail="no usable annotation refers to this image",
                )
            )
        else:
            img.annotations.sort(key=lambda a: a[0])
            todo.append(img)
    return todo


# -- planning, resuming, writing the shards -------------------------------------------------------------------


@dataclass
class _ShardPlan:
    """Images in id order, ``shard_size`` per shard, each shard's plan hash, and the shards an earlier run finished
    with the same plan (filled in by :func:`_prepare_out_dir`)."""

    opts: ProbeOptions
    shards: list[list[_Image]]
    hashes: list[str]
    reused: set[int] = field(default_factory=set)


def _plan_shards(todo: list[_Image], img_loc: Location, cfg: IngestConfig) -> _ShardPlan:
    opts = ProbeOptions(cfg.max_image_pixels, cfg.reencode_format, cfg.reencode_quality)
    shards = [todo[i : i + cfg.shard_size] for i in range(0, len(todo), cfg.shard_size)]
    sizes = _source_sizes(img_loc)
    return _ShardPlan(opts, shards, [_plan_sha256(k, chunk, sizes, opts) for k, chunk in enumerate(shards)])


def _prepare_out_dir(out: Location, plan: _ShardPlan, resume: bool) -> None:
    """Create the output folders, remove leftovers of an interrupted run and note the finished shards to keep."""
    planned = len(plan.shards)
    out.fs.makedirs(out.path, exist_ok=True)
    out.fs.makedirs(out.child(PARTS_DIR).path, exist_ok=True)
    _remove_stale(out, planned)
    plan.reused = {k for k in range(planned) if resume and _finished(out, k, plan.hashes[k])}
    if len(plan.reused) < planned or not planned:
        for name in FINAL_FILES:  # never leave a manifest that disagrees with the shards
            out.child(name).remove()


def _write_shards(out: Location, img_loc: Location, plan: _ShardPlan, workers: int) -> None:
    """Read + hash + decode + convert the images of every shard not kept, in parallel; write them in id order, each
    shard committed (tar renamed, part written) when its last image is in."""
    from PIL import Image

    work = [(k, img) for k, chunk in enumerate(plan.shards) if k not in plan.reused for img in chunk]
    read = _reader(img_loc)
    shard: ShardRun | None = None
    pil_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # ingest.max_image_pixels is checked on each header instead (process-wide)
    try:
        for (k, img), sample in _ordered_map(
            lambda item: _prepare(item[1], SHARD_PATTERN.format(item[0]), read, plan.opts), work, workers
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


# -- the final files, assembled from the parts ----------------------------------------------------------------


@dataclass
class _Totals:
    """What the shards' parts hold, summed."""

    images: int = 0
    annotations: int = 0
    shards: int = 0  # shards with a tar (a shard whose images all failed has none)
    conversions: Counter[str] = field(default_factory=Counter)


def _assemble_manifest(out: Location, planned: int, catalogue: _Catalogue) -> _Totals:
    """manifest.csv from the parts, in shard order; the parts' quarantine rows and dropped images go into
    ``catalogue`` after its own."""
    totals = _Totals()
    manifest = out.child("manifest.csv")
    with out.fs.open(manifest.path + ".tmp", "w", encoding="utf-8", newline="") as fh:
        fh.write(",".join(MANIFEST_COLUMNS) + "\n")
        for k in range(planned):
            part = _read_part(out, k)
            if part is None:
                raise IngestError(f"{_part_loc(out, k).shown}: shard part vanished while ingesting; re-run ingest")
            fh.write(part["manifest_csv"])
            catalogue.quarantine.extend(part["quarantine"])
            catalogue.images_dropped.update(part["images_dropped"])
            totals.conversions.update(part["conversions"])
            totals.images += part["images"]
            totals.annotations += part["annotations"]
            totals.shards += part["tar_bytes"] is not None
    out.fs.mv(manifest.path + ".tmp", manifest.path)
    return totals


def _write_quarantine(out: Location, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=QUARANTINE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    out.child("ingest_quarantine.csv").write_atomic(buf.getvalue().encode("utf-8"))


def _summarize(
    catalogue: _Catalogue, totals: _Totals, images_in: int, anns_in: int, planned: int, ann_shown: str
) -> dict[str, Any]:
    """The counts of ingest_summary.json, after checking that every image and every caption is accounted for."""
    qrows, images_dropped = catalogue.quarantine, catalogue.images_dropped
    annotations_quarantined = sum(1 for r in qrows if r["level"] == "annotation")
    summary = {
        "images_in": images_in,
        "images_written": totals.images,
        "images_dropped": dict(sorted(images_dropped.items())),
        "annotations_in": anns_in,
        "annotations_written": totals.annotations,
        "annotations_quarantined": annotations_quarantined,
        "quarantined": dict(sorted(Counter(r["reason"] for r in qrows).items())),
        "conversions": dict(sorted(totals.conversions.items())),
        "shards": totals.shards,
        "shards_planned": planned,
    }
    if totals.annotations + annotations_quarantined != anns_in:
        raise AssertionError(
            f"ingest invariant broken: {totals.annotations} written + {annotations_quarantined} "
            f"quarantined != {anns_in} annotations in {ann_shown}"
        )
    if totals.images + sum(images_dropped.values()) != images_in:
        raise AssertionError(
            f"ingest invariant broken: {totals.images} images written + "
            f"{sum(images_dropped.values())} dropped != {images_in} in {ann_shown}"
        )
    return summary
