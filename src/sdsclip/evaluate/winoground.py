"""Winoground (Thrush et al., 2022) on its official on-disk layouts.

Layouts (``--data DIR``):
  - original: ``examples.jsonl`` + ``images/{image_k}.png|jpg``;
  - Hugging Face parquet (``facebook/winoground`` as ``datasets`` stores it): ``*.parquet`` files anywhere under
    DIR (e.g. ``data/test-00000-of-00001.parquet`` or ``default/test/0000.parquet``) with columns ``id,
    image_0, image_1, caption_0, caption_1, tag, secondary_tag, num_main_preds, collapsed_tag``, images as
    ``{"bytes": ..., "path": ...}`` structs. When both are present, ``examples.jsonl`` wins.

For example k with captions c0, c1 and images i0, i1 and a similarity s (higher = better match):
  text score  : s(c0, i0) > s(c1, i0)  and  s(c1, i1) > s(c0, i1)
  image score : s(c0, i0) > s(c0, i1)  and  s(c1, i1) > s(c1, i0)
  group score : both
Comparisons are strict, as in the official code: a tie counts as wrong.

The diffusion teacher's image score (two images competing for one caption) uses Diffusion-ITM's correction when
its ``image_uncond_correction`` is on (eval.teacher_image_uncond_correction): s(c, i) = -(err(i, c) - err(i, "")),
which removes how hard each image is to denoise at all; the text score is unchanged by it (a per-image constant).
The metrics then also carry the uncorrected scores (``uncorrected``), and the score file's ``score`` is the
corrected similarity (so the official statistics script reproduces the reported numbers) with the raw
``-err(i, c)`` as ``raw_score`` (comparable with a run without the correction and with the other benchmarks).

Subsets are filtered exactly as the official statistics script (``filter_examples``) does, by equality of one
field: ``collapsed_tag`` (Object / Relation / Both), ``num_main_preds`` (1 / 2) and ``secondary_tag`` (the whole
string, so an item tagged ``"Symbolic, Series"`` is in neither the Symbolic nor the Series subset).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from sdsclip.evaluate.common import (
    EvalDataError,
    SkipLog,
    check_on_missing,
    missing_image,
    open_rgb,
    score_pairs,
    write_json,
)

REQUIRED_FIELDS = ("id", "caption_0", "caption_1", "image_0", "image_1", "collapsed_tag")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
COLLAPSED_TAGS = ("Object", "Relation", "Both")
#: the secondary_tag values the official statistics script reports (any other non-empty value is reported too)
OFFICIAL_SECONDARY_TAGS = ("Symbolic", "Pragmatics", "Series")
DEFAULT_CHUNK_EXAMPLES = 512  # examples per scorer call (bounded memory)


class WinogroundDataError(EvalDataError):
    """Bad Winoground data; the message names the file and line and says what to fix."""


@dataclass(frozen=True)
class Example:
    id: int
    caption_0: str
    caption_1: str
    image_0: str
    image_1: str
    tag: str
    secondary_tag: str
    num_main_preds: int | None
    collapsed_tag: str


@dataclass
class WinogroundData:
    examples: list[Example]
    layout: str  # "jsonl" | "parquet"
    source: Path
    load_image: Callable[[str], Image.Image]
    skipped: SkipLog = field(default_factory=SkipLog)


def _image_path(images_dir: Path, name: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        path = images_dir / f"{name}{suffix}"
        if path.is_file():
            return path
    return None


def _example(rec: dict[str, Any], where: str) -> Example:
    missing = [f for f in REQUIRED_FIELDS if f not in rec]
    if missing:
        raise WinogroundDataError(f"{where}: missing field(s) {', '.join(missing)}")
    if rec["collapsed_tag"] not in COLLAPSED_TAGS:
        raise WinogroundDataError(
            f"{where}: unknown collapsed_tag {rec['collapsed_tag']!r} (expected one of {', '.join(COLLAPSED_TAGS)})"
        )
    try:
        ex_id = int(rec["id"])
        preds = rec.get("num_main_preds")
        preds = None if preds is None else int(preds)
    except (TypeError, ValueError):
        raise WinogroundDataError(f"{where}: id and num_main_preds must be integers") from None
    for key in ("caption_0", "caption_1"):
        if not isinstance(rec[key], str) or not rec[key].strip():
            raise WinogroundDataError(f"{where}: {key} must be a non-empty string")
    return Example(
        id=ex_id,
        caption_0=rec["caption_0"],
        caption_1=rec["caption_1"],
        image_0=str(rec["image_0"]),
        image_1=str(rec["image_1"]),
        tag=str(rec.get("tag") or ""),
        secondary_tag=str(rec.get("secondary_tag") or ""),
        num_main_preds=preds,
        collapsed_tag=rec["collapsed_tag"],
    )


def _check_unique(examples: list[Example], wheres: list[str]) -> None:
    seen: dict[int, str] = {}
    for ex, where in zip(examples, wheres):
        if ex.id in seen:
            raise WinogroundDataError(f"{where}: duplicate id {ex.id} (first at {seen[ex.id]})")
        seen[ex.id] = where


def _load_jsonl(data_dir: Path, on_missing: str) -> WinogroundData:
    path = data_dir / "examples.jsonl"
    images_dir = data_dir / "images"
    examples, wheres, skipped = [], [], SkipLog()
    paths: dict[str, Path] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise WinogroundDataError(f"{where}: not valid JSON ({err.msg}); fix or delete the line") from None
        if not isinstance(rec, dict):
            raise WinogroundDataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        ex = _example(rec, where)
        found = {name: paths.get(name) or _image_path(images_dir, name) for name in (ex.image_0, ex.image_1)}
        absent = [name for name, p in found.items() if p is None]
        if absent:
            missing_image(
                WinogroundDataError, on_missing, skipped, where, f"image {absent[0]!r} not found under {images_dir}"
            )
            continue
        paths.update({name: p for name, p in found.items() if p is not None})  # all, after the check above
        examples.append(ex)
        wheres.append(where)
    _check_unique(examples, wheres)

    def load(name: str) -> Image.Image:
        return open_rgb(paths[name])

    return WinogroundData(examples, "jsonl", path, load, skipped)


def parquet_files(data_dir: Path) -> list[Path]:
    files = sorted(p for p in Path(data_dir).rglob("*.parquet") if p.is_file())
    test = [p for p in files if "test" in p.as_posix().lower()]
    return test or files


def _image_bytes(value: Any) -> bytes | None:
    if isinstance(value, dict):
        value = value.get("bytes")
    return bytes(value) if value else None


def _load_parquet(files: list[Path], on_missing: str) -> WinogroundData:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow ships with the project's dependencies
        raise WinogroundDataError(
            f"{files[0]}: reading the parquet layout needs pyarrow (pip install pyarrow)"
        ) from None
    examples, wheres, skipped = [], [], SkipLog()
    blobs: dict[str, bytes] = {}
    for path in files:
        try:
            table = pq.read_table(path)
        except Exception as err:  # noqa: BLE001 - any pyarrow failure means an unreadable file
            raise WinogroundDataError(f"{path}: not a readable parquet file ({err})") from None
        missing_cols = [f for f in REQUIRED_FIELDS if f not in table.column_names]
        if missing_cols:
            raise WinogroundDataError(f"{path}: missing column(s) {', '.join(missing_cols)}")
        for row, rec in enumerate(table.to_pylist()):
            where = f"{path}:row {row}"
            images = {k: _image_bytes(rec.get(f"image_{k}")) for k in (0, 1)}
            rec = {**rec, **{f"image_{k}": f"ex_{rec.get('id')}_img_{k}" for k in (0, 1)}}
            ex = _example(rec, where)
            absent = [k for k, b in images.items() if b is None]
            if absent:
                missing_image(WinogroundDataError, on_missing, skipped, where, f"image_{absent[0]} has no bytes")
                continue
            blobs.update({ex.image_0: images[0] or b"", ex.image_1: images[1] or b""})  # both present here
            examples.append(ex)
            wheres.append(where)
    _check_unique(examples, wheres)

    def load(name: str) -> Image.Image:
        with Image.open(io.BytesIO(blobs[name])) as im:
            return im.convert("RGB")

    return WinogroundData(examples, "parquet", files[0] if len(files) == 1 else files[0].parent, load, skipped)


def load_data(data_dir: Path, on_missing: str = "error") -> WinogroundData:
    """Read either layout. Bad records raise WinogroundDataError naming file and line (jsonl) or row
    (parquet); a missing image raises too, or with ``on_missing="skip"`` drops its example and counts it."""
    check_on_missing(on_missing)
    data_dir = Path(data_dir)
    if (data_dir / "examples.jsonl").is_file():
        data = _load_jsonl(data_dir, on_missing)
    elif files := parquet_files(data_dir):
        data = _load_parquet(files, on_missing)
    else:
        raise WinogroundDataError(
            f"{data_dir / 'examples.jsonl'}: not found (--data must be a dir with examples.jsonl and images/, "
            "or with the Hugging Face *.parquet files)"
        )
    if not data.examples:
        raise WinogroundDataError(
            f"{data.source}: no examples"
            + (f" ({len(data.skipped)} skipped: {data.skipped.items[0]['reason']})" if len(data.skipped) else "")
        )
    return data


def load_examples(data_dir: Path) -> list[Example]:
    return load_data(Path(data_dir)).examples


def metrics_from_scores(scores: torch.Tensor) -> dict[str, float | int]:
    """scores[n, c, i] = similarity of caption c and image i in example n -> official scores in [0, 1]."""
    s = torch.as_tensor(scores, dtype=torch.float64)
    text = (s[:, 0, 0] > s[:, 1, 0]) & (s[:, 1, 1] > s[:, 0, 1])
    image = (s[:, 0, 0] > s[:, 0, 1]) & (s[:, 1, 1] > s[:, 1, 0])
    group = text & image
    n = int(s.shape[0])
    return {
        "n": n,
        "text_score": float(text.double().mean()) if n else 0.0,
        "image_score": float(image.double().mean()) if n else 0.0,
        "group_score": float(group.double().mean()) if n else 0.0,
    }


def _field_is(name: str, value: object) -> Callable[[Example], bool]:
    """The subset predicate "field ``name`` equals ``value``" of the official statistics script."""
    return lambda example: getattr(example, name) == value


def _subset(examples: list[Example], scores: torch.Tensor, keep: Callable[[Example], bool]) -> dict:
    idx = torch.tensor([i for i, e in enumerate(examples) if keep(e)], dtype=torch.long)
    return metrics_from_scores(scores[idx])


def winoground_metrics(examples: list[Example], scores: torch.Tensor) -> dict:
    """Overall scores plus the official statistics script's subsets (one field equal to one value)."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    result: dict[str, Any] = metrics_from_scores(scores)
    result["by_collapsed_tag"] = {
        tag: _subset(examples, scores, _field_is("collapsed_tag", tag))
        for tag in sorted({e.collapsed_tag for e in examples})
    }
    result["by_num_main_preds"] = {
        str(v): _subset(examples, scores, _field_is("num_main_preds", v))
        for v in sorted({e.num_main_preds for e in examples if e.num_main_preds is not None})
    }
    result["by_secondary_tag"] = {
        tag: _subset(examples, scores, _field_is("secondary_tag", tag))
        for tag in sorted({e.secondary_tag for e in examples if e.secondary_tag})
    }
    return result


