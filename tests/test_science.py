"""The `science` profile and `sdsclip science` runner (orchestration, caching, report) with fake stages."""

from __future__ import annotations

import json

import pytest
import yaml

from sdsclip import science
from sdsclip.config import ConfigError, params_from_dict
from tiny_params import ROOT


def _shipped() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_science_profile_sets_an_experiment_and_paper_stays_train_only(tmp_path):
    raw = _shipped()
    raw["profile"] = "science"
    p = params_from_dict(raw, "params.yaml")
    assert p.student.pretrain.batching == "bag_distinct" and p.train.batching == "bag_distinct"
    assert p.teacher.tiny.unshuffle_factor == 4 and p.teacher.tiny.pooled_conditioning
    # the teacher that passed the binding diagnostic (README): caption map, high-noise share, object-swap ranking
    assert p.teacher.tiny.caption_map_channels > 0 and p.teacher.pretrain_high_t_share > 0
    assert p.teacher.hard_negative_weight > 0 and p.teacher.hard_negative_swap == "object"
    assert p.student.pretrain.lr == _shipped()["student"]["pretrain"]["lr"]  # nested keys merge one by one
    assert len(p.science.seeds) >= 3 and p.science.lambdas
    assert params_from_dict(p.model_dump(mode="json")) == p  # resolved params re-validate to themselves
    bad = tmp_path / "bad.yaml"
    bad.write_text("profile_scope: everything\ntrain: {lr: 0.1}\n")
    raw["profile"] = str(bad)
    with pytest.raises(ConfigError, match=r"bad\.yaml: profile_scope: must be 'experiment' or absent"):
        params_from_dict(raw)
    bad.write_text("profile_scope: experiment\nregistry: {alias: x}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: registry: a profile may only set world, student"):
        params_from_dict(raw)
    raw["profile"] = None
    raw["science"] = {**raw["science"], "lambdas": [0.0, 1.0]}
    with pytest.raises(ConfigError, match=r"science: .*lambdas must be > 0"):
        params_from_dict(raw)


ROWS = {"winoground": {"text_score": 0.5, "image_score": 0.4, "group_score": 0.3,
                       "collapsed_tag.Object.group_score": 0.1, "collapsed_tag.Relation.group_score": 0.5,
                       "collapsed_tag.Object.text_score": 0.2, "collapsed_tag.Relation.text_score": 0.6},
        "aro": {"vg_relation.macro_accuracy": 0.5, "vg_attribution.macro_accuracy": 0.7,
                "coco_order.precision_at_1": 0.3},
        "zeroshot": {"acc1": 0.9}}


@pytest.fixture
def fake_stages(monkeypatch):
    """Every expensive step replaced by a recorder; SDS runs score +0.1 per unit of lambda on object swaps."""
    calls: list[str] = []
    from sdsclip import diagnose, stages

    def touch(name):
        def run(params, *args, **kw):
            calls.append(name)
            return {"ok": name}
        return run

    for name in ("synth", "ingest", "validate", "pretrain_student", "pretrain_teacher"):
        monkeypatch.setattr(stages, name, touch(name))

    def train(params, student, teacher, shards, validated, out, control=False, log_dir=None):
        calls.append(f"train:{params.seed}:{params.train.lambda_sds}")
        out.mkdir(parents=True, exist_ok=True)
        (out / "lam").write_text(str(params.train.lambda_sds))
        return {"seconds": 1.0, "seconds_per_step": 0.5 if control else 2.0, "steps": 2, "loss_clip": 1.0,
                "loss_sds": 0.0}

    def evaluate(params, model, out):
        calls.append(f"eval:{model.name}")
        rows = json.loads(json.dumps(ROWS))
        lam = float((model / "lam").read_text()) if (model / "lam").is_file() else 0.0
        rows["winoground"]["collapsed_tag.Object.group_score"] += 0.01 * lam + 0.001 * params.seed
        return rows

    monkeypatch.setattr(stages, "train", train)
    monkeypatch.setattr(science, "evaluate_student", evaluate)
    def binding(params, ref, data, items=None, threshold=None):
        calls.append("diagnose")
        return {"text_score": 0.6, "image_score": 0.1, "group_score": 0.1, "swap_effect": 1e-3,
                "swap_effect_sem": 1e-4, "caption_effect": 1e-2, "swap_to_caption_ratio": 0.1,
                "threshold_text_score": 0.5, "passed": True, "n": 10, "by_tag": {}}

    monkeypatch.setattr(diagnose, "teacher_binding", binding)
    return calls


