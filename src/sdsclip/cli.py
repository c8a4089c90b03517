"""`sdsclip` command line: one subcommand per pipeline stage (DVC runs these; see dvc.yaml).

Every subcommand reads the knobs from params.yaml (``--params`` to use another file); paths are the
only arguments. Expected failures (bad params, bad data, missing models) print one line and exit 2.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(
    help="SDS-CLIP: fine-tune CLIP with a diffusion teacher's score (Basu et al., arXiv 2307.09233).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
evaluate_app = typer.Typer(help="Evaluate a student or the teacher on a benchmark.", no_args_is_help=True)
pipeline_app = typer.Typer(
    help="The Kubeflow (kfp v2) pipeline: compile it, submit or schedule runs.", no_args_is_help=True
)
app.add_typer(evaluate_app, name="evaluate")
app.add_typer(pipeline_app, name="pipeline")

err_console = Console(stderr=True)
console = Console()

ParamsOpt = typer.Option(Path("params.yaml"), "--params", "-p", help="params file with every knob")


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a stage reports as one line: every module's error derives from sdsclip.errors.UserError."""
    from sdsclip.errors import UserError

    return (UserError, FileNotFoundError)


@contextmanager
def _stage(name: str):
    """Run a stage: user errors become one red line and exit code 2 instead of a traceback."""
    try:
        yield
    except _user_errors() as err:
        err_console.print(f"[red]sdsclip {name}: error:[/red] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _params(path: Path):
    from sdsclip.config import load_params

    return load_params(path)


def _done(result) -> None:
    console.print_json(json.dumps(result, default=str))


@app.command()
def synth(
    out: Path = typer.Option(..., help="output dir for the synthetic world"),
    seed: int | None = typer.Option(None, help="world seed (default: params seed)"),
    params: Path = ParamsOpt,
):
    """Render the synthetic compositional world (../shared/toyworld.md) in COCO / Winoground / ARO /
    ImageFolder formats. Same seed => byte-identical files."""
    from sdsclip import stages

    with _stage("synth"):
        _done(stages.synth(_params(params), out, seed))


@app.command()
def ingest(
    coco_root: str = typer.Option(
        ..., help="dir or fsspec URL with annotations/captions_{split}.json and images/{split}/ (or {split}/)"
    ),
    out: str = typer.Option(..., help="output dir or fsspec URL: {split}/shard-*.tar + manifest.csv"),
    metrics: Path | None = typer.Option(None, help="also write the per-split counts here (DVC metrics JSON)"),
    params: Path = ParamsOpt,
):
    """COCO captions JSON + images -> WebDataset tar shards + a manifest (source sha256, conversion) + a
    quarantine with reason codes. Resumable: a re-run keeps finished shards."""
    from sdsclip import stages

    with _stage("ingest"):
        _done(stages.ingest(_params(params), coco_root, out, metrics))


@app.command()
def validate(
    shards: str = typer.Option(..., help="ingest output dir or fsspec URL"),
    out: str = typer.Option(
        ..., help="output dir or fsspec URL: {split}/accepted.csv, quarantine.csv, data_docs/ ..., data_docs.html"
    ),
    metrics: Path | None = typer.Option(None, help="also write the per-split metrics here (DVC metrics JSON)"),
    params: Path = ParamsOpt,
):
    """Great Expectations suite over each manifest; quarantines failing records with a reason, writes GX Data
    Docs, and fails when the rejected fraction exceeds validation.max_rejected_fraction."""
    from sdsclip import stages

    with _stage("validate"):
        _done(stages.validate(_params(params), shards, out, metrics))


@app.command("pretrain-student")
def pretrain_student(
    shards: Path = typer.Option(..., help="ingest output dir"),
    validated: Path = typer.Option(..., help="validate output dir"),
    out: Path = typer.Option(..., help="student dir to write"),
    log_dir: Path | None = typer.Option(None, help="DVCLive dir for loss curves (default OUT/dvclive)"),
    params: Path = ParamsOpt,
):
    """Contrastive CLIP pretraining from scratch on the pretrain split (embedded default), or verify and
    hash student.checkpoint (real path)."""
    from sdsclip import stages

    with _stage("pretrain-student"):
        _done(stages.pretrain_student(_params(params), shards, validated, out, log_dir))


@app.command("pretrain-teacher")
def pretrain_teacher(
    shards: Path = typer.Option(..., help="ingest output dir"),
    validated: Path = typer.Option(..., help="validate output dir"),
    out: Path = typer.Option(..., help="teacher dir to write"),
    log_dir: Path | None = typer.Option(None, help="DVCLive dir for loss curves (default OUT/dvclive)"),
    params: Path = ParamsOpt,
):
    """Text-conditioned denoising pretraining of the tiny teacher (embedded default), or verify and hash
    the Stable Diffusion dir teacher.pretrained_dir (real path)."""
    from sdsclip import stages

    with _stage("pretrain-teacher"):
        _done(stages.pretrain_teacher(_params(params), shards, validated, out, log_dir))


@app.command()
def train(
    student: Path = typer.Option(..., help="pretrained student dir"),
    teacher: Path = typer.Option(..., help="teacher dir"),
    shards: Path = typer.Option(..., help="ingest output dir"),
    validated: Path = typer.Option(..., help="validate output dir"),
    out: Path = typer.Option(..., help="fine-tuned student dir to write"),
    control: bool = typer.Option(False, "--control", help="lambda = 0: the contrastive-only baseline"),
    log_dir: Path | None = typer.Option(None, help="DVCLive dir for loss curves (default OUT/dvclive)"),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="continue from the newest checkpoint in --checkpoint-dir "
        "(same params and inputs only); none there: start from step 0",
    ),
    checkpoint_dir: Path | None = typer.Option(
        None,
        help="resumable checkpoints every train.checkpoint_every steps (default OUT/checkpoints, "
        "deleted after success)",
    ),
    params: Path = ParamsOpt,
):
    """SDS-CLIP fine-tuning: L_CLIP + lambda * L_SDS, only the image tower's LayerNorms + sigma train.

    Multi-process (DDP): `torchrun --nproc-per-node N -m sdsclip.cli train ...`, `accelerate launch`, or a
    Kubeflow PyTorchJob (MASTER_ADDR / WORLD_SIZE / RANK / PET_* are read); train.batch_size is global."""
    from sdsclip import stages

    with _stage("train"):
        result = stages.train(
            _params(params),
            student,
            teacher,
            shards,
            validated,
            out,
            control,
            log_dir,
            resume=resume,
            checkpoint_dir=checkpoint_dir,
        )
        from accelerate import PartialState

        if PartialState().is_main_process:
            _done(result)


