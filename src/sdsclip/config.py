"""Typed view of params.yaml: every knob of the project lives there and is validated here.

Unknown keys and bad values are rejected with one line naming the offending key, e.g.
``params.yaml: train.lr: Input should be greater than 0 (got -1)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sdsclip.errors import UserError


class ConfigError(UserError, ValueError):
    """A params file that cannot be used; the message is one line meant for the user."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WorldConfig(_Section):
    """The synthetic compositional world (../shared/toyworld.md); used by the embedded default only."""

    image_size: int = Field(32, ge=16, le=1024, description="canvas side in pixels")
    color_jitter: int = Field(20, ge=0, le=20, description="max per-channel jitter around nominal colours")
    pretrain_images: int = Field(4000, ge=1, description="images in the student/teacher pretraining split")
    train_images: int = Field(2000, ge=1, description="images in the fine-tuning split (the 'COCO train' stand-in)")
    captions_per_image: int = Field(5, ge=5, description="COCO has >=5 captions per image")
    single_object_fraction: float = Field(0.0, ge=0.0, le=1.0, description="share of one-object images in COCO splits")
    winoground_items: int = Field(200, ge=1)
    aro_relation_items: int = Field(200, ge=1)
    aro_attribution_items: int = Field(
        400, ge=1, description="~33 per ordered colour pair: ARO's VG-Attribution macro keeps pairs with >= 25"
    )
    coco_order_images: int = Field(100, ge=1)
    zeroshot_per_class: int = Field(20, ge=1)


class DataConfig(_Section):
    """Where the datasets live. The embedded default points these into the synthesized world."""

    coco_root: str = Field(
        "data/world/coco", description="dir with annotations/captions_{split}.json + images/{split}/"
    )
    winoground_dir: str = Field("data/world/winoground", description="dir with examples.jsonl + images/")
    aro_dir: str = Field("data/world/aro")
    zeroshot_dir: str = Field(
        "data/world/zeroshot", description="ImageFolder root, or the dir holding cifar-10-batches-py/"
    )
    sugarcrepe_dir: str = Field(
        "data/sugarcrepe", description="SugarCrepe {subset}.json + val2017/ (default: derived from the world)"
    )
    pretrain_split: str = Field("pretrain", description="COCO-format split the embedded models pretrain on")
    train_split: str = Field("train", description="COCO-format split SDS-CLIP fine-tunes on (real: train2017)")


class IngestConfig(_Section):
    """COCO captions -> WebDataset shards (src/sdsclip/ingest.py)."""

    splits: list[str] = Field(default_factory=lambda: ["pretrain", "train"], min_length=1)
    shard_size: int = Field(1000, ge=1, description="images planned per WebDataset tar shard")
    workers: int = Field(2, ge=1, description="threads reading + hashing + decoding images")
    max_image_pixels: int = Field(
        89_478_485, ge=1, description="decompression-bomb guard: larger images are quarantined (PIL's default)"
    )
    reencode_format: Literal["png", "jpeg"] = Field(
        "png", description="stored encoding of images that need conversion (non-RGB, 16-bit, EXIF-rotated)"
    )
    reencode_quality: int = Field(95, ge=1, le=100, description="JPEG quality when reencode_format is jpeg")
    resume: bool = Field(True, description="re-run: keep finished shards whose planned content is unchanged")


class ValidateConfig(_Section):
    max_rejected_fraction: float = Field(0.02, ge=0.0, le=1.0, description="stage fails above this")
    min_image_side: int = Field(8, ge=1)
    max_image_side: int = Field(8192, ge=1)
    min_caption_chars: int = Field(3, ge=1)
    max_caption_chars: int = Field(1000, ge=1)
    min_captions_per_image: int = Field(1, ge=1)
    data_docs: bool = Field(True, description="build Great Expectations Data Docs (HTML) next to the outputs")
    chunk_rows: int = Field(
        50_000,
        ge=0,
        description="manifest rows per Great Expectations batch (memory is bounded by this, not by the split); "
        "0 = the whole manifest in one batch (needed only by a suite with column aggregates)",
    )


