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
    assert m == {
        "n": 3,
        "text_score": pytest.approx(1 / 3),
        "image_score": pytest.approx(2 / 3),
        "group_score": pytest.approx(1 / 3),
    }


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
        lines.append(
            json.dumps(
                {
                    "id": i,
                    "caption_0": f"a red circle {i}",
                    "caption_1": f"{i} circle a red",
                    "image_0": f"ex_{i}_img_0",
                    "image_1": f"ex_{i}_img_1",
                    "tag": "Object-Swap",
                    "secondary_tag": "",
                    "num_main_preds": 1,
                    "collapsed_tag": "Object" if i % 2 else "Relation",
                }
            )
        )
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
    assert set(saved) == {
        "n",
        "text_score",
        "image_score",
        "group_score",
        "by_collapsed_tag",
        "by_num_main_preds",
        "by_secondary_tag",
        "layout",
        "skipped",
    }
    assert saved["layout"] == "jsonl" and saved["skipped"]["count"] == 0
    assert saved["group_score"] == 1.0 and saved["n"] == 4
    assert set(saved["by_collapsed_tag"]) == {"Object", "Relation"}
    assert saved["by_collapsed_tag"]["Object"]["n"] == 2
    lines = [json.loads(x) for x in scores.read_text().splitlines()]
    assert len(lines) == 16
    assert {x["label"] for x in lines} >= {"0_c0_i0", "0_c0_i1", "0_c1_i0", "3_c1_i1"}
    by_label = {x["label"]: x["score"] for x in lines}
    assert by_label["2_c0_i0"] == 1.0 and by_label["2_c0_i1"] == 0.0


# --- subsets as the official statistics script filters them, the parquet layout, bad input ---------------------

from sdsclip.evaluate.winoground import load_data, winoground_metrics  # noqa: E402


def _rec(i, **kw):
    rec = {
        "id": i,
        "caption_0": f"a red circle {i}",
        "caption_1": f"{i} circle a red",
        "image_0": f"ex_{i}_img_0",
        "image_1": f"ex_{i}_img_1",
        "tag": "Object-Swap",
        "secondary_tag": "",
        "num_main_preds": 1,
        "collapsed_tag": "Object",
    }
    return {**rec, **kw}


def test_subsets_filter_by_equality_like_the_statistics_script(tmp_path):
    tags = [
        ("Object", 1, ""),
        ("Relation", 2, "Symbolic"),
        ("Both", 1, "Symbolic, Series"),
        ("Relation", 1, "Series"),
        ("Object", 2, "Pragmatics"),
    ]
    _write_dataset(tmp_path, n=len(tags))
    recs = [_rec(i, collapsed_tag=c, num_main_preds=p, secondary_tag=t) for i, (c, p, t) in enumerate(tags)]
    (tmp_path / "examples.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    examples = load_examples(tmp_path)
    # example 0 and 2 right (group), the rest wrong
    scores = table(*[(0.9, 0.1, 0.2, 0.8) if i in (0, 2) else (0.1, 0.9, 0.8, 0.2) for i in range(len(tags))])
    m = winoground_metrics(examples, scores)
    assert {k: v["n"] for k, v in m["by_collapsed_tag"].items()} == {"Both": 1, "Object": 2, "Relation": 2}
    assert m["by_collapsed_tag"]["Object"]["group_score"] == 0.5
    assert {k: v["n"] for k, v in m["by_num_main_preds"].items()} == {"1": 3, "2": 2}
    assert m["by_num_main_preds"]["1"]["group_score"] == pytest.approx(2 / 3)
    # whole-string equality: "Symbolic, Series" is its own value, in neither the Symbolic nor the Series subset
    assert {k: v["n"] for k, v in m["by_secondary_tag"].items()} == {
        "Pragmatics": 1,
        "Series": 1,
        "Symbolic": 1,
        "Symbolic, Series": 1,
    }
    assert m["by_secondary_tag"]["Symbolic, Series"]["group_score"] == 1.0
    assert m["by_secondary_tag"]["Symbolic"]["group_score"] == 0.0


def test_unknown_collapsed_tag_names_file_and_line(tmp_path):
    _write_dataset(tmp_path, n=3)
    lines = (tmp_path / "examples.jsonl").read_text().splitlines()
    lines[2] = json.dumps(_rec(2, collapsed_tag="Adjective"))
    (tmp_path / "examples.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(WinogroundDataError, match=r"examples.jsonl:3: unknown collapsed_tag 'Adjective'"):
        load_examples(tmp_path)


def test_duplicate_id_and_missing_field(tmp_path):
    _write_dataset(tmp_path, n=2)
    path = tmp_path / "examples.jsonl"
    path.write_text(json.dumps(_rec(0)) + "\n" + json.dumps(_rec(0)) + "\n")
    with pytest.raises(WinogroundDataError, match=r"examples.jsonl:2: duplicate id 0 \(first at .*:1\)"):
        load_examples(tmp_path)
    rec = _rec(0)
    del rec["caption_1"]
    path.write_text(json.dumps(rec) + "\n")
    with pytest.raises(WinogroundDataError, match=r"examples.jsonl:1: missing field\(s\) caption_1"):
        load_examples(tmp_path)


def test_missing_image_skip_policy_counts_and_reports(tmp_path, capsys):
    data = tmp_path / "wino"
    _write_dataset(data, n=4)
    (data / "images" / "ex_2_img_1.png").unlink()
    result = evaluate_winoground(OracleScorer(), data, tmp_path / "m.json", on_missing="skip")
    assert result["n"] == 3 and result["group_score"] == 1.0
    assert result["skipped"]["count"] == 1
    assert result["skipped"]["first"][0]["where"].endswith("examples.jsonl:3")
    assert "ex_2_img_1" in result["skipped"]["first"][0]["reason"]
    assert "skipped 1 item(s)" in capsys.readouterr().err


def _write_parquet(jsonl_dir, out_file):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for line in (jsonl_dir / "examples.jsonl").read_text().splitlines():
        rec = json.loads(line)
        for k in (0, 1):
            name = rec[f"image_{k}"]
            rec[f"image_{k}"] = {"bytes": (jsonl_dir / "images" / f"{name}.png").read_bytes(), "path": f"{name}.png"}
        rows.append(rec)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), out_file)


