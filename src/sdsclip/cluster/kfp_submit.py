"""Submitting the compiled pipeline to a Kubeflow Pipelines server (``sdsclip pipeline submit``).

``submit`` sends a compiled pipeline package to a KFP v2 API server with ``kfp.Client``:
a one-off run (POST /apis/v2beta1/runs) or a recurring run (POST /apis/v2beta1/recurringruns) in an
experiment that is looked up by name and created if missing (GET/POST /apis/v2beta1/experiments). The
pipeline spec travels inside the run itself (no pipeline upload). Every user error is a ``SubmitError``
with one line.

The run's params.yaml is resolved here first, as the pipeline's resolve-params task will
(``sdsclip.kubeflow.apply_run_form``), and a ``--schedule`` is checked against KFP's cron dialect.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from sdsclip.kubeflow import apply_run_form


class SubmitError(ValueError):
    """A submission that cannot go ahead; the message is one line meant for the user."""


# -- cron -------------------------------------------------------------------------------------------------
# KFP's scheduler parses `cron` with github.com/robfig/cron (v1) `cron.Parse`: six fields, SECONDS FIRST
# (sec min hour day-of-month month day-of-week), or a descriptor (@daily, @every 1h30m). Its parser also
# takes five fields as sec..month, so a classic "0 2 * * *" would silently run hourly: only six are allowed.
_CRON_FIELDS: tuple[tuple[str, int, int, dict[str, int]], ...] = (
    ("second", 0, 59, {}),
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    ("month", 1, 12, {m: i + 1 for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split())}),
    ("day of week", 0, 6, {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())}),
)
_DESCRIPTORS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
_GO_DURATION = re.compile(r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")


def _cron_value(text: str, low: int, high: int, names: dict[str, int]) -> int:
    value = names.get(text.lower())
    if value is None:
        if not text.isdigit():
            raise ValueError(f"{text!r} is not a number")
        value = int(text)
    if not low <= value <= high:
        raise ValueError(f"{value} is outside {low}-{high}")
    return value


def validate_cron(expression: str) -> str:
    """``expression`` if KFP's scheduler accepts it, else SubmitError with one line saying why."""
    expr = " ".join(expression.split())
    hint = "KFP cron has 6 fields, seconds first: '0 0 2 * * *' = daily at 02:00 UTC; or @daily, @every 6h"
    if expr.startswith("@"):
        if expr in _DESCRIPTORS or (expr.startswith("@every ") and _GO_DURATION.match(expr[7:])):
            return expr
        raise SubmitError(f"--schedule {expression!r}: unknown descriptor ({hint})")
    fields = expr.split(" ")
    if len(fields) != 6:
        raise SubmitError(f"--schedule {expression!r}: {len(fields)} fields ({hint})")
    for text, (name, low, high, names) in zip(fields, _CRON_FIELDS):
        try:
            for part in text.split(","):
                base, _, step = part.partition("/")
                if step and (not step.isdigit() or int(step) == 0):
                    raise ValueError(f"step {step!r} must be a positive number")
                if base in ("*", "?"):
                    if base == "?" and name not in ("day of month", "day of week"):
                        raise ValueError("'?' is only for day of month / day of week")
                    continue
                start, _, end = base.partition("-")
                first = _cron_value(start, low, high, names)
                if end and _cron_value(end, low, high, names) < first:
                    raise ValueError(f"range {base!r} runs backwards")
        except ValueError as err:
            raise SubmitError(f"--schedule {expression!r}: {name} field {text!r}: {err} ({hint})") from None
    return expr