class OptimConfig(_Section):
    steps: int = Field(600, ge=1, description="optimizer steps")
    batch_size: int = Field(64, ge=2)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup_steps: int = Field(50, ge=0)
    batching: Literal["random", "bag_distinct"] = Field(
        "random",
        description="random: shuffled pairs; bag_distinct: no two captions of a batch share their bag of "
        "colours, shapes and relation axis, so batches hold no word-order hard negatives (as web data rarely does)",
    )


class StudentConfig(_Section):
    """open_clip model. Embedded default: a tiny config registered with open_clip; real: e.g. ViT-B-32 + a local
    file."""

    arch: str = "sdsclip-tiny-vit"
    checkpoint: str | None = Field(
        None,
        description="real path, a local: open_clip state dict (.pt/.bin/.safetensors), OpenAI TorchScript .pt "
        "(needs a -quickgelu arch) or Hugging Face CLIPModel dir (config.json + model.safetensors); null = pretrain",
    )
    pretrain: OptimConfig = OptimConfig()
    text_order_steps: int = Field(
        0,
        ge=0,
        description="from-scratch pretraining only: N more steps after pretrain.steps in which only the "
        "text tower trains, on L_CLIP + text_order_weight * a text-only loss reading the scene a relational caption "
        "describes (sdsclip.text_order): a text tower that separates object swaps beside the bag-of-words image "
        'tower the first phase left (docs/science.md "Headroom"); 0 = off',
    )
    text_order_weight: float = Field(1.0, ge=0, description="weight of the text-order loss in those steps")


#: Research-only fields: the tiny teacher's experimental options (sdsclip.models.teacher_options) and its
#: pretraining tricks for the science experiment. They keep their keys, defaults and validation, but params.yaml
#: leaves them out (it shows what a user of the product sets); the science profile (profiles/science.yaml) sets
#: the ones it uses, and any params file or experiment profile may still set them. docs/science.md reports them.
RESEARCH_FIELDS: tuple[str, ...] = (
    "teacher.pretrain_high_t_share",
    "teacher.pretrain_high_t_min",
    "teacher.hard_negative_weight",
    "teacher.hard_negative_margin",
    "teacher.hard_negative_swap",
    "teacher.hard_negative_t_min",
    "teacher.tiny.position_embedding_std",
    "teacher.tiny.pooled_conditioning",
    "teacher.tiny.cross_attention_full_res",
    "teacher.tiny.text_encoder",
    "teacher.tiny.resnet_time_scale_shift",
    "teacher.tiny.coord_channels",
    "teacher.tiny.caption_map_channels",
    "teacher.tiny.prediction_type",
)


class TinyUNetConfig(_Section):
    """The tiny teacher (embedded default). From ``position_embedding_std`` on: research-only options
    (RESEARCH_FIELDS), off by default, built and run by sdsclip.models.teacher_options."""

    block_out_channels: list[int] = Field(default_factory=lambda: [32, 64, 64], min_length=1)
    layers_per_block: int = Field(1, ge=1)
    attention_head_dim: int = Field(8, ge=1)
    text_width: int = Field(64, ge=8, description="text encoder width = UNet cross-attention dim")
    text_layers: int = Field(2, ge=1)
    text_heads: int = Field(4, ge=1)
    max_caption_tokens: int = Field(16, ge=4)
    train_timesteps: int = Field(1000, ge=10)
    unshuffle_factor: int = Field(
        2,
        ge=1,
        le=8,
        description="pixel_unshuffle latent: k x k pixel blocks -> channels (2: 32 px -> 16x16x12; "
        "4: -> 8x8x48, ~4x cheaper per UNet step)",
    )
    position_embedding_std: float | None = Field(
        None,
        gt=0,
        description="init std of the text encoder's position embeddings (null = transformers' 0.02); "
        "order is only a weak signal while they are small next to the word embeddings",
    )
    pooled_conditioning: bool = Field(
        False,
        description="also add the caption's last text-encoder state (causal: it has read the whole caption, "
        "in order) to the UNet's timestep embedding, so every ResNet block is conditioned on it",
    )
    cross_attention_full_res: bool = Field(
        False, description="cross-attention in the full-resolution UNet block too (more layout conditioning)"
    )
    text_encoder: Literal["clip", "t5"] = Field(
        "clip",
        description="clip: CLIPTextModel, causal (as Stable Diffusion): a word's state never sees the words "
        "after it; t5: T5EncoderModel, bidirectional with relative positions (as Imagen / DeepFloyd IF), so each "
        "object phrase also reads the relation that follows it. position_embedding_std is clip only",
    )
    resnet_time_scale_shift: Literal["default", "scale_shift"] = Field(
        "default",
        description="how the timestep (+ pooled caption) embedding enters each ResNet block (diffusers' "
        "knob): default adds it (a shift, the same at every position, as SD); scale_shift also multiplies the "
        "normalised features by it (FiLM, as Imagen / ADM), so the caption can scale position-dependent features",
    )
    coord_channels: bool = Field(
        False,
        description="append two fixed channels (x, y in [-1, 1]) to the UNet input (CoordConv): a tiny "
        "8x8 conv UNet knows little of where it is, and 'the red circle is LEFT of the blue square' is about where",
    )
    caption_map_channels: int = Field(
        0,
        ge=0,
        description="k > 0: a small MLP maps the caption's pooled text state to k maps at the latent's "
        "resolution, fed to the UNet beside x_t: position-specific conditioning, which a conv UNet (weights "
        "shared across positions) lacks and DiT-style models get from absolute position embeddings; 0 = off (SD)",
    )
    prediction_type: Literal["epsilon", "v_prediction"] = Field(
        "epsilon",
        description="what the UNet learns to predict (its pretraining loss): epsilon (SD 1.x) or v "
        "(SD 2.x). The eps loss weights the high-noise steps, where only the caption can say where each object "
        "is, by SNR(t) ~ 0; v weights them ~1/alpha_bar(t) more. Scoring and SDS always use the eps error",
    )


