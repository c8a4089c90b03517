"""The Kubeflow pipeline (pipelines/sdsclip_pipeline.py): it compiles (cluster and local targets, the committed
YAML is fresh), and it runs end to end (kfp.local)."""

import json
import sys
from pathlib import Path

import pytest
import yaml
from kfp.components import load_component_from_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conftest import PIPELINE_OVERRIDES  # noqa: E402

from pipelines.sdsclip_pipeline import DEFAULT_PACKAGE as PACKAGE  # noqa: E402
from pipelines.sdsclip_pipeline import compile_pipeline  # noqa: E402
from sdsclip.config import params_from_dict, params_to_dict  # noqa: E402
from sdsclip.kubeflow import FORM_FIELDS, NULL_IN_FORM, form_spec  # noqa: E402

SHARD_TASKS = {f"evaluate-{b}-teacher-shard" for b in ("winoground", "aro", "sugarcrepe")}  # in dsl.ParallelFor
STAGE_TASKS = {
    "resolve-params",
    "synth",
    "ingest",
    "validate",
    "pretrain-student",
    "pretrain-teacher",
    "train-baseline",
    "train-sds",
    "train-baseline-pytorchjob",
    "train-sds-pytorchjob",
    "evaluate-pretrained",
    "evaluate-baseline",
    "evaluate-sds",
    "evaluate-teacher",
    "register",
    "derive-sugarcrepe",
    "report",
    *[f"evaluate-{b}-{m}" for b in ("aro", "sugarcrepe") for m in ("pretrained", "baseline", "sds", "teacher")],
    *[f"evaluate-zeroshot-{m}" for m in ("pretrained", "baseline", "sds")],
    "teacher-shards",
    *SHARD_TASKS,
}
EVALUATED = ("pretrained", "baseline", "sds", "teacher")
PYTORCHJOB_TASKS = {"train-baseline-pytorchjob", "train-sds-pytorchjob"}  # cluster target only


def compiled(path: Path) -> tuple[dict, dict]:
    """(pipeline spec, kubernetes platform spec or {}) of a compiled YAML (two documents for the cluster)."""
    docs = list(yaml.safe_load_all(path.read_text()))
    return docs[0], (docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(docs) > 1 else {})


def by_name(spec: dict) -> dict:
    """Task display name -> (task spec, executor spec, executor label) of every container task, those inside
    the training arms' dsl.If / dsl.Else sub-DAGs included."""
    executors = spec["deploymentSpec"]["executors"]
    out = {}

    def walk(dag: dict) -> None:
        for task in dag["tasks"].values():
            component = spec["components"][task["componentRef"]["name"]]
            if "dag" in component:
                walk(component["dag"])
            else:
                label = component["executorLabel"]
                out[task["taskInfo"]["name"]] = (task, executors[label]["container"], label)

    walk(spec["root"]["dag"])
    return out


def dependencies(spec: dict) -> dict:
    """Container task display name -> display names of the container tasks it waits for. A task inside a
    sub-DAG waits for what its top-level group waits for; waiting for a group means waiting for its tasks."""
    components = spec["components"]

    def inside(task: dict) -> set:
        component = components[task["componentRef"]["name"]]
        if "dag" not in component:
            return {task["taskInfo"]["name"]}
        return set().union(*(inside(t) for t in component["dag"]["tasks"].values()))

    top = spec["root"]["dag"]["tasks"]
    deps = {}
    for task in top.values():
        waits = set().union(set(), *(inside(top[d]) for d in task.get("dependentTasks", [])))
        for name in inside(task):
            deps[name] = waits
    return deps


GPU_TASKS = {"pretrain-teacher", "train-baseline", "train-sds", *SHARD_TASKS}


def test_committed_pipeline_yaml_is_fresh_and_compilation_deterministic(tmp_path):
    first = compile_pipeline(tmp_path / "a.yaml").read_text()
    second = compile_pipeline(tmp_path / "b.yaml").read_text()
    assert first == second, "compiling twice gave different bytes (timestamp or unordered output?)"
    assert PACKAGE.is_file() and PACKAGE.read_text() == first, (
        f"{PACKAGE.relative_to(ROOT)} is stale (the pipeline code, components or params.yaml changed): "
        f"regenerate it with `sdsclip pipeline compile` (in the project root) and commit it"
    )


