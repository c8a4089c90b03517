"""Image-caption matchers used by every benchmark: the CLIP student and the diffusion teacher.

Both expose ``score(images, captions, pairs)`` returning one similarity per (image index, caption index)
pair, higher = better match, so each benchmark's metric is written once for any model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from PIL import Image

from sdsclip.errors import UserError
from sdsclip.models.student import Student, is_student_dir, load_student
from sdsclip.models.teacher import Teacher, is_teacher_dir, teacher_pixels


class Scorer(Protocol):
    name: str

    def score(
        self, images: Sequence[Image.Image], captions: Sequence[str], pairs: Sequence[tuple[int, int]]
    ) -> torch.Tensor: ...


class ModelRefError(UserError, ValueError):
    """--model points at something that is neither a student nor a teacher."""


def _batches(seq: Sequence | torch.Tensor, size: int):
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


_IDENTITY_AT_SIZE = {"Resize", "CenterCrop", "MaybeConvertMode", "_convert_to_rgb", "MaybeToTensor", "ToTensor"}


def already_sized_pixels(preprocess, images: Sequence[Image.Image]) -> torch.Tensor | None:
    """open_clip's eval transform on a batch of RGB images already at the model's input size, in one tensor op.

    Resize(S) / CenterCrop(S) leave an S x S image unchanged (PIL returns a copy), so the transform reduces to
    ToTensor + Normalize, done here on the stacked batch with the same float32 ops (bit-identical). Returns
    None (use the per-image transform) for any other transform or image.
    """
    steps = getattr(preprocess, "transforms", None)
    if not steps or type(steps[-1]).__name__ != "Normalize":
        return None
    size = None
    for t in steps[:-1]:
        name = getattr(t, "__name__", type(t).__name__)  # functions (e.g. _convert_to_rgb) or transform classes
        if name not in _IDENTITY_AT_SIZE:
            return None
        if name in ("Resize", "CenterCrop"):
            side = t.size if isinstance(t.size, int) else (t.size[0] if len(set(t.size)) == 1 else None)
            if side is None or (size is not None and side != size) or getattr(t, "max_size", None):
                return None
            size = side
    if size is None or any(im.mode != "RGB" or im.size != (size, size) for im in images):
        return None
    import numpy as np

    x = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2)
    x = x.float().div(255)
    norm = steps[-1]
    mean = torch.as_tensor(norm.mean, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.as_tensor(norm.std, dtype=x.dtype).view(1, -1, 1, 1)
    return x.sub(mean).div(std)


class StudentScorer:
    """Cosine similarity of CLIP image and text embeddings."""

    def __init__(self, student: Student, batch_size: int = 128, device: str = "cpu"):
        self.student, self.batch_size, self.device = student, batch_size, torch.device(device)
        self.model = student.model.to(self.device).eval()
        self.name = student.arch

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        out = []
        for chunk in _batches(list(images), self.batch_size):
            x = already_sized_pixels(self.student.preprocess, chunk)
            if x is None:
                x = torch.stack([self.student.preprocess(im.convert("RGB")) for im in chunk])
            out.append(F.normalize(self.model.encode_image(x.to(self.device)).float(), dim=-1))
        return torch.cat(out)

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        """Token ids [n, context] (each row independent of the others, so batches may be cut anywhere)."""
        return self.student.tokenizer(list(captions))

    @torch.no_grad()
    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        out = [
            F.normalize(self.model.encode_text(chunk.to(self.device)).float(), dim=-1)
            for chunk in _batches(tokens, self.batch_size)
        ]
        return torch.cat(out)

    def embed_texts(self, captions: Sequence[str]) -> torch.Tensor:
        return self.embed_tokens(self.tokenize(captions))

    @staticmethod
    def pair_scores(img: torch.Tensor, txt: torch.Tensor, pairs: Sequence[tuple[int, int]]) -> torch.Tensor:
        """Cosine similarity of (image index, caption index) pairs of normalised embeddings."""
        idx_i = torch.tensor([p[0] for p in pairs], dtype=torch.long)
        idx_c = torch.tensor([p[1] for p in pairs], dtype=torch.long)
        return (img[idx_i] * txt[idx_c]).sum(-1).cpu()

    def score(self, images, captions, pairs) -> torch.Tensor:
        return self.pair_scores(self.embed_images(images), self.embed_texts(captions), pairs)


VAE_PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def vae_autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of the teacher's VAE encode (None = fp32): ``auto`` = bf16 on a CUDA card that has it,
    else fp16; fp32 on a CPU unless asked (memory is not the limit there, and CPU runs stay comparable with
    earlier ones). benchmarks/teacher_vae.py: SD-1.5's VAE at 512 px needs ~0.6 GiB per image in fp32, ~0.4 in
    bf16 (so ~80 GiB for 128 images in one call, ~5 GiB for 8), bf16 latents within ~1.2 % (relative L2)."""
    if precision not in VAE_PRECISIONS:
        raise ValueError(f"vae_precision must be one of {VAE_PRECISIONS} (got {precision!r})")
    device = torch.device(device)
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


