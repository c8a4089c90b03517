"""Weight files are checked before any compute: safetensors headers, and torch.save zip directories."""

import shutil

import pytest
import torch

from sdsclip.weights import WeightFileError, check_torch_zip, check_weight_files


def test_truncated_torch_save_file_is_named_in_one_line(tmp_path):
    good = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.randn(64, 64)}, good)
    assert check_torch_zip(good) == good
    bad = tmp_path / "truncated.bin"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(WeightFileError, match=r"truncated\.bin: corrupt or truncated torch\.save file") as err:
        check_weight_files([bad], fix="re-download it")
    assert "\n" not in str(err.value) and str(err.value).endswith("re-download it")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightFileError, match="garbage.pt"):
        check_weight_files([garbage])


def test_teacher_text_encoder_as_pytorch_model_bin_is_checked(tmp_path):
    """An SD dir whose text encoder ships as pytorch_model.bin (older exports): a truncated one stops the
    check with one line instead of a transformers traceback at load time."""
    from safetensors.torch import load_file
    from test_teacher_real import write_sd_dir

    from sdsclip.models.teacher import check_teacher_weights

    sd = write_sd_dir(tmp_path / "src")
    te = sd / "text_encoder"
    state = load_file(str(te / "model.safetensors"))
    (te / "model.safetensors").unlink()
    for sibling in te.glob("*.bin"):
        sibling.unlink()
    torch.save(state, te / "pytorch_model.bin")
    files = check_teacher_weights(sd, "vae", with_vae=False)
    assert "text_encoder/pytorch_model.bin" in files.weights
    blob = (te / "pytorch_model.bin").read_bytes()
    (te / "pytorch_model.bin").write_bytes(blob[: len(blob) - 4096])
    with pytest.raises(WeightFileError, match=r"text_encoder/pytorch_model\.bin: corrupt or truncated"):
        check_teacher_weights(sd, "vae", with_vae=False)
    shutil.rmtree(sd)
