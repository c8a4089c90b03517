"""Research options of the tiny teacher: what the science log tried to make a tiny UNet bind word order.

None of this runs for the default tiny teacher or for a real Stable Diffusion directory: those use the plain
forward of ``sdsclip.models.teacher.Teacher`` (add noise, one UNet call conditioned on the caption's states).
The options are set by ``teacher.tiny.*`` fields that params.yaml leaves out (``sdsclip.config.RESEARCH_FIELDS``;
the science profile, src/sdsclip/profiles/science.yaml, sets the ones it uses), and are still validated:

- construction only (the plain forward serves them): ``text_encoder: t5``, ``position_embedding_std``,
  ``cross_attention_full_res``, ``resnet_time_scale_shift: scale_shift`` (FiLM);
- forward options (``TeacherOptions._predict``): ``pooled_conditioning`` (class_labels), ``coord_channels``
  (CoordConv x/y maps beside x_t) and ``caption_map_channels`` (``CaptionMap``, saved in ``caption_map/``).

``sdsclip.models.teacher`` picks its options subclass only when a forward option is on (``forward_options``).
docs/science.md reports what each option did.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

from sdsclip.config import TinyUNetConfig
from sdsclip.errors import UserError

CAPTION_MAP_DIR = "caption_map"  # tiny-teacher option: caption -> spatial input channels (CaptionMap)


class CaptionMapError(UserError, ValueError):
    """An unusable ``caption_map/`` folder; the message is one line for the user."""


class CaptionMap(torch.nn.Module):
    """Caption -> ``channels`` maps at the latent's resolution, fed to the UNet beside x_t (tiny teacher option).

    A conv UNet shares its weights across positions, so "the red circle is LEFT of the blue square" has to reach
    each position through padding effects; this head gives every position its own weights on the caption's
    pooled state (the job absolute position embeddings do in DiT-style models)."""

    def __init__(self, text_width: int, channels: int, size: int):
        super().__init__()
        self.config = {"text_width": int(text_width), "channels": int(channels), "size": int(size)}
        self.net = torch.nn.Sequential(
            torch.nn.Linear(text_width, 4 * text_width),
            torch.nn.SiLU(),
            torch.nn.Linear(4 * text_width, channels * size * size),
        )

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        c, n = self.config["channels"], self.config["size"]
        return self.net(pooled).view(-1, c, n, n)

    def save(self, out_dir: Path) -> None:
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(out_dir / "model.safetensors"))

    @classmethod
    def load(cls, path: Path) -> CaptionMap:
        from safetensors.torch import load_file

        fix = "re-run the teacher's pretraining"
        try:
            cfg = json.loads((path / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CaptionMapError(
                f"{path / 'config.json'}: unreadable model config ({' '.join(str(err).split())})"
            ) from None
        try:
            head = cls(cfg["text_width"], cfg["channels"], cfg["size"])
            head.load_state_dict(load_file(str(path / "model.safetensors")))
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error type; any is a bad file
            raise CaptionMapError(f"{path}: unusable caption map ({' '.join(str(err).split())[:200]}); {fix}") from None
        return head


def coordinate_channels(latents: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W) fixed maps x, y in [-1, 1] (CoordConv, Liu et al. 2018), same dtype/device as ``latents``."""
    b, _, h, w = latents.shape
    ys = torch.linspace(-1.0, 1.0, h, device=latents.device, dtype=latents.dtype)
    xs = torch.linspace(-1.0, 1.0, w, device=latents.device, dtype=latents.dtype)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"))
    return grid.unsqueeze(0).expand(b, -1, -1, -1)


def pooled_conditioning(unet: UNet2DConditionModel) -> bool:
    """Whether the UNet takes the caption's pooled state as ``class_labels`` (``tiny.pooled_conditioning``)."""
    return getattr(unet.config, "class_embed_type", None) == "projection"


def forward_options(unet: UNet2DConditionModel, coord_channels: int = 0, caption_map: Any = None) -> bool:
    """Whether a teacher needs ``TeacherOptions._predict`` (else the plain Stable Diffusion forward serves it)."""
    return bool(coord_channels) or caption_map is not None or pooled_conditioning(unet)


