"""One function per pipeline stage. The CLI (hence DVC) and the Kubeflow components call exactly these.

Each takes the validated params plus explicit input/output paths, so DVC and Kubeflow can each place
artifacts where they like.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdsclip.config import Params


def synth(params: Params, out_dir: Path, seed: int | None = None) -> dict[str, Any]:
    from sdsclip.synth import generate_world

    return generate_world(params.world, Path(out_dir), params.seed if seed is None else seed)


def ingest(params: Params, coco_root: Path, out_root: Path) -> dict[str, Any]:
    """Each configured split: COCO captions JSON + image folder -> WebDataset shards + manifest."""
    from sdsclip.ingest import ingest_coco

    coco_root, out_root = Path(coco_root), Path(out_root)
    return {
        split: ingest_coco(
            coco_root / "annotations" / f"captions_{split}.json",
            coco_root / "images" / split,
            out_root / split,
            params.ingest,
        )
        for split in params.ingest.splits
    }


def validate(params: Params, shards_root: Path, out_root: Path) -> dict[str, Any]:
    """Great Expectations over each split's manifest; raises ValidationFailed past the threshold."""
    from sdsclip.validate import ValidationFailed, validate_manifest

    summaries, failures = {}, []
    for split in params.ingest.splits:
        try:
            summaries[split] = validate_manifest(
                Path(shards_root) / split / "manifest.csv", Path(out_root) / split, params.validation
            )
        except ValidationFailed as err:  # validate every split before failing, so all reports exist
            failures.append(str(err))
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
    control: bool = False, log_dir: Path | None = None,
) -> dict[str, Any]:
    from sdsclip.train import finetune

    shards, accepted = _split_paths(shards_root, validated_root, params.data.train_split)
    return finetune(params, Path(student), Path(teacher), shards, accepted, Path(out_dir), control, log_dir)


def evaluate_winoground(
    params: Params, model: Path, data_dir: Path, out: Path, scores: Path | None = None
) -> dict[str, Any]:
    from sdsclip.evaluate.winoground import evaluate_winoground as run
    from sdsclip.scoring import load_scorer

    return run(load_scorer(model, params), Path(data_dir), Path(out), scores)


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
