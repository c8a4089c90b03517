"""One function per pipeline stage. The CLI (hence DVC) and the Kubeflow components call exactly these.

Each takes the validated params plus explicit input/output paths, so DVC and Kubeflow can each place
artifacts where they like.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdsclip.config import Params


def synth(
    params: Params, out_dir: Path, seed: int | None = None, families: list[str] | None = None, world: Any = None
) -> dict[str, Any]:
    """Render the world (``families``: only those; ``world``: a WorldConfig in place of params.world)."""
    from sdsclip.synth import generate_world

    return generate_world(world or params.world, Path(out_dir), params.seed if seed is None else seed, families)


def _write_json_file(path: str | Path, obj: Any) -> None:
    from sdsclip.ingest import Location

    loc = Location.of(path)
    parent = loc.path.rsplit("/", 1)[0]
    if parent:
        loc.fs.makedirs(parent, exist_ok=True)
    loc.write_atomic((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def ingest(
    params: Params, coco_root: str | Path, out_root: str | Path, metrics: str | Path | None = None
) -> dict[str, Any]:
    """Each configured split: COCO captions JSON + image folder -> WebDataset shards + manifest in
    ``out_root/{split}/``. Roots may be local paths or fsspec URLs. ``metrics``: also write the per-split
    counts there as one JSON (a DVC metrics file; run-dependent fields such as timings left out)."""
    from sdsclip.ingest import ingest_split, join

    results = {
        split: ingest_split(coco_root, split, join(out_root, split), params.ingest) for split in params.ingest.splits
    }
    if metrics is not None:
        _write_json_file(
            metrics,
            {
                split: {k: v for k, v in r.items() if k not in ("seconds", "shards_reused")}
                for split, r in results.items()
            },
        )
    return results


def validate(
    params: Params, shards_root: str | Path, out_root: str | Path, metrics: str | Path | None = None
) -> dict[str, Any]:
    """Great Expectations over each split's manifest -> ``out_root/{split}/`` (accepted / quarantine / Data
    Docs ...) and ``out_root/data_docs.html`` (one self-contained page over all splits); ``metrics``: also
    write each split's validation_metrics.json into one JSON (a DVC metrics file). Raises ValidationFailed past
    the threshold, after every split's reports are written."""
    from sdsclip.ingest import Location, join
    from sdsclip.validate import METRICS_FILE, REPORT_PAGE, ValidationFailed, data_docs_page, validate_manifest

    summaries, failures = {}, []
    out_dirs = {split: join(out_root, split) for split in params.ingest.splits}
    for split, out_dir in out_dirs.items():
        try:
            summaries[split] = validate_manifest(join(shards_root, split, "manifest.csv"), out_dir, params.validation)
        except ValidationFailed as err:  # validate every split before failing, so all reports exist
            failures.append(str(err))
    Location.of(join(out_root, REPORT_PAGE)).write_atomic(data_docs_page(out_dirs).encode("utf-8"))
    if metrics is not None:
        found = {}
        for split, out_dir in out_dirs.items():
            try:
                found[split] = json.loads(Location.of(join(out_dir, METRICS_FILE)).read_bytes())
            except FileNotFoundError:  # that split failed before writing its reports
                pass
        _write_json_file(metrics, found)
    if failures:
        raise ValidationFailed("; ".join(failures))
    return summaries


def _split_paths(shards_root: Path, validated_root: Path, split: str) -> tuple[Path, Path]:
    return Path(shards_root) / split, Path(validated_root) / split / "accepted.csv"


def pretrain_student(
    params: Params, shards_root: Path, validated_root: Path, out_dir: Path, log_dir: Path | None = None
) -> dict[str, Any]:
    from sdsclip.pretrain import pretrain_student as run

    split = _split_paths(shards_root, validated_root, params.data.pretrain_split)
    return run(params, *split, Path(out_dir), log_dir)


