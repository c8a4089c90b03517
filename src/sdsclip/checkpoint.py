"""Resumable training checkpoints: one safetensors file per checkpoint, written atomically, no pickle.

A checkpoint ``step-{N:08d}.safetensors`` holds tensors only (trainable weights, optimizer state, RNG
states); everything else (step, data position, LR scheduler state, optimizer hyper-parameters, the run's
fingerprint) is JSON in the safetensors header metadata. Loading it runs no code: safetensors parses a
JSON header and raw buffers (unlike ``torch.load`` of a pickle).

Writes go to a temporary file in the same directory, are fsynced, then renamed over the final name, so a
process killed at any instant (SIGKILL included) leaves either the previous checkpoints or the new one
complete, never a torn file.
"""

from __future__ import annotations

import json
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdsclip.errors import UserError

FORMAT = "sdsclip-train-checkpoint/1"
PATTERN = re.compile(r"^step-(\d{8})\.safetensors$")


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used; the message is one line for the user."""


def checkpoint_path(ckpt_dir: Path, step: int) -> Path:
    return Path(ckpt_dir) / f"step-{step:08d}.safetensors"


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints in ``ckpt_dir``, oldest first (temporary files are ignored)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def clear_checkpoints(ckpt_dir: Path) -> None:
    """Remove every checkpoint (and leftover temporary file) of a previous run in ``ckpt_dir``."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return
    for p in ckpt_dir.iterdir():
        if PATTERN.match(p.name) or p.name.startswith(".tmp-step-"):
            p.unlink(missing_ok=True)


def save_checkpoint(
    ckpt_dir: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any], keep: int = 2
) -> Path:
    """Write checkpoint ``step`` atomically (temp file + fsync + rename); keep the ``keep`` newest."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(ckpt_dir, step)
    header = {"format": FORMAT, "meta": json.dumps({**meta, "step": step}, sort_keys=True)}
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-step-{step:08d}-", suffix=".safetensors", dir=ckpt_dir)
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=header)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(ckpt_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    for old in list_checkpoints(ckpt_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return final


def read_checkpoint_meta(path: Path) -> dict[str, Any]:
    """The JSON metadata of a checkpoint (reads only the header)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({' '.join(str(err).split())})") from None
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an sdsclip training checkpoint (format {header.get('format')!r})")
    return json.loads(header["meta"])


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    meta = read_checkpoint_meta(path)
    return load_file(str(path)), meta


# ------------------------------------------------------------------------ state (de)serialisation


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch optimizer state_dict -> (tensors ``optim.{param index}.{key}``, JSON-able param groups)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for name, value in meta.get("scalars", {}).items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def rng_to_flat(generator: torch.Generator | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every RNG a step may read: torch CPU (+ CUDA), python, numpy and the SDS (t, eps) generator."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    if generator is not None:
        tensors["rng.generator"] = generator.get_state()
    version, words, gauss = random.getstate()
    tensors["rng.python"] = torch.tensor(words, dtype=torch.int64)
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    return tensors, {"python": [version, gauss], "numpy": [name, int(pos), int(has_gauss), float(cached)]}


def rng_from_flat(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any], generator: torch.Generator | None = None
) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][: torch.cuda.device_count()])
    if generator is not None and "rng.generator" in tensors:
        generator.set_state(tensors["rng.generator"])
    version, gauss = meta["python"]
    random.setstate((version, tuple(int(w) for w in tensors["rng.python"].tolist()), gauss))
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
