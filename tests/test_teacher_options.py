"""Tiny-teacher options of the science profile: coarser pixel-unshuffle latent, pooled conditioning."""

from __future__ import annotations

import pytest
import torch
from train_helpers import TINY_TEACHER, vocabulary

from sdsclip.config import ConfigError, TeacherConfig, params_from_dict
from sdsclip.models.teacher import build_tiny_teacher, load_teacher, save_teacher


def _tiny(**tiny) -> TeacherConfig:
    return TeacherConfig(**{**TINY_TEACHER, "tiny": {**TINY_TEACHER["tiny"], **tiny}})


def test_unshuffle_factor_and_pooled_conditioning_survive_save_and_load(tmp_path):
    torch.manual_seed(0)
    teacher = build_tiny_teacher(
        _tiny(unshuffle_factor=4, pooled_conditioning=True, position_embedding_std=0.5), vocabulary()
    ).freeze()
    assert teacher.latent_shape == (48, 8, 8)
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    z = teacher.encode_images(pixels)
    assert z.shape == (2, 48, 8, 8)
    pos = getattr(teacher.text_encoder, "text_model", teacher.text_encoder).embeddings.position_embedding.weight
    assert 0.3 < float(pos.std()) < 0.7
    caps = ["a red circle left of a blue square", "a blue square left of a red circle"]
    t, noise = torch.tensor([500, 500]), torch.randn_like(z)
    with torch.no_grad():
        err = teacher.epsilon_error(z, teacher.encode_text(caps), t, noise)
        swapped = teacher.epsilon_error(z, teacher.encode_text(caps[::-1]), t, noise)
    assert not torch.equal(err, swapped)  # the pooled path depends on the caption
    loaded = load_teacher(save_teacher(teacher, tmp_path / "t"))
    assert loaded.unshuffle_factor == 4 and loaded.latent_shape == (48, 8, 8) and loaded.image_size == 32
    with torch.no_grad():
        again = loaded.epsilon_error(loaded.encode_images(pixels), loaded.encode_text(caps), t, noise)
    assert torch.allclose(err, again)


def test_bad_teacher_options_stop_with_one_line():
    with pytest.raises(ValueError, match=r"must be a multiple of teacher\.tiny\.unshuffle_factor 4"):
        build_tiny_teacher(TeacherConfig(image_size=30, tiny={"unshuffle_factor": 4}), vocabulary())
    with pytest.raises(ConfigError, match=r"teacher\.tiny\.unshuffle_factor: Input should be less than or equal to 8"):
        params_from_dict({"teacher": {"tiny": {"unshuffle_factor": 9}}})
    with pytest.raises(ConfigError, match=r"teacher: .*pretrain_t_min \(900\) must be < pretrain_t_max"):
        params_from_dict({"teacher": {"pretrain_t_min": 900, "pretrain_t_max": 500}})


@pytest.mark.slow
def test_v_prediction_teacher_trains_on_v_and_scores_on_eps(tmp_path):
    """v-prediction: the pretraining loss is the v error, which is the eps error / alpha_bar(t) exactly;
    scoring and SDS keep using the eps error, so both kinds of teacher are compared on one scale."""
    torch.manual_seed(0)
    teacher = build_tiny_teacher(_tiny(prediction_type="v_prediction"), vocabulary()).freeze()
    assert teacher.scheduler.config.prediction_type == "v_prediction"
    z = teacher.encode_images(torch.rand(3, 3, 32, 32) * 2 - 1)
    cond = teacher.encode_text(["a red circle above a blue square"] * 3)
    t, noise = torch.tensor([10, 500, 950]), torch.randn_like(z)
    with torch.no_grad():
        v_loss = teacher.denoising_loss(z, cond, t, noise)
        eps_err = teacher.epsilon_error(z, cond, t, noise)
    abar = teacher.scheduler.alphas_cumprod[t]
    assert torch.allclose(v_loss, eps_err / abar, rtol=1e-3)
    loaded = load_teacher(save_teacher(teacher, tmp_path / "t"))
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    eps_teacher = build_tiny_teacher(_tiny(), vocabulary()).freeze()
    with torch.no_grad():  # an eps-UNet trains on the eps error itself
        assert torch.equal(eps_teacher.denoising_loss(z, cond, t, noise), eps_teacher.epsilon_error(z, cond, t, noise))


def test_hard_negative_captions_swap_words_not_the_bag():
    from sdsclip.data import bag_key
    from sdsclip.synth import hard_negative_caption

    cap = "a red circle to the left of a blue square"
    assert hard_negative_caption(cap, object_swap=True) == "a blue square to the left of a red circle"
    assert hard_negative_caption(cap, object_swap=False) == "a blue circle to the left of a red square"
    assert (
        hard_negative_caption("a red circle and a blue square", object_swap=False) == "a blue circle and a red square"
    )
    # no negative: a conjunction's object swap is the same scene; equal colours swap to the same caption
    assert hard_negative_caption("a red circle and a blue square", object_swap=True) is None
    assert hard_negative_caption("a red circle below a red square", object_swap=False) is None
    for other in ("", "a red circle", "two dogs on a sofa"):
        assert hard_negative_caption(other, object_swap=True) is None
    for swap in (True, False):
        neg = hard_negative_caption(cap, swap)
        assert sorted(neg.split()) == sorted(cap.split()) and bag_key(neg) == bag_key(cap)


