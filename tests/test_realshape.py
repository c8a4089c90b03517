"""`sdsclip realshape`: the real path end to end (fixtures -> ingest ... register) on the `tiny` scale.

The same runner, stage list and file formats as `make realshape` (OpenAI TorchScript student, SD-1.5-layout
teacher dir with a CLIP BPE tokenizer, COCO train2017 JPEGs), with shrunken models so it takes seconds."""

from __future__ import annotations

import json
import os

import pytest
from tiny_params import ROOT

from sdsclip import realshape
from sdsclip.realshape import SCALES, RealshapeError
from sdsclip.science import load_science_params


@pytest.fixture(scope="module")
def params():
    return load_science_params(ROOT / "params.yaml", "realshape")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, params):
    work = tmp_path_factory.mktemp("realshape")
    lines: list[str] = []
    elsewhere = work.parent / "production-registry.db"
    with pytest.MonkeyPatch.context() as mp:  # a real registry configured in the environment (it wins over params)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{elsewhere}")
        summary = realshape.run_realshape(params, work, scale="tiny", isolate=False, log=lines.append)
        assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{elsewhere}"  # restored afterwards
    assert not elsewhere.exists()  # random-init models never reach it
    return work, summary, lines


def test_profile_is_an_experiment_of_a_few_steps_and_items(params):
    assert params.profile == "realshape"
    assert params.train.steps <= 4 and params.train.batch_size == 2 and not params.train.log_mlflow
    assert params.eval.teacher_max_items == 2 and params.eval.teacher_draws == 1
    assert params.world.winoground_items <= 4


def test_real_scale_is_vit_b32_and_sd15(params):
    """The `real` scale's configs are SD-1.5's (parameter counts of the published checkpoints) and the chain is
    pointed at them with the VAE at 512 px, a 4x64x64 latent and 77-token conditioning."""
    import open_clip
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    real = SCALES["real"]
    assert real.teacher_image_size == 512 and real.latent_shape == [4, 64, 64]
    assert real.text_encoder["max_position_embeddings"] == 77 and real.text_encoder["hidden_size"] == 768
    assert open_clip.get_model_config(real.student_arch)["quick_gelu"] is True
    with torch.device("meta"):  # shapes only: no memory, no init time
        counts = [
            sum(p.numel() for p in m.parameters())
            for m in (
                UNet2DConditionModel(**real.unet),
                AutoencoderKL(**real.vae),
                CLIPTextModel(CLIPTextConfig(**{k: v for k, v in real.text_encoder.items() if k != "architectures"})),
            )
        ]
    assert counts == [859_520_964, 83_653_863, 123_060_480]
    p = realshape.realshape_params(params, ROOT / "realshape", real)
    assert p.teacher.latent == "vae" and p.teacher.image_size == 512 and p.student.arch == "ViT-B-32-quickgelu"
    assert p.student.checkpoint.endswith("ViT-B-32.pt") and p.ingest.splits == ["train2017"]
    assert p.registry.tracking_uri.startswith("sqlite:///") and "realshape" in p.registry.tracking_uri


def test_tokenizer_is_openai_clips_bpe(tmp_path):
    """The SD tokenizer/ built offline from open_clip's BPE file tokenizes exactly as OpenAI CLIP does."""
    import open_clip
    from transformers import AutoTokenizer

    realshape.write_clip_tokenizer(tmp_path / "tokenizer")
    assert sorted(p.name for p in (tmp_path / "tokenizer").iterdir()) == [
        "merges.txt",
        "special_tokens_map.json",
        "tokenizer_config.json",
        "vocab.json",
    ]  # SD-1.5's files
    tok = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    assert len(tok) == 49408 and tok.model_max_length == 77
    captions = ["A red circle to the LEFT of a blue square.", "two dogs, playing frisbee!! on 3 beaches"]
    ours = tok(captions, padding="max_length", max_length=77, truncation=True).input_ids
    for mine, openai in zip(ours, open_clip.tokenizer.SimpleTokenizer()(captions).tolist()):
        n = openai.index(49407) + 1
        assert len(mine) == 77 and mine[:n] == openai[:n] and set(mine[n:]) == {49407}