@evaluate_app.command("winoground")
def evaluate_winoground(
    data: Path = typer.Option(..., help="Winoground dir: examples.jsonl + images/, or the Hugging Face *.parquet"),
    model: Path = typer.Option(..., help="student dir or teacher dir"),
    out: Path = typer.Option(..., help="metrics JSON to write"),
    scores: Path | None = typer.Option(None, help="also write per-pair scores (official JSONL form)"),
    params: Path = ParamsOpt,
):
    """Winoground text / image / group score (strict >), overall and per collapsed_tag, num_main_preds and
    secondary_tag (the official statistics script's subsets)."""
    from sdsclip import stages

    with _stage("evaluate winoground"):
        result = stages.evaluate_winoground(_params(params), model, data, out, scores)
        console.print(
            f"{model}: text {result['text_score']:.3f}  image {result['image_score']:.3f}  "
            f"group {result['group_score']:.3f}  (n={result['n']})"
        )


@evaluate_app.command("aro")
def evaluate_aro(
    data: Path = typer.Option(
        ...,
        help="ARO dir: visual_genome_{relation,attribution}.json + images/, "
        "coco_karpathy_test.json, flickr30k_test.json (each dataset present is evaluated)",
    ),
    model: Path = typer.Option(..., help="student dir or teacher dir"),
    out: Path = typer.Option(..., help="metrics JSON to write"),
    dataset: list[str] = typer.Option([], help="only these: vg_relation, vg_attribution, coco_order, flickr30k_order"),
    coco_dir: Path | None = typer.Option(None, help="COCO root with coco_karpathy_test.json (default: --data)"),
    flickr_dir: Path | None = typer.Option(None, help="Flickr30k root with flickr30k_test.json (default: --data)"),
    params: Path = ParamsOpt,
):
    """ARO with the repository's rules: VG-Relation / VG-Attribution macro accuracy, COCO-/Flickr30k-Order
    Precision@1 over the four word-order perturbations (POS tagger: eval.aro_pos_tagger)."""
    from sdsclip import stages

    dirs = {k: v for k, v in (("coco_order", coco_dir), ("flickr30k_order", flickr_dir)) if v is not None}
    with _stage("evaluate aro"):
        result = stages.evaluate_aro(_params(params), model, data, out, dataset, dirs)
        values = {d: result[d].get("macro_accuracy", result[d].get("precision_at_1")) for d in result["datasets"]}
        console.print(f"{model}: " + "  ".join(f"{d} {'n/a' if v is None else f'{v:.3f}'}" for d, v in values.items()))


