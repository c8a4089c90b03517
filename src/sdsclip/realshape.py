"""`sdsclip realshape` (`make realshape`): the real path end to end, at the real model shapes, on the CPU.

Nothing real can be downloaded, so this writes random-init stand-ins with the real shapes and formats, then
runs the whole chain on them exactly as the real configuration does (docs/real-data.md):

  fixtures (cached) -> ingest -> validate -> pretrain student / teacher (verify the checkpoint / SD dir and
  hash them) -> train control (lambda 0) and SDS -> Winoground / ARO / zero-shot / SugarCrepe for the three
  students and the teacher -> report -> register (MLflow, in the workdir)

Fixtures (``{workdir}/fixtures/``, reused while their recorded config matches, so reruns skip them):
- ``coco/``: COCO-format ``annotations/captions_train2017.json`` (5 captions per image) + ``train2017/*.jpg``,
  JPEGs of COCO's sizes (640x480, 640x427, 480x640, ...);
- ``clip/``: an open_clip ``ViT-B-32-quickgelu`` saved as OpenAI's TorchScript checkpoint (fp16, OpenAI's
  state-dict names and extra ``input_resolution`` / ``context_length`` / ``vocab_size`` entries);
- ``stable-diffusion-v1-5/``: SD-1.5's layout and configs written by ``save_pretrained`` (fp32 safetensors):
  UNet2DConditionModel, AutoencoderKL, CLIPTextModel (ViT-L/14 text: 12 layers, width 768, 77 tokens),
  a CLIPTokenizer built offline from open_clip's packaged BPE (the same byte-level BPE as OpenAI CLIP /
  SD), PNDMScheduler, model_index.json;
- ``world/``: Winoground / ARO / ImageFolder sets (sdsclip.synth at ``world.image_size``; SugarCrepe is derived
  from its Winoground set), item counts from the ``realshape`` profile.

Scale ``real`` proves the real code path at real sizes (sigma: 512 -> 4x64x64, the VAE at 512 px, 77-token
conditioning); scale ``tiny`` is the same chain and formats with shrunken models (the test suite's). Each stage
runs in its own process by default (as DVC runs them), so its wall time and peak RSS are its own; both go to
``{workdir}/summary.json``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdsclip.config import DataConfig, Params, params_to_dict
from sdsclip.errors import UserError

SPLIT = "train2017"
FIXTURE_VERSION = 2  # bump when a writer's output changes, so cached fixtures are rebuilt

#: Stable Diffusion 1.5's component configs (runwayml/stable-diffusion-v1-5), from its published config files.
SD15_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD15_VAE: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD15_TEXT: dict[str, Any] = {  # openai/clip-vit-large-patch14's text tower, as SD-1.5 ships it
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}
SD15_SCHEDULER: dict[str, Any] = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
SD15_MODEL_INDEX: dict[str, Any] = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.6.0",
    "feature_extractor": [None, None],
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
#: COCO's common image sizes (width, height)
COCO_SIZES = ((640, 480), (640, 427), (480, 640), (612, 612), (500, 375))


@dataclass(frozen=True)
class Scale:
    """Shapes of the fixtures: ``real`` = ViT-B/32 + SD-1.5; ``tiny`` = the same formats, shrunken."""

    name: str
    student_arch: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    coco_images: int
    coco_sizes: tuple[tuple[int, int], ...]

    @property
    def teacher_image_size(self) -> int:
        """Pixels the VAE reads: latent side x the VAE's downsampling factor (SD-1.5: 64 x 8 = 512)."""
        return int(self.unet["sample_size"]) * 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def latent_shape(self) -> list[int]:
        return [int(self.unet["out_channels"]), int(self.unet["sample_size"]), int(self.unet["sample_size"])]


SCALES: dict[str, Scale] = {
    "real": Scale("real", "ViT-B-32-quickgelu", SD15_UNET, SD15_VAE, SD15_TEXT, 64, COCO_SIZES),
    "tiny": Scale(
        "tiny",
        "sdsclip-tiny-vit-quickgelu",
        {
            **SD15_UNET,
            "block_out_channels": [32, 64],
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "layers_per_block": 1,
            "cross_attention_dim": 32,
            "norm_num_groups": 8,
            "sample_size": 8,
        },
        {
            **SD15_VAE,
            "block_out_channels": [16, 32],
            "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2,
            "layers_per_block": 1,
            "norm_num_groups": 8,
            "sample_size": 16,
        },
        {
            **SD15_TEXT,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 2,
            "num_hidden_layers": 2,
            "projection_dim": 32,
        },  # 77 tokens and the real 49408-token vocabulary kept
        8,
        ((64, 48), (48, 64), (56, 56)),
    ),
}