def test_hard_negative_ranking_loss_only_when_asked():
    from sdsclip.pretrain import teacher_pretrain_loss

    images = torch.rand(4, 3, 32, 32)
    captions = [
        "a red circle to the left of a blue square",
        "a green square above a yellow triangle",
        "a red circle",
        "a blue circle and a blue square",
    ]
    plain_cfg, hard_cfg = (
        _tiny(),
        TeacherConfig(**{**_tiny().model_dump(), "hard_negative_weight": 1.0, "caption_dropout": 0.0}),
    )
    torch.manual_seed(0)
    teacher = build_tiny_teacher(plain_cfg, vocabulary())
    plain, parts = teacher_pretrain_loss(
        teacher, plain_cfg, images, captions, (0, 1000), torch.Generator().manual_seed(0)
    )
    assert set(parts) == {"loss_denoise"} and plain.item() == pytest.approx(parts["loss_denoise"])
    loss, parts = teacher_pretrain_loss(
        teacher, hard_cfg, images, captions, (0, 1000), torch.Generator().manual_seed(0)
    )
    assert {"loss_denoise", "loss_hard_negative", "hard_negative_order_correct"} <= set(parts)
    assert parts["loss_hard_negative"] >= 0
    assert loss.item() == pytest.approx(parts["loss_denoise"] + parts["loss_hard_negative"], rel=1e-5)
    loss.backward()  # the ranking term reaches the text encoder (the caption and its negative differ in order)
    emb = getattr(teacher.text_encoder, "text_model", teacher.text_encoder).embeddings
    assert emb.position_embedding.weight.grad is not None and emb.position_embedding.weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match=r"teacher\.hard_negative_weight"):
        params_from_dict({"teacher": {"hard_negative_weight": -1}})


def test_bidirectional_t5_text_encoder_survives_save_and_load(tmp_path):
    """text_encoder t5: every token reads the whole caption (no causal mask), so the first object's state
    depends on the relation after it; the class is recorded in text_encoder/config.json and loaded back."""
    torch.manual_seed(0)
    teacher = build_tiny_teacher(_tiny(text_encoder="t5", pooled_conditioning=True), vocabulary()).freeze()
    caps = ["a red circle to the left of a blue square", "a red circle to the right of a blue square"]
    with torch.no_grad():
        states = teacher.encode_text(caps)
    assert states.shape[-1] == teacher.unet.config.cross_attention_dim
    assert not torch.allclose(states[0, 1:4], states[1, 1:4])  # "a red circle" already differs: bidirectional
    loaded = load_teacher(save_teacher(teacher, tmp_path / "t"))
    assert type(loaded.text_encoder).__name__ == "T5EncoderModel"
    with torch.no_grad():
        assert torch.allclose(loaded.encode_text(caps), states)
    clip = build_tiny_teacher(_tiny(), vocabulary()).freeze()
    with torch.no_grad():  # the causal CLIP encoder: the prefix "[BOS] a red circle" cannot see what follows
        causal = clip.encode_text(caps)
    assert torch.allclose(causal[0, :4], causal[1, :4], atol=1e-6)


def test_coordinate_channels_reach_the_unet_but_not_sigma(tmp_path):
    """CoordConv teacher: the UNet's input carries two fixed x/y maps, so the denoised latent (what sigma
    produces) keeps the image's shape; the maps change the prediction and survive save/load."""
    from sdsclip.models.teacher import latent_shape_of
    from sdsclip.models.teacher_options import coordinate_channels

    torch.manual_seed(0)
    teacher = build_tiny_teacher(_tiny(coord_channels=True), vocabulary()).freeze()
    assert teacher.unet.config.in_channels == teacher.unet.config.out_channels + 2 == 14
    assert teacher.latent_shape == (12, 16, 16)
    z = teacher.encode_images(torch.rand(2, 3, 32, 32) * 2 - 1)
    grid = coordinate_channels(z)
    assert grid.shape == (2, 2, 16, 16)
    assert float(grid[0, 0, 0, 0]) == -1.0 and float(grid[0, 0, 0, -1]) == 1.0  # x grows to the right
    assert float(grid[0, 1, 0, 0]) == -1.0 and float(grid[0, 1, -1, 0]) == 1.0  # y grows downwards
    cond = teacher.encode_text(["a red circle to the left of a blue square"] * 2)
    t, noise = torch.tensor([300, 700]), torch.randn_like(z)
    with torch.no_grad():
        err = teacher.epsilon_error(z, cond, t, noise)
        teacher.coord_channels = 0  # same weights, no maps: the first conv sees 12 channels and fails
        with pytest.raises(RuntimeError):
            teacher.epsilon_error(z, cond, t, noise)
        teacher.coord_channels = 2
    out = save_teacher(teacher, tmp_path / "t")
    assert latent_shape_of(out) == (12, 16, 16)
    loaded = load_teacher(out)
    assert loaded.coord_channels == 2
    with torch.no_grad():
        assert torch.allclose(
            err,
            loaded.epsilon_error(z, loaded.encode_text(["a red circle to the left of a blue square"] * 2), t, noise),
        )


