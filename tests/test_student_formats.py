"""The real student-weights path: every checkpoint format a user of OpenAI CLIP / Hugging Face CLIP meets,
each written here by the library that writes it in the wild (torch.jit, transformers' save_pretrained,
torch.save), never downloaded; plus the trainable sets of ResNet students and broken weight files."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import open_clip
import pytest
import torch
import yaml
from tiny_params import tiny_params
from train_helpers import make_dataset, make_models, train_params, write_params
from typer.testing import CliRunner

from sdsclip.cli import app
from sdsclip.models.student import (
    StudentLoadError,
    build_student,
    load_student,
    save_student,
    trainable_clip_parameters,
)
from sdsclip.sds import LatentProjection, select_trainable
from sdsclip.weights import WeightFileError

TINY_VIT = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},  # head_width 64: 1 head
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2},
}
# RN50's config (ModifiedResNet image tower: BatchNorms, no LayerNorm) with small widths and depths.
TINY_RN = {
    **open_clip.get_model_config("RN50"),
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module", autouse=True)
def fixture_archs(tmp_path_factory):
    """Tiny configs registered with open_clip: a GELU ViT, its -quickgelu variant, a ResNet."""
    root = tmp_path_factory.mktemp("archs")
    for name, cfg in {
        "fx-vit": TINY_VIT,
        "fx-vit-quickgelu": {**TINY_VIT, "quick_gelu": True},
        "fx-rn": TINY_RN,
    }.items():
        (root / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(root)


def _inputs(context: int = 16, n: int = 3, side: int = 32):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, side, side, generator=g)
    tokens = torch.randint(1, 49000, (n, context), generator=g)
    for i in range(n):  # EOT (the largest id) at a different position per row, zero padding after it
        tokens[i, 4 + i] = 49407
        tokens[i, 5 + i :] = 0
    return images, tokens


def _logits(model, images, tokens):
    with torch.no_grad():
        img = model.encode_image(images, normalize=True)
        txt = model.encode_text(tokens, normalize=True)
        return model.logit_scale.exp() * img @ txt.T


def _openai_torchscript(path: Path) -> torch.jit.ScriptModule:
    """An OpenAI-format checkpoint: a QuickGELU open_clip CLIP (OpenAI's key names) traced with torch.jit as
    ``open_clip.trace_model`` does (called by hand: in open_clip 3.3 it fails on a tuple image_size)."""
    torch.manual_seed(0)
    model = open_clip.create_model("fx-vit-quickgelu").eval()
    images = torch.ones(2, 3, 32, 32)
    text = torch.zeros(2, 16, dtype=torch.int)
    traced = torch.jit.trace_module(
        model, inputs={"forward": (images, text), "encode_text": (text,), "encode_image": (images,)}
    )
    torch.jit.save(traced, str(path))
    return traced


# ---------------------------------------------------------------------------- OpenAI TorchScript .pt


def test_openai_torchscript_checkpoint_loads_with_quickgelu_and_matches_the_original(tmp_path):
    pt = tmp_path / "ViT-fx.pt"
    traced = _openai_torchscript(pt)
    images, tokens = _inputs()
    with torch.no_grad():
        img, txt, scale = traced(images, tokens)
    expected = scale * img @ txt.T

    student = build_student("fx-vit-quickgelu", pt)
    assert student.converted_from == "openai_torchscript" and student.quick_gelu
    assert torch.allclose(_logits(student.model, images, tokens), expected, atol=1e-5)

    # The saved student records the activation and reloads with it, without the registry's help.
    save_student(student, tmp_path / "s")
    meta = json.loads((tmp_path / "s" / "student.json").read_text())
    assert meta["quick_gelu"] is True and meta["converted_from"] == "openai_torchscript"
    assert json.loads((tmp_path / "s" / "open_clip_config.json").read_text())["model_cfg"]["quick_gelu"] is True
    assert torch.allclose(_logits(load_student(tmp_path / "s").model, images, tokens), expected, atol=1e-5)


def test_openai_checkpoint_under_a_gelu_arch_is_refused_naming_the_quickgelu_arch(tmp_path):
    pt = tmp_path / "ViT-fx.pt"
    _openai_torchscript(pt)
    with pytest.raises(StudentLoadError, match=r"QuickGELU.*set student\.arch: fx-vit-quickgelu") as err:
        build_student("fx-vit", pt)
    assert "\n" not in str(err.value)
    # What the refusal prevents: the same weights under nn.GELU compute other logits.
    images, tokens = _inputs()
    gelu = open_clip.create_model("fx-vit")
    gelu.load_state_dict(build_student("fx-vit-quickgelu", pt).model.state_dict())
    quick = build_student("fx-vit-quickgelu", pt).model
    assert not torch.allclose(_logits(gelu, images, tokens), _logits(quick, images, tokens), atol=1e-3)


def test_open_clip_state_dicts_still_load_and_unreadable_files_say_so(tmp_path):
    torch.manual_seed(0)
    model = open_clip.create_model("fx-vit")
    images, tokens = _inputs()
    for name in ("sd.pt", "sd.bin"):
        torch.save(model.state_dict(), tmp_path / name)
        loaded = build_student("fx-vit", tmp_path / name)
        assert torch.allclose(_logits(loaded.model, images, tokens), _logits(model, images, tokens))
    save_student(build_student("fx-vit", tmp_path / "sd.pt"), tmp_path / "s")
    again = build_student("fx-vit", tmp_path / "s" / "model.safetensors")
    assert torch.allclose(_logits(again.model, images, tokens), _logits(model, images, tokens))

    whole = (tmp_path / "sd.pt").read_bytes()
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all\n" * 40)
    (tmp_path / "truncated.pt").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "truncated.safetensors").write_bytes((tmp_path / "s" / "model.safetensors").read_bytes()[:5000])
    for bad, reason in (
        ("garbage.pt", "unreadable"),
        ("truncated.pt", "unreadable"),
        ("truncated.safetensors", "corrupt or truncated"),
    ):
        with pytest.raises(WeightFileError, match=reason) as err:
            build_student("fx-vit", tmp_path / bad)
        assert "does not fit" not in str(err.value) and "\n" not in str(err.value)
    # A training checkpoint with pickled objects besides tensors: named, not run.
    torch.save({"state_dict": model.state_dict(), "args": argparse.Namespace(lr=1)}, tmp_path / "objs.pt")
    with pytest.raises(WeightFileError, match="pickled Python objects"):
        build_student("fx-vit", tmp_path / "objs.pt")
    # Readable weights of another architecture are still "does not fit".
    with pytest.raises(StudentLoadError, match="does not fit architecture 'sdsclip-tiny-vit'"):
        build_student("sdsclip-tiny-vit", tmp_path / "sd.pt")


# ------------------------------------------------------------------------- Hugging Face CLIPModel dir


def _clip_bpe_tokenizer(out: Path):
    """OpenAI's CLIP BPE as a transformers CLIPTokenizer, written from open_clip's bundled vocabulary."""
    import gzip

    from open_clip.tokenizer import SimpleTokenizer, default_bpe
    from transformers import CLIPTokenizer

    out.mkdir(parents=True, exist_ok=True)
    simple = SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}  # OpenAI's spelling
    (out / "vocab.json").write_text(json.dumps({names.get(k, k): v for k, v in simple.encoder.items()}))
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), pad_token="<|endoftext|>")


def _hf_clip_dir(
    root: Path, eos_token_id: int, vocab_size: int = 49408, tokenizer: bool = False, act: str = "quick_gelu"
) -> Path:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": 32,
            "intermediate_size": 80,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 12,
            "eos_token_id": eos_token_id,
            "bos_token_id": 0,
            "pad_token_id": 1,
            "hidden_act": act,
            "layer_norm_eps": 1e-6,
        },
        vision_config={
            "hidden_size": 48,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
            "hidden_act": act,
        },
        projection_dim=24,
        logit_scale_init_value=2.0,
    )
    model = CLIPModel(cfg).eval()
    with torch.no_grad():  # random, non-trivial LayerNorms and logit scale, so a mis-mapped tensor shows
        for name, p in model.named_parameters():
            if "layer_norm" in name or "layrnorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    out = root / "hf-clip"
    model.save_pretrained(out)
    if tokenizer:
        _clip_bpe_tokenizer(root / "tok").save_pretrained(out)
    return out


@pytest.mark.parametrize("case", ["legacy_eos_argmax", "eos_token_pool"])
def test_hf_clipmodel_dir_converts_to_open_clip_and_matches_transformers(case, tmp_path):
    from transformers import CLIPModel

    legacy = case == "legacy_eos_argmax"
    # legacy: eos_token_id 2 (as OpenAI's hub configs): HF pools the argmax id, EOT = the largest id.
    # otherwise HF pools the first eos_token_id, here 3, with larger ids before it: argmax would pool wrong.
    hf_dir = _hf_clip_dir(tmp_path, eos_token_id=2 if legacy else 3, tokenizer=legacy)
    hf = CLIPModel.from_pretrained(hf_dir).eval()
    g = torch.Generator().manual_seed(2)
    pixels = torch.randn(2, 3, 32, 32, generator=g)
    ids = torch.randint(4, 49000, (3, 12), generator=g)
    for i in range(3):
        ids[i, 3 + 2 * i] = 49407 if legacy else 3
        ids[i, 4 + 2 * i :] = 0
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels)

    def check(student):
        model = student.model.eval()
        with torch.no_grad():
            img = model.encode_image(pixels, normalize=True)
            txt = model.encode_text(ids, normalize=True)
            assert torch.allclose(img, ref.image_embeds, atol=1e-4)
            assert torch.allclose(txt, ref.text_embeds, atol=1e-4)
            assert torch.allclose(model.logit_scale.exp() * img @ txt.T, ref.logits_per_image, atol=1e-4)

    student = build_student("my-hf-clip", hf_dir)
    assert student.converted_from == "hf_clip" and student.quick_gelu
    check(student)
    captions = ["a red circle left of a blue square", "a dog"]
    tokens = student.tokenizer(captions)
    assert tokens.dtype == torch.long and tokens.shape == (2, 12)

    save_student(student, tmp_path / "s")
    shutil.rmtree(hf_dir)  # the saved student stands on its own
    meta = json.loads((tmp_path / "s" / "student.json").read_text())
    assert meta["arch"] == "my-hf-clip" and meta["converted_from"] == "hf_clip"
    assert meta["tokenizer"].startswith("transformers CLIPTokenizer" if legacy else "open_clip SimpleTokenizer")
    again = load_student(tmp_path / "s")
    check(again)
    assert torch.equal(again.tokenizer(captions), tokens)
    if legacy:  # the transformers tokenizer, wrapped: OpenAI's BPE ids up to EOT (49407), its padding after
        eot = (tokens == 49407).int().argmax(-1)
        assert (tokens.argmax(-1) == eot).all()
        simple = open_clip.get_tokenizer("fx-vit")(captions)[:, :12]
        assert all(torch.equal(tokens[i, : e + 1], simple[i, : e + 1]) for i, e in enumerate(eot.tolist()))


def test_hf_dir_errors_are_one_line(tmp_path):
    no_tok = _hf_clip_dir(tmp_path / "a", eos_token_id=2, vocab_size=99)
    with pytest.raises(StudentLoadError, match="no tokenizer files .* vocab_size 99"):
        build_student("x", no_tok)
    unsupported_act = _hf_clip_dir(tmp_path / "b", eos_token_id=2, act="gelu_new")
    with pytest.raises(StudentLoadError, match="hidden_act"):
        build_student("x", unsupported_act)
    broken = _hf_clip_dir(tmp_path / "c", eos_token_id=2)
    (broken / "model.safetensors").write_bytes((broken / "model.safetensors").read_bytes()[:3000])
    with pytest.raises(WeightFileError, match="model.safetensors: corrupt or truncated"):
        build_student("x", broken)
    # A registered open_clip name must describe the converted model; the fixture's is another one.
    with pytest.raises(
        StudentLoadError,
        match=r"student\.arch 'fx-vit' is a registered open_clip architecture "
        r"that is not this CLIPModel \(embed_dim 32 vs 24",
    ):
        build_student("fx-vit", broken)
    (tmp_path / "empty").mkdir()
    with pytest.raises(StudentLoadError, match="not a Hugging Face CLIPModel"):
        build_student("x", tmp_path / "empty")


# ------------------------------------------------------------------------------ ResNet: trainable sets


def test_resnet_trainable_sets():
    student = build_student("fx-rn")
    model = student.model
    assert trainable_clip_parameters(model, "image_layernorms") == []  # RN50-style: no image-tower LayerNorm
    bn = [m for m in model.visual.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    norms = trainable_clip_parameters(model, "image_norms")
    assert bn and {id(p) for p in norms} == {id(p) for m in bn for p in (m.weight, m.bias)}
    sigma = LatentProjection(student.embed_dim, (4, 8, 8))
    params = select_trainable(model, sigma, "image_tower")
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in model.visual.parameters()}
    assert len(params) == len(list(model.visual.parameters())) + len(list(sigma.parameters()))


@pytest.fixture(scope="module")
def train_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("rn")
    shards, accepted = make_dataset(root, n_images=8, captions_per_image=2)
    (root / "validated" / "train").mkdir(parents=True)
    (root / "shards_root").mkdir()
    (root / "shards_root" / "train").symlink_to(shards)
    accepted.rename(root / "validated" / "train" / "accepted.csv")
    student, teacher = make_models(root)
    torch.manual_seed(0)
    rn = save_student(build_student("fx-rn"), root / "rn-student")
    return {
        "root": root,
        "shards": root / "shards_root",
        "validated": root / "validated",
        "student": student,
        "rn": rn,
        "teacher": teacher,
    }


def _train(w, student: Path, out: Path, params: Path, *extra: str):
    return CliRunner().invoke(
        app,
        [
            "train",
            "--student",
            str(student),
            "--teacher",
            str(w["teacher"]),
            "--shards",
            str(w["shards"]),
            "--validated",
            str(w["validated"]),
            "--out",
            str(out),
            "--params",
            str(params),
            *extra,
        ],
    )


def test_resnet_student_is_refused_unless_another_trainable_set_is_chosen(train_world, tmp_path):
    from safetensors.torch import load_file

    w = train_world
    params = write_params(tmp_path / "p.yaml", train_params(tmp_path, steps=2, batch_size=4))
    result = _train(w, w["rn"], tmp_path / "out", params, "--control")
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "fx-rn" in lines[0] and "image_norms" in lines[0] and "only sigma would train" in lines[0]
    assert not (tmp_path / "out").exists()

    params = write_params(tmp_path / "q.yaml", train_params(tmp_path, steps=2, batch_size=4, trainable="image_norms"))
    result = _train(w, w["rn"], tmp_path / "out", params, "--control")
    assert result.exit_code == 0, result.output
    before = load_file(str(w["rn"] / "model.safetensors"))
    after = load_file(str(tmp_path / "out" / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    model = build_student("fx-rn").model
    bn = {
        f"visual.{n}.{p}"
        for n, m in model.visual.named_modules()
        if isinstance(m, torch.nn.BatchNorm2d)
        for p in ("weight", "bias")
    }
    assert changed and changed <= bn, sorted(changed - bn)[:5]  # BatchNorm affine params only, stats untouched


# ------------------------------------------------------------------------------ broken weight files


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a half-copied file: header intact, tensor bytes missing


@pytest.mark.parametrize("broken", ["model.safetensors", "sigma.safetensors"])
def test_broken_student_weight_file_is_one_line_exit_2(broken, train_world, tmp_path):
    w = train_world
    student = tmp_path / "student"
    shutil.copytree(w["student"], student)
    if broken == "sigma.safetensors":
        from safetensors.torch import save_file

        save_file({"linear.weight": torch.zeros(8, 4)}, str(student / "sigma.safetensors"))
    _truncate(student / broken)
    params = tmp_path / "eval.yaml"
    params.write_text(yaml.safe_dump(tiny_params()))
    runs = {
        "evaluate": CliRunner().invoke(
            app,
            [
                "evaluate",
                "winoground",
                "--data",
                str(tmp_path / "wino"),
                "--model",
                str(student),
                "--out",
                str(tmp_path / "m.json"),
                "--params",
                str(params),
            ],
        )
    }
    train_p = write_params(tmp_path / "t.yaml", train_params(tmp_path, steps=2, batch_size=4))
    runs["train"] = _train(w, student, tmp_path / "out", train_p)
    for name, result in runs.items():
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1, (name, result.output)
        assert f"{student / broken}: corrupt or truncated safetensors file" in lines[0], (name, lines[0])
    assert not (tmp_path / "out").exists()


def test_hf_dir_hashes_what_is_loaded_and_a_broken_shard_index_is_one_line(tmp_path):
    """pretrain_student records the hash of what load_hf_clip reads (not a hub snapshot's TF / Flax siblings);
    a sharded save reads its index, and a broken index is a one-line error, not a JSONDecodeError."""
    from transformers import CLIPModel

    from sdsclip.models.hf_clip import loaded_files

    hf_dir = _hf_clip_dir(tmp_path, eos_token_id=2, tokenizer=True)
    (hf_dir / "tf_model.h5").write_bytes(b"\0" * 4096)
    (hf_dir / "flax_model.msgpack").write_bytes(b"\0" * 4096)
    files = loaded_files(hf_dir)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    assert "tf_model.h5" not in files and "flax_model.msgpack" not in files

    sharded = tmp_path / "sharded"
    CLIPModel.from_pretrained(hf_dir).save_pretrained(sharded, max_shard_size="100KB")
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) > 1 and loaded_files(sharded) == ["config.json", "model.safetensors.index.json", *shards]
    build_student("my-hf-clip", sharded)
    (sharded / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(StudentLoadError, match=r"model\.safetensors\.index\.json: unreadable shard index"):
        build_student("my-hf-clip", sharded)


def test_memory_estimate_works_for_a_converted_student_without_a_registered_name(tmp_path):
    """finetune hands the memory preflight the student's own model config: an HF-converted student (free arch
    name) is estimated like any other instead of skipping the check."""
    from sdsclip.config import Params
    from sdsclip.memory import estimate_step

    student = build_student("my-hf-clip", _hf_clip_dir(tmp_path, eos_token_id=2))
    cfg = Params().train
    est = estimate_step(cfg, student.model_cfg, None, 1, "cpu", 100, (4, 8, 8))
    assert est.activations > 0 and est.weights > 0
    with pytest.raises(StudentLoadError, match="unknown open_clip architecture"):
        estimate_step(cfg, "my-hf-clip", None, 1, "cpu", 100, (4, 8, 8))
