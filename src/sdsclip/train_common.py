"""What every training loop (pretraining and SDS-CLIP fine-tuning) shares: its Accelerator and its error."""

from __future__ import annotations

from accelerate import Accelerator

from sdsclip.config import Params
from sdsclip.distributed import normalize_dist_env
from sdsclip.errors import UserError


class TrainError(UserError, ValueError):
    """A training request that cannot run; the message is one line for the user."""


def make_accelerator(params: Params, mixed_precision: str = "no") -> Accelerator:
    """An accelerate Accelerator; multi-process when launched so (torchrun, accelerate launch, PyTorchJob)."""
    from accelerate.utils import DistributedDataParallelKwargs

    normalize_dist_env()
    # Buffers (open_clip's attention masks) are constants: no need to re-broadcast them every forward.
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    return Accelerator(cpu=params.device == "cpu", mixed_precision=mixed_precision, kwargs_handlers=[ddp])
