"""The Kubeflow pipeline (pipelines/sdsclip_pipeline.py): it compiles, and it runs end to end (kfp.local)."""

import json
import sys
import time
from pathlib import Path

import pytest
import yaml
from kfp.components import load_component_from_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.sdsclip_pipeline import compile_pipeline, run_local  # noqa: E402

STAGE_TASKS = {
    "resolve-params", "synth", "ingest", "validate", "pretrain-student", "pretrain-teacher",
    "train-baseline", "train-sds", "evaluate-pretrained", "evaluate-baseline", "evaluate-sds",
    "evaluate-teacher", "register", "derive-sugarcrepe", "report",
    *[f"evaluate-{b}-{m}" for b in ("aro", "sugarcrepe") for m in ("pretrained", "baseline", "sds", "teacher")],
    *[f"evaluate-zeroshot-{m}" for m in ("pretrained", "baseline", "sds")],
}
EVALUATED = ("pretrained", "baseline", "sds", "teacher")


def test_compile_pipeline(tmp_path):
    out = compile_pipeline(tmp_path / "pipeline.yaml", base_image="registry.example/sdsclip:test")
    spec = yaml.safe_load(out.read_text())  # valid YAML, multi-line params_yaml default included
    assert load_component_from_file(str(out)).name == "sdsclip"  # and kfp reads it back

    tasks = spec["root"]["dag"]["tasks"]
    assert {t["taskInfo"]["name"] for t in tasks.values()} == STAGE_TASKS
    executors = spec["deploymentSpec"]["executors"]
    assert len(executors) == len(tasks)
    assert {e["container"]["image"] for e in executors.values()} == {"registry.example/sdsclip:test"}
    assert not any("pip install" in " ".join(e["container"]["command"]) for e in executors.values())

    repo = yaml.safe_load((ROOT / "params.yaml").read_text())
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert inputs["params_yaml"]["defaultValue"] == (ROOT / "params.yaml").read_text()
    assert inputs["params_yaml"]["parameterType"] == "STRING"
    assert inputs["seed"]["defaultValue"] == repo["seed"]
    assert inputs["device"]["defaultValue"] == repo["device"]
    assert inputs["lambda_sds"]["defaultValue"] == repo["train"]["lambda_sds"]
    assert inputs["train_steps"]["defaultValue"] == repo["train"]["steps"]

    # the graph: train runs twice (control / SDS) on both pretrained models; register gets SDS + baseline
    deps = {t["taskInfo"]["name"]: {tasks[d]["taskInfo"]["name"] for d in t.get("dependentTasks", [])}
            for t in tasks.values()}
    assert deps["train-sds"] == deps["train-baseline"] == {
        "resolve-params", "ingest", "validate", "pretrain-student", "pretrain-teacher"}
    assert {"train-sds", "evaluate-sds", "evaluate-baseline"} <= deps["register"]
    assert deps["evaluate-teacher"] == {"resolve-params", "synth", "pretrain-teacher"}
    assert deps["evaluate-sugarcrepe-sds"] == {"resolve-params", "derive-sugarcrepe", "train-sds"}
    assert deps["report"] == STAGE_TASKS - {"resolve-params", "synth", "ingest", "validate", "pretrain-student",
                                            "pretrain-teacher", "train-baseline", "train-sds", "register",
                                            "derive-sugarcrepe", "report"}


def test_compile_with_params_path(tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("seed: 7\ntrain:\n  steps: 9\n")
    spec = yaml.safe_load(compile_pipeline(tmp_path / "p.json", params_path=params).read_text())
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert (inputs["seed"]["defaultValue"], inputs["train_steps"]["defaultValue"]) == (7, 9)
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {"sdsclip:latest"}


def tiny_params(tmp_path: Path) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["device"] = "cpu"
    params["world"].update(pretrain_images=200, train_images=100, winoground_items=20, aro_relation_items=8,
                           aro_attribution_items=8, coco_order_images=8, zeroshot_per_class=2)
    for model in ("student", "teacher"):
        params[model]["pretrain"].update(steps=5, batch_size=16, warmup_steps=1)
    params["train"].update(steps=3, batch_size=8, warmup_steps=1)
    params["eval"].update(teacher_draws=2)
    params["registry"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return params


@pytest.mark.slow
def test_pipeline_runs_locally(tmp_path):
    params = tiny_params(tmp_path)
    started = time.time()
    run_dir = run_local(yaml.safe_dump(params), tmp_path / "kfp", device="cpu", train_steps=2)
    print(f"kfp.local pipeline run: {time.time() - started:.0f}s")

    # kfp.local raises on a failed task; every task also left its executor output
    task_dirs = {p.name for p in run_dir.iterdir() if (p / "executor_output.json").is_file()}
    assert len(task_dirs) == len(STAGE_TASKS), sorted(task_dirs)

    for task in ("train", "train-2"):  # the UI override won over params_yaml's train.steps (3)
        out = json.loads((run_dir / task / "executor_output.json").read_text())
        assert out["artifacts"]["model"]["artifacts"][0]["metadata"]["steps"] == 2

    eval_dirs = sorted(run_dir.glob("evaluate-winoground*"))
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

    for task in ("evaluate-aro", "evaluate-zeroshot", "evaluate-sugarcrepe"):
        assert len(list(run_dir.glob(f"{task}*"))) == (3 if task == "evaluate-zeroshot" else 4), task
    reports = run_dir / "report" / "report"
    assert {p.name for p in reports.iterdir()} == {"evaluation.md", "evaluation.html", "evaluation.png"}
    summary = json.loads((run_dir / "report" / "executor_output.json").read_text())["artifacts"]["summary"]
    assert "winoground.sds.group_score" in summary["artifacts"][0]["metadata"]

    registration = json.loads((run_dir / "register" / "registration").read_text())
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=params["registry"]["tracking_uri"])
    versions = client.search_model_versions(f"name='{params['registry']['model_name']}'")
    assert [int(v.version) for v in versions] == [registration["version"]] == [1]
