"""The multi-node training PyTorchJob as data: its settings, its manifest, and the checks the API server would make.

Pure: no Kubernetes API calls and nothing from ``sdsclip.config`` (which imports this module to check the
``multinode:`` section of params.yaml). Submitting and waiting is ``sdsclip.cluster.pytorchjob``.

Why PyTorchJob (Training Operator v1, ``kubeflow.org/v1``) and not TrainJob (Trainer v2,
``trainer.kubeflow.org/v1alpha1``): PyTorchJob is what existing Kubeflow installs run (the training operator
ships with Kubeflow 1.7-1.10 and with Kueue/Volcano integrations), it needs nothing but its CRD, and it is
where the ``MASTER_*`` / ``WORLD_SIZE`` / ``RANK`` / ``PET_*`` variables that ``sdsclip.distributed`` reads come
from. TrainJob is still alpha, needs a ClusterTrainingRuntime installed by the cluster admin, and moves the
pod template into that runtime, so a job could not state its own image, volumes and security context.

``render_job`` fills ``k8s/training/pytorchjob.yaml`` (Master + ``num_nodes - 1`` Workers; the data PVC at
``/mnt/data``, the checkpoint PVC at ``/mnt/checkpoints``; ``sdsclip train ... --resume``, so a pod that the
operator restarts, restartPolicy OnFailure, continues from the newest checkpoint) and checks it against the
CRD's schema (``k8s/training/pytorchjob-crd-schema.yaml``) with ``validate_job``. Every rendered spec carries
the sha256 of its ``spec`` in the annotation ``sdsclip/spec-sha256`` (``spec_digest``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
API_VERSION = f"{GROUP}/{VERSION}"
CONTAINER = "pytorch"  # the operator injects the rendezvous variables into the container of this name
SPEC_DIGEST_ANNOTATION = "sdsclip/spec-sha256"
DATA_MOUNT, CHECKPOINT_MOUNT = "/mnt/data", "/mnt/checkpoints"
INPUTS = ("student", "teacher", "shards", "validated")
TEMPLATE_NAME, SCHEMA_NAME = "pytorchjob.yaml", "pytorchjob-crd-schema.yaml"
SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
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


def one_line(text: Any, limit: int = 400) -> str:
    """``text`` on one line (whitespace runs made one space), cut to ``limit`` characters."""
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
        raise PyTorchJobError(one_line(f"{source}.{where}: {first['msg']}{got}")) from None


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
    package = Path(__file__).resolve().parents[1]  # src/sdsclip (this file: src/sdsclip/cluster/jobspec.py)
    candidates = (package / "k8s_training" / name, package.parents[1] / "k8s" / "training" / name)
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
    """sha256 of the job's ``spec`` (canonical JSON): the ``sdsclip/spec-sha256`` annotation."""
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
    for field, setting in (("nodeSelector", dict(cfg.node_selector)), ("tolerations", copy.deepcopy(tolerations))):
        if setting:
            pod[field] = setting
        else:
            pod.pop(field, None)
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
            one_line(f"PyTorchJob {name}: {_where(errors[0].absolute_path)}: {errors[0].message}{more}")
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
                one_line(f"PyTorchJob {name}: {rtype} pod template: {where}: {err.message} (Kubernetes {err.version})")
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
        f"# kubectl create -f {out.name}   (rendered by sdsclip.cluster.jobspec.render_job_file)\n" + to_yaml(job),
        encoding="utf-8",
    )
    return out


def job_name(control: bool, *keys: Any) -> str:
    """``sdsclip-{baseline|sds}-<digest of keys>``: the same step inputs give the same name, so a
    retried step finds its job (``sdsclip.cluster.pytorchjob``: adopt)."""
    digest = hashlib.sha256(json.dumps([str(k) for k in keys]).encode()).hexdigest()[:12]
    return f"sdsclip-{'baseline' if control else 'sds'}-{digest}"
