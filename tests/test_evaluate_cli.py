"""`sdsclip evaluate <benchmark>`, `derive-sugarcrepe` and `report` through the CLI, on a tiny world and a
randomly initialised tiny student (the stage wiring, params and the one-line errors)."""

import json

import pytest
import torch
import yaml
from eval_fixtures import tiny_world
from tiny_params import tiny_params
from typer.testing import CliRunner

from sdsclip.cli import app


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from sdsclip.models.student import build_student, save_student

    root = tmp_path_factory.mktemp("cli")
    world = tiny_world(root / "world")
    torch.manual_seed(0)
    student = save_student(build_student("sdsclip-tiny-vit"), root / "student")
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params(eval={"aro_attribution_min_count": 1})))
    return root, world, student, params


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_every_benchmark_then_report(env):
    root, world, student, params = env
    m = root / "metrics"
    r = invoke(
        "evaluate",
        "winoground",
        "--data",
        world / "winoground",
        "--model",
        student,
        "--out",
        m / "winoground_sds.json",
        "--params",
        params,
    )
    assert r.exit_code == 0, r.output
    r = invoke(
        "evaluate", "aro", "--data", world / "aro", "--model", student, "--out", m / "aro_sds.json", "--params", params
    )
    assert r.exit_code == 0, r.output
    assert "vg_relation" in r.output and "coco_order" in r.output
    r = invoke(
        "evaluate",
        "zeroshot",
        "--data",
        world / "zeroshot",
        "--model",
        student,
        "--out",
        m / "zeroshot_sds.json",
        "--params",
        params,
    )
    assert r.exit_code == 0, r.output
    assert json.loads((m / "zeroshot_sds.json").read_text())["prompt_set"] == "toyworld"  # from params
    r = invoke("derive-sugarcrepe", "--winoground", world / "winoground", "--out", root / "sc", "--params", params)
    assert r.exit_code == 0, r.output
    r = invoke(
        "evaluate",
        "sugarcrepe",
        "--data",
        root / "sc",
        "--model",
        student,
        "--out",
        m / "sugarcrepe_sds.json",
        "--scores",
        root / "sc.jsonl",
        "--params",
        params,
    )
    assert r.exit_code == 0, r.output
    r = invoke("report", "--metrics-dir", m, "--out", root / "reports", "--summary", m / "evaluation.json")
    assert r.exit_code == 0, r.output
    flat = json.loads((m / "evaluation.json").read_text())
    assert {k.split(".")[0] for k in flat} == {"winoground", "aro", "zeroshot", "sugarcrepe"}
    assert (root / "reports" / "evaluation.png").is_file()


def test_bad_data_is_one_line_exit_2(env, tmp_path):
    root, world, student, params = env
    (tmp_path / "visual_genome_relation.json").write_text("[{]")
    r = CliRunner().invoke(
        app,
        [
            "evaluate",
            "aro",
            "--data",
            str(tmp_path),
            "--model",
            str(student),
            "--out",
            str(tmp_path / "m.json"),
            "--params",
            str(params),
        ],
    )
    assert r.exit_code == 2
    assert "visual_genome_relation.json:1:" in r.output and "Traceback" not in r.output