# -- run parameters ---------------------------------------------------------------------------------------
def read_package(package: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The compiled pipeline's spec (first YAML document) and its root parameters."""
    package = Path(package)
    if not package.is_file():
        raise SubmitError(f"{package}: pipeline package not found (run `sdsclip pipeline compile`)")
    try:
        spec = next(iter(yaml.safe_load_all(package.read_text(encoding="utf-8"))))
        return spec, spec["root"]["inputDefinitions"]["parameters"]
    except (yaml.YAMLError, StopIteration, KeyError, TypeError):
        raise SubmitError(f"{package}: not a compiled kfp v2 pipeline YAML (run `sdsclip pipeline compile`)") from None


def _typed(name: str, text: str, kind: str) -> Any:
    try:
        if kind == "NUMBER_INTEGER":
            return int(text)
        if kind == "NUMBER_DOUBLE":
            return float(text)
        if kind == "BOOLEAN":
            if text.lower() not in ("true", "false"):
                raise ValueError
            return text.lower() == "true"
        if kind in ("LIST", "STRUCT"):
            value = yaml.safe_load(text)
            if not isinstance(value, list if kind == "LIST" else dict):
                raise ValueError
            return value
    except (ValueError, yaml.YAMLError):
        expected = {
            "NUMBER_INTEGER": "an integer",
            "NUMBER_DOUBLE": "a number",
            "BOOLEAN": "true or false",
            "LIST": "a JSON/YAML list, e.g. [train2017]",
            "STRUCT": "a JSON/YAML mapping",
        }[kind]
        raise SubmitError(f"--param {name}={text}: expected {expected}") from None
    return text


def parse_run_params(pairs: list[str], inputs: dict[str, Any]) -> dict[str, Any]:
    """``["key=value", ...]`` -> typed run parameters, checked against the pipeline's parameters."""
    params: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            raise SubmitError(f"--param {pair!r}: expected key=value")
        if name not in inputs:
            raise SubmitError(f"--param {name}: not a parameter of the pipeline ({', '.join(sorted(inputs))})")
        params[name] = _typed(name, text, inputs[name]["parameterType"])
    return params


def check_run_params(spec: dict[str, Any], inputs: dict[str, Any], params: dict[str, Any]) -> None:
    """Resolve the run's params.yaml here, as the pipeline's resolve-params task will (ConfigError if bad)."""
    task = spec["root"]["dag"]["tasks"].get("resolve-params", {})
    form_spec_value = task.get("inputs", {}).get("parameters", {}).get("form_spec", {})
    form_spec_arg = form_spec_value.get("runtimeValue", {}).get("constant")
    if not isinstance(form_spec_arg, dict):
        return  # a package without the run form: nothing to check here
    values = {name: params.get(name, inputs[name].get("defaultValue")) for name in inputs}
    form = {name: values[name] for name in form_spec_arg}
    apply_run_form(values.get("params_yaml") or "", form, form_spec_arg)


def _probe(host: str, token: str | None) -> None:
    """GET /apis/v2beta1/healthz: one clear line for an unreachable or wrong host (kfp.Client would retry
    an HTTP error five times, 5 s apart, and log tracebacks)."""
    request = urllib.request.Request(f"{host.rstrip('/')}/apis/v2beta1/healthz")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no env proxies, as kfp.Client
    try:
        with opener.open(request, timeout=15) as response:
            response.read()
    except urllib.error.HTTPError as err:
        raise SubmitError(
            f"{host}: KFP API health check answered HTTP {err.code} {err.reason} "
            f"(is this the KFP API endpoint? does it need --token?)"
        ) from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise SubmitError(f"{host}: cannot reach the KFP API ({reason})") from None


def submit(
    package: Path,
    host: str,
    experiment: str = "sdsclip",
    run_name: str | None = None,
    params: dict[str, Any] | None = None,
    schedule: str | None = None,
    namespace: str | None = None,
    enable_caching: bool | None = None,
    token: str | None = None,
) -> dict[str, Any]:
    """Submit ``package`` to the KFP API at ``host``: a run, or a recurring run when ``schedule`` (cron)."""
    import warnings

    spec, inputs = read_package(package)
    params = dict(params or {})
    unknown = sorted(set(params) - set(inputs))
    if unknown:
        raise SubmitError(f"parameter {unknown[0]!r} is not in {package}")
    check_run_params(spec, inputs, params)
    cron = validate_cron(schedule) if schedule else None
    if not re.match(r"^https?://", host):
        raise SubmitError(f"--host {host!r}: give the URL with its scheme, e.g. http://localhost:8080")
    _probe(host, token)

    import kfp
    import kfp_server_api
    import urllib3

    name = run_name or f"{spec['pipelineInfo']['name']} {'schedule' if cron else 'run'}"
    try:
        with warnings.catch_warnings():  # kfp.Client's FutureWarning about server versions says nothing here
            warnings.simplefilter("ignore", FutureWarning)
            client = kfp.Client(host=host, namespace=namespace or "kubeflow", existing_token=token)
        if cron:
            exp = client.create_experiment(name=experiment, namespace=namespace)
            job = client.create_recurring_run(
                experiment_id=exp.experiment_id,
                job_name=name,
                cron_expression=cron,
                params=params,
                pipeline_package_path=str(package),
                enable_caching=enable_caching,
                max_concurrency=1,
                no_catchup=True,
            )  # a paused schedule resumes with one run, not one per missed slot
            return {
                "recurring_run_id": job.recurring_run_id,
                "experiment_id": exp.experiment_id,
                "name": name,
                "cron": cron,
            }
        result = client.create_run_from_pipeline_package(
            str(package),
            arguments=params,
            run_name=name,
            experiment_name=experiment,
            namespace=namespace,
            enable_caching=enable_caching,
        )
        return {"run_id": result.run_id, "experiment_id": result.run_info.experiment_id, "name": name}
    except kfp_server_api.ApiException as err:
        detail = (err.body or "").strip().replace("\n", " ")[:300] if isinstance(err.body, str) else ""
        raise SubmitError(
            f"{host}: KFP API answered HTTP {err.status} {err.reason}" + (f": {detail}" if detail else "")
        ) from None
    except (urllib3.exceptions.HTTPError, OSError) as err:
        raise SubmitError(f"{host}: cannot reach the KFP API ({err})") from None
    except ValueError as err:  # kfp.Client: e.g. several experiments with that name
        raise SubmitError(f"{host}: {str(err).splitlines()[0]}") from None