def uses_uncond_correction(scorer) -> bool:
    """Whether ``scorer`` (the teacher, with eval.teacher_image_uncond_correction) scores image competition
    with its unconditional error subtracted."""
    return bool(getattr(scorer, "image_uncond_correction", False)) and callable(
        getattr(scorer, "score_with_uncond", None)
    )


def score_examples(
    scorer,
    data: WinogroundData | Path,
    examples: list[Example] | None = None,
    chunk_examples: int = DEFAULT_CHUNK_EXAMPLES,
) -> torch.Tensor:
    """Similarities [n, caption, image] for every example: batched ``scorer.score`` calls over chunks of
    examples (each chunk: its unique images and captions in one call), so memory stays bounded."""
    return _score_chunks(scorer, data, examples, chunk_examples, uncond=False)[0]


def score_examples_with_uncond(
    scorer,
    data: WinogroundData | Path,
    examples: list[Example] | None = None,
    chunk_examples: int = DEFAULT_CHUNK_EXAMPLES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw similarities [n, caption, image], the unconditional error err(image, "") [n, image]) through the
    scorer's ``score_with_uncond``; the corrected similarity is ``raw + uncond[:, None, :]``."""
    return _score_chunks(scorer, data, examples, chunk_examples, uncond=True)


def _score_chunks(scorer, data, examples, chunk_examples: int, uncond: bool):
    if not isinstance(data, WinogroundData):
        data = load_data(Path(data))
    examples = data.examples if examples is None else examples
    out, offsets = [], []
    for start in range(0, len(examples), chunk_examples):
        chunk = examples[start : start + chunk_examples]
        image_names = list(dict.fromkeys(n for e in chunk for n in (e.image_0, e.image_1)))
        captions = list(dict.fromkeys(c for e in chunk for c in (e.caption_0, e.caption_1)))
        img_index = {name: i for i, name in enumerate(image_names)}
        cap_index = {c: i for i, c in enumerate(captions)}
        loaders = [partial(data.load_image, name) for name in image_names]
        pairs = [
            (img_index[getattr(e, f"image_{i}")], cap_index[getattr(e, f"caption_{c}")])
            for e in chunk
            for c in (0, 1)
            for i in (0, 1)
        ]
        if uncond:
            raw, err_empty = scorer.score_with_uncond([load() for load in loaders], captions, pairs)
            out.append(raw.reshape(len(chunk), 2, 2).double())
            offsets.append(
                torch.stack(
                    [err_empty[[img_index[getattr(e, f"image_{i}")] for e in chunk]] for i in (0, 1)], dim=1
                ).double()
            )
        else:
            out.append(score_pairs(scorer, loaders, captions, pairs).reshape(len(chunk), 2, 2).double())
    scores = torch.cat(out) if out else torch.empty(0, 2, 2, dtype=torch.float64)
    if not uncond:
        return scores, None
    return scores, (torch.cat(offsets) if offsets else torch.empty(0, 2, dtype=torch.float64))


