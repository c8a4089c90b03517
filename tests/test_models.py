"""Student and teacher go through the same loaders a user with real weights uses."""

import pytest
import torch
from safetensors.torch import save_file

from sdsclip.config import Params
from sdsclip.models.student import StudentLoadError, build_student, load_student, save_student
from sdsclip.models.teacher import (
    TeacherLoadError,
    build_tiny_teacher,
    caption_vocabulary,
    load_teacher,
    save_teacher,
)


def test_student_round_trip_through_open_clip_factory(tmp_path):
    torch.manual_seed(0)
    student = build_student("sdsclip-tiny-vit")
    save_student(student, tmp_path / "s", {"note": "x"})
    loaded = load_student(tmp_path / "s")
    for (name, a), (_, b) in zip(student.model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), name
    # The checkpoint file is also a plain open_clip `pretrained=` file.
    again = build_student("sdsclip-tiny-vit", tmp_path / "s" / "model.safetensors")
    assert torch.equal(again.model.visual.conv1.weight, student.model.visual.conv1.weight)


def test_student_bad_references(tmp_path):
    with pytest.raises(StudentLoadError, match="unknown open_clip architecture 'ViT-Nope'"):
        build_student("ViT-Nope")
    with pytest.raises(StudentLoadError, match="checkpoint not found"):
        build_student("sdsclip-tiny-vit", tmp_path / "missing.safetensors")
    wrong = tmp_path / "wrong.safetensors"
    save_file({"visual.conv1.weight": torch.zeros(3, 3, 2, 2)}, str(wrong))
    with pytest.raises(StudentLoadError, match="does not fit architecture"):
        build_student("sdsclip-tiny-vit", wrong)


def test_teacher_saved_in_sd_layout_and_reloaded(tmp_path):
    torch.manual_seed(0)
    vocab = caption_vocabulary(["a red circle above a blue square", "the green triangle"])
    teacher = build_tiny_teacher(Params().teacher, vocab)
    save_teacher(teacher, tmp_path / "t")
    for sub in ("unet", "text_encoder", "tokenizer", "scheduler"):
        assert (tmp_path / "t" / sub).is_dir()
    loaded = load_teacher(tmp_path / "t")
    assert loaded.latent_shape == (12, 16, 16)
    captions = ["a red circle above a blue square", "a blue square above a red circle"]
    ids = loaded.tokenize(captions)
    assert ids.shape == (2, 16) and not torch.equal(ids[0], ids[1])  # word order survives tokenization
    with torch.no_grad():
        assert torch.allclose(teacher.freeze().encode_text(captions), loaded.encode_text(captions), atol=1e-6)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    z = loaded.encode_images(images)
    assert z.shape == (2, 12, 16, 16)
    assert torch.equal(torch.nn.functional.pixel_shuffle(z, 2), images)  # the tiny "latent" is lossless


def test_teacher_missing_subfolder_is_named(tmp_path):
    teacher = build_tiny_teacher(Params().teacher, ["a", "red"])
    save_teacher(teacher, tmp_path / "t")
    import shutil

    shutil.rmtree(tmp_path / "t" / "scheduler")
    with pytest.raises(TeacherLoadError, match="missing Stable Diffusion subfolder\\(s\\) scheduler"):
        load_teacher(tmp_path / "t")
    with pytest.raises(TeacherLoadError, match="teacher directory not found"):
        load_teacher(tmp_path / "nothing")
