"""Fixtures shared across test modules: the whole local pipeline, run once per session (minutes)."""

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def pipeline_params(pipeline_root: Path) -> dict:
    """params.yaml cut to a pipeline run of a few minutes on 2 CPU cores; the MLflow store inside the
    pipeline root (the one directory a DockerRunner task sees)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["device"] = "cpu"
    params["world"].update(
        pretrain_images=200,
        train_images=100,
        winoground_items=20,
        aro_relation_items=8,
        aro_attribution_items=8,
        coco_order_images=8,
        zeroshot_per_class=2,
    )
    for model in ("student", "teacher"):
        params[model]["pretrain"].update(steps=5, batch_size=16, warmup_steps=1)
    params["train"].update(steps=3, batch_size=8, warmup_steps=1)
    # 4 items per teacher scorer call: several calls per benchmark for the 3 shards of PIPELINE_OVERRIDES
    params["eval"].update(teacher_draws=2, teacher_chunk_items=4)
    params["registry"]["tracking_uri"] = f"sqlite:///{pipeline_root / 'mlflow.db'}"
    return params


# run-form fields (the UI's override path); the teacher's evaluations as 3 shards each
PIPELINE_OVERRIDES = dict(device="cpu", train_steps=2, eval_shards=3)


@dataclass
class PipelineRun:
    params: dict
    run_dir: Path  # <pipeline root>/sdsclip-<timestamp>/<task>/<output>
    seconds: float


def run_pipeline(pipeline_root: Path, runner=None) -> PipelineRun:
    import time

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from pipelines.sdsclip_pipeline import run_local

    pipeline_root.mkdir(parents=True, exist_ok=True)
    params = pipeline_params(pipeline_root)
    started = time.perf_counter()
    run_dir = run_local(yaml.safe_dump(params), pipeline_root, runner=runner, **PIPELINE_OVERRIDES)
    return PipelineRun(params, run_dir, time.perf_counter() - started)


@pytest.fixture(scope="session")
def subprocess_pipeline_run(tmp_path_factory) -> PipelineRun:
    """The whole pipeline with kfp.local's SubprocessRunner in this Python env."""
    run = run_pipeline(tmp_path_factory.mktemp("kfp-subprocess"))
    print(f"kfp.local SubprocessRunner pipeline run: {run.seconds:.0f}s")
    return run
