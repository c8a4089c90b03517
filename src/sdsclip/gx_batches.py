"""Validate a manifest in batches of rows, with the result Great Expectations gives for the whole table.

A suite is validated batch by batch (``validation.chunk_rows`` rows each) so that memory is bounded by the batch,
not by the split. That is exact for what the manifest suite holds, and :func:`check_batchable` refuses the rest:

- row-wise expectations (``expect_column_values_*``): each row's verdict depends on the row alone - except
  ``expect_column_values_to_be_unique`` and the derived ``captions_per_image`` column, which depend on other rows.
  A first pass over the manifest (:func:`scan_manifest`: only those columns, 8 bytes a row) counts the rows per
  image and finds the rows that share a value of a unique-checked column; those rows are validated together in
  one extra batch first (normally none), so GX itself sees every duplicate;
- table shape (``expect_table_columns_*``, ``expect_table_column_count_*``): the same header in every batch;
- row count (``expect_table_row_count_*``): the batches' counts summed and the bounds applied to the sum.

:func:`merge_results` folds the batches' GX results into one ExpectationSuiteValidationResult (counts summed,
unexpected rows concatenated: rows keep their manifest row number as the frame index), which is what
gx_result.json and the Data Docs show.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from sdsclip.errors import UserError

UNIQUE = "expect_column_values_to_be_unique"
ROW_COUNT = ("expect_table_row_count_to_be_between", "expect_table_row_count_to_equal")
TABLE_SHAPE = (
    "expect_table_columns_to_match_set",
    "expect_table_columns_to_match_ordered_list",
    "expect_table_column_count_to_equal",
    "expect_table_column_count_to_be_between",
)
PARTIAL = 20  # GX's length of partial_unexpected_list


class BatchingError(UserError, ValueError):
    """The suite holds an expectation that needs the whole table at once."""


def check_batchable(suite: dict[str, Any], where: str) -> None:
    for i, e in enumerate(suite["expectations"]):
        kind = e.get("type", "")
        if kind in ROW_COUNT or kind in TABLE_SHAPE or kind.startswith("expect_column_values_"):
            continue
        raise BatchingError(
            f"{where}: expectations[{i}] ({kind}) needs the whole table, and validation reads the manifest in "
            f"batches of validation.chunk_rows rows; set validation.chunk_rows: 0 to validate it in one batch"
        )


def unique_columns(suite: dict[str, Any]) -> list[str]:
    return sorted({e["kwargs"]["column"] for e in suite["expectations"] if e.get("type") == UNIQUE})


@dataclass
class ManifestScan:
    """What a batch cannot see of the other rows: the rows per image of each row, and the rows sharing a value of a
    unique-checked column (with another row)."""

    rows: int
    captions_per_image: np.ndarray | None  # per row (None: no image_id column)
    shared_rows: np.ndarray  # sorted row numbers


def scan_manifest(chunks, unique: list[str]) -> ManifestScan:
    """``chunks``: the manifest's ``image_id`` and unique-checked columns, as frames of numbers (NaN = null)
    or strings (None = null), in row order. Nulls are never duplicates (GX skips them), and a null image_id counts
    with the other null ones (pandas' groupby with dropna=False)."""
    image_ids: list[np.ndarray] = []
    keys: dict[str, list[np.ndarray]] = {c: [] for c in unique}
    rows = 0
    has_image = True
    for frame in chunks:
        rows += len(frame)
        has_image = "image_id" in frame
        if has_image:
            image_ids.append(frame["image_id"].to_numpy(dtype="float64"))
        for col in unique:
            if col in frame:
                keys[col].append(_hashable(frame[col]))
    per_image = _counts(np.concatenate(image_ids)) if has_image and image_ids else None
    shared = [_shared(np.concatenate(parts)) for parts in keys.values() if parts]
    shared_rows = np.unique(np.concatenate(shared)) if shared else np.zeros(0, dtype=np.int64)
    return ManifestScan(rows, per_image if has_image else None, shared_rows)


def _hashable(series) -> np.ndarray:
    """A float64 per row: the number itself, or for text a 52-bit hash (collisions only add rows to the extra
    batch, where GX decides); NaN for null."""
    import pandas as pd

    if pd.api.types.is_numeric_dtype(series):
        return series.to_numpy(dtype="float64")
    hashed = pd.util.hash_pandas_object(series.fillna(""), index=False).to_numpy() >> np.uint64(12)
    out = hashed.astype("float64")
    out[series.isna().to_numpy()] = np.nan
    return out


def _counts(values: np.ndarray) -> np.ndarray:
    """For each element, how many elements share its value (NaN counted as one value)."""
    out = np.empty(len(values), dtype=np.int64)
    nan = np.isnan(values)
    out[nan] = int(nan.sum())
    _, inverse, counts = np.unique(values[~nan], return_inverse=True, return_counts=True)
    out[~nan] = counts[inverse]
    return out


def _shared(values: np.ndarray) -> np.ndarray:
    """Row numbers whose (non-null) value occurs more than once."""
    rows = np.flatnonzero(~np.isnan(values))
    _, inverse, counts = np.unique(values[rows], return_inverse=True, return_counts=True)
    return rows[counts[inverse] > 1]


# -- merging the batches' results -----------------------------------------------------------------------------


def merge_results(into, other) -> None:
    """Fold ``other`` (an ExpectationSuiteValidationResult of the next batch) into ``into``, in place."""
    for mine, theirs in zip(into.results, other.results, strict=True):
        kind = mine.expectation_config.type
        if kind in ROW_COUNT:
            mine.result["observed_value"] = mine.result.get("observed_value", 0) + theirs.result.get(
                "observed_value", 0
            )
            mine.success = _row_count_ok(kind, mine.expectation_config.kwargs, mine.result["observed_value"])
        elif kind in TABLE_SHAPE:
            if mine.success and not theirs.success:
                mine.result, mine.success = theirs.result, False
        else:
            _merge_map(mine.result, theirs.result)
            mine.success = mine.success and theirs.success
        if _raised(theirs.exception_info) and not _raised(mine.exception_info):
            mine.exception_info, mine.success = theirs.exception_info, False
    _restate(into)


def _row_count_ok(kind: str, kwargs: dict[str, Any], n: int) -> bool:
    if kind == "expect_table_row_count_to_equal":
        return n == kwargs.get("value")
    lo, hi = kwargs.get("min_value"), kwargs.get("max_value")
    return (lo is None or n >= lo) and (hi is None or n <= hi)


def _merge_map(mine: dict[str, Any], theirs: dict[str, Any]) -> None:
    """Sum the counts, concatenate the unexpected rows, recompute the percentages (GX's definitions)."""
    for key in ("element_count", "unexpected_count", "missing_count"):
        if key in mine or key in theirs:
            mine[key] = mine.get(key, 0) + theirs.get(key, 0)
    for key in ("unexpected_list", "unexpected_index_list"):
        if key in mine or key in theirs:
            mine[key] = list(mine.get(key) or []) + list(theirs.get(key) or [])
    for key in ("partial_unexpected_list", "partial_unexpected_index_list"):
        if key in mine or key in theirs:
            mine[key] = (list(mine.get(key) or []) + list(theirs.get(key) or []))[:PARTIAL]
    if "partial_unexpected_counts" in mine:
        mine["partial_unexpected_counts"] = _value_counts(mine.get("partial_unexpected_list") or [])
    if "unexpected_index_query" in mine:
        mine["unexpected_index_query"] = f"df.filter(items={mine.get('unexpected_index_list', [])}, axis=0)"
    total, bad, missing = mine.get("element_count", 0), mine.get("unexpected_count", 0), mine.get("missing_count", 0)
    nonmissing = total - missing
    if "missing_percent" in mine:
        mine["missing_percent"] = 100.0 * missing / total if total else None
    if "unexpected_percent_total" in mine:
        mine["unexpected_percent_total"] = 100.0 * bad / total if total else None
    for key in ("unexpected_percent", "unexpected_percent_nonmissing"):
        if key in mine:
            mine[key] = 100.0 * bad / nonmissing if nonmissing else None


def _value_counts(values: list[Any]) -> list[dict[str, Any]]:
    counts: dict[Any, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return [{"value": v, "count": n} for v, n in sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))]


def _raised(info: Any) -> bool:
    if not isinstance(info, dict):
        return False
    return bool(info.get("raised_exception")) or any(
        isinstance(v, dict) and v.get("raised_exception") for v in info.values()
    )


def _restate(result) -> None:
    """The suite-level success and statistics, from the merged expectation results."""
    ok = sum(1 for r in result.results if r.success)
    n = len(result.results)
    result.success = ok == n
    result.statistics.update(
        evaluated_expectations=n,
        successful_expectations=ok,
        unsuccessful_expectations=n - ok,
        success_percent=100.0 * ok / n if n else None,
    )
