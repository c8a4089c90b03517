"""A Hugging Face ``CLIPModel`` directory (``save_pretrained`` layout: ``config.json`` + ``model.safetensors``)
converted into an open_clip ``CLIP``.

The open_clip model config is derived from the HF config (tower widths, depths, heads, MLP ratio, patch and
image size, context length, vocabulary, projection dim, LayerNorm eps, QuickGELU from ``hidden_act``, and
the text pooling HF uses), and the weights are renamed / reshaped: q, k, v projections concatenated into
``in_proj``, the two projections transposed (HF stores ``nn.Linear`` weights, open_clip ``x @ proj``
matrices). The result computes what ``CLIPModel.forward`` computes, so the converted student needs neither
the HF directory nor transformers at run time (except for an HF tokenizer, kept alongside the student).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sdsclip.errors import UserError
from sdsclip.weights import check_safetensors

HF_CONFIG = "config.json"
# Files whose presence means the HF dir carries its own tokenizer (fast tokenizer.json, or CLIP's BPE files).
HF_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
OPEN_CLIP_VOCAB = 49408  # open_clip's default SimpleTokenizer (OpenAI's BPE)
_ACTIVATIONS = {"quick_gelu": True, "gelu": False}  # HF hidden_act -> open_clip quick_gelu


class HFCLIPError(UserError, ValueError):
    """An HF directory that cannot become an open_clip student; the message is one line."""


def is_hf_clip_dir(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / HF_CONFIG).is_file()


def has_hf_tokenizer(path: str | Path) -> bool:
    return any((Path(path) / name).is_file() for name in HF_TOKENIZER_FILES)


# Tokenizer / preprocessing files save_pretrained writes beside the weights (hashed when present).
_SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "preprocessor_config.json",
)


def loaded_files(path: str | Path) -> list[str]:
    """Relative paths of what ``load_hf_clip`` reads from an HF dir: its config, the one weight source it
    loads (model.safetensors, else the sharded index + shards, else pytorch_model.bin) and the tokenizer
    files; not the TF / Flax / other-format siblings a hub snapshot may also hold."""
    path = Path(path)
    files = [HF_CONFIG] + [n for n in _SIDE_FILES if (path / n).is_file()]
    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").is_file():
        files.append("model.safetensors")
    elif index.is_file():
        try:
            files += [index.name, *sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            files.append(index.name)  # load_hf_clip names the broken index
    elif (path / "pytorch_model.bin").is_file():
        files.append("pytorch_model.bin")
    return [f for f in files if (path / f).is_file()]


def _read_config(path: Path):
    from transformers import CLIPConfig

    cfg_file = path / HF_CONFIG
    try:
        raw = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as err:
        raise HFCLIPError(f"{cfg_file}: unreadable JSON ({err})") from None
    if raw.get("model_type") != "clip":
        raise HFCLIPError(
            f"{cfg_file}: model_type {raw.get('model_type')!r} is not a transformers CLIPModel "
            "(model_type 'clip'); student.checkpoint must be a CLIPModel save_pretrained directory"
        )
    return CLIPConfig.from_json_file(str(cfg_file))  # fills the defaults a hub config leaves out


def open_clip_config(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(open_clip model_cfg, preprocess_cfg) equivalent to the CLIPModel config in ``path``."""
    path = Path(path)
    cfg = _read_config(path)
    tc, vc = cfg.text_config, cfg.vision_config
    acts = {tc.hidden_act, vc.hidden_act}
    if len(acts) != 1 or not acts <= set(_ACTIVATIONS):
        raise HFCLIPError(
            f"{path / HF_CONFIG}: hidden_act text {tc.hidden_act!r} / vision {vc.hidden_act!r}: "
            f"open_clip needs one activation for both towers, one of {sorted(_ACTIVATIONS)}"
        )
    if vc.num_channels != 3:
        raise HFCLIPError(f"{path / HF_CONFIG}: vision_config.num_channels {vc.num_channels}; open_clip expects 3")
    if vc.hidden_size % vc.num_attention_heads or tc.hidden_size % tc.num_attention_heads:
        raise HFCLIPError(f"{path / HF_CONFIG}: hidden_size not divisible by num_attention_heads")
    # HF's text pooling: eos_token_id == 2 is the legacy config (argmax of the ids = OpenAI's EOT, the largest
    # id); any other value pools the first position holding it (open_clip's 'eos' pool).
    pool = {"pool_type": "argmax"} if tc.eos_token_id == 2 else {"pool_type": "eos", "eos_id": int(tc.eos_token_id)}
    vision_cfg: dict[str, Any] = {
        "image_size": int(vc.image_size),
        "patch_size": int(vc.patch_size),
        "layers": int(vc.num_hidden_layers),
        "width": int(vc.hidden_size),
        "head_width": vc.hidden_size // vc.num_attention_heads,
        "mlp_ratio": vc.intermediate_size / vc.hidden_size,
    }
    text_cfg: dict[str, Any] = {
        "context_length": int(tc.max_position_embeddings),
        "vocab_size": int(tc.vocab_size),
        "width": int(tc.hidden_size),
        "heads": int(tc.num_attention_heads),
        "layers": int(tc.num_hidden_layers),
        "mlp_ratio": tc.intermediate_size / tc.hidden_size,
        **pool,
    }
    for sub, hf in ((vision_cfg, vc), (text_cfg, tc)):
        if hf.layer_norm_eps != 1e-5:  # open_clip's LayerNorm default
            sub["norm_kwargs"] = {"eps": float(hf.layer_norm_eps)}
    model_cfg = {
        "embed_dim": int(cfg.projection_dim),
        "quick_gelu": _ACTIVATIONS[vc.hidden_act],
        "vision_cfg": vision_cfg,
        "text_cfg": text_cfg,
    }
    preprocess_cfg: dict[str, Any] = {"size": int(vc.image_size)}
    proc = path / "preprocessor_config.json"
    if proc.is_file():  # the image processor's normalisation, if the dir has one (else open_clip's = OpenAI's)
        try:
            pp = json.loads(proc.read_text())
        except (OSError, ValueError) as err:
            raise HFCLIPError(f"{proc}: unreadable JSON ({err})") from None
        for key in ("image_mean", "image_std"):
            if key in pp:
                preprocess_cfg["mean" if key == "image_mean" else "std"] = [float(x) for x in pp[key]]
    return model_cfg, preprocess_cfg


