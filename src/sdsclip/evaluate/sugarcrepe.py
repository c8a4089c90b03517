"""SugarCrepe (Hsieh et al., NeurIPS 2023; RAIVNLab/sugar-crepe) on its official files.

``--data DIR`` holds the subset files ``add_att.json, add_obj.json, replace_att.json, replace_obj.json,
replace_rel.json, swap_att.json, swap_obj.json`` (any of them; ``*_ent.json``, the repository's earlier names
for ``*_obj``, are read too), each ``{id: {"filename": ..., "caption": ..., "negative_caption": ...}}``, and the
COCO val2017 images under ``DIR/val2017/`` (CLIP_benchmark's layout) or ``--images DIR``.

Metric (main_eval.py): per subset, accuracy = share of items with s(image, caption) > s(image,
negative_caption), strict, so a tie counts as wrong. Also reported: the paper's three category means (ADD,
REPLACE, SWAP = mean of the subset accuracies present) and the mean over all subsets present.
CLIP_benchmark's ``image_caption_selection`` counts a tie as correct (argmax returns the first, positive,
caption), so its accuracy = ours + (ties / n); ``ties`` is reported for that comparison.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdsclip.evaluate.common import (
    EvalDataError,
    OptionItem,
    SkipLog,
    capped_subset,
    check_on_missing,
    mean_or_none,
    missing_image,
    open_rgb,
    read_json,
    score_options,
    write_json,
)

SUBSETS = ("add_att", "add_obj", "replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj")
LEGACY_NAMES = {"add_obj": "add_ent", "replace_obj": "replace_ent", "swap_obj": "swap_ent"}
CATEGORIES = {
    "add": ("add_att", "add_obj"),
    "replace": ("replace_att", "replace_obj", "replace_rel"),
    "swap": ("swap_att", "swap_obj"),
}
FIELDS = ("filename", "caption", "negative_caption")


class SugarCrepeDataError(EvalDataError):
    """Bad SugarCrepe data; the message names the file and item id."""


def subset_file(data_dir: Path, subset: str) -> Path | None:
    for name in (subset, LEGACY_NAMES.get(subset)):
        if name and (Path(data_dir) / f"{name}.json").is_file():
            return Path(data_dir) / f"{name}.json"
    return None


def load_subset(path: Path, images_dir: Path, on_missing: str, skipped: SkipLog) -> tuple[list[str], list[OptionItem]]:
    """(ids, items) with options = (caption, negative_caption), in file order."""
    data = read_json(path, SugarCrepeDataError)
    if not isinstance(data, dict):
        raise SugarCrepeDataError(f"{path}: expected an object {{id: {{filename, caption, negative_caption}}}}")
    ids, items = [], []
    for key, rec in data.items():
        where = f"{path}: item {key!r}"
        if not isinstance(rec, dict):
            raise SugarCrepeDataError(f"{where}: expected an object, got {type(rec).__name__}")
        missing = [f for f in FIELDS if f not in rec]
        if missing:
            raise SugarCrepeDataError(f"{where}: missing field(s) {', '.join(missing)}")
        if not all(isinstance(rec[f], str) and rec[f].strip() for f in FIELDS):
            raise SugarCrepeDataError(f"{where}: {', '.join(FIELDS)} must be non-empty strings")
        image = Path(images_dir) / rec["filename"]
        if not image.is_file():
            missing_image(
                SugarCrepeDataError,
                on_missing,
                skipped,
                where,
                f"image {rec['filename']!r} not found under {images_dir}",
            )
            continue
        ids.append(str(key))
        items.append(OptionItem(str(image), partial(open_rgb, image), (rec["caption"], rec["negative_caption"])))
    return ids, items


def subset_metrics(scores: torch.Tensor) -> dict[str, Any]:
    """scores[n, 2] over (caption, negative_caption): strict >, ties reported."""
    n = int(scores.shape[0])
    correct = scores[:, 0] > scores[:, 1]
    return {
        "accuracy": float(correct.double().mean()) if n else None,
        "n": n,
        "ties": int((scores[:, 0] == scores[:, 1]).sum()) if n else 0,
    }


def evaluate_sugarcrepe(
    scorer,
    data_dir: Path,
    out: Path,
    *,
    images_dir: Path | None = None,
    subsets: Sequence[str] | None = None,
    on_missing: str = "error",
    max_items: int | None = None,
    scores_out: Path | None = None,
    seed: int = 0,
    chunk_items: int | None = None,
) -> dict[str, Any]:
    """Accuracy per subset -> metrics JSON ``out``. ``max_items`` (bounding the teacher's cost) keeps a seeded
    random sample (``seed``) of N items per subset, in file order, recorded under ``subset`` (per subset).
    ``chunk_items``: items per scorer call (default: score_options')."""
    check_on_missing(on_missing)
    data_dir = Path(data_dir)
    images_dir = Path(images_dir) if images_dir else data_dir / "val2017"
    present = [s for s in SUBSETS if subset_file(data_dir, s)]
    subsets = list(subsets) if subsets else present
    unknown = [s for s in subsets if s not in SUBSETS]
    if unknown:
        raise SugarCrepeDataError(f"unknown SugarCrepe subset(s) {unknown}; expected some of {SUBSETS}")
    if not subsets or any(s not in present for s in subsets):
        absent = [s for s in subsets if s not in present] or list(SUBSETS)
        raise SugarCrepeDataError(f"{data_dir}: no subset file for {', '.join(absent)} (expected {{subset}}.json)")
    skipped = SkipLog()
    result: dict[str, Any] = {"subsets": {}}
    loaded, caps = {}, {}
    for name in subsets:
        path = subset_file(data_dir, name)
        assert path is not None  # every requested subset's file was found above
        ids, items = load_subset(path, images_dir, on_missing, skipped)
        keep, caps[name] = capped_subset(len(items), max_items, seed)
        loaded[name] = ([ids[i] for i in keep], [items[i] for i in keep])
    # One scoring pass over every subset: an (image, caption) pair shared by subsets (the positive caption of
    # an image appears in several) is scored once, which matters for the teacher's cost.
    all_scores = score_options(
        scorer,
        [it for _, items in loaded.values() for it in items],
        **({"chunk_items": chunk_items} if chunk_items else {}),
    )
    lines, start = [], 0
    for name, (ids, items) in loaded.items():
        scores, start = all_scores[start : start + len(items)], start + len(items)
        result["subsets"][name] = subset_metrics(scores)
        lines += [
            json.dumps({"subset": name, "id": i, "positive": float(s[0]), "negative": float(s[1])})
            for i, s in zip(ids, scores.tolist())
        ]
    acc = {k: v["accuracy"] for k, v in result["subsets"].items() if v["accuracy"] is not None}
    result["categories"] = {c: mean_or_none([acc[s] for s in members if s in acc]) for c, members in CATEGORIES.items()}
    result["mean_accuracy"] = mean_or_none(list(acc.values()))
    result["missing_subsets"] = [s for s in SUBSETS if s not in subsets]
    if max_items is not None:
        result["subset"] = caps
    result["skipped"] = skipped.summary()
    skipped.announce("sugarcrepe")
    write_json(Path(out), result)
    if scores_out is not None:
        Path(scores_out).parent.mkdir(parents=True, exist_ok=True)
        Path(scores_out).write_text("\n".join(lines) + "\n")
    return result


# ---------------------------------------------------------------------------------------------------------------
# A SugarCrepe-format set from the synthetic world (the world has no SugarCrepe set of its own)
# ---------------------------------------------------------------------------------------------------------------


def derive_from_winoground(
    winoground_dir: Path, out_dir: Path, seed: int = 0, max_per_subset: int | None = None
) -> dict[str, int]:
    """Write SugarCrepe files + ``val2017/`` from a synthetic Winoground set (../shared/toyworld.md grammar).

    Each image with its true caption ``a {cA} {sA} {rel} a {cB} {sB}`` gives hard negatives of five subsets:
    swap_att (the other caption of an attribute-swap item), swap_obj (the other caption of an object-swap
    item), replace_att (one colour replaced by a colour absent from the image), replace_obj (one shape replaced
    by a shape absent from the image) and replace_rel (the relation replaced by a non-converse other relation,
    false by the world's geometry). The grammar has no add_* form, so those two subsets are absent.
    """
    from sdsclip.evaluate.winoground import load_data
    from sdsclip.synth import COLORS, CONVERSE_RELATION, RELATIONS, SHAPES

    rng = np.random.default_rng(seed)
    data = load_data(Path(winoground_dir))
    out_dir = Path(out_dir)
    images_out = out_dir / "val2017"
    if images_out.exists():
        shutil.rmtree(images_out)
    images_out.mkdir(parents=True)
    subsets: dict[str, dict[str, dict[str, str]]] = {
        s: {} for s in ("replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj")
    }

    def parse(caption: str) -> tuple[str, str, str, str, str]:
        for rel in RELATIONS:
            head, sep, tail = caption.partition(f" {rel} ")
            if sep:
                _, ca, sa = head.split()
                _, cb, sb = tail.split()
                return ca, sa, rel, cb, sb
        raise SugarCrepeDataError(f"{data.source}: caption {caption!r} is not in the world's relational grammar")

    for ex in data.examples:
        for k in (0, 1):
            name = getattr(ex, f"image_{k}")
            filename = f"{name}.png"
            data.load_image(name).save(images_out / filename, format="PNG", compress_level=6)
            caption, other = getattr(ex, f"caption_{k}"), getattr(ex, f"caption_{1 - k}")
            ca, sa, rel, cb, sb = parse(caption)
            key = f"{ex.id}_{k}"
            swap = "swap_obj" if ex.collapsed_tag == "Object" else "swap_att"
            subsets[swap][key] = {"filename": filename, "caption": caption, "negative_caption": other}
            absent_colors = [c for c in COLORS if c not in (ca, cb)]
            absent_shapes = [s for s in SHAPES if s not in (sa, sb)]
            new_c = absent_colors[int(rng.integers(len(absent_colors)))]
            new_s = absent_shapes[int(rng.integers(len(absent_shapes)))]
            other_rels = [r for r in RELATIONS if r not in (rel, CONVERSE_RELATION[rel])]
            new_r = other_rels[int(rng.integers(len(other_rels)))]
            first = bool(rng.integers(2))  # which object's attribute / shape is replaced
            att = (new_c, sa, rel, cb, sb) if first else (ca, sa, rel, new_c, sb)
            obj = (ca, new_s, rel, cb, sb) if first else (ca, sa, rel, cb, new_s)
            for subset, (c1, s1, r, c2, s2) in (
                ("replace_att", att),
                ("replace_obj", obj),
                ("replace_rel", (ca, sa, new_r, cb, sb)),
            ):
                subsets[subset][key] = {
                    "filename": filename,
                    "caption": caption,
                    "negative_caption": f"a {c1} {s1} {r} a {c2} {s2}",
                }
    counts = {}
    for subset, items in subsets.items():
        keep = dict(list(items.items())[:max_per_subset])
        write_json(out_dir / f"{subset}.json", keep)
        counts[subset] = len(keep)
    used = {rec["filename"] for items in subsets.values() for rec in list(items.values())[:max_per_subset]}
    for png in images_out.iterdir():
        if png.name not in used:
            png.unlink()
    return counts
