"""Evaluation and registration components: one evaluate component per benchmark (each used for the pretrained
student, the baseline, SDS-CLIP and the teacher), the SugarCrepe-format set derived from the world, the report
and register.

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
    for key, value in result.get("uncorrected", {}).items():  # the teacher without Diffusion-ITM's correction
        if key != "n":
            metrics.log_metric(f"{key}.uncorrected", value)


def evaluate_aro(
    params: str,
    model: Input[Model],
    world: Input[Dataset],
    metrics: Output[Metrics],
    results: Output[Dataset],
):
    """ARO (VG-Relation / VG-Attribution macro accuracy, COCO-/Flickr30k-Order Precision@1): kfp Metrics and
    the metrics JSON (``results``). data.aro_dir under data/world/ points into the synth output."""
    from pathlib import Path

    import yaml

    from sdsclip import stages
    from sdsclip.config import params_from_dict

    p = params_from_dict(yaml.safe_load(params))
    data_dir = Path(p.data.aro_dir)
    if data_dir.parts[:2] == ("data", "world"):
        data_dir = Path(world.path, *data_dir.parts[2:])
    result = stages.evaluate_aro(p, Path(model.path), data_dir, Path(results.path))
    for name in result["datasets"]:
        value = result[name].get("macro_accuracy", result[name].get("precision_at_1"))
        if value is not None:
            metrics.log_metric(name, value)


def evaluate_zeroshot(
    params: str,
    model: Input[Model],
    world: Input[Dataset],
    metrics: Output[Metrics],
    results: Output[Dataset],
):
    """Zero-shot acc@1 / acc@5 / mean per-class recall on data.zeroshot_dir (ImageFolder or CIFAR)."""
    from pathlib import Path

    import yaml

    from sdsclip import stages
    from sdsclip.config import params_from_dict

    p = params_from_dict(yaml.safe_load(params))
    data_dir = Path(p.data.zeroshot_dir)
    if data_dir.parts[:2] == ("data", "world"):
        data_dir = Path(world.path, *data_dir.parts[2:])
    result = stages.evaluate_zeroshot(p, Path(model.path), data_dir, Path(results.path))
    for key in ("acc1", "acc5", "mean_per_class_recall", "n"):
        metrics.log_metric(key, result[key])


def derive_sugarcrepe(params: str, world: Input[Dataset], sugarcrepe: Output[Dataset]):
    """A SugarCrepe-format set (swap / replace subsets) from the world's Winoground images."""
    from pathlib import Path

    import yaml

    from sdsclip import stages
    from sdsclip.config import params_from_dict

    p = params_from_dict(yaml.safe_load(params))
    wino = Path(p.data.winoground_dir)
    if wino.parts[:2] == ("data", "world"):
        wino = Path(world.path, *wino.parts[2:])
    sugarcrepe.metadata.update(stages.derive_sugarcrepe(p, wino, Path(sugarcrepe.path)))


def evaluate_sugarcrepe(
    params: str,
    model: Input[Model],
    sugarcrepe: Input[Dataset],
    metrics: Output[Metrics],
    results: Output[Dataset],
    scores: Output[Dataset],
):
    """SugarCrepe accuracy per subset (strict >). An absolute data.sugarcrepe_dir (real SugarCrepe + COCO
    val2017) is used as is; otherwise the set derived from the world (``sugarcrepe``)."""
    from pathlib import Path

    import yaml

    from sdsclip import stages
    from sdsclip.config import params_from_dict

    p = params_from_dict(yaml.safe_load(params))
    data_dir = Path(p.data.sugarcrepe_dir) if Path(p.data.sugarcrepe_dir).is_absolute() else Path(sugarcrepe.path)
    result = stages.evaluate_sugarcrepe(p, Path(model.path), data_dir, Path(results.path), None, Path(scores.path))
    values = {name: sub["accuracy"] for name, sub in result["subsets"].items()}
    for key, value in {**values, "mean_accuracy": result["mean_accuracy"]}.items():
        if value is not None:
            metrics.log_metric(key, value)


def report(
    winoground_pretrained: Input[Dataset],
    winoground_baseline: Input[Dataset],
    winoground_sds: Input[Dataset],
    winoground_teacher: Input[Dataset],
    aro_pretrained: Input[Dataset],
    aro_baseline: Input[Dataset],
    aro_sds: Input[Dataset],
    aro_teacher: Input[Dataset],
    zeroshot_pretrained: Input[Dataset],
    zeroshot_baseline: Input[Dataset],
    zeroshot_sds: Input[Dataset],
    sugarcrepe_pretrained: Input[Dataset],
    sugarcrepe_baseline: Input[Dataset],
    sugarcrepe_sds: Input[Dataset],
    sugarcrepe_teacher: Input[Dataset],
    report: Output[Artifact],
    summary: Output[Metrics],
):
    """The evaluation report (``report``: a dir with evaluation.md / .html / .png) and every number as kfp
    Metrics (``summary``, keys ``{benchmark}.{model}.{subset}.{metric}``)."""
    import json
    import shutil
    import tempfile
    from pathlib import Path

    from sdsclip import stages

    arguments = dict(locals())  # the inputs, named {benchmark}_{model} like the metrics files
    inputs = {k: v for k, v in arguments.items() if k.split("_")[0] in ("winoground", "aro", "zeroshot", "sugarcrepe")}
    with tempfile.TemporaryDirectory() as tmp:
        for name, art in inputs.items():
            shutil.copy(art.path, Path(tmp, f"{name}.json"))
        flat_path = Path(tmp, "flat", "evaluation.json")
        stages.report(Path(tmp), Path(report.path), flat_path)
        for key, value in json.loads(flat_path.read_text()).items():
            summary.log_metric(key, value)


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
    metric is >= the baseline's. The result JSON is ``registration`` (also its metadata).
    MLFLOW_TRACKING_URI (the sdsclip-mlflow secret on a cluster), when set, wins over registry.tracking_uri
    (sdsclip.register.resolve_tracking_uri)."""
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