def _hf_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    fix = f"re-export the CLIPModel with save_pretrained into {path}"
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(check_safetensors(single, fix)))
    if index.is_file():  # sharded save_pretrained
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise HFCLIPError(
                f"{index}: unreadable shard index ({type(err).__name__}: {' '.join(str(err).split())[:120]}); {fix}"
            ) from None
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(check_safetensors(path / shard, fix))))
        return state
    if (path / "pytorch_model.bin").is_file():
        try:
            return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch raises several types for a bad file
            reason = " ".join(str(err).split())[:160]
            raise HFCLIPError(f"{path / 'pytorch_model.bin'}: unreadable ({reason}); {fix}") from None
    raise HFCLIPError(f"{path}: no model.safetensors (or pytorch_model.bin) next to config.json; {fix}")


def convert_state_dict(hf: dict[str, torch.Tensor], model_cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """HF CLIPModel state dict -> open_clip CLIP state dict (same tensors, open_clip names and layouts)."""
    hf = {k.removeprefix("model."): v for k, v in hf.items()}
    out: dict[str, torch.Tensor] = {}

    def tower(src: str, dst: str, layers: int) -> None:
        for i in range(layers):
            s, d = f"{src}.encoder.layers.{i}", f"{dst}.resblocks.{i}"
            for part in ("weight", "bias"):
                out[f"{d}.attn.in_proj_{part}"] = torch.cat(
                    [hf[f"{s}.self_attn.{p}_proj.{part}"] for p in ("q", "k", "v")]
                )
                out[f"{d}.attn.out_proj.{part}"] = hf[f"{s}.self_attn.out_proj.{part}"]
                out[f"{d}.ln_1.{part}"] = hf[f"{s}.layer_norm1.{part}"]
                out[f"{d}.ln_2.{part}"] = hf[f"{s}.layer_norm2.{part}"]
                out[f"{d}.mlp.c_fc.{part}"] = hf[f"{s}.mlp.fc1.{part}"]
                out[f"{d}.mlp.c_proj.{part}"] = hf[f"{s}.mlp.fc2.{part}"]

    v, t = "vision_model", "text_model"
    out["visual.class_embedding"] = hf[f"{v}.embeddings.class_embedding"]
    out["visual.positional_embedding"] = hf[f"{v}.embeddings.position_embedding.weight"]
    out["visual.conv1.weight"] = hf[f"{v}.embeddings.patch_embedding.weight"]
    for part in ("weight", "bias"):
        out[f"visual.ln_pre.{part}"] = hf[f"{v}.pre_layrnorm.{part}"]
        out[f"visual.ln_post.{part}"] = hf[f"{v}.post_layernorm.{part}"]
        out[f"ln_final.{part}"] = hf[f"{t}.final_layer_norm.{part}"]
    tower(v, "visual.transformer", model_cfg["vision_cfg"]["layers"])
    out["visual.proj"] = hf["visual_projection.weight"].T.contiguous()
    out["token_embedding.weight"] = hf[f"{t}.embeddings.token_embedding.weight"]
    out["positional_embedding"] = hf[f"{t}.embeddings.position_embedding.weight"]
    tower(t, "transformer", model_cfg["text_cfg"]["layers"])
    out["text_projection"] = hf["text_projection.weight"].T.contiguous()
    out["logit_scale"] = hf["logit_scale"].reshape(())
    return out


def load_hf_clip(path: str | Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """(open_clip model_cfg, preprocess_cfg, open_clip state dict) of the CLIPModel directory ``path``."""
    path = Path(path)
    model_cfg, preprocess_cfg = open_clip_config(path)
    if not has_hf_tokenizer(path) and model_cfg["text_cfg"]["vocab_size"] != OPEN_CLIP_VOCAB:
        raise HFCLIPError(
            f"{path}: no tokenizer files ({' / '.join(HF_TOKENIZER_FILES)}) and vocab_size "
            f"{model_cfg['text_cfg']['vocab_size']} is not open_clip's default tokenizer's "
            f"{OPEN_CLIP_VOCAB}; save the model's tokenizer into {path} (tokenizer.save_pretrained)"
        )
    hf = _hf_state_dict(path)
    try:
        state = convert_state_dict(hf, model_cfg)
    except KeyError as err:
        raise HFCLIPError(
            f"{path}: weights miss {err.args[0]!r}, which its config.json implies; "
            "the weights and config.json are of different models"
        ) from None
    return model_cfg, preprocess_cfg, state
