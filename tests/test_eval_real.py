"""The evaluation path as real data and a real Stable Diffusion teacher meet it: the zero-shot prompt set follows
the data (CIFAR-10's 18-template ensemble, not the toy world's one template), the teacher's item cap is a seeded
stratified sample (not the first N items of an ordered file), Diffusion-ITM's unconditional correction of the
teacher's image score, and the VAE encoded in chunks under autocast."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from eval_fixtures import HashScorer, tiny_world
from PIL import Image

from sdsclip import stages
from sdsclip.config import params_from_dict
from sdsclip.evaluate.aro import SYMMETRIC_RELATIONS, evaluate_aro
from sdsclip.evaluate.winoground import evaluate_winoground, metrics_from_scores
from sdsclip.evaluate.zeroshot import ZeroShotDataError, evaluate_zeroshot
from sdsclip.scoring import TeacherScorer, vae_autocast_dtype

ROOT = Path(__file__).resolve().parents[1]
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def shipped_params(**eval_overrides):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["device"] = "cpu"
    raw["eval"] = {**raw["eval"], **eval_overrides}
    return params_from_dict(raw)


def write_cifar10(root: Path, per_class: int = 6) -> Path:
    """cifar-10-batches-py/ as the official archive has it: ``batches.meta`` and ``test_batch`` pickled (protocol
    2) dicts with the official keys, images as uint8 rows of 3072 (R, G, B planes of 32 x 32), labels SORTED
    by class (an ordered file, so a prefix would cover the first classes only)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    labels = [c for c in range(10) for _ in range(per_class)]
    rng = np.random.default_rng(0)
    data = np.stack(
        [
            np.full((3, 32, 32), 20 * c, dtype=np.uint8) + rng.integers(0, 10, (3, 32, 32), dtype=np.uint8)
            for c in labels
        ]
    ).reshape(len(labels), 3072)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"num_cases_per_batch": len(labels), "label_names": CIFAR10, "num_vis": 3072}, f, protocol=2)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(
            {
                "batch_label": "testing batch 1 of 1",
                "labels": labels,
                "data": data,
                "filenames": [f"img_{i:05d}.png" for i in range(len(labels))],
            },
            f,
            protocol=2,
        )
    return root


class PromptCounter:
    """A CLIP-like scorer (embed_images / embed_texts) that records the prompts it embeds."""

    name = "counter"

    def __init__(self):
        self.prompts = []

    def embed_images(self, images):
        return torch.nn.functional.normalize(
            torch.stack([torch.tensor(np.asarray(im, dtype=np.float32).mean((0, 1))) + 1.0 for im in images]), dim=-1
        )

    def embed_texts(self, texts):
        self.prompts.extend(texts)
        g = torch.Generator().manual_seed(len(texts))
        return torch.nn.functional.normalize(torch.rand(len(texts), 3, generator=g) + 0.1, dim=-1)


# ---------------------------------------------------------------------------------------------------------------
# 1. the zero-shot prompt set follows the data
# ---------------------------------------------------------------------------------------------------------------


def test_shipped_params_score_real_cifar10_with_the_clip_ensemble(tmp_path):
    """params.yaml's prompt set (null) on CIFAR-10 batches -> the cifar10 entry, 18 templates per class."""
    params = shipped_params()
    assert params.eval.zeroshot_prompt_set is None
    root = write_cifar10(tmp_path / "c")
    scorer = PromptCounter()
    m = evaluate_zeroshot(scorer, root, tmp_path / "m.json", prompt_set=params.eval.zeroshot_prompt_set)
    assert (m["format"], m["prompt_set"], m["prompt_set_source"], m["templates"]) == (
        "cifar10",
        "cifar10",
        "detected",
        18,
    )
    assert len(scorer.prompts) == 18 * 10 and "a blurry photo of a truck." in scorer.prompts
    assert m["n"] == 60 and m["n_classes"] == 10


def test_toyworld_on_cifar10_is_a_one_line_error_before_the_model_loads(tmp_path):
    root = write_cifar10(tmp_path / "c")
    with pytest.raises(ZeroShotDataError) as err:
        evaluate_zeroshot(PromptCounter(), root, tmp_path / "m.json", prompt_set="toyworld")
    msg = str(err.value)
    assert "\n" not in msg and "'toyworld' has no class name for 10 of the 10 classes" in msg
    assert "eval.zeroshot_prompt_set: null" in msg and "(detected: 'cifar10')" in msg
    # the stage checks before loading the model: a model path that does not exist is never reached
    params = shipped_params(zeroshot_prompt_set="toyworld")
    with pytest.raises(ZeroShotDataError, match="'toyworld' has no class name"):
        stages.evaluate_zeroshot(params, tmp_path / "no-model", root, tmp_path / "m.json")


