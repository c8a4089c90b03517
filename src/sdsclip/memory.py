"""Memory of one SDS-CLIP training step, counted from the actual models (no hand-kept table).

Back-propagating L_SDS through a frozen Stable-Diffusion-sized UNet keeps every activation the UNet's
backward needs, per sample: that, not the weights, is what decides whether a batch fits a card. This
module counts those bytes with ``torch.autograd.graph.saved_tensors_hooks`` (unique storages, model
weights excluded) and uses the same count on fake tensors (``FakeTensorMode``: shapes and dtypes only, no
compute, no memory) to estimate a step's peak before the first step:

    peak ~ weights + saved activations (local batch) + grads and AdamW state of the trainable params
           + text-conditioning cache + largest recomputed segment (gradient checkpointing) + margin

With ``train.sds_gradient: jacobian_free`` the UNet runs without autograd: it saves nothing for backward (the
count is the production step's: ``unet_saved`` is then only the surrogate's fp32 gradient for z, one latent
per sample) and checkpointing is a no-op for it; its transient forward working set is bounded by the
``recompute`` term, the largest checkpoint segment's activations.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any

import open_clip
import torch
from torch.utils._python_dispatch import TorchDispatchMode

GIB = float(2**30)
log = logging.getLogger(__name__)


def _storage_key(t: torch.Tensor) -> int:
    """Identity of a tensor's storage (views share it); also defined for fake and meta tensors."""
    return t.untyped_storage()._cdata


@dataclass
class SavedTensorCounter:
    """Bytes of the unique storages autograd saves for backward while the counter is active.

    ``exclude``: storages not to count (the model weights: they are on the device anyway). Saved tensors stay
    alive until backward, so a storage key cannot be reused while it is recorded."""

    exclude: set[int] = field(default_factory=set)
    storages: dict[int, int] = field(default_factory=dict)

    @classmethod
    def excluding(cls, *modules: torch.nn.Module) -> SavedTensorCounter:
        keys = {_storage_key(t) for m in modules if m is not None for t in (*m.parameters(), *m.buffers())}
        return cls(exclude=keys)

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in self.exclude:
            self.storages[key] = t.untyped_storage().nbytes()
        return t

    @contextmanager
    def __call__(self) -> Iterator[SavedTensorCounter]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self


def count_saved_bytes(fn: Callable[[], object], *modules: torch.nn.Module) -> tuple[int, object]:
    """(bytes saved for backward by ``fn()``, its result), weights of ``modules`` excluded."""
    counter = SavedTensorCounter.excluding(*modules)
    with counter():
        out = fn()
    return counter.bytes, out


#: setting name -> (bf16 autocast, UNet gradient checkpointing)
SETTINGS = {"fp32": (False, False), "bf16": (True, False), "fp32+ckpt": (False, True), "bf16+ckpt": (True, True)}

#: Stable Diffusion 1.5's unet/config.json and scheduler/scheduler_config.json (the shape, not the weights): the
#: real teacher the `paper-*gb` profiles are sized for, used where no teacher dir is at hand.
SD15_UNET_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
}
SD15_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}

#: cards the `paper-*gb` profiles are sized for (bytes; a "24 GB" card reports ~23.6 GiB total, less free)
CARDS = {"24gb": 22 * GIB, "48gb": 44 * GIB, "80gb": 76 * GIB}
MARGIN_FRACTION = 0.10  # allocator fragmentation + activation gradients alive during backward
CUDA_RESERVE = 1 * GIB  # cuBLAS/cuDNN workspaces and kernels: outside torch's tensors, not counted by the hooks


# ----------------------------------------------------------------------------- fake-tensor step count


@contextmanager
def _autocast(device_type: str, dtype: torch.dtype | None) -> Iterator[None]:
    """torch.autocast, also for fake CUDA tensors on a machine without CUDA (torch.autocast would turn itself
    off there): the CUDA policy (e.g. GroupNorm/LayerNorm in fp32) is what a CUDA run saves."""
    if dtype is None:
        yield
        return
    if device_type != "cuda" or torch.cuda.is_available():
        with torch.autocast(device_type, dtype=dtype):
            yield
        return
    enabled, old = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled("cuda", enabled)
        torch.set_autocast_dtype("cuda", old)


