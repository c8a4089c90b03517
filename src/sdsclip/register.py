"""Model registration in the MLflow registry, with a quality gate on the `champion` alias.

The SDS-CLIP model is always registered as a new version (with its params, metrics and data hashes);
the alias moves to it only if its Winoground gate metric is >= the lambda = 0 control's.

Where the registry lives: the ``MLFLOW_TRACKING_URI`` environment variable, when set and non-empty, wins
over ``registry.tracking_uri`` in params.yaml. In a cluster the Kubernetes secret that injects it (with
``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``, which MLflow's client reads itself) knows the
server, while params.yaml is shared with laptops and CI whose default is a local sqlite file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from time import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from sdsclip.config import Params, params_to_dict
from sdsclip.errors import UserError

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
_URI_PASSWORD = re.compile(r"//([^/:@\s]+):[^/@\s]+@")
_CONNECT_ERROR = re.compile(r"\[Errno -?\d+\] [^\"')]+")  # the socket error inside urllib3's retry message


class RegistryError(UserError, ValueError):
    """Registration cannot proceed (bad metrics file, unreachable or refusing MLflow); one line for the user."""


def resolve_tracking_uri(params: Params) -> str:
    """The MLflow tracking/registry URI to use: $MLFLOW_TRACKING_URI if set, else registry.tracking_uri."""
    return os.environ.get(TRACKING_URI_ENV, "").strip() or params.registry.tracking_uri


def experiment_id(client: Any, name: str, tracking_uri: str) -> str:
    """The id of MLflow experiment ``name``, created if missing. For a local sqlite store its artifacts go
    next to the database file (``mlartifacts/``), not to MLflow's default ``./mlruns`` of the current
    directory: a container's working directory dies with it, while the database sits on a mounted volume."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///") and tracking_uri != "sqlite:///:memory:":
        location = (Path(tracking_uri.removeprefix("sqlite:///")).absolute().parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


def redact_uri(uri: str) -> str:
    """``uri`` without a password in its user-info, so it can be written to results and logs."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host_port = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host_port}"))


def _read_metrics(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise RegistryError(
            f"{path}: not valid JSON (line {err.lineno}: {err.msg}); re-run the evaluate stage"
        ) from None
    if not isinstance(data, dict):
        raise RegistryError(f"{path}: expected a JSON object of metrics, got {type(data).__name__}")
    return data


def flatten_dict(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to one level of dotted keys: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_dict(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _scalar_metrics(prefix: str, metrics: dict[str, Any]) -> dict[str, float]:
    return {f"{prefix}{k}": float(v) for k, v in flatten_dict(metrics).items() if isinstance(v, (int, float))}


def register_model(
    params: Params,
    model_dir: Path,
    candidate_metrics: Path,
    baseline_metrics: Path,
    out: Path,
    data_hashes: dict[str, str] | None = None,
) -> dict[str, Any]:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow.exceptions import MlflowException

    cfg = params.registry
    candidate = _read_metrics(candidate_metrics)
    baseline = _read_metrics(baseline_metrics)
    gate = cfg.gate_metric
    if gate not in candidate or gate not in baseline:
        raise RegistryError(f"registry.gate_metric: {gate!r} is not in {candidate_metrics} / {baseline_metrics}")
    for path, metrics in ((candidate_metrics, candidate), (baseline_metrics, baseline)):
        if isinstance(metrics[gate], bool) or not isinstance(metrics[gate], (int, float)):
            raise RegistryError(f"{path}: {gate} must be a number, got {metrics[gate]!r}")

    tracking_uri = resolve_tracking_uri(params)
    try:
        result = _register(params, tracking_uri, Path(model_dir), candidate, baseline, data_hashes)
    except MlflowException as err:
        # e.g. server unreachable after MLflow's retries, 401/403 from an auth proxy, a bad store URI
        text = str(err).strip() or type(err).__name__
        refused = _CONNECT_ERROR.search(text) if "Max retries exceeded" in text else None
        detail = f"cannot connect ({refused.group(0)})" if refused else text.splitlines()[0][:300]
        detail = _URI_PASSWORD.sub(r"//\1:***@", detail)
        raise RegistryError(
            f"MLflow at {redact_uri(tracking_uri)}: {detail} (check ${TRACKING_URI_ENV} or "
            "registry.tracking_uri, and MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)"
        ) from None
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result


def _register(
    params: Params,
    tracking_uri: str,
    model_dir: Path,
    candidate: dict[str, Any],
    baseline: dict[str, Any],
    data_hashes: dict[str, str] | None,
) -> dict[str, Any]:
    # The client API with an explicit URI, not mlflow.set_tracking_uri: that one also writes
    # $MLFLOW_TRACKING_URI into os.environ, which would then override params for later calls in this process.
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import MlflowException
    from mlflow.tracking.context.registry import resolve_tags

    cfg = params.registry
    gate = cfg.gate_metric
    client = MlflowClient(tracking_uri=tracking_uri)
    # resolve_tags: the tags mlflow.start_run would add (user, source, git commit)
    run = client.create_run(
        experiment_id(client, cfg.experiment, tracking_uri), run_name="register", tags=resolve_tags()
    )
    run_id = run.info.run_id
    try:
        flat_params = [Param(k, str(v)[:500]) for k, v in flatten_dict(params_to_dict(params)).items()]
        for i in range(0, len(flat_params), 100):  # the REST API's per-request limit on params
            client.log_batch(run_id, params=flat_params[i : i + 100])
        now = int(time() * 1000)
        metrics = {**_scalar_metrics("winoground.", candidate), **_scalar_metrics("baseline.winoground.", baseline)}
        client.log_batch(
            run_id,
            metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
            tags=[RunTag(f"data.{k}", str(v)) for k, v in (data_hashes or {}).items()],
        )
        client.log_artifacts(run_id, str(model_dir), artifact_path="model")
    except BaseException:
        with contextlib.suppress(Exception):  # the original error is the one to report
            client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id)
    model_uri = f"{run.info.artifact_uri}/model"
    try:
        client.get_registered_model(cfg.model_name)
    except MlflowException:
        client.create_registered_model(cfg.model_name, description="SDS-CLIP fine-tuned CLIP student")
    version = client.create_model_version(
        cfg.model_name, source=model_uri, run_id=run_id, tags={f"winoground.{gate}": str(candidate[gate])}
    )
    passed = float(candidate[gate]) >= float(baseline[gate])
    if passed:
        client.set_registered_model_alias(cfg.model_name, cfg.alias, version.version)
        reason = f"{gate} {candidate[gate]:.4f} >= baseline {baseline[gate]:.4f}: alias {cfg.alias!r} moved"
    else:
        reason = f"{gate} {candidate[gate]:.4f} < baseline {baseline[gate]:.4f}: registered without alias {cfg.alias!r}"
    client.set_model_version_tag(cfg.model_name, version.version, "gate", "passed" if passed else "failed")
    return {
        "model_name": cfg.model_name,
        "version": int(version.version),
        "alias": cfg.alias,
        "alias_moved": passed,
        "reason": reason,
        "run_id": run_id,
        "tracking_uri": redact_uri(tracking_uri),
    }
