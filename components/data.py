"""Components for params and data: resolve_params -> synth -> ingest -> validate.

Lightweight components: only each function's source is shipped, so everything is imported inside the
body (no module-level helpers, no ``from __future__ import annotations``).
"""

from kfp.dsl import HTML, Dataset, Input, Metrics, Output


def resolve_params(
    params_yaml: str,
    form_spec: dict,
    seed: int,
    device: str,
    profile: str,
    coco_root: str,
    train_split: str,
    ingest_splits: list,
    winoground_dir: str,
    aro_dir: str,
    zeroshot_dir: str,
    sugarcrepe_dir: str,
    student_arch: str,
    student_checkpoint: str,
    teacher_pretrained_dir: str,
    teacher_latent: str,
    teacher_image_size: int,
    lambda_sds: float,
    train_steps: int,
    train_epochs: int,
    train_batch_size: int,
    train_lr: float,
    mixed_precision: str,
    sds_gradient: str,
    eval_teacher_draws: int,
    eval_shards: int,
    tracking_uri: str,
    model_name: str,
) -> str:
    """params.yaml text + the run form -> the validated, effective params (YAML) every stage reads. A form
    field wins over params_yaml only when the run changed it from its compiled default (``form_spec``, see
    sdsclip.kubeflow.apply_run_form); '' or 0 in a nullable field means null."""
    arguments = dict(locals())  # first: only the parameters are bound yet
    from sdsclip.kubeflow import apply_run_form

    form = {name: value for name, value in arguments.items() if name in form_spec}
    return apply_run_form(params_yaml, form, form_spec)


def synth(params: str, world: Output[Dataset]):
    """Render the synthetic world (COCO / Winoground / ARO / ImageFolder formats)."""
    from pathlib import Path

    import yaml

    from sdsclip import stages
    from sdsclip.config import params_from_dict

    world.metadata.update(stages.synth(params_from_dict(yaml.safe_load(params)), Path(world.path)))


def ingest(params: str, world: Input[Dataset], shards: Output[Dataset]):
    """COCO captions + images -> WebDataset shards + manifest per split. A relative data.coco_root under
    data/world/ (the DVC layout) points into the synth output; an absolute one is used as is."""
    from pathlib import Path

    import yaml

    from sdsclip import stages
    from sdsclip.config import params_from_dict

    p = params_from_dict(yaml.safe_load(params))
    coco_root = p.data.coco_root  # a local path or an fsspec URL (s3://, gs:// ...)
    if "://" not in coco_root and Path(coco_root).parts[:2] == ("data", "world"):
        coco_root = str(Path(world.path, *Path(coco_root).parts[2:]))
    result = stages.ingest(p, coco_root, Path(shards.path))
    shards.metadata.update(
        {
            f"{split}.{k}": v
            for split, summary in result.items()
            for k, v in summary.items()
            if isinstance(v, (int, float))
        }
    )


def validate(
    params: str, shards: Input[Dataset], validated: Output[Dataset], data_docs: Output[HTML], metrics: Output[Metrics]
):
    """Great Expectations over each split's manifest: accepted.csv / quarantine.csv / GX Data Docs per split in
    ``validated``; ``data_docs``: one self-contained HTML page over all splits (shown by the Kubeflow UI);
    ``metrics``: rows / accepted / quarantined / pass rates per split. Fails past the threshold."""
    import json
    import shutil
    from pathlib import Path

    import yaml

    from sdsclip import stages
    from sdsclip.config import params_from_dict
    from sdsclip.validate import METRICS_FILE, REPORT_PAGE

    p = params_from_dict(yaml.safe_load(params))
    result = stages.validate(p, Path(shards.path), Path(validated.path))
    validated.metadata.update(
        {
            f"{split}.{k}": v
            for split, summary in result.items()
            for k, v in summary.items()
            if isinstance(v, (int, float))
        }
    )
    Path(data_docs.path).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(validated.path, REPORT_PAGE), data_docs.path)
    for split in result:
        m = json.loads(Path(validated.path, split, METRICS_FILE).read_text(encoding="utf-8"))
        for key in ("rows", "accepted", "quarantined", "pass_rate"):
            metrics.log_metric(f"{split}.{key}", m[key])
        if "end_to_end" in m:
            metrics.log_metric(f"{split}.end_to_end_pass_rate", m["end_to_end"]["pass_rate"])
            metrics.log_metric(f"{split}.ingest_quarantined", m["ingest"]["annotations_quarantined"])