class RealshapeError(UserError, ValueError):
    """The realshape run cannot go on; one line for the user."""


# ------------------------------------------------------------------------------------------ fixture writers


def write_coco(
    root: Path, n_images: int, sizes: tuple[tuple[int, int], ...], seed: int = 0, split: str = SPLIT
) -> dict[str, int]:
    """COCO-format captions JSON (5 captions per image) + JPEG images of COCO's sizes under ``root``.

    Each image is a synthetic two-object scene (sdsclip.synth) on a larger canvas, so captions are true of it."""
    import numpy as np
    from PIL import Image

    from sdsclip import synth

    rng = np.random.default_rng([seed, 2017])
    image_dir = root / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index in range(n_images):
        width, height = sizes[index % len(sizes)]
        canvas = min(width, height)
        while True:
            a = (synth.COLORS[rng.integers(len(synth.COLORS))], synth.SHAPES[rng.integers(len(synth.SHAPES))])
            b = (synth.COLORS[rng.integers(len(synth.COLORS))], synth.SHAPES[rng.integers(len(synth.SHAPES))])
            if a != b:
                break
        relation = synth.RELATIONS[rng.integers(len(synth.RELATIONS))]
        scene = synth.sample_two_object_scene(rng, canvas, 20, a, relation, b)
        photo = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 60, 3)))
        photo.paste(synth.render(scene, canvas), ((width - canvas) // 2, (height - canvas) // 2))
        image_id = 100000 + index
        file_name = f"{image_id:012d}.jpg"
        photo.save(image_dir / file_name, format="JPEG", quality=90)
        images.append({"id": image_id, "width": width, "height": height, "file_name": file_name, "license": 1})
        relational = synth.relational_caption(a, relation, b)
        captions = [
            relational,
            synth.relational_caption(b, synth.CONVERSE_RELATION[relation], a),
            synth.conjunctive_caption(a, b),
            synth.conjunctive_caption(b, a),
            f"a photo of {relational}",
        ]
        for caption in captions:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "caption": caption})
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    coco = {
        "info": {"description": "sdsclip realshape fixture", "version": "1.0", "year": 2017},
        "licenses": [{"id": 1, "name": "synthetic", "url": ""}],
        "images": images,
        "annotations": annotations,
    }
    (root / "annotations" / f"captions_{split}.json").write_text(json.dumps(coco) + "\n")
    return {"images": len(images), "captions": len(annotations)}


def clip_bpe() -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) of OpenAI CLIP's byte-level BPE, built from open_clip's packaged merges file exactly as
    OpenAI's SimpleTokenizer builds them: 256 byte symbols, the same with ``</w>``, 48894 merges, the two
    specials (49408 tokens: the vocab.json / merges.txt of openai/clip-vit-large-patch14 and SD's tokenizer)."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def _added_token(content: str) -> dict[str, Any]:
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }


def write_clip_tokenizer(out_dir: Path, max_length: int = 77) -> Path:
    """SD-1.5's ``tokenizer/`` as it ships: vocab.json + merges.txt (:func:`clip_bpe`), tokenizer_config.json
    (CLIPTokenizer, 77 tokens, lower case) and special_tokens_map.json; no tokenizer.json, so transformers
    builds its tokenizer from the BPE files as it does for the real directory."""
    vocab, merges = clip_bpe()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    special = {
        "bos_token": _added_token(bos),
        "eos_token": _added_token(eos),
        "pad_token": eos,
        "unk_token": _added_token(eos),
    }
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = {
        "add_prefix_space": False,
        **special,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": max_length,
        "name_or_path": "openai/clip-vit-large-patch14",
        "special_tokens_map_file": "./special_tokens_map.json",
        "tokenizer_class": "CLIPTokenizer",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


def write_sd_dir(out_dir: Path, scale: Scale, seed: int = 0) -> dict[str, Any]:
    """A Stable-Diffusion-1.5-layout directory of random-init components with ``scale``'s shapes."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    counts = {}
    unet = UNet2DConditionModel(**scale.unet)
    counts["unet"] = sum(p.numel() for p in unet.parameters())
    unet.save_pretrained(out_dir / "unet", safe_serialization=True)
    del unet
    vae = AutoencoderKL(**scale.vae)
    counts["vae"] = sum(p.numel() for p in vae.parameters())
    vae.save_pretrained(out_dir / "vae", safe_serialization=True)
    del vae
    text_cfg = {k: v for k, v in scale.text_encoder.items() if k != "architectures"}
    text = CLIPTextModel(CLIPTextConfig(**text_cfg, architectures=["CLIPTextModel"]))
    counts["text_encoder"] = sum(p.numel() for p in text.parameters())
    text.save_pretrained(out_dir / "text_encoder", safe_serialization=True)
    del text
    write_clip_tokenizer(out_dir / "tokenizer", int(scale.text_encoder["max_position_embeddings"]))
    PNDMScheduler.from_config(SD15_SCHEDULER).save_pretrained(out_dir / "scheduler")
    # SD-1.5's file also carries keys PNDM ignores (clip_sample: false), which a DDPMScheduler loading it reads.
    sched_file = out_dir / "scheduler" / "scheduler_config.json"
    sched_file.write_text(json.dumps({**json.loads(sched_file.read_text()), **SD15_SCHEDULER}, indent=2) + "\n")
    (out_dir / "model_index.json").write_text(json.dumps(SD15_MODEL_INDEX, indent=2) + "\n")
    return {"parameters": counts}


def write_openai_clip(path: Path, arch: str, seed: int = 0, half: bool = True) -> dict[str, Any]:
    """A random-init open_clip ``arch`` saved as OpenAI's TorchScript checkpoint (what ``clip.load`` reads).

    OpenAI's archives are traced ``CLIP`` modules whose state dict uses the names open_clip kept (``visual.*``,
    ``transformer.resblocks.*``, ``token_embedding``, ``positional_embedding``, ``ln_final``, ``text_projection``,
    ``logit_scale``) plus three int entries, ``input_resolution``, ``context_length`` and ``vocab_size``; the
    text attention mask is a plain attribute, not a state-dict entry; weights are fp16 (``half``)."""
    import open_clip
    import torch

    import sdsclip.models.student  # noqa: F401 - registers the tiny open_clip configs

    torch.manual_seed(seed)
    clip = open_clip.create_model(arch).eval()
    if not hasattr(clip, "transformer") or not hasattr(clip.visual, "conv1"):
        raise RealshapeError(f"{arch}: an OpenAI-format checkpoint needs a ViT CLIP with a CLIP text tower")

    class OpenAICLIP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.visual, self.transformer = clip.visual, clip.transformer
            self.token_embedding, self.ln_final = clip.token_embedding, clip.ln_final
            self.positional_embedding, self.text_projection = clip.positional_embedding, clip.text_projection
            self.logit_scale = clip.logit_scale
            self.register_buffer("input_resolution", torch.tensor(clip.visual.image_size[0]))
            self.register_buffer("context_length", torch.tensor(clip.context_length))
            self.register_buffer("vocab_size", torch.tensor(clip.vocab_size))
            self.mask = clip.attn_mask.clone()  # an attribute, as in OpenAI's model.py

        def forward(self, image: torch.Tensor, text: torch.Tensor):
            x = self.token_embedding(text) + self.positional_embedding
            x = self.ln_final(self.transformer(x, attn_mask=self.mask))
            x = x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection
            return self.visual(image), x, self.logit_scale.exp()

    model = OpenAICLIP().eval()
    side = int(clip.visual.image_size[0])
    example = (torch.zeros(1, 3, side, side), torch.zeros(1, clip.context_length, dtype=torch.long))
    with torch.no_grad(), warnings.catch_warnings():
        # TorchScript is deprecated in favour of torch.export, but it is the format OpenAI's files are in.
        warnings.simplefilter("ignore", (FutureWarning, torch.jit.TracerWarning))
        traced = torch.jit.trace(model, example, check_trace=False)
        if half:
            traced = traced.half()
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.jit.save(traced, str(path))
    return {
        "arch": arch,
        "format": "openai-torchscript",
        "dtype": "float16" if half else "float32",
        "parameters": sum(p.numel() for p in clip.parameters()),
    }


def write_open_clip_safetensors(path: Path, arch: str, seed: int = 0) -> dict[str, Any]:
    """The same random-init student as an open_clip state dict in safetensors (open_clip's own file format)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    import sdsclip.models.student  # noqa: F401 - registers the tiny open_clip configs

    torch.manual_seed(seed)
    clip = open_clip.create_model(arch)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))
    return {"arch": arch, "format": "open_clip-safetensors", "dtype": "float32"}


