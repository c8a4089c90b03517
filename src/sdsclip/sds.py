"""The SDS-CLIP objective (Basu et al., arXiv 2307.09233):

    L = L_CLIP + lambda * L_SDS
    L_SDS = E_{t, eps} || eps_phi( sqrt(abar_t) z + sqrt(1 - abar_t) eps, t, c_text ) - eps ||^2
    z = sigma(f_theta(x))

f_theta is CLIP's image encoder, sigma a learned linear map from its embedding to the teacher UNet's
input (latent) shape, eps_phi the frozen UNet and c_text the frozen teacher text encoder's conditioning
of the paired caption. Gradients of L_SDS flow through the frozen UNet into z, hence into sigma and the
image encoder's LayerNorms (the only CLIP parameters that train).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch import nn

from sdsclip.models.student import image_tower_layernorms
from sdsclip.models.teacher import Teacher


class LatentProjection(nn.Module):
    """sigma: a linear map from a CLIP image embedding to a tensor of the teacher's latent shape."""

    def __init__(self, embed_dim: int, latent_shape: tuple[int, int, int]):
        super().__init__()
        self.latent_shape = tuple(latent_shape)
        self.linear = nn.Linear(embed_dim, int(torch.tensor(latent_shape).prod()))

    def forward(self, image_embedding: torch.Tensor) -> torch.Tensor:
        return self.linear(image_embedding).view(-1, *self.latent_shape)


@dataclass
class LossTerms:
    total: torch.Tensor
    clip: torch.Tensor
    sds: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        return {"loss": self.total.item(), "loss_clip": self.clip.item(), "loss_sds": self.sds.item()}


def select_trainable(clip_model: nn.Module, sigma: nn.Module) -> list[nn.Parameter]:
    """Freeze everything in CLIP except the image tower's LayerNorms; sigma trains fully."""
    clip_model.requires_grad_(False)
    params: list[nn.Parameter] = []
    for ln in image_tower_layernorms(clip_model):
        ln.requires_grad_(True)
        params.extend(ln.parameters())
    sigma.requires_grad_(True)
    return params + list(sigma.parameters())


def sds_loss(
    teacher: Teacher,
    z: torch.Tensor,
    text_cond: torch.Tensor,
    t_min: int,
    t_max: int,
    noise_draws: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """L_SDS for latents z (B, C, H, W) with ``noise_draws`` (t, eps) draws per sample."""
    if noise_draws > 1:
        z = z.repeat_interleave(noise_draws, dim=0)
        text_cond = text_cond.repeat_interleave(noise_draws, dim=0)
    t = torch.randint(t_min, t_max + 1, (z.shape[0],), generator=generator, device="cpu").to(z.device)
    noise = torch.randn(z.shape, generator=generator, device="cpu", dtype=torch.float32).to(z.device, z.dtype)
    return teacher.epsilon_error(z, text_cond, t, noise).mean()


def sds_clip_loss(
    clip_model: nn.Module,
    sigma: LatentProjection,
    teacher: Teacher | None,
    images: torch.Tensor,
    tokens: torch.Tensor,
    text_cond: torch.Tensor | None,
    lambda_sds: float,
    t_min: int,
    t_max: int,
    noise_draws: int = 1,
    generator: torch.Generator | None = None,
    contrastive: ClipLoss | None = None,
) -> LossTerms:
    """L_CLIP + lambda * L_SDS on one batch. With lambda == 0 the teacher is never run (the control)."""
    image_emb = clip_model.encode_image(images)  # f_theta(x), unnormalised
    text_emb = clip_model.encode_text(tokens)
    contrastive = contrastive or ClipLoss()
    loss_clip = contrastive(
        F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1), clip_model.logit_scale.exp()
    )
    if lambda_sds == 0 or teacher is None:
        zero = loss_clip.new_zeros(())
        return LossTerms(total=loss_clip, clip=loss_clip, sds=zero)
    z = sigma(image_emb.float())
    loss_sds = sds_loss(teacher, z, text_cond, t_min, t_max, noise_draws, generator)
    return LossTerms(total=loss_clip + lambda_sds * loss_sds, clip=loss_clip, sds=loss_sds)