@evaluate_app.command("zeroshot")
def evaluate_zeroshot(
    data: Path = typer.Option(
        ..., help="ImageFolder root, or the dir holding cifar-10-batches-py/ or cifar-100-python/"
    ),
    model: Path = typer.Option(..., help="student dir or teacher dir"),
    out: Path = typer.Option(..., help="metrics JSON to write"),
    prompt_set: str | None = typer.Option(
        None,
        help="entry of the prompt file (default: eval.zeroshot_prompt_set, "
        "else the detected format: imagefolder / cifar10 / cifar100)",
    ),
    params: Path = ParamsOpt,
):
    """Zero-shot classification: acc@1, acc@5 and mean per-class recall (CLIP prompt ensembling)."""
    from sdsclip import stages

    with _stage("evaluate zeroshot"):
        r = stages.evaluate_zeroshot(_params(params), model, data, out, prompt_set)
        console.print(
            f"{model}: acc@1 {r['acc1']:.3f}  acc@5 {r['acc5']:.3f}  "
            f"mean per-class recall {r['mean_per_class_recall']:.3f}  (n={r['n']}, {r['n_classes']} classes)"
        )


@evaluate_app.command("sugarcrepe")
def evaluate_sugarcrepe(
    data: Path = typer.Option(..., help="dir with the subset files (add_att.json ... swap_obj.json) and val2017/"),
    model: Path = typer.Option(..., help="student dir or teacher dir"),
    out: Path = typer.Option(..., help="metrics JSON to write"),
    images: Path | None = typer.Option(None, help="COCO val2017 image dir (default: DATA/val2017)"),
    scores: Path | None = typer.Option(None, help="also write per-item positive / negative scores (JSONL)"),
    params: Path = ParamsOpt,
):
    """SugarCrepe accuracy per subset (strict >), per category (add / replace / swap) and overall."""
    from sdsclip import stages

    with _stage("evaluate sugarcrepe"):
        r = stages.evaluate_sugarcrepe(_params(params), model, data, out, images, scores)
        subsets = "  ".join(f"{k} {v['accuracy']:.3f}" for k, v in r["subsets"].items())
        console.print(f"{model}: {subsets}  mean {r['mean_accuracy']:.3f}")


@app.command("derive-sugarcrepe")
def derive_sugarcrepe(
    winoground: Path = typer.Option(..., help="the synthetic world's Winoground dir"),
    out: Path = typer.Option(..., help="SugarCrepe-format dir to write ({subset}.json + val2017/)"),
    params: Path = ParamsOpt,
):
    """A SugarCrepe-format set (swap_att/obj, replace_att/obj/rel) from the synthetic world's Winoground
    images; eval.sugarcrepe_world_items items per subset."""
    from sdsclip import stages

    with _stage("derive-sugarcrepe"):
        _done(stages.derive_sugarcrepe(_params(params), winoground, out))