# ------------------------------------------------------------------------------------------ the chain


#: student checkpoint formats the fixture can be written in
STUDENT_FORMATS = {
    "openai": ("ViT-B-32.pt", write_openai_clip),
    "safetensors": ("open_clip_model.safetensors", write_open_clip_safetensors),
}


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _peak_rss_mb(rusage: Any) -> float:
    return round(rusage.ru_maxrss / 1024, 1)  # Linux: kilobytes


@dataclass
class Paths:
    work: Path

    @property
    def fixtures(self) -> Path:
        return self.work / "fixtures"

    @property
    def coco(self) -> Path:
        return self.fixtures / "coco"

    @property
    def sd(self) -> Path:
        return self.fixtures / "stable-diffusion-v1-5"

    @property
    def clip_dir(self) -> Path:
        return self.fixtures / "clip"

    @property
    def world(self) -> Path:
        return self.fixtures / "world"

    @property
    def run(self) -> Path:
        return self.work / "run"


def realshape_params(params: Params, workdir: Path, scale: Scale, student_format: str = "openai") -> Params:
    """``params`` pointed at the fixtures: the real configuration (checkpoint, SD dir, VAE latent, COCO
    train2017), with the scale's shapes, and MLflow inside the workdir."""
    paths = Paths(Path(workdir).resolve())
    world = paths.world
    run = paths.run
    name, _ = STUDENT_FORMATS[student_format]
    return params.model_copy(
        update={
            "data": params.data.model_copy(
                update={
                    "coco_root": str(paths.coco),
                    "winoground_dir": str(world / "winoground"),
                    "aro_dir": str(world / "aro"),
                    "zeroshot_dir": str(world / "zeroshot"),
                    "sugarcrepe_dir": str(run / "data" / "sugarcrepe"),
                    "pretrain_split": SPLIT,
                    "train_split": SPLIT,
                }
            ),
            "ingest": params.ingest.model_copy(update={"splits": [SPLIT]}),
            "student": params.student.model_copy(
                update={"arch": scale.student_arch, "checkpoint": str(paths.clip_dir / name)}
            ),
            "teacher": params.teacher.model_copy(
                update={"pretrained_dir": str(paths.sd), "latent": "vae", "image_size": scale.teacher_image_size}
            ),
            "registry": params.registry.model_copy(
                update={
                    "tracking_uri": f"sqlite:///{run / 'mlflow.db'}",
                    "experiment": "sdsclip-realshape",
                    "model_name": "sdsclip-realshape",
                }
            ),
        }
    )


def _fixture_stages(
    params: Params, paths: Paths, scale: Scale, student_format: str
) -> list[tuple[str, Path, Any, Callable[[], Any]]]:
    """(name, out dir, cache key, writer) of each fixture."""
    from sdsclip import stages

    name, writer = STUDENT_FORMATS[student_format]
    full = params_to_dict(params)
    return [
        (
            "fixture_coco",
            paths.coco,
            [scale.coco_images, scale.coco_sizes, params.seed],
            lambda: write_coco(paths.coco, scale.coco_images, scale.coco_sizes, params.seed),
        ),
        (
            "fixture_student",
            paths.clip_dir,
            [scale.student_arch, student_format, params.seed],
            lambda: writer(paths.clip_dir / name, scale.student_arch, params.seed),
        ),
        (
            "fixture_stable_diffusion",
            paths.sd,
            [scale.unet, scale.vae, scale.text_encoder, SD15_SCHEDULER, params.seed],
            lambda: write_sd_dir(paths.sd, scale, params.seed),
        ),
        ("fixture_world", paths.world, [full["world"], params.seed], lambda: stages.synth(params, paths.world)),
    ]


_Stage = tuple[str, str, dict[str, Any]]
_STAGES = "sdsclip.stages:"