class TeacherConfig(_Section):
    """diffusers UNet2DConditionModel + scheduler + frozen text encoder."""

    pretrained_dir: str | None = Field(None, description="local Stable Diffusion dir (real path); null = pretrain tiny")
    latent: Literal["pixel_unshuffle", "vae"] = Field(
        "pixel_unshuffle", description="image->teacher input: 2x2 pixel-unshuffle (tiny) or the SD VAE (real)"
    )
    image_size: int = Field(32, ge=8, description="pixels fed to the latent encoder")
    tiny: TinyUNetConfig = TinyUNetConfig()
    pretrain: OptimConfig = OptimConfig(steps=600, batch_size=64, lr=1e-3, weight_decay=0.0, warmup_steps=50)
    caption_dropout: float = Field(0.1, ge=0.0, lt=1.0, description="share of empty captions while pretraining")
    pretrain_t_min: int = Field(0, ge=0, description="smallest timestep sampled while pretraining the tiny teacher")
    pretrain_t_max: int | None = Field(
        None, ge=1, description="largest timestep (exclusive) sampled while pretraining; null = train_timesteps"
    )
    # Research-only (RESEARCH_FIELDS): the science teacher's high-noise share of each batch.
    pretrain_high_t_share: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="share of each pretraining batch whose timestep is drawn from "
        "[pretrain_high_t_min, pretrain_t_max) instead: the high-noise steps, where x_t no longer shows the layout "
        "and only the caption can say where each object is; 0 = uniform, as Stable Diffusion is trained",
    )
    pretrain_high_t_min: int = Field(
        700, ge=0, description="lower end of the high-noise range (see pretrain_high_t_share)"
    )
    binding_min_text_score: float = Field(
        0.5, ge=0.0, le=1.0, description="`sdsclip diagnose teacher` passes at this Winoground text score (chance 0.25)"
    )
    binding_each_tag: bool = Field(
        True,
        description="the text-score threshold also applies to each Winoground tag on its own (colour swaps, "
        "object swaps), so a teacher that binds colours but not relations does not pass",
    )
    # Research-only from here (RESEARCH_FIELDS, with pretrain_high_t_*): the science teacher's ranking loss.
    hard_negative_weight: float = Field(
        0.0,
        ge=0.0,
        description="tiny teacher only: weight of a ranking loss that makes the denoising error under a "
        "word-order hard negative of the caption (its colours or its objects swapped) exceed the error under the "
        "caption, same (t, eps); 0 = plain denoising, as Stable Diffusion is trained",
    )
    hard_negative_margin: float = Field(
        0.1, ge=0.0, description="the ranking loss stops once error(negative) >= (1 + margin) x error(caption)"
    )
    hard_negative_swap: Literal["both", "object", "colour"] = Field(
        "both",
        description="which hard negatives the ranking loss uses: object swaps (relational captions only), "
        "colour swaps, or both (half each)",
    )
    hard_negative_t_min: int = Field(
        0,
        ge=0,
        description="the ranking loss only on rows with t >= this: below it x_t shows where the objects are, "
        "so both captions denoise alike and the margin cannot be met",
    )

    @model_validator(mode="after")
    def _pretrain_t_range(self) -> TeacherConfig:
        top = min(self.pretrain_t_max or self.tiny.train_timesteps, self.tiny.train_timesteps)
        if self.pretrain_t_min >= top:
            raise ValueError(
                f"pretrain_t_min ({self.pretrain_t_min}) must be < pretrain_t_max / train_timesteps ({top})"
            )
        if self.pretrain_high_t_share and not self.pretrain_t_min <= self.pretrain_high_t_min < top:
            raise ValueError(
                f"pretrain_high_t_min ({self.pretrain_high_t_min}) must be in [pretrain_t_min "
                f"({self.pretrain_t_min}), pretrain_t_max / train_timesteps ({top}))"
            )
        return self


