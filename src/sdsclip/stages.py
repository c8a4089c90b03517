"""One function per pipeline stage. The CLI (hence DVC) and the Kubeflow components call exactly these.

Each takes the validated params plus explicit input/output paths, so DVC and Kubeflow can each place
artifacts where they like.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdsclip.config import Params


def synth(params: Params, out_dir: Path, seed: int | None = None, families: list[str] | None = None,
          world: Any = None) -> dict[str, Any]:
    """Render the world (``families``: only those; ``world``: a WorldConfig in place of params.world)."""
    from sdsclip.synth import generate_world

    return generate_world(world or params.world, Path(out_dir), params.seed if seed is None else seed, families)


def _write_json_file(path: str | Path, obj: Any) -> None:
    from sdsclip.ingest import _Loc

    loc = _Loc.of(path)
    parent = loc.path.rsplit("/", 1)[0]
    if parent:
        loc.fs.makedirs(parent, exist_ok=True)
    loc.write_atomic((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def ingest(params: Params, coco_root: str | Path, out_root: str | Path, metrics: str | Path | None = None
           ) -> dict[str, Any]:
    """Each configured split: COCO captions JSON + image folder -> WebDataset shards + manifest in
    ``out_root/{split}/``. Roots may be local paths or fsspec URLs. ``metrics``: also write the per-split
    counts there as one JSON (a DVC metrics file; run-dependent fields such as timings left out)."""
    from sdsclip.ingest import ingest_split, join

    results = {split: ingest_split(coco_root, split, join(out_root, split), params.ingest)
               for split in params.ingest.splits}
    if metrics is not None:
        _write_json_file(metrics, {split: {k: v for k, v in r.items() if k not in ("seconds", "shards_reused")}
                                   for split, r in results.items()})
    return results


def validate(params: Params, shards_root: str | Path, out_root: str | Path, metrics: str | Path | None = None
             ) -> dict[str, Any]:
    """Great Expectations over each split's manifest -> ``out_root/{split}/`` (accepted / quarantine / Data
    Docs ...) and ``out_root/data_docs.html`` (one self-contained page over all splits); ``metrics``: also
    write each split's validation_metrics.json into one JSON (a DVC metrics file). Raises ValidationFailed past
    the threshold, after every split's reports are written."""
    from sdsclip.ingest import _Loc, join
    from sdsclip.validate import METRICS_FILE, REPORT_PAGE, ValidationFailed, data_docs_page, validate_manifest

    summaries, failures = {}, []
    out_dirs = {split: join(out_root, split) for split in params.ingest.splits}
    for split, out_dir in out_dirs.items():
        try:
            summaries[split] = validate_manifest(join(shards_root, split, "manifest.csv"), out_dir, params.validation)
        except ValidationFailed as err:  # validate every split before failing, so all reports exist
            failures.append(str(err))
    _Loc.of(join(out_root, REPORT_PAGE)).write_atomic(data_docs_page(out_dirs).encode("utf-8"))
    if metrics is not None:
        found = {}
        for split, out_dir in out_dirs.items():
            try:
                found[split] = json.loads(_Loc.of(join(out_dir, METRICS_FILE)).read_bytes())
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
    from sdsclip.train import pretrain_student as run

    split = _split_paths(shards_root, validated_root, params.data.pretrain_split)
    return run(params, *split, Path(out_dir), log_dir)


def pretrain_teacher(
    params: Params, shards_root: Path, validated_root: Path, out_dir: Path, log_dir: Path | None = None
) -> dict[str, Any]:
    from sdsclip.train import pretrain_teacher as run

    split = _split_paths(shards_root, validated_root, params.data.pretrain_split)
    return run(params, *split, Path(out_dir), log_dir)


def train(
    params: Params, student: Path, teacher: Path, shards_root: Path, validated_root: Path, out_dir: Path,
    control: bool = False, log_dir: Path | None = None, resume: bool = False, checkpoint_dir: Path | None = None,
) -> dict[str, Any]:
    from sdsclip.train import finetune

    shards, accepted = _split_paths(shards_root, validated_root, params.data.train_split)
    return finetune(params, Path(student), Path(teacher), shards, accepted, Path(out_dir), control, log_dir,
                    resume=resume, checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir else None)


