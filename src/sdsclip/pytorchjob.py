"""Multi-node ``sdsclip train`` as a Kubeflow PyTorchJob: render the job, submit it, wait, report failures.

Why PyTorchJob (Training Operator v1, ``kubeflow.org/v1``) and not TrainJob (Trainer v2,
``trainer.kubeflow.org/v1alpha1``): PyTorchJob is what existing Kubeflow installs run (the training operator
ships with Kubeflow 1.7-1.10 and with Kueue/Volcano integrations), it needs nothing but its CRD, and it is
where the ``MASTER_*`` / ``WORLD_SIZE`` / ``RANK`` / ``PET_*`` variables that ``sdsclip.distributed`` reads come
from. TrainJob is still alpha, needs a ClusterTrainingRuntime installed by the cluster admin, and moves the
pod template into that runtime, so a job could not state its own image, volumes and security context.

What happens (``run_multinode_training``, called by ``components/multinode.py``):

1. the pipeline step stages its inputs and the params file on the shared data PVC (``/mnt/data``) under
   ``sdsclip-runs/<job name>/``;
2. ``render_job`` fills ``k8s/training/pytorchjob.yaml`` (Master + ``num_nodes - 1`` Workers; the data PVC at
   ``/mnt/data``, the checkpoint PVC at ``/mnt/checkpoints``; ``sdsclip train ... --resume``, so a pod that the
   operator restarts, restartPolicy OnFailure, continues from the newest checkpoint) and checks it against the
   CRD's schema (``k8s/training/pytorchjob-crd-schema.yaml``);
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
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
API_VERSION = f"{GROUP}/{VERSION}"
JOB_NAME_LABEL = "training.kubeflow.org/job-name"  # the operator labels every pod of the job with these
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"
CONTAINER = "pytorch"  # the operator injects the rendezvous variables into the container of this name
SPEC_DIGEST_ANNOTATION = "sdsclip/spec-sha256"
DATA_MOUNT, CHECKPOINT_MOUNT = "/mnt/data", "/mnt/checkpoints"
RUNS_DIR = "sdsclip-runs"  # run dirs on the data PVC: /mnt/data/sdsclip-runs/<job name>/
INPUTS = ("student", "teacher", "shards", "validated")
TEMPLATE_NAME, SCHEMA_NAME = "pytorchjob.yaml", "pytorchjob-crd-schema.yaml"
SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
TERMINAL = ("Succeeded", "Failed")
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
# Kubernetes resource.Quantity, as the CRD writes it
QUANTITY = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
DNS1035 = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"  # job names: the operator names services <name>-worker-<i> after them
DNS1123 = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class PyTorchJobError(RuntimeError):
    """A job that cannot be rendered, submitted or that did not succeed; the message is one line."""


class PyTorchJobFailed(PyTorchJobError):
    """The job reached the Failed condition."""


class PyTorchJobTimeout(PyTorchJobError):
    """The job reached neither Succeeded nor Failed within the timeout."""


def _one_line(text: Any, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ------------------------------------------------------------------------------------------ configuration


class JobConfig(BaseModel):
    """Everything the job template is filled from. ``name``, ``image``, ``num_nodes`` and ``gpus_per_node``
    come from the caller; the rest from the optional ``multinode:`` section of params.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=DNS1035, max_length=48, description="PyTorchJob name (pods: NAME-master-0, ...)")
    image: str = Field(min_length=1, description="container image with sdsclip installed")
    num_nodes: int = Field(2, ge=1, description="pods: 1 Master + num_nodes - 1 Workers")
    gpus_per_node: int = Field(1, ge=0, description="GPUs requested per pod (0: CPU, gloo)")
    nproc_per_node: int | None = Field(
        None, ge=1, description="processes per pod; default gpus_per_node (1 without GPUs); > 1 runs torchrun"
    )
    namespace: str | None = Field(
        None, pattern=DNS1123, max_length=63, description="null: the pod's own namespace, else kubeconfig's"
    )
    gpu_resource: str = Field("nvidia.com/gpu", min_length=1, description="extended resource name of a GPU")
    cpu: str = Field("8", pattern=QUANTITY, description="CPU request = limit per pod")
    memory: str = Field("64Gi", pattern=QUANTITY, description="memory request = limit per pod")
    shm_size: str = Field("16Gi", pattern=QUANTITY, description="/dev/shm (memory-backed emptyDir) per pod")
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] | None = Field(
        None, description="null: tolerate the nvidia.com/gpu taint when gpus_per_node > 0 (tainted GPU pools)"
    )
    data_pvc: str = Field("sdsclip-data", pattern=DNS1123, description="PVC mounted at /mnt/data")
    checkpoints_pvc: str = Field("sdsclip-checkpoints", pattern=DNS1123, description="PVC at /mnt/checkpoints")
    mlflow_secret: str | None = Field("sdsclip-mlflow", pattern=DNS1123, description="Secret passed as env")
    run_as_user: int = Field(1000, ge=1, description="uid = gid = fsGroup of the pods (non-root)")
    master_port: int = Field(23456, ge=1, le=65535)
    backoff_limit: int = Field(3, ge=0, description="pod restarts before the job is Failed")
    clean_pod_policy: Literal["None", "Running", "All"] = "Running"
    ttl_seconds_after_finished: int | None = Field(86400, ge=0, description="null: keep the finished job")
    active_deadline_seconds: int | None = Field(None, ge=1)
    poll_seconds: float = Field(30.0, gt=0, description="status poll interval while waiting")
    timeout_seconds: float = Field(172800.0, gt=0, description="give up waiting after this long")
    delete_on_timeout: bool = True

    @property
    def procs_per_node(self) -> int:
        return self.nproc_per_node or max(1, self.gpus_per_node)


