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


def teacher_binding(
    params: Params,
    teacher_ref: Path,
    winoground_dir: Path,
    max_items: int | None = None,
    threshold: float | None = None,
) -> dict[str, Any]:
    """The teacher's binding diagnostic on a Winoground-format dir (see the module docstring)."""
    from sdsclip.evaluate.winoground import load_data, score_examples, winoground_metrics

    scorer = _load_teacher_scorer(params, teacher_ref)
    data = load_data(Path(winoground_dir), params.eval.on_missing)
    examples = data.examples[:max_items] if max_items else data.examples
    started = time.time()
    # Scored one draw at a time (same UNet calls as all at once): the overall score is their mean, and the
    # per-timestep rows show where in the noise schedule the caption's word order is used.
    per_draw = torch.stack([score_examples(one, data, examples) for one in scorer.single_draws()])
    scores = per_draw.mean(0)
    caption_effect = _caption_effect(scorer, data, examples)
    effects = swap_effects(scores)
    metrics = winoground_metrics(examples, scores)
    threshold = params.teacher.binding_min_text_score if threshold is None else threshold
    by_tag, tag_rows = _by_tag(examples, scores, effects)
    failed_tags = (
        sorted(tag for tag, row in by_tag.items() if row["text_score"] < threshold)
        if params.teacher.binding_each_tag
        else []
    )
    result = {
        "model": str(teacher_ref),
        "n": len(examples),
        "draws": int(scorer.t.shape[0]),
        "t": [int(t) for t in scorer.t],
        "swap_effect": float(effects.mean()),
        "swap_effect_sem": float(effects.std() / max(1, len(effects)) ** 0.5) if len(effects) > 1 else 0.0,
        "swap_positive_fraction": float((effects > 0).double().mean()),
        "caption_effect": caption_effect,
        "swap_to_caption_ratio": float(effects.mean()) / caption_effect if caption_effect else None,
        "text_score": metrics["text_score"],
        "image_score": metrics["image_score"],
        "group_score": metrics["group_score"],
        "chance_text_score": CHANCE_TEXT_SCORE,
        "by_tag": by_tag,
        "threshold_text_score": threshold,
        "by_t": _by_timestep(scorer.t, per_draw, tag_rows),
        "each_tag": bool(params.teacher.binding_each_tag),
        "failed_tags": failed_tags,
        "passed": bool(metrics["text_score"] >= threshold and not failed_tags),
        "seconds": round(time.time() - started, 1),
    }
    return result


def _load_teacher_scorer(params: Params, teacher_ref: Path):
    """The teacher scorer for ``teacher_ref``; anything but a teacher directory raises ModelRefError."""
    from sdsclip.scoring import TeacherScorer, load_scorer

    scorer = load_scorer(teacher_ref, params)
    if not isinstance(scorer, TeacherScorer):
        from sdsclip.scoring import ModelRefError

        raise ModelRefError(f"{teacher_ref}: not a teacher directory (diagnose teacher needs teacher.json)")
    return scorer


def _caption_effect(scorer, data, examples) -> float:
    """Reference scale: mean error(empty caption) - error(true caption), same images and draws."""
    from functools import partial

    from sdsclip.evaluate.common import score_pairs

    images = [n for e in examples for n in (e.image_0, e.image_1)]
    captions = ["", *dict.fromkeys(c for e in examples for c in (e.caption_0, e.caption_1))]
    index = {c: i for i, c in enumerate(captions)}
    loaders = [partial(data.load_image, name) for name in images]
    true_caps = [c for e in examples for c in (e.caption_0, e.caption_1)]
    pairs = [(i, 0) for i in range(len(images))] + [(i, index[c]) for i, c in enumerate(true_caps)]
    s = score_pairs(scorer, loaders, captions, pairs).double()
    empty, true = s[: len(images)], s[len(images) :]
    return float((true - empty).mean())


