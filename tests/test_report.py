"""The evaluation report: Markdown + HTML + PNG and one flat metrics JSON that `dvc metrics diff` reads."""

import json
import os
import subprocess
import sys

import pytest
from eval_fixtures import HashScorer, tiny_world
from PIL import Image

from sdsclip.evaluate.aro import evaluate_aro
from sdsclip.evaluate.report import MODELS, write_report
from sdsclip.evaluate.sugarcrepe import derive_from_winoground, evaluate_sugarcrepe
from sdsclip.evaluate.winoground import evaluate_winoground
from sdsclip.evaluate.zeroshot import evaluate_zeroshot


class Shifted(HashScorer):
    """A different fake model per name, so the four columns differ."""

    def __init__(self, salt):
        super().__init__()
        self.salt = salt

    def score(self, images, captions, pairs):
        return super().score(images, [f"{self.salt}:{c}" for c in captions], pairs)


@pytest.fixture(scope="module")
def metrics_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    world = tiny_world(root / "world", aro_attribution_items=30)
    derive_from_winoground(world / "winoground", root / "sugarcrepe")
    out = root / "metrics"
    for model in MODELS:
        scorer = Shifted(model)
        evaluate_winoground(scorer, world / "winoground", out / f"winoground_{model}.json")
        evaluate_aro(scorer, world / "aro", out / f"aro_{model}.json", min_count=1)
        evaluate_sugarcrepe(scorer, root / "sugarcrepe", out / f"sugarcrepe_{model}.json")
        if model != "teacher":  # as in the pipeline: no teacher zero-shot by default
            evaluate_zeroshot(scorer, world / "zeroshot", out / f"zeroshot_{model}.json", prompt_set="toyworld")
    (out / "registration.json").write_text("{}")  # other files in the dir are ignored
    return out


def test_report_files_and_flat_metrics(metrics_dir, tmp_path):
    result = write_report(metrics_dir, tmp_path / "reports", tmp_path / "evaluation.json")
    flat = json.loads((tmp_path / "evaluation.json").read_text())
    assert result["metrics"] == len(flat) and result["benchmarks"] == ["aro", "sugarcrepe", "winoground", "zeroshot"]
    assert all(isinstance(v, float) for v in flat.values())
    wino = json.loads((metrics_dir / "winoground_sds.json").read_text())
    assert flat["winoground.sds.group_score"] == wino["group_score"]
    assert flat["winoground.sds.collapsed_tag.Object.group_score"] == wino["by_collapsed_tag"]["Object"]["group_score"]
    assert (
        flat["winoground.teacher.num_main_preds.1.text_score"]
        == json.loads((metrics_dir / "winoground_teacher.json").read_text())["by_num_main_preds"]["1"]["text_score"]
    )
    aro = json.loads((metrics_dir / "aro_baseline.json").read_text())
    assert flat["aro.baseline.vg_relation.macro_accuracy"] == aro["vg_relation"]["macro_accuracy"]
    assert flat["aro.baseline.coco_order.precision_at_1"] == aro["coco_order"]["precision_at_1"]
    sc = json.loads((metrics_dir / "sugarcrepe_pretrained.json").read_text())
    assert flat["sugarcrepe.pretrained.swap_obj.accuracy"] == sc["subsets"]["swap_obj"]["accuracy"]
    assert flat["sugarcrepe.pretrained.mean_accuracy"] == sc["mean_accuracy"]
    assert "zeroshot.sds.acc1" in flat and not any(k.startswith("zeroshot.teacher") for k in flat)

    md = (tmp_path / "reports" / "evaluation.md").read_text()
    for label in MODELS.values():
        assert label in md
    assert "| group_score |" in md and "| collapsed_tag.Relation.group_score |" in md
    assert "| vg_attribution.macro_accuracy |" in md and "| swap_att.accuracy |" in md
    zeroshot_rows = md.split("## Zero-shot")[1]
    assert "teacher" not in zeroshot_rows.splitlines()[2]  # no teacher column where it was not evaluated
    page = (tmp_path / "reports" / "evaluation.html").read_text()
    assert page.startswith("<!doctype html>") and "evaluation.png" in page and "SDS-CLIP" in page
    with Image.open(tmp_path / "reports" / "evaluation.png") as png:
        assert png.format == "PNG" and png.size[0] >= 800


def test_report_is_deterministic(metrics_dir, tmp_path):
    write_report(metrics_dir, tmp_path / "a", tmp_path / "a.json")
    write_report(metrics_dir, tmp_path / "b", tmp_path / "b.json")
    for name in ("evaluation.md", "evaluation.html", "evaluation.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_missing_metrics_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no {benchmark}_{model}.json"):
        write_report(tmp_path, tmp_path / "r", tmp_path / "s.json")


def test_dvc_metrics_diff_reads_one_row_per_number(metrics_dir, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }

    def run(*args):
        proc = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    run("git", "init", "-q")
    run(sys.executable, "-m", "dvc", "init", "-q")
    write_report(metrics_dir, repo / "reports", repo / "metrics" / "evaluation.json")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "experiment A")
    flat = json.loads((repo / "metrics" / "evaluation.json").read_text())
    before = flat["winoground.sds.group_score"]
    flat["winoground.sds.group_score"] = before + 0.25
    (repo / "metrics" / "evaluation.json").write_text(json.dumps(flat, indent=2))
    out = run(sys.executable, "-m", "dvc", "metrics", "diff", "HEAD", "--targets", "metrics/evaluation.json", "--md")
    row = next(line for line in out.splitlines() if "winoground.sds.group_score" in line)
    assert f"{before + 0.25:.5g}"[:4] in row and "0.25" in row
    assert "winoground.baseline.group_score" not in out  # unchanged numbers are not listed
