"""The sdsclip chain as a Kubeflow (kfp v2) pipeline: the same stages as dvc.yaml.

    resolve_params -> synth -> ingest -> validate -> {pretrain_student, pretrain_teacher}
      -> {train_baseline, train_sds} -> evaluate-{winoground, aro, sugarcrepe, zeroshot}@{pretrained, baseline, sds}
      -> register (+ derive-sugarcrepe from the world)
      teacher: teacher-shards -> ParallelFor(eval.shards) evaluate-{winoground, aro, sugarcrepe}-teacher-shard
      -> merge (evaluate-teacher, evaluate-aro-teacher, evaluate-sugarcrepe-teacher) -> report

**Run parameters** (the Kubeflow run form; defaults: params.yaml read at compile time, profile merged):
``params_yaml`` (the whole file) and the knobs a user changes between runs, each a params.yaml key
(``sdsclip.kubeflow.FORM_FIELDS``): seed, device, profile; data.coco_root, data.train_split, ingest.splits,
data.winoground_dir / aro_dir / zeroshot_dir / sugarcrepe_dir; student.arch, student.checkpoint;
teacher.pretrained_dir, teacher.latent, teacher.image_size; train.lambda_sds, train.steps, train.epochs,
train.batch_size (train_batch_size), train.lr (train_lr), train.mixed_precision, train.sds_gradient; eval.teacher_draws,
eval.shards (eval_shards: each teacher evaluation as that many parallel GPU tasks, merged into the same metrics);
registry.tracking_uri, registry.model_name. A field overrides params_yaml only when the run changed it from
its default; '' (text) or 0 (steps, epochs) means null. Cluster-only: ``gpu_type`` (the GPU tasks'
accelerator resource name, e.g. nvidia.com/gpu, amd.com/gpu), ``gpu_count`` (GPUs per GPU task; a string,
as the KFP driver reads resource placeholders as strings) and ``checkpoint_root`` (where train writes its
resumable checkpoints: the checkpoints PVC on a cluster, '' = inside the model dir); ``train_nodes`` (1: each
training arm runs in one pod; > 1: as a PyTorchJob of that many pods, ``train_gpus_per_node`` GPUs each, see
components/multinode.py and k8s/training/; cluster target only).

**Targets.** ``target="cluster"`` (the committed pipelines/sdsclip_pipeline.yaml) adds the Kubernetes
settings: GPU tasks (pretrain-teacher, train-baseline, train-sds and the teacher's evaluations) in the CUDA
image with an accelerator limit, GPU node selector and toleration; CPU/memory requests and limits on every
task; PVCs ``sdsclip-data`` (/mnt/data) and ``sdsclip-checkpoints`` (/mnt/checkpoints); secrets as env
(``sdsclip-mlflow`` -> MLFLOW_TRACKING_URI/USERNAME/PASSWORD for train and register, ``sdsclip-object-store``
-> AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_ENDPOINT_URL for ingest); retries on the preemptible and
networked tasks. ``target="local"`` leaves them out (kfp.local ignores resources with a warning and never
reads the Kubernetes platform spec). Both build the same tasks, edges, parameters and caching, except the
PyTorchJob branch of each training arm: kfp.local cannot resolve its dsl.OneOf, so locally an arm is one task.
Needs a KFP backend >= 2.4 (resource limits from pipeline parameters, kubeflow/pipelines#11501).

    sdsclip pipeline compile        # -> pipelines/sdsclip_pipeline.yaml (cluster, default images)
    sdsclip pipeline compile --out my.yaml --base-image REG/sdsclip:TAG --gpu-image REG/sdsclip:TAG-cuda
"""
# No `from __future__ import annotations`: kfp reads the pipeline's parameter annotations as types.

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kfp import compiler, dsl, kubernetes

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python pipelines/sdsclip_pipeline.py` from anywhere
    sys.path.insert(0, str(ROOT))
if str(ROOT / "src") not in sys.path:  # sdsclip itself, when not installed (compile needs only its config)
    sys.path.append(str(ROOT / "src"))

from components import DEFAULT_GPU_IMAGE, DEFAULT_IMAGE, make_components  # noqa: E402
from sdsclip.kubeflow import form_spec  # noqa: E402

DEFAULT_PARAMS = ROOT / "params.yaml"
DEFAULT_PACKAGE = ROOT / "pipelines" / "sdsclip_pipeline.yaml"
TARGETS = ("cluster", "local")
IMAGE_USER = "1000:1000"  # docker/Dockerfile.*: USER, and the pods' runAsUser

# -- cluster settings (compile-time constants: edit here and recompile) ------------------------------------
DATA_PVC, DATA_MOUNT = "sdsclip-data", "/mnt/data"  # datasets and pretrained weights, read by many pods: RWX
CHECKPOINTS_PVC, CHECKPOINTS_MOUNT = "sdsclip-checkpoints", "/mnt/checkpoints"  # train's resumable checkpoints
MLFLOW_SECRET = "sdsclip-mlflow"  # secret key = env var name
MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
OBJECT_STORE_SECRET = "sdsclip-object-store"
OBJECT_STORE_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")
GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}  # label of NVIDIA GPU feature discovery / GPU operator
GPU_TOLERATIONS = ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},)  # tainted GPU pools
DEFAULT_GPU_TYPE, DEFAULT_GPU_COUNT = "nvidia.com/gpu", "1"
# (cpu request, cpu limit, memory request, memory limit) per kind of task
RESOURCES = {
    "light": ("250m", "1", "512Mi", "2Gi"),  # resolve-params, derive-sugarcrepe, report
    "data": ("1", "4", "4Gi", "8Gi"),  # synth, ingest (ingest.workers threads), validate (GX, pandas)
    "model": ("2", "4", "8Gi", "16Gi"),  # pretrain-student, the students' evaluations (CPU)
    "gpu": ("4", "8", "32Gi", "32Gi"),  # memory request = limit: a long GPU job is not the pod the
    # kubelet evicts first under node memory pressure
    "register": ("500m", "2", "2Gi", "4Gi"),  # uploads the model to MLflow
}
# Retries (cluster only; locally a failure is a bug to see at once, not after backoffs):
#  - GPU tasks: spot/preemptible GPU nodes get reclaimed; train resumes from its newest checkpoint on the
#    checkpoints PVC (same task, same output URI, same checkpoint dir), the others restart.
#  - ingest: reads the raw data over the network (s3://, NFS) where transient errors happen.
#  - nothing else: deterministic CPU stages fail for real reasons (bad data, bugs), and register is not
#    idempotent (a retry after a partial registration adds a second model version); MLflow's own HTTP
#    client already retries transient errors (MLFLOW_HTTP_REQUEST_MAX_RETRIES).
# KFP's Argo backend retries the task's executor pod, not its driver, so the output URIs stay the same.
GPU_RETRY = dict(num_retries=2, backoff_duration="120s", backoff_factor=2.0, backoff_max_duration="1800s")
NETWORK_RETRY = dict(num_retries=3, backoff_duration="30s", backoff_factor=2.0, backoff_max_duration="600s")


class _Placement:
    """Where and how each task runs. Caching is set the same for both targets; everything Kubernetes
    (images, resources, GPUs, PVCs, secrets, retries) only for the cluster."""

    def __init__(self, target: str, gpu_image: str, gpu_type: Any, gpu_count: Any):
        self.cluster = target == "cluster"
        self.gpu_image, self.gpu_type, self.gpu_count = gpu_image, gpu_type, gpu_count

    def __call__(
        self,
        task: dsl.PipelineTask,
        kind: str,
        *,
        cache: bool = True,
        data: bool = False,
        checkpoints: bool = False,
        mlflow: bool = False,
        object_store: bool = False,
        retry: dict | None = None,
    ) -> dsl.PipelineTask:
        # Explicit on every task (not the compiler's default, which an env var can flip): stages are
        # deterministic functions of their inputs (seeded), so a hit returns what a re-run would produce.
        # Caveat: a path in params (data on a PVC / s3) is keyed by its text, not its content.
        task.set_caching_options(cache)
        if not self.cluster:
            return task
        cpu_request, cpu_limit, memory_request, memory_limit = RESOURCES[kind]
        task.set_cpu_request(cpu_request).set_cpu_limit(cpu_limit)
        task.set_memory_request(memory_request).set_memory_limit(memory_limit)
        if kind == "gpu":
            task.set_container_image(self.gpu_image)
            task.set_accelerator_type(self.gpu_type).set_accelerator_limit(self.gpu_count)
            for label, value in GPU_NODE_SELECTOR.items():
                kubernetes.add_node_selector(task, label_key=label, label_value=value)
            for toleration in GPU_TOLERATIONS:
                kubernetes.add_toleration(task, **toleration)
        if data:
            kubernetes.mount_pvc(task, pvc_name=DATA_PVC, mount_path=DATA_MOUNT)
        if checkpoints:
            kubernetes.mount_pvc(task, pvc_name=CHECKPOINTS_PVC, mount_path=CHECKPOINTS_MOUNT)
        if mlflow:  # required: without it a registry would be a sqlite file inside the pod, lost with it
            kubernetes.use_secret_as_env(
                task, secret_name=MLFLOW_SECRET, secret_key_to_env={env: env for env in MLFLOW_ENV}
            )
        if object_store:  # optional: the data may as well be on the data PVC
            kubernetes.use_secret_as_env(
                task,
                secret_name=OBJECT_STORE_SECRET,
                secret_key_to_env={env: env for env in OBJECT_STORE_ENV},
                optional=True,
            )
        if retry:
            task.set_retry(**retry)
        return task


def build_pipeline(
    base_image: str = DEFAULT_IMAGE,
    params_yaml: str | None = None,
    *,
    gpu_image: str = DEFAULT_GPU_IMAGE,
    target: str = "cluster",
) -> Callable:
    """The pipeline for ``target`` (cluster | local): CPU tasks in ``base_image``, GPU tasks in ``gpu_image``
    (cluster only), run-form defaults from ``params_yaml`` (default: params.yaml)."""
    if target not in TARGETS:
        raise ValueError(f"target: {target!r} is not one of {', '.join(TARGETS)}")
    params_yaml = DEFAULT_PARAMS.read_text(encoding="utf-8") if params_yaml is None else params_yaml
    spec = form_spec(params_yaml, "params_yaml")
    d = {name: entry["default"] for name, entry in spec.items()}
    c = make_components(base_image)
    default_checkpoint_root = CHECKPOINTS_MOUNT if target == "cluster" else ""

    @dsl.pipeline(name="sdsclip", description="SDS-CLIP: fine-tune CLIP with a diffusion teacher's score.")
    def sdsclip(
        params_yaml: str = params_yaml,
        seed: int = d["seed"],
        device: str = d["device"],
        profile: str = d["profile"],
        coco_root: str = d["coco_root"],
        train_split: str = d["train_split"],
        ingest_splits: list = d["ingest_splits"],
        winoground_dir: str = d["winoground_dir"],
        aro_dir: str = d["aro_dir"],
        zeroshot_dir: str = d["zeroshot_dir"],
        sugarcrepe_dir: str = d["sugarcrepe_dir"],
        student_arch: str = d["student_arch"],
        student_checkpoint: str = d["student_checkpoint"],
        teacher_pretrained_dir: str = d["teacher_pretrained_dir"],
        teacher_latent: str = d["teacher_latent"],
        teacher_image_size: int = d["teacher_image_size"],
        lambda_sds: float = d["lambda_sds"],
        train_steps: int = d["train_steps"],
        train_epochs: int = d["train_epochs"],
        train_batch_size: int = d["train_batch_size"],
        train_lr: float = d["train_lr"],
        mixed_precision: str = d["mixed_precision"],
        sds_gradient: str = d["sds_gradient"],
        eval_teacher_draws: int = d["eval_teacher_draws"],
        eval_shards: int = d["eval_shards"],
        tracking_uri: str = d["tracking_uri"],
        model_name: str = d["model_name"],
        gpu_type: str = DEFAULT_GPU_TYPE,
        gpu_count: str = DEFAULT_GPU_COUNT,
        checkpoint_root: str = default_checkpoint_root,
        train_nodes: int = 1,
        train_gpus_per_node: int = 1,
    ):
        arguments = dict(locals())  # first: only the parameters are bound yet
        form = {name: value for name, value in arguments.items() if name in spec}
        place = _Placement(target, gpu_image, gpu_type, gpu_count)

        params = place(c.resolve_params(params_yaml=params_yaml, form_spec=spec, **form), "light").output
        world, data, models = _data_and_models(c, place, params)
        cluster = (target, checkpoint_root, gpu_image, train_nodes, train_gpus_per_node)
        baseline = _train_arm(c, place, "baseline", True, models, *cluster)
        sds = _train_arm(c, place, "sds", False, models, *cluster)

        sugarcrepe = place(
            c.derive_sugarcrepe(params=params, world=world).set_display_name("derive-sugarcrepe"), "light", data=True
        ).output
        students = dict(pretrained=models["student"], baseline=baseline, sds=sds)
        results, reported = _evaluate_students(c, place, params, world, sugarcrepe, students)
        reported |= _evaluate_teacher(c, place, params, world, sugarcrepe, models["teacher"])
        place(c.report(**reported).set_display_name("report"), "light")

        # never cached: registering is a side effect in MLflow (a cache hit would silently skip it)
        place(
            c.register(model=sds, metrics=results["sds"], baseline_metrics=results["baseline"], **data),
            "register",
            cache=False,
            mlflow=True,
        )

    return sdsclip


def _data_and_models(c: Any, place: _Placement, params: Any) -> tuple[Any, dict, dict]:
    """synth -> ingest -> validate -> both pretrainings: (world, the data inputs, the data + both models)."""
    world = place(c.synth(params=params), "data").output
    shards = place(
        c.ingest(params=params, world=world), "data", data=True, object_store=True, retry=NETWORK_RETRY
    ).output
    validated = place(c.validate(params=params, shards=shards), "data").outputs["validated"]
    data = dict(params=params, shards=shards, validated=validated)
    student = place(c.pretrain_student(**data), "model", data=True).output
    teacher = place(c.pretrain_teacher(**data), "gpu", data=True, retry=GPU_RETRY).output
    return world, data, dict(student=student, teacher=teacher, **data)


def _train_arm(
    c: Any,
    place: _Placement,
    arm: str,
    control: bool,
    models: dict,
    target: str,
    checkpoint_root: Any,
    gpu_image: str,
    train_nodes: Any,
    train_gpus_per_node: Any,
) -> Any:
    """One fine-tuning arm's model. train_nodes == 1: the fine-tuning runs in this task's pod (accelerate on
    its GPUs); train_nodes > 1: a small pod submits it as a Kubeflow PyTorchJob of train_nodes pods with
    train_gpus_per_node GPUs each (components/multinode.py), waits, and returns the same model."""

    def one_pod() -> dsl.PipelineTask:
        return place(
            c.train(control=control, checkpoint_root=checkpoint_root, **models).set_display_name(f"train-{arm}"),
            "gpu",
            data=True,
            checkpoints=True,
            mlflow=True,
            retry=GPU_RETRY,
        )

    if target == "local":  # kfp.local 2.17 cannot resolve a dsl.OneOf of artifacts; a PyTorchJob
        return one_pod().output  # needs a cluster anyway, so locally train_nodes is ignored
    with dsl.If(train_nodes == 1, name=f"train-{arm}-one-pod"):
        single = one_pod()
    with dsl.Else(name=f"train-{arm}-pytorchjob"):
        # the step only stages data on the PVC and waits; a retry re-attaches to the job it started
        job = place(
            c.train_multinode(
                control=control,
                num_nodes=train_nodes,
                gpus_per_node=train_gpus_per_node,
                image=gpu_image,
                **models,
            ).set_display_name(f"train-{arm}-pytorchjob"),
            "data",
            data=True,
            mlflow=True,
            retry=GPU_RETRY,
        )
    return dsl.OneOf(single.output, job.output)


def _evaluate_students(
    c: Any, place: _Placement, params: Any, world: Any, sugarcrepe: Any, students: dict
) -> tuple[dict, dict]:
    """Every benchmark on every student, one CPU task each (the students' CLIP forward is cheap):
    ({student: Winoground results}, {report input: results})."""
    results, reported = {}, {}
    for name, model in students.items():
        evaluated = dict(params=params, model=model)
        results[name] = place(
            c.evaluate_winoground(world=world, **evaluated).set_display_name(f"evaluate-{name}"), "model", data=True
        ).outputs["results"]
        reported[f"winoground_{name}"] = results[name]
        reported[f"aro_{name}"] = place(
            c.evaluate_aro(world=world, **evaluated).set_display_name(f"evaluate-aro-{name}"), "model", data=True
        ).outputs["results"]
        reported[f"sugarcrepe_{name}"] = place(
            c.evaluate_sugarcrepe(sugarcrepe=sugarcrepe, **evaluated).set_display_name(f"evaluate-sugarcrepe-{name}"),
            "model",
            data=True,
        ).outputs["results"]
        reported[f"zeroshot_{name}"] = place(
            c.evaluate_zeroshot(world=world, **evaluated).set_display_name(f"evaluate-zeroshot-{name}"),
            "model",
            data=True,
        ).outputs["results"]
    return results, reported


def _evaluate_teacher(c: Any, place: _Placement, params: Any, world: Any, sugarcrepe: Any, teacher: Any) -> dict:
    """The teacher is scored through its UNet: each benchmark as eval.shards parallel GPU tasks (a share of its
    scorer calls each), merged on the CPU into exactly the one-task metrics (sdsclip.evaluate.shards); its
    zero-shot (every image x class prompt) is optional and not run here. Returns {report input: results}."""
    reported = {}
    teacher_shards = place(c.teacher_shards(params=params).set_display_name("teacher-shards"), "light").output
    for benchmark, source in dict(winoground=world, aro=world, sugarcrepe=sugarcrepe).items():
        with dsl.ParallelFor(teacher_shards, name=f"evaluate-{benchmark}-teacher-shards") as shard:
            part = place(
                c.evaluate_shard(
                    params=shard.params, benchmark=benchmark, shard=shard.shard, model=teacher, data=source
                ).set_display_name(f"evaluate-{benchmark}-teacher-shard"),
                "gpu",
                data=True,
                retry=GPU_RETRY,
            ).outputs["part"]
        merged = place(
            c.merge_shards(params=params, benchmark=benchmark, data=source, parts=dsl.Collected(part)).set_display_name(
                f"evaluate-{'' if benchmark == 'winoground' else benchmark + '-'}teacher"
            ),
            "model",
            data=True,
        )
        reported[f"{benchmark}_teacher"] = merged.outputs["results"]
    return reported


def compile_pipeline(
    out: Path = DEFAULT_PACKAGE,
    base_image: str = DEFAULT_IMAGE,
    params_path: Path | None = None,
    *,
    gpu_image: str = DEFAULT_GPU_IMAGE,
    target: str = "cluster",
) -> Path:
    """Write the pipeline YAML (kfp v2 IR; for the cluster a second YAML document holds the Kubernetes
    platform spec) to ``out``; ``params_path`` gives the run-form defaults. Deterministic: the same inputs
    give the same bytes (no timestamps)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = Path(params_path or DEFAULT_PARAMS).read_text(encoding="utf-8")
    pipeline = build_pipeline(base_image, text, gpu_image=gpu_image, target=target)
    compiler.Compiler().compile(pipeline, package_path=str(out))
    if out.suffix != ".json":
        out.write_text(_comment_out_header(out.read_text(encoding="utf-8")), encoding="utf-8")
    return out


def _comment_out_header(text: str) -> str:
    """kfp 2.17 writes a '# Inputs:' header with each default on one '#' line, so the multi-line
    params_yaml default spills uncommented lines into it and the file stops being valid YAML. Comment
    them out (the spec itself, from its first key `components:` on, is untouched)."""
    header, body = text.split("\ncomponents:\n", 1)
    lines = (line if line.startswith("#") else f"#      {line}".rstrip() for line in header.splitlines())
    header = "\n".join(lines)
    return f"{header}\ncomponents:\n{body}"


def run_local(params_yaml: str, workdir: Path, *, runner: Any = None, **overrides: Any) -> Path:
    """Run the whole pipeline (target local) here with kfp.local. ``runner``: kfp.local's SubprocessRunner in
    the current Python env (default; it must have sdsclip installed), or a ``kfp.local.DockerRunner`` (each
    task in the image it was compiled for, ``workdir`` mounted at the same path; see :func:`docker_runner`).
    ``overrides``: run-form fields (seed, device, train_steps ...), which win over ``params_yaml`` where they
    differ from its values. Returns the run dir (``workdir/<pipeline run>/<task>/<output>``). Raises
    RuntimeError naming the failed task."""
    import warnings

    from kfp import local

    workdir = Path(workdir).absolute()  # DockerRunner mounts it at the same (absolute) path
    workdir.mkdir(parents=True, exist_ok=True)
    if isinstance(runner, local.DockerRunner):
        _hand_to_container_user(workdir, runner.container_run_args.get("user", IMAGE_USER))
    before = set(workdir.iterdir())
    local.init(runner=runner or local.SubprocessRunner(use_venv=False), pipeline_root=str(workdir))
    with warnings.catch_warnings():  # expected here: the image is this env; display names are UI-only
        warnings.filterwarnings("ignore", message=".*base image", category=RuntimeWarning)
        warnings.filterwarnings("ignore", message=".*no effect in the current local runner", category=UserWarning)
        build_pipeline(params_yaml=params_yaml, target="local")(params_yaml=params_yaml, **overrides)
    (run_dir,) = [p for p in set(workdir.iterdir()) - before if p.is_dir() and p.name.startswith("sdsclip-")]
    return run_dir


def _hand_to_container_user(workdir: Path, user: str) -> None:
    """Every task writes its outputs under the mounted pipeline root as ``user`` (uid:gid): hand the root to
    it (as root here) or refuse in one line before the first task starts."""
    import os

    uid, _, gid = str(user).partition(":")
    if os.geteuid() == 0:
        os.chown(workdir, int(uid), int(gid or uid))
    elif os.stat(workdir).st_uid != int(uid):
        raise RuntimeError(
            f"{workdir}: the containers run as UID {uid} and cannot write here; "
            f"`sudo chown {uid}:{gid or uid} {workdir}` or pass DockerRunner(user=...)"
        )


def docker_runner(user: str = IMAGE_USER) -> Any:
    """kfp.local's DockerRunner with what a hardened Kubernetes pod of this pipeline gets: no network, the
    image's non-root UID, a read-only root filesystem with a tmpfs /tmp (readOnlyRootFilesystem + an
    emptyDir), no capabilities; the only writable place that outlives a task is the pipeline root, which
    kfp.local mounts. A task that needs the network or root, or writes anywhere else, fails."""
    from kfp import local

    return local.DockerRunner(
        network_mode="none",
        user=user,
        read_only=True,
        tmpfs={"/tmp": "rw,exec,size=1g"},
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Compile the sdsclip Kubeflow pipeline to a kfp v2 YAML.")
    parser.add_argument("--out", type=Path, default=DEFAULT_PACKAGE)
    parser.add_argument("--base-image", default=DEFAULT_IMAGE, help="image of the CPU tasks")
    parser.add_argument("--gpu-image", default=DEFAULT_GPU_IMAGE, help="image of the GPU tasks (cluster)")
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params file for the defaults")
    parser.add_argument("--target", choices=TARGETS, default="cluster")
    args = parser.parse_args(argv)
    out = compile_pipeline(args.out, args.base_image, args.params, gpu_image=args.gpu_image, target=args.target)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
