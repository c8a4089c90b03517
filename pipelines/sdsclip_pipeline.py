"""The sdsclip chain as a Kubeflow (kfp v2) pipeline: the same stages as dvc.yaml.

    resolve_params -> synth -> ingest -> validate -> {pretrain_student, pretrain_teacher}
      -> {train_baseline, train_sds} -> evaluate@{pretrained, baseline, sds, teacher} -> register
      evaluate-{aro, sugarcrepe, zeroshot}@models (+ derive-sugarcrepe from the world) -> report

Parameters: ``params_yaml`` (the whole params.yaml text; default: the file read at compile time) and a
few overrides for the Kubeflow UI (``seed``, ``device``, ``lambda_sds``, ``train_steps``; defaults: the
same file's values). The overrides win over ``params_yaml``.

    python pipelines/sdsclip_pipeline.py --out pipelines/sdsclip_pipeline.yaml [--base-image IMG]
    sdsclip pipeline compile --out pipelines/sdsclip_pipeline.yaml
"""
# No `from __future__ import annotations`: kfp reads the pipeline's parameter annotations as types.

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

import yaml
from kfp import compiler, dsl

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python pipelines/sdsclip_pipeline.py` from anywhere
    sys.path.insert(0, str(ROOT))

from components import DEFAULT_IMAGE, make_components  # noqa: E402

DEFAULT_PARAMS = ROOT / "params.yaml"


def build_pipeline(base_image: str = DEFAULT_IMAGE, params_yaml: str | None = None) -> Callable:
    """The pipeline with its components in ``base_image`` and its parameter defaults from ``params_yaml``."""
    params_yaml = DEFAULT_PARAMS.read_text(encoding="utf-8") if params_yaml is None else params_yaml
    raw = yaml.safe_load(params_yaml) or {}
    train = raw.get("train", {})
    c = make_components(base_image)

    @dsl.pipeline(name="sdsclip", description="SDS-CLIP: fine-tune CLIP with a diffusion teacher's score.")
    def sdsclip(
        params_yaml: str = params_yaml,
        seed: int = int(raw.get("seed", 0)),
        device: str = str(raw.get("device", "auto")),
        lambda_sds: float = float(train.get("lambda_sds", 1.0)),
        train_steps: int = int(train.get("steps", 150)),
    ):
        params = c.resolve_params(params_yaml=params_yaml, seed=seed, device=device, lambda_sds=lambda_sds,
                                  train_steps=train_steps).output
        world = c.synth(params=params).output
        shards = c.ingest(params=params, world=world).output
        validated = c.validate(params=params, shards=shards).outputs["validated"]
        data = dict(params=params, shards=shards, validated=validated)

        student = c.pretrain_student(**data).output
        teacher = c.pretrain_teacher(**data).output
        models = dict(student=student, teacher=teacher, **data)
        baseline = c.train(control=True, **models).set_display_name("train-baseline").output
        sds = c.train(control=False, **models).set_display_name("train-sds").output

        results, reported = {}, {}
        sugarcrepe = c.derive_sugarcrepe(params=params, world=world).set_display_name("derive-sugarcrepe").output
        for name, model in dict(pretrained=student, baseline=baseline, sds=sds, teacher=teacher).items():
            task = c.evaluate_winoground(params=params, model=model, world=world)
            results[name] = task.set_display_name(f"evaluate-{name}").outputs["results"]
            reported[f"winoground_{name}"] = results[name]
            reported[f"aro_{name}"] = c.evaluate_aro(params=params, model=model, world=world).set_display_name(
                f"evaluate-aro-{name}").outputs["results"]
            reported[f"sugarcrepe_{name}"] = c.evaluate_sugarcrepe(
                params=params, model=model, sugarcrepe=sugarcrepe).set_display_name(
                f"evaluate-sugarcrepe-{name}").outputs["results"]
            if name != "teacher":  # the teacher's zero-shot (every image x class prompt) is optional
                reported[f"zeroshot_{name}"] = c.evaluate_zeroshot(
                    params=params, model=model, world=world).set_display_name(
                    f"evaluate-zeroshot-{name}").outputs["results"]
        c.report(**reported).set_display_name("report")

        c.register(model=sds, metrics=results["sds"], baseline_metrics=results["baseline"], **data
                   ).set_caching_options(False)

    return sdsclip


def compile_pipeline(out: Path, base_image: str = DEFAULT_IMAGE, params_path: Path | None = None) -> Path:
    """Write the pipeline YAML (kfp v2 IR) to ``out``; ``params_path`` gives the parameter defaults."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = Path(params_path or DEFAULT_PARAMS).read_text(encoding="utf-8")
    compiler.Compiler().compile(build_pipeline(base_image, text), package_path=str(out))
    if out.suffix != ".json":
        out.write_text(_comment_out_header(out.read_text(encoding="utf-8")), encoding="utf-8")
    return out


def _comment_out_header(text: str) -> str:
    """kfp 2.17 writes a '# Inputs:' header with each default on one '#' line, so the multi-line
    params_yaml default spills uncommented lines into it and the file stops being valid YAML. Comment
    them out (the spec itself, from its first key `components:` on, is untouched)."""
    header, body = text.split("\ncomponents:\n", 1)
    lines = (line if line.startswith("#") else f"#      {line}".rstrip() for line in header.splitlines())
    header = "\n".join(lines)
    return f"{header}\ncomponents:\n{body}"


def run_local(params_yaml: str, workdir: Path, **overrides: Any) -> Path:
    """Run the whole pipeline here with kfp.local's SubprocessRunner (the current Python env, which must
    have sdsclip installed). ``overrides``: seed, device, lambda_sds, train_steps. Returns the run dir
    (``workdir/<pipeline run>/<task>/<output>``). Raises RuntimeError naming the failed task."""
    import warnings

    from kfp import local

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    before = set(workdir.iterdir())
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(workdir))
    with warnings.catch_warnings():  # expected here: the image is this env; display names are UI-only
        warnings.filterwarnings("ignore", message=".*base image", category=RuntimeWarning)
        warnings.filterwarnings("ignore", message=".*no effect in the current local runner",
                                category=UserWarning)
        build_pipeline(params_yaml=params_yaml)(params_yaml=params_yaml, **overrides)
    (run_dir,) = [p for p in set(workdir.iterdir()) - before if p.is_dir() and p.name.startswith("sdsclip-")]
    return run_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Compile the sdsclip Kubeflow pipeline to a kfp v2 YAML.")
    parser.add_argument("--out", type=Path, default=ROOT / "pipelines" / "sdsclip_pipeline.yaml")
    parser.add_argument("--base-image", default=DEFAULT_IMAGE, help="container image every component runs in")
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params file for the defaults")
    args = parser.parse_args(argv)
    print(f"wrote {compile_pipeline(args.out, args.base_image, args.params)}")


if __name__ == "__main__":
    main()
