"""Validate: Great Expectations over ingest's manifest.csv -> accepted / quarantined image-caption pairs.

The suite is data, not code: ``sdsclip/expectations/manifest_suite.json`` (versioned), whose kwarg values
``"${field}"`` are filled from :class:`~sdsclip.config.ValidateConfig` at run time. Before validation two
derived columns are added to the batch: ``caption_chars`` (length of the stripped caption) and
``captions_per_image`` (manifest rows sharing the row's image_id); numeric columns are coerced (unparseable ->
null) and empty strings become nulls. The manifest is validated ``validation.chunk_rows`` rows at a time, with the
whole-table result (:mod:`sdsclip.gx_batches`): memory is bounded by the batch, not by the split.

The manifest and ``out_dir`` may be local paths or fsspec URLs. Output in ``out_dir``:
    gx_result.json           the GX ExpectationSuiteValidationResult (``result_format=COMPLETE``) as JSON;
    accepted.csv             manifest rows that pass every row-level expectation (original manifest columns);
    quarantine.csv           the other rows, plus ``reason``: ``; ``-joined ``expectation_type(column)`` codes;
    summary.json             {rows_in, accepted, quarantined, rejected_fraction, threshold, expectations,
                              failed_expectations, passed, suite, suite_version};
    validation_metrics.json  small metrics (DVC / Kubeflow): rows, accepted, quarantined, pass_rate, rows per
                             failed expectation, and - when ingest's ``ingest_summary.json`` sits next to the
                             manifest - ingest's counts per reason and the end-to-end pass rate over every
                             caption of the COCO file (``accepted + quarantined by ingest + quarantined here ==
                             annotations in``, asserted);
    data_docs/index.html     GX Data Docs (``validation.data_docs``): the suite and this validation result.

:func:`data_docs_page` renders one self-contained HTML page over several splits' outputs (the Kubeflow HTML
artifact). :class:`ValidationFailed` is raised after all files are written when the rejected fraction exceeds
``cfg.max_rejected_fraction`` or a table-level expectation (or one that could not be evaluated) fails.
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sdsclip.config import ValidateConfig
from sdsclip.errors import UserError
from sdsclip.gx_batches import ManifestScan, check_batchable, merge_results, scan_manifest, unique_columns

log = logging.getLogger(__name__)

SUITE_PATH = Path(__file__).resolve().parent / "expectations" / "manifest_suite.json"
_PLACEHOLDER = re.compile(r"\$\{(\w+)\}")


class ValidationFailed(UserError):
    """The manifest failed validation; the message is one line naming the numbers and the report file."""


class SuiteError(UserError, ValueError):
    """The expectation-suite file is unusable (bad JSON, unknown placeholder, unknown expectation)."""


def _fill(value: Any, cfg: ValidateConfig, where: str) -> Any:
    if isinstance(value, dict):
        return {k: _fill(v, cfg, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, cfg, where) for v in value]
    if not isinstance(value, str) or "${" not in value:
        return value

    def lookup(name: str) -> Any:
        if name not in type(cfg).model_fields:
            raise SuiteError(f"{where}: unknown placeholder ${{{name}}} (valid: {', '.join(type(cfg).model_fields)})")
        return getattr(cfg, name)

    whole = _PLACEHOLDER.fullmatch(value)
    if whole:  # keep the config value's type (int / float)
        return lookup(whole.group(1))
    return _PLACEHOLDER.sub(lambda m: str(lookup(m.group(1))), value)


def load_suite(cfg: ValidateConfig, path: Path = SUITE_PATH) -> dict[str, Any]:
    """The suite file with every ``${field}`` replaced by ``cfg.field``."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise SuiteError(f"{path}: cannot load the expectation suite ({' '.join(str(err).split())})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("expectations"), list) or not raw.get("name"):
        raise SuiteError(f"{path}: expected an object with 'name' and an 'expectations' list")
    suite = dict(raw)
    suite["expectations"] = [_fill(e, cfg, f"{path}: expectations[{i}]") for i, e in enumerate(raw["expectations"])]
    return suite


