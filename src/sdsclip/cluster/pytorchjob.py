"""Multi-node ``sdsclip train`` as a Kubeflow PyTorchJob on a cluster: submit the job, wait, report failures.

The job itself (settings, manifest, schema checks) is ``sdsclip.cluster.jobspec``; this module is the
Kubernetes API side (``kubernetes`` client: create, poll, delete, pod logs) and the pipeline step around it.

What happens (``run_multinode_training``, called by ``components/multinode.py``):

1. the pipeline step stages its inputs and the params file on the shared data PVC (``/mnt/data``) under
   ``sdsclip-runs/<job name>/``;
2. ``jobspec.render_job`` fills ``k8s/training/pytorchjob.yaml`` (Master + ``num_nodes - 1`` Workers; the data
   PVC at ``/mnt/data``, the checkpoint PVC at ``/mnt/checkpoints``; ``sdsclip train ... --resume``, so a pod
   that the operator restarts, restartPolicy OnFailure, continues from the newest checkpoint) and checks it
   against the CRD's schema (``k8s/training/pytorchjob-crd-schema.yaml``);
3. ``submit_and_wait`` creates it and polls ``status.conditions`` until Succeeded or Failed;
4. the trained model is copied from the PVC into the step's output artifact.

Decisions:

- **Already exists (HTTP 409): adopt it if it is the same job, else stop.** The job's name is a digest of the
  step's inputs and every rendered spec carries the sha256 of its ``spec`` in the annotation
  ``sdsclip/spec-sha256``. A retried pipeline step therefore re-attaches to the job it already started
  (instead of training twice); if that job had Failed, it is deleted and created again (``replace_failed``),
  which resumes from its checkpoints. Any other job under that name is a one-line error saying to delete it.
- **Timeout: delete the job (default; ``delete_on_timeout``).** Nobody waits for it any more, and a
  forgotten multi-node job holds GPUs. Its checkpoints stay on the checkpoint PVC, so the retried step (same
  name, same ``--checkpoint-dir``) resumes where it stopped.
- **cleanPodPolicy Running (default)**: pods that failed are kept (until ``ttlSecondsAfterFinished``), so
  their logs can still be read when the job is reported Failed.
- **Polling, not watch**: one GET per ``poll_s``; survives API-server restarts and is simple to test.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sdsclip.cluster.jobspec import (
    CONTAINER,
    DATA_MOUNT,
    GROUP,
    INPUTS,
    PLURAL,
    SPEC_DIGEST_ANNOTATION,
    VERSION,
    PyTorchJobError,
    TrainPaths,
    job_config,
    job_name,
    one_line,
    render_job,
    spec_digest,
)

log = logging.getLogger(__name__)

JOB_NAME_LABEL = "training.kubeflow.org/job-name"  # the operator labels every pod of the job with these
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"
RUNS_DIR = "sdsclip-runs"  # run dirs on the data PVC: /mnt/data/sdsclip-runs/<job name>/
TERMINAL = ("Succeeded", "Failed")


class PyTorchJobFailed(PyTorchJobError):
    """The job reached the Failed condition."""


class PyTorchJobTimeout(PyTorchJobError):
    """The job reached neither Succeeded nor Failed within the timeout."""


# ------------------------------------------------------------------------------------------ submit + wait


@dataclass(frozen=True)
class JobResult:
    """What ``submit_and_wait`` returns for a job that Succeeded."""

    name: str
    namespace: str
    state: str  # "Succeeded"
    reason: str
    message: str
    seconds: float
    polls: int
    adopted: bool  # True: the job existed already (same spec) and was waited for, not created
    replaced: bool = False  # True: the same job existed but had Failed; it was deleted and created again


def load_api_client(api_client=None):
    """``api_client`` as given, else one from the in-cluster service account, else from the kubeconfig."""
    if api_client is not None:
        return api_client
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))  # read at call time, not import
        except (config.ConfigException, OSError) as err:
            raise PyTorchJobError(
                one_line(
                    f"no Kubernetes credentials: not inside a cluster and no usable kubeconfig ({err}); set KUBECONFIG"
                )
            ) from None
    return client.ApiClient()


def _api_error(err) -> str:
    """``409 Conflict: <the API server's message>`` from an ApiException."""
    message = ""
    try:
        message = json.loads(err.body or "{}").get("message", "")
    except (ValueError, AttributeError):
        message = err.body or ""
    return one_line(f"{err.status} {err.reason}" + (f": {message}" if message else ""))


def _transient(err) -> bool:
    """A status worth retrying: no answer, timeout, throttled or a server error."""
    return getattr(err, "status", 0) in (0, 408, 429, 500, 502, 503, 504)


