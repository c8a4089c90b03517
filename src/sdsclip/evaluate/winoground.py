"""Winoground (Thrush et al., 2022) on its official on-disk layout: ``examples.jsonl`` + ``images/``.

For example k with captions c0, c1 and images i0, i1 and a similarity s (higher = better match):
  text score  : s(c0, i0) > s(c1, i0)  and  s(c1, i1) > s(c0, i1)
  image score : s(c0, i0) > s(c0, i1)  and  s(c1, i1) > s(c1, i0)
  group score : both
Comparisons are strict, as in the official code: a tie counts as wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from PIL import Image

REQUIRED_FIELDS = ("id", "caption_0", "caption_1", "image_0", "image_1", "collapsed_tag")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class WinogroundDataError(ValueError):
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
    num_main_preds: int
    collapsed_tag: str


def _image_path(images_dir: Path, name: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        path = images_dir / f"{name}{suffix}"
        if path.is_file():
            return path
    return None


def load_examples(data_dir: Path) -> list[Example]:
    data_dir = Path(data_dir)
    path = data_dir / "examples.jsonl"
    if not path.is_file():
        raise WinogroundDataError(f"{path}: not found (--data must be a dir with examples.jsonl and images/)")
    examples: list[Example] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise WinogroundDataError(f"{path}:{lineno}: not valid JSON ({err.msg}); fix or delete the line") from None
        missing = [f for f in REQUIRED_FIELDS if f not in rec]
        if missing:
            raise WinogroundDataError(f"{path}:{lineno}: missing field(s) {', '.join(missing)}")
        for k in (0, 1):
            if _image_path(data_dir / "images", str(rec[f"image_{k}"])) is None:
                raise WinogroundDataError(
                    f"{path}:{lineno}: image {rec[f'image_{k}']!r} not found under {data_dir / 'images'}"
                )
        examples.append(
            Example(
                id=int(rec["id"]), caption_0=str(rec["caption_0"]), caption_1=str(rec["caption_1"]),
                image_0=str(rec["image_0"]), image_1=str(rec["image_1"]), tag=str(rec.get("tag", "")),
                secondary_tag=str(rec.get("secondary_tag", "")), num_main_preds=int(rec.get("num_main_preds", 1)),
                collapsed_tag=str(rec["collapsed_tag"]),
            )
        )
    if not examples:
        raise WinogroundDataError(f"{path}: no examples")
    return examples


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


def winoground_metrics(examples: list[Example], scores: torch.Tensor) -> dict:
    result = metrics_from_scores(scores)
    by_tag: dict[str, dict] = {}
    for tag in sorted({e.collapsed_tag for e in examples}):
        idx = torch.tensor([i for i, e in enumerate(examples) if e.collapsed_tag == tag])
        by_tag[tag] = metrics_from_scores(scores[idx])
    result["by_collapsed_tag"] = by_tag
    return result


def score_examples(scorer, data_dir: Path, examples: list[Example]) -> torch.Tensor:
    """Similarities [n, caption, image] for every example, scored in one batched pass."""
    images_dir = Path(data_dir) / "images"
    image_names = sorted({e.image_0 for e in examples} | {e.image_1 for e in examples})
    captions = sorted({e.caption_0 for e in examples} | {e.caption_1 for e in examples})
    img_index = {name: i for i, name in enumerate(image_names)}
    cap_index = {c: i for i, c in enumerate(captions)}
    images = []
    for name in image_names:
        with Image.open(_image_path(images_dir, name)) as im:
            images.append(im.convert("RGB"))
    pairs = [
        (img_index[getattr(e, f"image_{i}")], cap_index[getattr(e, f"caption_{c}")])
        for e in examples for c in (0, 1) for i in (0, 1)
    ]
    return scorer.score(images, captions, pairs).reshape(len(examples), 2, 2)


def score_lines(examples: Iterable[Example], scores: torch.Tensor) -> list[str]:
    """The official score-file form: one {"label": "{id}_c{c}_i{i}", "score": x} per similarity."""
    return [
        json.dumps({"label": f"{e.id}_c{c}_i{i}", "score": float(scores[n, c, i])})
        for n, e in enumerate(examples) for c in (0, 1) for i in (0, 1)
    ]


def evaluate_winoground(scorer, data_dir: Path, out: Path, scores_out: Path | None = None) -> dict:
    examples = load_examples(Path(data_dir))
    scores = score_examples(scorer, Path(data_dir), examples)
    result = winoground_metrics(examples, scores)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    if scores_out is not None:
        Path(scores_out).parent.mkdir(parents=True, exist_ok=True)
        Path(scores_out).write_text("\n".join(score_lines(examples, scores)) + "\n")
    return result