def chain(params: Params, paths: Paths) -> list[tuple[str, str, dict[str, Any]]]:
    """(stage name, ``module:function``, keyword arguments) of the whole chain after the fixtures, in order.

    Every function takes ``params`` first: the stage functions DVC and Kubeflow call (sdsclip.stages)."""
    r, d = paths.run, params.data
    shards, validated, models, metrics = r / "data" / "shards", r / "data" / "validated", r / "models", r / "metrics"
    student_models = {
        "pretrained": models / "student_pretrained",
        "baseline": models / "baseline",
        "sds": models / "sds",
    }
    every = {**student_models, "teacher": models / "teacher"}
    out = _data_and_pretrain_stages(d, shards, validated, metrics, every)
    out += _train_stages(r, shards, validated, every)
    out.append(
        (
            "derive_sugarcrepe",
            _STAGES + "derive_sugarcrepe",
            {"winoground_dir": d.winoground_dir, "out_dir": d.sugarcrepe_dir},
        )
    )
    for key, model in every.items():
        out += _evaluate_stages(r, d, metrics, key, model)
    out += _report_and_register_stages(r, shards, metrics, every)
    return out


def _data_and_pretrain_stages(
    data: DataConfig, shards: Path, validated: Path, metrics: Path, every: dict[str, Path]
) -> list[_Stage]:
    """Ingest, validate and the two pretraining stages."""
    s = _STAGES
    return [
        ("ingest", s + "ingest", {"coco_root": data.coco_root, "out_root": shards, "metrics": metrics / "ingest.json"}),
        (
            "validate",
            s + "validate",
            {"shards_root": shards, "out_root": validated, "metrics": metrics / "validation.json"},
        ),
        (
            "pretrain_student",
            s + "pretrain_student",
            {"shards_root": shards, "validated_root": validated, "out_dir": every["pretrained"]},
        ),
        (
            "pretrain_teacher",
            s + "pretrain_teacher",
            {"shards_root": shards, "validated_root": validated, "out_dir": every["teacher"]},
        ),
    ]


def _train_stages(run_dir: Path, shards: Path, validated: Path, every: dict[str, Path]) -> list[_Stage]:
    """The control (baseline) and SDS-CLIP fine-tuning stages."""
    return [
        (
            f"train_{arm}",
            _STAGES + "train",
            {
                "student": every["pretrained"],
                "teacher": every["teacher"],
                "shards_root": shards,
                "validated_root": validated,
                "out_dir": every[arm],
                "control": control,
                "log_dir": run_dir / "logs" / f"train_{arm}",
            },
        )
        for arm, control in (("baseline", True), ("sds", False))
    ]


def _evaluate_stages(run_dir: Path, data: DataConfig, metrics: Path, key: str, model: Path) -> list[_Stage]:
    """The four evaluation stages of one model."""
    s = _STAGES
    return [
        (
            f"evaluate_winoground@{key}",
            s + "evaluate_winoground",
            {
                "model": model,
                "data_dir": data.winoground_dir,
                "out": metrics / f"winoground_{key}.json",
                "scores": run_dir / "scores" / f"winoground_{key}.jsonl",
            },
        ),
        (
            f"evaluate_aro@{key}",
            s + "evaluate_aro",
            {"model": model, "data_dir": data.aro_dir, "out": metrics / f"aro_{key}.json"},
        ),
        (
            f"evaluate_zeroshot@{key}",
            s + "evaluate_zeroshot",
            {"model": model, "data_dir": data.zeroshot_dir, "out": metrics / f"zeroshot_{key}.json"},
        ),
        (
            f"evaluate_sugarcrepe@{key}",
            s + "evaluate_sugarcrepe",
            {
                "model": model,
                "data_dir": data.sugarcrepe_dir,
                "out": metrics / f"sugarcrepe_{key}.json",
                "scores": run_dir / "scores" / f"sugarcrepe_{key}.jsonl",
            },
        ),
    ]


def _report_and_register_stages(run_dir: Path, shards: Path, metrics: Path, every: dict[str, Path]) -> list[_Stage]:
    """The report and the SDS-CLIP model's registration."""
    return [
        (
            "report",
            "sdsclip.realshape:_report",
            {"metrics_dir": metrics, "out_dir": run_dir / "reports", "summary": metrics / "evaluation.json"},
        ),
        # the experiment's artifacts land next to the run's mlflow.db (sdsclip.register.experiment_id)
        (
            "register",
            _STAGES + "register",
            {
                "model": every["sds"],
                "metrics": metrics / "winoground_sds.json",
                "baseline_metrics": metrics / "winoground_baseline.json",
                "out": metrics / "registration.json",
                "data_files": [shards / SPLIT / "manifest.csv"],
            },
        ),
    ]


def _report(params: Params, **kwargs: Any) -> dict[str, Any]:
    from sdsclip import stages

    return stages.report(**kwargs)


