"""sdsclip.validate: the Great Expectations manifest suite, quarantine and the rejection threshold."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from sdsclip.config import IngestConfig, ValidateConfig
from sdsclip.ingest import MANIFEST_COLUMNS, ingest_coco
from sdsclip.validate import SUITE_PATH, ValidationFailed, load_suite, validate_manifest

N_IMAGES, CAPTIONS = 8, 3


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """A real manifest: a tiny COCO split (32x32 PNG/JPEG) through ingest."""
    root = tmp_path_factory.mktemp("coco")
    img_dir = root / "images" / "train"
    img_dir.mkdir(parents=True)
    images, anns = [], []
    for i in range(1, N_IMAGES + 1):
        fmt, ext = ("JPEG", "jpg") if i % 2 else ("PNG", "png")
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (20 * i, 40, 60)).save(buf, format=fmt)
        name = f"{i:012d}.{ext}"
        (img_dir / name).write_bytes(buf.getvalue())
        images.append({"id": i, "file_name": name, "width": 32, "height": 32})
        anns += [
            {"id": i * 100 + k, "image_id": i, "caption": f"a red circle above a blue square {k}"}
            for k in range(CAPTIONS)
        ]
    ann = root / "captions_train.json"
    ann.write_text(json.dumps({"info": {}, "licenses": [], "images": images, "annotations": anns}))
    out = root / "shards"
    ingest_coco(ann, img_dir, out, IngestConfig(shard_size=4, workers=1))
    return out / "manifest.csv"


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _write(path: Path, rows: list[dict[str, str]], columns: list[str] | None = None) -> Path:
    columns = columns or list(rows[0])
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def _corrupt(manifest: Path, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """Three bad rows: bad sha256, empty caption, too-small image. Returns (csv, {annotation_id: column})."""
    rows = _read(manifest)
    rows[0]["sha256"] = "NOT-A-HASH"
    rows[4]["caption"] = "   "
    rows[7]["width"] = "2"
    bad = {rows[0]["annotation_id"]: "sha256", rows[4]["annotation_id"]: "caption", rows[7]["annotation_id"]: "width"}
    return _write(tmp_path / "manifest.csv", rows), bad


def test_good_manifest_passes(manifest, tmp_path):
    out = tmp_path / "val"
    s = validate_manifest(manifest, out, ValidateConfig())
    assert s["passed"] is True and s["failed_expectations"] == []
    assert s["rows_in"] == s["accepted"] == N_IMAGES * CAPTIONS and s["quarantined"] == 0
    assert s["expectations"] >= 6
    assert s == json.loads((out / "summary.json").read_text())
    gx = json.loads((out / "gx_result.json").read_text())
    assert gx["success"] is True and len(gx["results"]) == s["expectations"]
    types = {r["expectation_config"]["type"] for r in gx["results"]}
    assert {
        "expect_table_columns_to_match_set",
        "expect_column_values_to_match_regex",
        "expect_column_values_to_be_between",
        "expect_column_values_to_be_unique",
        "expect_column_values_to_not_be_null",
    } <= types
    accepted = _read(out / "accepted.csv")
    assert accepted == _read(manifest)  # accepted rows are the manifest rows, unchanged
    assert _read(out / "quarantine.csv") == []


def test_bad_rows_are_quarantined_with_reasons(manifest, tmp_path):
    path, bad = _corrupt(manifest, tmp_path)
    out = tmp_path / "val"
    s = validate_manifest(path, out, ValidateConfig(max_rejected_fraction=0.5))
    assert s["passed"] is True
    q = {r["annotation_id"]: r for r in _read(out / "quarantine.csv")}
    assert set(q) == set(bad)
    assert (
        q[next(k for k, c in bad.items() if c == "sha256")]["reason"] == "expect_column_values_to_match_regex(sha256)"
    )
    assert (
        "expect_column_values_to_not_be_null(caption)" in q[next(k for k, c in bad.items() if c == "caption")]["reason"]
    )
    assert q[next(k for k, c in bad.items() if c == "width")]["reason"] == "expect_column_values_to_be_between(width)"
    accepted = _read(out / "accepted.csv")
    assert not set(bad) & {r["annotation_id"] for r in accepted}
    assert list(accepted[0]) == MANIFEST_COLUMNS
    assert len(accepted) + len(q) == s["rows_in"] == N_IMAGES * CAPTIONS
    assert (s["accepted"], s["quarantined"]) == (len(accepted), 3)
    assert s["rejected_fraction"] == pytest.approx(3 / (N_IMAGES * CAPTIONS), abs=1e-6)
    assert set(s["failed_expectations"]) == {
        "expect_column_values_to_match_regex(sha256)",
        "expect_column_values_to_not_be_null(caption)",
        "expect_column_values_to_be_between(width)",
    }


def test_threshold_exceeded_raises_after_writing_files(manifest, tmp_path):
    path, _ = _corrupt(manifest, tmp_path)
    out = tmp_path / "val"
    with pytest.raises(ValidationFailed) as err:
        validate_manifest(path, out, ValidateConfig(max_rejected_fraction=0.1))
    msg = str(err.value)
    assert "\n" not in msg and "rejected fraction 0.1250" in msg and "threshold 0.1" in msg
    assert str(out / "quarantine.csv") in msg
    for name in ("gx_result.json", "accepted.csv", "quarantine.csv", "summary.json"):
        assert (out / name).is_file(), name
    s = json.loads((out / "summary.json").read_text())
    assert s["passed"] is False and s["quarantined"] == 3 and s["accepted"] + s["quarantined"] == s["rows_in"]


def test_config_thresholds_are_applied(manifest, tmp_path):
    """${...} placeholders come from ValidateConfig: 32 px images fail min_image_side=40; 3 captions < 4."""
    suite = load_suite(ValidateConfig(min_image_side=40, min_captions_per_image=4))
    kw = [
        e["kwargs"]
        for e in suite["expectations"]
        if e["kwargs"].get("column") == "width" and "min_value" in e["kwargs"]
    ]
    assert kw == [{"column": "width", "min_value": 40, "max_value": 8192}]
    out = tmp_path / "val"
    with pytest.raises(ValidationFailed, match="rejected fraction 1.0000"):
        validate_manifest(manifest, out, ValidateConfig(min_image_side=40, min_captions_per_image=4))
    reasons = {r["reason"] for r in _read(out / "quarantine.csv")}
    assert reasons == {
        "expect_column_values_to_be_between(width); expect_column_values_to_be_between(height); "
        "expect_column_values_to_be_between(captions_per_image)"
    }


def test_missing_column_is_a_table_level_failure(manifest, tmp_path):
    rows = _read(manifest)
    path = _write(tmp_path / "manifest.csv", rows, [c for c in MANIFEST_COLUMNS if c != "shard"])
    out = tmp_path / "val"
    with pytest.raises(ValidationFailed, match="table-level") as err:
        validate_manifest(path, out, ValidateConfig(max_rejected_fraction=1.0))
    assert "expect_table_columns_to_match_set" in str(err.value)
    assert json.loads((out / "summary.json").read_text())["passed"] is False


def test_duplicate_annotation_id_and_empty_manifest(manifest, tmp_path):
    rows = _read(manifest)
    rows[1]["annotation_id"] = rows[0]["annotation_id"]
    out = tmp_path / "dup"
    s = validate_manifest(_write(tmp_path / "dup.csv", rows), out, ValidateConfig(max_rejected_fraction=0.5))
    reasons = [r["reason"] for r in _read(out / "quarantine.csv")]
    assert reasons == ["expect_column_values_to_be_unique(annotation_id)"] * 2

    empty = _write(tmp_path / "empty.csv", [], MANIFEST_COLUMNS)
    with pytest.raises(ValidationFailed, match="expect_table_row_count_to_be_between"):
        validate_manifest(empty, tmp_path / "empty", ValidateConfig())
    assert s["rows_in"] == N_IMAGES * CAPTIONS


def test_suite_file_is_versioned_and_meaningful():
    raw = json.loads(SUITE_PATH.read_text())
    assert isinstance(raw["version"], int) and raw["name"]
    assert len(raw["expectations"]) >= 6
    assert "${min_caption_chars}" in json.dumps(raw)


# -- Data Docs, metrics, end-to-end invariant, fsspec, stage + CLI + Kubeflow component ------------------------


def test_data_docs_and_metrics_are_written(manifest, tmp_path):
    from sdsclip.validate import data_docs_page

    out = tmp_path / "val"
    s = validate_manifest(manifest, out, ValidateConfig())
    index = out / "data_docs" / "index.html"
    assert index.is_file() and "sdsclip_manifest" in index.read_text()
    pages = list((out / "data_docs" / "validations").rglob("*.html"))
    assert len(pages) == 1 and "values must match this regular expression" in pages[0].read_text()
    assert list((out / "data_docs" / "expectations").glob("*.html"))
    m = json.loads((out / "validation_metrics.json").read_text())
    assert m["rows"] == m["accepted"] == s["rows_in"] and m["quarantined"] == 0 and m["pass_rate"] == 1.0
    assert m["end_to_end"] == {
        "annotations_in": N_IMAGES * CAPTIONS,
        "accepted": N_IMAGES * CAPTIONS,
        "quarantined": 0,
        "pass_rate": 1.0,
    }  # ingest_summary.json sits next to the manifest
    assert m["ingest"]["conversions"] == {"none": N_IMAGES}

    validate_manifest(manifest, out, ValidateConfig())  # a re-run replaces the site: still one validation page
    assert len(list((out / "data_docs" / "validations").rglob("*.html"))) == 1

    page = data_docs_page({"train": out})
    assert "PASSED" in page and "<iframe srcdoc=" in page and "expect_column_values_to_be_unique" in page
    assert 'src="http' not in page and 'href="http' not in page  # our part is self-contained

    s2 = validate_manifest(manifest, tmp_path / "nodocs", ValidateConfig(data_docs=False))
    assert s2 == s and not (tmp_path / "nodocs" / "data_docs").exists()


def test_bad_captions_end_to_end_invariant(tmp_path):
    """Ingest drops what is not text (empty, whitespace, not UTF-8, wrong type, unknown image); the GX suite
    drops what is too short or too long; accepted + quarantined by either == every caption in the file."""
    from test_ingest import make_coco

    from sdsclip.validate import METRICS_FILE

    fx = make_coco(tmp_path / "coco", n_images=4, captions=5)
    anns = fx["coco"]["annotations"]
    anns[0]["caption"] = "x" * 1001  # over-long -> expect_column_values_to_be_between(caption_chars)
    anns[1]["caption"] = "ab"  # too short -> same expectation
    anns[2]["caption"] = "   "  # whitespace -> ingest: empty_caption
    anns.append({"id": 1, "image_id": 999, "caption": "orphan"})  # -> ingest: unknown_image_id
    fx["json"].write_text(json.dumps(fx["coco"]))
    out = tmp_path / "shards"
    ingest_coco(fx["json"], fx["images"], out, IngestConfig(shard_size=2))
    val = tmp_path / "val"
    s = validate_manifest(out / "manifest.csv", val, ValidateConfig(max_rejected_fraction=0.5))
    q = {r["annotation_id"]: r["reason"] for r in _read(val / "quarantine.csv")}
    assert q == {
        str(anns[0]["id"]): "expect_column_values_to_be_between(caption_chars)",
        str(anns[1]["id"]): "expect_column_values_to_be_between(caption_chars)",
    }
    m = json.loads((val / METRICS_FILE).read_text())
    assert m["quarantined_by_reason"] == {"expect_column_values_to_be_between(caption_chars)": 2}
    assert m["ingest"]["quarantined_by_reason"] == {"empty_caption": 1, "unknown_image_id": 1}
    e2e = m["end_to_end"]
    assert e2e["annotations_in"] == len(anns) == 21
    assert e2e["accepted"] + e2e["quarantined"] == e2e["annotations_in"] and e2e["accepted"] == s["accepted"] == 17
    assert e2e["pass_rate"] == pytest.approx(17 / 21, abs=1e-6)


def test_stale_manifest_next_to_ingest_summary_is_refused(manifest, tmp_path):
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(manifest.parent, shards)
    rows = _read(shards / "manifest.csv")
    _write(shards / "manifest.csv", rows[:-1], MANIFEST_COLUMNS)
    with pytest.raises(ValidationFailed, match=r"rows, but ingest_summary.json next to it says .* re-run"):
        validate_manifest(shards / "manifest.csv", tmp_path / "val", ValidateConfig())


def test_validate_reads_and_writes_fsspec_urls(manifest):
    import fsspec

    mem = fsspec.filesystem("memory")
    root = "/sdsclip-test-validate"
    try:
        for name in ("manifest.csv", "ingest_summary.json"):
            mem.pipe(f"{root}/in/{name}", (manifest.parent / name).read_bytes())
        s = validate_manifest(f"memory://{root}/in/manifest.csv", f"memory://{root}/out", ValidateConfig())
        assert s["passed"] and s["accepted"] == N_IMAGES * CAPTIONS
        for name in (
            "accepted.csv",
            "quarantine.csv",
            "summary.json",
            "gx_result.json",
            "validation_metrics.json",
            "data_docs/index.html",
        ):
            assert mem.isfile(f"{root}/out/{name}"), name
        assert [p for p in mem.find(f"{root}/out/data_docs/validations") if p.endswith(".html")]
        assert json.loads(mem.cat_file(f"{root}/out/validation_metrics.json"))["end_to_end"]["pass_rate"] == 1.0
    finally:
        if mem.exists(root):
            mem.rm(root, recursive=True)


def test_stages_cli_and_kfp_component(tmp_path):
    """The DVC path (CLI -> stages with --metrics) and the Kubeflow component write the same reports; the
    component's HTML artifact is the self-contained page."""
    import sys

    import yaml
    from kfp import dsl
    from test_ingest import make_coco
    from typer.testing import CliRunner

    from sdsclip.cli import app

    fx = make_coco(tmp_path / "coco", n_images=4, captions=2)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"ingest": {"splits": ["train"], "shard_size": 3, "workers": 1}}))
    runner = CliRunner()
    r = runner.invoke(
        app,
        [
            "ingest",
            "--coco-root",
            str(fx["root"]),
            "--out",
            str(tmp_path / "shards"),
            "--metrics",
            str(tmp_path / "metrics" / "ingest.json"),
            "--params",
            str(params),
        ],
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        app,
        [
            "validate",
            "--shards",
            str(tmp_path / "shards"),
            "--out",
            str(tmp_path / "validated"),
            "--metrics",
            str(tmp_path / "metrics" / "validation.json"),
            "--params",
            str(params),
        ],
    )
    assert r.exit_code == 0, r.output
    ingest_m = json.loads((tmp_path / "metrics" / "ingest.json").read_text())
    assert ingest_m["train"]["annotations_written"] == 8 and "seconds" not in ingest_m["train"]
    val_m = json.loads((tmp_path / "metrics" / "validation.json").read_text())
    assert val_m["train"]["pass_rate"] == 1.0 and val_m["train"]["end_to_end"]["annotations_in"] == 8
    assert (tmp_path / "validated" / "data_docs.html").is_file()
    assert (tmp_path / "validated" / "train" / "data_docs" / "index.html").is_file()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from components import data as components
    from sdsclip.config import params_from_dict, params_to_dict

    effective = yaml.safe_dump(params_to_dict(params_from_dict(yaml.safe_load(params.read_text()))))
    out = tmp_path / "kfp"
    validated, docs, metrics = (
        dsl.Dataset(uri=str(out / "validated")),
        dsl.HTML(uri=str(out / "docs" / "page")),
        dsl.Metrics(uri=str(out / "metrics")),
    )
    components.validate(
        params=effective,
        shards=dsl.Dataset(uri=str(tmp_path / "shards")),
        validated=validated,
        data_docs=docs,
        metrics=metrics,
    )
    page = Path(docs.path).read_text()
    assert page.startswith("<!DOCTYPE html>") and "PASSED" in page and "<iframe srcdoc=" in page
    assert metrics.metadata["train.pass_rate"] == 1.0 and metrics.metadata["train.rows"] == 8
    assert metrics.metadata["train.end_to_end_pass_rate"] == 1.0


