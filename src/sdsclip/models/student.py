"""The student: an open_clip CLIP model.

The embedded default is a tiny architecture shipped as an open_clip model config
(``sdsclip/model_configs/*.json``), so the very same ``open_clip`` factory builds both it and real
architectures such as ViT-B-32. ``student.checkpoint`` (``build_student``) may be:

* an open_clip state dict: ``.safetensors``, or ``.pt`` / ``.bin`` written by ``torch.save`` (read with
  ``weights_only=True``: tensors only, no pickled code);
* an OpenAI checkpoint (``ViT-B-32.pt`` and friends): a TorchScript archive, read with ``torch.jit.load`` as
  ``open_clip.openai`` does (never ``torch.load``'s pickle fallback). OpenAI trained with QuickGELU, so the
  architecture must be a QuickGELU one: with e.g. ``student.arch: ViT-B-32`` loading is REFUSED with one line
  naming ``ViT-B-32-quickgelu`` (refused rather than switched, so params.yaml always names what runs);
* a Hugging Face ``CLIPModel`` directory (``config.json`` + ``model.safetensors``): converted into an open_clip
  CLIP by ``sdsclip.models.hf_clip``. The architecture comes from its config.json; ``student.arch`` names it:
  a registered open_clip name must describe the same model (``ViT-B-32-quickgelu`` for
  openai/clip-vit-base-patch32; refused otherwise, naming a matching one), any other name is free. Its
  tokenizer, if the directory has one, is used through open_clip's ``HFTokenizer``; otherwise open_clip's
  default tokenizer.

A saved student is a directory in open_clip's own ``local-dir:`` layout: ``model.safetensors`` (the full
CLIP state dict), ``open_clip_config.json`` (model config, QuickGELU included, + preprocessing), the tokenizer
files of a transformers tokenizer, and ``student.json`` (architecture name, activation, tokenizer, provenance),
so it reloads exactly, without the original checkpoint; ``open_clip.create_model_and_transforms(
"local-dir:DIR")`` loads it too. Fine-tuned students also hold ``sigma.safetensors``.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from copy import deepcopy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors.torch import load_file, save_file

from sdsclip.errors import UserError
from sdsclip.weights import WeightFileError, check_safetensors

MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
STUDENT_META = "student.json"
STUDENT_WEIGHTS = "model.safetensors"
SIGMA_WEIGHTS = "sigma.safetensors"
OPEN_CLIP_CONFIG = "open_clip_config.json"  # open_clip's local-dir config file name
TRAINABLE_SETS = ("image_layernorms", "image_norms", "image_tower", "sigma_only")
# torch.save's legacy (pre-zip) format starts with this pickled magic number.
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
# Entries of an OpenAI TorchScript state dict that are not CLIP parameters (open_clip drops them too).
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")

open_clip.add_model_config(MODEL_CONFIG_DIR)


class StudentLoadError(UserError, ValueError):
    """A student reference that cannot be loaded; the message is one line for the user."""


@dataclass
class Student:
    model: open_clip.CLIP
    preprocess: Callable  # PIL image -> normalized tensor, the architecture's own eval transform
    tokenizer: Callable[[list[str]], torch.Tensor]
    arch: str
    model_cfg: dict[str, Any] | None = None  # the open_clip model config it was built from (saved with it)
    converted_from: str = "open_clip"  # checkpoint format: open_clip | openai_torchscript | hf_clip | random
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def embed_dim(self) -> int:
        return (
            int(self.model.text_projection.shape[1])
            if hasattr(self.model, "text_projection")
            else int(self.model.visual.output_dim)
        )

    @property
    def quick_gelu(self) -> bool:
        return bool((self.model_cfg or {}).get("quick_gelu", False))


# ------------------------------------------------------------------------------------ trainable sets

# Normalization layers with affine parameters: LayerNorm (ViT), BatchNorm / InstanceNorm (ResNet stems and
# blocks), GroupNorm, RMSNorm; timm's variants subclass these.
_NORM_TYPES = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._NormBase, torch.nn.RMSNorm)


def image_tower(model: torch.nn.Module) -> torch.nn.Module:
    """An open_clip CLIP's image encoder (``model.visual``)."""
    visual = model.visual
    assert isinstance(visual, torch.nn.Module)
    return visual