@pytest.mark.slow
def test_whole_chain_runs_on_the_real_formats(tiny_run):
    work, summary, _ = tiny_run
    names = [r["stage"] for r in summary["stages"]]
    assert names[:4] == ["fixture_coco", "fixture_student", "fixture_stable_diffusion", "fixture_world"]
    assert names[4:9] == ["ingest", "validate", "pretrain_student", "pretrain_teacher", "train_baseline"]
    for bench in ("winoground", "aro", "zeroshot", "sugarcrepe"):
        for model in ("pretrained", "baseline", "sds", "teacher"):
            assert f"evaluate_{bench}@{model}" in names
            assert (work / "run" / "metrics" / f"{bench}_{model}.json").is_file()
    assert names[-2:] == ["report", "register"]
    tiny = SCALES["tiny"]
    assert summary["shapes"]["sigma_latent_shape"] == tiny.latent_shape
    assert summary["shapes"]["student_source"] == "checkpoint" and summary["shapes"]["text_tokens"] == 77
    student = json.loads((work / "run" / "models" / "student_pretrained" / "student.json").read_text())
    assert student["converted_from"] == "openai_torchscript"
    assert summary["train"]["sds"]["lambda_sds"] > 0 and summary["train"]["baseline"]["lambda_sds"] == 0
    assert summary["registration"]["version"] == 1
    assert (work / "run" / "mlflow.db").is_file() and any((work / "run" / "mlartifacts").rglob("model.safetensors"))
    assert all(r["seconds"] >= 0 and r["peak_rss_mb"] > 0 for r in summary["stages"])
    assert json.loads((work / "summary.json").read_text())["stages"] == summary["stages"]
    coco = json.loads((work / "fixtures" / "coco" / "annotations" / "captions_train2017.json").read_text())
    assert len(coco["images"]) == tiny.coco_images and len(coco["annotations"]) == 5 * tiny.coco_images
    assert all((work / "fixtures" / "coco" / "train2017" / im["file_name"]).suffix == ".jpg" for im in coco["images"])


@pytest.mark.slow
def test_openai_checkpoint_has_openais_state_dict(tiny_run):
    import open_clip
    import torch

    work = tiny_run[0]
    state = torch.jit.load(str(work / "fixtures" / "clip" / "ViT-B-32.pt")).state_dict()
    reference = open_clip.create_model(SCALES["tiny"].student_arch).state_dict()
    assert set(state) == set(reference) | {"input_resolution", "context_length", "vocab_size"}
    assert state["visual.conv1.weight"].dtype == torch.float16 and int(state["context_length"]) == 16


@pytest.mark.slow
def test_fixtures_are_reused_while_their_config_matches(tiny_run, params):
    work = tiny_run[0]
    records = realshape.ensure_fixtures(params, work, scale="tiny", log=lambda _: None)
    assert [r["reused"] for r in records] == [True] * 4
    changed = params.model_copy(update={"world": params.world.model_copy(update={"zeroshot_per_class": 2})})
    records = realshape.ensure_fixtures(changed, work, scale="tiny", log=lambda _: None)
    assert [r["stage"] for r in records if not r["reused"]] == ["fixture_world"]
    assert len(list((work / "fixtures" / "world" / "zeroshot").glob("*/*.png"))) == 24


@pytest.mark.slow
def test_isolated_stage_runs_in_its_own_process_and_failures_name_the_stage(tiny_run, params, tmp_path):
    """The executor of `make realshape`: one stage per interpreter, its own peak RSS; a failing stage stops
    the run with one line naming it."""
    work = tiny_run[0]
    p = realshape.realshape_params(params, work, SCALES["tiny"])
    params_file = realshape.write_params(p, tmp_path / "params.yaml")
    kwargs = {"coco_root": p.data.coco_root, "out_root": str(tmp_path / "shards")}
    result, rss = realshape.run_stage_in_child("ingest", "sdsclip.stages:ingest", params_file, kwargs, tmp_path / "s")
    assert result["train2017"]["images_written"] == SCALES["tiny"].coco_images and rss > 0
    kwargs["coco_root"] = str(tmp_path / "nowhere")
    with pytest.raises(RealshapeError, match=r"stage ingest failed \(exit [12]"):
        realshape.run_stage_in_child("ingest", "sdsclip.stages:ingest", params_file, kwargs, tmp_path / "s")


def test_unknown_scale_is_one_line(params, tmp_path):
    with pytest.raises(RealshapeError, match="--scale 'huge': one of real, tiny"):
        realshape.run_realshape(params, tmp_path, scale="huge")
