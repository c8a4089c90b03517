"""Winoground metrics (official definitions, strict >) and the on-disk reader."""

import json

import pytest
import torch
from PIL import Image

from sdsclip.evaluate.winoground import (
    WinogroundDataError,
    evaluate_winoground,
    load_examples,
    metrics_from_scores,
)


def table(*rows):
    """rows of (s_c0i0, s_c0i1, s_c1i0, s_c1i1) -> scores[n, caption, image]."""
    return torch.tensor([[[a, b], [c, d]] for a, b, c, d in rows], dtype=torch.float64)


def test_perfect_and_failing_examples():
    s = table(
        (0.9, 0.1, 0.2, 0.8),  # all right
        (0.9, 0.8, 0.2, 0.3),  # text right (0.9>0.2, 0.3>0.8? no) -> text wrong; image: 0.9>0.8, 0.3>0.2 -> right
        (0.5, 0.9, 0.4, 0.1),  # text: 0.5>0.4, 0.1>0.9 no; image: 0.5>0.9 no
    )
    m = metrics_from_scores(s)
    assert m == {"n": 3, "text_score": pytest.approx(1 / 3), "image_score": pytest.approx(2 / 3),
                 "group_score": pytest.approx(1 / 3)}


def test_text_right_image_wrong():
    # Same image wins under both captions: the text score can be right while the image score is wrong.
    s = table((0.9, 0.1, 0.5, 0.2))
    # text: s(c0,i0)=0.9 > s(c1,i0)=0.5 and s(c1,i1)=0.2 > s(c0,i1)=0.1 -> right
    # image: s(c0,i0)=0.9 > s(c0,i1)=0.1 and s(c1,i1)=0.2 > s(c1,i0)=0.5 -> wrong
    m = metrics_from_scores(s)
    assert (m["text_score"], m["image_score"], m["group_score"]) == (1.0, 0.0, 0.0)


def test_ties_count_as_wrong():
    all_equal = table((0.5, 0.5, 0.5, 0.5))
    assert metrics_from_scores(all_equal)["group_score"] == 0.0
    assert metrics_from_scores(all_equal)["text_score"] == 0.0
    assert metrics_from_scores(all_equal)["image_score"] == 0.0
    # one tie in the text comparison only: text wrong, image still right
    s = table((0.9, 0.1, 0.9, 0.95))
    m = metrics_from_scores(s)
    assert (m["text_score"], m["image_score"]) == (0.0, 1.0)


def _write_dataset(root, n=4, bad_line=None):
    (root / "images").mkdir(parents=True)
    lines = []
    for i in range(n):
        for k in (0, 1):
            Image.new("RGB", (8, 8), (40 * i, 100 * k, 0)).save(root / "images" / f"ex_{i}_img_{k}.png")
        lines.append(json.dumps({
            "id": i, "caption_0": f"a red circle {i}", "caption_1": f"{i} circle a red",
            "image_0": f"ex_{i}_img_0", "image_1": f"ex_{i}_img_1", "tag": "Object-Swap", "secondary_tag": "",
            "num_main_preds": 1, "collapsed_tag": "Object" if i % 2 else "Relation",
        }))
    if bad_line is not None:
        lines.insert(1, bad_line)
    (root / "examples.jsonl").write_text("\n".join(lines) + "\n")


def test_reader_errors_name_file_and_line(tmp_path):
    _write_dataset(tmp_path, bad_line="{not json")
    with pytest.raises(WinogroundDataError, match=r"examples.jsonl:2: not valid JSON"):
        load_examples(tmp_path)


def test_reader_missing_image(tmp_path):
    _write_dataset(tmp_path)
    (tmp_path / "images" / "ex_2_img_1.png").unlink()
    with pytest.raises(WinogroundDataError, match=r"examples.jsonl:3: image 'ex_2_img_1' not found"):
        load_examples(tmp_path)


class OracleScorer:
    """Scores 1 when the caption's example id matches the image's and the caption index matches the image index."""

    name = "oracle"

    def score(self, images, captions, pairs):
        out = []
        for i, c in pairs:
            r, g, _ = images[i].getpixel((0, 0))
            ex, k = r // 40, g // 100
            cap = captions[c]
            out.append(1.0 if (cap.startswith("a") == (k == 0) and str(ex) in cap) else 0.0)
        return torch.tensor(out)


def test_evaluate_writes_official_outputs(tmp_path):
    data = tmp_path / "wino"
    _write_dataset(data)
    out, scores = tmp_path / "m.json", tmp_path / "s.jsonl"
    result = evaluate_winoground(OracleScorer(), data, out, scores)
    saved = json.loads(out.read_text())
    assert saved == result
    assert set(saved) == {"n", "text_score", "image_score", "group_score", "by_collapsed_tag"}
    assert saved["group_score"] == 1.0 and saved["n"] == 4
    assert set(saved["by_collapsed_tag"]) == {"Object", "Relation"}
    assert saved["by_collapsed_tag"]["Object"]["n"] == 2
    lines = [json.loads(x) for x in scores.read_text().splitlines()]
    assert len(lines) == 16
    assert {x["label"] for x in lines} >= {"0_c0_i0", "0_c0_i1", "0_c1_i0", "3_c1_i1"}
    by_label = {x["label"]: x["score"] for x in lines}
    assert by_label["2_c0_i0"] == 1.0 and by_label["2_c0_i1"] == 0.0
