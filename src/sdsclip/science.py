"""`sdsclip science`: does SDS-CLIP beat its control in the embedded world? Seeds x lambda, one report.

The experiment (params profile ``science``; knobs in the ``science`` section):
  world -> ingest -> validate -> pretrain student + teacher (once) -> teacher diagnostic ->
  for seed in science.seeds, lambda in [0, *science.lambdas]: fine-tune (lambda 0 is the control) ->
  Winoground / ARO / zero-shot on the world -> report (mean +- std over seeds per subset, PNG plot).

The pretrained student and teacher are shared by every arm and seed: the question is what fine-tuning adds,
so seeds vary the fine-tuning (data order, (t, eps) draws, sigma's init), not the starting models; the
spread in the report is therefore fine-tuning noise only (stated in the report). Every step writes its output
into ``science.workdir`` and is skipped when that output exists and was made from the same params
(``done.json`` with a hash of the params that made it), so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

from sdsclip.config import Params, params_to_dict

#: (benchmark, row) -> label of the subsets the report shows, in order
SUBSETS = {
    ("winoground", "text_score"): "Winoground text",
    ("winoground", "image_score"): "Winoground image",
    ("winoground", "group_score"): "Winoground group",
    ("winoground", "collapsed_tag.Object.group_score"): "Wino group: object swap",
    ("winoground", "collapsed_tag.Relation.group_score"): "Wino group: attribute swap",
    ("winoground", "collapsed_tag.Object.text_score"): "Wino text: object swap",
    ("winoground", "collapsed_tag.Relation.text_score"): "Wino text: attribute swap",
    ("aro", "vg_relation.macro_accuracy"): "ARO VG-Relation",
    ("aro", "vg_attribution.macro_accuracy"): "ARO VG-Attribution",
    ("aro", "coco_order.precision_at_1"): "ARO COCO-Order P@1",
    ("zeroshot", "acc1"): "Zero-shot acc@1",
}


#: teacher knobs that only decide whether the diagnostic passes
DIAGNOSTIC_ONLY = ("binding_min_text_score", "binding_each_tag")


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cached(out: Path, key: Any, make: Callable[[], Any], log: Callable[[str], None]) -> Any:
    """Run ``make`` unless ``out/done.json`` records the same key (then return what it recorded)."""
    marker = out / "done.json"
    digest = _hash(key)
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("key") == digest:
            log(f"reuse {out}")
            return done.get("result")
    log(f"run   {out}")
    started = time.time()
    result = make()
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"key": digest, "seconds": round(time.time() - started, 1), "result": result},
                                 indent=2, default=str) + "\n")
    return result


def load_science_params(path: Path, profile: str | None = "science") -> Params:
    """params.yaml with ``profile`` (default: science) in place of its own; None keeps the file's."""
    import yaml

    from sdsclip.config import ConfigError, load_params, params_from_dict

    if profile is None:
        return load_params(path)
    load_params(path)  # the file's own errors first, with its line numbers
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return params_from_dict({**raw, "profile": profile}, str(path))


def experiment_params(params: Params, workdir: Path) -> Params:
    """``params`` with the data paths pointed into the experiment's own world."""
    world = workdir / "world"
    data = params.data.model_copy(update={
        "coco_root": str(world / "coco"), "winoground_dir": str(world / "winoground"),
        "aro_dir": str(world / "aro"), "zeroshot_dir": str(world / "zeroshot")})
    return params.model_copy(update={"data": data})


def arm_name(lam: float, gradient: str = "full") -> str:
    if lam == 0:
        return "control"
    return f"sds_lambda_{lam:g}" + ("" if gradient == "full" else f"_{gradient}")