def job_config(section: Mapping[str, Any] | None = None, *, source: str = "multinode", **fields: Any) -> JobConfig:
    """A ``JobConfig`` from a params section plus ``fields`` (``fields`` win; ``None`` values are ignored).
    Bad values raise PyTorchJobError naming the key, e.g. ``multinode.cpu: String should match pattern``."""
    if section is not None and not isinstance(section, Mapping):
        raise PyTorchJobError(f"{source}: must be a mapping of job settings (got {type(section).__name__})")
    merged = {**(section or {}), **{k: v for k, v in fields.items() if v is not None}}
    try:
        return JobConfig(**merged)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        got = f" (got {first['input']!r})" if "input" in first and first["type"] != "missing" else ""
        raise PyTorchJobError(_one_line(f"{source}.{where}: {first['msg']}{got}")) from None


@dataclass(frozen=True)
class TrainPaths:
    """The ``sdsclip train`` paths as the pods see them (on the shared PVCs)."""

    student: str
    teacher: str
    shards: str
    validated: str
    params: str
    out: str
    log_dir: str
    checkpoint_dir: str
    workdir: str

    @classmethod
    def standard(cls, run_dir: str, name: str) -> TrainPaths:
        """The layout ``stage_inputs`` writes: RUN/params.yaml, RUN/inputs/{student,...}, RUN/model,
        RUN/logs, checkpoints in /mnt/checkpoints/NAME."""
        run = PurePosixPath(run_dir)
        return cls(
            **{k: str(run / "inputs" / k) for k in INPUTS},
            params=str(run / "params.yaml"),
            out=str(run / "model"),
            log_dir=str(run / "logs"),
            checkpoint_dir=str(PurePosixPath(CHECKPOINT_MOUNT) / name),
            workdir=str(run),
        )

    def check(self) -> None:
        for key, value in vars(self).items():
            path = PurePosixPath(value)
            mounts = [PurePosixPath(m) for m in (DATA_MOUNT, CHECKPOINT_MOUNT)]
            if not path.is_absolute() or ".." in path.parts or not any(path == m or m in path.parents for m in mounts):
                raise PyTorchJobError(
                    f"{key}={value!r}: every pod must see it: give an absolute path under "
                    f"{DATA_MOUNT} (data PVC) or {CHECKPOINT_MOUNT} (checkpoint PVC)"
                )


