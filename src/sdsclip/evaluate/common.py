"""What every benchmark reader and metric shares: data errors, the missing-image policy, skip accounting,
JSON I/O and batched scoring of "one image, several caption options" items.

Bad input is never dropped silently: a malformed record is an error naming the file and line (or record),
and a missing image is either an error (``on_missing="error"``, the default) or a skipped item that is
counted, listed in the metrics JSON under ``skipped`` and announced on stderr (``on_missing="skip"``).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdsclip.errors import UserError

ON_MISSING = ("error", "skip")


class EvalDataError(UserError, ValueError):
    """Bad benchmark data; the message names the file and line (or record) and says what to fix."""


def check_on_missing(on_missing: str) -> str:
    if on_missing not in ON_MISSING:
        raise ValueError(f"on_missing must be one of {ON_MISSING} (got {on_missing!r})")
    return on_missing


@dataclass
class SkipLog:
    """Items left out of a metric, with where and why; written to the metrics JSON as ``skipped``."""

    items: list[dict[str, str]] = field(default_factory=list)

    def add(self, where: str, reason: str) -> None:
        self.items.append({"where": where, "reason": reason})

    def __len__(self) -> int:
        return len(self.items)

    def summary(self, keep: int = 20) -> dict[str, Any]:
        reasons = Counter(item["reason"].split(":")[0] for item in self.items)
        return {"count": len(self.items), "by_reason": dict(sorted(reasons.items())), "first": self.items[:keep]}

    def announce(self, benchmark: str) -> None:
        if self.items:
            first = self.items[0]
            print(
                f"sdsclip evaluate {benchmark}: skipped {len(self.items)} item(s) (first: {first['where']}: "
                f"{first['reason']}); listed under 'skipped' in the metrics JSON",
                file=sys.stderr,
            )


def missing_image(error_cls: type[EvalDataError], on_missing: str, skipped: SkipLog, where: str, what: str) -> None:
    """Apply the policy to one missing image: raise, or count the item as skipped."""
    if on_missing == "error":
        raise error_cls(f"{where}: {what} (or set eval.on_missing: skip to count and skip such items)")
    skipped.add(where, f"missing image: {what}")


def read_json(path: Path, error_cls: type[EvalDataError]) -> Any:
    path = Path(path)
    if not path.is_file():
        raise error_cls(f"{path}: not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise error_cls(f"{path}:{err.lineno}:{err.colno}: not valid JSON ({err.msg})") from None


def write_json(path: Path, payload: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def open_rgb(path: Path, box: tuple[float, float, float, float] | None = None) -> Image.Image:
    """Open an image as RGB (fully decoded), optionally cropped to (left, top, right, bottom) as PIL crops."""
    with Image.open(path) as im:
        im.load()
        rgb = im if im.mode == "RGB" else im.convert("RGB")  # no copy when already RGB
    return rgb.crop(box) if box is not None else rgb


def mean_or_none(values: Sequence[float]) -> float | None:
    return float(sum(values) / len(values)) if len(values) else None


#: overlap image decoding / tokenization with the student's forward: None = only on CUDA, where the forward is
#: asynchronous; on a CPU the forward already uses every core and the extra thread only adds GIL contention
#: (measured with benchmarks/evaluate.py: slower on the 2-core machine, no gain for ViT-B-32 either).
PIPELINE: bool | None = None


def score_pairs(
    scorer, load_images: Sequence[Callable[[], Image.Image]], captions: Sequence[str], pairs: Sequence[tuple[int, int]]
) -> torch.Tensor:
    """``scorer.score`` over lazily loaded images; the same numbers, with the I/O hidden behind the model.

    On CUDA (or with ``PIPELINE = True``) a CLIP student (``embed_images`` / ``tokenize`` / ``embed_tokens`` /
    ``pair_scores``) is fed by one background thread that decodes the images batch by batch and then tokenizes
    the captions while this thread runs the forward passes, so decoding and tokenizing overlap the model.
    Otherwise: the decoded images and one ``score`` call.
    """
    student = all(hasattr(scorer, m) for m in ("embed_images", "tokenize", "embed_tokens", "pair_scores"))
    device = getattr(getattr(scorer, "device", None), "type", "cpu")
    if not student or not (PIPELINE if PIPELINE is not None else device == "cuda"):
        return scorer.score([load() for load in load_images], list(captions), list(pairs))
    from concurrent.futures import ThreadPoolExecutor

    size = max(int(getattr(scorer, "batch_size", 128)), 1)
    batches = [load_images[i : i + size] for i in range(0, len(load_images), size)]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdsclip-io") as pool:
        decoded = [pool.submit(lambda loads: [load() for load in loads], b) for b in batches]
        tokens = pool.submit(scorer.tokenize, list(captions))  # runs after the images, during their forward
        img = torch.cat([scorer.embed_images(f.result()) for f in decoded])
        txt = scorer.embed_tokens(tokens.result())
    return scorer.pair_scores(img, txt, list(pairs))


@dataclass(frozen=True)
class OptionItem:
    """One image and its caption options, scored as one row of a [n_items, n_options] table.

    ``image_key`` identifies the (possibly cropped) image so items sharing it load it once per chunk.
    """

    image_key: Hashable
    load_image: Callable[[], Image.Image]
    options: tuple[str, ...]


def score_options(scorer, items: Sequence[OptionItem], chunk_items: int = 2048) -> torch.Tensor:
    """scores[n, k] = scorer similarity of item n's image and its k-th caption option.

    Items are scored in chunks (bounded memory for real datasets); every chunk is one batched
    ``scorer.score`` call over its unique images and captions. Chunking does not change any score: the
    student embeds each image/caption independently and the teacher's (t, eps) draws are fixed per scorer.
    """
    if not items:
        return torch.empty(0, 0)
    k = len(items[0].options)
    if any(len(it.options) != k for it in items):
        raise ValueError("every item must have the same number of caption options")
    out = []
    for start in range(0, len(items), chunk_items):
        chunk = items[start : start + chunk_items]
        img_index: dict[Hashable, int] = {}
        loaders: list[Callable[[], Image.Image]] = []
        for it in chunk:
            if it.image_key not in img_index:
                img_index[it.image_key] = len(loaders)
                loaders.append(it.load_image)
        cap_index: dict[str, int] = {}
        for it in chunk:
            for c in it.options:
                cap_index.setdefault(c, len(cap_index))
        pairs = [(img_index[it.image_key], cap_index[c]) for it in chunk for c in it.options]
        # Score each distinct (image, caption) once: perturbations often repeat the caption (a tie by
        # construction), and items share images and captions; the teacher's cost is per pair.
        unique = list(dict.fromkeys(pairs))
        where = {p: i for i, p in enumerate(unique)}
        scores = score_pairs(scorer, loaders, list(cap_index), unique).double()
        out.append(scores[torch.tensor([where[p] for p in pairs], dtype=torch.long)].reshape(len(chunk), k))
    return torch.cat(out)


def capped_subset(
    n_items: int,
    max_items: int | None,
    seed: int,
    groups: Sequence[Hashable] | None = None,
    eligible: Callable[[Hashable], bool] | None = None,
    stratified_by: str | None = None,
) -> tuple[list[int], dict[str, Any] | None]:
    """Indices (ascending, so file order is kept) of a seeded random subset of at most ``max_items`` items,
    and its description for the metrics JSON (None when no cap applies).

    The first N items of a real benchmark file are not a sample: VG-Relation / VG-Attribution and CIFAR's
    test batch are ordered, so a prefix covers a few relations / classes only. With ``groups`` (the group of
    each item: relation, attribute pair, class, i.e. what a macro average is over) the subset is stratified:
    each group's items are shuffled, then the groups are visited round-robin in a shuffled order, one item per
    visit, so every group gets ``max_items // n_groups`` items or all of its own (at most one more than the
    others), and every group is covered when ``max_items >= n_groups``. ``eligible`` (a group -> bool, e.g.
    "not a symmetric relation") serves the groups that enter the macro average first; the other groups get
    what budget is left. Without ``groups``: a plain seeded random sample.
    """
    if max_items is None:
        return list(range(n_items)), None
    rng = np.random.default_rng(seed)
    info: dict[str, Any] = {
        "n": min(max_items, n_items),
        "total": n_items,
        "seed": seed,
        "max_items": max_items,
        "stratified_by": stratified_by if groups is not None else None,
    }
    if max_items >= n_items:
        return list(range(n_items)), info
    if groups is None:
        return sorted(int(i) for i in rng.choice(n_items, size=max_items, replace=False)), info
    members: dict[Hashable, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    names = list(members)
    order = [names[k] for k in rng.permutation(len(names))]
    queues = {g: [members[g][k] for k in rng.permutation(len(members[g]))] for g in order}
    tiers = [[g for g in order if eligible is None or eligible(g)], [g for g in order if eligible and not eligible(g)]]
    chosen: list[int] = []
    for tier in tiers:
        depth = 0
        while len(chosen) < max_items and any(depth < len(queues[g]) for g in tier):
            for g in tier:
                if depth < len(queues[g]) and len(chosen) < max_items:
                    chosen.append(queues[g][depth])
            depth += 1
    picked = {groups[i] for i in chosen}
    info.update(groups_total=len(names), groups_covered=len(picked))
    if eligible is not None:
        info.update(eligible_groups_total=len(tiers[0]), eligible_groups_covered=len(picked & set(tiers[0])))
    return sorted(chosen), info
