"""Training components: pretrain_student, pretrain_teacher, and ONE train component used twice
(``control=True``: the lambda = 0 baseline; ``control=False``: SDS-CLIP).

Lightweight components: only each function's source is shipped, so everything is imported inside the body.
The stage's summary (steps, final losses, ...) becomes the model artifact's metadata.
"""

from kfp.dsl import Dataset, Input, Model, Output


def pretrain_student(params: str, shards: Input[Dataset], validated: Input[Dataset], student: Output[Model]):
    """Contrastive CLIP pretraining from scratch (embedded default) or verification of student.checkpoint."""
    from pathlib import Path

    import yaml

    from sdsclip import stages
    from sdsclip.config import params_from_dict

    p = params_from_dict(yaml.safe_load(params))
    meta = stages.pretrain_student(p, Path(shards.path), Path(validated.path), Path(student.path))
    student.metadata.update({k: v for k, v in meta.items() if isinstance(v, (int, float, str))})


def pretrain_teacher(params: str, shards: Input[Dataset], validated: Input[Dataset], teacher: Output[Model]):
    """Denoising pretraining of the tiny diffusion teacher, or verification of teacher.pretrained_dir."""
    from pathlib import Path

    import yaml

    from sdsclip import stages
    from sdsclip.config import params_from_dict

    p = params_from_dict(yaml.safe_load(params))
    meta = stages.pretrain_teacher(p, Path(shards.path), Path(validated.path), Path(teacher.path))
    teacher.metadata.update({k: v for k, v in meta.items() if isinstance(v, (int, float, str))})


def train(
    params: str,
    student: Input[Model],
    teacher: Input[Model],
    shards: Input[Dataset],
    validated: Input[Dataset],
    control: bool,
    checkpoint_root: str,
    model: Output[Model],
):
    """Fine-tune the student: L_CLIP + lambda * L_SDS (control: lambda = 0).

    ``checkpoint_root`` (the checkpoints PVC on a cluster; '' = inside the model dir, removed after success):
    resumable checkpoints go to ``{checkpoint_root}/{arm}-{hash of this task's output URI}`` and the stage
    runs with resume, so a retried task (same output URI) continues from its newest checkpoint instead of
    step 0, while every other run or task starts in a directory of its own.
    MLFLOW_TRACKING_URI (the sdsclip-mlflow secret on a cluster), when set, wins over registry.tracking_uri
    (sdsclip.register.resolve_tracking_uri)."""
    import hashlib
    from pathlib import Path

    import yaml

    from sdsclip import stages
    from sdsclip.config import params_from_dict

    p = params_from_dict(yaml.safe_load(params))
    checkpoint_dir = None
    if checkpoint_root:
        arm = "baseline" if control else "sds"
        checkpoint_dir = Path(checkpoint_root, f"{arm}-{hashlib.sha256(model.uri.encode()).hexdigest()[:16]}")
    meta = stages.train(
        p,
        Path(student.path),
        Path(teacher.path),
        Path(shards.path),
        Path(validated.path),
        Path(model.path),
        control=control,
        resume=checkpoint_dir is not None,
        checkpoint_dir=checkpoint_dir,
    )
    model.metadata.update({k: v for k, v in meta.items() if isinstance(v, (int, float, str))})
