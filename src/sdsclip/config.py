"""Typed view of params.yaml: every knob of the project lives there and is validated here.

Unknown keys and bad values are rejected with one line naming the offending key, e.g.
``params.yaml: train.lr: Input should be greater than 0 (got -1)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A params file that cannot be used; the message is one line meant for the user."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WorldConfig(_Section):
    """The synthetic compositional world (../shared/toyworld.md); used by the embedded default only."""

    image_size: int = Field(32, ge=16, le=1024, description="canvas side in pixels")
    color_jitter: int = Field(20, ge=0, le=20, description="max per-channel jitter around nominal colours")
    pretrain_images: int = Field(4000, ge=1, description="images in the student/teacher pretraining split")
    train_images: int = Field(2000, ge=1, description="images in the fine-tuning split (the 'COCO train' stand-in)")
    captions_per_image: int = Field(5, ge=5, description="COCO has >=5 captions per image")
    single_object_fraction: float = Field(0.0, ge=0.0, le=1.0, description="share of one-object images in COCO splits")
    winoground_items: int = Field(200, ge=1)
    aro_relation_items: int = Field(200, ge=1)
    aro_attribution_items: int = Field(200, ge=1)
    coco_order_images: int = Field(100, ge=1)
    zeroshot_per_class: int = Field(20, ge=1)


class DataConfig(_Section):
    """Where the datasets live. The embedded default points these into the synthesized world."""

    coco_root: str = Field("data/world/coco", description="dir with annotations/captions_{split}.json + images/{split}/")
    winoground_dir: str = Field("data/world/winoground", description="dir with examples.jsonl + images/")
    aro_dir: str = Field("data/world/aro")
    zeroshot_dir: str = Field("data/world/zeroshot")
    pretrain_split: str = Field("pretrain", description="COCO-format split the embedded models pretrain on")
    train_split: str = Field("train", description="COCO-format split SDS-CLIP fine-tunes on (real: train2017)")


class IngestConfig(_Section):
    splits: list[str] = Field(default_factory=lambda: ["pretrain", "train"], min_length=1)
    shard_size: int = Field(1000, ge=1, description="images per WebDataset tar shard")
    workers: int = Field(2, ge=1)


class ValidateConfig(_Section):
    max_rejected_fraction: float = Field(0.02, ge=0.0, le=1.0, description="stage fails above this")
    min_image_side: int = Field(8, ge=1)
    max_image_side: int = Field(8192, ge=1)
    min_caption_chars: int = Field(3, ge=1)
    max_caption_chars: int = Field(1000, ge=1)
    min_captions_per_image: int = Field(1, ge=1)


class OptimConfig(_Section):
    steps: int = Field(600, ge=1, description="optimizer steps")
    batch_size: int = Field(64, ge=2)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup_steps: int = Field(50, ge=0)


class StudentConfig(_Section):
    """open_clip model. Embedded default: a tiny config registered with open_clip; real: e.g. ViT-B-32 + a local file."""

    arch: str = "sdsclip-tiny-vit"
    checkpoint: str | None = Field(None, description="local open_clip checkpoint for the real path; null = pretrain")
    pretrain: OptimConfig = OptimConfig()


class TinyUNetConfig(_Section):
    block_out_channels: list[int] = Field(default_factory=lambda: [32, 64, 64], min_length=1)
    layers_per_block: int = Field(1, ge=1)
    attention_head_dim: int = Field(8, ge=1)
    text_width: int = Field(64, ge=8, description="text encoder width = UNet cross-attention dim")
    text_layers: int = Field(2, ge=1)
    text_heads: int = Field(4, ge=1)
    max_caption_tokens: int = Field(16, ge=4)
    train_timesteps: int = Field(1000, ge=10)


class TeacherConfig(_Section):
    """diffusers UNet2DConditionModel + scheduler + frozen text encoder."""

    pretrained_dir: str | None = Field(None, description="local Stable Diffusion dir (real path); null = pretrain tiny")
    latent: Literal["pixel_unshuffle", "vae"] = Field(
        "pixel_unshuffle", description="image->teacher input: 2x2 pixel-unshuffle (tiny) or the SD VAE (real)"
    )
    image_size: int = Field(32, ge=8, description="pixels fed to the latent encoder")
    tiny: TinyUNetConfig = TinyUNetConfig()
    pretrain: OptimConfig = OptimConfig(steps=800, batch_size=64, lr=1e-3, weight_decay=0.0, warmup_steps=50)
    caption_dropout: float = Field(0.1, ge=0.0, lt=1.0, description="share of empty captions while pretraining")


class TrainConfig(_Section):
    """SDS-CLIP fine-tuning: L = L_CLIP + lambda * L_SDS; only image-tower LayerNorms + sigma train."""

    lambda_sds: float = Field(1.0, ge=0.0, description="weight of L_SDS; the control stage forces 0")
    steps: int = Field(150, ge=1)
    batch_size: int = Field(32, ge=2)
    lr: float = Field(5e-5, gt=0)
    sigma_lr: float | None = Field(None, gt=0, description="lr for the fresh sigma map; null = lr")
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(10, ge=0)
    t_min: int = Field(20, ge=0, description="smallest timestep sampled for L_SDS")
    t_max: int = Field(980, ge=1, description="largest timestep sampled for L_SDS")
    noise_draws: int = Field(1, ge=1, description="(t, eps) draws per sample per step")
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"

    @model_validator(mode="after")
    def _t_range(self) -> "TrainConfig":
        if self.t_min >= self.t_max:
            raise ValueError(f"t_min ({self.t_min}) must be < t_max ({self.t_max})")
        return self


class EvalConfig(_Section):
    batch_size: int = Field(128, ge=1)
    teacher_draws: int = Field(8, ge=1, description="shared (t, eps) draws for the teacher's denoising score")
    teacher_t_min: int = Field(100, ge=0)
    teacher_t_max: int = Field(900, ge=1)


class RegisterConfig(_Section):
    tracking_uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking/registry store")
    experiment: str = "sdsclip"
    model_name: str = "sdsclip-student"
    alias: str = "champion"
    gate_metric: str = Field("group_score", description="Winoground metric the candidate must not lose on")


class Params(_Section):
    seed: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    world: WorldConfig = WorldConfig()
    data: DataConfig = DataConfig()
    ingest: IngestConfig = IngestConfig()
    validation: ValidateConfig = ValidateConfig()
    student: StudentConfig = StudentConfig()
    teacher: TeacherConfig = TeacherConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    registry: RegisterConfig = RegisterConfig()


def _format_error(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<top level>"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key (typo? see params.yaml for the valid keys)"
    got = first.get("input")
    got_text = "" if first["type"] == "extra_forbidden" or isinstance(got, dict) else f" (got {got!r})"
    more = f" [+{len(err.errors()) - 1} more]" if len(err.errors()) > 1 else ""
    return f"{source}: {key}: {msg}{got_text}{more}"


def params_from_dict(raw: dict[str, Any], source: str = "params") -> Params:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(source, err)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found (run from the project root or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    return params_from_dict(raw, str(path))


def params_to_dict(params: Params) -> dict[str, Any]:
    return params.model_dump(mode="json")