def job_state(obj: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(state, condition): Succeeded/Failed when that condition is True, else the newest True condition's type
    (Created, Running, Restarting, Suspended), or Pending before the operator wrote any."""
    conditions = [c for c in ((obj.get("status") or {}).get("conditions") or []) if c.get("status") == "True"]
    for wanted in TERMINAL:
        for cond in conditions:
            if cond.get("type") == wanted:
                return wanted, cond
    return (conditions[-1].get("type", "Pending"), conditions[-1]) if conditions else ("Pending", {})


@dataclass(frozen=True)
class _JobApi:
    """One job's address on the API server and the clients that reach it."""

    custom: Any  # kubernetes.client.CustomObjectsApi
    core: Any  # kubernetes.client.CoreV1Api
    namespace: str
    name: str
    call: dict[str, Any]  # keyword arguments of every request (its timeout)

    @property
    def where(self) -> str:
        return f"{self.namespace}/{self.name}"


def submit_and_wait(
    job: Mapping[str, Any],
    namespace: str,
    *,
    poll_s: float,
    timeout_s: float,
    api_client=None,
    log_dir: Path | None = None,
    delete_on_timeout: bool = True,
    replace_failed: bool = True,
    tail_lines: int = 200,
    request_timeout_s: float = 60.0,
) -> JobResult:
    """Create ``job`` in ``namespace`` (or adopt the same job, see the module doc) and poll until it succeeds.

    Failed: raises PyTorchJobFailed with the condition's reason and message, the failing pod's last log line
    and where its log tail was written (``log_dir``, default a new temp dir). Timeout: raises PyTorchJobTimeout
    after deleting the job (``delete_on_timeout``) or leaving it running."""
    from kubernetes import client

    job, digest = _addressed_job(job, namespace)
    api_client = load_api_client(api_client)
    api = _JobApi(
        client.CustomObjectsApi(api_client),
        client.CoreV1Api(api_client),
        namespace,
        job["metadata"]["name"],
        dict(_request_timeout=request_timeout_s),
    )
    started = time.monotonic()
    adopted, replaced = _create_or_adopt(
        api, job, digest, replace_failed=replace_failed, poll_s=poll_s, deadline=started + timeout_s
    )
    return _wait_until_done(
        api,
        started,
        poll_s=poll_s,
        timeout_s=timeout_s,
        log_dir=log_dir,
        tail_lines=tail_lines,
        adopted=adopted,
        replaced=replaced,
        delete_on_timeout=delete_on_timeout,
    )


def _addressed_job(job: Mapping[str, Any], namespace: str) -> tuple[dict[str, Any], str]:
    """(a copy of ``job`` placed in ``namespace`` and annotated with its spec digest, that digest)."""
    placed = copy.deepcopy(dict(job))
    name = placed["metadata"]["name"]
    if placed["metadata"].get("namespace", namespace) != namespace:
        raise PyTorchJobError(
            f"PyTorchJob {name} is rendered for namespace {placed['metadata']['namespace']!r}, not {namespace!r}"
        )
    placed["metadata"]["namespace"] = namespace
    digest = spec_digest(placed)
    placed["metadata"].setdefault("annotations", {})[SPEC_DIGEST_ANNOTATION] = digest
    return placed, digest


def _create_or_get(api: _JobApi, job: Mapping[str, Any]) -> dict | None:
    """Create the job; on 409 return the existing object."""
    from kubernetes.client.rest import ApiException
    from urllib3.exceptions import HTTPError

    try:
        api.custom.create_namespaced_custom_object(
            GROUP, VERSION, api.namespace, PLURAL, job, field_validation="Strict", **api.call
        )
        log.info("created PyTorchJob %s", api.where)
        return None
    except ApiException as err:
        if err.status != 409:
            raise PyTorchJobError(f"cannot create PyTorchJob {api.where}: {_api_error(err)}") from None
    except HTTPError as err:
        raise PyTorchJobError(one_line(f"cannot reach the Kubernetes API to create {api.where}: {err}")) from None
    try:
        return api.custom.get_namespaced_custom_object(GROUP, VERSION, api.namespace, PLURAL, api.name, **api.call)
    except ApiException as err:
        raise PyTorchJobError(f"PyTorchJob {api.where} already exists and cannot be read: {_api_error(err)}") from None


def _create_or_adopt(
    api: _JobApi, job: Mapping[str, Any], digest: str, *, replace_failed: bool, poll_s: float, deadline: float
) -> tuple[bool, bool]:
    """Create the job, or take over the same one already there: (adopted, replaced). A Failed one is
    deleted and created again when ``replace_failed``; another job under the name is an error."""
    existing = _create_or_get(api, job)
    if existing is None:
        return False, False
    theirs = ((existing.get("metadata") or {}).get("annotations") or {}).get(SPEC_DIGEST_ANNOTATION)
    if theirs != digest:
        raise PyTorchJobError(
            f"PyTorchJob {api.where} already exists with a different spec: delete it "
            f"(kubectl delete pytorchjob {api.name} -n {api.namespace}) or use another name"
        )
    if replace_failed and job_state(existing)[0] == "Failed":
        log.info("PyTorchJob %s exists with the same spec but Failed: deleting it to run it again", api.where)
        _delete_and_wait_gone(api.custom, api.namespace, api.name, poll_s, deadline, api.call)
        if _create_or_get(api, job) is not None:
            raise PyTorchJobError(f"PyTorchJob {api.where} was created again by someone else while it was replaced")
        return False, True
    log.info("PyTorchJob %s already exists with the same spec: waiting for it", api.where)
    return True, False


def _read_job(api: _JobApi) -> dict | None:
    """The job object, or None after a transient error (logged; the next poll retries)."""
    from kubernetes.client.rest import ApiException
    from urllib3.exceptions import HTTPError

    try:
        return api.custom.get_namespaced_custom_object(GROUP, VERSION, api.namespace, PLURAL, api.name, **api.call)
    except ApiException as err:
        if err.status == 404:
            raise PyTorchJobError(
                f"PyTorchJob {api.where} disappeared while waiting for it (deleted by someone, "
                "or its ttlSecondsAfterFinished passed)"
            ) from None
        if not _transient(err):
            raise PyTorchJobError(f"cannot read PyTorchJob {api.where}: {_api_error(err)}") from None
        log.warning("reading PyTorchJob %s: %s (retrying)", api.where, _api_error(err))
    except HTTPError as err:  # connection refused / reset: the API server restarting
        log.warning("reading PyTorchJob %s: %s (retrying)", api.where, one_line(err))
    return None


def _wait_until_done(
    api: _JobApi,
    started: float,
    *,
    poll_s: float,
    timeout_s: float,
    log_dir: Path | None,
    tail_lines: int,
    adopted: bool,
    replaced: bool,
    delete_on_timeout: bool,
) -> JobResult:
    """Poll the job every ``poll_s`` until Succeeded (its JobResult), Failed or ``timeout_s`` after ``started``
    (raised as PyTorchJobFailed / PyTorchJobTimeout)."""
    polls, state, last_seen = 0, "Pending", None
    while True:
        obj = _read_job(api)
        polls += 1
        if obj is not None:
            state, cond = job_state(obj)
            if state != last_seen:
                log.info("PyTorchJob %s: %s", api.where, state)
                last_seen = state
            if state == "Succeeded":
                return JobResult(
                    api.name,
                    api.namespace,
                    state,
                    cond.get("reason", ""),
                    cond.get("message", ""),
                    round(time.monotonic() - started, 3),
                    polls,
                    adopted,
                    replaced,
                )
            if state == "Failed":
                raise _failed(api.core, api.namespace, api.name, cond, log_dir, tail_lines, adopted, api.call)
        elapsed = time.monotonic() - started
        if elapsed >= timeout_s:
            raise _timed_out(
                api.custom, api.core, api.namespace, api.name, state, timeout_s, delete_on_timeout, api.call
            )
        time.sleep(min(poll_s, timeout_s - elapsed))


def _delete_and_wait_gone(custom, namespace: str, name: str, poll_s: float, deadline: float, call: dict) -> None:
    """Delete the job with its pods first (Foreground: the new pods get the same names) and wait until the
    job object is gone."""
    from kubernetes.client.rest import ApiException

    try:
        custom.delete_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, propagation_policy="Foreground", **call
        )
    except ApiException as err:
        if err.status != 404:
            raise PyTorchJobError(
                f"cannot delete the failed PyTorchJob {namespace}/{name}: {_api_error(err)}"
            ) from None
    while True:
        try:
            custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, **call)
        except ApiException as err:
            if err.status == 404:
                return
            if not _transient(err):
                raise PyTorchJobError(f"cannot read PyTorchJob {namespace}/{name}: {_api_error(err)}") from None
        if time.monotonic() >= deadline:
            raise PyTorchJobTimeout(
                f"PyTorchJob {namespace}/{name} (Failed) was not gone within the timeout after deleting it"
            )
        time.sleep(poll_s)


