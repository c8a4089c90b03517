"""Per-step loss terms of a training run: DVCLive (DVC plots) and MLflow."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sdsclip.config import Params, params_to_dict


class LossLog:
    """Per-step loss terms as DVC plots (DVCLive TSVs) plus a summary JSON.

    ``resume_step > 0`` continues an interrupted run's curves: rows from that step on (logged after the
    checkpoint the run resumes from) are dropped, and numbering goes on from it."""

    def __init__(self, out_dir: Path, resume_step: int = 0):
        from dvclive import Live

        if resume_step:
            _truncate_tsvs(Path(out_dir) / "plots" / "metrics", resume_step)
        self.live = Live(str(out_dir), save_dvc_exp=False, dvcyaml=None, report=None, resume=bool(resume_step))
        if resume_step:
            self.live.step = resume_step

    def log(self, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.live.log_metric(name, value)
        self.live.next_step()

    def close(self) -> None:
        self.live.end()


def _truncate_tsvs(metrics_dir: Path, step: int) -> None:
    for tsv in metrics_dir.rglob("*.tsv") if metrics_dir.is_dir() else []:
        lines = tsv.read_text().splitlines(keepends=True)
        if not lines:
            continue
        col = lines[0].rstrip("\n").split("\t").index("step")
        kept = [ln for ln in lines[1:] if ln.strip() and int(ln.split("\t")[col]) < step]
        tsv.write_text(lines[0] + "".join(kept))


class MlflowLog:
    """Per-step loss terms to MLflow (params.registry.tracking_uri / experiment), buffered into batches."""

    def __init__(self, params: Params, run_name: str, run_id: str | None = None, flush_every: int = 50):
        import os

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        from mlflow import MlflowClient
        from mlflow.entities import Param

        from sdsclip.register import experiment_id, flatten_dict, resolve_tracking_uri

        tracking_uri = resolve_tracking_uri(params)  # MLFLOW_TRACKING_URI wins
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.flush_every = flush_every
        self.buffer: list[Any] = []  # mlflow.entities.Metric rows
        if run_id is not None:
            try:
                self.run_id = self.client.get_run(run_id).info.run_id
                return
            except Exception:  # a resumed run whose MLflow store moved: start a new MLflow run
                pass
        exp_id = experiment_id(self.client, params.registry.experiment, tracking_uri)
        self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
        flat = [Param(k, str(v)[:500]) for k, v in flatten_dict(params_to_dict(params)).items()]
        for i in range(0, len(flat), 100):
            self.client.log_batch(self.run_id, params=flat[i : i + 100])

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.buffer += [Metric(k, float(v), now, step) for k, v in values.items()]
        if len(self.buffer) >= self.flush_every * max(1, len(values)):
            self.flush()

    def flush(self) -> None:
        for i in range(0, len(self.buffer), 1000):
            self.client.log_batch(self.run_id, metrics=self.buffer[i : i + 1000])
        self.buffer = []

    def close(self, summary: dict[str, Any] | None = None) -> None:
        self.flush()
        for key, value in (summary or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.client.log_metric(self.run_id, f"final.{key}", float(value))
        self.client.set_terminated(self.run_id, "FINISHED")