def evaluate_student(params: Params, model: Path, out: Path) -> dict[str, dict[str, Any]]:
    """Winoground, ARO and zero-shot metrics of one student, as {benchmark: report rows}."""
    from sdsclip import stages
    from sdsclip.evaluate.report import ROWS

    d = params.data
    results = {
        "winoground": stages.evaluate_winoground(params, model, Path(d.winoground_dir), out / "winoground.json"),
        "aro": stages.evaluate_aro(params, model, Path(d.aro_dir), out / "aro.json"),
        "zeroshot": stages.evaluate_zeroshot(params, model, Path(d.zeroshot_dir), out / "zeroshot.json"),
    }
    return {bench: ROWS[bench](m) for bench, m in results.items()}


def run_science(params: Params, workdir: Path | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole experiment (see the module docstring); returns the summary the report is made from."""
    from sdsclip import stages
    from sdsclip.diagnose import teacher_binding, verdict_line

    sci = params.science
    work = Path(workdir or sci.workdir)
    params = experiment_params(params, work)
    full = params_to_dict(params)
    world, shards, validated = work / "world", work / "shards", work / "validated"
    _cached(world, [full["world"], params.seed], lambda: stages.synth(params, world), log)
    _cached(shards, [full["world"], params.seed, full["ingest"]],
            lambda: stages.ingest(params, world / "coco", shards), log)
    _cached(validated, [full["world"], params.seed, full["ingest"], full["validation"]],
            lambda: stages.validate(params, shards, validated), log)
    data_key = [full["world"], params.seed, full["ingest"], full["validation"]]
    student_dir, teacher_dir = work / "models" / "student_pretrained", work / "models" / "teacher"
    _cached(student_dir, [data_key, full["student"], params.seed],
            lambda: stages.pretrain_student(params, shards, validated, student_dir, work / "logs" / "student"), log)
    # The diagnostic's pass rule changes no weights: it keys the diagnostic only, not the teacher or the arms.
    pass_rule = {k: full["teacher"].pop(k) for k in DIAGNOSTIC_ONLY if k in full["teacher"]}
    _cached(teacher_dir, [data_key, full["teacher"], params.seed],
            lambda: stages.pretrain_teacher(params, shards, validated, teacher_dir, work / "logs" / "teacher"), log)
    models_key = [data_key, full["student"], full["teacher"], params.seed]
    diag_dir = work / "metrics" / "teacher_diagnostic"
    diagnostic = _cached(diag_dir, [models_key, full["eval"], sci.diagnose_items, pass_rule],
                         lambda: teacher_binding(params, teacher_dir, Path(params.data.winoground_dir),
                                                 sci.diagnose_items), log)
    log(verdict_line(diagnostic))
    pre_dir = work / "metrics" / "pretrained"
    pretrained = _cached(pre_dir, [models_key, full["eval"]],
                         lambda: evaluate_student(params, student_dir, pre_dir), log)
    runs: list[dict[str, Any]] = []
    for seed in sci.seeds:
        arms = [(0.0, "full")] + [(lam, g) for lam in sci.lambdas for g in sci.sds_gradients]
        for lam, gradient in arms:
            name = f"{arm_name(lam, gradient)}_seed{seed}"
            run_params = params.model_copy(update={
                "seed": seed, "train": params.train.model_copy(update={"lambda_sds": lam,
                                                                       "sds_gradient": gradient})})
            model_dir, metrics_dir = work / "runs" / name, work / "metrics" / name

            def fit_and_score(p=run_params, model_dir=model_dir, metrics_dir=metrics_dir, lam=lam):
                meta = stages.train(p, student_dir, teacher_dir, shards, validated, model_dir, control=lam == 0,
                                    log_dir=work / "logs" / model_dir.name)
                return {"train": {k: meta.get(k) for k in ("seconds", "seconds_per_step", "steps", "loss_clip",
                                                           "loss_sds")},
                        "rows": evaluate_student(p, model_dir, metrics_dir)}

            key = [models_key, full["train"], full["eval"], seed, lam] + ([gradient] if gradient != "full" else [])
            result = _cached(metrics_dir, key, fit_and_score, log)
            runs.append({"arm": arm_name(lam, gradient), "lambda": lam, "seed": seed, "sds_gradient": gradient,
                         **result})
    summary = summarize(runs, pretrained, diagnostic, params)
    write_report(summary, work / "report")
    return summary


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def summarize(runs: list[dict[str, Any]], pretrained: dict[str, Any], diagnostic: dict[str, Any],
              params: Params) -> dict[str, Any]:
    """Mean / std / min / max over seeds per arm and subset, the per-seed paired difference SDS - control,
    and the measured cost per step of each arm."""
    arms: dict[str, dict[str, Any]] = {}
    for arm in dict.fromkeys(r["arm"] for r in runs):
        mine = [r for r in runs if r["arm"] == arm]
        subsets = {}
        for (bench, row), label in SUBSETS.items():
            values = [r["rows"].get(bench, {}).get(row) for r in mine]
            if all(v is not None for v in values):
                subsets[label] = _mean_std([float(v) for v in values])
        per_step = [r["train"]["seconds_per_step"] for r in mine if r["train"].get("seconds_per_step")]
        arms[arm] = {"lambda": mine[0]["lambda"], "seeds": [r["seed"] for r in mine], "subsets": subsets,
                     "seconds_per_step": _mean_std(per_step) if per_step else None}
    control = {r["seed"]: r for r in runs if r["arm"] == "control"}
    paired: dict[str, dict[str, Any]] = {}
    for arm in arms:
        if arm == "control":
            continue
        diffs = {}
        for (bench, row), label in SUBSETS.items():
            d = [r["rows"][bench][row] - control[r["seed"]]["rows"][bench][row] for r in runs
                 if r["arm"] == arm and r["seed"] in control and r["rows"].get(bench, {}).get(row) is not None
                 and control[r["seed"]]["rows"].get(bench, {}).get(row) is not None]
            if d:
                diffs[label] = _mean_std(d)
        paired[arm] = diffs
    pre = {label: pretrained.get(bench, {}).get(row) for (bench, row), label in SUBSETS.items()}
    return {"arms": arms, "paired_vs_control": paired, "pretrained": pre, "runs": runs,
            "teacher_diagnostic": {k: diagnostic.get(k) for k in (
                "text_score", "image_score", "group_score", "swap_effect", "swap_effect_sem", "caption_effect",
                "swap_to_caption_ratio", "threshold_text_score", "each_tag", "failed_tags", "passed", "n", "by_tag",
                "by_t")},
            "settings": {"profile": params.profile, "seeds": params.science.seeds,
                         "lambdas": params.science.lambdas, "train_steps": params.train.steps,
                         "train_batch_size": params.train.batch_size, "train_batching": params.train.batching,
                         "student_batching": params.student.pretrain.batching,
                         "student_steps": params.student.pretrain.steps, "teacher_steps": params.teacher.pretrain.steps}}


def _pm(s: dict[str, float] | None) -> str:
    return "—" if not s else f"{s['mean']:.3f} ± {s['std']:.3f}"


def markdown(summary: dict[str, Any]) -> str:
    arms = summary["arms"]
    names = list(arms)
    diag = summary["teacher_diagnostic"]
    lines = ["# SDS-CLIP vs control in the embedded world", "",
             f"Settings: {json.dumps(summary['settings'])}", "",
             "Mean ± std over fine-tuning seeds (the pretrained student and teacher are shared by all runs).", "",
             "| subset | pretrained | " + " | ".join(f"{a} (λ={arms[a]['lambda']:g})" for a in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for label in SUBSETS.values():
        if not any(label in arms[a]["subsets"] for a in names):
            continue
        pre = summary["pretrained"].get(label)
        lines.append(f"| {label} | {'—' if pre is None else f'{pre:.3f}'} | "
                     + " | ".join(_pm(arms[a]["subsets"].get(label)) for a in names) + " |")
    lines += ["", "Paired difference SDS − control (same seed), mean ± std [min, max]:", "",
              "| subset | " + " | ".join(summary["paired_vs_control"]) + " |",
              "|---|" + "---|" * len(summary["paired_vs_control"])]
    for label in SUBSETS.values():
        cells = []
        for arm, diffs in summary["paired_vs_control"].items():
            d = diffs.get(label)
            cells.append("—" if not d else f"{d['mean']:+.3f} ± {d['std']:.3f} [{d['min']:+.3f}, {d['max']:+.3f}]")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Cost per fine-tuning step (seconds, mean ± std over seeds):", ""]
    lines += [f"- {a}: {_pm(arms[a]['seconds_per_step'])}" for a in names]
    pre_obj = summary["pretrained"].get("Wino group: object swap")
    premises = [f"- Student fails like CLIP: pretrained object-swap group score {pre_obj} (chance 1/6 ≈ 0.167): "
                f"{'yes' if pre_obj is not None and pre_obj <= 1 / 6 else 'NO'}.",
                f"- Teacher binds: {'yes' if diag.get('passed') else 'NO'} (diagnostic below)."]
    if not diag.get("passed"):
        premises.append("- **The teacher fails its binding diagnostic, so this comparison cannot test the paper's "
                        "claim: whatever SDS changes, it cannot be teaching word order the teacher does not know.**")
    lines[4:4] = ["Premises:", "", *premises, ""]
    ratio = diag.get("swap_to_caption_ratio")
    lines += ["", f"Teacher diagnostic ({diag.get('n')} items): text score {diag.get('text_score'):.3f}, "
              f"caption-swap effect {diag.get('swap_effect'):.2e} (± {diag.get('swap_effect_sem'):.1e} s.e.m.; "
              f"{'n/a' if ratio is None else f'{ratio:.1%}'} of the caption effect {diag.get('caption_effect'):.2e}), "
              f"{'PASS' if diag.get('passed') else 'FAIL'} at text score ≥ {diag.get('threshold_text_score')}"
              f"{' overall and on each tag' if diag.get('each_tag') else ''}."
              + "".join(f" {tag}: text score {row['text_score']:.3f}, swap effect {row['swap_effect']:.2e}."
                        for tag, row in (diag.get("by_tag") or {}).items())
              + (f" Below the threshold: {', '.join(diag['failed_tags'])}." if diag.get("failed_tags") else ""), ""]
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = summary["arms"]
    labels = [label for label in SUBSETS.values() if any(label in a["subsets"] for a in arms.values())]
    fig, ax = plt.subplots(figsize=(12, 4.2))
    width = 0.8 / (len(arms) + 1)
    xs = range(len(labels))
    pre = [summary["pretrained"].get(label) or 0.0 for label in labels]
    ax.bar([x - 0.4 + width / 2 for x in xs], pre, width, label="pretrained", color="#9e9e9e")
    for j, (arm, a) in enumerate(arms.items(), start=1):
        means = [a["subsets"].get(label, {}).get("mean", 0.0) for label in labels]
        lo = [max(0.0, m - a["subsets"].get(label, {}).get("min", m)) for m, label in zip(means, labels)]
        hi = [max(0.0, a["subsets"].get(label, {}).get("max", m) - m) for m, label in zip(means, labels)]
        ax.bar([x - 0.4 + width / 2 + j * width for x in xs], means, width, yerr=[lo, hi], capsize=2,
               label=f"{arm} (λ={a['lambda']:g})")
    ax.set_xticks(list(xs), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("score")
    ax.set_title("bars: mean over fine-tuning seeds; whiskers: min–max", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=len(arms) + 1, loc="upper center")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def write_report(summary: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "science.json", "md": out_dir / "science.md", "png": out_dir / "science.png"}
    paths["json"].write_text(json.dumps(summary, indent=2, default=str) + "\n")
    paths["md"].write_text(markdown(summary))
    plot(summary, paths["png"])
    return paths
