"""The whole DVC chain end to end on a tiny config, through the real CLI, in a scratch project copy."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny_params import ROOT, tiny_params

pytestmark = pytest.mark.slow


def _run(args, cwd, env):
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    shutil.copytree(ROOT / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    params = tiny_params(registry={"tracking_uri": f"sqlite:///{root}/mlflow.db"})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
    }
    _run(["git", "init", "-q"], root, env)
    _run([sys.executable, "-m", "dvc", "init", "-q"], root, env)
    # a repo with history, as users have (DVCLive reads the baseline revision)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init", "--allow-empty"], root, env)
    first = _run([sys.executable, "-m", "dvc", "repro"], root, env)
    return root, env, first


def test_every_stage_ran_and_wrote_its_outputs(project):
    root, _, log = project
    for stage in (
        "synth",
        "ingest",
        "validate",
        "pretrain_student",
        "pretrain_teacher",
        "train_baseline",
        "train_sds",
        "evaluate@pretrained",
        "evaluate@baseline",
        "evaluate@sds",
        "evaluate@teacher",
        "register",
        "derive_sugarcrepe",
        "report",
        *[f"evaluate_{b}@{m}" for b in ("aro", "sugarcrepe") for m in ("pretrained", "baseline", "sds", "teacher")],
        *[f"evaluate_zeroshot@{m}" for m in ("pretrained", "baseline", "sds")],
    ):
        assert f"Running stage '{stage}'" in log, stage
    for model in ("pretrained", "baseline", "sds", "teacher"):
        m = json.loads((root / "metrics" / f"winoground_{model}.json").read_text())
        assert m["n"] == 12
        assert all(0.0 <= m[k] <= 1.0 for k in ("text_score", "image_score", "group_score"))
        assert set(m["by_collapsed_tag"]) == {"Object", "Relation"}
        assert len((root / "scores" / f"winoground_{model}.jsonl").read_text().splitlines()) == 12 * 4
    flat = json.loads((root / "metrics" / "evaluation.json").read_text())
    for model in ("pretrained", "baseline", "sds", "teacher"):
        assert 0.0 <= flat[f"winoground.{model}.group_score"] <= 1.0
        assert 0.0 <= flat[f"aro.{model}.coco_order.precision_at_1"] <= 1.0
        assert 0.0 <= flat[f"sugarcrepe.{model}.swap_att.accuracy"] <= 1.0
    assert all(f"zeroshot.{m}.acc1" in flat for m in ("pretrained", "baseline", "sds"))
    assert {p.name for p in (root / "reports").iterdir()} == {"evaluation.md", "evaluation.html", "evaluation.png"}
    reg = json.loads((root / "metrics" / "registration.json").read_text())
    assert reg["version"] == 1 and reg["model_name"] == "sdsclip-student"
    # the SDS arm logged a non-zero SDS term, the control a zero one
    sds = json.loads((root / "models" / "sds" / "student.json").read_text())
    base = json.loads((root / "models" / "baseline" / "student.json").read_text())
    assert sds["lambda_sds"] == 1.0 and sds["loss_sds"] > 0
    assert base["lambda_sds"] == 0.0 and base["loss_sds"] == 0.0
    assert (root / "logs" / "train_sds" / "plots" / "metrics" / "loss_sds.tsv").is_file()


def test_second_repro_does_nothing(project):
    root, env, _ = project
    again = _run([sys.executable, "-m", "dvc", "repro"], root, env)
    assert "Running stage" not in again
    status = _run([sys.executable, "-m", "dvc", "status"], root, env)
    assert "up to date" in status


def test_results_table_prints_all_four_models(project):
    root, env, _ = project
    out = _run(["sdsclip", "results"], root, env)
    for label in ("pretrained", "baseline (λ=0)", "SDS-CLIP", "teacher", "champion", "COCO-Order", "SugarCrepe"):
        assert label in out