def image_tower_layernorms(model: torch.nn.Module) -> list[torch.nn.LayerNorm]:
    """Every LayerNorm of the image encoder: the only CLIP parameters SDS-CLIP fine-tunes (the paper)."""
    return [m for m in image_tower(model).modules() if isinstance(m, torch.nn.LayerNorm)]


def image_tower_norms(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every normalization layer of the image encoder (LayerNorm, BatchNorm, GroupNorm, ...)."""
    return [m for m in image_tower(model).modules() if isinstance(m, _NORM_TYPES)]


def trainable_clip_parameters(model: torch.nn.Module, which: str = "image_layernorms") -> list[torch.nn.Parameter]:
    """The CLIP parameters that fine-tuning trains (``train.trainable``), each once, in module order:
    image_layernorms (the paper), image_norms (every normalization layer's affine parameters of the image
    tower, e.g. a ResNet's BatchNorms), image_tower (all of it) or sigma_only (none)."""
    if which == "image_layernorms":
        params = [p for m in image_tower_layernorms(model) for p in m.parameters()]
    elif which == "image_norms":
        params = [p for m in image_tower_norms(model) for p in m.parameters(recurse=False)]
    elif which == "image_tower":
        params = list(image_tower(model).parameters())
    elif which == "sigma_only":  # a diagnostic: CLIP frozen, only SDS-CLIP's sigma trains
        params = []
    else:
        raise ValueError(f"train.trainable: unknown set {which!r} (one of {', '.join(TRAINABLE_SETS)})")
    return list({id(p): p for p in params}.values())


# ----------------------------------------------------------------------------------- checkpoint formats


def checkpoint_format(path: str | Path) -> str:
    """hf_clip (a CLIPModel directory), safetensors, openai_torchscript (a TorchScript zip archive) or torch
    (a torch.save file, or something unreadable that loading will name)."""
    from sdsclip.models.hf_clip import is_hf_clip_dir

    path = Path(path)
    if path.is_dir():
        return "hf_clip" if is_hf_clip_dir(path) else "directory"
    if path.suffix == ".safetensors":
        return "safetensors"
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError):
            return "torch"
        # torch.jit.save writes ``<archive>/constants.pkl`` and ``<archive>/code/``; torch.save does not.
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return "openai_torchscript"
    return "torch"


def _unreadable(path: Path, reason: str) -> WeightFileError:
    reason = " ".join(reason.split())[:160]
    return WeightFileError(
        f"{path}: unreadable student checkpoint ({reason}); student.checkpoint must be an open_clip state dict "
        "(.safetensors, or .pt/.bin from torch.save), an OpenAI TorchScript .pt or a Hugging Face CLIPModel "
        "directory; re-download or re-export it"
    )


def _check_torch_container(path: Path) -> None:
    """Cheap readability check before torch.load: a zip archive with an intact directory, or the legacy
    torch.save format; anything else (garbage, a truncated zip) is unreadable."""
    with open(path, "rb") as fh:
        head = fh.read(len(_LEGACY_TORCH_MAGIC))
    if head.startswith(_LEGACY_TORCH_MAGIC):
        return
    if not zipfile.is_zipfile(path):
        raise _unreadable(path, "neither a torch.save zip archive nor safetensors; truncated or not a checkpoint")
    try:
        with zipfile.ZipFile(path) as zf:
            if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in zf.namelist()):
                raise _unreadable(path, "zip archive without a torch.save data.pkl")
    except zipfile.BadZipFile as err:
        raise _unreadable(path, str(err)) from None


def _quickgelu_hint(arch: str) -> str:
    variant = f"{arch}-quickgelu"
    if variant in open_clip.list_models():
        return f"set student.arch: {variant}"
    return "set student.arch to an architecture whose open_clip config has quick_gelu: true"


def _registered_config(arch: str) -> dict[str, Any]:
    if arch not in open_clip.list_models():
        raise StudentLoadError(
            f"student.arch: unknown open_clip architecture {arch!r} (see open_clip.list_models(); "
            f"tiny configs live in {MODEL_CONFIG_DIR})"
        )
    return open_clip.get_model_config(arch)