class TrainConfig(_Section):
    """SDS-CLIP fine-tuning: L = L_CLIP + lambda * L_SDS; only image-tower LayerNorms + sigma train."""

    lambda_sds: float = Field(1.0, ge=0.0, description="weight of L_SDS; the control stage forces 0")
    steps: int | None = Field(150, ge=1, description="optimizer steps; null = epochs x (pairs // batch_size)")
    epochs: int | None = Field(None, ge=1, description="passes over the accepted pairs; only when steps is null")
    batch_size: int = Field(32, ge=2, description="GLOBAL batch: split evenly over the processes of a DDP run")
    lr: float = Field(5e-5, gt=0)
    sigma_lr: float | None = Field(
        1e-3, gt=0, description="lr for the fresh sigma map (it starts from scratch); null = lr"
    )
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(10, ge=0)
    t_min: int = Field(20, ge=0, description="smallest timestep sampled for L_SDS")
    t_max: int = Field(980, ge=1, description="largest timestep sampled for L_SDS")
    noise_draws: int = Field(1, ge=1, description="(t, eps) draws per sample per step")
    sds_gradient: Literal["full", "jacobian_free"] = Field(
        "full",
        description="full = the paper's L_SDS, back-propagated through the frozen UNet; jacobian_free = "
        "the same logged loss, gradient w(t) (eps_hat - eps) on z with the UNet run without autograd (no UNet "
        "activations kept: cheaper steps, far bigger batches; see sdsclip.sds.SDS_WEIGHTS)",
    )
    sds_weighting: Literal["constant", "one_minus_alpha_bar"] = Field(
        "constant",
        description="w(t) of the jacobian_free gradient: constant (1) or one_minus_alpha_bar "
        "(DreamFusion's); unused by full",
    )
    batching: Literal["random", "bag_distinct"] = Field(
        "random", description="fine-tuning batches: random, or bag_distinct (no word-order hard negatives)"
    )
    captions: Literal["all", "one_per_image"] = Field(
        "all",
        description="what an epoch is: all (every accepted caption is its own pair) or one_per_image (each "
        "image once, with one of its accepted captions drawn per (seed, epoch)); steps from epochs follow it",
    )
    loader_workers: int = Field(
        0,
        ge=0,
        description="DataLoader processes decoding JPEGs for the training loaders (fine-tuning and "
        "pretraining); the same batches for any value; 0 = in the main process",
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="autocast of the step (accelerate)")
    gradient_checkpointing: bool = Field(False, description="recompute the frozen UNet's activations in backward")
    memory_check: Literal["error", "warn", "off"] = Field(
        "error",
        description="before the first step, compare the estimated peak memory of a step (sdsclip.memory) "
        "with the device's free memory: error stops the run with the knobs that help, warn logs it, off skips",
    )
    text_cache_size: int = Field(
        0,
        ge=0,
        description="LRU entries of teacher text conditioning kept on its device; 0 = encode every step "
        "(default: on COCO captions never repeat within 4096 entries, see benchmarks/train_step.py)",
    )
    checkpoint_every: int = Field(50, ge=0, description="write a resumable checkpoint every N steps; 0 = never")
    keep_checkpoints: int = Field(2, ge=1, description="newest checkpoints kept on disk")
    log_mlflow: bool = Field(True, description="also log per-step losses to MLflow (registry.tracking_uri)")
    trainable: Literal["image_layernorms", "image_norms", "image_tower", "sigma_only"] = Field(
        "image_layernorms",
        description="CLIP parameters that train: image_layernorms (the paper), image_norms (every "
        "normalization layer's affine params of the image tower, incl. BatchNorm/GroupNorm: for ResNets such as "
        "RN50, which have no LayerNorms there), image_tower (all image-tower params; a deviation from the paper) or "
        "sigma_only (CLIP frozen, only sigma trains: a diagnostic of how much of L_SDS's fall sigma absorbs)",
    )
    sigma_first_steps: int = Field(
        0,
        ge=0,
        description="the first N steps train sigma only (CLIP's lr held at 0), so the LayerNorms start "
        "from a fitted sigma rather than a random one; 0 = both from step 0 (the paper)",
    )
    grad_norm_every: int = Field(
        0,
        ge=0,
        description="every N steps log the gradient norm that L_CLIP and lambda * L_SDS each put on the "
        "trainable CLIP parameters and on sigma (two extra backward passes on those steps; single-process runs "
        "only); 0 = never. z's mean / std are logged every step of an SDS run regardless",
    )

    @model_validator(mode="after")
    def _t_range(self) -> TrainConfig:
        if self.t_min >= self.t_max:
            raise ValueError(f"t_min ({self.t_min}) must be < t_max ({self.t_max})")
        if (self.steps is None) == (self.epochs is None):
            raise ValueError(f"set exactly one of steps ({self.steps}) and epochs ({self.epochs}); the other null")
        if self.steps is not None and self.sigma_first_steps >= self.steps:
            raise ValueError(
                f"sigma_first_steps ({self.sigma_first_steps}) must be < steps ({self.steps}), or CLIP never trains"
            )
        return self