class TeacherScorer:
    """Diffusion-classifier score: negative denoising error averaged over a FIXED, shared set of (t, eps).

    Sharing the draws across every image and caption makes the comparison between captions paired, so
    differences come from the conditioning, not from the noise.

    Images go through the VAE ``vae_batch_size`` at a time (SD-1.5 at 512 px: ~0.6 GiB of activations per
    image in fp32), under autocast in ``vae_precision`` (``vae_autocast_dtype``); a chunk that comes out non-finite in
    fp16 is encoded again in fp32. The UNet batches are ``batch_size`` (pair, draw) jobs.

    ``image_uncond_correction`` (read by benchmarks where IMAGES compete for one caption, Winoground's image
    score): there the raw error is confounded by how hard each image is to denoise at all, so Diffusion-ITM
    (Krojer et al., 2023) scores ``-(err(i, c) - err(i, ""))``, the empty caption's error over the same (t, eps)
    draws (``score_with_uncond``). It subtracts a per-image constant, so it leaves every comparison of captions
    for one image (Winoground's text score, ARO, SugarCrepe, zero-shot) unchanged; ``score`` stays the raw
    ``-err(i, c)``.
    """

    name = "teacher"

    def __init__(
        self,
        teacher: Teacher,
        draws: int,
        t_min: int,
        t_max: int,
        seed: int = 0,
        batch_size: int = 128,
        device: str = "cpu",
        vae_batch_size: int = 8,
        vae_precision: str = "auto",
        image_uncond_correction: bool = True,
    ):
        self.teacher = teacher.freeze().to(device)
        self.batch_size, self.device = batch_size, torch.device(device)
        self.vae_batch_size = max(int(vae_batch_size), 1)
        self.vae_dtype = vae_autocast_dtype(vae_precision, self.device)
        self.image_uncond_correction = bool(image_uncond_correction)
        gen = torch.Generator().manual_seed(seed)
        steps = torch.linspace(t_min, t_max, draws).round().long()  # spread over the range, not random
        self.t = steps
        self.noise = torch.randn((draws, *teacher.latent_shape), generator=gen)

    def single_draws(self) -> list[TeacherScorer]:
        """One scorer per (t, eps) draw, sharing the teacher: the mean of their scores is this scorer's score,
        so a diagnostic can see at which noise levels the caption matters, at no extra compute."""
        import copy

        out = []
        for k in range(self.t.shape[0]):
            one = copy.copy(self)
            one.t, one.noise = self.t[k : k + 1], self.noise[k : k + 1]
            out.append(one)
        return out

    @torch.no_grad()
    def latents(self, images: Sequence[Image.Image]) -> torch.Tensor:
        from torchvision.transforms.functional import center_crop, resize, to_tensor

        size = self.teacher.image_size
        out = []
        for chunk in _batches(list(images), self.vae_batch_size):
            x = torch.stack(
                [center_crop(resize(to_tensor(im.convert("RGB")), size, antialias=True), size) for im in chunk]
            )
            out.append(self._encode(teacher_pixels(x)).cpu())
        return torch.cat(out) if out else torch.empty(0, *self.teacher.latent_shape)

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        dtype = self.vae_dtype if getattr(self.teacher, "latent", None) == "vae" else None
        if dtype is None:
            return self.teacher.encode_images(pixels).float()
        with torch.autocast(self.device.type, dtype=dtype):
            z = self.teacher.encode_images(pixels).float()
        if dtype == torch.float16 and not torch.isfinite(z).all():  # fp16 overflow: this chunk in fp32
            z = self.teacher.encode_images(pixels).float()
        return z

    @torch.no_grad()
    def text_conditioning(self, captions: Sequence[str]) -> torch.Tensor:
        return torch.cat([self.teacher.encode_text(list(c)).cpu() for c in _batches(list(captions), self.batch_size)])

    @torch.no_grad()
    def score(self, images, captions, pairs) -> torch.Tensor:
        """-err(i, c) per (image index, caption index) pair, err = mean over the shared draws."""
        return -self._errors(self.latents(images), self.text_conditioning(captions), pairs)

    @torch.no_grad()
    def score_with_uncond(self, images, captions, pairs) -> tuple[torch.Tensor, torch.Tensor]:
        """(``score``'s -err(i, c) per pair, err(i, "") per image): one VAE pass, the empty caption's errors over
        the same (t, eps) draws and batched with the pairs. The corrected score is ``raw + uncond[image]``."""
        captions = list(captions)
        z, cond = self.latents(images), self.text_conditioning([*captions, ""])
        empty = len(captions)
        errors = self._errors(z, cond, [*pairs, *((i, empty) for i in range(len(images)))])
        return -errors[: len(pairs)], errors[len(pairs) :]

    @torch.no_grad()
    def latent_errors(self, z: torch.Tensor, cond: torch.Tensor, pairs) -> torch.Tensor:
        """err per (latent index, conditioning index) pair for given latents (not images), same shared draws."""
        return self._errors(z, cond, pairs)

    def _errors(self, z: torch.Tensor, cond: torch.Tensor, pairs) -> torch.Tensor:
        draws = self.t.shape[0]
        # Every (pair, draw) combination, flattened and batched through the UNet.
        jobs = [(p, k) for p in range(len(pairs)) for k in range(draws)]
        errors = torch.empty(len(pairs), draws)
        for chunk in _batches(jobs, self.batch_size):
            pi = torch.tensor([pairs[j][0] for j, _ in chunk])
            ci = torch.tensor([pairs[j][1] for j, _ in chunk])
            k = torch.tensor([kk for _, kk in chunk])
            err = self.teacher.epsilon_error(
                z[pi].to(self.device),
                cond[ci].to(self.device),
                self.t[k].to(self.device),
                self.noise[k].to(self.device),
            ).cpu()
            errors[torch.tensor([j for j, _ in chunk]), k] = err
        return errors.mean(1)


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def load_scorer(ref: str | Path, params) -> Scorer:
    """A student directory -> StudentScorer; a teacher directory -> TeacherScorer (params.eval knobs)."""
    from sdsclip.models.teacher import check_t_range, check_teacher_dir
    from sdsclip.teacher_ref import resolve_teacher, teacher_source

    ref = Path(ref)
    device = resolve_device(params.device)
    if is_student_dir(ref):
        return StudentScorer(load_student(ref), params.eval.batch_size, device)
    if is_teacher_dir(ref):
        ev = params.eval
        # Before any weights load: a t beyond the scheduler's steps would be an IndexError mid-benchmark.
        root, latent, _ = teacher_source(ref)
        check_t_range(
            check_teacher_dir(root, latent)[0],
            ev.teacher_t_min,
            ev.teacher_t_max,
            "eval.teacher_t_min",
            "eval.teacher_t_max",
        )
        return TeacherScorer(
            resolve_teacher(ref),
            ev.teacher_draws,
            ev.teacher_t_min,
            ev.teacher_t_max,
            seed=params.seed,
            batch_size=ev.batch_size,
            device=device,
            vae_batch_size=ev.vae_batch_size,
            vae_precision=ev.vae_precision,
            image_uncond_correction=ev.teacher_image_uncond_correction,
        )
    raise ModelRefError(
        f"{ref}: --model must be a student directory (student.json) or a teacher directory "
        "(teacher.json or a Stable Diffusion model_index.json)"
    )