def score_lines(examples: Iterable[Example], scores: torch.Tensor, raw: torch.Tensor | None = None) -> list[str]:
    """The official score-file form: one {"label": "{id}_c{c}_i{i}", "score": x} per similarity, plus
    ``raw_score`` (the teacher's uncorrected -err) when ``scores`` carry the unconditional correction."""
    values = torch.as_tensor(scores, dtype=torch.float64).tolist()
    raws = torch.as_tensor(raw, dtype=torch.float64).tolist() if raw is not None else None
    # json.dumps writes a float as repr(float); formatting the line directly is the same text, 10x faster
    if raws is None:
        return [
            f'{{"label": "{e.id}_c{c}_i{i}", "score": {json.dumps(values[n][c][i])}}}'
            for n, e in enumerate(examples)
            for c in (0, 1)
            for i in (0, 1)
        ]
    return [
        f'{{"label": "{e.id}_c{c}_i{i}", "score": {json.dumps(values[n][c][i])}, '
        f'"raw_score": {json.dumps(raws[n][c][i])}}}'
        for n, e in enumerate(examples)
        for c in (0, 1)
        for i in (0, 1)
    ]


def evaluate_winoground(
    scorer,
    data_dir: Path,
    out: Path,
    scores_out: Path | None = None,
    on_missing: str = "error",
    chunk_items: int | None = None,
) -> dict:
    """Metrics JSON ``out`` (and the official score file ``scores_out``); ``chunk_items``: examples per scorer
    call (default 512)."""
    data = load_data(Path(data_dir), on_missing)
    chunk = chunk_items or DEFAULT_CHUNK_EXAMPLES
    raw = None
    if uses_uncond_correction(scorer):
        raw, err_empty = score_examples_with_uncond(scorer, data, chunk_examples=chunk)
        # -(err(i, c) - err(i, "")) = raw + err(i, ""): in float64, exact for float32 errors, so a comparison
        # of two captions for one image (the text score) is the same as on the raw scores
        scores = raw + err_empty[:, None, :]
    else:
        scores = score_examples(scorer, data, chunk_examples=chunk)
    result = winoground_metrics(data.examples, scores)
    if hasattr(scorer, "image_uncond_correction"):
        result["image_uncond_correction"] = raw is not None
    if raw is not None:
        result["uncorrected"] = metrics_from_scores(raw)
    result["layout"] = data.layout
    result["skipped"] = data.skipped.summary()
    data.skipped.announce("winoground")
    write_json(Path(out), result)
    if scores_out is not None:
        Path(scores_out).parent.mkdir(parents=True, exist_ok=True)
        Path(scores_out).write_text("\n".join(score_lines(data.examples, scores, raw)) + "\n")
    return result