def _label(exp_cfg: dict[str, Any]) -> str:
    col = exp_cfg.get("kwargs", {}).get("column")
    return f"{exp_cfg['type']}({col})" if col else exp_cfg["type"]


def _frame_for_gx(raw, numeric_columns: list[str], captions_per_image=None):
    """Typed copy of an all-string manifest frame (same index), plus the derived columns the suite refers to;
    ``captions_per_image``: the rows per image over the whole manifest, per manifest row (from the scan)."""
    import pandas as pd

    df = pd.DataFrame(index=raw.index)
    for col in raw.columns:
        s = raw[col].astype(object).where(raw[col].str.strip() != "", None)
        if col in numeric_columns:
            s = pd.to_numeric(s, errors="coerce")
        df[col] = s
    if "caption" in df:
        df["caption_chars"] = pd.to_numeric(
            raw["caption"].where(df["caption"].notna()).str.strip().str.len(), errors="coerce"
        )
    if "image_id" in df and captions_per_image is not None:
        df["captions_per_image"] = pd.Series(captions_per_image[raw.index.to_numpy()], index=raw.index, dtype="int64")
    return df


DOCS_SITE = "sdsclip"
DOCS_DIR = "data_docs"
METRICS_FILE = "validation_metrics.json"
REPORT_PAGE = "data_docs.html"