def _resolve(target: str) -> Callable[..., Any]:
    import importlib

    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _jsonable(kwargs: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(kwargs, default=str))


def _run_in_process(target: str, params: Params, kwargs: dict[str, Any]) -> tuple[Any, float | None]:
    result = _resolve(target)(params, **kwargs)
    return result, _peak_rss_mb(resource.getrusage(resource.RUSAGE_SELF))


def run_stage_in_child(
    name: str, target: str, params_file: Path, kwargs: dict[str, Any], spec_dir: Path
) -> tuple[Any, float | None]:
    """One stage in a fresh interpreter (as DVC runs each stage); its own peak RSS from wait4."""
    spec_dir.mkdir(parents=True, exist_ok=True)
    safe = name.replace("@", "_")
    spec = spec_dir / f"{safe}.json"
    result_file = spec_dir / f"{safe}.result.json"
    result_file.unlink(missing_ok=True)
    spec.write_text(
        json.dumps(
            {
                "name": name,
                "target": target,
                "params": str(params_file),
                "kwargs": _jsonable(kwargs),
                "result": str(result_file),
            },
            indent=2,
        )
        + "\n"
    )
    proc = subprocess.Popen([sys.executable, "-m", "sdsclip.realshape", str(spec)])
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RealshapeError(
            f"stage {name} failed (exit {proc.returncode}; its output is above); "
            f"re-run it alone: {sys.executable} -m sdsclip.realshape {spec}"
        )
    return json.loads(result_file.read_text()), _peak_rss_mb(usage)


def _child_main(spec_path: str) -> int:
    """Entry point of one isolated stage: ``python -m sdsclip.realshape SPEC.json``."""
    from sdsclip.config import load_params
    from sdsclip.errors import UserError

    spec = json.loads(Path(spec_path).read_text())
    try:
        params = load_params(spec["params"])
        result = _resolve(spec["target"])(params, **spec["kwargs"])
    except (UserError, FileNotFoundError) as err:
        print(f"sdsclip realshape: {spec['name']}: error: {err}", file=sys.stderr)
        return 2
    Path(spec["result"]).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


class _Runner:
    """Runs stages in this process or each in a child (``isolate``), recording wall time and peak RSS."""

    def __init__(self, params: Params, paths: Paths, isolate: bool, log: Callable[[str], None]):
        self.params, self.paths, self.isolate, self.log = params, paths, isolate, log
        self.records: list[dict[str, Any]] = []
        self.params_file = write_params(params, paths.run / "params.yaml")

    def __call__(self, name: str, target: str, kwargs: dict[str, Any]) -> Any:
        self.log(f"run   {name}")
        t0 = time.time()
        if self.isolate:
            result, rss = run_stage_in_child(name, target, self.params_file, kwargs, self.paths.run / "stages")
        else:
            result, rss = _run_in_process(target, self.params, kwargs)
        self.records.append({"stage": name, "seconds": round(time.time() - t0, 1), "peak_rss_mb": rss, "reused": False})
        self.log(f"done  {name}: {self.records[-1]['seconds']} s, peak RSS {rss} MB")
        return result


def _resolved(params: Params, workdir: Path, scale: str, student_format: str) -> tuple[Scale, Paths, Params]:
    if scale not in SCALES:
        raise RealshapeError(f"--scale {scale!r}: one of {', '.join(SCALES)}")
    if student_format not in STUDENT_FORMATS:
        raise RealshapeError(f"--student-format {student_format!r}: one of {', '.join(STUDENT_FORMATS)}")
    paths = Paths(Path(workdir).resolve())
    return SCALES[scale], paths, realshape_params(params, paths.work, SCALES[scale], student_format)