def _list_pods(core, namespace: str, name: str, call: dict) -> list:
    from kubernetes.client.rest import ApiException

    try:
        return core.list_namespaced_pod(namespace, label_selector=f"{JOB_NAME_LABEL}={name}", **call).items or []
    except ApiException as err:
        log.warning("listing the pods of %s/%s: %s", namespace, name, _api_error(err))
        return []


def _failing_pod(pods: list) -> tuple[Any, bool]:
    """(pod, previous): the pod whose ``pytorch`` container exited non-zero first (the others usually die
    later waiting on it), else a pod in phase Failed, else the master. ``previous``: its log is the one of the
    container's last run (it was restarted since)."""
    crashed = []
    for pod in pods:
        for cs in (pod.status.container_statuses or []) if pod.status else []:
            if cs.name != CONTAINER:
                continue
            now = cs.state.terminated if cs.state else None
            before = cs.last_state.terminated if cs.last_state else None
            for term, previous in ((now, False), (before, True)):
                if term is not None and term.exit_code:
                    finished = term.finished_at.timestamp() if term.finished_at else float("inf")
                    crashed.append((finished, previous, pod))
                    break
    if crashed:
        _, previous, pod = min(crashed, key=lambda c: c[0])
        return pod, previous
    for pod in pods:
        if pod.status and pod.status.phase == "Failed":
            return pod, False
    masters = [p for p in pods if (p.metadata.labels or {}).get(REPLICA_TYPE_LABEL) == "master"]
    return ((masters or pods)[0], False) if pods else (None, False)


