"""The Kubeflow run form: which params.yaml knobs the pipeline exposes as run parameters, and how a run's values
merge into ``params_yaml``. Submitting runs to a KFP server is ``sdsclip.cluster.kfp_submit``.

**Run form.** ``FORM_FIELDS`` lists the params.yaml knobs the Kubeflow run form exposes as pipeline
parameters (besides ``params_yaml``, the whole file). ``form_spec`` gives each one its default (from
params.yaml at compile time) and ``apply_run_form`` merges a run's values into ``params_yaml``: a field
overrides params_yaml only when the run changed it from its compiled default, so a run that edits
``params_yaml`` alone is not silently overwritten by the form's defaults. For a knob whose value may be
null, an empty string (text) or 0 (numbers) in the form means null.
"""

from __future__ import annotations

from typing import Any

import yaml

from sdsclip.config import ConfigError, params_from_dict, params_to_dict

# run-form parameter -> params.yaml key. Chosen: what a user changes between runs (seed, device, recipe,
# where the data and models live, the SDS weight and schedule, the teacher's evaluation cost, the registry).
FORM_FIELDS: dict[str, str] = {
    "seed": "seed",
    "device": "device",
    "profile": "profile",
    "coco_root": "data.coco_root",
    "train_split": "data.train_split",
    "ingest_splits": "ingest.splits",
    "winoground_dir": "data.winoground_dir",
    "aro_dir": "data.aro_dir",
    "zeroshot_dir": "data.zeroshot_dir",
    "sugarcrepe_dir": "data.sugarcrepe_dir",
    "student_arch": "student.arch",
    "student_checkpoint": "student.checkpoint",
    "teacher_pretrained_dir": "teacher.pretrained_dir",
    "teacher_latent": "teacher.latent",
    "teacher_image_size": "teacher.image_size",
    "lambda_sds": "train.lambda_sds",
    "train_steps": "train.steps",
    "train_epochs": "train.epochs",
    "train_batch_size": "train.batch_size",
    "train_lr": "train.lr",
    "mixed_precision": "train.mixed_precision",
    "sds_gradient": "train.sds_gradient",
    "eval_teacher_draws": "eval.teacher_draws",
    "eval_shards": "eval.shards",
    "tracking_uri": "registry.tracking_uri",
    "model_name": "registry.model_name",
}
# the form value that stands for null (KFP run forms have no null)
NULL_IN_FORM: dict[str, Any] = {
    "profile": "",
    "student_checkpoint": "",
    "teacher_pretrained_dir": "",
    "train_steps": 0,
    "train_epochs": 0,
}
# set exactly one of these (config.py): setting one in the form nulls the other unless the form sets both
EXCLUSIVE = ("train_steps", "train_epochs")


def _get(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def form_spec(params_yaml: str, source: str = "params.yaml") -> dict[str, dict[str, Any]]:
    """``{field: {"key": params.yaml key, "default": form default[, "null": null value]}}``, defaults from
    ``params_yaml`` (validated, profile merged: the form shows the values a run would use)."""
    resolved = params_to_dict(params_from_dict(yaml.safe_load(params_yaml) or {}, source))
    spec = {}
    for name, key in FORM_FIELDS.items():
        value = _get(resolved, key)
        entry: dict[str, Any] = {"key": key, "default": NULL_IN_FORM[name] if value is None else value}
        if name in NULL_IN_FORM:
            entry["null"] = NULL_IN_FORM[name]
        spec[name] = entry
    return spec


def apply_run_form(params_yaml: str, form: dict[str, Any], spec: dict[str, dict[str, Any]]) -> str:
    """The effective params (validated YAML): ``params_yaml`` with the form fields the run changed from their
    compiled defaults. Raises ConfigError naming the field or key at fault."""
    try:
        raw = yaml.safe_load(params_yaml) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"params_yaml: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(raw, dict):
        raise ConfigError("params_yaml: top level must be a mapping of sections")
    unknown = sorted(set(form) - set(spec))
    if unknown:
        raise ConfigError(f"run form: unknown field {unknown[0]!r} (fields: {', '.join(spec)})")
    changed = {name: value for name, value in form.items() if value != spec[name]["default"]}
    for name, value in changed.items():
        entry = spec[name]
        _set(raw, entry["key"], None if "null" in entry and value == entry["null"] else value)
    first, second = EXCLUSIVE
    for one, other in ((first, second), (second, first)):
        if one in changed and other not in changed and changed[one] != spec[one].get("null"):
            _set(raw, spec[other]["key"], None)
    changed_text = ", ".join(f"{k}={v!r}" for k, v in changed.items())
    source = f"params_yaml + run form ({changed_text})" if changed else "params_yaml"
    return yaml.safe_dump(params_to_dict(params_from_dict(raw, source)), sort_keys=False)