def train_command(cfg: JobConfig, paths: TrainPaths, control: bool = False) -> tuple[list[str], list[str]]:
    """(command, args) of the training container: one ``sdsclip train`` per pod, or torchrun starting
    ``nproc_per_node`` of them. torchrun reads --nnodes / --nproc-per-node / --node-rank from the operator's
    PET_* variables; the master address is passed as $(MASTER_ADDR) (expanded by the kubelet) because
    operators before v1.8 set no PET_MASTER_ADDR and torchrun would rendezvous on 127.0.0.1."""
    command = (
        ["sdsclip", "train"]
        if cfg.procs_per_node == 1
        else ["torchrun", "--master-addr=$(MASTER_ADDR)", "--master-port=$(MASTER_PORT)", "-m", "sdsclip.cli", "train"]
    )
    args = [
        "--student",
        paths.student,
        "--teacher",
        paths.teacher,
        "--shards",
        paths.shards,
        "--validated",
        paths.validated,
        "--out",
        paths.out,
        "--log-dir",
        paths.log_dir,
        "--checkpoint-dir",
        paths.checkpoint_dir,
        "--params",
        paths.params,
        "--resume",
    ]
    return command, args + (["--control"] if control else [])


# ------------------------------------------------------------------------------------------ render + schema


def k8s_file(name: str) -> Path:
    """A file of k8s/training/: packaged as sdsclip/k8s_training/ (installed image) or in the source tree."""
    here = Path(__file__).resolve().parent
    candidates = (here / "k8s_training" / name, here.parents[1] / "k8s" / "training" / name)
    for path in candidates:
        if path.is_file():
            return path
    raise PyTorchJobError(
        f"{name} not found (looked in {', '.join(str(p.parent) for p in candidates)}): "
        "install sdsclip with its k8s/training files"
    )


def current_namespace() -> str:
    """The namespace kubectl would use: the pod's own in a cluster, else the kubeconfig context's, else default."""
    if SA_NAMESPACE_FILE.is_file():
        return SA_NAMESPACE_FILE.read_text().strip()
    try:
        from kubernetes import config

        _, active = config.list_kube_config_contexts(config_file=os.environ.get("KUBECONFIG"))
        return (active or {}).get("context", {}).get("namespace") or "default"
    except Exception:  # no kubeconfig at all: kubectl's default too
        return "default"


