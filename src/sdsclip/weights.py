"""Weight files the project reads, checked before any compute.

A truncated download or a half-copied checkpoint otherwise surfaces as a raw ``SafetensorError`` traceback
minutes into a run. ``check_safetensors`` parses only the file's JSON header and checks that the tensors'
byte ranges fit the file (safetensors does both in ``safe_open``, without reading the tensor data), so
every weight file of a run can be checked up front in milliseconds.
"""

from __future__ import annotations

from pathlib import Path

from sdsclip.errors import UserError


class WeightFileError(UserError, ValueError):
    """A weight file that cannot be read; the message is one line naming the file and the fix."""


def check_safetensors(path: str | Path, fix: str = "re-download or re-export it") -> Path:
    """Raise WeightFileError (one line: file, what is wrong, ``fix``) unless ``path`` is a readable
    safetensors file whose header and tensor offsets are consistent with its size."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise WeightFileError(f"{path}: weight file not found; {fix}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            fh.keys()
    except Exception as err:  # noqa: BLE001 - safetensors raises its own (Rust) error types
        reason = " ".join(str(err).split())[:160] or type(err).__name__
        raise WeightFileError(f"{path}: corrupt or truncated safetensors file ({reason}); {fix}") from None
    return path


def check_torch_zip(path: str | Path, fix: str = "re-download or re-export it") -> Path:
    """Raise WeightFileError unless ``path`` (a ``torch.save`` file: ``.bin`` / ``.pt``) is a zip archive whose
    central directory reads and which holds a ``data.pkl`` (a truncated file loses the directory at its end).
    Reads the directory only; the legacy pre-1.6 format (not a zip) is let through to torch."""
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise WeightFileError(f"{path}: weight file not found; {fix}")
    with open(path, "rb") as fh:
        legacy = fh.read(8) == bytes.fromhex("80028a0a6cfc9c46")  # torch.save before 1.6: a raw pickle
    if legacy:
        return path
    try:
        with zipfile.ZipFile(path) as zf:
            if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in zf.namelist()):
                raise WeightFileError(f"{path}: not a torch.save archive (no data.pkl); {fix}")
    except zipfile.BadZipFile as err:
        raise WeightFileError(f"{path}: corrupt or truncated torch.save file ({err}); {fix}") from None
    return path


def check_weight_files(paths: list[str | Path], fix: str = "re-download or re-export it") -> list[Path]:
    """``check_safetensors`` on each ``.safetensors`` path, ``check_torch_zip`` on ``.bin`` / ``.pt`` / ``.pth``;
    other files only need to exist."""
    checked = []
    for p in paths:
        p = Path(p)
        if p.suffix == ".safetensors":
            checked.append(check_safetensors(p, fix))
        elif p.suffix in (".bin", ".pt", ".pth"):
            checked.append(check_torch_zip(p, fix))
        elif not p.is_file():
            raise WeightFileError(f"{p}: weight file not found; {fix}")
        else:
            checked.append(p)
    return checked