class EvalConfig(_Section):
    batch_size: int = Field(128, ge=1)
    teacher_draws: int = Field(8, ge=1, description="shared (t, eps) draws for the teacher's denoising score")
    teacher_t_min: int = Field(100, ge=0)
    teacher_t_max: int = Field(900, ge=1)
    teacher_max_items: int | None = Field(
        400,
        ge=1,
        description="teacher only: a seeded (seed) random subset of N items per ARO dataset / SugarCrepe "
        "subset / zero-shot set, stratified by the macro average's group (CPU cost); null = all",
    )
    teacher_chunk_items: int = Field(
        64,
        ge=1,
        description="teacher only: items per scorer call (Winoground examples, ARO / SugarCrepe items); "
        "the unit an evaluation is sharded by",
    )
    shards: int = Field(
        1,
        ge=1,
        description="Kubeflow: each teacher evaluation (Winoground, ARO, SugarCrepe) as N parallel GPU tasks, "
        "merged into the same metrics as one task; DVC and the CLI run it unsharded",
    )
    teacher_image_uncond_correction: bool = Field(
        True,
        description="teacher, Winoground: score(i, c) = -(err(i, c) - err(i, '')) (Diffusion-ITM) where "
        "images compete for one caption; caption comparisons of one image are unchanged",
    )
    vae_batch_size: int = Field(8, ge=1, description="teacher: images per VAE encode call (memory at 512 px)")
    vae_precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="teacher VAE encode under autocast: auto = bf16 (else fp16) on CUDA, fp32 on CPU"
    )
    on_missing: Literal["error", "skip"] = Field(
        "error", description="a missing/unreadable image: stop naming file and line, or skip it (counted, reported)"
    )
    aro_pos_tagger: str = Field(
        "textblob",
        pattern=r"^(textblob|spacy:.+)$",
        description="POS tagger for the ARO order perturbations: textblob | spacy:MODEL",
    )
    aro_attribution_min_count: int = Field(
        25, ge=1, description="VG-Attribution macro: pairs with >= N items (ARO: 25)"
    )
    zeroshot_prompts_file: str | None = Field(None, description="class names + templates JSON; null = packaged file")
    zeroshot_prompt_set: str | None = Field(
        None,
        description="entry of that file; null = follow the data (CIFAR -> cifar10/100, ImageFolder -> the "
        "entry whose classnames match its folders); a set not covering the classes is an error",
    )
    sugarcrepe_world_items: int | None = Field(
        100, ge=1, description="items per subset of the SugarCrepe-format set derived from the world"
    )