def ensure_fixtures(
    params: Params,
    workdir: Path,
    scale: str = "real",
    student_format: str = "openai",
    isolate: bool = False,
    log: Callable[[str], None] = print,
    runner: _Runner | None = None,
) -> list[dict[str, Any]]:
    """Write the fixtures under ``workdir/fixtures/`` unless ``done.json`` there records the same config
    (the 3.4 GB SD dir takes minutes to write); returns one record per fixture (reused or timed)."""
    sc, paths, params = _resolved(params, workdir, scale, student_format)
    run = runner or _Runner(params, paths, isolate, log)
    for name, out, key, _ in _fixture_stages(params, paths, sc, student_format):
        marker, digest = out / "done.json", _hash([FIXTURE_VERSION, key])
        if marker.is_file() and json.loads(marker.read_text()).get("key") == digest:
            run.log(f"reuse {name} ({out})")
            run.records.append(
                {
                    "stage": name,
                    "seconds": 0.0,
                    "peak_rss_mb": None,
                    "reused": True,
                    "written_in_seconds": json.loads(marker.read_text()).get("seconds"),
                }
            )
            continue
        if out.exists():
            shutil.rmtree(out)
        result = run(
            name,
            "sdsclip.realshape:_write_fixture",
            {"out": str(out), "scale": scale, "fixture": name, "student_format": student_format},
        )
        out.mkdir(parents=True, exist_ok=True)
        marker.write_text(
            json.dumps({"key": digest, "seconds": run.records[-1]["seconds"], "result": result}, indent=2, default=str)
            + "\n"
        )
    return [r for r in run.records if r["stage"].startswith("fixture_")]