def test_imagefolder_picks_the_entry_whose_classnames_match(tmp_path):
    world = tiny_world(tmp_path / "w")
    m = evaluate_zeroshot(PromptCounter(), world / "zeroshot", tmp_path / "m.json")
    assert (m["prompt_set"], m["templates"], m["n_classes"]) == ("toyworld", 1, 12)
    # a folder of other classes: the generic imagefolder entry (folder names as class names)
    other = tmp_path / "pets"
    for name in ("cat", "dog"):
        (other / name).mkdir(parents=True)
        Image.new("RGB", (8, 8), "red").save(other / name / "0.png")
    m = evaluate_zeroshot(PromptCounter(), other, tmp_path / "m.json")
    assert (m["prompt_set"], m["templates"]) == ("imagefolder", 1)
    with pytest.raises(ZeroShotDataError, match=r"'cifar10' has no class name for 12 of the 12 classes.*toyworld"):
        evaluate_zeroshot(PromptCounter(), world / "zeroshot", tmp_path / "m.json", prompt_set="cifar10")


# ---------------------------------------------------------------------------------------------------------------
# 2. the teacher's item cap: a seeded random subset, stratified by the macro average's group
# ---------------------------------------------------------------------------------------------------------------


class StandInTeacherScorer(TeacherScorer):
    """Counts as the teacher for stages._is_teacher (so eval.teacher_max_items applies); hash scores."""

    def __init__(self):
        self.hash = HashScorer()

    def score(self, images, captions, pairs):
        return self.hash.score(images, captions, pairs)


def test_capped_zeroshot_covers_every_class_of_an_ordered_batch(tmp_path, monkeypatch):
    root = write_cifar10(tmp_path / "c")
    monkeypatch.setattr("sdsclip.scoring.load_scorer", lambda ref, params: StandInTeacherScorer())
    params = shipped_params(teacher_max_items=20)
    params = params.model_copy(update={"seed": 7})
    m = stages.evaluate_zeroshot(params, tmp_path / "teacher", root, tmp_path / "m.json")
    assert m["n"] == 20 and set(m["per_class_recall"]) == set(CIFAR10)  # the first 20 would be 4 classes
    assert m["subset"] == {
        "n": 20,
        "total": 60,
        "seed": 7,
        "max_items": 20,
        "stratified_by": "class",
        "groups_total": 10,
        "groups_covered": 10,
    }
    again = stages.evaluate_zeroshot(params, tmp_path / "teacher", root, tmp_path / "m2.json")
    assert again == m  # seeded: the same subset


def _vg_fixture(root: Path) -> Path:
    """visual_genome_relation.json / visual_genome_attribution.json in the ARO repository's record format,
    records sorted by relation / attribute pair, and the images they crop."""
    (root / "images").mkdir(parents=True)
    for k in range(4):
        Image.new("RGB", (40, 40), (60 * k, 255 - 60 * k, 90)).save(root / "images" / f"{k}.jpg")
    relations = ["above", "below", "to the left of", "on", "wearing", "next to"]  # "next to" is symmetric
    rel = [
        {
            "image_path": f"{(i + j) % 4}.jpg",
            "bbox_x": 2,
            "bbox_y": 3,
            "bbox_w": 30,
            "bbox_h": 30,
            "true_caption": f"the cup is {r} the table {j}",
            "false_caption": f"the table is {r} the cup {j}",
            "relation_name": r,
        }
        for i, r in enumerate(relations)
        for j in range(10)
    ]
    pairs = [("red", "blue"), ("big", "small"), ("wet", "dry")]
    counts = {("red", "blue"): 30, ("big", "small"): 30, ("wet", "dry"): 3}  # the last below min_count 25
    att = [
        {
            "image_path": f"{j % 4}.jpg",
            "bbox_x": 0,
            "bbox_y": 0,
            "bbox_w": 40,
            "bbox_h": 40,
            "true_caption": f"the {a} cup and the {b} plate {j}",
            "false_caption": f"the {b} cup and the {a} plate {j}",
            "attributes": [a, b],
        }
        for a, b in pairs
        for j in range(counts[(a, b)])
    ]
    (root / "visual_genome_relation.json").write_text(json.dumps(rel))
    (root / "visual_genome_attribution.json").write_text(json.dumps(att))
    return root


