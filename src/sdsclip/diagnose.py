"""Diagnostics that must pass before an SDS-CLIP result means anything: does the teacher bind words to regions?

SDS-CLIP can only teach the student what the frozen teacher knows. On a Winoground-style set (caption_0 /
caption_1 hold the same words in a different order) the teacher is checked as a matcher, with the same fixed,
shared (t, eps) draws as ``sdsclip evaluate`` (``eval.teacher_draws``, ``eval.teacher_t_min/max``):

- caption-swap effect: mean denoising error under the swapped caption minus under the true caption, per image
  (> 0: the true caption explains the image better). Reported raw and relative to the *caption effect* (error
  with the empty caption minus with the true one), so teachers of different loss scale compare;
- the teacher's Winoground text score (chance 0.25), the figure the pass threshold
  (``teacher.binding_min_text_score``) applies to, overall and (``teacher.binding_each_tag``) on each tag: the
  student fails object swaps, not colour swaps, so a teacher must bind what the student lacks. Image and
  group scores are reported but are weak for a denoising matcher (some images are a priori easier to
  denoise), as Diffusion Classifier notes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from sdsclip.config import Params

CHANCE_TEXT_SCORE = 0.25  # two independent coin flips


def swap_effects(scores: torch.Tensor) -> torch.Tensor:
    """Per-example caption-swap effect from similarities s[n, caption, image] = -error: the mean over both
    images of error(swapped caption) - error(true caption)."""
    s = torch.as_tensor(scores, dtype=torch.float64)
    return ((s[:, 0, 0] - s[:, 1, 0]) + (s[:, 1, 1] - s[:, 0, 1])) / 2


def teacher_binding(params: Params, teacher_ref: Path, winoground_dir: Path, max_items: int | None = None,
                    threshold: float | None = None) -> dict[str, Any]:
    """The teacher's binding diagnostic on a Winoground-format dir (see the module docstring)."""
    from sdsclip.evaluate.winoground import load_data, score_examples, winoground_metrics
    from sdsclip.scoring import TeacherScorer, load_scorer

    scorer = load_scorer(teacher_ref, params)
    if not isinstance(scorer, TeacherScorer):
        from sdsclip.scoring import ModelRefError

        raise ModelRefError(f"{teacher_ref}: not a teacher directory (diagnose teacher needs teacher.json)")
    data = load_data(Path(winoground_dir), params.eval.on_missing)
    examples = data.examples[:max_items] if max_items else data.examples
    started = time.time()
    # Scored one draw at a time (same UNet calls as all at once): the overall score is their mean, and the
    # per-timestep rows show where in the noise schedule the caption's word order is used.
    per_draw = torch.stack([score_examples(one, data, examples) for one in scorer.single_draws()])
    scores = per_draw.mean(0)
    # Reference scale: how much any caption helps against the empty caption, same images and draws.
    images = [n for e in examples for n in (e.image_0, e.image_1)]
    captions = ["", *dict.fromkeys(c for e in examples for c in (e.caption_0, e.caption_1))]
    index = {c: i for i, c in enumerate(captions)}
    from functools import partial

    from sdsclip.evaluate.common import score_pairs

    loaders = [partial(data.load_image, name) for name in images]
    true_caps = [c for e in examples for c in (e.caption_0, e.caption_1)]
    pairs = [(i, 0) for i in range(len(images))] + [(i, index[c]) for i, c in enumerate(true_caps)]
    s = score_pairs(scorer, loaders, captions, pairs).double()
    empty, true = s[: len(images)], s[len(images):]
    caption_effect = float((true - empty).mean())  # error(empty) - error(true)
    effects = swap_effects(scores)
    metrics = winoground_metrics(examples, scores)
    threshold = params.teacher.binding_min_text_score if threshold is None else threshold
    by_tag, tag_rows = {}, {}
    for tag in sorted({e.tag for e in examples}):
        idx = tag_rows[tag] = torch.tensor([i for i, e in enumerate(examples) if e.tag == tag])
        by_tag[tag] = {"n": len(idx), "swap_effect": float(effects[idx].mean()),
                       "swap_positive_fraction": float((effects[idx] > 0).double().mean()),
                       **{k: v for k, v in _scores(scores[idx]).items()}}
    failed_tags = sorted(tag for tag, row in by_tag.items() if row["text_score"] < threshold) \
        if params.teacher.binding_each_tag else []
    result = {
        "model": str(teacher_ref), "n": len(examples),
        "draws": int(scorer.t.shape[0]), "t": [int(t) for t in scorer.t],
        "swap_effect": float(effects.mean()),
        "swap_effect_sem": float(effects.std() / max(1, len(effects)) ** 0.5) if len(effects) > 1 else 0.0,
        "swap_positive_fraction": float((effects > 0).double().mean()),
        "caption_effect": caption_effect,
        "swap_to_caption_ratio": float(effects.mean()) / caption_effect if caption_effect else None,
        "text_score": metrics["text_score"], "image_score": metrics["image_score"],
        "group_score": metrics["group_score"], "chance_text_score": CHANCE_TEXT_SCORE,
        "by_tag": by_tag, "threshold_text_score": threshold,
        "by_t": [{"t": int(t), "swap_effect": float(swap_effects(sc).mean()),
                  "swap_positive_fraction": float((swap_effects(sc) > 0).double().mean()), **_scores(sc),
                  "by_tag": {tag: {"swap_positive_fraction": float((swap_effects(sc[idx]) > 0).double().mean()),
                                   "text_score": _scores(sc[idx])["text_score"]} for tag, idx in tag_rows.items()}}
                 for t, sc in zip(scorer.t, per_draw)],
        "each_tag": bool(params.teacher.binding_each_tag),
        "failed_tags": failed_tags,
        "passed": bool(metrics["text_score"] >= threshold and not failed_tags),
        "seconds": round(time.time() - started, 1),
    }
    return result


def _scores(scores: torch.Tensor) -> dict[str, float]:
    from sdsclip.evaluate.winoground import metrics_from_scores

    m = metrics_from_scores(scores)
    return {k: m[k] for k in ("text_score", "image_score", "group_score")}


def verdict_line(result: dict[str, Any]) -> str:
    word = "PASS" if result["passed"] else "FAIL"
    ratio = result["swap_to_caption_ratio"]
    return (f"teacher binding {word}: text score {result['text_score']:.3f} (threshold "
            f"{result['threshold_text_score']:.2f}, chance {CHANCE_TEXT_SCORE}), caption-swap effect "
            f"{result['swap_effect']:.2e} ({'n/a' if ratio is None else f'{ratio:.1%}'} of the caption effect "
            f"{result['caption_effect']:.2e}), n={result['n']}"
            + "".join(f"; {tag} text score {row['text_score']:.2f}" for tag, row in result.get("by_tag", {}).items())
            + (f" (below the threshold: {', '.join(result['failed_tags'])})" if result.get("failed_tags") else ""))