def test_caption_map_gives_each_position_its_own_caption_weights(tmp_path):
    """caption_map_channels: the caption's pooled state becomes k maps beside x_t; it is trained with the teacher
    (trainable_modules), frozen with it, and survives save/load; a broken caption_map dir is a one-line error."""
    torch.manual_seed(0)
    teacher = build_tiny_teacher(
        _tiny(caption_map_channels=3, pooled_conditioning=True, resnet_time_scale_shift="scale_shift"), vocabulary()
    )
    assert teacher.unet.config.in_channels == 12 + 3 and teacher.latent_shape == (12, 16, 16)
    assert teacher.unet.config.resnet_time_scale_shift == "scale_shift"
    assert set(teacher.trainable_modules()) == {"unet", "text_encoder", "caption_map"}
    caps = ["a red circle to the left of a blue square", "a blue square to the left of a red circle"]
    maps = teacher.caption_map(teacher.encode_text(caps)[:, -1])
    assert maps.shape == (2, 3, 16, 16) and not torch.allclose(maps[0], maps[1])
    z = teacher.encode_images(torch.rand(2, 3, 32, 32) * 2 - 1)
    t, noise = torch.tensor([200, 800]), torch.randn_like(z)
    teacher.epsilon_error(z, teacher.encode_text(caps), t, noise).sum().backward()
    assert teacher.caption_map.net[0].weight.grad.abs().sum() > 0  # the denoising loss trains it
    teacher.freeze()
    assert not any(p.requires_grad for p in teacher.caption_map.parameters())
    with torch.no_grad():
        err = teacher.epsilon_error(z, teacher.encode_text(caps), t, noise)
    out = save_teacher(teacher, tmp_path / "t")
    loaded = load_teacher(out)
    with torch.no_grad():
        assert torch.allclose(err, loaded.epsilon_error(z, loaded.encode_text(caps), t, noise))
    (out / "caption_map" / "model.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match=r"caption_map: unusable caption map .*re-run the teacher's pretraining"):
        load_teacher(out)


@pytest.mark.slow
def test_high_noise_share_and_hard_negative_selection():
    """pretrain_high_t_share draws that share of t from the high-noise range; hard_negative_swap=object uses only
    relational captions' object swaps, and hard_negative_t_min leaves the low-noise rows out of the ranking."""
    from sdsclip.pretrain import teacher_pretrain_loss

    torch.manual_seed(0)
    base = _tiny().model_dump()
    teacher = build_tiny_teacher(_tiny(), vocabulary())
    seen: list[torch.Tensor] = []
    denoise = teacher.denoising_loss
    teacher.denoising_loss = lambda z, c, t, n: seen.append(t) or denoise(z, c, t, n)
    images, captions = torch.rand(64, 3, 32, 32), ["a red circle"] * 64
    for share in (0.0, 0.5):
        cfg = TeacherConfig(**{**base, "pretrain_high_t_share": share, "pretrain_high_t_min": 900})
        with torch.no_grad():
            teacher_pretrain_loss(teacher, cfg, images, captions, (0, 1000), torch.Generator().manual_seed(1))
    uniform, mixed = (float((t >= 900).float().mean()) for t in seen)
    assert uniform < 0.25 and 0.4 < mixed < 0.75  # expected 0.1 and 0.55
    with pytest.raises(ConfigError, match=r"pretrain_high_t_min \(1000\) must be in"):
        params_from_dict({"teacher": {"pretrain_high_t_share": 0.5, "pretrain_high_t_min": 1000}})

    captions = [
        "a red circle to the left of a blue square",
        "a green square above a yellow triangle",
        "a red circle and a blue square",
        "a red circle",
    ]
    hard = {**base, "hard_negative_weight": 1.0, "caption_dropout": 0.0}
    rows = {}
    for swap, t_min in (("both", 0), ("object", 0), ("object", 1000)):
        cfg = TeacherConfig(**{**hard, "hard_negative_swap": swap, "hard_negative_t_min": t_min})
        with torch.no_grad():
            _, parts = teacher_pretrain_loss(
                teacher, cfg, images[:4], captions, (0, 1000), torch.Generator().manual_seed(0)
            )
        rows[(swap, t_min)] = parts["hard_negative_rows"]
    # both: the conjunction has a colour swap too; object: relational captions only; t_min 1000: no row qualifies
    assert rows == {("both", 0): 3.0, ("object", 0): 2.0, ("object", 1000): 0.0}