class _CudaAttention(torch.overrides.TorchFunctionMode):
    """scaled_dot_product_attention as a CUDA run dispatches it (flash for bf16/fp16, memory-efficient for fp32):
    on fake CUDA tensors torch would fall back to the math kernel, which saves the full attention matrix."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.nn.functional.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v = args[:3]
        mask, dropout, causal = kwargs.get("attn_mask"), kwargs.get("dropout_p", 0.0), kwargs.get("is_causal", False)
        scale = kwargs.get("scale")
        if torch.is_autocast_enabled("cuda"):
            dt = torch.get_autocast_dtype("cuda")
            q, k, v = (x.to(dt) for x in (q, k, v))
        if q.dtype in (torch.bfloat16, torch.float16) and mask is None and q.shape[-1] <= 256:
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout, causal, False, scale=scale)[0]
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, mask, True, dropout, causal, scale=scale
        )[0]


class _MixedNormStats(TorchDispatchMode):
    """GroupNorm/LayerNorm of a bf16/fp16 input with fp32 weights keep fp32 mean/rstd on CPU and CUDA (aten's
    mixed-type kernels); the fake kernels report them in the input's dtype."""

    NORMS = {torch.ops.aten.native_group_norm.default: 1, torch.ops.aten.native_layer_norm.default: 2}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.NORMS:
            x, w = args[0], args[self.NORMS[func]]
            if x.dtype in (torch.bfloat16, torch.float16) and w is not None and w.dtype == torch.float32:
                out = (out[0], out[1].float(), out[2].float())
        return out


@contextmanager
def fake_device(device_type: str) -> Iterator[None]:
    """Tensors created inside are fake tensors of ``device_type``: shapes, dtypes, storages; no data."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True), _MixedNormStats(), torch.device(device_type):
        if device_type == "cuda":
            with _CudaAttention():
                yield
        else:
            yield


def module_bytes(*modules: torch.nn.Module | None) -> int:
    """Bytes of the unique parameter and buffer storages of ``modules``."""
    seen: dict[int, int] = {}
    for m in modules:
        if m is not None:
            for t in (*m.parameters(), *m.buffers()):
                seen[_storage_key(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())


@dataclass
class TeacherSpec:
    """What a teacher's memory depends on, read from configs only (no weights): built as fake modules."""

    unet_config: dict
    text_encoder: Callable[[], torch.nn.Module]
    scheduler: object
    max_tokens: int
    latent: str = "vae"
    image_size: int = 512
    coord_channels: int = 0
    caption_map_config: dict | None = None

    @classmethod
    def sd15(cls) -> TeacherSpec:
        """Stable Diffusion 1.5 (UNet + CLIP ViT-L/14 text encoder), by shape."""
        from diffusers import DDPMScheduler
        from transformers import CLIPTextConfig, CLIPTextModel

        text = CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
        )
        return cls(dict(SD15_UNET_CONFIG), lambda: CLIPTextModel(text), DDPMScheduler(**SD15_SCHEDULER_CONFIG), 77)

    @classmethod
    def from_dir(cls, root, latent: str | None = None, image_size: int | None = None) -> TeacherSpec:
        """A teacher directory as ``sdsclip.models.teacher.load_teacher`` would load it, from its configs."""
        import json
        from pathlib import Path

        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import AutoConfig

        from sdsclip.models.teacher import TEACHER_META, TEXT_ENCODERS, read_json_config
        from sdsclip.models.teacher_options import CAPTION_MAP_DIR

        root = Path(root)
        meta = json.loads((root / TEACHER_META).read_text()) if (root / TEACHER_META).is_file() else {}
        unet_config = dict(UNet2DConditionModel.load_config(root / "unet"))
        text_config = AutoConfig.from_pretrained(root / "text_encoder")
        arch = (getattr(text_config, "architectures", None) or ["CLIPTextModel"])[0]
        text_cls = TEXT_ENCODERS.get(arch, TEXT_ENCODERS["CLIPTextModel"])
        tok_cfg = root / "tokenizer" / "tokenizer_config.json"
        max_tokens = read_json_config(tok_cfg).get("model_max_length") if tok_cfg.is_file() else None
        if not isinstance(max_tokens, int) or max_tokens > 4096:  # unset: HF writes a huge sentinel
            max_tokens = int(getattr(text_config, "max_position_embeddings", 77))
        caption_map = None
        if meta.get("caption_map_channels"):
            caption_map = read_json_config(root / CAPTION_MAP_DIR / "config.json")
        return cls(
            unet_config,
            lambda: text_cls(text_config),
            DDPMScheduler.from_pretrained(root / "scheduler"),
            int(max_tokens),
            latent=meta.get("latent", latent or "vae"),
            image_size=int(meta.get("image_size", image_size or 512)),
            coord_channels=int(meta.get("coord_channels", 0)),
            caption_map_config=caption_map,
        )

    def build(self):
        """The Teacher, frozen, with this spec's modules (call inside ``fake_device``)."""
        from diffusers import UNet2DConditionModel

        from sdsclip.models.teacher import make_teacher
        from sdsclip.models.teacher_options import CaptionMap

        unet = UNet2DConditionModel.from_config(self.unet_config)
        head = CaptionMap(**self.caption_map_config) if self.caption_map_config else None
        return make_teacher(
            unet,
            self.text_encoder(),
            None,
            self.scheduler,
            latent=self.latent,
            image_size=self.image_size,
            coord_channels=self.coord_channels,
            caption_map=head,
        ).freeze()


