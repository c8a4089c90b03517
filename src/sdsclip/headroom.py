"""Research path: how much room does the miniature leave an image-side fine-tune, and a student with room.

Used by ``sdsclip science`` (``science.ladder``) beside ``sdsclip.text_order`` (``student.text_order_steps``):

- **Oracle fine-tunes** (``oracle_finetune``): start from the pretrained student and train on the task's own
  hard negatives, a Winoground-format set rendered with another seed than the evaluation sets. A batch of
  ``B`` items holds both images and both captions of each item, and the symmetric CLIP loss over the
  ``2B x 2B`` similarities makes every item's swapped image and caption a hard negative of the other (NegCLIP
  adds swapped captions and nearest-neighbour images to COCO batches; here the swap *is* the neighbour).
  The parameter set is the rung of the ladder (``ORACLE_RUNGS``): the image tower's LayerNorms (SDS-CLIP's
  own parameterization), the whole image tower (any image-side method), or both towers (NegCLIP).

- **Text-order pretraining** (``sdsclip.text_order.TextOrderHead``): an auxiliary text-only loss for the
  from-scratch student.
  Bag-distinct contrastive pretraining never shows a batch two captions with the same words, so neither
  tower learns word order; real CLIP's text tower is order-sensitive-ish (it has seen far more text than any
  batch's images can teach). The head predicts, from the text embedding, the scene a relational caption
  describes in a canonical order (which colour-shape is left / on top, which is right / below, and the axis),
  so the two captions of an object swap must embed apart while a caption and its converse may embed alike.
  It touches only the text tower; the image tower still learns from bag-distinct batches (bag-of-words).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

#: rung -> (what trains, label in the report)
ORACLE_RUNGS = {
    "image_layernorms": "oracle (a): image LayerNorms, text frozen",
    "image_tower": "oracle (b): image tower, text frozen",
    "both_towers": "NegCLIP (c): both towers",
}

# ----------------------------------------------------------------------------------------- oracle ladder


def _oracle_parameters(model: nn.Module, rung: str) -> list[nn.Parameter]:
    from sdsclip.models.student import trainable_clip_parameters

    if rung == "both_towers":
        params = [p for n, p in model.named_parameters() if n != "logit_scale"]
    elif rung in ("image_layernorms", "image_tower"):
        params = trainable_clip_parameters(model, rung)
    else:
        raise ValueError(f"unknown oracle rung {rung!r} (one of {', '.join(ORACLE_RUNGS)})")
    return params


def oracle_finetune(
    student_ref: Path,
    train_dir: Path,
    out_dir: Path,
    rung: str,
    steps: int,
    batch_items: int,
    lr: float,
    seed: int,
    warmup_steps: int = 10,
) -> dict[str, Any]:
    """Fine-tune the student on a Winoground-format training set (see the module docstring); saves the
    student to ``out_dir`` and returns its meta (loss, seconds per step)."""
    from diffusers.optimization import get_scheduler
    from open_clip.loss import ClipLoss

    from sdsclip.evaluate.winoground import load_data
    from sdsclip.models.student import load_student, save_student

    torch.manual_seed(seed)
    student = load_student(student_ref)
    model = student.model
    data = load_data(Path(train_dir))
    items = data.examples
    if len(items) < batch_items:
        raise ValueError(f"{train_dir}: {len(items)} items, fewer than one batch of {batch_items}")
    pixels = torch.stack([student.preprocess(data.load_image(n)) for e in items for n in (e.image_0, e.image_1)])
    tokens = student.tokenizer([c for e in items for c in (e.caption_0, e.caption_1)])
    model.requires_grad_(False)
    trainable = _oracle_parameters(model, rung)
    for p in trainable:
        p.requires_grad_(True)
    model.eval()  # as fine-tuning: no dropout, deterministic
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    sched = get_scheduler("cosine", optimizer, num_warmup_steps=warmup_steps, num_training_steps=steps)
    logit_scale = model.logit_scale.detach().exp()
    contrastive = ClipLoss()
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(items), generator=gen)
    cursor, losses = 0, []
    started = time.time()
    for _ in range(steps):
        if cursor + batch_items > len(order):
            order, cursor = torch.randperm(len(items), generator=gen), 0
        pick = order[cursor : cursor + batch_items]
        cursor += batch_items
        rows = torch.stack([2 * pick, 2 * pick + 1], 1).reshape(-1)  # both sides of each item
        img = F.normalize(model.encode_image(pixels[rows]), dim=-1)
        txt = F.normalize(model.encode_text(tokens[rows]), dim=-1)
        loss = contrastive(img, txt, logit_scale)
        loss.backward()
        optimizer.step()
        sched.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    seconds = time.time() - started
    meta = {
        "source": f"oracle_{rung}",
        "rung": rung,
        "steps": steps,
        "batch_items": batch_items,
        "lr": lr,
        "seed": seed,
        "train_items": len(items),
        "loss_first": sum(losses[:10]) / len(losses[:10]),
        "loss_clip": sum(losses[-10:]) / len(losses[-10:]),
        "seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / steps, 4),
        "student_ref": str(student_ref),
    }
    save_student(student, Path(out_dir), meta)
    return meta