class TeacherOptions:
    """The forward options of the tiny teacher, mixed into ``sdsclip.models.teacher.OptionsTeacher``."""

    unet: UNet2DConditionModel
    scheduler: DDPMScheduler
    coord_channels: int
    caption_map: CaptionMap | None

    def extra_modules(self) -> dict[str, torch.nn.Module]:
        return {"caption_map": self.caption_map} if self.caption_map is not None else {}

    def option_meta(self) -> dict[str, Any]:
        """teacher.json entries that make the loader rebuild these options."""
        meta: dict[str, Any] = {}
        if self.coord_channels:
            meta["coord_channels"] = self.coord_channels
        if self.caption_map is not None:
            meta["caption_map_channels"] = self.caption_map.config["channels"]
        return meta

    def _predict(
        self, latents: torch.Tensor, cond: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``Teacher._predict`` with the options: pooled conditioning (the text encoder's last position has
        attended to the whole caption, in order; added to the timestep embedding, so every ResNet block sees it),
        coordinate channels and the caption map beside x_t."""
        with torch.autocast(latents.device.type, enabled=False):
            noisy = self.scheduler.add_noise(latents.float(), noise.float(), t)
        pooled = cond[:, -1] if pooled_conditioning(self.unet) else None
        extra = []
        if self.coord_channels:
            extra.append(coordinate_channels(noisy))
        if self.caption_map is not None:
            extra.append(self.caption_map(cond[:, -1]).to(noisy.dtype))
        unet_in = torch.cat([noisy, *extra], dim=1) if extra else noisy
        return noisy, self.unet(unet_in, t, encoder_hidden_states=cond, class_labels=pooled).sample.float()


def caption_map_for(tiny: TinyUNetConfig, image_size: int) -> CaptionMap | None:
    """A fresh caption map when ``tiny.caption_map_channels`` > 0."""
    if not tiny.caption_map_channels:
        return None
    return CaptionMap(tiny.text_width, tiny.caption_map_channels, image_size // tiny.unshuffle_factor)


def tiny_unet_options(tiny: TinyUNetConfig) -> dict[str, Any]:
    """UNet2DConditionModel arguments the options set: extra input channels, block types, pooled conditioning,
    FiLM. At their defaults: the feasibility study's UNet (no cross-attention at full resolution)."""
    n_blocks = len(tiny.block_out_channels)
    full = tiny.cross_attention_full_res
    down = ["CrossAttnDownBlock2D" if full else "DownBlock2D"] + ["CrossAttnDownBlock2D"] * (n_blocks - 1)
    up = ["CrossAttnUpBlock2D"] * (n_blocks - 1) + ["CrossAttnUpBlock2D" if full else "UpBlock2D"]
    return {
        "extra_in_channels": (2 if tiny.coord_channels else 0) + tiny.caption_map_channels,
        "down_block_types": tuple(down),
        "up_block_types": tuple(up),
        "class_embed_type": "projection" if tiny.pooled_conditioning else None,
        "projection_class_embeddings_input_dim": tiny.text_width if tiny.pooled_conditioning else None,
        "resnet_time_scale_shift": tiny.resnet_time_scale_shift,
    }


def t5_text_encoder(tiny: TinyUNetConfig, tokenizer: PreTrainedTokenizerFast) -> T5EncoderModel:
    """``tiny.text_encoder: t5``: a fresh bidirectional T5 encoder (as Imagen / DeepFloyd IF)."""
    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=tiny.text_width,
            d_kv=tiny.text_width // tiny.text_heads,
            d_ff=4 * tiny.text_width,
            num_layers=tiny.text_layers,
            num_heads=tiny.text_heads,
            relative_attention_num_buckets=tiny.max_caption_tokens,
            relative_attention_max_distance=tiny.max_caption_tokens,
            dropout_rate=0.0,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
            architectures=["T5EncoderModel"],
        )
    )


def init_position_embeddings(text_encoder: CLIPTextModel, tiny: TinyUNetConfig) -> None:
    """``tiny.position_embedding_std``: re-draw a fresh CLIP text encoder's position embeddings (null: leave them)."""
    if tiny.position_embedding_std is not None:
        with torch.no_grad():
            embeddings = getattr(text_encoder, "text_model", text_encoder).embeddings
            embeddings.position_embedding.weight.normal_(0.0, tiny.position_embedding_std)