def spec_digest(job: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(job["spec"], sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _container(pod_spec: dict[str, Any]) -> dict[str, Any]:
    for container in pod_spec.get("containers") or []:
        if container.get("name") == CONTAINER:
            return container
    raise PyTorchJobError(f"the job template has no container named {CONTAINER!r} (the operator needs it)")


def _volume(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    for volume in pod_spec.get("volumes") or []:
        if volume.get("name") == name:
            return volume
    raise PyTorchJobError(f"the job template has no volume named {name!r}")


def render_job(cfg: JobConfig, paths: TrainPaths, *, control: bool = False, template: Path | None = None) -> dict:
    """The PyTorchJob as a dict: the template with ``cfg`` and ``paths`` filled in, checked against the CRD."""
    paths.check()
    job = yaml.safe_load(Path(template or k8s_file(TEMPLATE_NAME)).read_text(encoding="utf-8"))
    job["metadata"]["name"] = cfg.name
    job["metadata"]["namespace"] = cfg.namespace or current_namespace()
    spec = job["spec"]
    spec["nprocPerNode"] = str(cfg.procs_per_node)  # never "auto": the operator would export PET_NPROC_PER_NODE=auto
    run_policy = spec["runPolicy"]
    run_policy.update(backoffLimit=cfg.backoff_limit, cleanPodPolicy=cfg.clean_pod_policy)
    for key, value in (
        ("ttlSecondsAfterFinished", cfg.ttl_seconds_after_finished),
        ("activeDeadlineSeconds", cfg.active_deadline_seconds),
    ):
        if value is None:
            run_policy.pop(key, None)
        else:
            run_policy[key] = value

    master = spec["pytorchReplicaSpecs"]["Master"]
    master["replicas"] = 1
    pod = master["template"]["spec"]
    pod["securityContext"].update(runAsUser=cfg.run_as_user, runAsGroup=cfg.run_as_user, fsGroup=cfg.run_as_user)
    tolerations = (
        cfg.tolerations if cfg.tolerations is not None else ([dict(GPU_TOLERATION)] if cfg.gpus_per_node else [])
    )
    for key, value in (("nodeSelector", dict(cfg.node_selector)), ("tolerations", copy.deepcopy(tolerations))):
        if value:
            pod[key] = value
        else:
            pod.pop(key, None)
    container = _container(pod)
    container["image"] = cfg.image
    container["command"], container["args"] = train_command(cfg, paths, control)
    container["workingDir"] = paths.workdir
    for port in container.get("ports") or []:
        if port.get("name") == "pytorchjob-port":
            port["containerPort"] = cfg.master_port
    if cfg.mlflow_secret:
        container["envFrom"] = [{"secretRef": {"name": cfg.mlflow_secret}}]
    else:
        container.pop("envFrom", None)
    quantities = {"cpu": cfg.cpu, "memory": cfg.memory}
    container["resources"] = {"requests": dict(quantities), "limits": dict(quantities)}
    if cfg.gpus_per_node:
        container["resources"]["limits"][cfg.gpu_resource] = cfg.gpus_per_node  # requests default to limits
    _volume(pod, "data")["persistentVolumeClaim"]["claimName"] = cfg.data_pvc
    _volume(pod, "checkpoints")["persistentVolumeClaim"]["claimName"] = cfg.checkpoints_pvc
    _volume(pod, "dshm")["emptyDir"]["sizeLimit"] = cfg.shm_size

    if cfg.num_nodes > 1:
        spec["pytorchReplicaSpecs"]["Worker"] = {**copy.deepcopy(master), "replicas": cfg.num_nodes - 1}
    job["metadata"].setdefault("annotations", {})[SPEC_DIGEST_ANNOTATION] = spec_digest(job)
    validate_job(job)
    return job


def _strict(schema: Any) -> Any:
    """Reject unknown fields as the API server does with fieldValidation=Strict (kubectl's default)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@lru_cache(maxsize=1)
def crd_validator():
    import jsonschema

    schema = _strict(yaml.safe_load(k8s_file(SCHEMA_NAME).read_text(encoding="utf-8")))
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    cls.check_schema(schema)
    return cls(schema)


def _where(path) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def validate_job(job: Mapping[str, Any], *, kubernetes_version: str | None = None) -> None:
    """Check ``job`` against the PyTorchJob CRD's schema and the operator's admission rules (Master and Worker
    only, one Master, a ``pytorch`` container with an image). With ``kubernetes_version`` (e.g. "1.31"), also
    check every pod template against that Kubernetes release's PodTemplateSpec schema (strict; needs the
    ``kubernetes-validate`` package). Raises PyTorchJobError naming the first offending field."""
    name = (job.get("metadata") or {}).get("name", "?")
    if job.get("apiVersion") != API_VERSION or job.get("kind") != KIND:
        raise PyTorchJobError(
            f"PyTorchJob {name}: apiVersion/kind must be {API_VERSION}/{KIND} "
            f"(got {job.get('apiVersion')}/{job.get('kind')})"
        )
    errors = sorted(crd_validator().iter_errors(job), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        raise PyTorchJobError(
            _one_line(f"PyTorchJob {name}: {_where(errors[0].absolute_path)}: {errors[0].message}{more}")
        )
    replicas = job["spec"]["pytorchReplicaSpecs"]
    for rtype, rspec in replicas.items():
        if rtype not in ("Master", "Worker"):
            raise PyTorchJobError(f"PyTorchJob {name}: replica type {rtype!r} is not Master or Worker")
        container = _container(((rspec.get("template") or {}).get("spec")) or {})
        if not container.get("image"):
            raise PyTorchJobError(f"PyTorchJob {name}: {rtype} container {CONTAINER!r} has no image")
    if "Master" in replicas and replicas["Master"].get("replicas", 1) != 1:
        raise PyTorchJobError(f"PyTorchJob {name}: Master replicas must be 1")
    _check_quantities(name, replicas)
    if kubernetes_version:
        validate_pod_templates(job, kubernetes_version)


def _check_quantities(name: str, replicas: Mapping[str, Any]) -> None:
    """The CRD's copy of PodSpec gives resource quantities its int-or-string + pattern schema (abridged in the
    committed file, and Kubernetes' own JSON schema has no pattern): check them here."""
    import re

    for rtype, rspec in replicas.items():
        containers = ((rspec.get("template") or {}).get("spec") or {}).get("containers") or []
        for i, c in enumerate(containers):
            for kind in ("requests", "limits"):
                for resource, value in ((c.get("resources") or {}).get(kind) or {}).items():
                    if isinstance(value, bool) or not (
                        isinstance(value, int) or (isinstance(value, str) and re.fullmatch(QUANTITY, value))
                    ):
                        raise PyTorchJobError(
                            f"PyTorchJob {name}: {rtype} pod template: spec.containers.{i}."
                            f"resources.{kind}.{resource}: {value!r} is not a Kubernetes "
                            "quantity (e.g. 500m, 4, 16Gi)"
                        )


def validate_pod_templates(job: Mapping[str, Any], kubernetes_version: str) -> None:
    """Every replica's pod template against Kubernetes' own PodTemplateSpec schema (kubernetes-validate)."""
    try:
        import kubernetes_validate
    except ImportError:
        raise PyTorchJobError(
            "checking pod templates needs the kubernetes-validate package (pip install kubernetes-validate)"
        ) from None
    name = job["metadata"]["name"]
    for rtype, rspec in job["spec"]["pytorchReplicaSpecs"].items():
        holder = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": f"{name}-{rtype.lower()}"},
            "template": rspec["template"],
        }
        try:
            kubernetes_validate.validate(holder, kubernetes_version, strict=True)
        except kubernetes_validate.ValidationError as err:
            where = _where(list(err.absolute_path)[1:])  # drop the holder's "template"
            raise PyTorchJobError(
                _one_line(f"PyTorchJob {name}: {rtype} pod template: {where}: {err.message} (Kubernetes {err.version})")
            ) from None


def to_yaml(job: Mapping[str, Any]) -> str:
    return yaml.safe_dump(job, sort_keys=False, default_flow_style=False, width=120)


def render_job_file(
    out: Path,
    *,
    name: str,
    image: str,
    run_dir: str,
    num_nodes: int = 2,
    gpus_per_node: int = 1,
    control: bool = False,
    namespace: str | None = None,
    params_path: Path | None = None,
) -> Path:
    """Write a PyTorchJob YAML for ``kubectl create -f OUT``: the standard run layout under ``run_dir`` (on the
    data PVC, e.g. /mnt/data/sdsclip-runs/NAME: params.yaml, inputs/{student,teacher,shards,validated}/), the
    other knobs from the ``multinode:`` section of ``params_path`` if it has one."""
    section = None
    if params_path is not None:
        raw = yaml.safe_load(Path(params_path).read_text(encoding="utf-8")) or {}
        section = raw.get("multinode") if isinstance(raw, dict) else None
    cfg = job_config(
        section, name=name, image=image, num_nodes=num_nodes, gpus_per_node=gpus_per_node, namespace=namespace
    )
    job = render_job(cfg, TrainPaths.standard(run_dir, name), control=control)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        f"# kubectl create -f {out.name}   (rendered by sdsclip.pytorchjob.render_job_file)\n" + to_yaml(job),
        encoding="utf-8",
    )
    return out