def pretrain_teacher(
    params: Params, shards_root: Path, validated_root: Path, out_dir: Path, log_dir: Path | None = None
) -> dict[str, Any]:
    from sdsclip.pretrain import pretrain_teacher as run

    split = _split_paths(shards_root, validated_root, params.data.pretrain_split)
    return run(params, *split, Path(out_dir), log_dir)


def train(
    params: Params,
    student: Path,
    teacher: Path,
    shards_root: Path,
    validated_root: Path,
    out_dir: Path,
    control: bool = False,
    log_dir: Path | None = None,
    resume: bool = False,
    checkpoint_dir: Path | None = None,
) -> dict[str, Any]:
    from sdsclip.train import finetune

    shards, accepted = _split_paths(shards_root, validated_root, params.data.train_split)
    return finetune(
        params,
        Path(student),
        Path(teacher),
        shards,
        accepted,
        Path(out_dir),
        control,
        log_dir,
        resume=resume,
        checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir else None,
    )


def _teacher_limits(params: Params, teacher: bool) -> dict[str, Any]:
    """What applies to the teacher's scoring only: ``max_items`` (eval.teacher_max_items: each benchmark draws a
    seeded (params.seed) random subset of that size, stratified where its metric is a macro average, and
    records n / total / seed under ``subset``) and ``chunk_items`` (eval.teacher_chunk_items: items per scorer
    call, the unit a sharded evaluation is split by). None: the benchmark's own defaults."""
    ev = params.eval
    return {
        "max_items": ev.teacher_max_items if teacher else None,
        "chunk_items": ev.teacher_chunk_items if teacher else None,
    }


def _is_teacher(scorer) -> bool:
    from sdsclip.scoring import TeacherScorer

    return isinstance(scorer, TeacherScorer)


def _winoground(
    params: Params, scorer, teacher: bool, data_dir: Path, out: Path, scores: Path | None = None, **_: Any
) -> dict[str, Any]:
    from sdsclip.evaluate.winoground import evaluate_winoground as run

    return run(
        scorer,
        Path(data_dir),
        Path(out),
        scores,
        on_missing=params.eval.on_missing,
        chunk_items=_teacher_limits(params, teacher)["chunk_items"],
    )


def _aro(
    params: Params,
    scorer,
    teacher: bool,
    data_dir: Path,
    out: Path,
    scores: Path | None = None,
    *,
    datasets: list[str] | None = None,
    order_dirs: dict[str, Path] | None = None,
) -> dict[str, Any]:
    from sdsclip.evaluate.aro import evaluate_aro as run

    ev = params.eval
    return run(
        scorer,
        Path(data_dir),
        Path(out),
        datasets or None,
        order_dirs=order_dirs,
        pos_tagger=ev.aro_pos_tagger,
        seed=params.seed,
        min_count=ev.aro_attribution_min_count,
        on_missing=ev.on_missing,
        **_teacher_limits(params, teacher),
    )


def _sugarcrepe(
    params: Params,
    scorer,
    teacher: bool,
    data_dir: Path,
    out: Path,
    scores: Path | None = None,
    *,
    images_dir: Path | None = None,
) -> dict[str, Any]:
    from sdsclip.evaluate.sugarcrepe import evaluate_sugarcrepe as run

    return run(
        scorer,
        Path(data_dir),
        Path(out),
        images_dir=images_dir,
        on_missing=params.eval.on_missing,
        scores_out=scores,
        seed=params.seed,
        **_teacher_limits(params, teacher),
    )


# one benchmark's metrics JSON (and score file) from a scorer, be it a model or a sharded replay: the one place
# the eval params reach the benchmark code
_BENCHMARKS = {"winoground": _winoground, "aro": _aro, "sugarcrepe": _sugarcrepe}
#: the benchmarks an evaluation can be sharded over (the teacher's, on Kubeflow: eval.shards GPU tasks)
SHARDABLE = tuple(_BENCHMARKS)


