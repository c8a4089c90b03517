"""The teacher: a text-conditioned diffusion model (diffusers UNet2DConditionModel + scheduler + text encoder).

One loader serves both configurations because the tiny teacher is saved in Stable Diffusion's own
directory layout (``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) plus ``teacher.json``:
- real path: a local SD directory; images reach the UNet through its ``vae/`` (latents);
- embedded default: a tiny UNet trained from scratch whose "latent" is the 2x2 pixel-unshuffled image
  (lossless, and ~8x cheaper than running the UNet at full resolution).

``Teacher`` runs Stable Diffusion's plain forward. The tiny teacher's research options (sdsclip.config
RESEARCH_FIELDS) live in sdsclip.models.teacher_options; ``OptionsTeacher`` is picked only when one of its
forward options is on (``make_teacher``), so the default tiny teacher and every real SD teacher never run them.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5EncoderModel

from sdsclip.config import TeacherConfig, TinyUNetConfig
from sdsclip.errors import UserError
from sdsclip.models.teacher_options import (
    CAPTION_MAP_DIR,
    CaptionMap,
    CaptionMapError,
    TeacherOptions,
    caption_map_for,
    forward_options,
    init_position_embeddings,
    t5_text_encoder,
    tiny_unet_options,
)

TEACHER_META = "teacher.json"
SD_SUBFOLDERS = ("unet", "text_encoder", "tokenizer", "scheduler")
PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
#: text encoder classes a teacher dir may hold, by the ``architectures`` entry of text_encoder/config.json
TEXT_ENCODERS = {"CLIPTextModel": CLIPTextModel, "T5EncoderModel": T5EncoderModel}


class TeacherLoadError(UserError, ValueError):
    """A teacher directory that cannot be used; the message is one line for the user."""


@dataclass
class Teacher:
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel | T5EncoderModel
    tokenizer: Any
    scheduler: DDPMScheduler
    latent: str  # "pixel_unshuffle" | "vae"
    image_size: int
    vae: Any = None
    unshuffle_factor: int = 2  # pixel_unshuffle latent: image side / latent side

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """Shape (C, H, W) of the latent the UNet denoises: what sigma must produce from a CLIP embedding
        (the UNet's output channels: its input may also carry fixed coordinate channels)."""
        cfg = self.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return (cfg.out_channels, size, size)

    def extra_modules(self) -> dict[str, torch.nn.Module]:
        """Modules beside the UNet and the text encoder that train with them (tiny teacher options only)."""
        return {}

    def trainable_modules(self) -> torch.nn.ModuleDict:
        """What the teacher's pretraining optimises (the VAE of a real SD teacher is never trained here)."""
        return torch.nn.ModuleDict({"unet": self.unet, "text_encoder": self.text_encoder, **self.extra_modules()})

    def to(self, device: torch.device | str) -> Teacher:
        for m in (self.unet, self.text_encoder, self.vae, *self.extra_modules().values()):
            if m is not None:
                m.to(device)
        return self

    def freeze(self) -> Teacher:
        """Frozen teacher: eval mode and no parameter gradients (gradients may still flow *through* it)."""
        for m in (self.unet, self.text_encoder, self.vae, *self.extra_modules().values()):
            if m is not None:
                m.eval()
                m.requires_grad_(False)
        return self

    def enable_gradient_checkpointing(self) -> Teacher:
        """Recompute the UNet's activations in backward (memory for compute); gradients into z unchanged."""
        self.unet.enable_gradient_checkpointing()
        return self

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        enc = self.tokenizer(
            list(captions),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return enc.input_ids

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """Cross-attention conditioning c_text (B, tokens, dim), as Stable Diffusion uses it."""
        ids = self.tokenize(captions).to(self.device)
        return self.text_encoder(ids).last_hidden_state

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> teacher latents (B, C, h, w)."""
        pixels = pixels.to(self.device)
        if self.latent == "vae":
            dist = self.vae.encode(pixels).latent_dist
            return dist.mean * self.vae.config.scaling_factor
        return F.pixel_unshuffle(pixels, self.unshuffle_factor)

    def _predict(
        self, latents: torch.Tensor, cond: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, the UNet's raw prediction at x_t, as fp32) for latents noised with ``noise`` to timestep ``t``:
        Stable Diffusion's forward, the UNet conditioned on the caption's states (the tiny teacher's research
        options have their own, ``sdsclip.models.teacher_options.TeacherOptions._predict``).

        Under mixed precision (accelerate's autocast wraps the whole step) only the UNet runs in bf16/fp16:
        z, eps, alpha_bar and x_t stay fp32 (sqrt(1 - alpha_bar) at t = 20 is 2.3 % off in bf16)."""
        with torch.autocast(latents.device.type, enabled=False):
            noisy = self.scheduler.add_noise(latents.float(), noise.float(), t)
        return noisy, self.unet(noisy, t, encoder_hidden_states=cond).sample.float()

    def epsilon_prediction(
        self, latents: torch.Tensor, cond: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """eps_phi(sqrt(a_t) z + sqrt(1-a_t) eps, t, c) in fp32, whatever the checkpoint's ``prediction_type``:
        UNets trained to predict v (SD 2.x 768-v) or x0 are converted to their epsilon prediction."""
        noisy, pred = self._predict(latents, cond, t, noise)
        kind = getattr(self.scheduler.config, "prediction_type", "epsilon")
        with torch.autocast(pred.device.type, enabled=False):  # fp32 (pred is fp32 already)
            if kind != "epsilon":
                abar = self.scheduler.alphas_cumprod.to(pred.device)[t.to(pred.device)].view(-1, 1, 1, 1).float()
                if kind == "v_prediction":  # eps = sqrt(abar) v + sqrt(1 - abar) x_t
                    pred = abar.sqrt() * pred + (1 - abar).sqrt() * noisy.float()
                elif kind == "sample":  # eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)
                    pred = (noisy.float() - abar.sqrt() * pred) / (1 - abar).sqrt()
                else:
                    raise TeacherLoadError(f"scheduler prediction_type {kind!r} is not supported")
            return pred

    def epsilon_error(
        self, latents: torch.Tensor, cond: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """Per-sample ||eps_phi(sqrt(a_t) z + sqrt(1-a_t) eps, t, c) - eps||^2 (mean over latent dims), on the
        epsilon prediction (``epsilon_prediction``)."""
        pred = self.epsilon_prediction(latents, cond, t, noise)
        with torch.autocast(pred.device.type, enabled=False):  # the error in fp32
            return (pred - noise.float()).pow(2).flatten(1).mean(1)

    def denoising_loss(
        self, latents: torch.Tensor, cond: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """Per-sample training loss in the UNet's own target (eps, or v for ``v_prediction``): pretraining.

        Same quantity as ``epsilon_error`` for an eps-UNet; for a v-UNet it is epsilon_error / alpha_bar(t)."""
        kind = getattr(self.scheduler.config, "prediction_type", "epsilon")
        if kind == "epsilon":
            return self.epsilon_error(latents, cond, t, noise)
        if kind != "v_prediction":
            raise TeacherLoadError(f"pretraining with prediction_type {kind!r} is not supported")
        _, pred = self._predict(latents, cond, t, noise)
        with torch.autocast(pred.device.type, enabled=False):
            target = self.scheduler.get_velocity(latents.float(), noise.float(), t)
            return (pred - target).pow(2).flatten(1).mean(1)


@dataclass
class OptionsTeacher(TeacherOptions, Teacher):
    """A tiny teacher with forward options on (``sdsclip.models.teacher_options``): its own ``_predict``."""

    coord_channels: int = 0  # fixed x/y channels appended to the UNet input (CoordConv)
    caption_map: CaptionMap | None = None  # caption -> spatial channels appended to the UNet input


def make_teacher(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel | T5EncoderModel,
    tokenizer: Any,
    scheduler: DDPMScheduler,
    *,
    coord_channels: int = 0,
    caption_map: CaptionMap | None = None,
    **kwargs: Any,
) -> Teacher:
    """A ``Teacher``, or an ``OptionsTeacher`` when a tiny teacher's forward option is on (coordinate channels,
    a caption map, or a UNet with pooled conditioning): every real Stable Diffusion dir gets the plain one."""
    if forward_options(unet, coord_channels, caption_map):
        return OptionsTeacher(
            unet, text_encoder, tokenizer, scheduler, coord_channels=coord_channels, caption_map=caption_map, **kwargs
        )
    return Teacher(unet, text_encoder, tokenizer, scheduler, **kwargs)


class TextConditioningCache:
    """The frozen teacher's text conditioning c_text, computed once per distinct caption.

    An LRU of at most ``max_entries`` captions, kept on the teacher's device (SD-1.x: 77 x 768 floats =
    236 kB per caption, ~1 GB for 4096). ``max_entries = 0`` encodes every call (the per-step baseline).
    It pays only when captions repeat within ``max_entries`` steps' worth of batches: COCO's 590k distinct
    captions never hit (benchmarks/train_step.py measures both), hence train.text_cache_size 0 by default.
    Each entry is a copy of its row: a view would keep the whole batch's encoder output alive."""

    def __init__(self, teacher: Teacher, max_entries: int):
        self.teacher, self.max_entries = teacher, int(max_entries)
        self._rows: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.encoded = 0  # captions run through the text encoder so far

    def __len__(self) -> int:
        return len(self._rows)

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> torch.Tensor:
        captions = list(captions)
        if self.max_entries == 0:
            self.encoded += len(captions)
            return self.teacher.encode_text(captions)
        missing = list(dict.fromkeys(c for c in captions if c not in self._rows))
        fresh: dict[str, torch.Tensor] = {}
        if missing:
            fresh = {c: row.clone() for c, row in zip(missing, self.teacher.encode_text(missing))}
            self.encoded += len(missing)
        out = []
        for c in captions:
            row = fresh.get(c)
            if row is None:
                row = self._rows[c]
                self._rows.move_to_end(c)
            else:
                self._rows[c] = row
            out.append(row)
        while len(self._rows) > self.max_entries:
            self._rows.popitem(last=False)
        return torch.stack(out)


# ---------------------------------------------------------------- tiny teacher (embedded default)


def caption_vocabulary(captions: list[str]) -> list[str]:
    words = {w for c in captions for w in re.findall(r"[a-z0-9]+", c.lower())}
    return sorted(words)


def build_word_tokenizer(vocabulary: list[str], max_tokens: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the caption vocabulary (built offline; saved like any HF tokenizer)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate([PAD, UNK, BOS, EOS, *vocabulary])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        model_max_length=max_tokens,
    )


def build_tiny_teacher(cfg: TeacherConfig, vocabulary: list[str]) -> Teacher:
    """A freshly initialised tiny pixel-space teacher (``teacher.tiny``) over the world's word vocabulary."""
    tiny: TinyUNetConfig = cfg.tiny
    factor = tiny.unshuffle_factor
    if cfg.image_size % factor:
        raise TeacherLoadError(
            f"teacher.image_size: must be a multiple of teacher.tiny.unshuffle_factor {factor} (got {cfg.image_size})"
        )
    tokenizer = build_word_tokenizer(vocabulary, tiny.max_caption_tokens)
    text_encoder = _tiny_text_encoder(tiny, tokenizer)
    unet = _tiny_unet(tiny, cfg.image_size)
    scheduler = DDPMScheduler(
        num_train_timesteps=tiny.train_timesteps,
        beta_schedule="squaredcos_cap_v2",
        prediction_type=tiny.prediction_type,
    )
    return make_teacher(
        unet,
        text_encoder,
        tokenizer,
        scheduler,
        latent="pixel_unshuffle",
        image_size=cfg.image_size,
        unshuffle_factor=factor,
        coord_channels=2 if tiny.coord_channels else 0,
        caption_map=caption_map_for(tiny, cfg.image_size),
    )


def _tiny_text_encoder(tiny: TinyUNetConfig, tokenizer: PreTrainedTokenizerFast) -> torch.nn.Module:
    """The tiny teacher's freshly initialised T5 or CLIP text encoder."""
    if tiny.text_encoder == "t5":  # research option (teacher_options)
        if tiny.text_width % tiny.text_heads:
            raise TeacherLoadError(
                f"teacher.tiny.text_width {tiny.text_width} must be a multiple of text_heads {tiny.text_heads}"
            )
        return t5_text_encoder(tiny, tokenizer)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=tiny.text_width,
            intermediate_size=4 * tiny.text_width,
            num_hidden_layers=tiny.text_layers,
            num_attention_heads=tiny.text_heads,
            max_position_embeddings=tiny.max_caption_tokens,
            projection_dim=tiny.text_width,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    init_position_embeddings(text_encoder, tiny)  # research option: null (the default) leaves them
    return text_encoder


def _tiny_unet(tiny: TinyUNetConfig, image_size: int) -> UNet2DConditionModel:
    """The tiny teacher's freshly initialised UNet on pixel-unshuffled images."""
    factor = tiny.unshuffle_factor
    # Cross-attention everywhere but the full-resolution block (as in the feasibility study: cheap and enough);
    # the research options may add input channels, pooled conditioning, FiLM, full-resolution cross-attention.
    options = tiny_unet_options(tiny)
    extra_in = options.pop("extra_in_channels")
    return UNet2DConditionModel(
        sample_size=image_size // factor,
        in_channels=3 * factor * factor + extra_in,
        out_channels=3 * factor * factor,
        block_out_channels=tuple(tiny.block_out_channels),
        layers_per_block=tiny.layers_per_block,
        cross_attention_dim=tiny.text_width,
        attention_head_dim=tiny.attention_head_dim,
        norm_num_groups=min(8, *tiny.block_out_channels),
        **options,
    )


def save_teacher(teacher: Teacher, out_dir: Path, meta: dict[str, Any] | None = None) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    teacher.unet.save_pretrained(out_dir / "unet")
    teacher.text_encoder.save_pretrained(out_dir / "text_encoder")
    teacher.tokenizer.save_pretrained(out_dir / "tokenizer")
    teacher.scheduler.save_pretrained(out_dir / "scheduler")
    info = {"latent": teacher.latent, "image_size": teacher.image_size, **(meta or {})}
    if teacher.latent == "pixel_unshuffle":
        info["unshuffle_factor"] = teacher.unshuffle_factor
    if isinstance(teacher, OptionsTeacher):
        info.update(teacher.option_meta())
        if teacher.caption_map is not None:
            teacher.caption_map.save(out_dir / CAPTION_MAP_DIR)
    (out_dir / TEACHER_META).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return out_dir


def is_teacher_dir(path: Path) -> bool:
    path = Path(path)
    return (path / TEACHER_META).is_file() or (path / "model_index.json").is_file()


def read_json_config(path: Path) -> dict[str, Any]:
    """A model folder's JSON config; an unreadable one raises TeacherLoadError."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise TeacherLoadError(f"{path}: unreadable model config ({' '.join(str(err).split())})") from None


# What diffusers / transformers ``from_pretrained`` read from a local folder, in their order of preference
# (diffusers 0.3x-0.4x, transformers 4.x-5.x, no ``variant``): a sharded safetensors index, else the single
# safetensors file, else the pickled .bin. fp16 variants, .ckpt files and unlisted subfolders are never read.
_DIFFUSERS_WEIGHTS = (
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
)
_TRANSFORMERS_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
#: tokenizer files AutoTokenizer may read (whichever of them the folder has)
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)


@dataclass
class TeacherFiles:
    """The files of a teacher dir that load_teacher reads, relative to the dir: small configs and weights."""

    configs: list[str]
    weights: list[str]

    @property
    def all(self) -> list[str]:
        return sorted(set(self.configs) | set(self.weights))


def _weight_files(
    path: Path, sub: str, names: tuple[str, ...], explicit: str | None = None
) -> tuple[list[str], list[str]]:
    """(index files, weight files) that from_pretrained reads in ``path/sub``: the first of ``names`` present;
    an ``*.index.json`` brings the shards its weight_map lists."""
    folder = path / sub
    for name in (explicit,) if explicit else names:
        if not (folder / name).is_file():
            continue
        if not name.endswith(".index.json"):
            return [], [f"{sub}/{name}"]
        try:
            shards = sorted(set(json.loads((folder / name).read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise TeacherLoadError(
                f"{folder / name}: unreadable shard index ({' '.join(str(err).split())[:160]}); re-download the model"
            ) from None
        return [f"{sub}/{name}"], [f"{sub}/{shard}" for shard in shards]
    raise TeacherLoadError(
        f"{folder}: no weight file ({' or '.join(((explicit,) if explicit else names)[:2])}); not a save_pretrained dir"
    )


def teacher_files(path: str | Path, latent: str | None = None, with_vae: bool = True) -> TeacherFiles:
    """Exactly what ``load_teacher(path, latent, with_vae=with_vae)`` reads (no weights opened): the configs of
    unet, text_encoder, scheduler, tokenizer (and vae), model_index.json / teacher.json, and the one weight
    file (or shard set) per component that diffusers / transformers pick."""
    path, meta, latent = check_teacher_dir(path, latent)
    configs = [name for name in ("model_index.json", TEACHER_META) if (path / name).is_file()]
    configs += ["unet/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json"]
    configs += [f"tokenizer/{name}" for name in TOKENIZER_FILES if (path / "tokenizer" / name).is_file()]
    weights: list[str] = []
    text_cfg = read_json_config(path / "text_encoder" / "config.json")
    parts = [
        ("unet", _DIFFUSERS_WEIGHTS, None),
        ("text_encoder", _TRANSFORMERS_WEIGHTS, text_cfg.get("transformers_weights")),
    ]
    if latent == "vae" and with_vae:
        configs.append("vae/config.json")
        parts.append(("vae", _DIFFUSERS_WEIGHTS, None))
    for sub, names, explicit in parts:
        index, files = _weight_files(path, sub, names, explicit)
        configs += index
        weights += files
    if meta.get("caption_map_channels"):
        configs.append(f"{CAPTION_MAP_DIR}/config.json")
        weights.append(f"{CAPTION_MAP_DIR}/model.safetensors")
    return TeacherFiles(configs, weights)


def check_teacher_weights(path: str | Path, latent: str | None = None, with_vae: bool = True) -> TeacherFiles:
    """check_teacher_dir plus every weight file load_teacher will read: a missing, truncated or corrupt one
    raises sdsclip.weights.WeightFileError naming it (safetensors headers only: milliseconds per file)."""
    from sdsclip.weights import check_weight_files

    path = Path(path)
    files = teacher_files(path, latent, with_vae)
    fix = (
        "re-run the teacher's pretraining (dvc repro pretrain_teacher)"
        if (path / TEACHER_META).is_file()
        else "re-download this Stable Diffusion directory (teacher.pretrained_dir)"
    )
    # The caption map (tiny teacher option) has its own one-line error in CaptionMap.load.
    check_weight_files([path / w for w in files.weights if not w.startswith(f"{CAPTION_MAP_DIR}/")], fix)
    return files


def scheduler_timesteps(path: str | Path) -> int:
    """num_train_timesteps of a teacher dir's scheduler (scheduler/scheduler_config.json; no weights): the
    UNet knows t in [0, num_train_timesteps - 1]. diffusers' default 1000 when the key is absent."""
    cfg = read_json_config(Path(path) / "scheduler" / "scheduler_config.json")
    return int(cfg.get("num_train_timesteps", 1000))


def check_t_range(path: str | Path, t_min: int, t_max: int, min_key: str, max_key: str) -> int:
    """Raise TeacherLoadError (one line: key, value, the teacher's limit) unless every t in [t_min, t_max]
    (both drawn: torch.randint(t_min, t_max + 1) / linspace) is a timestep of the teacher's scheduler."""
    n = scheduler_timesteps(path)
    for key, value in ((max_key, t_max), (min_key, t_min)):
        if not 0 <= value <= n - 1:
            raise TeacherLoadError(
                f"{key} = {value} is outside the teacher's timesteps 0..{n - 1} "
                f"({Path(path) / 'scheduler' / 'scheduler_config.json'}: num_train_timesteps "
                f"{n}); set {key} <= {n - 1}"
            )
    return n


def check_teacher_dir(path: str | Path, latent: str | None = None) -> tuple[Path, dict[str, Any], str]:
    """Check a teacher directory without loading any weights: (path, teacher.json meta, latent kind).

    Raises TeacherLoadError naming what is missing (the directory, a Stable Diffusion subfolder, or the
    UNet's / scheduler's config), so a bad teacher stops a run before any compute is spent."""
    path = Path(path)
    if not path.is_dir():
        raise TeacherLoadError(f"{path}: teacher directory not found (teacher.pretrained_dir must be a local dir)")
    meta = read_json_config(path / TEACHER_META) if (path / TEACHER_META).is_file() else {}
    latent = meta.get("latent", latent or "vae")
    needed = SD_SUBFOLDERS + (("vae",) if latent == "vae" else ())
    missing = [s for s in needed if not (path / s).is_dir()]
    if missing:
        raise TeacherLoadError(f"{path}: missing Stable Diffusion subfolder(s) {', '.join(missing)}")
    for sub in ("unet",) + (("vae",) if latent == "vae" else ()):
        if not (path / sub / "config.json").is_file():
            raise TeacherLoadError(f"{path}: {sub}/config.json missing (not a diffusers save_pretrained dir)")
    if not (path / "scheduler" / "scheduler_config.json").is_file():
        raise TeacherLoadError(f"{path}: scheduler/scheduler_config.json missing (not a diffusers save_pretrained dir)")
    return path, meta, latent


def latent_shape_of(path: str | Path) -> tuple[int, int, int]:
    """(C, H, W) of the latent a teacher dir's UNet denoises, read from unet/config.json (no weights loaded):
    (4, 64, 64) for Stable Diffusion 1.x at 512 px."""
    cfg = read_json_config(Path(path) / "unet" / "config.json")
    size: Any = cfg.get("sample_size")
    size = size if isinstance(size, int) else size[0]
    return (int(cfg.get("out_channels", cfg["in_channels"])), int(size), int(size))


def load_teacher(
    path: str | Path, latent: str | None = None, image_size: int | None = None, with_vae: bool = True
) -> Teacher:
    """Load a teacher from a local SD-layout directory (the tiny teacher or a real Stable Diffusion).

    ``with_vae=False`` skips the VAE: SDS needs only the UNet, the text encoder and the scheduler (its
    latents come from sigma, not from images); scoring images needs the VAE."""
    path, meta, latent = check_teacher_dir(path, latent)
    check_teacher_weights(path, latent, with_vae)  # WeightFileError naming a truncated file, before reading any
    unet = UNet2DConditionModel.from_pretrained(path / "unet")
    arch = (read_json_config(path / "text_encoder" / "config.json").get("architectures") or ["CLIPTextModel"])[0]
    if arch not in TEXT_ENCODERS:
        raise TeacherLoadError(
            f"{path}: text_encoder architecture {arch!r} is not supported (one of {', '.join(TEXT_ENCODERS)})"
        )
    text_encoder = TEXT_ENCODERS[arch].from_pretrained(path / "text_encoder")
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    scheduler = DDPMScheduler.from_pretrained(path / "scheduler")
    vae = None
    if latent == "vae" and with_vae:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(path / "vae")
    if image_size is None:
        image_size = meta.get("image_size")
    if image_size is None:  # SD: latent side x VAE downsampling factor
        factor = int(meta.get("unshuffle_factor", 2))
        if latent == "vae":
            factor = 2 ** (len(read_json_config(path / "vae" / "config.json")["block_out_channels"]) - 1)
        image_size = latent_shape_of(path)[1] * factor
    return make_teacher(
        unet,
        text_encoder,
        tokenizer,
        scheduler,
        latent=latent,
        image_size=int(image_size),
        vae=vae,
        unshuffle_factor=int(meta.get("unshuffle_factor", 2)),
        coord_channels=int(meta.get("coord_channels", 0)),
        caption_map=load_caption_map(path) if meta.get("caption_map_channels") else None,
    )


def load_caption_map(path: Path) -> CaptionMap:
    """The saved caption map of a tiny teacher dir (research option); an unusable one is a TeacherLoadError."""
    try:
        return CaptionMap.load(path / CAPTION_MAP_DIR)
    except CaptionMapError as err:
        raise TeacherLoadError(str(err)) from None


def teacher_pixels(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] images -> the [-1, 1] range diffusion models are trained on."""
    return images * 2.0 - 1.0
