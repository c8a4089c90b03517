"""Identity of a fine-tuning run, recorded in its checkpoints: ``--resume`` continues only the same run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from sdsclip.config import Params, params_to_dict
from sdsclip.hashing import file_sha256
from sdsclip.models.student import STUDENT_WEIGHTS
from sdsclip.models.teacher import TEACHER_META

# Knobs that do not change the trained weights: a checkpoint stays valid when only these differ.
RESUME_NEUTRAL = (
    "checkpoint_every",
    "keep_checkpoints",
    "log_mlflow",
    "text_cache_size",
    "gradient_checkpointing",
    "loader_workers",
    "memory_check",
)  # loader_workers: the same batches for any value


def teacher_identity(root: Path) -> str:
    """Cheap identity of a teacher dir for checkpoint fingerprints: teacher.json (which records the sha256
    of a verified SD dir) or, for a bare SD dir, the file listing with sizes."""
    meta = root / TEACHER_META
    if meta.is_file():
        return hashlib.sha256(meta.read_bytes()).hexdigest()
    listing = sorted(f"{p.relative_to(root)}:{p.stat().st_size}" for p in root.rglob("*") if p.is_file())
    return hashlib.sha256("\n".join(listing).encode()).hexdigest()


def run_fingerprint(
    params: Params, lambda_sds: float, student_ref: Path, teacher_root: Path, shards: Path, accepted: Path
) -> dict[str, str]:
    """What a checkpoint must match to be resumed: the weight-changing train params, seed, lambda, student
    weights, teacher and data."""
    train = {k: v for k, v in params_to_dict(params)["train"].items() if k not in RESUME_NEUTRAL}
    shard_list = sorted(f"{p.name}:{p.stat().st_size}" for p in Path(shards).glob("shard-*.tar"))
    return {
        "train": json.dumps(train, sort_keys=True),
        "seed": str(params.seed),
        "lambda_sds": repr(lambda_sds),
        "student": file_sha256(Path(student_ref) / STUDENT_WEIGHTS),
        "teacher": teacher_identity(teacher_root),
        "data": hashlib.sha256((file_sha256(Path(accepted)) + "\n".join(shard_list)).encode()).hexdigest(),
    }