def _benchmark(name: str):
    if name not in _BENCHMARKS:
        raise ValueError(f"benchmark {name!r}: expected one of {', '.join(SHARDABLE)}")
    return _BENCHMARKS[name]


def evaluate_winoground(
    params: Params, model: Path, data_dir: Path, out: Path, scores: Path | None = None
) -> dict[str, Any]:
    from sdsclip.scoring import load_scorer

    scorer = load_scorer(model, params)
    return _winoground(params, scorer, _is_teacher(scorer), data_dir, out, scores)


def evaluate_aro(
    params: Params,
    model: Path,
    data_dir: Path,
    out: Path,
    datasets: list[str] | None = None,
    order_dirs: dict[str, Path] | None = None,
) -> dict[str, Any]:
    from sdsclip.scoring import load_scorer

    scorer = load_scorer(model, params)
    return _aro(params, scorer, _is_teacher(scorer), data_dir, out, datasets=datasets, order_dirs=order_dirs)


def evaluate_sugarcrepe(
    params: Params,
    model: Path,
    data_dir: Path,
    out: Path,
    images_dir: Path | None = None,
    scores: Path | None = None,
) -> dict[str, Any]:
    from sdsclip.scoring import load_scorer

    scorer = load_scorer(model, params)
    return _sugarcrepe(params, scorer, _is_teacher(scorer), data_dir, out, scores, images_dir=images_dir)


def evaluate_shard(
    params: Params, benchmark: str, model: Path, data_dir: Path, part: Path, shard: int, shards: int
) -> dict[str, Any]:
    """Shard ``shard`` of ``shards`` of one benchmark's evaluation of ``model``: its share of the scorer calls,
    as a part file for :func:`merge_shards` (sdsclip.evaluate.shards)."""
    import tempfile

    from sdsclip.evaluate.shards import RecordingScorer, check_shard
    from sdsclip.scoring import load_scorer

    check_shard(shard, shards)
    run = _benchmark(benchmark)
    scorer = load_scorer(model, params)
    recording = RecordingScorer(scorer, shard, shards)
    with tempfile.TemporaryDirectory() as tmp:  # the shard's own metrics are over zeros for others' calls
        run(params, recording, _is_teacher(scorer), data_dir, Path(tmp, "metrics.json"), Path(tmp, "scores.jsonl"))
    return recording.save(Path(part), benchmark)


def merge_shards(
    params: Params, benchmark: str, data_dir: Path, parts: list[Path], out: Path, scores: Path | None = None
) -> dict[str, Any]:
    """The metrics JSON (and score file) of the unsharded evaluation, from the shards' parts, without the model."""
    from sdsclip.evaluate.shards import ReplayScorer, load_parts

    run = _benchmark(benchmark)
    records, header = load_parts([Path(p) for p in parts], benchmark)
    replay = ReplayScorer(records, header)
    result = run(params, replay, header["scorer"]["name"] == "teacher", data_dir, out, scores)
    replay.check_complete()
    return result


def evaluate_zeroshot(
    params: Params, model: Path, data_dir: Path, out: Path, prompt_set: str | None = None
) -> dict[str, Any]:
    from sdsclip.evaluate.zeroshot import check_prompt_set
    from sdsclip.evaluate.zeroshot import evaluate_zeroshot as run
    from sdsclip.scoring import load_scorer

    ev = params.eval
    prompts = Path(ev.zeroshot_prompts_file) if ev.zeroshot_prompts_file else None
    check_prompt_set(Path(data_dir), prompt_set or ev.zeroshot_prompt_set, prompts)  # before the model loads
    scorer = load_scorer(model, params)
    cap = _teacher_limits(params, _is_teacher(scorer))["max_items"]
    return run(
        scorer,
        Path(data_dir),
        Path(out),
        prompt_set=prompt_set or ev.zeroshot_prompt_set,
        prompts_file=prompts,
        on_missing=ev.on_missing,
        max_items=cap,
        seed=params.seed,
    )