@app.command()
def report(
    metrics_dir: Path = typer.Option(Path("metrics"), help="dir with {benchmark}_{model}.json files"),
    out: Path = typer.Option(Path("reports"), help="dir for evaluation.md, evaluation.html, evaluation.png"),
    summary: Path = typer.Option(Path("metrics/evaluation.json"), help="flat metrics JSON (DVC metrics)"),
):
    """The evaluation report: every benchmark and subset for pretrained / baseline / SDS-CLIP / teacher."""
    from sdsclip import stages

    with _stage("report"):
        result = stages.report(metrics_dir, out, summary)
        console.print(f"wrote {result['report']} (+ .html, .png) and {summary} ({result['metrics']} numbers)")


@app.command()
def register(
    model: Path = typer.Option(..., help="SDS-CLIP student dir"),
    metrics: Path = typer.Option(..., help="its Winoground metrics JSON"),
    baseline_metrics: Path = typer.Option(..., help="the lambda = 0 control's Winoground metrics JSON"),
    out: Path = typer.Option(..., help="registration result JSON"),
    data_file: list[Path] = typer.Option([], help="files whose sha256 is recorded as data lineage"),
    params: Path = ParamsOpt,
):
    """Register the model in MLflow; move the alias only if it does not lose to the baseline."""
    from sdsclip import stages

    with _stage("register"):
        result = stages.register(_params(params), model, metrics, baseline_metrics, out, data_file)
        console.print(f"registered {result['model_name']} v{result['version']}: {result['reason']}")


@app.command()
def results(
    metrics_dir: Path = typer.Option(Path("metrics"), help="dir with winoground_{model}.json files"),
    registration: Path | None = typer.Option(Path("metrics/registration.json"), help="register output"),
):
    """Print the results table of a finished run (pretrained, baseline, SDS-CLIP, teacher)."""
    from sdsclip import stages

    names = {"pretrained": "pretrained", "baseline (λ=0)": "baseline", "SDS-CLIP": "sds", "teacher": "teacher"}
    files = {label: metrics_dir / f"winoground_{key}.json" for label, key in names.items()}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        err_console.print(f"sdsclip results: error: missing {', '.join(missing)} (run `make demo` first)")
        raise typer.Exit(2)
    rows = stages.results_table(files)
    tags = sorted({t for r in rows for t in r["by_collapsed_tag"]})
    table = Table(title=f"Winoground-format results (n={rows[0]['n']}, strict >)")
    for col in ["model", "text", "image", "group", *[f"group[{t}]" for t in tags]]:
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        per_tag = [f"{r['by_collapsed_tag'].get(t, {}).get('group_score', float('nan')):.3f}" for t in tags]
        table.add_row(
            r["model"], f"{r['text_score']:.3f}", f"{r['image_score']:.3f}", f"{r['group_score']:.3f}", *per_tag
        )
    Console(width=max(console.width, 100)).print(table)
    _other_benchmarks_table(metrics_dir, names)
    if registration and registration.is_file():
        reg = json.loads(registration.read_text())
        console.print(f"MLflow: {reg['model_name']} v{reg['version']} ({reg['tracking_uri']}): {reg['reason']}")


