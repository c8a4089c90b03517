"""Components for params and data: resolve_params -> synth -> ingest -> validate.

Lightweight components: only each function's source is shipped, so everything is imported inside the
body (no module-level helpers, no ``from __future__ import annotations``).
"""

from kfp.dsl import HTML, Dataset, Input, Metrics, Output


def resolve_params(params_yaml: str, seed: int, device: str, lambda_sds: float, train_steps: int) -> str:
    """params.yaml text + the UI overrides -> the validated, effective params (YAML) every stage reads."""
    import yaml

    from sdsclip.config import params_from_dict, params_to_dict

    raw = yaml.safe_load(params_yaml) or {}
    raw.update(seed=seed, device=device)
    raw["train"] = {**raw.get("train", {}), "lambda_sds": lambda_sds, "steps": train_steps}
    return yaml.safe_dump(params_to_dict(params_from_dict(raw, "params_yaml")), sort_keys=False)


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
    shards.metadata.update({f"{split}.{k}": v for split, summary in result.items()
                            for k, v in summary.items() if isinstance(v, (int, float))})


def validate(params: str, shards: Input[Dataset], validated: Output[Dataset], data_docs: Output[HTML],
             metrics: Output[Metrics]):
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
    validated.metadata.update({f"{split}.{k}": v for split, summary in result.items()
                               for k, v in summary.items() if isinstance(v, (int, float))})
    Path(data_docs.path).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(validated.path, REPORT_PAGE), data_docs.path)
    for split in result:
        m = json.loads(Path(validated.path, split, METRICS_FILE).read_text(encoding="utf-8"))
        for key in ("rows", "accepted", "quarantined", "pass_rate"):
            metrics.log_metric(f"{split}.{key}", m[key])
        if "end_to_end" in m:
            metrics.log_metric(f"{split}.end_to_end_pass_rate", m["end_to_end"]["pass_rate"])
            metrics.log_metric(f"{split}.ingest_quarantined", m["ingest"]["annotations_quarantined"])
