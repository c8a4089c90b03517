"""Tiny-teacher options of the science profile: coarser pixel-unshuffle latent, pooled conditioning."""

from __future__ import annotations

import pytest
import torch

from sdsclip.config import ConfigError, TeacherConfig, params_from_dict
from sdsclip.models.teacher import build_tiny_teacher, load_teacher, save_teacher
from train_helpers import TINY_TEACHER, vocabulary


def _tiny(**tiny) -> TeacherConfig:
    return TeacherConfig(**{**TINY_TEACHER, "tiny": {**TINY_TEACHER["tiny"], **tiny}})


def test_unshuffle_factor_and_pooled_conditioning_survive_save_and_load(tmp_path):
    torch.manual_seed(0)
    teacher = build_tiny_teacher(_tiny(unshuffle_factor=4, pooled_conditioning=True, position_embedding_std=0.5),
                                 vocabulary()).freeze()
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