def test_capped_vg_covers_every_relation_and_keeps_the_files_attribute_pairs(tmp_path):
    root = _vg_fixture(tmp_path / "aro")
    m = evaluate_aro(
        HashScorer(), root, tmp_path / "m.json", ["vg_relation", "vg_attribution"], seed=3, max_items=12, min_count=25
    )
    r = m["vg_relation"]
    kept = {"above", "below", "to the left of", "on", "wearing"}
    assert "next to" in SYMMETRIC_RELATIONS and r["n"] == 12
    # every non-symmetric relation is in the macro average (the first 12 records: "above" and "below" only);
    # the budget goes to the relations the macro average uses before the symmetric ones it leaves out
    assert set(r["by_relation"]) == kept and r["n_relations_kept"] == 5
    assert r["subset"] == {
        "n": 12,
        "total": 60,
        "seed": 3,
        "max_items": 12,
        "stratified_by": "relation",
        "groups_total": 6,
        "groups_covered": 5,
        "eligible_groups_total": 5,
        "eligible_groups_covered": 5,
    }
    a = m["vg_attribution"]
    # the macro keeps the pairs with >= 25 items in the FILE, though the subset has 6 of each
    assert a["n"] == 12 and a["n_pairs_kept"] == 2 and a["min_count_on"] == "file counts"
    assert {p: v["count"] for p, v in a["by_attribute_pair"].items()} == {"red_blue": 6, "big_small": 6}
    assert a["subset"]["total"] == 63 and a["subset"]["eligible_groups_covered"] == 2
    # no cap (a student): every item, no subset record, the file's macro as before
    full = evaluate_aro(HashScorer(), root, tmp_path / "f.json", ["vg_attribution"], seed=3, min_count=25)
    assert "subset" not in full["vg_attribution"] and full["vg_attribution"]["n"] == 63
    assert "min_count_on" not in full["vg_attribution"]


# ---------------------------------------------------------------------------------------------------------------
# 3. Diffusion-ITM's unconditional correction of the teacher's image score
# ---------------------------------------------------------------------------------------------------------------


class OffsetTeacher:
    """A stand-in teacher whose denoising error = a large per-image offset (how hard the image is to denoise:
    its blue channel) + 1 when the caption names the wrong colour (0.5 for the empty caption) + noise."""

    latent = "pixel_unshuffle"
    image_size = 8
    latent_shape = (3, 8, 8)
    vae = None

    def freeze(self):
        return self

    def to(self, device):
        return self

    def encode_images(self, pixels):
        return pixels

    def encode_text(self, captions):
        vec = {"": [0.0, 0.0, 1.0]}
        return torch.tensor([[vec.get(c, [1.0, 0.0, 0.0] if "red" in c else [0.0, 1.0, 0.0])] for c in captions])

    def epsilon_error(self, z, cond, t, noise):
        rgb = z.mean((2, 3))
        hardness = 10.0 * (rgb[:, 2] + 1.0)
        named_red = cond[:, 0, 0] > 0.5
        wrong = (rgb[:, 0] > rgb[:, 1]) != named_red
        mismatch = torch.where(cond[:, 0, 2] > 0.5, torch.full_like(hardness, 0.5), wrong.float())
        return hardness + mismatch + 0.01 * noise.flatten(1).mean(1) + 1e-3 * t.float() / 1000