def test_compile_pipeline(tmp_path):
    out = compile_pipeline(
        tmp_path / "pipeline.yaml",
        base_image="registry.example/sdsclip:test",
        gpu_image="registry.example/sdsclip:test-cuda",
    )
    spec, platform = compiled(out)  # valid YAML, multi-line params_yaml default included
    assert load_component_from_file(str(out)).name == "sdsclip"  # and kfp reads it back

    tasks = by_name(spec)
    assert set(tasks) == STAGE_TASKS
    executors = spec["deploymentSpec"]["executors"]
    assert len(executors) == len(tasks)
    images = {name: container["image"] for name, (_, container, _) in by_name(spec).items()}
    assert {n for n, image in images.items() if image == "registry.example/sdsclip:test-cuda"} == GPU_TASKS
    assert {image for n, image in images.items() if n not in GPU_TASKS} == {"registry.example/sdsclip:test"}
    assert not any("pip install" in " ".join(e["container"]["command"]) for e in executors.values())

    repo = params_from_dict(yaml.safe_load((ROOT / "params.yaml").read_text()))
    resolved = params_to_dict(repo)
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert inputs["params_yaml"]["defaultValue"] == (ROOT / "params.yaml").read_text()
    assert inputs["params_yaml"]["parameterType"] == "STRING"
    # every run-form field is a pipeline parameter whose default is params.yaml's value ('' / 0 for null)
    assert set(inputs) == {
        "params_yaml",
        *FORM_FIELDS,
        "gpu_type",
        "gpu_count",
        "checkpoint_root",
        "train_nodes",
        "train_gpus_per_node",
    }
    assert inputs["train_nodes"]["defaultValue"] == 1  # one pod unless the run asks for a PyTorchJob
    for name, key in FORM_FIELDS.items():
        value = resolved
        for part in key.split("."):
            value = value[part]
        assert inputs[name]["defaultValue"] == (NULL_IN_FORM[name] if value is None else value), name
    kinds = {name: inputs[name]["parameterType"] for name in inputs}
    assert (kinds["seed"], kinds["lambda_sds"], kinds["ingest_splits"], kinds["gpu_count"]) == (
        "NUMBER_INTEGER",
        "NUMBER_DOUBLE",
        "LIST",
        "STRING",
    )
    # resolve-params receives each field from the run form, plus the compiled defaults to compare against
    resolve = by_name(spec)["resolve-params"][0]["inputs"]["parameters"]
    assert {n: resolve[n]["componentInputParameter"] for n in FORM_FIELDS} == {n: n for n in FORM_FIELDS}
    assert resolve["form_spec"]["runtimeValue"]["constant"] == form_spec((ROOT / "params.yaml").read_text())

    # the graph: train runs twice (control / SDS) on both pretrained models, in one pod or as a PyTorchJob
    # (train_nodes); register gets SDS + baseline
    deps = dependencies(spec)
    for arm in ("baseline", "sds"):  # exactly one of the two runs: train_nodes == 1, else the PyTorchJob
        conditions = {
            t["taskInfo"]["name"]: t["triggerPolicy"]["condition"]
            for group in spec["root"]["dag"]["tasks"].values()
            if "dag" in spec["components"][group["componentRef"]["name"]]
            for t in spec["components"][group["componentRef"]["name"]]["dag"]["tasks"].values()
            if t["taskInfo"]["name"].startswith(f"train-{arm}-")
        }
        assert set(conditions) == {f"train-{arm}-one-pod", f"train-{arm}-pytorchjob"}
        assert conditions[f"train-{arm}-one-pod"].endswith("== 1")
        assert (
            conditions[f"train-{arm}-pytorchjob"].startswith("!(") and "== 1" in conditions[f"train-{arm}-pytorchjob"]
        )
        job_inputs = tasks[f"train-{arm}-pytorchjob"][0]["inputs"]["parameters"]
        assert job_inputs["image"]["runtimeValue"]["constant"] == "registry.example/sdsclip:test-cuda"
        assert job_inputs["num_nodes"]["componentInputParameter"].endswith("train_nodes")
        assert job_inputs["control"]["runtimeValue"]["constant"] == (arm == "baseline")
    assert (
        deps["train-sds"]
        == deps["train-baseline"]
        == deps["train-sds-pytorchjob"]
        == {"resolve-params", "ingest", "validate", "pretrain-student", "pretrain-teacher"}
    )
    assert {"train-sds", "evaluate-sds", "evaluate-baseline"} <= deps["register"]
    # the teacher's evaluations: eval.shards GPU tasks each (ParallelFor over teacher-shards' list), merged on the CPU
    for benchmark, merge in (
        ("winoground", "evaluate-teacher"),
        ("aro", "evaluate-aro-teacher"),
        ("sugarcrepe", "evaluate-sugarcrepe-teacher"),
    ):
        shard = f"evaluate-{benchmark}-teacher-shard"
        source = "derive-sugarcrepe" if benchmark == "sugarcrepe" else "synth"
        # the params ride in teacher-shards' items (a kfp.local limit): no direct edge from resolve-params
        assert deps[shard] == {"teacher-shards", "pretrain-teacher", source}, shard
        assert deps[merge] == {"resolve-params", source, shard}, merge
        ((loop_key, loop),) = [
            (k, t)
            for k, t in spec["root"]["dag"]["tasks"].items()
            if t["taskInfo"]["name"] == f"evaluate-{benchmark}-teacher-shards"
        ]
        assert loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--teacher-shards-Output"
        collected = tasks[merge][0]["inputs"]["artifacts"]["parts"]["taskOutputArtifact"]  # dsl.Collected
        assert collected["producerTask"] == loop_key and collected["outputArtifactKey"].endswith("-part"), collected
    assert deps["evaluate-sugarcrepe-sds"] == {
        "resolve-params",
        "derive-sugarcrepe",
        "train-sds",
        "train-sds-pytorchjob",
    }
    assert deps["report"] == STAGE_TASKS - {
        "resolve-params",
        "synth",
        "ingest",
        "validate",
        "pretrain-student",
        "pretrain-teacher",
        "train-baseline",
        "train-sds",
        "register",
        "train-baseline-pytorchjob",
        "train-sds-pytorchjob",
        "derive-sugarcrepe",
        "report",
        "teacher-shards",
        *SHARD_TASKS,
    }