@dataclass
class StepCount:
    """Saved-for-backward bytes of one step at one local batch, by part, plus the models' own bytes."""

    batch: int
    student_saved: int
    unet_saved: int
    recompute: int  # gradient checkpointing: bytes the largest checkpointed segment saves when recomputed
    student_weights: int
    teacher_weights: int
    trainable_params: int  # bytes of the trainable parameters (LayerNorms + sigma)
    cond_row: int  # bytes of one caption's text conditioning (the text cache's entry)


def _real(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """``build()`` on the CPU, outside the fake mode (for a small module whose __init__ reads a tensor value)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily(), torch.device("cpu"):
        return build()


def _refake(module: torch.nn.Module) -> torch.nn.Module:
    """A real module's parameters and buffers as fake tensors of the current fake device."""
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            setattr(sub, name, torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype), p.requires_grad))
        for name, b in list(sub.named_buffers(recurse=False)):
            sub.register_buffer(name, torch.empty(b.shape, dtype=b.dtype))
    return module


def _clip_model(arch: str | dict[str, Any]) -> open_clip.CLIP:
    """The open_clip model class ``open_clip.create_model`` would build for ``arch``, built in place (its final
    ``model.to(device)`` cannot move fake parameters)."""
    import open_clip

    # A dict: the model config a converted student carries (a Hugging Face CLIPModel dir has no registered name).
    cfg = deepcopy(arch) if isinstance(arch, dict) else open_clip.get_model_config(arch)
    if cfg is None:
        from sdsclip.models.student import StudentLoadError

        raise StudentLoadError(f"student.arch: unknown open_clip architecture {arch!r}")
    custom = cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
    cls = (open_clip.CoCa if "multimodal_cfg" in cfg else open_clip.CustomTextCLIP) if custom else open_clip.CLIP
    return cls(**cfg)


