"""Evaluation and registration components: ONE evaluate component (used for the pretrained student, the
baseline, SDS-CLIP and the teacher) and register.

Lightweight components: only each function's source is shipped, so everything is imported inside the body.
"""

from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output


def evaluate_winoground(
    params: str,
    model: Input[Model],
    world: Input[Dataset],
    metrics: Output[Metrics],
    results: Output[Dataset],
    scores: Output[Dataset],
):
    """Winoground text / image / group score (strict >): kfp Metrics, the metrics JSON (``results``) and
    the per-pair scores JSONL (``scores``). A relative data.winoground_dir under data/world/ points into
    the synth output; an absolute one is used as is."""
    from pathlib import Path

    import yaml

    from sdsclip import stages
    from sdsclip.config import params_from_dict

    p = params_from_dict(yaml.safe_load(params))
    data_dir = Path(p.data.winoground_dir)
    if data_dir.parts[:2] == ("data", "world"):
        data_dir = Path(world.path, *data_dir.parts[2:])
    result = stages.evaluate_winoground(p, Path(model.path), data_dir, Path(results.path), Path(scores.path))
    for key in ("text_score", "image_score", "group_score", "n"):
        metrics.log_metric(key, result[key])
    for tag, m in result.get("by_collapsed_tag", {}).items():
        metrics.log_metric(f"group_score.{tag}", m["group_score"])


def register(
    params: str,
    model: Input[Model],
    metrics: Input[Dataset],
    baseline_metrics: Input[Dataset],
    shards: Input[Dataset],
    validated: Input[Dataset],
    registration: Output[Artifact],
):
    """Register the SDS-CLIP student in MLflow (registry.tracking_uri); the alias moves only if its gate
    metric is >= the baseline's. The result JSON is ``registration`` (also its metadata)."""
    from pathlib import Path

    import yaml

    from sdsclip import stages
    from sdsclip.config import params_from_dict

    p = params_from_dict(yaml.safe_load(params))
    split = p.data.train_split
    lineage = [Path(shards.path, split, "manifest.csv"), Path(validated.path, split, "accepted.csv")]
    result = stages.register(p, Path(model.path), Path(metrics.path), Path(baseline_metrics.path),
                             Path(registration.path), lineage)
    registration.metadata.update(result)