# -- batches: the manifest read chunk_rows at a time gives the whole-table result -------------------------------


def _messy(manifest: Path, tmp_path: Path) -> Path:
    """Bad rows spread over the manifest, duplicate annotation ids far apart (also '7' vs '07': equal numbers),
    an image whose rows are not next to each other, a null image_id."""
    rows = _read(manifest)
    rows[0]["sha256"] = "NOT-A-HASH"
    rows[5]["caption"] = "  "
    rows[9]["width"] = "2"
    rows[-1]["annotation_id"] = rows[1]["annotation_id"]  # duplicate, first and last batch
    rows[12]["annotation_id"] = "0" + rows[3]["annotation_id"]  # the same number written differently
    rows[14]["image_id"] = ""  # null image id
    rows[15]["image_id"] = rows[2]["image_id"]  # image 1 gets a 4th caption, far from its others
    rows.append(dict(rows[6]))  # an exact copy of a row, at the end
    return _write(tmp_path / "messy.csv", rows)


def _outputs(out: Path) -> dict:
    gx = json.loads((out / "gx_result.json").read_text())
    results = []
    for r in gx["results"]:
        res = dict(r["result"])
        res.pop("partial_unexpected_counts", None)  # GX's order of ties is its own
        results.append(
            (r["expectation_config"]["type"], r["expectation_config"]["kwargs"].get("column"), r["success"], res)
        )
    return {
        "accepted": (out / "accepted.csv").read_text(),
        "quarantine": (out / "quarantine.csv").read_text(),
        "summary": json.loads((out / "summary.json").read_text()),
        "metrics": json.loads((out / "validation_metrics.json").read_text()),
        "success": gx["success"],
        "statistics": gx["statistics"],
        "results": results,
    }