def _by_tag(
    examples, scores: torch.Tensor, effects: torch.Tensor
) -> tuple[dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
    """Per-tag rows (swap effect and scores) and each tag's example indices."""
    by_tag, tag_rows = {}, {}
    for tag in sorted({e.tag for e in examples}):
        idx = tag_rows[tag] = torch.tensor([i for i, e in enumerate(examples) if e.tag == tag])
        by_tag[tag] = {
            "n": len(idx),
            "swap_effect": float(effects[idx].mean()),
            "swap_positive_fraction": float((effects[idx] > 0).double().mean()),
            **{k: v for k, v in _scores(scores[idx]).items()},
        }
    return by_tag, tag_rows


def _by_timestep(
    timesteps: torch.Tensor, per_draw: torch.Tensor, tag_rows: dict[str, torch.Tensor]
) -> list[dict[str, Any]]:
    """One row per (t, eps) draw: its swap effect and scores, overall and per tag."""
    return [
        {
            "t": int(t),
            "swap_effect": float(swap_effects(sc).mean()),
            "swap_positive_fraction": float((swap_effects(sc) > 0).double().mean()),
            **_scores(sc),
            "by_tag": {
                tag: {
                    "swap_positive_fraction": float((swap_effects(sc[idx]) > 0).double().mean()),
                    "text_score": _scores(sc[idx])["text_score"],
                }
                for tag, idx in tag_rows.items()
            },
        }
        for t, sc in zip(timesteps, per_draw)
    ]


def _scores(scores: torch.Tensor) -> dict[str, float]:
    from sdsclip.evaluate.winoground import metrics_from_scores

    m = metrics_from_scores(scores)
    return {k: m[k] for k in ("text_score", "image_score", "group_score")}


def verdict_line(result: dict[str, Any]) -> str:
    word = "PASS" if result["passed"] else "FAIL"
    ratio = result["swap_to_caption_ratio"]
    return (
        f"teacher binding {word}: text score {result['text_score']:.3f} (threshold "
        f"{result['threshold_text_score']:.2f}, chance {CHANCE_TEXT_SCORE}), caption-swap effect "
        f"{result['swap_effect']:.2e} ({'n/a' if ratio is None else f'{ratio:.1%}'} of the caption effect "
        f"{result['caption_effect']:.2e}), n={result['n']}"
        + "".join(f"; {tag} text score {row['text_score']:.2f}" for tag, row in result.get("by_tag", {}).items())
        + (f" (below the threshold: {', '.join(result['failed_tags'])})" if result.get("failed_tags") else "")
    )


# ----------------------------------------------------------------------------------- student separation


def student_separation(
    params: Params, student_ref: Path, winoground_dir: Path, max_items: int | None = None
) -> dict[str, Any]:
    """How far each tower of a student separates the two sides of a Winoground swap, per tag.

    SDS-CLIP trains only the image tower; the text tower stays frozen. If the frozen text tower gives the two
    captions of a swap (nearly) the same embedding, no image embedding can win the item: the text score needs
    each image to prefer a different caption, the image score each caption to prefer a different image. The
    shares of items where that happens bound this student's own text / image score (an item can only count
    if it happens), and a small caption distance says how far any image-side change would have to go.

    Per tag: mean / min cosine distance (1 - cos) between the two captions' text embeddings and between the two
    images' image embeddings, the share of items whose two captions prefer different images
    (``captions_disagree``: necessary for the image score) and whose two images prefer different captions
    (``images_disagree``: necessary for the text score), and the caption gap relative to the image gap.
    """
    from sdsclip.evaluate.winoground import load_data
    from sdsclip.models.student import is_student_dir
    from sdsclip.scoring import ModelRefError, StudentScorer, load_scorer

    data = load_data(Path(winoground_dir), params.eval.on_missing)
    examples = data.examples[:max_items] if max_items else data.examples
    if not is_student_dir(Path(student_ref)):
        raise ModelRefError(f"{student_ref}: not a student directory (diagnose student needs student.json)")
    scorer = load_scorer(student_ref, params)
    assert isinstance(scorer, StudentScorer)  # a student dir, checked above
    with torch.no_grad():
        img = scorer.embed_images([data.load_image(n) for e in examples for n in (e.image_0, e.image_1)])
        txt = scorer.embed_texts([c for e in examples for c in (e.caption_0, e.caption_1)])
    img = torch.nn.functional.normalize(img.double(), dim=-1).view(len(examples), 2, -1)
    txt = torch.nn.functional.normalize(txt.double(), dim=-1).view(len(examples), 2, -1)
    sim = torch.einsum("ncd,nid->nci", txt, img)  # sim[n, caption, image]
    text_dist = 1 - (txt[:, 0] * txt[:, 1]).sum(-1)
    image_dist = 1 - (img[:, 0] * img[:, 1]).sum(-1)
    captions_disagree = sim[:, 0].argmax(-1) != sim[:, 1].argmax(-1)  # caption k -> its preferred image
    images_disagree = sim[:, :, 0].argmax(-1) != sim[:, :, 1].argmax(-1)  # image k -> its preferred caption

    def rows(idx: torch.Tensor) -> dict[str, Any]:
        td, idist = text_dist[idx], image_dist[idx]
        return {
            "n": int(len(idx)),
            "text_cosine_distance": float(td.mean()),
            "text_cosine_distance_min": float(td.min()),
            "image_cosine_distance": float(idist.mean()),
            "image_cosine_distance_min": float(idist.min()),
            "text_to_image_distance_ratio": float(td.mean() / idist.mean()) if float(idist.mean()) else None,
            "captions_disagree": float(captions_disagree[idx].double().mean()),
            "images_disagree": float(images_disagree[idx].double().mean()),
        }

    by_tag = {
        tag: rows(torch.tensor([i for i, e in enumerate(examples) if e.tag == tag]))
        for tag in sorted({e.tag for e in examples})
    }
    return {"model": str(student_ref), **rows(torch.arange(len(examples))), "by_tag": by_tag}


def student_verdict_line(result: dict[str, Any]) -> str:
    return "student separation: " + "; ".join(
        f"{tag} (n={r['n']}): text cos distance {r['text_cosine_distance']:.4f} "
        f"(min {r['text_cosine_distance_min']:.4f}),"
        f" image {r['image_cosine_distance']:.4f}; captions prefer different images {r['captions_disagree']:.0%},"
        f" images prefer different captions {r['images_disagree']:.0%}"
        for tag, r in result["by_tag"].items()
    )


def image_layout_probe(
    params: Params, student_ref: Path, train_dir: Path, eval_dir: Path, steps: int = 300
) -> dict[str, Any]:
    """Does the image embedding carry the layout at all? A linear read-out (multinomial logistic regression on
    the normalized image embedding) of the colour-shape that is left / on top in a two-object image, fitted on
    one Winoground-format set's images and scored on another's. A bag-of-words embedding knows both objects but
    not their order: ~0.5 on two-object scenes; an embedding that encodes the layout: up to 1.0.

    With the text tower frozen, a fine-tune can only win object swaps if the image embedding comes to carry
    the layout *in the direction the text embedding puts it*; this probe measures the first half alone (an
    SDS loss can raise it while the Winoground scores stay flat: carried, but not aligned)."""
    from sdsclip.evaluate.winoground import load_data
    from sdsclip.scoring import ModelRefError, StudentScorer, load_scorer
    from sdsclip.text_order import text_order_targets

    scorer = load_scorer(student_ref, params)
    if not isinstance(scorer, StudentScorer):
        raise ModelRefError(f"{student_ref}: not a student directory (the layout probe reads a student's embeddings)")

    def features(data_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
        data = load_data(Path(data_dir), params.eval.on_missing)
        names = [n for e in data.examples for n in (e.image_0, e.image_1)]
        captions = [c for e in data.examples for c in (e.caption_0, e.caption_1)]  # caption_k is true of image_k
        with torch.no_grad():
            x = torch.nn.functional.normalize(scorer.embed_images([data.load_image(n) for n in names]).float(), dim=-1)
        y = text_order_targets(captions)[:, 0]
        keep = y >= 0
        return x[keep].cpu(), y[keep]

    x_train, y_train = features(train_dir)
    x_eval, y_eval = features(eval_dir)
    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(x_train.shape[1], 12)
    with torch.no_grad():
        head.weight.normal_(0, 0.01, generator=gen)
        head.bias.zero_()
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(steps):  # full batch: a convex problem, a few hundred steps converge
        loss = torch.nn.functional.cross_entropy(head(x_train * 10), y_train) + 1e-4 * head.weight.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        train_acc = float((head(x_train * 10).argmax(-1) == y_train).double().mean())
        eval_acc = float((head(x_eval * 10).argmax(-1) == y_eval).double().mean())
    return {
        "layout_probe_train_accuracy": train_acc,
        "layout_probe_accuracy": eval_acc,
        "train_images": int(len(y_train)),
        "eval_images": int(len(y_eval)),
    }


def sds_shortcut(
    params: Params, teacher_ref: Path, winoground_dir: Path, max_items: int | None = None
) -> dict[str, Any]:
    """Is there a latent that L_SDS prefers to the image's own? The teacher's mean denoising error under each
    image's true caption (fixed, shared draws of ``eval.teacher_*``) for: the image's own latent, the same
    latent under the swapped caption, a blank canvas (the world's black background) and the mean latent of
    all the images. SDS-CLIP lowers L_SDS by moving z = sigma(f(x)); if a caption-independent latent already has
    a lower error than the true image, the loss is minimized by collapsing z toward it (carrying no caption
    information), not by encoding what the caption says."""
    from PIL import Image

    from sdsclip.evaluate.winoground import load_data
    from sdsclip.scoring import TeacherScorer, load_scorer

    scorer = load_scorer(teacher_ref, params)
    if not isinstance(scorer, TeacherScorer):
        from sdsclip.scoring import ModelRefError

        raise ModelRefError(f"{teacher_ref}: not a teacher directory (the shortcut check needs teacher.json)")
    data = load_data(Path(winoground_dir), params.eval.on_missing)
    examples = data.examples[:max_items] if max_items else data.examples
    images = [data.load_image(n) for e in examples for n in (e.image_0, e.image_1)]
    captions = [c for e in examples for c in (e.caption_0, e.caption_1)]  # caption k is true of image k
    n = len(images)
    z = scorer.latents(images)
    blank = scorer.latents([Image.new("RGB", images[0].size)])
    z_all = torch.cat([z, blank, z.mean(0, keepdim=True)])
    cond = scorer.text_conditioning(captions)
    swapped = [i + 1 if i % 2 == 0 else i - 1 for i in range(n)]
    pairs = (
        [(i, i) for i in range(n)]
        + [(i, swapped[i]) for i in range(n)]
        + [(n, i) for i in range(n)]
        + [(n + 1, i) for i in range(n)]
    )
    err = scorer.latent_errors(z_all, cond, pairs).double().view(4, n)
    true, swap, empty, mean = err
    return {
        "model": str(teacher_ref),
        "images": n,
        "t": [int(t) for t in scorer.t],
        "error_true_latent": float(true.mean()),
        "error_swapped_caption": float(swap.mean()),
        "error_blank_canvas": float(empty.mean()),
        "error_mean_latent": float(mean.mean()),
        "blank_beats_true_fraction": float((empty < true).double().mean()),
        "mean_latent_beats_true_fraction": float((mean < true).double().mean()),
        "latent_mean": float(z.mean()),
        "latent_std": float(z.std()),
        "blank_latent_mean": float(blank.mean()),
    }
