"""The student: an open_clip CLIP model.

The embedded default is a tiny architecture shipped as an open_clip model config
(``sdsclip/model_configs/*.json``), so the very same ``open_clip`` factory builds both it and real
architectures such as ViT-B-32; a real checkpoint is any local file open_clip can load.

A saved student is a directory holding ``model.safetensors`` (the full CLIP state dict) and
``student.json`` (architecture name + provenance); fine-tuned students also hold ``sigma.safetensors``.
"""

from __future__ import annotations

from sdsclip.errors import UserError
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
from safetensors.torch import load_file, save_file

MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
STUDENT_META = "student.json"
STUDENT_WEIGHTS = "model.safetensors"

open_clip.add_model_config(MODEL_CONFIG_DIR)


class StudentLoadError(UserError, ValueError):
    """A student reference that cannot be loaded; the message is one line for the user."""


@dataclass
class Student:
    model: open_clip.CLIP
    preprocess: Callable  # PIL image -> normalized tensor, the architecture's own eval transform
    tokenizer: Callable[[list[str]], torch.Tensor]
    arch: str

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[1]) if hasattr(self.model, "text_projection") else int(
            self.model.visual.output_dim
        )


def image_tower_layernorms(model: torch.nn.Module) -> list[torch.nn.LayerNorm]:
    """Every LayerNorm of the image encoder: the only CLIP parameters SDS-CLIP fine-tunes."""
    return [m for m in model.visual.modules() if isinstance(m, torch.nn.LayerNorm)]


def build_student(arch: str, checkpoint: str | Path | None = None) -> Student:
    """Build ``arch`` through open_clip; load ``checkpoint`` (a local file) if given, else random init."""
    if arch not in open_clip.list_models():
        raise StudentLoadError(
            f"student.arch: unknown open_clip architecture {arch!r} (see open_clip.list_models(); "
            f"tiny configs live in {MODEL_CONFIG_DIR})"
        )
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise StudentLoadError(f"{checkpoint}: student checkpoint not found (student.checkpoint must be a local file)")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=str(checkpoint) if checkpoint else None, weights_only=True
        )
    except RuntimeError as err:  # wrong architecture for these weights
        first = str(err).strip().splitlines()[0]
        raise StudentLoadError(f"{checkpoint}: does not fit architecture {arch!r}: {first}") from None
    tokenizer = open_clip.get_tokenizer(arch)
    return Student(model=model, preprocess=preprocess, tokenizer=tokenizer, arch=arch)


def save_student(student: Student, out_dir: Path, meta: dict[str, Any] | None = None) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in student.model.state_dict().items()}
    save_file(state, str(out_dir / STUDENT_WEIGHTS))
    info = {"arch": student.arch, **(meta or {})}
    (out_dir / STUDENT_META).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return out_dir


def is_student_dir(path: Path) -> bool:
    return (Path(path) / STUDENT_META).is_file()


def load_student(ref: str | Path) -> Student:
    """Load a saved student directory (``student.json`` + ``model.safetensors``)."""
    ref = Path(ref)
    if not is_student_dir(ref):
        raise StudentLoadError(f"{ref}: not a student directory (expected {STUDENT_META} and {STUDENT_WEIGHTS})")
    meta = json.loads((ref / STUDENT_META).read_text())
    return build_student(meta["arch"], ref / STUDENT_WEIGHTS)


def load_sigma_state(ref: str | Path) -> dict[str, torch.Tensor] | None:
    path = Path(ref) / "sigma.safetensors"
    return load_file(str(path)) if path.is_file() else None