def _fit_error(path: Path, arch: str, err: BaseException) -> StudentLoadError:
    # torch's message is "Error(s) in loading state_dict for CLIP:" + one line per key: keep the first key's.
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()] or [type(err).__name__]
    return StudentLoadError(f"{path}: does not fit architecture {arch!r}: {' '.join(lines[:2])[:240]}")


def _load_open_clip_file(arch: str, path: Path):
    """An open_clip state dict through open_clip's own factory (conversions, pos-embed resizing, strict)."""
    import pickle

    if path.suffix == ".safetensors":
        check_safetensors(path, "re-download or re-export it")
    else:
        _check_torch_container(path)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=str(path), weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):
            raise WeightFileError(
                f"{path}: holds pickled Python objects besides tensors, which safe loading (weights_only) refuses; "
                "re-save just the state dict (torch.save(model.state_dict(), ...) or safetensors)"
            ) from None
        raise _unreadable(path, str(err).splitlines()[0] if str(err) else "unpickling failed") from None
    except (EOFError, zipfile.BadZipFile) as err:
        raise _unreadable(path, str(err) or type(err).__name__) from None
    except RuntimeError as err:
        if "PytorchStreamReader" in str(err) or "zip archive" in str(err):
            raise _unreadable(path, str(err).splitlines()[0]) from None
        raise _fit_error(path, arch, err) from None
    except (KeyError, ValueError, StopIteration, AttributeError, TypeError) as err:
        raise _fit_error(path, arch, err) from None
    return model, preprocess


def _load_openai_torchscript(arch: str, path: Path):
    """OpenAI's TorchScript archive: its state dict (OpenAI's key names = open_clip CLIP's) into ``arch``."""
    cfg = _registered_config(arch)
    if not cfg.get("quick_gelu", False):
        raise StudentLoadError(
            f"{path}: an OpenAI TorchScript checkpoint, trained with QuickGELU, but student.arch {arch!r} uses "
            f"nn.GELU (it would load and silently compute the wrong activation); {_quickgelu_hint(arch)}"
        )
    try:
        # As open_clip.openai.load_openai_model, minus its fallback to an unrestricted torch.load (pickle).
        state = torch.jit.load(str(path), map_location="cpu").state_dict()
    except Exception as err:  # noqa: BLE001 - TorchScript raises RuntimeError and its own C++ error types
        raise _unreadable(path, str(err).splitlines()[0] if str(err) else type(err).__name__) from None
    model, _, preprocess = open_clip.create_model_and_transforms(arch, weights_only=True)
    persistent = model.state_dict()
    # Non-persistent buffers (the text causal mask) are traced into the archive; OpenAI's extras too.
    drop = set(_OPENAI_EXTRA_KEYS) | {n for n, _ in model.named_buffers() if n not in persistent}
    state = {k: v for k, v in state.items() if k not in drop}
    try:
        with torch.no_grad():
            model.load_state_dict(state, strict=True)  # copies OpenAI's fp16 tensors into fp32 parameters
    except RuntimeError as err:
        raise _fit_error(path, arch, err) from None
    return model.float().eval(), preprocess


def _from_model_cfg(model_cfg: dict[str, Any], preprocess_cfg: dict[str, Any]):
    """A plain open_clip CLIP from a config dict (what the factory does for a registered name)."""
    from open_clip.model import set_model_preprocess_cfg
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    model = open_clip.CLIP(**deepcopy(model_cfg))
    pp = merge_preprocess_dict(asdict(PreprocessCfg()), preprocess_cfg)
    set_model_preprocess_cfg(model, pp)
    return model, image_transform_v2(PreprocessCfg(**pp), is_train=False)


# The parts of an open_clip config that decide the weights' shapes and the activation, with their defaults.
_SHAPE_KEYS = {
    "vision_cfg": {"image_size": 224, "patch_size": 16, "layers": 12, "width": 768, "head_width": 64, "mlp_ratio": 4.0},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12, "mlp_ratio": 4.0},
}