def test_cluster_settings(tmp_path):
    spec, platform = compiled(PACKAGE)
    tasks = by_name(spec)
    for name, (task, container, label) in tasks.items():
        resources = container["resources"]  # requests and limits on every task
        assert {"resourceCpuRequest", "resourceCpuLimit", "resourceMemoryRequest", "resourceMemoryLimit"} <= set(
            resources
        ), name
        k8s = platform.get(label, {})
        gpu = name in GPU_TASKS
        assert ("accelerator" in resources) == gpu, name
        if gpu:  # accelerator type and count come from run parameters; GPU nodes selected and tolerated
            assert resources["accelerator"] == {
                "resourceType": "{{$.inputs.parameters['pipelinechannel--gpu_type']}}",
                "resourceCount": "{{$.inputs.parameters['pipelinechannel--gpu_count']}}",
            }
            assert resources["resourceMemoryRequest"] == resources["resourceMemoryLimit"]
            assert k8s["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
            assert k8s["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
            assert container["image"] == "ghcr.io/sdsclip/sdsclip:0.1.0-cuda"
        else:
            assert "nodeSelector" not in k8s and "tolerations" not in k8s, name
            assert container["image"] == "ghcr.io/sdsclip/sdsclip:0.1.0"
        pvcs = {m["mountPath"]: m["constant"] for m in k8s.get("pvcMount", [])}
        reads_data = name not in {"resolve-params", "synth", "validate", "report", "register", "teacher-shards"}
        assert pvcs.get("/mnt/data") == ("sdsclip-data" if reads_data else None), name
        one_pod_train = name in {"train-baseline", "train-sds"}  # a PyTorchJob's pods mount it, not the step
        assert pvcs.get("/mnt/checkpoints") == ("sdsclip-checkpoints" if one_pod_train else None), name
        secrets = {
            s["secretName"]: (sorted(e["envVar"] for e in s["keyToEnv"]), s["optional"])
            for s in k8s.get("secretAsEnv", [])
        }
        expected = {}
        if name.startswith("train-") or name == "register":
            expected["sdsclip-mlflow"] = (
                sorted(["MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"]),
                False,
            )
        if name == "ingest":
            expected["sdsclip-object-store"] = (
                sorted(["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"]),
                True,
            )
        assert secrets == expected, name
        retry = task.get("retryPolicy")
        assert (retry is not None) == (gpu or name == "ingest" or name.endswith("-pytorchjob")), name
        if retry:
            assert retry["maxRetryCount"] >= 2 and retry["backoffDuration"] != "0s"
        assert task.get("cachingOptions", {}).get("enableCache", False) == (name != "register"), name
    # train resumes into the checkpoints PVC by default on the cluster
    assert spec["root"]["inputDefinitions"]["parameters"]["checkpoint_root"]["defaultValue"] == "/mnt/checkpoints"


def test_local_target_is_the_same_graph_without_kubernetes(tmp_path):
    cluster, _ = compiled(PACKAGE)
    local_path = compile_pipeline(tmp_path / "local.yaml", target="local")
    local, platform = compiled(local_path)
    assert platform == {} and len(list(yaml.safe_load_all(local_path.read_text()))) == 1

    # edges, arguments, caching; on the cluster kfp adds the accelerator's run parameters as task inputs
    accelerator_inputs = {
        "accelerator_type",
        "accelerator_count",
        "pipelinechannel--gpu_type",
        "pipelinechannel--gpu_count",
    }

    def graph(spec):
        # display-name edges, caching and arguments; a task inside a training arm's dsl.If sees its inputs
        # through the sub-DAG's channels, so its arguments are compared by source task and output instead
        def arguments(args):
            out = {}
            for kind, values in args.items():
                out[kind] = {}
                for k, v in values.items():
                    if k in accelerator_inputs:
                        continue
                    if "taskOutputArtifact" in v or "taskOutputParameter" in v:
                        ref = v.get("taskOutputArtifact") or v.get("taskOutputParameter")
                        v = ref.get("outputArtifactKey") or ref.get("outputParameterKey")
                        if "-oneof-" in v:  # a training arm's dsl.OneOf(one pod, PyTorchJob): its model output
                            v = "model"
                    elif "componentInputArtifact" in v or "componentInputParameter" in v:
                        v = (v.get("componentInputArtifact") or v["componentInputParameter"]).split("-")[-1]
                    out[kind][k] = v
            return out

        deps = dependencies(spec)
        return {
            name: (sorted(deps[name] - PYTORCHJOB_TASKS), task.get("cachingOptions"), arguments(task["inputs"]))
            for name, (task, _, _) in by_name(spec).items()
            if name not in PYTORCHJOB_TASKS
        }

    assert graph(local) == graph(cluster)
    assert set(by_name(cluster)) - set(by_name(local)) == PYTORCHJOB_TASKS  # kfp.local cannot run dsl.OneOf
    local_inputs = local["root"]["inputDefinitions"]["parameters"]
    cluster_inputs = cluster["root"]["inputDefinitions"]["parameters"]
    assert local_inputs.keys() == cluster_inputs.keys()
    assert {k for k in local_inputs if local_inputs[k] != cluster_inputs[k]} == {"checkpoint_root"}
    assert local_inputs["checkpoint_root"]["defaultValue"] == ""  # inside the model dir, removed after success
    for name, (task, container, _) in by_name(local).items():
        assert "resources" not in container and "retryPolicy" not in task, name
        assert container["image"] == "ghcr.io/sdsclip/sdsclip:0.1.0"


def test_kfp_local_ignores_kubernetes_settings(tmp_path):
    """The finding the local target rests on, shown on a one-task pipeline: kfp.local runs a pipeline that has
    GPU/CPU resources, a PVC, a secret, a node selector and a toleration; it warns that the resources have no
    effect and never reads the platform spec."""
    import warnings

    from kfp import dsl, kubernetes, local

    @dsl.component(base_image="python:3.11", install_kfp_package=False)
    def double(x: int) -> int:
        return 2 * x

    @dsl.pipeline(name="probe")
    def probe(x: int = 4, gpu_type: str = "nvidia.com/gpu"):
        task = double(x=x).set_accelerator_type(gpu_type).set_accelerator_limit("1").set_cpu_limit("1")
        kubernetes.mount_pvc(task, pvc_name="sdsclip-data", mount_path="/mnt/data")
        kubernetes.use_secret_as_env(task, secret_name="sdsclip-mlflow", secret_key_to_env={"a": "A"})
        kubernetes.add_node_selector(task, label_key="nvidia.com/gpu.present", label_value="true")
        kubernetes.add_toleration(task, key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probe()
    (run_dir,) = tmp_path.glob("probe-*")
    output = json.loads((run_dir / "double" / "executor_output.json").read_text())
    assert output["parameterValues"]["Output"] == 8
    ignored = [str(w.message) for w in caught if "no effect in the current local runner" in str(w.message)]
    assert len(ignored) == 1 and "accelerator" in ignored[0] and "cpu_limit" in ignored[0]


def test_compile_with_params_path(tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("seed: 7\ntrain:\n  steps: 9\n")
    spec, _ = compiled(compile_pipeline(tmp_path / "p.json", params_path=params, target="local"))
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert (inputs["seed"]["defaultValue"], inputs["train_steps"]["defaultValue"]) == (7, 9)
    assert inputs["train_epochs"]["defaultValue"] == 0  # null in params: 0 in the run form
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {"ghcr.io/sdsclip/sdsclip:0.1.0"}


def test_compile_cli(tmp_path):
    from typer.testing import CliRunner

    from sdsclip.cli import app

    out = tmp_path / "x.yaml"
    r = CliRunner().invoke(
        app, ["pipeline", "compile", "--out", str(out), "--base-image", "r/s:1", "--gpu-image", "r/s:1-cuda"]
    )
    assert r.exit_code == 0, r.output
    spec, platform = compiled(out)
    assert {c["image"] for _, c, _ in by_name(spec).values()} == {"r/s:1", "r/s:1-cuda"} and platform
    r = CliRunner().invoke(app, ["pipeline", "compile", "--out", str(out), "--target", "gke"])
    assert r.exit_code == 2 and "--target 'gke'" in r.output and "Traceback" not in r.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: -1\n")
    r = CliRunner().invoke(app, ["pipeline", "compile", "--out", str(out), "--params", str(bad)])
    assert r.exit_code == 2 and "train.lr" in r.output and "Traceback" not in r.output


@pytest.mark.slow
def test_pipeline_runs_locally(subprocess_pipeline_run):
    params, run_dir = subprocess_pipeline_run.params, subprocess_pipeline_run.run_dir

    # kfp.local raises on a failed task; every task also left its executor output (a ParallelFor iteration's
    # task below its for-loop-<i>-iteration-<k> dir)
    task_dirs = {p.name for p in run_dir.iterdir() if (p / "executor_output.json").is_file()}
    assert len(task_dirs) == len(STAGE_TASKS - PYTORCHJOB_TASKS - SHARD_TASKS), sorted(task_dirs)  # one pod per arm
    shard_runs = sorted(run_dir.glob("for-loop-*-iteration-*/*/executor_output.json"))
    assert len(shard_runs) == PIPELINE_OVERRIDES["eval_shards"] * len(SHARD_TASKS), shard_runs

    for task in ("train", "train-2"):  # the UI override won over params_yaml's train.steps (3)
        out = json.loads((run_dir / task / "executor_output.json").read_text())
        assert out["artifacts"]["model"]["artifacts"][0]["metadata"]["steps"] == 2

    teacher_merges = merged_teacher_evaluations(run_dir)
    eval_dirs = [*sorted(run_dir.glob("evaluate-winoground*")), teacher_merges["winoground"]]
    assert len(eval_dirs) == len(EVALUATED)
    for task in eval_dirs:
        result = json.loads((task / "results").read_text())
        assert result["n"] == params["world"]["winoground_items"]
        outputs = json.loads((task / "executor_output.json").read_text())["artifacts"]
        logged = outputs["metrics"]["artifacts"][0]
        for key in ("text_score", "image_score", "group_score"):
            assert 0.0 <= result[key] <= 1.0
            assert logged["metadata"][key] == pytest.approx(result[key])
        assert (task / "scores").read_text().count("\n") == 4 * result["n"]

    for task in ("evaluate-aro", "evaluate-zeroshot", "evaluate-sugarcrepe"):  # the students'
        assert len(list(run_dir.glob(f"{task}*"))) == 3, task
    reports = run_dir / "report" / "report"
    assert {p.name for p in reports.iterdir()} == {"evaluation.md", "evaluation.html", "evaluation.png"}
    summary = json.loads((run_dir / "report" / "executor_output.json").read_text())["artifacts"]["summary"]
    assert "winoground.sds.group_score" in summary["artifacts"][0]["metadata"]
    for benchmark in ("winoground", "aro", "sugarcrepe"):  # the teacher's merged evaluations reached the report
        assert any(k.startswith(f"{benchmark}.teacher.") for k in summary["artifacts"][0]["metadata"]), benchmark

    registration = json.loads((run_dir / "register" / "registration").read_text())
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=params["registry"]["tracking_uri"])
    versions = client.search_model_versions(f"name='{params['registry']['model_name']}'")
    assert [int(v.version) for v in versions] == [registration["version"]] == [1]


def merged_teacher_evaluations(run_dir: Path) -> dict[str, Path]:
    """benchmark -> the task dir of its merge-shards task (kfp.local names task dirs by component)."""
    merges = {}
    for task in run_dir.glob("merge-shards*"):
        result = json.loads((task / "results").read_text())
        benchmark = "winoground" if "group_score" in result else "aro" if "datasets" in result else "sugarcrepe"
        merges[benchmark] = task
    assert sorted(merges) == ["aro", "sugarcrepe", "winoground"], sorted(run_dir.glob("merge-shards*"))
    return merges


@pytest.mark.slow
def test_sharded_teacher_evaluations_equal_the_unsharded_ones(subprocess_pipeline_run, tmp_path):
    """eval_shards=3 on kfp.local: each teacher benchmark ran as 3 loop tasks, each scoring a share of the
    scorer calls, and the merged metrics JSON (and score file) are byte for byte those of evaluating the
    pipeline's teacher in one go on the same data."""
    from sdsclip import stages

    run_dir = subprocess_pipeline_run.run_dir
    resolved = json.loads((run_dir / "resolve-params" / "executor_output.json").read_text())
    p = params_from_dict(yaml.safe_load(resolved["parameterValues"]["Output"]))
    assert p.eval.shards == PIPELINE_OVERRIDES["eval_shards"] == 3

    parts = {}
    for executed in run_dir.glob("for-loop-*-iteration-*/*/executor_output.json"):
        meta = json.loads(executed.read_text())["artifacts"]["part"]["artifacts"][0]["metadata"]
        parts.setdefault(meta["benchmark"], []).append(meta)
    for benchmark, metas in parts.items():  # every shard scored some calls; together each call exactly once
        assert sorted(m["shard"] for m in metas) == [0, 1, 2], benchmark
        assert all(m["scored"] for m in metas), benchmark
        assert sorted(c for m in metas for c in m["scored"]) == list(range(metas[0]["calls"])), benchmark
    assert sorted(parts) == ["aro", "sugarcrepe", "winoground"]

    teacher = run_dir / "pretrain-teacher" / "teacher"
    world, sugarcrepe = run_dir / "synth" / "world", run_dir / "derive-sugarcrepe" / "sugarcrepe"
    for benchmark, merged in merged_teacher_evaluations(run_dir).items():
        data_dir = stages.benchmark_data_dir(p, benchmark, sugarcrepe if benchmark == "sugarcrepe" else world)
        out, scores = tmp_path / f"{benchmark}.json", tmp_path / f"{benchmark}.scores"
        if benchmark == "winoground":
            stages.evaluate_winoground(p, teacher, data_dir, out, scores)
        elif benchmark == "aro":
            stages.evaluate_aro(p, teacher, data_dir, out)
        else:
            stages.evaluate_sugarcrepe(p, teacher, data_dir, out, None, scores)
        assert (merged / "results").read_bytes() == out.read_bytes(), benchmark
        if benchmark != "aro":
            assert (merged / "scores").read_bytes() == scores.read_bytes(), benchmark


def test_docker_runs_refuse_a_pipeline_root_the_container_user_cannot_write(tmp_path, monkeypatch):
    """DockerRunner tasks write as the image's UID 1000: as root the root is handed over; as another user
    run_local refuses in one line before any task starts."""
    import os

    from pipelines.sdsclip_pipeline import _hand_to_container_user

    root = tmp_path / "kfp"
    root.mkdir()
    if os.geteuid() == 0:
        _hand_to_container_user(root, "1000:1000")
        assert (root.stat().st_uid, root.stat().st_gid) == (1000, 1000)
        os.chown(root, 0, 0)
    monkeypatch.setattr(os, "geteuid", lambda: 4321)
    with pytest.raises(RuntimeError, match=r"UID 1000 and cannot write here; `sudo chown 1000:1000 "):
        _hand_to_container_user(root, "1000:1000")