# ------------------------------------------------------------------------------------------ submit + wait


@dataclass(frozen=True)
class JobResult:
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
                _one_line(
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
    return _one_line(f"{err.status} {err.reason}" + (f": {message}" if message else ""))


def _transient(err) -> bool:
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
    from kubernetes.client.rest import ApiException
    from urllib3.exceptions import HTTPError

    job = copy.deepcopy(dict(job))
    name = job["metadata"]["name"]
    if job["metadata"].get("namespace", namespace) != namespace:
        raise PyTorchJobError(
            f"PyTorchJob {name} is rendered for namespace {job['metadata']['namespace']!r}, not {namespace!r}"
        )
    job["metadata"]["namespace"] = namespace
    digest = spec_digest(job)
    job["metadata"].setdefault("annotations", {})[SPEC_DIGEST_ANNOTATION] = digest
    where = f"{namespace}/{name}"
    api = load_api_client(api_client)
    custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    call = dict(_request_timeout=request_timeout_s)

    started = time.monotonic()

    def create() -> dict | None:
        """Create the job; on 409 return the existing object."""
        try:
            custom.create_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, job, field_validation="Strict", **call
            )
            log.info("created PyTorchJob %s", where)
            return None
        except ApiException as err:
            if err.status != 409:
                raise PyTorchJobError(f"cannot create PyTorchJob {where}: {_api_error(err)}") from None
        except HTTPError as err:
            raise PyTorchJobError(_one_line(f"cannot reach the Kubernetes API to create {where}: {err}")) from None
        try:
            return custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, **call)
        except ApiException as err:
            raise PyTorchJobError(f"PyTorchJob {where} already exists and cannot be read: {_api_error(err)}") from None

    adopted = replaced = False
    existing = create()
    if existing is not None:
        theirs = ((existing.get("metadata") or {}).get("annotations") or {}).get(SPEC_DIGEST_ANNOTATION)
        if theirs != digest:
            raise PyTorchJobError(
                f"PyTorchJob {where} already exists with a different spec: delete it "
                f"(kubectl delete pytorchjob {name} -n {namespace}) or use another name"
            )
        if replace_failed and job_state(existing)[0] == "Failed":
            log.info("PyTorchJob %s exists with the same spec but Failed: deleting it to run it again", where)
            _delete_and_wait_gone(custom, namespace, name, poll_s, started + timeout_s, call)
            if create() is not None:
                raise PyTorchJobError(f"PyTorchJob {where} was created again by someone else while it was replaced")
            replaced = True
        else:
            adopted = True
            log.info("PyTorchJob %s already exists with the same spec: waiting for it", where)

    polls, state, last_seen = 0, "Pending", None
    while True:
        obj = None
        try:
            obj = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, **call)
        except ApiException as err:
            if err.status == 404:
                raise PyTorchJobError(
                    f"PyTorchJob {where} disappeared while waiting for it (deleted by someone, "
                    "or its ttlSecondsAfterFinished passed)"
                ) from None
            if not _transient(err):
                raise PyTorchJobError(f"cannot read PyTorchJob {where}: {_api_error(err)}") from None
            log.warning("reading PyTorchJob %s: %s (retrying)", where, _api_error(err))
        except HTTPError as err:  # connection refused / reset: the API server restarting
            log.warning("reading PyTorchJob %s: %s (retrying)", where, _one_line(err))
        polls += 1
        if obj is not None:
            state, cond = job_state(obj)
            if state != last_seen:
                log.info("PyTorchJob %s: %s", where, state)
                last_seen = state
            if state == "Succeeded":
                return JobResult(
                    name,
                    namespace,
                    state,
                    cond.get("reason", ""),
                    cond.get("message", ""),
                    round(time.monotonic() - started, 3),
                    polls,
                    adopted,
                    replaced,
                )
            if state == "Failed":
                raise _failed(core, namespace, name, cond, log_dir, tail_lines, adopted, call)
        elapsed = time.monotonic() - started
        if elapsed >= timeout_s:
            raise _timed_out(custom, core, namespace, name, state, timeout_s, delete_on_timeout, call)
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
            last = _one_line(lines[-1], 300) if lines else "(empty log)"
            logs = f"last log line of pod {pod_name}: {last!r}; log tail ({len(lines)} lines): {path}"
    again = (
        f"; it existed before this run: delete it (kubectl delete pytorchjob {name} -n {namespace}) to retry"
        if adopted
        else ""
    )
    return PyTorchJobFailed(
        _one_line(f"PyTorchJob {namespace}/{name} failed: {reason}: {message}; {logs}{again}", 2000)
    )


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
            f" {waiting[0].reason}" + (f" ({_one_line(waiting[0].message, 120)})" if waiting[0].message else "")
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
        _one_line(
            f"PyTorchJob {namespace}/{name} did not finish within {timeout_s:g} s "
            f"(last state {state}; pods: {pods}); the job was {action}",
            2000,
        )
    )


# ------------------------------------------------------------------------------------------ pipeline step


def job_name(control: bool, *keys: Any) -> str:
    """``sdsclip-{baseline|sds}-<digest of keys>``: the same step inputs give the same name (see adopt)."""
    digest = hashlib.sha256(json.dumps([str(k) for k in keys]).encode()).hexdigest()[:12]
    return f"sdsclip-{'baseline' if control else 'sds'}-{digest}"


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
