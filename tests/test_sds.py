"""The SDS-CLIP objective: what trains, what stays frozen, and that lambda = 0 is exactly the control."""

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from sdsclip.config import Params
from sdsclip.models.student import build_student, image_tower_layernorms
from sdsclip.models.teacher import build_tiny_teacher
from sdsclip.sds import LatentProjection, sds_clip_loss, sds_loss, select_trainable

CAPTIONS = [
    "a red circle to the left of a blue square",
    "a blue square to the right of a red circle",
    "a green triangle above a yellow circle",
    "a yellow circle and a green triangle",
]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    params = Params()
    student = build_student(params.student.arch)
    vocab = sorted({w for c in CAPTIONS for w in c.split()})
    teacher = build_tiny_teacher(params.teacher, vocab).freeze()
    return student, teacher


def _batch(student, teacher):
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(len(CAPTIONS), 3, 32, 32, generator=gen)
    tokens = student.tokenizer(CAPTIONS)
    with torch.no_grad():
        cond = teacher.encode_text(CAPTIONS)
    return images, tokens, cond


def test_only_layernorms_and_sigma_get_gradients(models):
    student, teacher = models
    sigma = LatentProjection(student.embed_dim, teacher.latent_shape)
    trainable = select_trainable(student.model, sigma)
    images, tokens, cond = _batch(student, teacher)
    student.model.zero_grad(set_to_none=True)
    terms = sds_clip_loss(
        student.model, sigma, teacher, images, tokens, cond, 1.0, 20, 980, 2, torch.Generator().manual_seed(0)
    )
    terms.total.backward()

    ln_params = {id(p) for ln in image_tower_layernorms(student.model) for p in ln.parameters()}
    assert ln_params and len(trainable) == len(ln_params) + 2  # + sigma weight and bias
    for name, p in student.model.named_parameters():
        if id(p) in ln_params:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, f"{name} is frozen but got a gradient"
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in sigma.parameters())
    for module in (teacher.unet, teacher.text_encoder):
        assert not module.training
        assert all(not p.requires_grad and p.grad is None for p in module.parameters())
    assert terms.sds > 0


def test_sds_gradient_reaches_image_layernorms_through_the_unet(models):
    """With L_CLIP removed, image-tower LayerNorms still get a gradient: it can only come via sigma and the UNet."""
    student, teacher = models
    sigma = LatentProjection(student.embed_dim, teacher.latent_shape)
    select_trainable(student.model, sigma)
    images, tokens, cond = _batch(student, teacher)
    student.model.zero_grad(set_to_none=True)
    z = sigma(student.model.encode_image(images))
    sds_loss(teacher, z, cond, 20, 980, 1, torch.Generator().manual_seed(0)).backward()
    ln = image_tower_layernorms(student.model)[0]
    assert ln.weight.grad is not None and ln.weight.grad.abs().sum() > 0


def test_lambda_zero_is_exactly_the_contrastive_loss(models):
    student, teacher = models
    sigma = LatentProjection(student.embed_dim, teacher.latent_shape)
    images, tokens, cond = _batch(student, teacher)
    with torch.no_grad():
        terms = sds_clip_loss(student.model, sigma, teacher, images, tokens, cond, 0.0, 20, 980)
        img = F.normalize(student.model.encode_image(images), dim=-1)
        txt = F.normalize(student.model.encode_text(tokens), dim=-1)
        expected = ClipLoss()(img, txt, student.model.logit_scale.exp())
    assert torch.equal(terms.total, expected)
    assert float(terms.sds) == 0.0


def test_sds_loss_matches_the_formula(models):
    """L_SDS = || eps_phi(sqrt(abar_t) z + sqrt(1 - abar_t) eps, t, c) - eps ||^2, written out by hand."""
    _, teacher = models
    gen_z = torch.Generator().manual_seed(3)
    z = torch.randn(2, *teacher.latent_shape, generator=gen_z)
    cond = teacher.encode_text(CAPTIONS[:2]).detach()
    got = sds_loss(teacher, z, cond, 100, 900, 1, torch.Generator().manual_seed(7))

    gen = torch.Generator().manual_seed(7)
    t = torch.randint(100, 901, (2,), generator=gen)
    eps = torch.randn(z.shape, generator=gen)
    abar = teacher.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = abar.sqrt() * z + (1 - abar).sqrt() * eps
    with torch.no_grad():
        pred = teacher.unet(noisy, t, encoder_hidden_states=cond).sample
    assert torch.allclose(got, (pred - eps).pow(2).mean(), rtol=1e-5, atol=1e-6)


def test_lambda_scales_only_the_sds_term(models):
    student, teacher = models
    sigma = LatentProjection(student.embed_dim, teacher.latent_shape)
    images, tokens, cond = _batch(student, teacher)
    with torch.no_grad():
        one = sds_clip_loss(
            student.model, sigma, teacher, images, tokens, cond, 1.0, 20, 980, 1, torch.Generator().manual_seed(5)
        )
        ten = sds_clip_loss(
            student.model, sigma, teacher, images, tokens, cond, 10.0, 20, 980, 1, torch.Generator().manual_seed(5)
        )
    assert torch.allclose(one.sds, ten.sds)
    assert torch.allclose(ten.total - ten.clip, 10 * (one.total - one.clip), rtol=1e-5)