def _failed(core, namespace, name, cond, log_dir, tail_lines, adopted, call) -> PyTorchJobFailed:
    from kubernetes.client.rest import ApiException

    reason = cond.get("reason") or "Failed"
    message = cond.get("message") or "no message"
    pod, previous = _failing_pod(_list_pods(core, namespace, name, call))
    if pod is None:
        logs = "no pod left to read a log from (cleanPodPolicy All deletes them)"
    else:
        pod_name = pod.metadata.name
        try:
            text = core.read_namespaced_pod_log(
                pod_name, namespace, container=CONTAINER, tail_lines=tail_lines, previous=previous, **call
            )
        except ApiException as err:
            logs = f"log of pod {pod_name} unavailable ({_api_error(err)})"
        else:
            folder = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="sdsclip-pytorchjob-"))
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{pod_name}{'.previous' if previous else ''}.log"
            path.write_text(text or "", encoding="utf-8")
            lines = [line for line in (text or "").splitlines() if line.strip()]
            last = one_line(lines[-1], 300) if lines else "(empty log)"
            logs = f"last log line of pod {pod_name}: {last!r}; log tail ({len(lines)} lines): {path}"
    again = (
        f"; it existed before this run: delete it (kubectl delete pytorchjob {name} -n {namespace}) to retry"
        if adopted
        else ""
    )
    return PyTorchJobFailed(one_line(f"PyTorchJob {namespace}/{name} failed: {reason}: {message}; {logs}{again}", 2000))


def _pod_summary(pods: list) -> str:
    parts = []
    for pod in pods:
        phase = pod.status.phase if pod.status else "?"
        waiting = (
            [cs.state.waiting for cs in (pod.status.container_statuses or []) if cs.state and cs.state.waiting]
            if pod.status
            else []
        )
        detail = (
            f" {waiting[0].reason}" + (f" ({one_line(waiting[0].message, 120)})" if waiting[0].message else "")
            if waiting
            else ""
        )
        parts.append(f"{pod.metadata.name} {phase}{detail}")
    return ", ".join(parts) or "no pods"


def _timed_out(custom, core, namespace, name, state, timeout_s, delete, call) -> PyTorchJobTimeout:
    from kubernetes.client.rest import ApiException

    pods = _pod_summary(_list_pods(core, namespace, name, call))
    action = "left running"
    if delete:
        try:
            custom.delete_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, propagation_policy="Background", **call
            )
            action = "deleted (its checkpoints stay on the checkpoint PVC: a re-run resumes)"
        except ApiException as err:
            action = f"could not be deleted ({_api_error(err)})"
    return PyTorchJobTimeout(
        one_line(
            f"PyTorchJob {namespace}/{name} did not finish within {timeout_s:g} s "
            f"(last state {state}; pods: {pods}); the job was {action}",
            2000,
        )
    )


# ------------------------------------------------------------------------------------------ pipeline step


def _copy_atomic(src: Path, dest: Path) -> None:
    """Copy a file or a directory to ``dest`` through a temp name, so a killed copy is never taken for done."""
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if src.is_dir():
        shutil.copytree(src, tmp)
    else:
        shutil.copy2(src, tmp)
    os.replace(tmp, dest)


