"""A teacher evaluation split over shards and merged (sdsclip.evaluate.shards) gives exactly the metrics JSON and
score file of the evaluation run whole; parts that do not add up are refused in one line.

The teacher is a Stable Diffusion 1.5-layout directory of tiny random diffusers / transformers parts (written with
their own save_pretrained), scored through the real TeacherScorer on a small synthetic world.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from eval_fixtures import tiny_world
from test_teacher_real import write_sd_dir
from tiny_params import tiny_params

from sdsclip import stages
from sdsclip.config import params_from_dict
from sdsclip.evaluate.shards import ShardError

pytestmark = (
    pytest.mark.slow
)  # a Stable Diffusion-layout teacher scored 2x per benchmark; `make test` runs it, `make test-fast` not

SHARDS = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    world = tiny_world(
        root / "world", winoground_items=10, aro_relation_items=8, aro_attribution_items=8, coco_order_images=3
    )
    sd = write_sd_dir(root / "stable-diffusion-v1-5")
    raw = tiny_params()
    raw["teacher"] = {**raw["teacher"], "pretrained_dir": str(sd), "latent": "vae", "image_size": 16}
    # 4 items per scorer call: every benchmark makes several calls, the last one short (10 Winoground examples)
    raw["eval"] = {
        **raw["eval"],
        "teacher_t_min": 10,
        "teacher_t_max": 99,
        "teacher_chunk_items": 4,
        "teacher_max_items": 10,
        "shards": SHARDS,
    }
    params = params_from_dict(raw)
    data = {"winoground": world / "winoground", "aro": world / "aro", "sugarcrepe": root / "sugarcrepe"}
    stages.derive_sugarcrepe(params, data["winoground"], data["sugarcrepe"])
    return {"root": root, "sd": sd, "params": params, "raw": raw, "data": data}


def _whole(setup, benchmark: str, out: Path) -> dict:
    p, sd, data = setup["params"], setup["sd"], setup["data"][benchmark]
    if benchmark == "winoground":
        return stages.evaluate_winoground(p, sd, data, out / "metrics.json", out / "scores.jsonl")
    if benchmark == "aro":
        return stages.evaluate_aro(p, sd, data, out / "metrics.json")
    return stages.evaluate_sugarcrepe(p, sd, data, out / "metrics.json", None, out / "scores.jsonl")


def _parts(setup, benchmark: str, out: Path, shards: int = SHARDS) -> list[Path]:
    p, sd, data = setup["params"], setup["sd"], setup["data"][benchmark]
    parts = [out / f"part-{k}.pt" for k in range(shards)]
    summaries = [stages.evaluate_shard(p, benchmark, sd, data, part, k, shards) for k, part in enumerate(parts)]
    scored = [s["scored"] for s in summaries]
    calls = summaries[0]["calls"]
    # round robin: each call scored by exactly one shard, every shard has work
    assert sorted(j for s in scored for j in s) == list(range(calls)) and all(scored), scored
    assert calls >= shards
    return parts


@pytest.mark.parametrize("benchmark", ["winoground", "aro", "sugarcrepe"])
def test_merged_shards_equal_the_whole_evaluation(setup, benchmark, tmp_path):
    whole = _whole(setup, benchmark, tmp_path / "whole")
    parts = _parts(setup, benchmark, tmp_path / "parts")
    merged_dir = tmp_path / "merged"
    scores = None if benchmark == "aro" else merged_dir / "scores.jsonl"
    merged = stages.merge_shards(
        setup["params"], benchmark, setup["data"][benchmark], parts, merged_dir / "metrics.json", scores
    )
    assert merged == whole
    assert (merged_dir / "metrics.json").read_bytes() == (tmp_path / "whole" / "metrics.json").read_bytes()
    if scores is not None:
        assert scores.read_bytes() == (tmp_path / "whole" / "scores.jsonl").read_bytes()
    if benchmark == "winoground":  # the teacher's own branch (Diffusion-ITM's correction) was replayed too
        assert merged["image_uncond_correction"] is True and "uncorrected" in merged


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_parts_that_do_not_add_up_are_refused(setup, tmp_path):
    p, data = setup["params"], setup["data"]["winoground"]
    parts = _parts(setup, "winoground", tmp_path / "three")
    out = tmp_path / "out.json"
    with pytest.raises(ShardError) as err:  # a shard missing
        stages.merge_shards(p, "winoground", data, parts[:2], out)
    assert "shard(s) [2] of 3 missing" in _one_line(err)
    with pytest.raises(ShardError) as err:  # a shard twice
        stages.merge_shards(p, "winoground", data, [parts[0], parts[1], parts[1]], out)
    assert "shard 1 again" in _one_line(err)
    with pytest.raises(ShardError) as err:  # a part of another benchmark
        stages.merge_shards(p, "aro", setup["data"]["aro"], parts, out)
    assert "not 'aro'" in _one_line(err)
    two = _parts(setup, "winoground", tmp_path / "two", shards=2)
    with pytest.raises(ShardError) as err:  # parts of two different runs
        stages.merge_shards(p, "winoground", data, [two[0], *parts[1:]], out)
    assert "different runs" in _one_line(err)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a part")
    with pytest.raises(ShardError) as err:
        stages.merge_shards(p, "winoground", data, [junk, *parts[1:]], out)
    assert str(junk) in _one_line(err)
    assert not out.exists()


def test_a_merge_with_other_params_than_its_shards_is_refused(setup, tmp_path):
    parts = _parts(setup, "aro", tmp_path / "parts")
    other = params_from_dict({**setup["raw"], "seed": setup["raw"]["seed"] + 1})  # another seeded subset
    with pytest.raises(ShardError) as err:
        stages.merge_shards(other, "aro", setup["data"]["aro"], parts, tmp_path / "out.json")
    assert "not the call the shards scored" in _one_line(err)
    assert not (tmp_path / "out.json").exists()


def test_shard_index_and_benchmark_are_checked_before_the_model_loads(setup, tmp_path, monkeypatch):
    import sdsclip.scoring

    monkeypatch.setattr(sdsclip.scoring, "load_scorer", lambda *a, **k: pytest.fail("model loaded"))
    p, sd = setup["params"], setup["sd"]
    with pytest.raises(ShardError, match="0 <= shard < shards"):
        stages.evaluate_shard(p, "winoground", sd, setup["data"]["winoground"], tmp_path / "p.pt", 3, 3)
    with pytest.raises(ValueError, match="expected one of winoground, aro, sugarcrepe"):
        stages.evaluate_shard(p, "zeroshot", sd, setup["data"]["winoground"], tmp_path / "p.pt", 0, 3)
