"""Zero-shot classification (CLIP's protocol, as CLIP_benchmark's zeroshot_classification computes it).

Data (``--data DIR``, auto-detected):
  - CIFAR-10 / CIFAR-100 in torchvision's on-disk layout (``DIR/cifar-10-batches-py/test_batch`` +
    ``batches.meta``, ``DIR/cifar-100-python/test`` + ``meta``), read with ``torchvision.datasets.CIFAR10/100``
    (``train=False, download=False``). The files' md5 against the official archive is recorded
    (``official_md5``) but not required, so re-packed or subset batches are read too;
  - ImageFolder: ``DIR/{class}/**/{image}``; classes are the sorted folder names (torchvision's rule).

Class names and prompt templates come from a prompt file (default: the packaged
``sdsclip/evaluate/data/zeroshot_prompts.json``), one entry per prompt set (``cifar10``, ``cifar100``,
``imagefolder``, ``toyworld``...). The set follows the data unless one is named: CIFAR-10 / CIFAR-100 -> the
entry of that name (CLIP's 18-template ensemble); an ImageFolder -> the entry whose ``classnames`` mapping has
exactly the folder classes (e.g. ``toyworld`` for the synthetic world), else the generic ``imagefolder`` entry. A named
set whose class names do not cover the dataset's classes (``toyworld`` on CIFAR-10) is an error, not a run
with the wrong prompts; an entry without ``classnames`` is generic (the dataset's own names). A student scores
with CLIP's prompt ensembling: the class embedding is the renormalised mean of its normalised template
embeddings, logits = cosine similarity. Any other scorer (the diffusion teacher) scores every (image, prompt)
pair and averages over templates.

Metrics: acc@1, acc@5 (top-k by ``torch.topk``, as CLIP_benchmark; k is capped at the number of classes) and
mean per-class recall (balanced accuracy: mean over classes with at least one image of the recall of that class).
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from sdsclip.evaluate.common import (
    EvalDataError,
    SkipLog,
    capped_subset,
    check_on_missing,
    missing_image,
    write_json,
)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
DEFAULT_PROMPTS = "zeroshot_prompts.json"


class ZeroShotDataError(EvalDataError):
    """Bad zero-shot data or prompt file; the message names the file or folder."""


def default_prompts_file() -> Path:
    return Path(str(resources.files("sdsclip.evaluate") / "data" / DEFAULT_PROMPTS))


def detect_format(data_dir: Path) -> str:
    data_dir = Path(data_dir)
    for name, folder in CIFAR_FOLDERS.items():
        if (data_dir / folder).is_dir():
            return name
    if data_dir.name in CIFAR_FOLDERS.values():
        raise ZeroShotDataError(f"{data_dir}: pass the folder that CONTAINS {data_dir.name}/ (torchvision's root)")
    return "imagefolder"


def _prompt_file(prompts_file: Path | None) -> tuple[Path, dict[str, Any]]:
    path = Path(prompts_file) if prompts_file else default_prompts_file()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ZeroShotDataError(f"{path}: prompt file not found") from None
    except json.JSONDecodeError as err:
        raise ZeroShotDataError(f"{path}:{err.lineno}:{err.colno}: not valid JSON ({err.msg})") from None
    if not isinstance(data, dict):
        raise ZeroShotDataError(f"{path}: expected an object {{prompt set: {{templates, classnames}}}}")
    return path, data


def load_prompt_set(prompt_set: str, prompts_file: Path | None = None) -> dict[str, Any]:
    path, data = _prompt_file(prompts_file)
    if prompt_set not in data or not isinstance(data[prompt_set], dict):
        known = ", ".join(k for k in data if not k.startswith("_"))
        raise ZeroShotDataError(f"{path}: no prompt set {prompt_set!r} (known: {known})")
    entry = data[prompt_set]
    templates = entry.get("templates")
    if not templates or not all(isinstance(t, str) and "{c}" in t for t in templates):
        raise ZeroShotDataError(f"{path}: {prompt_set}.templates must be a non-empty list of strings with '{{c}}'")
    return entry


def uncovered_classes(raw: Sequence[str], entry: dict[str, Any]) -> list[str]:
    """The dataset classes an entry has no class name for ([] = it fits): a ``classnames`` mapping must have
    every class, a list one name per class; an entry without ``classnames`` is generic and fits any dataset."""
    names = entry.get("classnames")
    if names is None:
        return []
    if isinstance(names, list):
        return [] if len(names) == len(raw) else list(raw)
    return [c for c in raw if c not in names]


def resolve_prompt_set(
    requested: str | None, fmt: str, raw: Sequence[str], prompts_file: Path | None = None, where: str = ""
) -> tuple[str, dict[str, Any], str]:
    """(prompt set name, its entry, "requested" | "detected") for a dataset of format ``fmt`` with classes ``raw``.

    Requested: that entry, which must cover the classes. Detected: CIFAR -> the entry named like the format;
    ImageFolder -> the first entry whose ``classnames`` mapping has exactly the folder classes, else the generic
    ``imagefolder`` entry."""
    path, data = _prompt_file(prompts_file)
    if requested is not None:
        entry = load_prompt_set(requested, prompts_file)
        missing = uncovered_classes(raw, entry)
        if missing:
            try:
                hint = f" (detected: {resolve_prompt_set(None, fmt, raw, prompts_file)[0]!r})"
            except ZeroShotDataError:
                hint = ""
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise ZeroShotDataError(
                f"{path}: prompt set {requested!r} has no class name for {len(missing)} of the {len(raw)} classes "
                f"of the {fmt} data{where} ({shown}); set eval.zeroshot_prompt_set: null to follow the data{hint}, "
                "or name a prompt set whose classnames cover them"
            )
        return requested, entry, "requested"
    if fmt != "imagefolder":
        entry = load_prompt_set(fmt, prompts_file)
        missing = uncovered_classes(raw, entry)
        if missing:
            raise ZeroShotDataError(
                f"{path}: prompt set {fmt!r} has no class name for {len(missing)} of the {len(raw)} {fmt} classes"
                f"{where} ({', '.join(missing[:5])}); a re-labelled batch needs its own prompt set "
                "(eval.zeroshot_prompt_set)"
            )
        return fmt, entry, "detected"
    sets = {k: v for k, v in data.items() if not k.startswith("_") and isinstance(v, dict)}
    # the same classes, not a superset: a cat/dog folder is not CIFAR-10 (an ImageFolder export of it is)
    exact = [k for k, v in sets.items() if isinstance(v.get("classnames"), dict) and set(v["classnames"]) == set(raw)]
    name = (exact or ["imagefolder"])[0]
    return name, load_prompt_set(name, prompts_file), "detected"


class _Images:
    """Images + integer labels of one dataset, loaded lazily (ImageFolder) or from arrays (CIFAR)."""

    def __init__(
        self,
        raw_classes: list[str],
        targets: list[int],
        paths: list[Path] | None = None,
        arrays: np.ndarray | None = None,
        info: dict[str, Any] | None = None,
    ):
        self.raw_classes, self.targets, self.paths, self.arrays = raw_classes, targets, paths, arrays
        self.info = info or {}

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, idx: Sequence[int]) -> _Images:
        return _Images(
            self.raw_classes,
            [self.targets[i] for i in idx],
            paths=[self.paths[i] for i in idx] if self.paths is not None else None,
            arrays=self.arrays[list(idx)] if self.arrays is not None else None,
            info=self.info,
        )

    def load(self, i: int) -> Image.Image:
        if self.arrays is not None:
            return Image.fromarray(self.arrays[i])
        assert self.paths is not None  # a set holds arrays (CIFAR) or image paths (ImageFolder)
        with Image.open(self.paths[i]) as im:
            return im.convert("RGB")


def read_imagefolder(root: Path) -> _Images:
    root = Path(root)
    if not root.is_dir():
        raise ZeroShotDataError(f"{root}: not a directory (ImageFolder root with one folder per class)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ZeroShotDataError(f"{root}: no class folders (ImageFolder layout: {root}/<class>/<image>)")
    paths, targets = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
        if not files:
            raise ZeroShotDataError(
                f"{root / name}: class folder has no images ({', '.join(IMG_EXTENSIONS)}); add images or remove "
                "the folder (an empty class would change the label space)"
            )
        paths.extend(files)
        targets.extend([label] * len(files))
    return _Images(classes, targets, paths=paths)


def read_cifar(root: Path, kind: str) -> _Images:
    """The test split through torchvision's CIFAR readers (download=False); md5 recorded, not enforced."""
    from torchvision.datasets import CIFAR10, CIFAR100
    from torchvision.datasets.utils import check_integrity

    base = CIFAR10 if kind == "cifar10" else CIFAR100
    folder = Path(root) / base.base_folder

    class _Reader(base):  # type: ignore[misc, valid-type]
        def _check_integrity(self) -> bool:  # test files present (torchvision also demands the train files)
            return all((folder / name).is_file() for name, _ in self.test_list)

        def _load_meta(self) -> None:  # same as torchvision's, without the md5 requirement
            with open(folder / self.meta["filename"], "rb") as f:
                self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    missing = [name for name, _ in base.test_list] + [base.meta["filename"]]
    missing = [n for n in missing if not (folder / n).is_file()]
    if missing:
        raise ZeroShotDataError(f"{folder}: missing {', '.join(missing)} (torchvision's {kind} layout)")
    try:
        ds = _Reader(str(root), train=False, download=False)
    except (pickle.UnpicklingError, KeyError, ValueError, EOFError) as err:
        raise ZeroShotDataError(f"{folder}: not a readable {kind} batch ({type(err).__name__}: {err})") from None
    md5_ok = all(check_integrity(str(folder / n), md5) for n, md5 in base.test_list) and check_integrity(
        str(folder / base.meta["filename"]), base.meta["md5"]
    )
    return _Images(list(ds.classes), [int(t) for t in ds.targets], arrays=ds.data, info={"official_md5": md5_ok})