@pytest.mark.parametrize("chunk_rows", [1, 4, 7])
def test_batches_give_the_whole_table_result(manifest, tmp_path, monkeypatch, chunk_rows):
    path = _messy(manifest, tmp_path)
    cfg = {"max_rejected_fraction": 1.0, "min_captions_per_image": 3}
    import sdsclip.validate as validate

    whole = validate_manifest(path, tmp_path / "whole", ValidateConfig(chunk_rows=0, **cfg))
    batches = []
    run = validate._Gx.validate
    monkeypatch.setattr(validate._Gx, "validate", lambda self, df: batches.append(len(df)) or run(self, df))
    batched = validate_manifest(path, tmp_path / "batched", ValidateConfig(chunk_rows=chunk_rows, **cfg))
    n_rows = len(_read(path))
    # the 6 rows sharing an annotation id first, then batches of at most chunk_rows: every row validated once
    assert batches[0] == 6 and max(batches[1:]) <= chunk_rows and sum(batches) == n_rows
    assert batched == whole
    assert _outputs(tmp_path / "batched") == _outputs(tmp_path / "whole")
    q = {r["annotation_id"]: r["reason"] for r in _read(tmp_path / "batched" / "quarantine.csv")}
    rows = _read(path)
    assert "expect_column_values_to_be_unique(annotation_id)" in q[rows[1]["annotation_id"]]
    assert "expect_column_values_to_be_unique(annotation_id)" in q["0" + rows[3]["annotation_id"]]
    assert whole["quarantined"] >= 9 and whole["accepted"] + whole["quarantined"] == len(rows)