def test_parquet_layout_gives_the_same_numbers(tmp_path):
    jsonl = tmp_path / "jsonl"
    _write_dataset(jsonl, n=4)
    hf = tmp_path / "hf"
    _write_parquet(jsonl, hf / "data" / "test-00000-of-00001.parquet")
    a = evaluate_winoground(OracleScorer(), jsonl, tmp_path / "a.json", tmp_path / "a.jsonl")
    b = evaluate_winoground(OracleScorer(), hf, tmp_path / "b.json", tmp_path / "b.jsonl")
    assert b["layout"] == "parquet"
    assert {k: v for k, v in a.items() if k != "layout"} == {k: v for k, v in b.items() if k != "layout"}
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    assert [e.collapsed_tag for e in load_data(hf).examples] == [e.collapsed_tag for e in load_examples(jsonl)]


def test_parquet_bad_row_names_file_and_row(tmp_path):
    jsonl = tmp_path / "jsonl"
    _write_dataset(jsonl, n=3)
    lines = (jsonl / "examples.jsonl").read_text().splitlines()
    lines[1] = json.dumps({**json.loads(lines[1]), "collapsed_tag": "Noun"})
    (jsonl / "examples.jsonl").write_text("\n".join(lines) + "\n")
    _write_parquet(jsonl, tmp_path / "hf" / "test.parquet")
    with pytest.raises(WinogroundDataError, match=r"test.parquet:row 1: unknown collapsed_tag 'Noun'"):
        load_data(tmp_path / "hf")


def test_no_data_says_what_is_expected(tmp_path):
    with pytest.raises(WinogroundDataError, match=r"examples.jsonl: not found .*parquet"):
        load_data(tmp_path)


def test_student_fast_preprocess_is_bit_identical():
    """The batched path for images already at the input size equals open_clip's per-image transform."""
    from sdsclip.models.student import build_student
    from sdsclip.scoring import already_sized_pixels

    student = build_student("sdsclip-tiny-vit")
    images = [Image.new("RGB", (32, 32), (7 * i % 256, 200, 13)) for i in range(5)]
    images[2].putpixel((3, 4), (255, 0, 1))
    fast = already_sized_pixels(student.preprocess, images)
    assert fast is not None and torch.equal(fast, torch.stack([student.preprocess(im) for im in images]))
    assert already_sized_pixels(student.preprocess, [Image.new("RGB", (48, 32))]) is None
    assert already_sized_pixels(student.preprocess, [Image.new("L", (32, 32))]) is None


def test_pipelined_student_scoring_equals_plain_score(monkeypatch):
    """score_pairs (decode + tokenize in a background thread, batched forward here) == StudentScorer.score."""
    from sdsclip.evaluate import common
    from sdsclip.evaluate.common import score_pairs

    monkeypatch.setattr(common, "PIPELINE", True)  # the CUDA path, forced on the CPU
    from sdsclip.models.student import build_student
    from sdsclip.scoring import StudentScorer

    torch.manual_seed(0)
    scorer = StudentScorer(build_student("sdsclip-tiny-vit"), batch_size=3)
    images = [Image.new("RGB", (32 if i % 2 else 40, 32), (30 * i, 255 - 20 * i, 90)) for i in range(7)]
    captions = ["a red circle", "a blue square above a green circle", "the yellow triangle"]
    pairs = [(i, c) for i in range(7) for c in range(3)][::2]
    piped = score_pairs(scorer, [lambda im=im: im for im in images], captions, pairs)
    assert torch.equal(piped, scorer.score(images, captions, pairs))
