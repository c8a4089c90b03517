"""The evaluation report: every benchmark and subset for the pretrained student, the contrastive-only baseline,
SDS-CLIP and the diffusion teacher, as Markdown + HTML + a bar-chart PNG, plus one flat metrics JSON
(``{benchmark}.{model}.{subset...}.{metric}``) that DVC reads as metrics, so ``dvc metrics diff`` between two
experiments lists one readable row per number.

Input: ``{metrics_dir}/{benchmark}_{model}.json`` as written by ``sdsclip evaluate``; a missing file is shown as
"—" (e.g. the teacher has no zero-shot run by default).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from sdsclip.evaluate.common import write_json

MODELS = {
    "pretrained": "pretrained student",
    "baseline": "baseline (λ=0)",
    "sds": "SDS-CLIP",
    "teacher": "teacher (diffusion)",
}
BENCHMARKS = ("winoground", "aro", "sugarcrepe", "zeroshot")
TITLES = {
    "winoground": "Winoground (text / image / group, strict >)",
    "aro": "ARO (VG: macro accuracy; Order: Precision@1)",
    "sugarcrepe": "SugarCrepe (accuracy, strict >)",
    "zeroshot": "Zero-shot classification",
}
WINO_SCORES = ("text_score", "image_score", "group_score")


def _rows_winoground(m: dict[str, Any]) -> dict[str, float | None]:
    rows = {k: m.get(k) for k in WINO_SCORES}
    for field in ("collapsed_tag", "num_main_preds", "secondary_tag"):
        for value, sub in sorted(m.get(f"by_{field}", {}).items()):
            for k in WINO_SCORES:
                rows[f"{field}.{value}.{k}"] = sub.get(k)
    return rows


def _rows_aro(m: dict[str, Any]) -> dict[str, float | None]:
    rows: dict[str, float | None] = {}
    for name, key in (
        ("vg_relation", "macro_accuracy"),
        ("vg_attribution", "macro_accuracy"),
        ("coco_order", "precision_at_1"),
        ("flickr30k_order", "precision_at_1"),
    ):
        if name in m:
            rows[f"{name}.{key}"] = m[name].get(key)
    return rows


def _rows_sugarcrepe(m: dict[str, Any]) -> dict[str, float | None]:
    rows: dict[str, float | None] = {f"{s}.accuracy": v.get("accuracy") for s, v in m.get("subsets", {}).items()}
    rows.update({f"category.{c}": v for c, v in m.get("categories", {}).items() if v is not None})
    rows["mean_accuracy"] = m.get("mean_accuracy")
    return rows


def _rows_zeroshot(m: dict[str, Any]) -> dict[str, float | None]:
    return {k: m.get(k) for k in ("acc1", "acc5", "mean_per_class_recall")}


ROWS = {"winoground": _rows_winoground, "aro": _rows_aro, "sugarcrepe": _rows_sugarcrepe, "zeroshot": _rows_zeroshot}
#: the numbers the bar chart shows, per benchmark
HEADLINE = {
    "winoground": ("text_score", "image_score", "group_score"),
    "aro": (
        "vg_relation.macro_accuracy",
        "vg_attribution.macro_accuracy",
        "coco_order.precision_at_1",
        "flickr30k_order.precision_at_1",
    ),
    "sugarcrepe": (
        "replace_att.accuracy",
        "replace_obj.accuracy",
        "replace_rel.accuracy",
        "swap_att.accuracy",
        "swap_obj.accuracy",
        "add_att.accuracy",
        "add_obj.accuracy",
    ),
    "zeroshot": ("acc1", "acc5", "mean_per_class_recall"),
}


def collect(metrics_dir: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """{benchmark: {model: rows}} for every ``{benchmark}_{model}.json`` present."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for bench in BENCHMARKS:
        for model in MODELS:
            path = Path(metrics_dir) / f"{bench}_{model}.json"
            if path.is_file():
                table.setdefault(bench, {})[model] = {
                    "rows": ROWS[bench](json.loads(path.read_text())),
                    "n": _n(bench, json.loads(path.read_text())),
                }
    return table


def _n(bench: str, m: dict[str, Any]) -> str:
    if bench == "aro":
        return ", ".join(
            f"{k} {m[k].get('n')}" for k in ("vg_relation", "vg_attribution", "coco_order", "flickr30k_order") if k in m
        )
    if bench == "sugarcrepe":
        return str(sum(v.get("n", 0) for v in m.get("subsets", {}).values()))
    return str(m.get("n"))