def run_realshape(
    params: Params,
    workdir: Path,
    scale: str = "real",
    isolate: bool = True,
    student_format: str = "openai",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Fixtures (cached) + the whole chain in ``workdir``; returns (and writes to ``workdir/summary.json``)
    wall time and peak RSS per stage, the shape checks and the headline metrics.

    ``isolate``: each stage in its own interpreter (peak RSS per stage); else all in this process (the
    test suite; RSS is then this process's peak so far)."""
    from sdsclip.register import TRACKING_URI_ENV

    started = time.time()
    sc, paths, params = _resolved(params, workdir, scale, student_format)
    # Random-init models must never reach a real registry: $MLFLOW_TRACKING_URI (which wins over params) is
    # pointed at the workdir's sqlite store for this run and its child processes.
    saved_uri = os.environ.get(TRACKING_URI_ENV)
    os.environ[TRACKING_URI_ENV] = params.registry.tracking_uri
    try:
        return _run_chain(params, sc, paths, isolate, log, scale, student_format, workdir, started)
    finally:
        if saved_uri is None:
            os.environ.pop(TRACKING_URI_ENV, None)
        else:
            os.environ[TRACKING_URI_ENV] = saved_uri


def _run_chain(
    params: Params,
    sc: Scale,
    paths: Paths,
    isolate: bool,
    log: Callable[[str], None],
    scale: str,
    student_format: str,
    workdir: Path,
    started: float,
) -> dict[str, Any]:
    run = _Runner(params, paths, isolate, log)
    ensure_fixtures(params, workdir, scale, student_format, runner=run)
    # The chain starts clean each run: it is the thing being proven.
    for sub in ("data", "models", "metrics", "scores", "logs", "reports", "stages", "mlartifacts"):
        shutil.rmtree(paths.run / sub, ignore_errors=True)
    (paths.run / "mlflow.db").unlink(missing_ok=True)
    results = {name: run(name, target, kwargs) for name, target, kwargs in chain(params, paths)}
    summary = _summary(params, sc, paths, run.records, results, time.time() - started, isolate)
    # What /usr/bin/time -v reports for the whole command: the largest RSS of this process or any child.
    summary["process_tree_peak_rss_mb"] = max(
        _peak_rss_mb(resource.getrusage(resource.RUSAGE_SELF)),
        _peak_rss_mb(resource.getrusage(resource.RUSAGE_CHILDREN)),
    )
    (paths.work / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def _write_fixture(params: Params, out: str, scale: str, fixture: str, student_format: str) -> Any:
    """One fixture writer, by name (the isolated form of run_realshape's fixture step)."""
    paths = Paths(Path(out).resolve().parent.parent)
    for name, _, _, writer in _fixture_stages(params, paths, SCALES[scale], student_format):
        if name == fixture:
            return writer()
    raise RealshapeError(f"unknown fixture {fixture!r}")


def write_params(params: Params, path: Path) -> Path:
    """Write ``params`` to ``path`` as YAML (what an isolated stage reads); returns ``path``."""
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(params_to_dict(params), sort_keys=False))
    return path


def _summary(
    params: Params,
    sc: Scale,
    paths: Paths,
    records: list[dict[str, Any]],
    results: dict[str, Any],
    seconds: float,
    isolate: bool,
) -> dict[str, Any]:
    """Timings, the shape checks (raises when the real path did not run at the scale's shapes) and headlines."""
    shapes = _chain_shapes(paths, results)
    _check_shapes(shapes, _expected_shapes(sc))
    ran = [r for r in records if not r["reused"]]
    rss = [r["peak_rss_mb"] for r in ran if r["peak_rss_mb"] is not None]
    wino = _winoground_headlines(paths.run / "metrics")
    return {
        "scale": sc.name,
        "isolated_stages": isolate,
        "seconds": round(seconds, 1),
        "chain_seconds": round(sum(r["seconds"] for r in ran if not r["stage"].startswith("fixture_")), 1),
        "peak_rss_mb": max(rss) if rss else None,
        "peak_rss_stage": max(ran, key=lambda r: r["peak_rss_mb"] or 0)["stage"] if rss else None,
        "rss_scope": "each stage's own process" if isolate else "this process, peak so far",
        "shapes": shapes,
        "stages": records,
        "train": {
            arm: {
                k: results[f"train_{arm}"].get(k)
                for k in ("steps", "batch_size", "seconds_per_step", "loss_clip", "loss_sds", "lambda_sds")
            }
            for arm in ("baseline", "sds")
        },
        "winoground": wino,
        "registration": {k: results["register"].get(k) for k in ("model_name", "version", "alias_moved", "reason")},
        "settings": {
            "profile": params.profile,
            "train_steps": params.train.steps,
            "train_batch_size": params.train.batch_size,
            "teacher_draws": params.eval.teacher_draws,
            "teacher_max_items": params.eval.teacher_max_items,
            "coco_images": sc.coco_images,
        },
    }


def _chain_shapes(paths: Paths, results: dict[str, Any]) -> dict[str, Any]:
    """The shapes the chain actually ran at, from the fixture's configs, the models' metadata and train_sds."""
    sd = paths.sd
    text_cfg = json.loads((sd / "text_encoder" / "config.json").read_text())
    tok_cfg = json.loads((sd / "tokenizer" / "tokenizer_config.json").read_text())
    teacher_meta = json.loads((paths.run / "models" / "teacher" / "teacher.json").read_text())
    student_meta = json.loads((paths.run / "models" / "student_pretrained" / "student.json").read_text())
    return {
        "student_arch": student_meta.get("arch"),
        "student_source": student_meta.get("source"),
        "teacher_image_size": teacher_meta.get("image_size"),
        "teacher_latent": teacher_meta.get("latent"),
        "teacher_latent_shape": teacher_meta.get("latent_shape"),
        "sigma_latent_shape": results["train_sds"].get("latent_shape"),
        "text_tokens": tok_cfg.get("model_max_length"),
        "text_positions": text_cfg.get("max_position_embeddings"),
        "text_width": text_cfg.get("hidden_size"),
        "text_layers": text_cfg.get("num_hidden_layers"),
    }


def _expected_shapes(sc: Scale) -> dict[str, Any]:
    """The shapes a chain at scale ``sc`` must run at."""
    return {
        "student_arch": sc.student_arch,
        "student_source": "checkpoint",
        "teacher_image_size": sc.teacher_image_size,
        "teacher_latent": "vae",
        "teacher_latent_shape": sc.latent_shape,
        "sigma_latent_shape": sc.latent_shape,
        "text_tokens": sc.text_encoder["max_position_embeddings"],
        "text_positions": sc.text_encoder["max_position_embeddings"],
        "text_width": sc.text_encoder["hidden_size"],
        "text_layers": sc.text_encoder["num_hidden_layers"],
    }


def _check_shapes(shapes: dict[str, Any], expected: dict[str, Any]) -> None:
    """Raise RealshapeError naming every shape that differs from the expected one."""
    wrong = {k: (shapes[k], v) for k, v in expected.items() if shapes[k] != v}
    if wrong:
        raise RealshapeError(
            "the chain did not run at the fixture's shapes: "
            + ", ".join(f"{k} {got!r} (expected {want!r})" for k, (got, want) in wrong.items())
        )


def _winoground_headlines(metrics: Path) -> dict[str, dict[str, Any]]:
    """Each model's Winoground n and scores, from its metrics file."""
    return {
        m: {
            k: json.loads((metrics / f"winoground_{m}.json").read_text()).get(k)
            for k in ("n", "text_score", "image_score", "group_score")
        }
        for m in ("pretrained", "baseline", "sds", "teacher")
    }


if __name__ == "__main__":  # one isolated stage (see run_stage_in_child)
    sys.exit(_child_main(sys.argv[1]))