def _winoground_fixture(root: Path) -> Path:
    """examples.jsonl + images/ (the original layout): in each example the red image is hard to denoise (much
    blue), the green one easy, so the raw error prefers the green image for EVERY caption."""
    (root / "images").mkdir(parents=True)
    lines = []
    for k in range(4):
        Image.new("RGB", (8, 8), (230, 20, 200 + 10 * k)).save(root / "images" / f"ex_{k}_img_0.png")
        Image.new("RGB", (8, 8), (20, 230, 10 * k)).save(root / "images" / f"ex_{k}_img_1.png")
        lines.append(
            json.dumps(
                {
                    "id": k,
                    "caption_0": f"a red thing {k}",
                    "caption_1": f"a green thing {k}",
                    "image_0": f"ex_{k}_img_0",
                    "image_1": f"ex_{k}_img_1",
                    "tag": "t",
                    "secondary_tag": "",
                    "num_main_preds": 1,
                    "collapsed_tag": ["Object", "Relation"][k % 2],
                }
            )
        )
    (root / "examples.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_uncond_correction_fixes_the_image_score_and_leaves_the_text_score(tmp_path):
    data = _winoground_fixture(tmp_path / "wino")
    runs = {}
    for on in (False, True):
        scorer = TeacherScorer(OffsetTeacher(), draws=3, t_min=100, t_max=900, image_uncond_correction=on)
        runs[on] = evaluate_winoground(scorer, data, tmp_path / f"m{on}.json", tmp_path / f"s{on}.jsonl")
    off, on = runs[False], runs[True]
    assert off["image_score"] == 0.0 and on["image_score"] == 1.0  # the offset flips it without the correction
    assert off["image_uncond_correction"] is False and on["image_uncond_correction"] is True
    assert on["uncorrected"]["image_score"] == 0.0
    # text scores identical with and without (a per-image constant), overall and per subset
    assert on["text_score"] == off["text_score"] == 1.0
    assert {t: v["text_score"] for t, v in on["by_collapsed_tag"].items()} == {
        t: v["text_score"] for t, v in off["by_collapsed_tag"].items()
    }
    # score file: `score` reproduces the reported metrics, `raw_score` is the uncorrected run's `score`
    lines_on = [json.loads(x) for x in (tmp_path / "sTrue.jsonl").read_text().splitlines()]
    lines_off = [json.loads(x) for x in (tmp_path / "sFalse.jsonl").read_text().splitlines()]
    assert [x["raw_score"] for x in lines_on] == [x["score"] for x in lines_off]
    assert all(set(x) == {"label", "score"} for x in lines_off)
    by_label = {x["label"]: x["score"] for x in lines_on}
    table = torch.tensor([[[by_label[f"{k}_c{c}_i{i}"] for i in (0, 1)] for c in (0, 1)] for k in range(4)])
    assert metrics_from_scores(table)["image_score"] == on["image_score"]


def test_uncond_correction_leaves_every_per_image_caption_comparison(tmp_path):
    """On random errors (a real tiny UNet would do the same): the caption ranking for each image is identical."""

    class RandomOffsets(OffsetTeacher):
        def epsilon_error(self, z, cond, t, noise):
            g = (z.flatten(1).sum(1) * 1e3).long() + (cond.flatten(1).sum(1) * 7).long()
            return (torch.sin(g.double() * 12.9898 + t.double()) * 43758.5453).frac().abs().float() * 5

    images = [Image.new("RGB", (8, 8), (17 * k, 5 * k, 200 - 9 * k)) for k in range(6)]
    captions = [f"a red thing {k}" for k in range(5)]
    pairs = [(i, c) for i in range(6) for c in range(5)]
    scorer = TeacherScorer(RandomOffsets(), draws=4, t_min=100, t_max=900)
    raw, uncond = scorer.score_with_uncond(images, captions, pairs)
    assert torch.equal(raw, scorer.score(images, captions, pairs))  # the same draws
    corrected = raw.double().reshape(6, 5) + uncond.double()[:, None]
    raw = raw.double().reshape(6, 5)
    assert torch.equal(raw.argsort(1), corrected.argsort(1))
    assert torch.equal(raw[:, :, None] > raw[:, None, :], corrected[:, :, None] > corrected[:, None, :])


# ---------------------------------------------------------------------------------------------------------------
# 4. the VAE in chunks, under autocast
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vae_teacher(tmp_path_factory):
    """A Teacher with latent "vae" whose AutoencoderKL is a tiny random one read back from save_pretrained."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from sdsclip.models.teacher import Teacher

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae") / "vae"
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    ).save_pretrained(path)
    vae = AutoencoderKL.from_pretrained(path)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    return Teacher(unet, torch.nn.Identity(), None, DDPMScheduler(), latent="vae", image_size=16, vae=vae)


def _images(n=10):
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)) for _ in range(n)]


def test_chunked_vae_latents_equal_the_unchunked(vae_teacher, monkeypatch):
    calls = []
    real = vae_teacher.vae.encode
    monkeypatch.setattr(vae_teacher.vae, "encode", lambda x: (calls.append(x.shape[0]), real(x))[1])
    whole = TeacherScorer(vae_teacher, 2, 100, 900, batch_size=128, vae_batch_size=128).latents(_images())
    assert calls == [10]
    calls.clear()
    chunked = TeacherScorer(vae_teacher, 2, 100, 900, batch_size=128, vae_batch_size=3).latents(_images())
    assert calls == [3, 3, 3, 1] and chunked.shape == (10, 4, 8, 8)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)


def test_cpu_bf16_autocast_encode_is_within_tolerance_of_fp32(vae_teacher):
    """Tolerance: relative L2 error of the latents <= 2 % (bf16 has an 8-bit mantissa, ~0.4 % per op)."""
    dtypes = []
    conv = vae_teacher.vae.encoder.conv_in
    hook = conv.register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))
    try:
        fp32 = TeacherScorer(vae_teacher, 2, 100, 900, vae_precision="auto").latents(_images())  # CPU: fp32
        assert dtypes[-1] == torch.float32
        bf16 = TeacherScorer(vae_teacher, 2, 100, 900, vae_precision="bf16").latents(_images())
        assert dtypes[-1] == torch.bfloat16  # the convolutions really ran in bf16
    finally:
        hook.remove()
    assert bf16.dtype == torch.float32
    rel = float((bf16 - fp32).norm() / fp32.norm())
    assert 0 < rel <= 0.02, rel


def test_vae_precision_choice_and_fp16_overflow_falls_back_to_fp32(vae_teacher, monkeypatch):
    assert vae_autocast_dtype("auto", "cpu") is None and vae_autocast_dtype("fp32", "cuda") is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert vae_autocast_dtype("auto", "cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert vae_autocast_dtype("auto", "cuda") == torch.float16
    with pytest.raises(ValueError, match="vae_precision"):
        vae_autocast_dtype("int8", "cpu")
    scorer = TeacherScorer(vae_teacher, 2, 100, 900, vae_precision="fp16")
    real = vae_teacher.encode_images
    overflow = []

    def encode(pixels):  # what an fp16 overflow in the VAE looks like: inf latents under autocast
        z = real(pixels)
        if torch.is_autocast_enabled("cpu"):
            overflow.append(1)
            return torch.full_like(z, float("inf"))
        return z

    monkeypatch.setattr(vae_teacher, "encode_images", encode)
    z = scorer.latents(_images(4))
    assert overflow and torch.isfinite(z).all()
    torch.testing.assert_close(z, TeacherScorer(vae_teacher, 2, 100, 900, vae_precision="fp32").latents(_images(4)))


def test_load_scorer_reads_the_eval_knobs(tmp_path):
    from test_train import make_sd_dir

    from sdsclip.scoring import load_scorer

    sd = make_sd_dir(tmp_path)
    params = shipped_params(vae_batch_size=3, vae_precision="bf16", teacher_image_uncond_correction=False)
    scorer = load_scorer(sd, params)
    assert isinstance(scorer, TeacherScorer) and scorer.teacher.vae is not None
    assert (scorer.vae_batch_size, scorer.vae_dtype, scorer.image_uncond_correction) == (3, torch.bfloat16, False)
    default = load_scorer(sd, shipped_params())
    assert (default.vae_batch_size, default.vae_dtype, default.image_uncond_correction) == (8, None, True)


def test_capped_sugarcrepe_is_a_seeded_sample_not_the_first_items(tmp_path):
    from sdsclip.evaluate.sugarcrepe import evaluate_sugarcrepe

    (tmp_path / "val2017").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "val2017" / "a.png")
    items = {
        str(k): {"filename": "a.png", "caption": f"caption {k}", "negative_caption": f"negative {k}"} for k in range(40)
    }
    (tmp_path / "swap_att.json").write_text(json.dumps(items))
    m = evaluate_sugarcrepe(
        HashScorer(), tmp_path, tmp_path / "m.json", max_items=10, seed=4, scores_out=tmp_path / "s.jsonl"
    )
    ids = [json.loads(x)["id"] for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(ids) == 10 and ids != [str(k) for k in range(10)] and ids == sorted(ids, key=int)
    assert m["subset"] == {"swap_att": {"n": 10, "total": 40, "seed": 4, "max_items": 10, "stratified_by": None}}