def flat_metrics(table: dict[str, dict[str, dict[str, Any]]]) -> dict[str, float]:
    """``{benchmark}.{model}.{row}`` -> number (rows with no value, e.g. no attribute pair with >= 25 items,
    are left out: DVC metrics are numbers)."""
    return {
        f"{bench}.{model}.{row}": float(v)
        for bench, models in table.items()
        for model, rec in models.items()
        for row, v in rec["rows"].items()
        if v is not None
    }


def _fmt(v: Any) -> str:
    return "—" if v is None else f"{v:.3f}"


def _tables(table) -> list[tuple[str, list[str], list[list[str]]]]:
    out = []
    for bench in BENCHMARKS:
        if bench not in table:
            continue
        models = [m for m in MODELS if m in table[bench]]
        rows = list(dict.fromkeys(r for m in models for r in table[bench][m]["rows"]))
        header = ["metric", *[MODELS[m] for m in models]]
        body = [[r, *[_fmt(table[bench][m]["rows"].get(r)) for m in models]] for r in rows]
        body.append(["n", *[table[bench][m]["n"] for m in models]])
        out.append((bench, header, body))
    return out


def markdown(table) -> str:
    lines = [
        "# SDS-CLIP evaluation report",
        "",
        "Pretrained student, contrastive-only baseline, SDS-CLIP and the diffusion teacher (as a matcher: "
        "negative denoising error over shared (t, ε) draws) on every benchmark and subset. "
        "Metric definitions: docs/evaluation.md. '—' = not evaluated / undefined.",
        "",
        "![bar chart](evaluation.png)",
        "",
    ]
    for bench, header, body in _tables(table):
        lines += [
            f"## {TITLES[bench]}",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        lines.append("")
    return "\n".join(lines)


def html_page(table) -> str:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>SDS-CLIP evaluation report</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;"
        "margin-bottom:2em}td,th{border:1px solid #ccc;padding:3px 8px}td{text-align:right}"
        "td:first-child{text-align:left;font-family:monospace}</style></head><body>",
        "<h1>SDS-CLIP evaluation report</h1>",
        "<p>Pretrained student, contrastive-only baseline, SDS-CLIP and the diffusion teacher on every "
        "benchmark and subset. '—' = not evaluated / undefined.</p>",
        "<img src='evaluation.png' alt='bar chart of the headline metrics' style='max-width:100%'>",
    ]
    for bench, header, body in _tables(table):
        parts.append(
            f"<h2>{html.escape(TITLES[bench])}</h2><table><tr>"
            + "".join(f"<th>{html.escape(h)}</th>" for h in header)
            + "</tr>"
        )
        parts += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body]
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def bar_chart(table, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = [b for b in BENCHMARKS if b in table]
    fig, axes = plt.subplots(len(benches), 1, figsize=(10, 2.8 * len(benches)), squeeze=False)
    colors = {"pretrained": "#9e9e9e", "baseline": "#4c72b0", "sds": "#dd8452", "teacher": "#55a868"}
    for ax, bench in zip(axes[:, 0], benches):
        models = [m for m in MODELS if m in table[bench]]
        rows = [r for r in HEADLINE[bench] if any(table[bench][m]["rows"].get(r) is not None for m in models)]
        width = 0.8 / max(len(models), 1)
        for j, model in enumerate(models):
            values = [table[bench][model]["rows"].get(r) for r in rows]
            xs = [i + (j - (len(models) - 1) / 2) * width for i in range(len(rows))]
            ax.bar(xs, [0.0 if v is None else v for v in values], width, label=MODELS[model], color=colors[model])
        ax.set_xticks(
            range(len(rows)),
            [
                r.replace(".accuracy", "").replace(".macro_accuracy", "").replace(".precision_at_1", " P@1")
                for r in rows
            ],
            fontsize=8,
        )
        ax.set_ylim(0, 1)
        ax.set_title(TITLES[bench], fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=8, ncol=4, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": None})  # no version stamp: same numbers, same bytes
    plt.close(fig)


def write_report(metrics_dir: Path, out_dir: Path, summary: Path) -> dict[str, Any]:
    """Markdown + HTML + PNG under ``out_dir`` and the flat metrics JSON ``summary``."""
    table = collect(Path(metrics_dir))
    if not table:
        raise FileNotFoundError(f"{metrics_dir}: no {{benchmark}}_{{model}}.json metrics files (run sdsclip evaluate)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "evaluation.md").write_text(markdown(table) + "\n", encoding="utf-8")
    (out_dir / "evaluation.html").write_text(html_page(table) + "\n", encoding="utf-8")
    bar_chart(table, out_dir / "evaluation.png")
    flat = flat_metrics(table)
    write_json(Path(summary), flat)
    return {"benchmarks": sorted(table), "metrics": len(flat), "report": str(out_dir / "evaluation.md")}