def count_step(
    student_arch: str | dict[str, Any],
    teacher: TeacherSpec | None,
    batch: int,
    autocast: torch.dtype | None,
    checkpointing: bool,
    device_type: str = "cuda",
    noise_draws: int = 1,
    latent_shape: tuple[int, int, int] | None = None,
    trainable: str = "image_layernorms",
    sds_gradient: str = "full",
) -> StepCount:
    """Run the production step (``sdsclip.sds``) on fake tensors and count what it saves for backward.

    ``teacher=None``: the control (lambda = 0), whose step never runs the teacher (sigma unused).
    ``sds_gradient="jacobian_free"``: the UNet saves nothing (checkpointing ignored); ``recompute`` is then the
    largest checkpoint segment's saved bytes, counted on one extra fake forward: a bound on the live activations
    of the no-grad UNet forward."""
    jacobian_free = sds_gradient == "jacobian_free"
    checkpointing = checkpointing or (jacobian_free and teacher is not None)
    from open_clip.loss import ClipLoss

    from sdsclip.models import student as _student  # noqa: F401 - registers the tiny open_clip configs
    from sdsclip.sds import sds_clip_objective, sds_loss

    with fake_device(device_type):
        clip = _clip_model(student_arch)
        t = teacher.build() if teacher is not None else None
        shape: tuple[int, int, int] = t.latent_shape if t is not None else (latent_shape or (4, 64, 64))
        module, params = _student_with_sigma(clip, shape, trainable, with_teacher=t is not None)
        weights = [module] + ([t.unet, t.text_encoder, *t.extra_modules().values()] if t is not None else [])
        recompute = [0]
        if t is not None and checkpointing:
            _count_checkpoint_segments(t, weights, recompute)
        images, tokens = _fake_student_batch(clip, batch)
        cond = None
        if t is not None:
            assert teacher is not None  # t is built from it
            with torch.no_grad():  # the text cache: computed without grad, outside autocast
                ids = torch.zeros(batch, teacher.max_tokens, dtype=torch.long)
                cond = t.text_encoder(ids).last_hidden_state
        counter = SavedTensorCounter.excluding(*weights)
        with _autocast(device_type, autocast), counter():
            image_emb, text_emb, z = module(images, tokens, t is not None)
            # the outputs stay referenced until counted: a freed graph's storage keys could be reused
            terms = sds_clip_objective(
                image_emb, text_emb, z, clip.logit_scale.exp(), None, None, 0.0, 20, 980, contrastive=ClipLoss()
            )
            student_saved = counter.bytes
            loss_sds = (
                sds_loss(t, z, cond, 20, 980, noise_draws, None, gradient=sds_gradient)
                if t is not None and z is not None and cond is not None
                else None
            )
        unet_saved = counter.bytes - student_saved
        if jacobian_free and t is not None and z is not None and cond is not None:  # segments' count only
            with _autocast(device_type, autocast), SavedTensorCounter.excluding(*weights)():
                sds_loss(t, z.detach().requires_grad_(True), cond, 20, 980, noise_draws, None)
        del terms, loss_sds
        return StepCount(
            batch=batch,
            student_saved=student_saved,
            unet_saved=unet_saved,
            recompute=recompute[0],
            student_weights=module_bytes(module),
            teacher_weights=module_bytes(t.unet, t.text_encoder, *t.extra_modules().values()) if t is not None else 0,
            trainable_params=sum(p.untyped_storage().nbytes() for p in params),
            cond_row=(cond[0].numel() * cond.element_size()) if cond is not None else 0,
        )


def _student_with_sigma(clip, latent_shape: tuple[int, int, int], trainable: str, with_teacher: bool):
    """The student wrapped with its latent projection sigma, and the parameters the step trains."""
    from sdsclip.sds import LatentProjection, StudentWithSigma, select_trainable

    embed_dim = int(clip.text_projection.shape[1]) if hasattr(clip, "text_projection") else int(clip.visual.output_dim)
    sigma = _refake(_real(lambda: LatentProjection(embed_dim, latent_shape)))  # its __init__ reads a value
    assert isinstance(sigma, LatentProjection)
    params = select_trainable(clip, sigma, trainable)
    if not with_teacher:  # as finetune: sigma does not train in the control
        sigma.requires_grad_(False)
        params = params[: len(params) - len(list(sigma.parameters()))]
    return StudentWithSigma(clip, sigma).eval(), params