def test_runner_runs_every_seed_and_arm_then_resumes_from_its_outputs(tmp_path, fake_stages):
    raw = _shipped()
    raw["science"] = {**raw["science"], "seeds": [0, 1, 2], "lambdas": [1.0, 10.0]}
    params = params_from_dict(raw)
    summary = science.run_science(params, tmp_path / "sci", log=lambda line: None)
    trains = sorted(c for c in fake_stages if c.startswith("train:"))
    assert trains == sorted(f"train:{s}:{lam}" for s in (0, 1, 2) for lam in (0.0, 1.0, 10.0))
    assert set(summary["arms"]) == {"control", "sds_lambda_1", "sds_lambda_10"}
    obj = "Wino group: object swap"
    assert summary["arms"]["control"]["subsets"][obj]["mean"] == pytest.approx(0.101)
    paired = summary["paired_vs_control"]["sds_lambda_10"][obj]
    assert paired["mean"] == pytest.approx(0.1) and paired["std"] == pytest.approx(0.0, abs=1e-12)
    assert summary["arms"]["sds_lambda_1"]["seconds_per_step"]["mean"] == 2.0
    report = tmp_path / "sci" / "report"
    md = (report / "science.md").read_text()
    assert "| Wino group: object swap | 0.100 | 0.101 ± 0.001 |" in md and "+0.100 ± 0.000" in md
    assert (report / "science.png").stat().st_size > 1000 and json.loads((report / "science.json").read_text())
    # Re-run: everything is reused. A new lambda adds only its own runs.
    fake_stages.clear()
    science.run_science(params, tmp_path / "sci", log=lambda line: None)
    assert fake_stages == []
    raw["science"]["lambdas"] = [1.0, 10.0, 3.0]
    science.run_science(params_from_dict(raw), tmp_path / "sci", log=lambda line: None)
    assert sorted(c for c in fake_stages if c.startswith("train:")) == [f"train:{s}:3.0" for s in (0, 1, 2)]
    # A changed training knob invalidates the fine-tuning runs, not the world or the pretrained models.
    fake_stages.clear()
    raw["train"]["lr"] = 0.5
    science.run_science(params_from_dict(raw), tmp_path / "sci", log=lambda line: None)
    assert not {"synth", "ingest", "validate", "pretrain_student", "pretrain_teacher"} & set(fake_stages)
    assert len([c for c in fake_stages if c.startswith("train:")]) == 12
    # The diagnostic's pass rule changes no weights: only the diagnostic runs again.
    for knob, value in (("binding_min_text_score", 0.9), ("binding_each_tag", False)):
        fake_stages.clear()
        raw["teacher"][knob] = value
        science.run_science(params_from_dict(raw), tmp_path / "sci", log=lambda line: None)
        assert fake_stages == ["diagnose"]


def test_cli_science_applies_the_profile_and_reports_bad_params_in_one_line(tmp_path, fake_stages):
    from typer.testing import CliRunner

    from sdsclip.cli import app

    params_file = tmp_path / "params.yaml"
    raw = _shipped()
    raw["science"] = {**raw["science"], "seeds": [0], "lambdas": [1.0]}
    params_file.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["science", "--params", str(params_file), "--workdir", str(tmp_path / "w"),
                                      "--profile", "-"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "w" / "report" / "science.md").is_file()
    assert sorted(c for c in fake_stages if c.startswith("train:")) == ["train:0:0.0", "train:0:1.0"]
    raw["science"]["lambdas"] = [-1.0]
    params_file.write_text(yaml.safe_dump(raw))
    bad = CliRunner().invoke(app, ["science", "--params", str(params_file), "--workdir", str(tmp_path / "w")])
    assert bad.exit_code == 2 and "science: " in bad.output and "lambdas must be > 0" in bad.output