def _shape_signature(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """What two configs must share to describe the same model; None for timm / HF-text towers."""
    if "timm_model_name" in cfg.get("vision_cfg", {}) or "hf_model_name" in cfg.get("text_cfg", {}):
        return None
    sig = {"embed_dim": cfg.get("embed_dim"), "quick_gelu": bool(cfg.get("quick_gelu", False))}
    for tower, defaults in _SHAPE_KEYS.items():
        for key, default in defaults.items():
            value = cfg.get(tower, {}).get(key, default)
            sig[f"{tower}.{key}"] = float(value) if key == "mlp_ratio" else value
    return sig


def _check_hf_arch_name(arch: str, path: Path, model_cfg: dict[str, Any]) -> None:
    """student.arch names the converted model: a registered open_clip name must describe the same model
    (else the saved student.json would name an architecture it is not); a new name is free."""
    if arch not in open_clip.list_models():
        return
    want, have = _shape_signature(model_cfg), _shape_signature(open_clip.get_model_config(arch))
    if want == have or want is None:  # None: a timm / HF tower, no signature to compare
        return
    known = have or {}
    diff = [f"{k} {known.get(k)} vs {v}" for k, v in want.items() if known.get(k) != v][:3]
    matches = [m for m in open_clip.list_models() if _shape_signature(open_clip.get_model_config(m) or {}) == want]
    hint = f"set student.arch: {matches[0]}" if matches else "set student.arch to a new name for this model"
    raise StudentLoadError(
        f"{path}: student.arch {arch!r} is a registered open_clip architecture that is not this "
        f"CLIPModel ({', '.join(diff)}); {hint}"
    )


def _build_from_hf(arch: str, path: Path) -> Student:
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    from sdsclip.models.hf_clip import HFCLIPError, has_hf_tokenizer, load_hf_clip, open_clip_config

    try:
        _check_hf_arch_name(arch, path, open_clip_config(path)[0])  # before the weights are read
        model_cfg, preprocess_cfg, state = load_hf_clip(path)
    except HFCLIPError as err:
        raise StudentLoadError(str(err)) from None
    context = model_cfg["text_cfg"]["context_length"]
    if has_hf_tokenizer(path):
        model_cfg["text_cfg"]["hf_tokenizer_name"] = str(path.resolve())  # open_clip local-dir: tokenizer in dir
        tokenizer = HFTokenizer(str(path), context_length=context)
    else:
        tokenizer = SimpleTokenizer(context_length=context)  # open_clip's default (OpenAI's BPE)
    model, preprocess = _from_model_cfg(model_cfg, preprocess_cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise StudentLoadError(
            f"{path}: weights do not fit the architecture its config.json describes: {first}"
        ) from None
    return Student(
        model=model.eval(),
        preprocess=preprocess,
        tokenizer=tokenizer,
        arch=arch,
        model_cfg=model_cfg,
        converted_from="hf_clip",
        extra={"hf_dir": str(path.resolve())},
    )


def build_student(arch: str, checkpoint: str | Path | None = None) -> Student:
    """Build ``arch`` through open_clip; load ``checkpoint`` if given (see the module docstring for the
    accepted formats), else random init. Errors are one line: StudentLoadError for a reference that does not
    fit, WeightFileError for a file that cannot be read."""
    if checkpoint is None:
        model_cfg = _registered_config(arch)
        model, _, preprocess = open_clip.create_model_and_transforms(arch, weights_only=True)
        return Student(model, preprocess, open_clip.get_tokenizer(arch), arch, model_cfg, "random")
    path = Path(checkpoint)
    if not path.exists():
        raise StudentLoadError(
            f"{path}: student checkpoint not found (student.checkpoint must be a local file "
            "or a Hugging Face CLIPModel directory)"
        )
    fmt = checkpoint_format(path)
    if fmt == "directory":
        raise StudentLoadError(
            f"{path}: a directory, but not a Hugging Face CLIPModel one (no config.json); "
            "student.checkpoint must be a checkpoint file or a CLIPModel save_pretrained dir"
        )
    if fmt == "hf_clip":
        if not arch or not isinstance(arch, str):
            raise StudentLoadError("student.arch: must name the student (any name for a CLIPModel directory)")
        return _build_from_hf(arch, path)
    model_cfg = _registered_config(arch)
    if fmt == "openai_torchscript":
        model, preprocess = _load_openai_torchscript(arch, path)
        converted = "openai_torchscript"
    else:
        model, preprocess = _load_open_clip_file(arch, path)
        converted = "open_clip"
    return Student(model, preprocess, open_clip.get_tokenizer(arch), arch, model_cfg, converted)


# ---------------------------------------------------------------------------------------- save / load


def _tokenizer_kind(tokenizer: Any) -> str:
    from open_clip.tokenizer import HFTokenizer

    if isinstance(tokenizer, HFTokenizer):
        return f"transformers {type(tokenizer.tokenizer).__name__} (saved in this directory)"
    return f"open_clip {type(tokenizer).__name__}"


def save_student(student: Student, out_dir: Path, meta: dict[str, Any] | None = None) -> Path:
    from open_clip.tokenizer import HFTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in student.model.state_dict().items()}
    save_file(state, str(out_dir / STUDENT_WEIGHTS))
    if student.model_cfg is not None:  # model configs are data: the dir rebuilds without the registry
        preprocess_cfg = dict(getattr(student.model.visual, "preprocess_cfg", {}) or {})
        (out_dir / OPEN_CLIP_CONFIG).write_text(
            json.dumps({"model_cfg": student.model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2, sort_keys=True)
            + "\n"
        )
    if isinstance(student.tokenizer, HFTokenizer):
        student.tokenizer.save_pretrained(str(out_dir))  # where open_clip's local-dir tokenizer looks
    info = {
        "arch": student.arch,
        "quick_gelu": student.quick_gelu,
        "converted_from": student.converted_from,
        "tokenizer": _tokenizer_kind(student.tokenizer),
        **student.extra,
        **(meta or {}),
    }
    (out_dir / STUDENT_META).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return out_dir


def is_student_dir(path: Path) -> bool:
    return (Path(path) / STUDENT_META).is_file()


def check_student_files(ref: str | Path) -> None:
    """WeightFileError (one line) unless every weight file of the student dir is a readable safetensors file."""
    ref = Path(ref)
    fix = f"re-run the stage that wrote {ref} (or restore it with dvc pull / dvc checkout)"
    check_safetensors(ref / STUDENT_WEIGHTS, fix)
    if (ref / SIGMA_WEIGHTS).exists():
        check_safetensors(ref / SIGMA_WEIGHTS, fix)


def load_student(ref: str | Path) -> Student:
    """Load a saved student directory; every weight file in it is checked first (WeightFileError)."""
    ref = Path(ref)
    if not is_student_dir(ref):
        raise StudentLoadError(f"{ref}: not a student directory (expected {STUDENT_META} and {STUDENT_WEIGHTS})")
    try:
        meta = json.loads((ref / STUDENT_META).read_text())
    except (OSError, ValueError) as err:
        raise StudentLoadError(f"{ref / STUDENT_META}: unreadable JSON ({err})") from None
    check_student_files(ref)
    arch = meta.get("arch")
    if not (ref / OPEN_CLIP_CONFIG).is_file():  # written before open_clip_config.json was saved
        return build_student(arch, ref / STUDENT_WEIGHTS)
    try:
        model_cfg = json.loads((ref / OPEN_CLIP_CONFIG).read_text())["model_cfg"]
        local = f"local-dir:{ref}"
        model, _, preprocess = open_clip.create_model_and_transforms(local, weights_only=True)
        tokenizer = open_clip.get_tokenizer(local)
    except RuntimeError as err:  # open_clip's strict load: these weights are not this config's
        raise _fit_error(ref / STUDENT_WEIGHTS, arch, err) from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise StudentLoadError(f"{ref / OPEN_CLIP_CONFIG}: cannot build the student ({first})") from None
    extra = {k: meta[k] for k in ("hf_dir",) if k in meta}
    return Student(model, preprocess, tokenizer, arch, model_cfg, meta.get("converted_from", "open_clip"), extra)


def load_sigma_state(ref: str | Path) -> dict[str, torch.Tensor] | None:
    path = Path(ref) / SIGMA_WEIGHTS
    if not path.exists():
        return None
    return load_file(str(check_safetensors(path, f"re-run the fine-tuning stage that wrote {Path(ref)}")))
