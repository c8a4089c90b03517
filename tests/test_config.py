"""params.yaml is the single source of knobs: the shipped file loads; mistakes are named, not tracebacks."""

from pathlib import Path

import pytest
import yaml

from sdsclip.config import ConfigError, load_params, params_from_dict, params_to_dict

ROOT = Path(__file__).resolve().parents[1]


def shipped() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_shipped_params_load_and_round_trip():
    params = load_params(ROOT / "params.yaml")
    assert params.train.lambda_sds > 0
    assert params_from_dict(params_to_dict(params)) == params


def keys(d, prefix=""):
    out = set()
    for k, v in d.items():
        out.add(prefix + k)
        if isinstance(v, dict):
            out |= keys(v, f"{prefix}{k}.")
    return out


def test_shipped_params_spell_out_every_knob():
    """Every product field of the schema appears in params.yaml, so users see all knobs in one file; the
    research-only ones (RESEARCH_FIELDS) are left out of it."""
    from sdsclip.config import RESEARCH_FIELDS

    assert keys(params_to_dict(load_params(ROOT / "params.yaml"))) - set(RESEARCH_FIELDS) == keys(shipped())


#: the research-only fields' defaults (as params.yaml spelt them out before they left it)
RESEARCH_DEFAULTS = {
    "teacher.pretrain_high_t_share": 0.0,
    "teacher.pretrain_high_t_min": 700,
    "teacher.hard_negative_weight": 0.0,
    "teacher.hard_negative_margin": 0.1,
    "teacher.hard_negative_swap": "both",
    "teacher.hard_negative_t_min": 0,
    "teacher.tiny.position_embedding_std": None,
    "teacher.tiny.pooled_conditioning": False,
    "teacher.tiny.cross_attention_full_res": False,
    "teacher.tiny.text_encoder": "clip",
    "teacher.tiny.resnet_time_scale_shift": "default",
    "teacher.tiny.coord_channels": False,
    "teacher.tiny.caption_map_channels": 0,
    "teacher.tiny.prediction_type": "epsilon",
}


@pytest.mark.parametrize(
    "key, bad, message",
    [
        ("teacher.pretrain_high_t_share", 1.0, r"teacher\.pretrain_high_t_share: .*less than 1"),
        ("teacher.hard_negative_weight", -1, r"teacher\.hard_negative_weight: .*greater than or equal to 0"),
        ("teacher.hard_negative_swap", "verb", r"teacher\.hard_negative_swap: Input should be 'both', 'object'"),
        ("teacher.tiny.text_encoder", "bert", r"teacher\.tiny\.text_encoder: Input should be 'clip' or 't5'"),
        ("teacher.tiny.prediction_type", "x0", r"teacher\.tiny\.prediction_type: Input should be 'epsilon'"),
        ("teacher.tiny.caption_map_channels", -1, r"teacher\.tiny\.caption_map_channels: .*greater than or equal"),
        ("teacher.tiny.position_embedding_std", 0, r"teacher\.tiny\.position_embedding_std: .*greater than 0"),
        ("teacher.tiny.resnet_time_scale_shift", "film", r"teacher\.tiny\.resnet_time_scale_shift: Input should"),
    ],
)
def test_research_fields_keep_their_defaults_and_validation(key, bad, message):
    """The research-only fields are absent from params.yaml, not from the schema: same defaults, still
    validated wherever they are set (a params file, an experiment profile)."""
    from sdsclip.config import RESEARCH_FIELDS

    assert set(RESEARCH_FIELDS) == set(RESEARCH_DEFAULTS)
    resolved, flat = params_to_dict(load_params(ROOT / "params.yaml")), {}
    for field in RESEARCH_FIELDS:
        node = resolved
        for part in field.split("."):
            node = node[part]
        flat[field] = node
    assert flat == RESEARCH_DEFAULTS
    assert not keys(shipped()) & set(RESEARCH_FIELDS)
    raw = shipped()
    node = raw
    *parents, last = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = bad
    with pytest.raises(ConfigError, match=message):
        params_from_dict(raw, "params.yaml")


@pytest.mark.parametrize(
    "path, value, message",
    [
        (("train", "lr"), -1, r"train\.lr: Input should be greater than 0 \(got -1\)"),
        (("train", "lambda_sds"), -0.5, r"train\.lambda_sds: .*greater than or equal to 0"),
        (("train", "learning_rate"), 0.1, r"train\.learning_rate: unknown key"),
        (("teacher", "latent"), "jpeg", r"teacher\.latent: Input should be 'pixel_unshuffle' or 'vae'"),
        (("validation", "max_rejected_fraction"), 2, r"validation\.max_rejected_fraction"),
        (("bogus_section",), {}, r"bogus_section: unknown key"),
    ],
)
def test_bad_values_are_named(path, value, message):
    raw = shipped()
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ConfigError, match=message):
        params_from_dict(raw, "params.yaml")


def test_cross_field_check():
    raw = shipped()
    raw["train"]["t_min"], raw["train"]["t_max"] = 900, 100
    with pytest.raises(ConfigError, match=r"train: .*t_min \(900\) must be < t_max \(100\)"):
        params_from_dict(raw)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "p.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match=r"p\.yaml: line \d+: not valid YAML"):
        load_params(bad)


def test_shipped_params_equal_the_code_defaults():
    """One source of defaults: params.yaml spells out config.py's defaults, so tests built on Params() run the
    shipped configuration (where params.yaml is silent the default applies, and the two never disagree)."""
    import yaml

    from sdsclip.config import Params, params_to_dict

    shipped_raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    defaults = params_to_dict(Params())

    def differences(raw, default, prefix=""):
        for key, value in raw.items():
            if isinstance(value, dict) and isinstance(default.get(key), dict):
                yield from differences(value, default[key], f"{prefix}{key}.")
            elif default.get(key) != value:
                yield f"{prefix}{key}: params.yaml {value!r} != config.py {default.get(key)!r}"

    assert not list(differences(shipped_raw, defaults))
    assert load_params(Path(__file__).resolve().parents[1] / "params.yaml") == Params()