def benchmark_data_dir(params: Params, benchmark: str, data_root: Path) -> Path:
    """Where a pipeline task finds ``benchmark``'s data: data.{benchmark}_dir, where a path under data/world/
    points into ``data_root`` (the synth task's world); SugarCrepe: an absolute data.sugarcrepe_dir as is,
    else ``data_root`` (the set derived from the world). Any other path is used as is."""
    if benchmark == "sugarcrepe":
        given = Path(params.data.sugarcrepe_dir)
        return given if given.is_absolute() else Path(data_root)
    given = Path(getattr(params.data, f"{benchmark}_dir"))
    return Path(data_root, *given.parts[2:]) if given.parts[:2] == ("data", "world") else given


def headline_metrics(benchmark: str, result: dict[str, Any]) -> dict[str, float]:
    """The numbers of a benchmark's metrics JSON a run UI shows (kfp Metrics), flat."""
    if benchmark == "winoground":
        out = {key: result[key] for key in ("text_score", "image_score", "group_score", "n")}
        out |= {f"group_score.{tag}": m["group_score"] for tag, m in result.get("by_collapsed_tag", {}).items()}
        # the teacher without Diffusion-ITM's correction
        out |= {f"{key}.uncorrected": v for key, v in result.get("uncorrected", {}).items() if key != "n"}
        return out
    if benchmark == "aro":
        values = {
            name: result[name].get("macro_accuracy", result[name].get("precision_at_1")) for name in result["datasets"]
        }
    elif benchmark == "zeroshot":
        values = {key: result[key] for key in ("acc1", "acc5", "mean_per_class_recall", "n")}
    elif benchmark == "sugarcrepe":
        values = {
            **{name: sub["accuracy"] for name, sub in result["subsets"].items()},
            "mean_accuracy": result["mean_accuracy"],
        }
    else:
        raise ValueError(f"benchmark {benchmark!r}: expected winoground, aro, zeroshot or sugarcrepe")
    return {key: value for key, value in values.items() if value is not None}


def derive_sugarcrepe(params: Params, winoground_dir: Path, out_dir: Path) -> dict[str, Any]:
    """A SugarCrepe-format set from the synthetic world's Winoground set (the world has none of its own)."""
    from sdsclip.evaluate.sugarcrepe import derive_from_winoground

    return derive_from_winoground(Path(winoground_dir), Path(out_dir), params.seed, params.eval.sugarcrepe_world_items)


def report(metrics_dir: Path, out_dir: Path, summary: Path) -> dict[str, Any]:
    from sdsclip.evaluate.report import write_report

    return write_report(Path(metrics_dir), Path(out_dir), Path(summary))


def register(
    params: Params,
    model: Path,
    metrics: Path,
    baseline_metrics: Path,
    out: Path,
    data_files: list[Path] | None = None,
) -> dict[str, Any]:
    from sdsclip.hashing import file_sha256
    from sdsclip.register import register_model

    # Tag by the last two path parts ("train/manifest.csv"): stable whether DVC or Kubeflow placed the file.
    hashes = {"/".join(Path(p).parts[-2:]) + ".sha256": file_sha256(Path(p)) for p in (data_files or [])}
    return register_model(params, Path(model), Path(metrics), Path(baseline_metrics), Path(out), hashes)


def results_table(metrics: dict[str, Path]) -> list[dict[str, Any]]:
    """Rows {model, n, text_score, image_score, group_score} from Winoground metrics files."""
    rows = []
    for name, path in metrics.items():
        m = json.loads(Path(path).read_text())
        rows.append(
            {
                "model": name,
                **{k: m[k] for k in ("n", "text_score", "image_score", "group_score")},
                "by_collapsed_tag": m.get("by_collapsed_tag", {}),
            }
        )
    return rows