class _Gx:
    """One ephemeral GX context with the suite, validating one batch (a DataFrame) at a time; with ``docs_dir``,
    :meth:`data_docs` builds GX Data Docs there (a file-system site: index.html, the suite's page and the one
    validation result's page)."""

    def __init__(self, suite: dict[str, Any], docs_dir: Path | None = None):
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
        os.environ.setdefault("GX_USAGE_STATISTICS_ENABLED", "False")
        gx_logger = logging.getLogger("great_expectations")  # its INFO/WARNING chatter is not ours to show
        if gx_logger.level == logging.NOTSET:
            gx_logger.setLevel(logging.ERROR)
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)  # GX forces INFO
        self.ctx = ctx = gx.get_context(mode="ephemeral")
        ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        ctx.variables.data_docs_sites = {}  # the ephemeral default site points into a temp dir
        if docs_dir is not None:
            ctx.add_data_docs_site(
                site_name=DOCS_SITE,
                site_config={
                    "class_name": "SiteBuilder",
                    "show_how_to_buttons": False,
                    "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
                    "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                },
            )
        batch_def = (
            ctx.data_sources.add_pandas("sdsclip")
            .add_dataframe_asset("manifest")
            .add_batch_definition_whole_dataframe("manifest")
        )
        gx_suite = ctx.suites.add(
            gx.ExpectationSuite(
                name=suite["name"],
                expectations=_gx_expectations(suite),
                meta={"sdsclip_suite_version": suite.get("version")},
            )
        )
        self.vd = ctx.validation_definitions.add(
            gx.ValidationDefinition(name="manifest", data=batch_def, suite=gx_suite)
        )
        self.first_key: Any = None

    def validate(self, df):
        """The ExpectationSuiteValidationResult of one batch. GX stores each run's result; only the first batch's
        key is kept (the merged result is stored under it for the Data Docs)."""
        result = self.vd.run(batch_parameters={"dataframe": df}, result_format={"result_format": "COMPLETE"})
        store = self.ctx.validation_results_store
        for key in store.list_keys():
            if self.first_key is None:
                self.first_key = key
            store.remove_key(key)
        return result

    def data_docs(self, result) -> None:
        """Data Docs of ``result`` (the merged batches) as the site's only validation result."""
        self.ctx.validation_results_store.set(self.first_key, result)
        self.ctx.build_data_docs(site_names=[DOCS_SITE])


def _gx_expectations(suite: dict[str, Any]) -> list:
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    expectations = []
    for i, e in enumerate(suite["expectations"]):
        try:
            expectations.append(
                ExpectationConfiguration(
                    type=e["type"], kwargs=e.get("kwargs", {}), meta=e.get("meta") or None
                ).to_domain_obj()
            )
        except Exception as err:  # noqa: BLE001 - GX raises various types on bad configs
            raise SuiteError(
                f"{SUITE_PATH}: expectations[{i}] ({e.get('type')}): {' '.join(str(err).split())}"
            ) from None
    return expectations


def _write_json(obj: Any, loc) -> None:
    loc.write_atomic((json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode("utf-8"))


def _ingest_summary(manifest) -> dict[str, Any] | None:
    """ingest's ingest_summary.json next to the manifest, if there is one."""
    from sdsclip.ingest import Location

    loc = Location(manifest.fs, manifest.path.rsplit("/", 1)[0] + "/ingest_summary.json", "")
    try:
        summary = json.loads(loc.read_bytes())
    except (FileNotFoundError, OSError, ValueError):
        return None
    needed = ("annotations_in", "annotations_written", "annotations_quarantined")
    return summary if isinstance(summary, dict) and all(_is_count(summary.get(k)) for k in needed) else None


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _metrics(
    summary: dict[str, Any], by_reason: Counter[str], ingest: dict[str, Any] | None, manifest_shown: str
) -> dict[str, Any]:
    rows, accepted, quarantined = summary["rows_in"], summary["accepted"], summary["quarantined"]
    metrics: dict[str, Any] = {
        "rows": rows,
        "accepted": accepted,
        "quarantined": quarantined,
        "pass_rate": round(accepted / rows, 6) if rows else 0.0,
        "passed": summary["passed"],
        "quarantined_by_reason": dict(sorted(by_reason.items())),  # a row failing k expectations counts k times
    }
    if ingest is None:
        return metrics
    if ingest["annotations_written"] != rows:
        raise ValidationFailed(
            f"{manifest_shown}: {rows} rows, but ingest_summary.json next to it says "
            f"{ingest['annotations_written']} were written; re-run the ingest stage"
        )
    a_in, a_q = ingest["annotations_in"], ingest["annotations_quarantined"]
    if accepted + quarantined + a_q != a_in:
        raise AssertionError(
            f"invariant broken: {accepted} accepted + {quarantined} quarantined by validate + {a_q} "
            f"quarantined by ingest != {a_in} annotations in"
        )
    metrics["ingest"] = {
        "annotations_in": a_in,
        "annotations_quarantined": a_q,
        "images_in": ingest.get("images_in"),
        "images_written": ingest.get("images_written"),
        "quarantined_by_reason": ingest.get("quarantined", {}),
        "conversions": ingest.get("conversions", {}),
    }
    metrics["end_to_end"] = {
        "annotations_in": a_in,
        "accepted": accepted,
        "quarantined": a_q + quarantined,
        "pass_rate": round(accepted / a_in, 6) if a_in else 0.0,
    }
    return metrics


def validate_manifest(manifest_csv: str | os.PathLike, out_dir: str | os.PathLike, cfg: ValidateConfig) -> dict:
    """Run the manifest suite; write gx_result.json, accepted.csv, quarantine.csv, summary.json,
    validation_metrics.json and (``cfg.data_docs``) data_docs/. Paths may be fsspec URLs. The manifest is read
    in batches of ``cfg.chunk_rows`` rows (:mod:`sdsclip.gx_batches`), so memory does not grow with it.

    Returns the summary dict; raises ValidationFailed (after writing everything) past the threshold or when a
    table-level expectation fails.
    """
    from sdsclip.ingest import Location

    man, out = Location.of(manifest_csv), Location.of(out_dir)
    t0 = time.perf_counter()
    ingest = _ingest_summary(man)
    suite = load_suite(cfg)
    if cfg.chunk_rows:
        check_batchable(suite, str(SUITE_PATH))
    scan = _scan(man, suite, cfg.chunk_rows)
    docs_tmp, docs_dir = _docs_dirs(out, cfg.data_docs)
    try:
        runner = _Gx(suite, docs_dir)
        out.fs.makedirs(out.path, exist_ok=True)
        with _RowFiles(out) as rows:
            merged = _validate_batches(man, suite, scan, runner, rows, cfg.chunk_rows)
        gx_result = merged.to_json_dict()
        _, failed_labels, blocking = _failures(gx_result, suite)
        fraction = rows.quarantined / scan.rows if scan.rows else 0.0
        summary = {
            "rows_in": scan.rows,
            "accepted": rows.accepted,
            "quarantined": rows.quarantined,
            "rejected_fraction": round(fraction, 6),
            "threshold": cfg.max_rejected_fraction,
            "expectations": len(gx_result["results"]),
            "failed_expectations": failed_labels,
            "blocking_failures": blocking,
            "passed": not blocking and fraction <= cfg.max_rejected_fraction,
            "suite": suite["name"],
            "suite_version": suite.get("version"),
        }
        metrics = _metrics(summary, rows.by_reason, ingest, man.shown)
        _write_reports(out, gx_result, summary, metrics)
        if docs_dir is not None:
            runner.data_docs(merged)
        if docs_tmp is not None:
            _upload_docs(out, docs_tmp)
    finally:
        if docs_tmp is not None:
            shutil.rmtree(docs_tmp, ignore_errors=True)
    log.info(
        "validate %s: %d rows, %d accepted, %d quarantined, %d expectations, %.1fs",
        man.shown,
        scan.rows,
        rows.accepted,
        rows.quarantined,
        summary["expectations"],
        time.perf_counter() - t0,
    )
    _raise_if_failed(man, out, summary, fraction, cfg)
    return summary


def _validate_batches(man, suite: dict[str, Any], scan: ManifestScan, runner: _Gx, rows: _RowFiles, chunk_rows: int):
    """Validate the rows sharing a unique-checked value (one batch, first), then every batch of the others; write
    each batch's rows to accepted / quarantine in manifest order. Returns the merged GX result."""
    import pandas as pd

    numeric = suite.get("numeric_columns", [])
    shared = set(scan.shared_rows.tolist())
    shared_reasons: dict[int, list[str]] = {}
    merged = None
    if shared:
        frame = pd.concat([raw[raw.index.isin(shared)] for raw in _chunks(man, chunk_rows)])
        merged = runner.validate(_frame_for_gx(frame, numeric, scan.captions_per_image))
        shared_reasons = _failures(merged.to_json_dict(), suite)[0]
    for raw in _chunks(man, chunk_rows):
        own = raw[~raw.index.isin(shared)] if shared else raw
        reasons: dict[int, list[str]] = {}
        if len(own) or merged is None:
            result = runner.validate(_frame_for_gx(own, numeric, scan.captions_per_image))
            reasons = _failures(result.to_json_dict(), suite)[0]
            if merged is None:
                merged = result
            else:
                merge_results(merged, result)
        if shared:
            reasons.update((i, shared_reasons[i]) for i in raw.index[raw.index.isin(shared)] if i in shared_reasons)
        rows.write(raw, reasons)
    return merged


def _scan(man, suite: dict[str, Any], chunk_rows: int) -> ManifestScan:
    """The first pass: image_id and the unique-checked columns only."""
    header = _header(man)
    unique = [c for c in unique_columns(suite) if c in header]
    wanted = [c for c in ["image_id", *unique] if c in header]
    numeric = suite.get("numeric_columns", [])
    frames = (_frame_for_gx(raw, numeric) for raw in _chunks(man, chunk_rows, wanted))
    return scan_manifest(frames, unique)


def _header(man) -> list[str]:
    import pandas as pd

    return list(_read_csv(man, lambda fh: pd.read_csv(fh, dtype=str, nrows=0, encoding="utf-8")).columns)


def _chunks(man, chunk_rows: int, usecols: list[str] | None = None):
    """The manifest as all-string frames (no NA parsing) of ``chunk_rows`` rows (0: one frame), indexed by row
    number from 0; at least one frame (empty for a manifest of no rows)."""
    import pandas as pd

    kw: dict[str, Any] = {"dtype": str, "keep_default_na": False, "na_filter": False, "encoding": "utf-8"}
    if usecols is not None:
        kw["usecols"] = usecols
    if not chunk_rows:
        yield _read_csv(man, lambda fh: pd.read_csv(fh, **kw)).reset_index(drop=True)
        return
    with _opened(man) as fh:
        reader = _csv_errors(man, lambda: pd.read_csv(fh, chunksize=chunk_rows, **kw))
        yielded = False
        while (raw := _csv_errors(man, lambda: next(reader, None))) is not None:
            yielded = True
            yield raw
    if not yielded:
        yield pd.DataFrame(columns=usecols if usecols is not None else _header(man), dtype=str)


def _opened(man):
    if not man.fs.isfile(man.path):
        raise FileNotFoundError(f"{man.shown}: manifest not found (run the ingest stage first)")
    return man.fs.open(man.path, "rb")


def _read_csv(man, read):
    with _opened(man) as fh:
        return _csv_errors(man, lambda: read(fh))


def _csv_errors(man, fn):
    import pandas as pd

    try:
        return fn()
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ValidationFailed(
            f"{man.shown}: not a readable CSV manifest ({' '.join(str(err).split())}); re-run the ingest stage"
        ) from None


class _RowFiles:
    """accepted.csv (manifest rows passing every row-level expectation, original columns) and quarantine.csv (the
    others plus ``reason``: ``; ``-joined labels), written batch by batch; the counts."""

    def __init__(self, out):
        self.out, self.accepted, self.quarantined, self.header = out, 0, 0, True
        self.by_reason: Counter[str] = Counter()  # a row failing k expectations counts k times
        self.files: dict[str, Any] = {}

    def __enter__(self) -> _RowFiles:
        for name in ("accepted.csv", "quarantine.csv"):
            loc = self.out.child(name)
            self.files[name] = (loc, loc.fs.open(loc.path + ".tmp", "w", encoding="utf-8", newline=""))
        return self

    def write(self, raw, row_reasons: dict[int, list[str]]) -> None:
        bad = raw.index.isin(list(row_reasons))
        accepted, quarantined = raw[~bad], raw[bad].copy()
        quarantined["reason"] = ["; ".join(row_reasons[i]) for i in quarantined.index]
        if len(accepted) + len(quarantined) != len(raw):
            raise AssertionError(f"validate invariant broken: {len(accepted)} + {len(quarantined)} != {len(raw)}")
        for name, frame in (("accepted.csv", accepted), ("quarantine.csv", quarantined)):
            frame.to_csv(self.files[name][1], index=False, header=self.header, lineterminator="\n")
        self.header = False
        self.accepted += len(accepted)
        self.quarantined += len(quarantined)
        self.by_reason.update(label for labels in row_reasons.values() for label in labels)

    def __exit__(self, exc_type, *exc: object) -> None:
        for loc, fh in self.files.values():
            fh.close()
            if exc_type is None:
                loc.fs.mv(loc.path + ".tmp", loc.path)
            else:
                loc.fs.rm(loc.path + ".tmp")


def _docs_dirs(out, data_docs: bool) -> tuple[str | None, Path | None]:
    """(temp folder to remove afterwards, folder GX builds Data Docs in): ``out/data_docs`` itself when ``out`` is
    local, else a local temp folder uploaded at the end; (None, None) without Data Docs."""
    if not data_docs:
        return None, None
    if out.local:
        docs_dir = Path(out.path) / DOCS_DIR
        shutil.rmtree(docs_dir, ignore_errors=True)  # one validation page: this run's
        return None, docs_dir
    docs_tmp = tempfile.mkdtemp(prefix="sdsclip-docs-")
    return docs_tmp, Path(docs_tmp) / DOCS_DIR


def _failures(gx_result: dict[str, Any], suite: dict[str, Any]) -> tuple[dict[int, list[str]], list[str], list[str]]:
    """(row index -> labels of the row-level expectations it fails, labels of every failed expectation in suite
    order, blocking failures: table-level expectations and ones that could not be evaluated)."""
    order = {_label(e): i for i, e in enumerate(suite["expectations"])}  # report failures in suite order
    row_reasons: dict[int, list[str]] = {}
    failed: list[tuple[int, str]] = []
    blocking: list[str] = []
    for r in gx_result["results"]:
        exp_cfg = r["expectation_config"]
        label = _label(exp_cfg)
        if r.get("success"):
            continue
        kwargs = {k: v for k, v in exp_cfg.get("kwargs", {}).items() if k != "batch_id"}
        failed.append((order.get(label, len(order)), label))
        exc = r.get("exception_info") or {}
        raised = exc.get("raised_exception") if isinstance(exc, dict) else False
        if isinstance(exc, dict) and not raised:  # GX may key exception info by metric id
            raised = any(isinstance(v, dict) and v.get("raised_exception") for v in exc.values())
        idx = (r.get("result") or {}).get("unexpected_index_list")
        if raised or "column" not in kwargs or idx is None:
            blocking.append(label + (" [could not be evaluated]" if raised else ""))
            continue
        for i in idx:
            row_reasons.setdefault(int(i), []).append(label)
    return row_reasons, [lab for _, lab in sorted(failed)], blocking


def _write_reports(out, gx_result, summary, metrics) -> None:
    _write_json(gx_result, out.child("gx_result.json"))
    _write_json(summary, out.child("summary.json"))
    _write_json(metrics, out.child(METRICS_FILE))


def _upload_docs(out, docs_tmp: str) -> None:
    """Replace ``out/data_docs`` (not a local folder) by the Data Docs GX built in the temp folder."""
    docs_dir = Path(docs_tmp) / DOCS_DIR
    target = out.child(DOCS_DIR)
    if out.fs.exists(target.path):
        out.fs.rm(target.path, recursive=True)
    out.fs.put(str(docs_dir) + "/", target.path + "/", recursive=True)


def _raise_if_failed(man, out, summary: dict[str, Any], fraction: float, cfg: ValidateConfig) -> None:
    """ValidationFailed when a blocking expectation failed or the rejected fraction is past the threshold."""
    if summary["blocking_failures"]:
        raise ValidationFailed(
            f"{man.shown}: table-level expectation(s) failed: {', '.join(summary['blocking_failures'])}; "
            f"see {out.child('gx_result.json').shown}"
        )
    if not summary["passed"]:
        raise ValidationFailed(
            f"{man.shown}: rejected fraction {fraction:.4f} ({summary['quarantined']}/{summary['rows_in']} rows) > "
            f"threshold {cfg.max_rejected_fraction} (validation.max_rejected_fraction), "
            f"see {out.child('quarantine.csv').shown}"
        )


# -- one self-contained HTML page (the Kubeflow UI shows an HTML artifact as one file) ------------------------

_PAGE_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5rem;color:#222;max-width:1200px}
h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}h3{font-size:1rem}
table{border-collapse:collapse;margin:.5rem 0;font-size:.85rem}th,td{border:1px solid #ddd;padding:.25rem .5rem;
text-align:left;vertical-align:top}th{background:#f4f4f4}.ok{color:#17803d;font-weight:600}
.fail{color:#b42318;font-weight:600}code{font-size:.8rem;word-break:break-all}
iframe{width:100%;height:900px;border:1px solid #ddd}.muted{color:#666;font-size:.85rem}
"""


def _read_json(loc) -> Any:
    try:
        return json.loads(loc.read_bytes())
    except (FileNotFoundError, OSError, ValueError):
        return None


def _validation_page(docs) -> str | None:
    """The HTML of GX's validation-result page under a Data Docs site (its own CSS is inlined by GX)."""
    try:
        pages = sorted(p for p in docs.fs.find(docs.path + "/validations") if p.endswith(".html"))
    except (FileNotFoundError, OSError):
        return None
    return docs.fs.cat_file(pages[-1]).decode("utf-8") if pages else None


def data_docs_page(out_dirs: Mapping[str, str | os.PathLike]) -> str:
    """One self-contained HTML page over the validate outputs of several splits ({split: out_dir}): pass /
    fail, counts, quarantine reasons of ingest and validate, every expectation's result with sample unexpected
    values, and GX's own Data Docs validation page embedded (``srcdoc``; its styling loads from GX's CDNs)."""
    from sdsclip.ingest import Location

    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>sdsclip manifest validation</title>",
        f"<style>{_PAGE_CSS}</style></head><body><h1>sdsclip: manifest validation (Great Expectations)</h1>",
    ]
    for split, out_dir in out_dirs.items():
        parts += _split_section(split, Location.of(out_dir))
    parts.append("</body></html>")
    return "\n".join(parts)


def _split_section(split: str, out) -> list[str]:
    """The page's HTML for one split's validate output folder."""
    esc = html.escape
    summary = _read_json(out.child("summary.json")) or {}
    metrics = _read_json(out.child(METRICS_FILE)) or {}
    result = _read_json(out.child("gx_result.json")) or {}
    verdict = (
        "<span class='ok'>PASSED</span>"
        if summary.get("passed")
        else "<span class='fail'>FAILED</span>"
        if summary
        else "<span class='fail'>NOT RUN</span>"
    )
    parts = [
        f"<h2>{esc(str(split))}: {verdict}</h2>",
        f"<p class='muted'>{esc(out.shown)} &middot; suite {esc(str(summary.get('suite')))} "
        f"v{esc(str(summary.get('suite_version')))}</p>",
        _counts_table(summary, metrics),
        *_reason_tables(metrics),
    ]
    if result.get("results"):
        parts += _expectations_table(result["results"])
    page = _validation_page(out.child(DOCS_DIR))
    if page:
        parts.append(
            "<details><summary>Great Expectations Data Docs: validation result page</summary>"
            f'<iframe srcdoc="{esc(page, quote=True)}"></iframe></details>'
        )
    return parts


def _counts_table(summary: dict[str, Any], metrics: dict[str, Any]) -> str:
    esc = html.escape
    rows = [
        ("rows (image-caption pairs)", metrics.get("rows")),
        ("accepted", metrics.get("accepted")),
        ("quarantined by validate", metrics.get("quarantined")),
        ("pass rate", metrics.get("pass_rate")),
        ("rejected fraction / threshold", f"{summary.get('rejected_fraction')} / {summary.get('threshold')}"),
    ]
    e2e = metrics.get("end_to_end")
    if e2e:
        rows += [
            ("captions in the COCO file", e2e["annotations_in"]),
            ("quarantined by ingest", metrics["ingest"]["annotations_quarantined"]),
            ("end-to-end pass rate", e2e["pass_rate"]),
        ]
    return "<table>" + "".join(f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in rows) + "</table>"


def _reason_tables(metrics: dict[str, Any]) -> list[str]:
    """One table per non-empty count: ingest's and validate's quarantine reasons, ingest's conversions."""
    esc = html.escape
    tables = []
    for title, counts in (
        (
            "Quarantined by ingest (reason code: records)",
            (metrics.get("ingest") or {}).get("quarantined_by_reason"),
        ),
        ("Quarantined by validate (expectation: rows)", metrics.get("quarantined_by_reason")),
        ("Images converted by ingest (conversion: images)", (metrics.get("ingest") or {}).get("conversions")),
    ):
        if counts:
            tables.append(
                f"<h3>{esc(title)}</h3><table>"
                + "".join(
                    f"<tr><td><code>{esc(str(k))}</code></td><td>{esc(str(v))}</td></tr>" for k, v in counts.items()
                )
                + "</table>"
            )
    return tables


def _expectations_table(results: list[dict[str, Any]]) -> list[str]:
    """Every expectation's kwargs, outcome, unexpected count and first few unexpected values."""
    esc = html.escape
    parts = [
        "<h3>Expectations</h3><table><tr><th>expectation</th><th>kwargs</th><th>result</th>"
        "<th>unexpected</th><th>sample unexpected values</th></tr>"
    ]
    for r in results:
        cfg = r.get("expectation_config", {})
        kwargs = {k: v for k, v in cfg.get("kwargs", {}).items() if k != "batch_id"}
        res = r.get("result") or {}
        sample = res.get("partial_unexpected_list") or []
        ok = "<span class='ok'>ok</span>" if r.get("success") else "<span class='fail'>failed</span>"
        parts.append(
            f"<tr><td><code>{esc(str(cfg.get('type')))}</code></td>"
            f"<td><code>{esc(json.dumps(kwargs, default=str)[:300])}</code></td><td>{ok}</td>"
            f"<td>{esc(str(res.get('unexpected_count', '')))}</td>"
            f"<td><code>{esc(json.dumps(sample[:5], default=str, ensure_ascii=False)[:300])}</code></td></tr>"
        )
    parts.append("</table>")
    return parts