def test_row_count_bounds_apply_to_the_whole_manifest(manifest, tmp_path, monkeypatch):
    """max_value of expect_table_row_count is checked against all rows, not against each batch."""
    import sdsclip.validate as validate

    suite = json.loads(SUITE_PATH.read_text())
    for e in suite["expectations"]:
        if e["type"] == "expect_table_row_count_to_be_between":
            e["kwargs"]["max_value"] = N_IMAGES * CAPTIONS - 1
    custom = tmp_path / "suite.json"
    custom.write_text(json.dumps(suite))
    monkeypatch.setattr(validate, "load_suite", lambda cfg, path=custom: load_suite(cfg, path))
    with pytest.raises(ValidationFailed, match="expect_table_row_count_to_be_between"):
        validate_manifest(manifest, tmp_path / "val", ValidateConfig(chunk_rows=5))
    gx = json.loads((tmp_path / "val" / "gx_result.json").read_text())
    (count,) = [r for r in gx["results"] if r["expectation_config"]["type"] == "expect_table_row_count_to_be_between"]
    assert count["result"]["observed_value"] == N_IMAGES * CAPTIONS and count["success"] is False


def test_a_column_aggregate_needs_one_batch(manifest, tmp_path, monkeypatch):
    import sdsclip.validate as validate

    suite = json.loads(SUITE_PATH.read_text())
    suite["expectations"].append(
        {"type": "expect_column_max_to_be_between", "kwargs": {"column": "width", "max_value": 64}}
    )
    custom = tmp_path / "suite.json"
    custom.write_text(json.dumps(suite))
    monkeypatch.setattr(validate, "load_suite", lambda cfg, path=custom: load_suite(cfg, path))
    with pytest.raises(
        validate.UserError, match=r"expect_column_max_to_be_between\) needs the whole table.*chunk_rows: 0"
    ):
        validate_manifest(manifest, tmp_path / "val", ValidateConfig(chunk_rows=5))
    assert validate_manifest(manifest, tmp_path / "val", ValidateConfig(chunk_rows=0))["passed"]
