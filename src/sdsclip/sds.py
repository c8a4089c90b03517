"""The SDS-CLIP objective (Basu et al., arXiv 2307.09233):

    L = L_CLIP + lambda * L_SDS
    L_SDS = E_{t, eps} || eps_phi( sqrt(abar_t) z + sqrt(1 - abar_t) eps, t, c_text ) - eps ||^2
    z = sigma(f_theta(x))

f_theta is CLIP's image encoder, sigma a learned linear map from its embedding to the teacher UNet's
input (latent) shape, eps_phi the frozen UNet and c_text the frozen teacher text encoder's conditioning
of the paired caption. Gradients of L_SDS flow through the frozen UNet into z, hence into sigma and the
image encoder's LayerNorms (the only CLIP parameters that train).

Data parallel: ``StudentWithSigma`` puts f_theta and sigma in one module (one DDP wrapper syncs every
trainable parameter). Each of W processes holds a contiguous 1/W slice of the global batch; L_CLIP is
computed against the features gathered from every process (with gradients) and L_SDS draws the (t, eps)
of the WHOLE global batch from a generator seeded alike on every process and keeps its slice, so after
DDP's gradient averaging W processes take the same step as one process over the global batch.

``train.sds_gradient: jacobian_free`` (the paper's stated limitation, its suggested future work) keeps L_SDS's
value but drops the UNet Jacobian from its gradient, as DreamFusion's SDS does: the UNet runs without autograd
and a surrogate gives z the gradient w(t) (eps_hat - eps) (``SDS_WEIGHTS`` says how it relates to the full one).
"""

from __future__ import annotations

from dataclasses import dataclass

import open_clip
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch import nn

from sdsclip.models.student import trainable_clip_parameters
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


def select_trainable(
    clip_model: nn.Module, sigma: nn.Module, trainable: str = "image_layernorms"
) -> list[nn.Parameter]:
    """Freeze everything in CLIP except ``trainable`` (train.trainable; default the image tower's LayerNorms,
    the paper); sigma trains fully. Returns the CLIP parameters first, then sigma's."""
    clip_model.requires_grad_(False)
    params = trainable_clip_parameters(clip_model, trainable)
    for p in params:
        p.requires_grad_(True)
    sigma.requires_grad_(True)
    return params + list(sigma.parameters())


class StudentWithSigma(nn.Module):
    """f_theta (the CLIP model) and sigma as one module: ``forward`` returns (f_theta(x) unnormalised, text
    embedding, z = sigma(f_theta(x)) or None). sigma runs in fp32 under autocast: z feeds the fp32 noising."""

    def __init__(self, clip_model: open_clip.CLIP, sigma: LatentProjection):
        super().__init__()
        self.clip = clip_model
        self.sigma = sigma

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, project: bool = True):
        image_emb = self.clip.encode_image(images)
        text_emb = self.clip.encode_text(tokens)
        z = None
        if project:
            with torch.autocast(image_emb.device.type, enabled=False):
                z = self.sigma(image_emb.float())
        return image_emb, text_emb, z


def draw_t_and_noise(
    n: int,
    shape: tuple[int, ...],
    t_min: int,
    t_max: int,
    generator: torch.Generator | None,
    shard: tuple[int, int] = (0, 1),
) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, eps) for ``n`` local samples: draws for all ``n * world`` samples of the global batch (on CPU,
    so they do not depend on the device) and keeps this rank's contiguous slice."""
    rank, world = shard
    t = torch.randint(t_min, t_max + 1, (n * world,), generator=generator, device="cpu")
    noise = torch.randn((n * world, *shape), generator=generator, device="cpu", dtype=torch.float32)
    return t[rank * n : (rank + 1) * n], noise[rank * n : (rank + 1) * n]


#: train.sds_weighting: w(t) of the Jacobian-free gradient, as a function of alpha_bar_t. How it relates to the
#: full loss (the one place this is stated). With N = samples x draws, D = latent elements per sample and
#: x_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps, the full loss mean_i mean_d (eps_hat(x_t) - eps)^2 gives
#:     dL_full/dz_i = 2/(N D) * sqrt(abar_t) * (d eps_hat / d x_t)^T (eps_hat - eps)
#: and the Jacobian-free surrogate (``jacobian_free_sds_loss``) gives, on the same 2/(N D) scale (so lambda_sds
#: weighs both alike),
#:     dL_jf/dz_i   = 2/(N D) * w(t) * (eps_hat - eps)
#: i.e. w(t) stands in for sqrt(abar_t) J^T: for an identity Jacobian the full gradient is the Jacobian-free one
#: times sqrt(abar_t) / w(t). ``constant`` (w = 1) thus weighs noisy t relatively more than the full loss does
#: (sqrt(abar) is 0.07 at SD-1.5's t = 980); ``one_minus_alpha_bar`` is DreamFusion's w(t) = sigma_t^2.
SDS_WEIGHTS = {
    "constant": lambda abar: torch.ones_like(abar),
    "one_minus_alpha_bar": lambda abar: 1 - abar,
}