def _other_benchmarks_table(metrics_dir: Path, names: dict[str, str]) -> None:
    """Headline ARO / SugarCrepe / zero-shot numbers, when their metrics files exist (full: reports/)."""
    columns = {
        "VG-Rel": ("aro", "vg_relation", "macro_accuracy"),
        "VG-Attr": ("aro", "vg_attribution", "macro_accuracy"),
        "COCO-Order": ("aro", "coco_order", "precision_at_1"),
        "SugarCrepe": ("sugarcrepe", None, "mean_accuracy"),
        "zero-shot@1": ("zeroshot", None, "acc1"),
    }
    rows = []
    for label, key in names.items():
        cells = []
        for bench, section, metric in columns.values():
            path = metrics_dir / f"{bench}_{key}.json"
            m = json.loads(path.read_text()) if path.is_file() else {}
            value = (m.get(section, {}) if section else m).get(metric)
            cells.append("—" if value is None else f"{value:.3f}")
        rows.append((label, cells))
    if all(c == "—" for _, cells in rows for c in cells):
        return
    table = Table(title="ARO / SugarCrepe / zero-shot (full report: reports/evaluation.md)")
    for col in ["model", *columns]:
        table.add_column(col, justify="left" if col == "model" else "right")
    for label, cells in rows:
        table.add_row(label, *cells)
    Console(width=max(console.width, 100)).print(table)