SdsGradient = Literal["full", "jacobian_free"]
OracleArm = Literal["image_layernorms", "image_tower", "both_towers"]
Probe = Literal["sigma_only", "best_t", "sigma_first", "image_tower"]
SDS_GRADIENTS: tuple[SdsGradient, ...] = get_args(SdsGradient)
ORACLE_ARMS: tuple[OracleArm, ...] = get_args(OracleArm)
PROBES: tuple[Probe, ...] = get_args(Probe)


class ScienceConfig(_Section):
    """`sdsclip science`: the control (lambda = 0) vs SDS-CLIP over seeds and a lambda sweep
    (src/sdsclip/science.py)."""

    seeds: list[int] = Field(
        default_factory=lambda: [0, 1, 2],
        min_length=1,
        description="fine-tuning seeds (data order, (t, eps) draws, sigma init) per arm",
    )
    lambdas: list[float] = Field(
        default_factory=lambda: [1.0, 10.0],
        min_length=1,
        description="lambda_sds values of the SDS arms; the control (0) always runs",
    )
    sds_gradients: list[SdsGradient] = Field(
        default_factory=lambda: list(SDS_GRADIENTS),
        min_length=1,
        description="train.sds_gradient of the SDS arms: each lambda runs once per entry (jacobian_free arms are "
        "named sds_lambda_<l>_jacobian_free)",
    )
    workdir: str = Field("science", description="world, shards, models, metrics and report of the experiment")
    diagnose_items: int | None = Field(200, ge=1, description="Winoground items of the teacher diagnostic; null = all")
    ladder: list[OracleArm] = Field(
        default_factory=lambda: list(ORACLE_ARMS),
        description="oracle fine-tunes on Winoground-format hard negatives (sdsclip.headroom): image_layernorms "
        "(a, SDS-CLIP's parameterization), image_tower (b, any image-side method), both_towers (c, NegCLIP); "
        "[] = none",
    )
    oracle_train_items: int = Field(1000, ge=2, description="Winoground-format training items of the oracle arms")
    oracle_lr: float = Field(1e-3, gt=0, description="lr of the oracle arms (same steps and batch as train.*)")
    oracle_train_seed: int = Field(1001, ge=0, description="world seed of the oracle arms' training items")
    holdout_seed: int = Field(
        2002,
        ge=0,
        description="world seed of the held-out Winoground / ARO sets every arm "
        "is also evaluated on (rendered apart from any training data)",
    )
    probes: list[Probe] = Field(
        default_factory=lambda: list(PROBES),
        description="mechanism probes, SDS arms at probe_lambda: sigma_only (CLIP frozen), best_t (t drawn only "
        "where the teacher binds object order best, from the diagnostic's by-t rows), sigma_first (sigma alone for "
        "train.steps / 4 steps first), image_tower (the whole image tower trains); [] = none",
    )
    probe_lambda: float | None = Field(10.0, gt=0, description="lambda of the probes; null = the first of lambdas")
    bootstrap_samples: int = Field(2000, ge=100, description="item resamples of the 95 % intervals")
    plain_student_ladder: bool = Field(
        True,
        description="with student.text_order_steps > 0: also pretrain the plain student (0 steps) and run "
        "the control and the ladder on it, so the report shows the premise on both students",
    )

    @model_validator(mode="after")
    def _positive_lambdas(self) -> ScienceConfig:
        if any(not lam > 0 for lam in self.lambdas):
            raise ValueError(f"lambdas must be > 0 (the control, 0, always runs), got {self.lambdas}")
        return self


class RegisterConfig(_Section):
    tracking_uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking/registry store")
    experiment: str = "sdsclip"
    model_name: str = "sdsclip-student"
    alias: str = "champion"
    gate_metric: str = Field("group_score", description="Winoground metric the candidate must not lose on")


