"""Evaluation and registration components: one evaluate component per benchmark (each used for the pretrained
student, the baseline, SDS-CLIP and the teacher), the SugarCrepe-format set derived from the world, the report
and register.

Lightweight components: only each function's source is shipped, so everything is imported inside the body.
"""

from typing import List

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
    data_dir = stages.benchmark_data_dir(p, "winoground", Path(world.path))
    result = stages.evaluate_winoground(p, Path(model.path), data_dir, Path(results.path), Path(scores.path))
    for key, value in stages.headline_metrics("winoground", result).items():
        metrics.log_metric(key, value)


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
    data_dir = stages.benchmark_data_dir(p, "aro", Path(world.path))
    result = stages.evaluate_aro(p, Path(model.path), data_dir, Path(results.path))
    for key, value in stages.headline_metrics("aro", result).items():
        metrics.log_metric(key, value)


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
    data_dir = stages.benchmark_data_dir(p, "zeroshot", Path(world.path))
    result = stages.evaluate_zeroshot(p, Path(model.path), data_dir, Path(results.path))
    for key, value in stages.headline_metrics("zeroshot", result).items():
        metrics.log_metric(key, value)


def derive_sugarcrepe(params: str, world: Input[Dataset], sugarcrepe: Output[Dataset]):
    """A SugarCrepe-format set (swap / replace subsets) from the world's Winoground images."""
    from pathlib import Path

    import yaml

    from sdsclip import stages
    from sdsclip.config import params_from_dict

    p = params_from_dict(yaml.safe_load(params))
    wino = stages.benchmark_data_dir(p, "winoground", Path(world.path))
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
    data_dir = stages.benchmark_data_dir(p, "sugarcrepe", Path(sugarcrepe.path))
    result = stages.evaluate_sugarcrepe(p, Path(model.path), data_dir, Path(results.path), None, Path(scores.path))
    for key, value in stages.headline_metrics("sugarcrepe", result).items():
        metrics.log_metric(key, value)


def teacher_shards(params: str) -> list:
    """One item per shard of each teacher evaluation (dsl.ParallelFor items): {"shard": k, "params": params}
    for k in 0 .. eval.shards - 1. The params ride in the item because kfp.local replaces every task-output
    parameter a loop consumes with the loop item; on a cluster either way works."""
    import yaml

    from sdsclip.config import params_from_dict

    return [dict(shard=k, params=params) for k in range(params_from_dict(yaml.safe_load(params)).eval.shards)]


def evaluate_shard(
    params: str,
    benchmark: str,
    shard: int,
    model: Input[Model],
    data: Input[Dataset],
    part: Output[Dataset],
):
    """Shard ``shard`` of eval.shards of ``benchmark`` (winoground | aro | sugarcrepe) on ``model``: its share
    of the scorer calls (``part``, for merge-shards). ``data``: the world (winoground, aro) or the SugarCrepe
    set derived from it (sugarcrepe); an absolute data dir in params is used as is."""
    from pathlib import Path

    import yaml

    from sdsclip import stages
    from sdsclip.config import params_from_dict

    p = params_from_dict(yaml.safe_load(params))
    data_dir = stages.benchmark_data_dir(p, benchmark, Path(data.path))
    part.metadata.update(
        stages.evaluate_shard(p, benchmark, Path(model.path), data_dir, Path(part.path), shard, p.eval.shards)
    )


def merge_shards(
    params: str,
    benchmark: str,
    data: Input[Dataset],
    parts: Input[List[Dataset]],
    metrics: Output[Metrics],
    results: Output[Dataset],
    scores: Output[Dataset],
):
    """The shards' parts of one evaluation -> its metrics JSON (``results``), score file (``scores``; empty for
    ARO, which has none) and kfp Metrics: exactly those of the evaluation run as one task."""
    from pathlib import Path

    import yaml

    from sdsclip import stages
    from sdsclip.config import params_from_dict

    p = params_from_dict(yaml.safe_load(params))
    data_dir = stages.benchmark_data_dir(p, benchmark, Path(data.path))
    score_file = None if benchmark == "aro" else Path(scores.path)
    result = stages.merge_shards(p, benchmark, data_dir, [Path(a.path) for a in parts], Path(results.path), score_file)
    if score_file is None:
        Path(scores.path).write_text("")
    for key, value in stages.headline_metrics(benchmark, result).items():
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
    result = stages.register(
        p, Path(model.path), Path(metrics.path), Path(baseline_metrics.path), Path(registration.path), lineage
    )
    registration.metadata.update(result)