def _pipeline_module():
    """pipelines/sdsclip_pipeline.py lives in the repository, next to src/ (not in the installed package)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import pipelines.sdsclip_pipeline as module

    return module


@pipeline_app.command("compile")
def pipeline_compile(
    out: Path = typer.Option(Path("pipelines/sdsclip_pipeline.yaml"), help="pipeline YAML to write"),
    base_image: str = typer.Option("ghcr.io/sdsclip/sdsclip:0.1.0", help="image of the CPU tasks"),
    gpu_image: str = typer.Option("ghcr.io/sdsclip/sdsclip:0.1.0-cuda", help="image of the GPU tasks (cluster)"),
    params: Path = ParamsOpt,
    target: str = typer.Option("cluster", help="cluster (GPUs, PVCs, secrets, resources, retries) | local"),
):
    """Compile the Kubeflow pipeline (pipelines/sdsclip_pipeline.py) to a kfp v2 YAML; run-form defaults from
    --params. The committed pipelines/sdsclip_pipeline.yaml is this command with its defaults."""
    from sdsclip.config import ConfigError

    try:  # the two user errors here; not _stage, whose error list imports the torch stack
        module = _pipeline_module()
        if target not in module.TARGETS:
            raise ConfigError(f"--target {target!r}: one of {', '.join(module.TARGETS)}")
        if not params.is_file():
            raise ConfigError(f"{params}: params file not found (run from the project root or pass --params)")
        module.compile_pipeline(out, base_image, params, gpu_image=gpu_image, target=target)
    except ConfigError as err:
        err_console.print(f"[red]sdsclip pipeline compile: error:[/red] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    console.print(f"wrote {out}")


@pipeline_app.command("submit")
def pipeline_submit(
    host: str = typer.Option(
        ...,
        help="KFP API URL, e.g. http://localhost:8080 (kubectl port-forward svc/ml-pipeline-ui 8080:80 -n kubeflow)",
    ),
    experiment: str = typer.Option("sdsclip", help="experiment (looked up by name, created if missing)"),
    schedule: str | None = typer.Option(
        None,
        help="recurring run: KFP cron, 6 fields with seconds first "
        "('0 0 2 * * *' = daily 02:00 UTC) or @daily / @every 6h",
    ),
    run_name: str | None = typer.Option(None, help="name of the run (or recurring run)"),
    param: list[str] = typer.Option([], "--param", help="run parameter key=value (repeatable), e.g. lambda_sds=0.5"),
    params_file: Path | None = typer.Option(None, help="a params.yaml to send as the params_yaml parameter"),
    namespace: str | None = typer.Option(None, help="Kubernetes namespace (multi-user Kubeflow)"),
    package: Path = typer.Option(Path("pipelines/sdsclip_pipeline.yaml"), help="compiled pipeline to submit"),
    no_cache: bool = typer.Option(False, "--no-cache", help="run every task (data behind a path changed)"),
    token: str | None = typer.Option(
        None, envvar="KFP_TOKEN", help="bearer token for an authenticated endpoint (env KFP_TOKEN)"
    ),
):
    """Submit the compiled pipeline to a Kubeflow Pipelines server: one run, or a recurring run (--schedule)."""
    from sdsclip.cluster.kfp_submit import SubmitError, parse_run_params, read_package, submit
    from sdsclip.config import ConfigError

    try:
        _, inputs = read_package(package)
        values = parse_run_params(param, inputs)
        if params_file is not None:
            if "params_yaml" in values:
                raise SubmitError("give params_yaml either as --params-file or as --param, not both")
            if not params_file.is_file():
                raise SubmitError(f"{params_file}: params file not found")
            values["params_yaml"] = params_file.read_text(encoding="utf-8")
        result = submit(
            package,
            host,
            experiment=experiment,
            run_name=run_name,
            params=values,
            schedule=schedule,
            namespace=namespace,
            enable_caching=False if no_cache else None,
            token=token,
        )
    except (SubmitError, ConfigError) as err:
        err_console.print(f"[red]sdsclip pipeline submit: error:[/red] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    _done(result)


# ------------------------------------------------------------------ diagnostics and the science experiment

diagnose_app = typer.Typer(help="Checks that must pass before an SDS-CLIP result means anything.", no_args_is_help=True)
app.add_typer(diagnose_app, name="diagnose")


@diagnose_app.command("teacher")
def diagnose_teacher(
    model: Path = typer.Option(..., help="teacher dir (pretrain-teacher output)"),
    data: Path = typer.Option(..., help="Winoground-format dir (examples.jsonl + images/)"),
    out: Path | None = typer.Option(None, help="also write the diagnostic as JSON"),
    items: int | None = typer.Option(None, min=1, help="first N items only (default all)"),
    strict: bool = typer.Option(False, "--strict", help="exit 1 when below teacher.binding_min_text_score"),
    params: Path = ParamsOpt,
):
    """Does the teacher bind words to image regions? Caption-swap effect on its denoising error (fixed, shared
    (t, eps) draws: eval.teacher_*) and its Winoground text score against teacher.binding_min_text_score."""
    from sdsclip.diagnose import teacher_binding, verdict_line

    with _stage("diagnose teacher"):
        result = teacher_binding(_params(params), model, data, items)
        if out is not None:
            from sdsclip.evaluate.common import write_json

            write_json(out, result)
    console.print(verdict_line(result), highlight=False, soft_wrap=True)
    if strict and not result["passed"]:
        raise typer.Exit(1)


@diagnose_app.command("student")
def diagnose_student(
    model: Path = typer.Option(..., help="student dir (pretrain-student / train output)"),
    data: Path = typer.Option(..., help="Winoground-format dir (examples.jsonl + images/)"),
    out: Path | None = typer.Option(None, help="also write the diagnostic as JSON"),
    items: int | None = typer.Option(None, min=1, help="first N items only (default all)"),
    params: Path = ParamsOpt,
):
    """Can an image-side fine-tune win the swaps at all? Per Winoground tag: how far the text tower separates
    the two swapped captions and the image tower the two swapped images (cosine distance), and the share of
    items whose two captions prefer different images (and whose two images prefer different captions)."""
    from sdsclip.diagnose import student_separation, student_verdict_line

    with _stage("diagnose student"):
        result = student_separation(_params(params), model, data, items)
        if out is not None:
            from sdsclip.evaluate.common import write_json

            write_json(out, result)
    console.print(student_verdict_line(result), highlight=False, soft_wrap=True)


@app.command()
def science(
    workdir: Path | None = typer.Option(None, help="experiment dir (default science.workdir)"),
    profile: str = typer.Option("science", help="profile applied over --params ('-' keeps the file's own)"),
    params: Path = ParamsOpt,
):
    """The control (lambda = 0) vs SDS-CLIP over science.seeds and science.lambdas on the embedded world:
    world, pretraining, teacher diagnostic, fine-tuning, Winoground / ARO / zero-shot, report (Markdown + PNG)
    in WORKDIR/report/. Resumable: finished steps made with the same params are reused. Uses the `science`
    profile (src/sdsclip/profiles/science.yaml) by default; hours on a 2-core CPU."""
    from sdsclip.science import load_science_params, run_science

    with _stage("science"):
        p = load_science_params(params, None if profile == "-" else profile)
        summary = run_science(p, workdir, log=lambda line: err_console.print(line, highlight=False))
    _done(
        {
            "report": str(Path(workdir or p.science.workdir) / "report" / "science.md"),
            "object_swap_group": {a: v["subsets"].get("Wino group: object swap") for a, v in summary["arms"].items()},
        }
    )


@app.command()
def realshape(
    workdir: Path = typer.Option(Path("realshape"), help="fixtures (cached), chain outputs and summary.json"),
    scale: str = typer.Option("real", help="real: ViT-B/32 + SD-1.5 shapes; tiny: the same formats, shrunken"),
    student_format: str = typer.Option(
        "openai", help="student checkpoint file: openai (TorchScript .pt) | safetensors (open_clip state dict)"
    ),
    in_process: bool = typer.Option(False, "--in-process", help="all stages in this process (no per-stage RSS)"),
    profile: str = typer.Option("realshape", help="profile applied over --params ('-' keeps the file's own)"),
    params: Path = ParamsOpt,
):
    """The real path end to end at real shapes on random-init stand-ins (src/sdsclip/realshape.py): COCO-format
    JPEGs, an OpenAI-format ViT-B-32-quickgelu, an SD-1.5-shaped dir -> ingest ... register. Writes wall time
    and peak RSS per stage to WORKDIR/summary.json; the fixtures are written once and reused."""
    from sdsclip.realshape import RealshapeError, run_realshape
    from sdsclip.science import load_science_params

    try:
        with _stage("realshape"):
            p = load_science_params(params, None if profile == "-" else profile)
            summary = run_realshape(
                p,
                workdir,
                scale,
                not in_process,
                student_format,
                log=lambda line: err_console.print(line, highlight=False),
            )
    except RealshapeError as err:
        err_console.print(f"[red]sdsclip realshape: error:[/red] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    _done(
        {k: summary[k] for k in ("scale", "seconds", "chain_seconds", "peak_rss_mb", "peak_rss_stage", "shapes")}
        | {"summary": str(workdir / "summary.json")}
    )


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    app()


@pipeline_app.command("render-job")
def pipeline_render_job(
    out: Path = typer.Option(..., help="PyTorchJob YAML to write (then: kubectl create -f OUT)"),
    name: str = typer.Option(..., help="job name (pods: NAME-master-0, NAME-worker-0, ...)"),
    image: str = typer.Option("ghcr.io/sdsclip/sdsclip:0.1.0-cuda", help="image with sdsclip installed"),
    run_dir: str = typer.Option(
        ..., help="run dir on the data PVC holding params.yaml and inputs/{student,teacher,shards,validated}/"
    ),
    num_nodes: int = typer.Option(2, help="pods: 1 Master + NUM_NODES - 1 Workers"),
    gpus_per_node: int = typer.Option(1, help="GPUs per pod"),
    control: bool = typer.Option(False, "--control", help="the lambda = 0 baseline instead of SDS-CLIP"),
    namespace: str | None = typer.Option(None, help="namespace (default: the kubeconfig's)"),
    params: Path = ParamsOpt,
):
    """Render the multi-node training PyTorchJob (k8s/training/pytorchjob.yaml; knobs from params.yaml's
    `multinode:` section), checked against the CRD schema, for submission by hand."""
    from sdsclip.cluster.jobspec import PyTorchJobError, render_job_file

    try:
        path = render_job_file(
            out,
            name=name,
            image=image,
            run_dir=run_dir,
            num_nodes=num_nodes,
            gpus_per_node=gpus_per_node,
            control=control,
            namespace=namespace,
            params_path=params if params.is_file() else None,
        )
    except PyTorchJobError as err:
        err_console.print(f"[red]sdsclip pipeline render-job: error:[/red] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    console.print(f"wrote {path}: kubectl create -f {path}")