def stage_inputs(
    run_dir: Path, params_yaml: str, inputs: Mapping[str, Path], *, writable_for_uid: int | None = None
) -> None:
    """Write RUN/params.yaml and copy the inputs to RUN/inputs/<key>; inputs already staged (a retried step
    re-attaching to its job: same name, same inputs) are kept. ``writable_for_uid``: the pods' uid; if this
    process runs as another one, RUN is made writable for all (the pods write model/ and logs/ there; fsGroup
    does not apply on every volume type, NFS among them)."""
    missing = [k for k in INPUTS if k not in inputs]
    if missing:
        raise PyTorchJobError(f"stage_inputs: missing inputs {missing} (need {list(INPUTS)})")
    (run_dir / "inputs").mkdir(parents=True, exist_ok=True)
    if writable_for_uid is not None and os.geteuid() != writable_for_uid:
        os.chmod(run_dir, 0o777)
    params = run_dir / "params.yaml"
    tmp = params.with_name(f".params.yaml.tmp-{os.getpid()}")
    tmp.write_text(params_yaml, encoding="utf-8")
    os.replace(tmp, params)
    for key in INPUTS:
        src, dest = Path(inputs[key]), run_dir / "inputs" / key
        if not src.exists():
            raise PyTorchJobError(f"input {key}: {src} does not exist")
        if dest.exists():
            log.info("input %s already staged at %s", key, dest)
            continue
        log.info("staging %s: %s -> %s", key, src, dest)
        _copy_atomic(src, dest)


def run_multinode_training(
    params_yaml: str,
    inputs: Mapping[str, Path],
    out: Path,
    *,
    control: bool,
    num_nodes: int,
    gpus_per_node: int,
    image: str,
    job_key: str = "",
    data_root: Path = Path(DATA_MOUNT),
    api_client=None,
) -> dict[str, Any]:
    """The pipeline step: stage ``inputs`` (student, teacher, shards, validated) and the params on the data
    PVC (mounted here at ``data_root``), run the PyTorchJob, copy its model to ``out``; returns the model's
    metadata (student.json) plus the job's name, namespace and duration.

    ``params_yaml`` may hold a ``multinode:`` section (JobConfig fields); it is removed from the params file
    the pods read, and MLFLOW_TRACKING_URI (set here from the sdsclip-mlflow secret) replaces
    registry.tracking_uri in it. ``job_key`` (e.g. the input artifact URIs) goes into the job name with the params, so a
    retried step finds its own job."""
    from sdsclip.config import ConfigError, params_from_dict

    raw = yaml.safe_load(params_yaml) or {}
    if not isinstance(raw, dict):
        raise PyTorchJobError("params: not a YAML mapping")
    section = raw.pop("multinode", None)
    if os.environ.get("MLFLOW_TRACKING_URI"):  # as components/training.py: the sdsclip-mlflow secret's URI wins
        raw["registry"] = {**(raw.get("registry") or {}), "tracking_uri": os.environ["MLFLOW_TRACKING_URI"]}
    try:
        params_from_dict(raw)  # bad params stop here, not after copying the teacher and scheduling GPUs
    except ConfigError as err:
        raise PyTorchJobError(str(err)) from None
    name = job_name(control, params_yaml, num_nodes, gpus_per_node, image, job_key)
    cfg = job_config(section, name=name, image=image, num_nodes=num_nodes, gpus_per_node=gpus_per_node)
    run_dir = Path(data_root) / RUNS_DIR / name
    stage_inputs(run_dir, yaml.safe_dump(raw, sort_keys=False), inputs, writable_for_uid=cfg.run_as_user)
    job = render_job(cfg, TrainPaths.standard(f"{DATA_MOUNT}/{RUNS_DIR}/{name}", name), control=control)
    namespace = job["metadata"]["namespace"]
    result = submit_and_wait(
        job,
        namespace,
        poll_s=cfg.poll_seconds,
        timeout_s=cfg.timeout_seconds,
        api_client=api_client,
        log_dir=run_dir / "failure-logs",
        delete_on_timeout=cfg.delete_on_timeout,
    )
    model = run_dir / "model"
    meta_file = model / "student.json"
    if not meta_file.is_file():
        raise PyTorchJobError(
            f"PyTorchJob {namespace}/{name} succeeded but {meta_file} is missing "
            f"(is {cfg.data_pvc} mounted at {data_root} here and at {DATA_MOUNT} in the pods?)"
        )
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(model, out)
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    meta.update(
        job=name,
        namespace=namespace,
        nodes=num_nodes,
        processes_per_node=cfg.procs_per_node,
        job_seconds=result.seconds,
        job_adopted=result.adopted,
    )
    return meta
