"""Multi-process launch environments -> the variables torch.distributed (env://) and accelerate read.

``sdsclip train`` runs data-parallel (accelerate DDP) under any of:

- ``accelerate launch --num_processes N ...`` / ``torchrun --nproc-per-node N ...``: they set RANK,
  WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT for every process; nothing to do here.
- a Kubeflow PyTorchJob running ``sdsclip train`` directly (one process per pod): the training operator
  sets MASTER_ADDR, MASTER_PORT, WORLD_SIZE and RANK but no LOCAL_RANK, without which accelerate would
  silently train each pod alone on GPU nodes; LOCAL_RANK=0 is filled in.
- a PyTorchJob with only the elastic ``PET_*`` variables (PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR,
  PET_MASTER_PORT; torchrun reads them as its defaults): mapped to WORLD_SIZE / RANK / MASTER_*. With
  PET_NPROC_PER_NODE > 1 the pod must start N processes itself, i.e. run under ``torchrun``: that is an error.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

from sdsclip.errors import UserError


class LaunchError(UserError, ValueError):
    """A multi-process environment that cannot be used; the message is one line for the user."""


def _int(env: MutableMapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise LaunchError(f"{key}={env[key]!r} is not an integer (elastic ranges need `torchrun`)") from None


def normalize_dist_env(env: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Fill in what a launcher left out (see the module doc); returns the variables it set."""
    env = os.environ if env is None else env
    if "LOCAL_RANK" in env or "TORCHELASTIC_RUN_ID" in env:  # torchrun / accelerate launch
        return {}
    nproc = env.get("PET_NPROC_PER_NODE", "1").strip() or "1"
    if nproc != "1":
        raise LaunchError(
            f"PET_NPROC_PER_NODE={nproc}: several processes per pod must be started by torchrun "
            "(run `torchrun -m sdsclip.cli train ...`; it reads the PET_* variables)"
        )
    fill = {}
    for key, pet in (
        ("MASTER_ADDR", "PET_MASTER_ADDR"),
        ("MASTER_PORT", "PET_MASTER_PORT"),
        ("WORLD_SIZE", "PET_NNODES"),
        ("RANK", "PET_NODE_RANK"),
    ):
        if key not in env and env.get(pet):
            fill[key] = env[pet]
    env.update(fill)
    world = _int(env, "WORLD_SIZE") if "WORLD_SIZE" in env else 1
    if world > 1:
        for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if not env.get(key):
                raise LaunchError(
                    f"WORLD_SIZE={world} but {key} is not set (a PyTorchJob sets it; with "
                    "torchrun use --nnodes/--node-rank/--master-addr)"
                )
        rank = _int(env, "RANK")
        if not 0 <= rank < world:
            raise LaunchError(f"RANK={rank} is outside WORLD_SIZE={world}")
        local = {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}  # one process per pod / node
        env.update(local)
        fill.update(local)
    return fill
