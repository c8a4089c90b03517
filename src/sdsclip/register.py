"""Model registration in the MLflow registry, with a quality gate on the `champion` alias.

The SDS-CLIP model is always registered as a new version (with its params, metrics and data hashes);
the alias moves to it only if its Winoground gate metric is >= the lambda = 0 control's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sdsclip.config import Params, params_to_dict


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _scalar_metrics(prefix: str, metrics: dict[str, Any]) -> dict[str, float]:
    return {f"{prefix}{k}": float(v) for k, v in _flatten(metrics).items() if isinstance(v, (int, float))}


def register_model(
    params: Params,
    model_dir: Path,
    candidate_metrics: Path,
    baseline_metrics: Path,
    out: Path,
    data_hashes: dict[str, str] | None = None,
) -> dict[str, Any]:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow
    from mlflow import MlflowClient

    cfg = params.registry
    candidate = json.loads(Path(candidate_metrics).read_text())
    baseline = json.loads(Path(baseline_metrics).read_text())
    gate = cfg.gate_metric
    if gate not in candidate or gate not in baseline:
        raise ValueError(f"register.gate_metric: {gate!r} is not in {candidate_metrics} / {baseline_metrics}")

    mlflow.set_tracking_uri(cfg.tracking_uri)
    mlflow.set_experiment(cfg.experiment)
    client = MlflowClient()
    with mlflow.start_run(run_name="register") as run:
        mlflow.log_params({k: str(v)[:500] for k, v in _flatten(params_to_dict(params)).items()})
        mlflow.log_metrics({**_scalar_metrics("winoground.", candidate),
                            **_scalar_metrics("baseline.winoground.", baseline)})
        mlflow.set_tags({f"data.{k}": v for k, v in (data_hashes or {}).items()})
        mlflow.log_artifacts(str(model_dir), artifact_path="model")
        model_uri = f"{run.info.artifact_uri}/model"
    try:
        client.get_registered_model(cfg.model_name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(cfg.model_name, description="SDS-CLIP fine-tuned CLIP student")
    version = client.create_model_version(cfg.model_name, source=model_uri, run_id=run.info.run_id,
                                          tags={f"winoground.{gate}": str(candidate[gate])})
    passed = float(candidate[gate]) >= float(baseline[gate])
    if passed:
        client.set_registered_model_alias(cfg.model_name, cfg.alias, version.version)
        reason = f"{gate} {candidate[gate]:.4f} >= baseline {baseline[gate]:.4f}: alias {cfg.alias!r} moved"
    else:
        reason = (f"{gate} {candidate[gate]:.4f} < baseline {baseline[gate]:.4f}: registered without "
                  f"alias {cfg.alias!r}")
    client.set_model_version_tag(cfg.model_name, version.version, "gate", "passed" if passed else "failed")
    result = {"model_name": cfg.model_name, "version": int(version.version), "alias": cfg.alias,
              "alias_moved": passed, "reason": reason, "run_id": run.info.run_id,
              "tracking_uri": cfg.tracking_uri}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result