def dataset_classes(data_dir: Path) -> tuple[str, list[str]]:
    """(format, class names as the reader will see them), reading only folder names or the CIFAR meta file, so
    a prompt-set mismatch is found before any model loads."""
    data_dir = Path(data_dir)
    fmt = detect_format(data_dir)
    if fmt == "imagefolder":
        if not data_dir.is_dir():
            raise ZeroShotDataError(f"{data_dir}: not a directory (ImageFolder root with one folder per class)")
        return fmt, sorted(p.name for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    from torchvision.datasets import CIFAR10, CIFAR100

    base = CIFAR10 if fmt == "cifar10" else CIFAR100
    meta = data_dir / base.base_folder / base.meta["filename"]
    try:
        with open(meta, "rb") as f:
            return fmt, list(pickle.load(f, encoding="latin1")[base.meta["key"]])
    except FileNotFoundError:
        raise ZeroShotDataError(f"{meta}: missing (torchvision's {fmt} layout)") from None
    except (pickle.UnpicklingError, KeyError, ValueError, EOFError, TypeError) as err:
        raise ZeroShotDataError(f"{meta}: not a readable {fmt} meta file ({type(err).__name__}: {err})") from None


def check_prompt_set(data_dir: Path, prompt_set: str | None = None, prompts_file: Path | None = None) -> str:
    """The prompt set ``evaluate_zeroshot`` will use on ``data_dir``; raises ZeroShotDataError on a mismatch."""
    fmt, raw = dataset_classes(data_dir)
    return resolve_prompt_set(prompt_set, fmt, raw, prompts_file, f" in {data_dir}")[0]


def class_names(raw: list[str], entry: dict[str, Any], where: str) -> list[str]:
    names = entry.get("classnames")
    if names is None:
        return [c.replace("_", " ") for c in raw]
    if isinstance(names, list):
        if len(names) != len(raw):
            raise ZeroShotDataError(f"{where}: classnames has {len(names)} names for {len(raw)} classes")
        return [str(n) for n in names]
    unknown = [c for c in raw if c not in names]
    if unknown:
        raise ZeroShotDataError(f"{where}: classnames has no entry for class(es) {', '.join(unknown[:5])}")
    return [str(names[c]) for c in raw]


def zeroshot_metrics(logits: torch.Tensor, targets: torch.Tensor, classes: Sequence[str]) -> dict[str, Any]:
    n, c = logits.shape
    k5 = min(5, c)
    top = logits.topk(k5, dim=1, largest=True, sorted=True).indices
    hit = top.eq(targets[:, None])
    recall = {}
    for label, name in enumerate(classes):
        mask = targets == label
        if mask.any():
            recall[name] = float(hit[mask, 0].double().mean())
    return {
        "n": n,
        "n_classes": c,
        "acc1": float(hit[:, 0].double().mean()) if n else None,
        "acc5": float(hit.any(dim=1).double().mean()) if n else None,
        "acc5_k": k5,
        "mean_per_class_recall": float(np.mean(list(recall.values()))) if recall else None,
        "per_class_recall": recall,
    }


def _load_chunk(data: _Images, idx: Sequence[int], on_missing: str, skipped: SkipLog) -> tuple[list, list[int]]:
    images, kept = [], []
    for i in idx:
        try:
            images.append(data.load(i))
            kept.append(i)
        except (OSError, UnidentifiedImageError) as err:
            where = str(data.paths[i]) if data.paths else f"item {i}"
            missing_image(ZeroShotDataError, on_missing, skipped, where, f"unreadable image ({err})")
    return images, kept


@torch.no_grad()
def zeroshot_logits(
    scorer, data: _Images, names: list[str], templates: list[str], on_missing: str, skipped: SkipLog, chunk: int = 1024
) -> tuple[torch.Tensor, list[int]]:
    prompts = [t.format(c=name) for name in names for t in templates]
    ensemble = hasattr(scorer, "embed_images") and hasattr(scorer, "embed_texts")
    if ensemble:
        text = scorer.embed_texts(prompts).float().reshape(len(names), len(templates), -1)
        classifier = F.normalize(text.mean(dim=1), dim=-1)
    logits, kept_all = [], []
    for start in range(0, len(data), chunk):
        images, kept = _load_chunk(data, range(start, min(start + chunk, len(data))), on_missing, skipped)
        if not images:
            continue
        if ensemble:
            logits.append(scorer.embed_images(images).float() @ classifier.T)
        else:
            pairs = [(i, p) for i in range(len(images)) for p in range(len(prompts))]
            s = scorer.score(images, prompts, pairs).double().reshape(len(images), len(names), len(templates))
            logits.append(s.mean(dim=2))
        kept_all.extend(kept)
    return (torch.cat(logits).double() if logits else torch.empty(0, len(names))), kept_all


def evaluate_zeroshot(
    scorer,
    data_dir: Path,
    out: Path,
    *,
    prompt_set: str | None = None,
    prompts_file: Path | None = None,
    on_missing: str = "error",
    max_items: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Zero-shot acc@1 / acc@5 / mean per-class recall of ``scorer`` on ``data_dir`` -> metrics JSON ``out``.

    ``prompt_set`` (default: follow the data, see ``resolve_prompt_set``) selects the prompt file entry;
    ``max_items`` (bounding the teacher's cost) keeps a seeded (``seed``) random subset of N images stratified
    by class (every class covered when N >= the number of classes), recorded under ``subset``."""
    check_on_missing(on_missing)
    fmt = detect_format(Path(data_dir))
    data = read_imagefolder(Path(data_dir)) if fmt == "imagefolder" else read_cifar(Path(data_dir), fmt)
    prompt_set, entry, source = resolve_prompt_set(prompt_set, fmt, data.raw_classes, prompts_file, f" in {data_dir}")
    names = class_names(data.raw_classes, entry, f"{prompts_file or default_prompts_file()}: {prompt_set}")
    keep, subset = capped_subset(len(data), max_items, seed, data.targets, stratified_by="class")
    if subset is not None:
        data = data.subset(keep)
    skipped = SkipLog()
    logits, kept = zeroshot_logits(scorer, data, names, list(entry["templates"]), on_missing, skipped)
    targets = torch.tensor([data.targets[i] for i in kept], dtype=torch.long)
    result = {
        "format": fmt,
        "prompt_set": prompt_set,
        "prompt_set_source": source,
        "templates": len(entry["templates"]),
        **zeroshot_metrics(logits, targets, names),
        **data.info,
        "skipped": skipped.summary(),
        **({"subset": subset} if subset is not None else {}),
    }
    skipped.announce("zeroshot")
    write_json(Path(out), result)
    return result
