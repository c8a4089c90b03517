"""What ``pretrain_teacher`` wrote, resolved: the tiny teacher itself, or a pointer to a Stable Diffusion dir."""

from __future__ import annotations

import json
from pathlib import Path

from sdsclip.models.teacher import TEACHER_META, Teacher, load_teacher


def teacher_source(ref: Path) -> tuple[Path, str | None, int | None]:
    """(directory, latent, image_size) of what pretrain_teacher wrote: the tiny teacher itself, or a
    pointer (teacher.json, source pretrained_dir) to a local Stable Diffusion directory."""
    meta_path = Path(ref) / TEACHER_META
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("source") == "pretrained_dir":
            return Path(meta["pretrained_dir"]), meta.get("latent"), meta.get("image_size")
    return Path(ref), None, None


def resolve_teacher(ref: Path, with_vae: bool = True) -> Teacher:
    """Load what pretrain_teacher wrote: the tiny teacher itself or a pointer to a local SD directory."""
    root, latent, image_size = teacher_source(ref)
    return load_teacher(root, latent=latent, image_size=image_size, with_vae=with_vae)