def jacobian_free_sds_loss(
    teacher: Teacher,
    z: torch.Tensor,
    cond: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    weighting: str = "constant",
) -> torch.Tensor:
    """L_SDS whose VALUE is the real denoising error (as ``full``: curves compare) and whose gradient on z is
    2/(N D) w(t) (eps_hat - eps), the UNet Jacobian dropped (``SDS_WEIGHTS``).

    The UNet runs under ``torch.no_grad``: none of its activations are kept for backward, its parameters never
    see a gradient, and UNet gradient checkpointing has nothing to recompute (a no-op in this mode)."""
    with torch.no_grad():
        eps_hat = teacher.epsilon_prediction(z.detach(), cond, t, noise)
    with torch.autocast(z.device.type, enabled=False):
        residual = eps_hat - noise.float()
        error = residual.pow(2).flatten(1).mean(1).mean()
        abar = teacher.scheduler.alphas_cumprod.to(z.device)[t].float().view(-1, *[1] * (z.dim() - 1))
        n, d = z.shape[0], z[0].numel()
        grad = (2.0 / (n * d)) * SDS_WEIGHTS[weighting](abar) * residual
        # A linear surrogate: d/dz sum(z * grad) = grad exactly (no rounding from z - (z - g)); its value is
        # swapped for the real error (x - x.detach() is exactly 0 and keeps x's gradient).
        surrogate = (z * grad.detach()).sum()
        return surrogate - surrogate.detach() + error.detach()


def sds_loss(
    teacher: Teacher,
    z: torch.Tensor,
    text_cond: torch.Tensor,
    t_min: int,
    t_max: int,
    noise_draws: int = 1,
    generator: torch.Generator | None = None,
    shard: tuple[int, int] = (0, 1),
    gradient: str = "full",
    weighting: str = "constant",
) -> torch.Tensor:
    """L_SDS for latents z (B, C, H, W) with ``noise_draws`` (t, eps) draws per sample.

    ``shard = (rank, world)``: z is slice ``rank`` of a global batch split over ``world`` processes.
    z and eps are fp32 whatever the ambient autocast; the teacher runs only its UNet in low precision.
    ``gradient`` (train.sds_gradient): ``full`` = the paper's loss, back-propagated through the frozen UNet;
    ``jacobian_free`` = the same value, gradient w(t) (eps_hat - eps) (``jacobian_free_sds_loss``); ``weighting``
    (train.sds_weighting) chooses w(t) and is used by ``jacobian_free`` only."""
    z = z.float()
    if noise_draws > 1:
        z = z.repeat_interleave(noise_draws, dim=0)
        text_cond = text_cond.repeat_interleave(noise_draws, dim=0)
    t, noise = draw_t_and_noise(z.shape[0], tuple(z.shape[1:]), t_min, t_max, generator, shard)
    cond, t, noise = text_cond.to(z.device), t.to(z.device), noise.to(z.device)
    if gradient == "jacobian_free":
        return jacobian_free_sds_loss(teacher, z, cond, t, noise, weighting)
    if gradient != "full":
        raise ValueError(f"train.sds_gradient must be full or jacobian_free (got {gradient!r})")
    return teacher.epsilon_error(z, cond, t, noise).mean()


def sds_clip_objective(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    z: torch.Tensor | None,
    logit_scale: torch.Tensor,
    teacher: Teacher | None,
    text_cond: torch.Tensor | None,
    lambda_sds: float,
    t_min: int,
    t_max: int,
    noise_draws: int = 1,
    generator: torch.Generator | None = None,
    contrastive: ClipLoss | None = None,
    shard: tuple[int, int] = (0, 1),
    gradient: str = "full",
    weighting: str = "constant",
) -> LossTerms:
    """L_CLIP + lambda * L_SDS from the student's outputs (see ``StudentWithSigma``; ``gradient`` and
    ``weighting``: train.sds_gradient / train.sds_weighting, see ``sds_loss``).

    With lambda == 0 the teacher is never run (the control). In a W-process run ``contrastive`` must be a
    ``ClipLoss(local_loss=True, gather_with_grad=True, rank, world_size)``; every term is then this
    process's share, and the mean over processes is the single-process loss of the global batch."""
    contrastive = contrastive or ClipLoss()
    loss_clip = contrastive(F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1), logit_scale)
    if lambda_sds == 0 or teacher is None:
        zero = loss_clip.new_zeros(())
        return LossTerms(total=loss_clip, clip=loss_clip, sds=zero)
    if z is None or text_cond is None:
        raise ValueError("lambda_sds > 0 needs z (StudentWithSigma with project=True) and the teacher's text_cond")
    loss_sds = sds_loss(teacher, z, text_cond, t_min, t_max, noise_draws, generator, shard, gradient, weighting)
    return LossTerms(total=loss_clip + lambda_sds * loss_sds, clip=loss_clip, sds=loss_sds)


def sds_clip_loss(
    clip_model: open_clip.CLIP,
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
    project = lambda_sds != 0 and teacher is not None
    image_emb, text_emb, z = StudentWithSigma(clip_model, sigma)(images, tokens, project)
    return sds_clip_objective(
        image_emb,
        text_emb,
        z,
        clip_model.logit_scale.exp(),
        teacher,
        text_cond,
        lambda_sds,
        t_min,
        t_max,
        noise_draws,
        generator,
        contrastive,
    )