def evaluate_winoground(
    params: Params, model: Path, data_dir: Path, out: Path, scores: Path | None = None
) -> dict[str, Any]:
    from sdsclip.evaluate.winoground import evaluate_winoground as run
    from sdsclip.scoring import load_scorer

    return run(load_scorer(model, params), Path(data_dir), Path(out), scores, on_missing=params.eval.on_missing)


def _scorer_and_cap(params: Params, model: Path):
    """The model's scorer and the item cap that applies to it (eval.teacher_max_items for the teacher: each
    benchmark draws a seeded (params.seed) random subset of that size, stratified where its metric is a macro
    average, and records n / total / seed under ``subset``)."""
    from sdsclip.scoring import TeacherScorer, load_scorer

    scorer = load_scorer(model, params)
    return scorer, (params.eval.teacher_max_items if isinstance(scorer, TeacherScorer) else None)


def evaluate_aro(
    params: Params, model: Path, data_dir: Path, out: Path, datasets: list[str] | None = None,
    order_dirs: dict[str, Path] | None = None,
) -> dict[str, Any]:
    from sdsclip.evaluate.aro import evaluate_aro as run

    scorer, cap = _scorer_and_cap(params, model)
    ev = params.eval
    return run(scorer, Path(data_dir), Path(out), datasets or None, order_dirs=order_dirs, pos_tagger=ev.aro_pos_tagger,
               seed=params.seed, min_count=ev.aro_attribution_min_count, on_missing=ev.on_missing, max_items=cap)


def evaluate_zeroshot(params: Params, model: Path, data_dir: Path, out: Path,
                      prompt_set: str | None = None) -> dict[str, Any]:
    from sdsclip.evaluate.zeroshot import check_prompt_set
    from sdsclip.evaluate.zeroshot import evaluate_zeroshot as run

    ev = params.eval
    prompts = Path(ev.zeroshot_prompts_file) if ev.zeroshot_prompts_file else None
    check_prompt_set(Path(data_dir), prompt_set or ev.zeroshot_prompt_set, prompts)  # before the model loads
    scorer, cap = _scorer_and_cap(params, model)
    return run(scorer, Path(data_dir), Path(out), prompt_set=prompt_set or ev.zeroshot_prompt_set,
               prompts_file=prompts, on_missing=ev.on_missing, max_items=cap, seed=params.seed)


def evaluate_sugarcrepe(
    params: Params, model: Path, data_dir: Path, out: Path, images_dir: Path | None = None,
    scores: Path | None = None,
) -> dict[str, Any]:
    from sdsclip.evaluate.sugarcrepe import evaluate_sugarcrepe as run

    scorer, cap = _scorer_and_cap(params, model)
    return run(scorer, Path(data_dir), Path(out), images_dir=images_dir, on_missing=params.eval.on_missing,
               max_items=cap, scores_out=scores, seed=params.seed)


def derive_sugarcrepe(params: Params, winoground_dir: Path, out_dir: Path) -> dict[str, Any]:
    """A SugarCrepe-format set from the synthetic world's Winoground set (the world has none of its own)."""
    from sdsclip.evaluate.sugarcrepe import derive_from_winoground

    return derive_from_winoground(Path(winoground_dir), Path(out_dir), params.seed, params.eval.sugarcrepe_world_items)


def report(metrics_dir: Path, out_dir: Path, summary: Path) -> dict[str, Any]:
    from sdsclip.evaluate.report import write_report

    return write_report(Path(metrics_dir), Path(out_dir), Path(summary))


def register(
    params: Params, model: Path, metrics: Path, baseline_metrics: Path, out: Path,
    data_files: list[Path] | None = None,
) -> dict[str, Any]:
    from sdsclip.register import register_model
    from sdsclip.train import file_sha256

    # Tag by the last two path parts ("train/manifest.csv"): stable whether DVC or Kubeflow placed the file.
    hashes = {"/".join(Path(p).parts[-2:]) + ".sha256": file_sha256(Path(p)) for p in (data_files or [])}
    return register_model(params, Path(model), Path(metrics), Path(baseline_metrics), Path(out), hashes)


def results_table(metrics: dict[str, Path]) -> list[dict[str, Any]]:
    """Rows {model, n, text_score, image_score, group_score} from Winoground metrics files."""
    rows = []
    for name, path in metrics.items():
        m = json.loads(Path(path).read_text())
        rows.append({"model": name, **{k: m[k] for k in ("n", "text_score", "image_score", "group_score")},
                     "by_collapsed_tag": m.get("by_collapsed_tag", {})})
    return rows