def _count_checkpoint_segments(t, weights: list, recompute: list[int]) -> None:
    """Checkpoint the UNet's segments, keeping in ``recompute[0]`` the largest saved bytes one recompute holds."""

    def segment(fn, *args):  # diffusers' checkpoint call, plus a count of what its recompute saves
        inner = SavedTensorCounter.excluding(*weights)
        with inner():  # innermost hooks win: the outer count sees only what checkpoint keeps
            fn(*args)
        recompute[0] = max(recompute[0], inner.bytes)
        return torch.utils.checkpoint.checkpoint(fn.__call__, *args, use_reentrant=False)

    t.unet.enable_gradient_checkpointing(gradient_checkpointing_func=segment)


def _fake_student_batch(clip, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero images and token ids of the student's input sizes."""
    side = clip.visual.image_size
    side = side[0] if isinstance(side, (tuple, list)) else side
    images = torch.zeros(batch, 3, side, side)
    tokens = torch.zeros(batch, int(getattr(clip, "context_length", 77)), dtype=torch.long)
    return images, tokens


# ------------------------------------------------------------------------------------ peak estimate


@dataclass
class StepEstimate:
    """Estimated peak bytes of one training step on one process (see the module docstring)."""

    device_type: str
    setting: str
    local_batch: int
    weights: int
    activations: int  # saved for backward: student + UNet at the local batch
    recompute: int
    trainable_state: int  # grads + AdamW exp_avg / exp_avg_sq (+ DDP's gradient buckets)
    text_cache: int
    margin: int
    unet_saved: int = 0
    student_saved: int = 0

    @property
    def peak(self) -> int:
        return self.weights + self.activations + self.recompute + self.trainable_state + self.text_cache + self.margin

    def summary(self) -> str:
        parts = [
            ("weights", self.weights),
            (f"activations at local batch {self.local_batch}", self.activations),
            ("recompute", self.recompute),
            ("grads+AdamW", self.trainable_state),
            ("text cache", self.text_cache),
            ("margin", self.margin),
        ]
        return " + ".join(f"{name} {b / GIB:.1f}" for name, b in parts if b >= 0.05 * GIB)

    def as_dict(self) -> dict:
        return {
            "setting": self.setting,
            "device_type": self.device_type,
            "local_batch": self.local_batch,
            "peak_gib": round(self.peak / GIB, 2),
            **{
                k: round(getattr(self, k) / GIB, 3)
                for k in (
                    "weights",
                    "activations",
                    "unet_saved",
                    "student_saved",
                    "recompute",
                    "trainable_state",
                    "text_cache",
                    "margin",
                )
            },
        }


def setting_of(mixed_precision: str, checkpointing: bool) -> str:
    return ("fp32" if mixed_precision == "no" else mixed_precision) + ("+ckpt" if checkpointing else "")


def estimate_step(
    cfg,
    student_arch: str | dict[str, Any],
    teacher: TeacherSpec | None,
    world: int = 1,
    device_type: str = "cuda",
    n_pairs: int | None = None,
    latent_shape: tuple[int, int, int] | None = None,
) -> StepEstimate:
    """Peak of one step of ``sdsclip.train.finetune`` for TrainConfig ``cfg`` on one of ``world`` processes.

    ``teacher=None`` is the control (lambda = 0): no teacher on the device, no UNet activations."""
    local = max(1, cfg.batch_size // max(1, world))
    autocast = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.mixed_precision]
    gradient = getattr(cfg, "sds_gradient", "full")
    ckpt = bool(cfg.gradient_checkpointing) and teacher is not None and gradient == "full"
    c = count_step(
        student_arch,
        teacher,
        local,
        autocast,
        ckpt,
        device_type,
        cfg.noise_draws,
        latent_shape,
        getattr(cfg, "trainable", "image_layernorms"),
        gradient,
    )
    captions = cfg.text_cache_size if n_pairs is None else min(cfg.text_cache_size, n_pairs)
    state = c.trainable_params * (3 + (1 if world > 1 else 0))
    setting = setting_of(cfg.mixed_precision, ckpt) + ("+jacobian_free" if gradient == "jacobian_free" else "")
    est = StepEstimate(
        device_type,
        setting,
        local,
        weights=c.student_weights + c.teacher_weights,
        activations=c.student_saved + c.unet_saved,
        recompute=c.recompute,
        trainable_state=state,
        text_cache=c.cond_row * captions,
        margin=0,
        unet_saved=c.unet_saved,
        student_saved=c.student_saved,
    )
    subtotal = est.peak
    est.margin = int(MARGIN_FRACTION * subtotal) + (int(CUDA_RESERVE) if device_type == "cuda" else 0)
    return est


def estimate_sd15_vitb32(cfg, world: int = 1, device_type: str = "cuda", n_pairs: int | None = None) -> StepEstimate:
    """``estimate_step`` for the real path: open_clip ViT-B-32 + Stable Diffusion 1.5 (by shape)."""
    return estimate_step(cfg, "ViT-B-32", TeacherSpec.sd15(), world, device_type, n_pairs)


def device_free_bytes(device: torch.device) -> int | None:
    """Free memory of ``device``: CUDA's free bytes, or available RAM on CPU (None: unknown, check skipped)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            import psutil
        except ImportError:
            return None
        return int(psutil.virtual_memory().available)
    return None


def check_step_memory(
    cfg,
    student_arch: str | dict[str, Any],
    teacher_root=None,
    teacher_latent: str | None = None,
    teacher_image_size: int | None = None,
    latent_shape: tuple[int, int, int] | None = None,
    n_pairs: int | None = None,
    world: int = 1,
    device: torch.device | str = "cpu",
) -> StepEstimate | None:
    """Before the first step: refuse (TrainError, one line) a step whose estimated peak exceeds the device's free
    memory, naming the knobs that shrink it; ``train.memory_check`` warn logs the line instead, off skips."""
    from sdsclip.train_common import TrainError

    mode = cfg.memory_check
    if mode == "off":
        return None
    device = torch.device(device)
    free = device_free_bytes(device)
    if free is None:
        return None
    try:
        teacher = TeacherSpec.from_dir(teacher_root, teacher_latent, teacher_image_size) if teacher_root else None
        est = estimate_step(cfg, student_arch, teacher, world, device.type, n_pairs, latent_shape)
    except Exception as err:  # noqa: BLE001 - an estimate that cannot be made must not stop a run that may fit
        log.warning(
            "train.memory_check: no memory estimate for this model (%s); not checked", " ".join(str(err).split())[:200]
        )
        return None
    # CPU: the processes of this machine share its RAM (a GPU process has its own device)
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device.type == "cpu" else 1
    need = est.peak * sharing
    if need <= free:
        return est
    knobs = []
    if cfg.mixed_precision == "no":
        knobs.append("train.mixed_precision: bf16")
    if teacher is not None and getattr(cfg, "sds_gradient", "full") == "full":
        if not cfg.gradient_checkpointing:
            knobs.append("train.gradient_checkpointing: true")
        knobs.append("train.sds_gradient: jacobian_free (no UNet backprop; not the paper's gradient)")
    knobs.append(f"a smaller train.batch_size or more processes (local batch {est.local_batch})")
    if teacher is not None and cfg.text_cache_size and est.text_cache >= 0.05 * GIB:
        knobs.append("a smaller train.text_cache_size")
    who = f" x {sharing} processes" if sharing > 1 else ""
    msg = (
        f"train: one {est.setting} step needs ~{need / GIB:.1f} GiB{who} ({est.summary()} GiB) but {device} has "
        f"{free / GIB:.1f} GiB free; set {', '.join(knobs)}, or a `paper-*gb` profile "
        "(train.memory_check: warn | off to run anyway)"
    )
    if mode == "error":
        raise TrainError(msg)
    log.warning(msg)
    return est