class Params(_Section):
    profile: str | None = Field(None, description="training recipe merged over `train` (see load_profile)")
    seed: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    world: WorldConfig = WorldConfig()
    data: DataConfig = DataConfig()
    ingest: IngestConfig = IngestConfig()
    validation: ValidateConfig = ValidateConfig()
    student: StudentConfig = StudentConfig()
    teacher: TeacherConfig = TeacherConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    registry: RegisterConfig = RegisterConfig()
    science: ScienceConfig = ScienceConfig()
    multinode: dict[str, Any] | None = Field(
        None, description="PyTorchJob settings for multi-node training (sdsclip.cluster.jobspec.JobConfig fields)"
    )

    @model_validator(mode="after")
    def _check_multinode(self) -> Params:
        if self.multinode is not None:  # checked here so a typo stops every stage, not only the training step
            from sdsclip.cluster.jobspec import PyTorchJobError, job_config

            try:
                job_config(self.multinode, name="check", image="check")
            except PyTorchJobError as err:
                raise ValueError(str(err)) from None
        return self


def _format_error(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<top level>"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key (typo? see params.yaml and src/sdsclip/config.py for the valid keys)"
    got = first.get("input")
    got_text = "" if first["type"] == "extra_forbidden" or isinstance(got, dict) else f" (got {got!r})"
    more = f" [+{len(err.errors()) - 1} more]" if len(err.errors()) > 1 else ""
    return f"{source}: {key}: {msg}{got_text}{more}"


PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
PROFILE_SECTIONS = ("train",)
# A profile that declares `profile_scope: experiment` is a whole experiment (e.g. `science`): it may also
# reshape the world and the models, which a training recipe must not do behind the user's back.
EXPERIMENT_SCOPE = "experiment"
EXPERIMENT_SECTIONS = ("world", "student", "teacher", "train", "eval", "science")


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(name: str) -> tuple[dict[str, Any], Path]:
    """A named training recipe: ``sdsclip/profiles/{name}.yaml``, or a path to such a YAML file.

    A profile holds only the ``train`` section, unless it declares ``profile_scope: experiment``: then it may
    set the world, student, teacher, train and eval sections. ``params_from_dict`` merges it OVER params.yaml
    (nested mappings key by key), so a key set by the profile wins (edit or copy the profile to change it)."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else PROFILE_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"profile: unknown profile {name!r} (no {path}; shipped: {', '.join(available_profiles())})")
    try:
        overlay = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(overlay, dict):
        raise ConfigError(f"{path}: a profile must be a mapping of sections")
    scope = overlay.pop("profile_scope", None)
    if scope not in (None, EXPERIMENT_SCOPE):
        raise ConfigError(f"{path}: profile_scope: must be {EXPERIMENT_SCOPE!r} or absent (got {scope!r})")
    if not all(isinstance(overlay.get(k, {}), dict) for k in overlay):
        raise ConfigError(f"{path}: a profile must be a mapping of sections")
    allowed = EXPERIMENT_SECTIONS if scope == EXPERIMENT_SCOPE else PROFILE_SECTIONS
    extra = sorted(set(overlay) - set(allowed))
    if extra:
        hint = (
            ""
            if scope
            else f" (or declare `profile_scope: {EXPERIMENT_SCOPE}` to also set world, student, teacher, eval, science)"
        )
        raise ConfigError(f"{path}: {extra[0]}: a profile may only set {', '.join(allowed)}{hint}")
    return overlay, path


def _deep_merge(base: Any, overlay: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base) if isinstance(base, dict) else {}
    for key, value in overlay.items():
        merged[key] = _deep_merge(merged.get(key), value) if isinstance(value, dict) else value
    return merged


def apply_profile(raw: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """``raw`` with its ``profile`` (if any) merged over it; also the profile file's path for messages.

    Idempotent: applying it to its own output changes nothing, so resolved params can be re-validated."""
    name = raw.get("profile")
    if name is None:
        return raw, None
    if not isinstance(name, str) or not name:
        raise ConfigError(f"profile: must be a profile name or a .yaml path, got {name!r}")
    overlay, path = load_profile(name)
    return _deep_merge(raw, overlay), str(path)


def params_from_dict(raw: dict[str, Any], source: str = "params") -> Params:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections, got {type(raw).__name__}")
    raw, profile_path = apply_profile(raw)
    if profile_path:
        source = f"{source} + {profile_path}"
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(source, err)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found (run from the project root or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    return params_from_dict(raw, str(path))


def params_to_dict(params: Params) -> dict[str, Any]:
    return params.model_dump(mode="json")
