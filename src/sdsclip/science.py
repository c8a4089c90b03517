"""`sdsclip science`: does SDS-CLIP beat its control in the embedded world once there is room to? One report.

The experiment (params profile ``science``; knobs in the ``science`` section; docs/science.md "Headroom"):
  world -> ingest -> validate -> teacher pretraining -> teacher diagnostic ->
  two more renderings: Winoground-format training items for the oracle arms (science.oracle_train_seed) and
  held-out Winoground / ARO sets (science.holdout_seed) ->
  student pretraining (student.text_order_steps) -> student evaluation + diagnostic ->
  for seed in science.seeds, for each arm: fine-tune -> evaluate on the world's and the held-out sets ->
  with text_order_steps > 0 also the plain student's control and ladder (science.plain_student_ladder) ->
  report: means over seeds, paired differences against the control with item-bootstrap 95 % intervals,
  probe numbers from the training logs, cost per step, plot (report/science.{md,json,png}).

Arms (``experiment_arms``): the control (lambda 0); SDS-CLIP over science.lambdas x science.sds_gradients;
the mechanism probes at science.probe_lambda (sigma only, the teacher's best-binding timesteps, sigma first,
the whole image tower); the oracle ladder (sdsclip.headroom: hard negatives, (a) image LayerNorms, (b) image
tower, (c) NegCLIP, both towers).

The pretrained student and teacher are shared by every arm and seed: the question is what fine-tuning adds,
so seeds vary the fine-tuning (data order, (t, eps) draws, sigma's init), not the starting models. Every step
writes its output into ``science.workdir`` and is skipped when that output exists and was made from the same
params (``done.json`` with a hash of the params that made it), so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdsclip.config import Params, ScienceConfig, params_to_dict

#: (benchmark, row) -> label of the subsets the report shows, in order
SUBSETS = {
    ("winoground", "text_score"): "Winoground text",
    ("winoground", "image_score"): "Winoground image",
    ("winoground", "group_score"): "Winoground group",
    ("winoground", "collapsed_tag.Object.group_score"): "Wino group: object swap",
    ("winoground", "collapsed_tag.Relation.group_score"): "Wino group: attribute swap",
    ("winoground", "collapsed_tag.Object.text_score"): "Wino text: object swap",
    ("winoground", "collapsed_tag.Object.image_score"): "Wino image: object swap",
    ("winoground", "collapsed_tag.Relation.text_score"): "Wino text: attribute swap",
    ("aro", "vg_relation.macro_accuracy"): "ARO VG-Relation",
    ("aro", "vg_attribution.macro_accuracy"): "ARO VG-Attribution",
    ("aro", "coco_order.precision_at_1"): "ARO COCO-Order P@1",
    ("zeroshot", "acc1"): "Zero-shot acc@1",
    ("holdout_winoground", "collapsed_tag.Object.group_score"): "held-out Wino group: object swap",
    ("holdout_winoground", "collapsed_tag.Object.text_score"): "held-out Wino text: object swap",
    ("holdout_winoground", "collapsed_tag.Object.image_score"): "held-out Wino image: object swap",
    ("holdout_winoground", "collapsed_tag.Relation.group_score"): "held-out Wino group: attribute swap",
    ("holdout_aro", "vg_relation.macro_accuracy"): "held-out ARO VG-Relation",
    ("holdout_aro", "vg_attribution.macro_accuracy"): "held-out ARO VG-Attribution",
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
    marker.write_text(
        json.dumps({"key": digest, "seconds": round(time.time() - started, 1), "result": result}, indent=2, default=str)
        + "\n"
    )
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
    data = params.data.model_copy(
        update={
            "coco_root": str(world / "coco"),
            "winoground_dir": str(world / "winoground"),
            "aro_dir": str(world / "aro"),
            "zeroshot_dir": str(world / "zeroshot"),
        }
    )
    return params.model_copy(update={"data": data})


def arm_name(lam: float, gradient: str = "full") -> str:
    if lam == 0:
        return "control"
    return f"sds_lambda_{lam:g}" + ("" if gradient == "full" else f"_{gradient}")


#: ladder rung (science.ladder) -> arm name
ORACLE_ARMS = {
    "image_layernorms": "oracle_a_image_layernorms",
    "image_tower": "oracle_b_image_tower",
    "both_towers": "negclip_c_both_towers",
}


@dataclass
class Arm:
    """One fine-tuning recipe of the experiment: an SDS-CLIP / control run (``train`` overrides on the train
    section) or an oracle rung of the headroom ladder (``rung``)."""

    name: str
    lam: float = 0.0
    gradient: str = "full"
    train: dict[str, Any] = field(default_factory=dict)
    rung: str | None = None
    role: str = "sds"  # control | sds | probe | oracle


def best_binding_t_window(diagnostic: dict[str, Any], top: int = 3) -> dict[str, int] | None:
    """t_min / t_max around the ``top`` diagnostic timesteps where the teacher's object-swap text score is
    highest (ties: the larger swap effect); None without per-t rows."""
    from sdsclip.synth import WINOGROUND_OBJECT_TAG

    rows = [r for r in diagnostic.get("by_t") or [] if WINOGROUND_OBJECT_TAG in (r.get("by_tag") or {})]
    if not rows:
        return None
    best = sorted(
        rows, key=lambda r: (r["by_tag"][WINOGROUND_OBJECT_TAG]["text_score"], r["swap_effect"]), reverse=True
    )[:top]
    ts = [int(r["t"]) for r in best]
    return {"t_min": min(ts), "t_max": max(ts) + 1}


def experiment_arms(params: Params, diagnostic: dict[str, Any], log: Callable[[str], None] = print) -> list[Arm]:
    """control, the SDS sweep (lambdas x sds_gradients), the probes at probe_lambda, the oracle ladder."""
    sci = params.science
    arms = [Arm("control", role="control")]
    arms += [Arm(arm_name(lam, g), lam, g) for lam in sci.lambdas for g in sci.sds_gradients]
    lam = sci.probe_lambda or sci.lambdas[0]
    steps = params.train.steps or 4
    for probe in sci.probes:
        probe_settings: dict[str, dict[str, Any] | None] = {
            "sigma_only": {"trainable": "sigma_only"},
            "image_tower": {"trainable": "image_tower"},
            "sigma_first": {"sigma_first_steps": max(1, steps // 4)},
            "best_t": best_binding_t_window(diagnostic),
        }
        train = probe_settings[probe]
        if train is None:
            log("probe best_t skipped: the teacher diagnostic has no per-t rows")
            continue
        arms.append(Arm(f"probe_{probe}_lambda_{lam:g}", lam, "full", train, role="probe"))
    arms += [Arm(ORACLE_ARMS[rung], rung=rung, role="oracle") for rung in sci.ladder]
    return arms


def evaluate_student(
    params: Params, model: Path, out: Path, holdout: Path | None = None, oracle_train: Path | None = None
) -> dict[str, Any]:
    """Winoground, ARO and zero-shot metrics of one student, as {benchmark: report rows}; with ``holdout``
    also its Winoground / ARO (``holdout_winoground``, ``holdout_aro``). Under ``_items``: per-item Winoground
    results (for the paired bootstrap) and under ``_separation`` the student diagnostic (world set)."""
    from sdsclip import stages
    from sdsclip.diagnose import image_layout_probe, student_separation
    from sdsclip.evaluate.report import ROWS

    d = params.data
    results = {
        "winoground": stages.evaluate_winoground(params, model, Path(d.winoground_dir), out / "winoground.json"),
        "aro": stages.evaluate_aro(params, model, Path(d.aro_dir), out / "aro.json"),
        "zeroshot": stages.evaluate_zeroshot(params, model, Path(d.zeroshot_dir), out / "zeroshot.json"),
    }
    items = {"world": winoground_items(params, model, Path(d.winoground_dir))}
    if holdout is not None:
        results["holdout_winoground"] = stages.evaluate_winoground(
            params, model, holdout / "winoground", out / "holdout_winoground.json"
        )
        results["holdout_aro"] = stages.evaluate_aro(params, model, holdout / "aro", out / "holdout_aro.json")
        items["holdout"] = winoground_items(params, model, holdout / "winoground")
    rows: dict[str, Any] = {bench: ROWS[bench.removeprefix("holdout_")](m) for bench, m in results.items()}
    rows["_items"] = items
    rows["_separation"] = student_separation(params, model, Path(d.winoground_dir))
    if oracle_train is not None:
        rows["_layout_probe"] = image_layout_probe(params, model, oracle_train, Path(d.winoground_dir))
    return rows


def winoground_items(params: Params, model: Path, data_dir: Path) -> dict[str, list]:
    """Per item: tag and whether the text / image / group criterion holds (the official definitions)."""
    from sdsclip.evaluate.winoground import load_data, score_examples
    from sdsclip.scoring import load_scorer

    data = load_data(data_dir, params.eval.on_missing)
    s = score_examples(load_scorer(model, params), data).double()
    text = (s[:, 0, 0] > s[:, 1, 0]) & (s[:, 1, 1] > s[:, 0, 1])
    image = (s[:, 0, 0] > s[:, 0, 1]) & (s[:, 1, 1] > s[:, 1, 0])
    return {
        "tag": [e.tag for e in data.examples],
        "text": text.int().tolist(),
        "image": image.int().tolist(),
        "group": (text & image).int().tolist(),
    }


def training_curve(log_dir: Path) -> dict[str, Any]:
    """Probe numbers from a run's per-step logs (DVCLive TSVs): L_SDS over the first and last tenth of the
    steps and its fall, the mean gradient norms of each loss term, z's last mean / std."""
    metrics = Path(log_dir) / "plots" / "metrics"

    def column(name: str) -> list[float]:
        tsv = metrics / f"{name}.tsv"
        if not tsv.is_file():
            return []
        lines = tsv.read_text().splitlines()
        col = lines[0].split("\t").index(name) if lines else 0
        return [float(ln.split("\t")[col]) for ln in lines[1:] if ln.strip()]

    out: dict[str, Any] = {}
    sds = column("loss_sds")
    if sds and any(sds):
        k = max(1, len(sds) // 10)
        first, last = statistics.fmean(sds[:k]), statistics.fmean(sds[-k:])
        out.update(
            loss_sds_first=first,
            loss_sds_last=last,
            loss_sds_fall=first - last,
            loss_sds_relative_fall=(first - last) / first if first else None,
        )
    for name in (
        "grad_norm_clip_clip_params",
        "grad_norm_sds_clip_params",
        "grad_norm_clip_sigma",
        "grad_norm_sds_sigma",
    ):
        values = column(name)
        if values:
            out[name] = statistics.fmean(values)
    if out.get("grad_norm_clip_clip_params"):
        out["sds_to_clip_grad_ratio"] = out.get("grad_norm_sds_clip_params", 0.0) / out["grad_norm_clip_clip_params"]
    for name in ("z_mean", "z_std"):
        values = column(name)
        if values:
            out[name] = values[-1]
    return out


def _check_seeds(params: Params) -> None:
    from sdsclip.config import ConfigError

    sci = params.science
    if len({params.seed, sci.oracle_train_seed, sci.holdout_seed}) < 3:
        raise ConfigError(
            f"science: seed ({params.seed}), science.oracle_train_seed ({sci.oracle_train_seed}) and "
            f"science.holdout_seed ({sci.holdout_seed}) must differ: the oracle's training items and "
            "the held-out sets must not be the evaluation items"
        )


def run_science(params: Params, workdir: Path | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole experiment (see the module docstring); returns the summary the report is made from."""
    _check_seeds(params)
    sci = params.science
    work = Path(workdir or sci.workdir)
    params = experiment_params(params, work)
    full = params_to_dict(params)
    shards, validated, oracle_train, holdout = _render_and_ingest(params, work, full, log)
    data_key = [full["world"], params.seed, full["ingest"], full["validation"]]
    teacher_dir, teacher_key, diagnostic, shortcut = _teacher_and_diagnostics(
        params, work, full, shards, validated, data_key, log
    )
    experiment = _Experiment(
        work=work,
        sets=_Sets(shards, validated, teacher_dir, oracle_train / "winoground", holdout),
        data_key=data_key,
        teacher_key=teacher_key,
        eval_config=full["eval"],
        science=sci,
        log=log,
    )
    arms = experiment_arms(params, diagnostic, log)
    student_dir, pretrained, runs = _student_runs(experiment, params, arms)
    summary = summarize(runs, pretrained, diagnostic, params)
    summary["sds_shortcut"] = shortcut
    summary["student"] = {
        "dir": student_dir.name,
        "text_order_steps": params.student.text_order_steps,
        "text_order_weight": params.student.text_order_weight,
    }
    if params.student.text_order_steps > 0 and sci.plain_student_ladder:
        # The premise on the plain (bag-distinct, no text-order phase) student: its ladder and control only.
        plain = params.model_copy(update={"student": params.student.model_copy(update={"text_order_steps": 0})})
        plain_arms = [a for a in arms if a.role in ("control", "oracle")]
        plain_dir, plain_pre, plain_runs = _student_runs(experiment, plain, plain_arms)
        summary["plain_student"] = summarize(plain_runs, plain_pre, diagnostic, plain)
        summary["plain_student"]["student"] = {"dir": plain_dir.name, "text_order_steps": 0}
    write_report(summary, work / "report")
    return summary


def _render_and_ingest(
    params: Params, work: Path, full: dict[str, Any], log: Callable[[str], None]
) -> tuple[Path, Path, Path, Path]:
    """Render (cached) the world, the oracle's training items and the held-out sets; ingest and validate the world.

    Returns the shards, validated, oracle-train and held-out dirs."""
    from sdsclip import stages

    sci = params.science
    world, shards, validated = work / "world", work / "shards", work / "validated"
    _cached(world, [full["world"], params.seed], lambda: stages.synth(params, world), log)
    # Two more renderings with their own seeds: the oracle arms' training items, and the held-out sets.
    oracle_train, holdout = work / "oracle_train", work / "holdout"
    oracle_world = params.world.model_copy(update={"winoground_items": sci.oracle_train_items})
    _cached(
        oracle_train,
        [full["world"], sci.oracle_train_items, sci.oracle_train_seed],
        lambda: stages.synth(params, oracle_train, sci.oracle_train_seed, ["winoground"], oracle_world),
        log,
    )
    _cached(
        holdout,
        [full["world"], sci.holdout_seed],
        lambda: stages.synth(params, holdout, sci.holdout_seed, ["winoground", "aro"]),
        log,
    )
    _cached(
        shards, [full["world"], params.seed, full["ingest"]], lambda: stages.ingest(params, world / "coco", shards), log
    )
    _cached(
        validated,
        [full["world"], params.seed, full["ingest"], full["validation"]],
        lambda: stages.validate(params, shards, validated),
        log,
    )
    return shards, validated, oracle_train, holdout


def _teacher_and_diagnostics(
    params: Params,
    work: Path,
    full: dict[str, Any],
    shards: Path,
    validated: Path,
    data_key: list[Any],
    log: Callable[[str], None],
) -> tuple[Path, list[Any], dict[str, Any], dict[str, Any]]:
    """Pretrain (cached) the teacher, then its binding diagnostic and the SDS shortcut check.

    Pops the diagnostic-only keys from ``full["teacher"]``; returns the teacher dir, its cache key, the
    diagnostic and the shortcut check."""
    from sdsclip import stages
    from sdsclip.diagnose import sds_shortcut, teacher_binding, verdict_line

    sci = params.science
    teacher_dir = work / "models" / "teacher"
    # The diagnostic's pass rule changes no weights: it keys the diagnostic only, not the teacher or the arms.
    pass_rule = {k: full["teacher"].pop(k) for k in DIAGNOSTIC_ONLY if k in full["teacher"]}
    teacher_key = [data_key, full["teacher"], params.seed]
    _cached(
        teacher_dir,
        teacher_key,
        lambda: stages.pretrain_teacher(params, shards, validated, teacher_dir, work / "logs" / "teacher"),
        log,
    )
    diag_dir = work / "metrics" / "teacher_diagnostic"
    diagnostic = _cached(
        diag_dir,
        [teacher_key, full["eval"], sci.diagnose_items, pass_rule],
        lambda: teacher_binding(params, teacher_dir, Path(params.data.winoground_dir), sci.diagnose_items),
        log,
    )
    log(verdict_line(diagnostic))
    shortcut = _cached(
        work / "metrics" / "sds_shortcut",
        [teacher_key, full["eval"], sci.diagnose_items],
        lambda: sds_shortcut(params, teacher_dir, Path(params.data.winoground_dir), sci.diagnose_items),
        log,
    )
    return teacher_dir, teacher_key, diagnostic, shortcut


def _student_runs(
    experiment: _Experiment, p: Params, arms: list[Arm]
) -> tuple[Path, dict[str, Any], list[dict[str, Any]]]:
    """Pretrain (cached) the student ``p`` describes, evaluate it, run ``arms`` over the seeds."""
    from sdsclip import stages

    work, sets, sci, log = experiment.work, experiment.sets, experiment.science, experiment.log
    text_order = p.student.text_order_steps > 0
    student_dir = work / "models" / ("student_pretrained_text_order" if text_order else "student_pretrained")
    student_key = [experiment.data_key, params_to_dict(p)["student"], p.seed]
    _cached(
        student_dir,
        student_key,
        lambda: stages.pretrain_student(p, sets.shards, sets.validated, student_dir, work / "logs" / student_dir.name),
        log,
    )
    pre_dir = work / "metrics" / student_dir.name
    pretrained = _cached(
        pre_dir,
        [student_key, experiment.eval_config, sci.holdout_seed],
        lambda: evaluate_student(p, student_dir, pre_dir, sets.holdout, sets.oracle_train),
        log,
    )
    prefix = student_dir.name.removeprefix("student_pretrained").strip("_")
    runs = [
        run_arm(
            p,
            arm,
            seed,
            student_dir,
            sets,
            work / "runs" / prefix,
            work / "metrics" / prefix,
            work / "logs" / prefix,
            [student_key, experiment.teacher_key, experiment.eval_config],
            log,
        )
        for seed in sci.seeds
        for arm in arms
    ]
    return student_dir, pretrained, runs


@dataclass
class _Sets:
    shards: Path
    validated: Path
    teacher: Path
    oracle_train: Path
    holdout: Path


@dataclass
class _Experiment:
    """What every student's runs share: the work dir, the data and teacher, their cache keys and the log."""

    work: Path
    sets: _Sets
    data_key: list[Any]
    teacher_key: list[Any]
    eval_config: dict[str, Any]
    science: ScienceConfig
    log: Callable[[str], None]


def run_arm(
    params: Params,
    arm: Arm,
    seed: int,
    student_dir: Path,
    sets: _Sets,
    runs_root: Path,
    metrics_root: Path,
    logs_root: Path,
    models_key: list[Any],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Fine-tune (or reuse) one arm at one seed and evaluate it; the run's record for the summary."""
    from sdsclip import headroom, stages

    sci = params.science
    name = f"{arm.name}_seed{seed}"
    model_dir, metrics_dir, log_dir = runs_root / name, metrics_root / name, logs_root / name
    p = params.model_copy(
        update={
            "seed": seed,
            "train": params.train.model_copy(update={"lambda_sds": arm.lam, "sds_gradient": arm.gradient, **arm.train}),
        }
    )

    def fit_and_score():
        if arm.rung is not None:
            meta = headroom.oracle_finetune(
                student_dir,
                sets.oracle_train,
                model_dir,
                arm.rung,
                p.train.steps or 1,
                max(1, p.train.batch_size // 2),
                sci.oracle_lr,
                seed,
                p.train.warmup_steps,
            )
        else:
            meta = stages.train(
                p,
                student_dir,
                sets.teacher,
                sets.shards,
                sets.validated,
                model_dir,
                control=arm.lam == 0,
                log_dir=log_dir,
            )
        return {
            "train": {k: meta.get(k) for k in ("seconds", "seconds_per_step", "steps", "loss_clip", "loss_sds")},
            "curve": training_curve(log_dir) if arm.rung is None else {},
            "rows": evaluate_student(p, model_dir, metrics_dir, sets.holdout, sets.oracle_train),
        }

    full = params_to_dict(params)
    key = [models_key, full["train"], seed, arm.lam, sci.holdout_seed]
    key += [arm.gradient] if arm.gradient != "full" else []
    key += [arm.train] if arm.train else []
    key += [arm.rung, sci.oracle_lr, sci.oracle_train_items, sci.oracle_train_seed] if arm.rung else []
    result = _cached(metrics_dir, key, fit_and_score, log)
    return {
        "arm": arm.name,
        "role": arm.role,
        "lambda": arm.lam,
        "seed": seed,
        "sds_gradient": arm.gradient,
        "overrides": arm.train,
        "rung": arm.rung,
        **result,
    }


def _mean_std(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


#: (item set, tag, criterion) -> label of the paired-bootstrap rows
BOOTSTRAP_ROWS = {
    (s, tag, c): f"{'held-out ' if s == 'holdout' else ''}{short} {c}"
    for s in ("world", "holdout")
    for tag, short in (("Object-Swap", "object swap"), ("Attribute-Color", "attribute swap"))
    for c in ("text", "image", "group")
}


def paired_bootstrap(
    arm_items: dict[int, dict[str, Any]], control_items: dict[int, dict[str, Any]], samples: int = 2000, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Mean over seeds of the per-item difference arm - control (same seed), with a 95 % percentile interval
    from resampling the items (all seeds together, so the interval covers item sampling and seed noise in the
    paired difference)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    seeds = sorted(set(arm_items) & set(control_items))
    out: dict[str, dict[str, float]] = {}
    for (which, tag, criterion), label in BOOTSTRAP_ROWS.items():
        per_seed = []
        for s in seeds:
            a, c = arm_items[s].get(which), control_items[s].get(which)
            if not a or not c:
                break
            keep = [i for i, t in enumerate(a["tag"]) if t == tag]
            if not keep:
                break
            per_seed.append(np.asarray(a[criterion], float)[keep] - np.asarray(c[criterion], float)[keep])
        if not per_seed or len(per_seed) != len(seeds):
            continue
        d = np.mean(per_seed, axis=0)  # per item, over seeds
        boots = d[rng.integers(0, len(d), size=(samples, len(d)))].mean(1)
        lo, hi = np.percentile(boots, [2.5, 97.5])
        out[label] = {
            "mean": float(d.mean()),
            "lo": float(lo),
            "hi": float(hi),
            "items": int(len(d)),
            "seeds": len(seeds),
        }
    return out


def summarize(
    runs: list[dict[str, Any]], pretrained: dict[str, Any], diagnostic: dict[str, Any], params: Params
) -> dict[str, Any]:
    """Mean / std / min / max over seeds per arm and subset, the per-seed paired difference arm - control,
    item-bootstrap 95 % intervals of it, probe numbers from the training curves, and the cost per step."""
    arms = {arm: _arm_summary([r for r in runs if r["arm"] == arm]) for arm in dict.fromkeys(r["arm"] for r in runs)}
    paired, bootstrap = _paired_vs_control(runs, arms, params.science.bootstrap_samples)
    pre = {label: pretrained.get(bench, {}).get(row) for (bench, row), label in SUBSETS.items()}
    return {
        "arms": arms,
        "paired_vs_control": paired,
        "bootstrap_vs_control": bootstrap,
        "pretrained": pre,
        "pretrained_separation": pretrained.get("_separation"),
        "pretrained_layout_probe": pretrained.get("_layout_probe"),
        "runs": [{**r, "rows": {k: v for k, v in r["rows"].items() if k != "_items"}} for r in runs],
        "teacher_diagnostic": {k: diagnostic.get(k) for k in _DIAGNOSTIC_SUMMARY_KEYS},
        "best_t_window": best_binding_t_window(diagnostic),
        "settings": _summary_settings(params),
    }


#: the teacher diagnostic's entries the summary keeps
_DIAGNOSTIC_SUMMARY_KEYS = (
    "text_score",
    "image_score",
    "group_score",
    "swap_effect",
    "swap_effect_sem",
    "caption_effect",
    "swap_to_caption_ratio",
    "threshold_text_score",
    "each_tag",
    "failed_tags",
    "passed",
    "n",
    "by_tag",
    "by_t",
)


def _arm_summary(mine: list[dict[str, Any]]) -> dict[str, Any]:
    """One arm's runs (all its seeds) summarised over seeds."""
    subsets = {}
    for (bench, row), label in SUBSETS.items():
        values = [r["rows"].get(bench, {}).get(row) for r in mine]
        if all(v is not None for v in values):
            subsets[label] = _mean_std([float(v) for v in values])
    per_step = [r["train"]["seconds_per_step"] for r in mine if r["train"].get("seconds_per_step")]
    curve_keys = sorted({k for r in mine for k, v in (r.get("curve") or {}).items() if v is not None})
    curve = {
        k: _mean_std([float(r["curve"][k]) for r in mine if r.get("curve", {}).get(k) is not None]) for k in curve_keys
    }
    return {
        "lambda": mine[0]["lambda"],
        "role": mine[0].get("role", "sds"),
        "overrides": mine[0].get("overrides") or {},
        "rung": mine[0].get("rung"),
        "seeds": [r["seed"] for r in mine],
        "subsets": subsets,
        "curve": curve,
        "object_swap_separation": _object_swap_separation(mine),
        "seconds_per_step": _mean_std(per_step) if per_step else None,
    }


def _object_swap_separation(mine: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The student diagnostic on object swaps over one arm's seeds, with the layout probe when every run has it."""
    sep = [r["rows"].get("_separation", {}).get("by_tag", {}).get("Object-Swap") for r in mine]
    separation = (
        {
            k: _mean_std([float(s[k]) for s in sep])
            for k in ("text_cosine_distance", "image_cosine_distance", "captions_disagree", "images_disagree")
        }
        if sep and all(sep)
        else None
    )
    probes = [r["rows"].get("_layout_probe") for r in mine]
    if separation and probes and all(probes):
        separation["layout_probe_accuracy"] = _mean_std([float(pr["layout_probe_accuracy"]) for pr in probes])
    return separation


def _paired_vs_control(
    runs: list[dict[str, Any]], arms: dict[str, dict[str, Any]], bootstrap_samples: int
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Per arm but the control: the per-seed paired differences arm - control, and their item bootstrap."""
    control = {r["seed"]: r for r in runs if r["arm"] == "control"}
    paired: dict[str, dict[str, Any]] = {}
    bootstrap: dict[str, dict[str, Any]] = {}
    for arm in arms:
        if arm == "control":
            continue
        diffs = {}
        for (bench, row), label in SUBSETS.items():
            d = [
                r["rows"][bench][row] - control[r["seed"]]["rows"][bench][row]
                for r in runs
                if r["arm"] == arm
                and r["seed"] in control
                and r["rows"].get(bench, {}).get(row) is not None
                and control[r["seed"]]["rows"].get(bench, {}).get(row) is not None
            ]
            if d:
                diffs[label] = _mean_std(d)
        paired[arm] = diffs
        mine = {r["seed"]: r["rows"].get("_items") for r in runs if r["arm"] == arm and r["rows"].get("_items")}
        ctrl = {s: r["rows"].get("_items") for s, r in control.items() if r["rows"].get("_items")}
        if mine and ctrl:
            bootstrap[arm] = paired_bootstrap(mine, ctrl, bootstrap_samples)
    return paired, bootstrap


def _summary_settings(params: Params) -> dict[str, Any]:
    """The settings the summary records."""
    return {
        "profile": params.profile,
        "seeds": params.science.seeds,
        "lambdas": params.science.lambdas,
        "train_steps": params.train.steps,
        "train_batch_size": params.train.batch_size,
        "train_batching": params.train.batching,
        "student_batching": params.student.pretrain.batching,
        "student_text_order_steps": params.student.text_order_steps,
        "student_text_order_weight": params.student.text_order_weight,
        "student_steps": params.student.pretrain.steps,
        "teacher_steps": params.teacher.pretrain.steps,
        "oracle_lr": params.science.oracle_lr,
        "oracle_train_items": params.science.oracle_train_items,
        "oracle_train_seed": params.science.oracle_train_seed,
        "holdout_seed": params.science.holdout_seed,
    }


def _pm(s: dict[str, float] | None) -> str:
    return "—" if not s else f"{s['mean']:.3f} ± {s['std']:.3f}"


#: columns of the main table (labels of SUBSETS)
MAIN_COLUMNS = (
    "Wino text: object swap",
    "Wino image: object swap",
    "Wino group: object swap",
    "Wino group: attribute swap",
    "held-out Wino text: object swap",
    "held-out Wino image: object swap",
    "held-out Wino group: object swap",
    "ARO VG-Relation",
    "ARO VG-Attribution",
    "ARO COCO-Order P@1",
    "Zero-shot acc@1",
)
#: columns of the paired-difference table (labels of BOOTSTRAP_ROWS)
PAIRED_COLUMNS = (
    "object swap text",
    "object swap group",
    "held-out object swap text",
    "held-out object swap image",
    "held-out object swap group",
    "held-out attribute swap group",
)


def _describe(name: str, arm: dict[str, Any]) -> str:
    bits = [f"λ={arm['lambda']:g}"] if arm.get("role") in ("sds", "probe") else []
    bits += [f"{k}={v}" for k, v in (arm.get("overrides") or {}).items()]
    return f"{name} ({', '.join(bits)})" if bits else name


def markdown(summary: dict[str, Any]) -> str:
    """The science report (science.md) of a run_science summary."""
    arms = summary["arms"]
    cols = [c for c in MAIN_COLUMNS if any(c in a["subsets"] for a in arms.values())]
    lines = _premise_lines(summary)
    lines += _main_table_lines(summary, cols)
    lines += _paired_table_lines(summary, cols)
    lines += _mechanism_probe_lines(arms)
    lines += _shortcut_lines(summary)
    lines += _student_diagnostic_lines(summary)
    lines += _cost_lines(arms)
    lines += _plain_student_lines(summary)
    lines += _teacher_diagnostic_lines(summary)
    return "\n".join(lines)


def _pretrained_object_swap_separation(summary: dict[str, Any]) -> dict[str, Any] | None:
    """The pretrained student's text / image separation on object swaps, if the summary has it."""
    sep = summary.get("pretrained_separation") or {}
    return (sep.get("by_tag") or {}).get("Object-Swap")


def _premise_lines(summary: dict[str, Any]) -> list[str]:
    """Title, settings and the premises the comparison rests on."""
    diag = summary["teacher_diagnostic"]
    pre_obj = summary["pretrained"].get("Wino group: object swap")
    obj_sep = _pretrained_object_swap_separation(summary)
    lines = [
        "# SDS-CLIP vs control in the embedded world",
        "",
        f"Settings: {json.dumps(summary['settings'])}",
        "",
        "Premises:",
        "",
        f"- Student fails like CLIP: pretrained object-swap group score {pre_obj} (chance 1/6 ≈ 0.167): "
        f"{'yes' if pre_obj is not None and pre_obj <= 1 / 6 else 'NO'}.",
        f"- Teacher binds: {'yes' if diag.get('passed') else 'NO'} (diagnostic below).",
    ]
    if obj_sep:
        lines.append(
            f"- Room for an image-side method: the frozen text tower separates the two captions of an "
            f"object swap by cosine distance {obj_sep['text_cosine_distance']:.4f} (image tower, the two "
            f"images: {obj_sep['image_cosine_distance']:.4f}); the two captions prefer different images on "
            f"{obj_sep['captions_disagree']:.0%} of the items (an item's image score needs it)."
        )
    if not diag.get("passed"):
        lines.append(
            "- **The teacher fails its binding diagnostic, so this comparison cannot test the paper's "
            "claim: whatever SDS changes, it cannot be teaching word order the teacher does not know.**"
        )
    return lines


def _main_table_lines(summary: dict[str, Any], cols: list[str]) -> list[str]:
    """The main table: each arm's mean ± std over seeds, under the pretrained student."""
    arms = summary["arms"]
    lines: list[str] = []
    lines += [
        "",
        "Mean ± std over fine-tuning seeds (the pretrained student and teacher are shared by all runs; "
        "held-out: Winoground / ARO rendered with science.holdout_seed).",
        "",
        "| arm | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
        "| pretrained | "
        + " | ".join("—" if summary["pretrained"].get(c) is None else f"{summary['pretrained'][c]:.3f}" for c in cols)
        + " |",
    ]
    lines += [
        f"| {_describe(name, a)} | " + " | ".join(_pm(a["subsets"].get(c)) for c in cols) + " |"
        for name, a in arms.items()
    ]
    return lines


def _paired_table_lines(summary: dict[str, Any], cols: list[str]) -> list[str]:
    """The paired differences arm − control: bootstrap intervals if there are any, else over seeds."""
    lines: list[str] = []
    boot = summary.get("bootstrap_vs_control") or {}
    if boot:
        pcols = [c for c in PAIRED_COLUMNS if any(c in b for b in boot.values())]
        lines += [
            "",
            "Paired difference arm − control (same seed; per item, averaged over seeds), mean "
            "[95 % item-bootstrap interval]:",
            "",
            "| arm | " + " | ".join(pcols) + " |",
            "|---|" + "---|" * len(pcols),
        ]
        for name, b in boot.items():
            lines.append(
                f"| {name} | "
                + " | ".join(
                    "—" if c not in b else f"{b[c]['mean']:+.3f} [{b[c]['lo']:+.3f}, {b[c]['hi']:+.3f}]" for c in pcols
                )
                + " |"
            )
    else:
        lines += [
            "",
            "Paired difference arm − control (same seed), mean ± std [min, max]:",
            "",
            "| arm | " + " | ".join(cols) + " |",
            "|---|" + "---|" * len(cols),
        ]
        for name, diffs in summary["paired_vs_control"].items():
            lines.append(
                f"| {name} | "
                + " | ".join(
                    "—"
                    if c not in diffs
                    else f"{diffs[c]['mean']:+.3f} ± {diffs[c]['std']:.3f} "
                    f"[{diffs[c]['min']:+.3f}, {diffs[c]['max']:+.3f}]"
                    for c in cols
                )
                + " |"
            )
    return lines


def _mechanism_probe_lines(arms: dict[str, dict[str, Any]]) -> list[str]:
    """The mechanism probes from the training curves, for the arms that logged them."""
    lines: list[str] = []
    curves = {n: a for n, a in arms.items() if a.get("curve")}
    if curves:
        lines += [
            "",
            "Mechanism probes, from the training logs (mean over seeds): L_SDS over the first / last "
            "tenth of the steps; mean gradient norm of L_CLIP and of λ·L_SDS on the trainable CLIP "
            "parameters and on σ; z = σ(f(x)) at the last step.",
            "",
            "| arm | L_SDS first → last (fall) | ‖∇ L_CLIP‖ CLIP | ‖∇ λL_SDS‖ CLIP | SDS / CLIP | "
            "‖∇ L_CLIP‖ σ | ‖∇ λL_SDS‖ σ | z mean / std |",
            "|---|---|---|---|---|---|---|---|",
        ]

        def g(a, k, fmt="{:.2e}"):
            v = a["curve"].get(k)
            return "—" if v is None else fmt.format(v["mean"])

        for name, a in curves.items():
            c = a["curve"]
            fall = (
                "—"
                if "loss_sds_first" not in c
                else (
                    f"{c['loss_sds_first']['mean']:.4f} → {c['loss_sds_last']['mean']:.4f} "
                    f"({c['loss_sds_relative_fall']['mean']:+.1%})"
                    if "loss_sds_relative_fall" in c
                    else "—"
                )
            )
            lines.append(
                f"| {name} | {fall} | {g(a, 'grad_norm_clip_clip_params')} | "
                f"{g(a, 'grad_norm_sds_clip_params')} | {g(a, 'sds_to_clip_grad_ratio', '{:.3f}')} | "
                f"{g(a, 'grad_norm_clip_sigma')} | {g(a, 'grad_norm_sds_sigma')} | "
                f"{g(a, 'z_mean', '{:+.3f}')} / {g(a, 'z_std', '{:.3f}')} |"
            )
    return lines


def _shortcut_lines(summary: dict[str, Any]) -> list[str]:
    """The SDS shortcut check, if it ran."""
    lines: list[str] = []
    cut = summary.get("sds_shortcut")
    if cut:
        lines += [
            "",
            f"SDS shortcut check (teacher, {cut['images']} evaluation images, their true captions, the "
            f"diagnostic's draws): mean denoising error {cut['error_true_latent']:.4f} for the image's own "
            f"latent, {cut['error_swapped_caption']:.4f} under the swapped caption, "
            f"**{cut['error_blank_canvas']:.4f} for a blank canvas** (lower on "
            f"{cut['blank_beats_true_fraction']:.0%} of the images), {cut['error_mean_latent']:.4f} for the "
            f"mean latent. Data latents: mean {cut['latent_mean']:+.3f}, std {cut['latent_std']:.3f}; the "
            f"blank canvas is {cut['blank_latent_mean']:+.3f} everywhere.",
        ]
    return lines


def _student_diagnostic_lines(summary: dict[str, Any]) -> list[str]:
    """The student diagnostic on object swaps after fine-tuning, for the arms that have it."""
    arms = summary["arms"]
    obj_sep = _pretrained_object_swap_separation(summary)
    lines: list[str] = []
    seps = {n: a["object_swap_separation"] for n, a in arms.items() if a.get("object_swap_separation")}
    if seps:
        lines += [
            "",
            "Student diagnostic after fine-tuning, object swaps of the evaluation set (mean over seeds); "
            "layout probe: a linear read-out of the left / top object from the image embedding, fitted on "
            "the oracle's training images (bag-of-words ≈ 0.5, layout-aware → 1):",
            "",
            "| arm | text cos distance | image cos distance | captions prefer different images | "
            "images prefer different captions | layout probe |",
            "|---|---|---|---|---|---|",
        ]
        pre_probe = (summary.get("pretrained_layout_probe") or {}).get("layout_probe_accuracy")
        if obj_sep:
            lines.append(
                f"| pretrained | {obj_sep['text_cosine_distance']:.4f} | {obj_sep['image_cosine_distance']:.4f}"
                f" | {obj_sep['captions_disagree']:.2f} | {obj_sep['images_disagree']:.2f} | "
                f"{'—' if pre_probe is None else f'{pre_probe:.3f}'} |"
            )
        lines += [
            f"| {n} | {v['text_cosine_distance']['mean']:.4f} | {v['image_cosine_distance']['mean']:.4f} | "
            f"{v['captions_disagree']['mean']:.2f} | {v['images_disagree']['mean']:.2f} | "
            f"{_pm(v.get('layout_probe_accuracy'))} |"
            for n, v in seps.items()
        ]
    return lines


def _cost_lines(arms: dict[str, dict[str, Any]]) -> list[str]:
    """The cost per fine-tuning step of each arm."""
    lines = ["", "Cost per fine-tuning step (seconds, mean ± std over seeds; gradient-norm probe steps excluded):", ""]
    return lines + [f"- {a}: {_pm(arms[a]['seconds_per_step'])}" for a in arms]


def _plain_student_lines(summary: dict[str, Any]) -> list[str]:
    """The plain student's premise and ladder, if it ran."""
    lines: list[str] = []
    plain = summary.get("plain_student")
    if plain:
        psep = ((plain.get("pretrained_separation") or {}).get("by_tag") or {}).get("Object-Swap")
        lines += ["", "## The plain student (student.text_order_steps 0): premise and ladder", ""]
        if psep:
            lines.append(
                f"Its text tower separates the two captions of an object swap by cosine distance "
                f"{psep['text_cosine_distance']:.4f} (min {psep['text_cosine_distance_min']:.4f}; the two "
                f"images: {psep['image_cosine_distance']:.4f}); the captions prefer different images on "
                f"{psep['captions_disagree']:.0%} of the items, the images different captions on "
                f"{psep['images_disagree']:.0%}."
            )
        pcols = [c for c in MAIN_COLUMNS if any(c in a["subsets"] for a in plain["arms"].values())]
        lines += [
            "",
            "| arm | " + " | ".join(pcols) + " |",
            "|---|" + "---|" * len(pcols),
            "| pretrained | "
            + " | ".join("—" if plain["pretrained"].get(c) is None else f"{plain['pretrained'][c]:.3f}" for c in pcols)
            + " |",
        ]
        lines += [
            f"| {n} | " + " | ".join(_pm(a["subsets"].get(c)) for c in pcols) + " |" for n, a in plain["arms"].items()
        ]
    return lines


def _teacher_diagnostic_lines(summary: dict[str, Any]) -> list[str]:
    """The teacher diagnostic's closing paragraph."""
    diag = summary["teacher_diagnostic"]
    lines: list[str] = []
    ratio = diag.get("swap_to_caption_ratio")
    window = summary.get("best_t_window")
    lines += [
        "",
        f"Teacher diagnostic ({diag.get('n')} items): text score {diag.get('text_score'):.3f}, "
        f"caption-swap effect {diag.get('swap_effect'):.2e} (± {diag.get('swap_effect_sem'):.1e} s.e.m.; "
        f"{'n/a' if ratio is None else f'{ratio:.1%}'} of the caption effect {diag.get('caption_effect'):.2e}), "
        f"{'PASS' if diag.get('passed') else 'FAIL'} at text score ≥ {diag.get('threshold_text_score')}"
        f"{' overall and on each tag' if diag.get('each_tag') else ''}."
        + "".join(
            f" {tag}: text score {row['text_score']:.3f}, swap effect {row['swap_effect']:.2e}."
            for tag, row in (diag.get("by_tag") or {}).items()
        )
        + (f" Below the threshold: {', '.join(diag['failed_tags'])}." if diag.get("failed_tags") else "")
        + (f" Best-binding timesteps (probe best_t): [{window['t_min']}, {window['t_max']})." if window else ""),
        "",
    ]
    return lines


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = summary["arms"]
    labels = [c for c in MAIN_COLUMNS if any(c in a["subsets"] for a in arms.values())]
    boot = summary.get("bootstrap_vs_control") or {}
    fig, axes = plt.subplots(2 if boot else 1, 1, figsize=(13, 8.5 if boot else 4.5), squeeze=False)
    ax = axes[0][0]
    width = 0.8 / (len(arms) + 1)
    xs = range(len(labels))
    pre = [summary["pretrained"].get(label) or 0.0 for label in labels]
    ax.bar([x - 0.4 + width / 2 for x in xs], pre, width, label="pretrained", color="#9e9e9e")
    for j, (arm, a) in enumerate(arms.items(), start=1):
        means = [a["subsets"].get(label, {}).get("mean", 0.0) for label in labels]
        lo = [max(0.0, m - a["subsets"].get(label, {}).get("min", m)) for m, label in zip(means, labels)]
        hi = [max(0.0, a["subsets"].get(label, {}).get("max", m) - m) for m, label in zip(means, labels)]
        ax.bar([x - 0.4 + width / 2 + j * width for x in xs], means, width, yerr=[lo, hi], capsize=1, label=arm)
    ax.set_xticks(list(xs), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1.3)
    ax.set_ylabel("score")
    ax.set_title("bars: mean over fine-tuning seeds; whiskers: min–max", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=5, loc="upper center")
    if boot:
        ax = axes[1][0]
        cols = [c for c in PAIRED_COLUMNS if any(c in b for b in boot.values())]
        width = 0.8 / max(1, len(boot))
        for j, (arm, b) in enumerate(boot.items()):
            means = [b.get(c, {}).get("mean", 0.0) for c in cols]
            err = [
                [m - b.get(c, {}).get("lo", m) for m, c in zip(means, cols)],
                [b.get(c, {}).get("hi", m) - m for m, c in zip(means, cols)],
            ]
            ax.bar(
                [x - 0.4 + width / 2 + j * width for x in range(len(cols))],
                means,
                width,
                yerr=err,
                capsize=1,
                label=arm,
            )
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(list(range(len(cols))), cols, rotation=15, ha="right", fontsize=8)
        ax.set_ylabel("arm − control")
        ax.set_title("paired difference vs the control; whiskers: 95 % item-bootstrap interval", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)


def write_report(summary: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "science.json", "md": out_dir / "science.md", "png": out_dir / "science.png"}
    paths["json"].write_text(json.dumps(summary, indent=2, default=str) + "\n")
    paths["md"].write_text(markdown(summary))
    plot(summary, paths["png"])
    return paths
