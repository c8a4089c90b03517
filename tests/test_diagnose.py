"""sdsclip.diagnose + `sdsclip diagnose teacher`: the teacher's binding diagnostic."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_params import tiny_params
from train_helpers import TINY_TEACHER, vocabulary
from typer.testing import CliRunner

from sdsclip.cli import app
from sdsclip.config import WorldConfig, params_from_dict
from sdsclip.diagnose import swap_effects, teacher_binding, verdict_line
from sdsclip.synth import write_winoground


def test_swap_effect_is_error_under_swapped_minus_true_caption():
    # s[n, caption, image] = -error; item 0: the true caption always has the lower error; item 1: blind
    scores = -torch.tensor([[[1.0, 5.0], [3.0, 2.0]], [[4.0, 4.0], [4.0, 4.0]]])
    assert swap_effects(scores).tolist() == [(3.0 - 1.0 + 5.0 - 2.0) / 2, 0.0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("diag")
    from sdsclip.config import TeacherConfig
    from sdsclip.models.teacher import build_tiny_teacher, save_teacher

    torch.manual_seed(0)
    teacher = save_teacher(
        build_tiny_teacher(TeacherConfig(**TINY_TEACHER), vocabulary()).freeze(), root / "teacher", {"source": "test"}
    )
    wino = root / "winoground"
    write_winoground(WorldConfig(image_size=32, winoground_items=6), wino, seed=0)
    params_file = root / "params.yaml"
    import yaml

    raw = tiny_params(teacher={"binding_min_text_score": 0.0})
    params_file.write_text(yaml.safe_dump(raw))
    return {"teacher": teacher, "wino": wino, "params": params_file, "raw": raw, "root": root}


@pytest.mark.slow
def test_teacher_binding_reports_effects_scores_and_verdict(setup):
    params = params_from_dict(setup["raw"])
    result = teacher_binding(params, setup["teacher"], setup["wino"], max_items=4)
    assert result["n"] == 4 and result["draws"] == params.eval.teacher_draws
    assert set(result["by_tag"]) <= {"Attribute-Color", "Object-Swap"}
    assert sum(t["n"] for t in result["by_tag"].values()) == 4
    for key in ("swap_effect", "caption_effect", "text_score", "image_score", "group_score"):
        assert isinstance(result[key], float)
    assert result["passed"] is True  # threshold 0 in these params
    strict = teacher_binding(params, setup["teacher"], setup["wino"], max_items=4, threshold=1.01)
    assert strict["passed"] is False
    assert strict["swap_effect"] == result["swap_effect"]  # fixed, shared draws: deterministic
    # one row per shared draw; the overall scores are their mean (scored one draw at a time)
    assert [row["t"] for row in result["by_t"]] == result["t"]
    per_draw = [row["swap_effect"] for row in result["by_t"]]
    assert result["swap_effect"] == pytest.approx(sum(per_draw) / len(per_draw), rel=1e-6, abs=1e-12)
    assert all(0.0 <= row["text_score"] <= 1.0 for row in result["by_t"])
    assert all(set(row["by_tag"]) == set(result["by_tag"]) for row in result["by_t"])
    assert all(0.0 <= v["text_score"] <= 1.0 for row in result["by_t"] for v in row["by_tag"].values())


def test_cli_diagnose_teacher_writes_json_and_strict_exit_code(setup):
    runner = CliRunner()
    out = setup["root"] / "diag.json"
    args = [
        "diagnose",
        "teacher",
        "--model",
        str(setup["teacher"]),
        "--data",
        str(setup["wino"]),
        "--items",
        "2",
        "--params",
        str(setup["params"]),
    ]
    ok = runner.invoke(app, [*args, "--out", str(out)])
    assert ok.exit_code == 0, ok.output
    assert "teacher binding PASS" in ok.output and json.loads(out.read_text())["n"] == 2
    strict_params = setup["root"] / "strict.yaml"
    import yaml

    strict_params.write_text(
        yaml.safe_dump({**setup["raw"], "teacher": {**setup["raw"]["teacher"], "binding_min_text_score": 1.0}})
    )
    failed = runner.invoke(app, [*args[:-2], "--params", str(strict_params), "--strict"])
    assert failed.exit_code == 1 and "teacher binding FAIL" in failed.output
    bad = runner.invoke(
        app,
        [
            "diagnose",
            "teacher",
            "--model",
            str(setup["root"] / "nope"),
            "--data",
            str(setup["wino"]),
            "--params",
            str(setup["params"]),
        ],
    )
    assert bad.exit_code == 2 and "--model must be a student directory" in bad.output


@pytest.mark.slow
def test_each_tag_must_reach_the_threshold(setup):
    """A teacher that binds colours but not relations must not pass: the threshold applies per tag too."""
    params = params_from_dict(setup["raw"])
    result = teacher_binding(params, setup["teacher"], setup["wino"], max_items=4)
    tags = result["by_tag"]
    worst = min(row["text_score"] for row in tags.values())
    best = max(row["text_score"] for row in tags.values())
    threshold = (worst + best) / 2 if worst < best else worst + 0.01
    per_tag = teacher_binding(params, setup["teacher"], setup["wino"], max_items=4, threshold=threshold)
    assert per_tag["failed_tags"] and per_tag["passed"] is False
    assert "below the threshold" in verdict_line(per_tag)
    overall_only = params_from_dict({**setup["raw"], "teacher": {**setup["raw"]["teacher"], "binding_each_tag": False}})
    loose = teacher_binding(overall_only, setup["teacher"], setup["wino"], max_items=4, threshold=0.0)
    assert loose["failed_tags"] == [] and loose["passed"] is True


@pytest.mark.slow
def test_sds_shortcut_check_scores_own_blank_and_mean_latents(setup):
    from sdsclip.diagnose import sds_shortcut

    params = params_from_dict(setup["raw"])
    out = sds_shortcut(params, setup["teacher"], setup["wino"], max_items=3)
    assert out["images"] == 6 and out["blank_latent_mean"] == pytest.approx(-1.0)  # black canvas in [-1, 1]
    for key in ("error_true_latent", "error_swapped_caption", "error_blank_canvas", "error_mean_latent"):
        assert out[key] > 0
    assert 0 <= out["blank_beats_true_fraction"] <= 1
    assert out == sds_shortcut(params, setup["teacher"], setup["wino"], max_items=3)  # shared draws: deterministic
    with pytest.raises(Exception, match="not a teacher directory"):
        from train_helpers import make_models

        student, _ = make_models(setup["root"] / "m")
        sds_shortcut(params, student, setup["wino"])
