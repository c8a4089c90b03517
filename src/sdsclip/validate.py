"""Validate: Great Expectations over ingest's manifest.csv -> accepted / quarantined image-caption pairs.

The suite is data, not code: ``sdsclip/expectations/manifest_suite.json`` (versioned), whose kwarg values
``"${field}"`` are filled from :class:`~sdsclip.config.ValidateConfig` at run time. Before validation two
derived columns are added to the batch: ``caption_chars`` (length of the stripped caption) and
``captions_per_image`` (manifest rows sharing the row's image_id); numeric columns are coerced (unparseable ->
null) and empty strings become nulls.

Output in ``out_dir``:
    gx_result.json   the GX ExpectationSuiteValidationResult (``result_format=COMPLETE``) as JSON;
    accepted.csv     manifest rows that pass every row-level expectation (original manifest columns);
    quarantine.csv   the other rows, plus ``reason``: ``; ``-joined ``expectation_type(column)`` labels;
    summary.json     {rows_in, accepted, quarantined, rejected_fraction, threshold, expectations,
                      failed_expectations, passed, suite, suite_version}.

:class:`ValidationFailed` is raised after all files are written when the rejected fraction exceeds
``cfg.max_rejected_fraction`` or a table-level expectation (or one that could not be evaluated) fails.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from sdsclip.config import ValidateConfig

log = logging.getLogger(__name__)

SUITE_PATH = Path(__file__).resolve().parent / "expectations" / "manifest_suite.json"
_PLACEHOLDER = re.compile(r"\$\{(\w+)\}")


class ValidationFailed(Exception):
    """The manifest failed validation; the message is one line naming the numbers and the report file."""


class SuiteError(ValueError):
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
    suite["expectations"] = [
        _fill(e, cfg, f"{path}: expectations[{i}]") for i, e in enumerate(raw["expectations"])
    ]
    return suite


def _label(exp_cfg: dict[str, Any]) -> str:
    col = exp_cfg.get("kwargs", {}).get("column")
    return f"{exp_cfg['type']}({col})" if col else exp_cfg["type"]


def _frame_for_gx(raw, numeric_columns: list[str]):
    """Typed copy of the all-string manifest frame, plus the derived columns the suite refers to."""
    import pandas as pd

    df = pd.DataFrame(index=raw.index)
    for col in raw.columns:
        s = raw[col].astype(object).where(raw[col].str.strip() != "", None)
        if col in numeric_columns:
            s = pd.to_numeric(s, errors="coerce")
        df[col] = s
    if "caption" in df:
        df["caption_chars"] = pd.to_numeric(raw["caption"].where(df["caption"].notna()).str.strip().str.len(),
                                            errors="coerce")
    if "image_id" in df:
        df["captions_per_image"] = df.groupby("image_id", dropna=False)["image_id"].transform("size") \
            if len(df) else pd.Series(dtype="float64")
    return df


def _run_gx(df, suite: dict[str, Any]):
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("GX_USAGE_STATISTICS_ENABLED", "False")
    gx_logger = logging.getLogger("great_expectations")  # its INFO/WARNING chatter is not ours to show
    if gx_logger.level == logging.NOTSET:
        gx_logger.setLevel(logging.ERROR)
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)  # GX forces INFO
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    batch_def = (ctx.data_sources.add_pandas("sdsclip")
                 .add_dataframe_asset("manifest")
                 .add_batch_definition_whole_dataframe("manifest"))
    expectations = []
    for i, e in enumerate(suite["expectations"]):
        try:
            expectations.append(ExpectationConfiguration(type=e["type"], kwargs=e.get("kwargs", {}),
                                                         meta=e.get("meta") or None).to_domain_obj())
        except Exception as err:  # noqa: BLE001 - GX raises various types on bad configs
            raise SuiteError(f"{SUITE_PATH}: expectations[{i}] ({e.get('type')}): "
                             f"{' '.join(str(err).split())}") from None
    gx_suite = ctx.suites.add(gx.ExpectationSuite(name=suite["name"], expectations=expectations,
                                                  meta={"sdsclip_suite_version": suite.get("version")}))
    vd = ctx.validation_definitions.add(gx.ValidationDefinition(name="manifest", data=batch_def, suite=gx_suite))
    result = vd.run(batch_parameters={"dataframe": df}, result_format={"result_format": "COMPLETE"})
    return result.to_json_dict()


def _write_csv(frame, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    frame.to_csv(tmp, index=False, lineterminator="\n")
    os.replace(tmp, path)


def _write_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def validate_manifest(manifest_csv: Path, out_dir: Path, cfg: ValidateConfig) -> dict:
    """Run the manifest suite; write gx_result.json, accepted.csv, quarantine.csv, summary.json.

    Returns the summary dict; raises ValidationFailed (after writing everything) past the threshold or when a
    table-level expectation fails.
    """
    import pandas as pd

    manifest_csv, out_dir = Path(manifest_csv), Path(out_dir)
    t0 = time.perf_counter()
    if not manifest_csv.is_file():
        raise FileNotFoundError(f"{manifest_csv}: manifest not found (run the ingest stage first)")
    try:
        raw = pd.read_csv(manifest_csv, dtype=str, keep_default_na=False, na_filter=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ValidationFailed(f"{manifest_csv}: not a readable CSV manifest ({' '.join(str(err).split())}); "
                               "re-run the ingest stage") from None
    raw = raw.reset_index(drop=True)
    suite = load_suite(cfg)
    df = _frame_for_gx(raw, suite.get("numeric_columns", []))
    gx_result = _run_gx(df, suite)

    order = {_label(e): i for i, e in enumerate(suite["expectations"])}  # report failures in suite order
    row_reasons: dict[int, list[str]] = {}
    failed: list[tuple[int, str]] = []
    blocking: list[str] = []  # table-level or not evaluable
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
    failed_labels = [lab for _, lab in sorted(failed)]

    bad = raw.index.isin(list(row_reasons))
    accepted = raw[~bad]
    quarantined = raw[bad].copy()
    quarantined["reason"] = ["; ".join(row_reasons[i]) for i in quarantined.index]
    rows_in = len(raw)
    if len(accepted) + len(quarantined) != rows_in:
        raise AssertionError(f"validate invariant broken: {len(accepted)} + {len(quarantined)} != {rows_in}")
    fraction = len(quarantined) / rows_in if rows_in else 0.0
    passed = not blocking and fraction <= cfg.max_rejected_fraction
    summary = {
        "rows_in": rows_in,
        "accepted": len(accepted),
        "quarantined": len(quarantined),
        "rejected_fraction": round(fraction, 6),
        "threshold": cfg.max_rejected_fraction,
        "expectations": len(gx_result["results"]),
        "failed_expectations": failed_labels,
        "blocking_failures": blocking,
        "passed": passed,
        "suite": suite["name"],
        "suite_version": suite.get("version"),
    }

    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(gx_result, out_dir / "gx_result.json")
    _write_csv(accepted, out_dir / "accepted.csv")
    _write_csv(quarantined, out_dir / "quarantine.csv")
    _write_json(summary, out_dir / "summary.json")
    log.info("validate %s: %d rows, %d accepted, %d quarantined, %d expectations, %.1fs", manifest_csv, rows_in,
             len(accepted), len(quarantined), summary["expectations"], time.perf_counter() - t0)

    if blocking:
        raise ValidationFailed(f"{manifest_csv}: table-level expectation(s) failed: {', '.join(blocking)}; "
                               f"see {out_dir / 'gx_result.json'}")
    if not passed:
        raise ValidationFailed(
            f"{manifest_csv}: rejected fraction {fraction:.4f} ({len(quarantined)}/{rows_in} rows) > threshold "
            f"{cfg.max_rejected_fraction} (validation.max_rejected_fraction), see {out_dir / 'quarantine.csv'}")
    return summary
