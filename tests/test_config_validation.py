"""Configs are validated on load: ranges, types, and keys one typo away from a field; HF and cartesia extras pass."""

import json
import warnings

import pytest

import llamba
from llamba.checkpoints import CheckpointError, load_model, read_config, save_cartesia
from llamba.config import ConfigError, LlambaConfig
from llamba.model import LlambaForCausalLM


@pytest.fixture
def saved(tiny_config, tmp_path):
    out = llamba.atomic_save(LlambaForCausalLM(tiny_config), tmp_path / "m")
    return out, json.loads((out / "config.json").read_text())


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("chunk_size", 10**9, "`chunk_size` is 1000000000, outside the supported range 1..4096"),
        ("d_conv", 0, "`d_conv` must be a positive integer, got 0"),
        ("d_conv", True, "`d_conv` must be a positive integer, got True"),
        ("n_v_heads", 2.5, "`n_v_heads` must be a positive integer"),
        ("d_model", 1 << 20, "`d_model` is 1048576, outside"),
        ("tie_embeddings", "yes", "`tie_embeddings` must be true or false"),
        ("norm_eps", 0, "`norm_eps` must be a number in (0, 1)"),
    ],
)
def test_out_of_range_fields_are_refused_naming_the_field(saved, field, value, message):
    out, raw = saved
    (out / "config.json").write_text(json.dumps(raw | {field: value}))
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_config(out)
    with pytest.raises(ConfigError):
        LlambaConfig(**{field: value})


def test_a_misspelled_field_is_refused_with_the_valid_keys(saved):
    out, raw = saved
    (out / "config.json").write_text(json.dumps(raw | {"chunk_sise": 8}))
    with pytest.raises(
        CheckpointError,
        match=r"unknown config key 'chunk_sise' \(did you mean 'chunk_size'\?\); "
        r"valid keys: .*d_conv",
    ):
        read_config(out)


def test_hugging_face_extras_are_tolerated(saved):
    out, raw = saved
    (out / "config.json").write_text(
        json.dumps(
            raw | {"_name_or_path": "x", "torch_dtype": "float32", "use_cache": True, "flux_capacitor": 3}
        )
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg, layout = read_config(out)
    assert layout == "llamba" and cfg.chunk_size == raw["chunk_size"]
    assert any("flux_capacitor" in str(w.message) for w in caught)


def test_cartesia_layout_tolerates_extras_and_refuses_typos(tiny_config, tmp_path):
    out = save_cartesia(LlambaForCausalLM(tiny_config), tmp_path / "c")
    raw = json.loads((out / "config.json").read_text())
    raw["ssm_cfg"] |= {"d_conv": 4, "dt_min": 0.001}
    (out / "config.json").write_text(json.dumps(raw | {"fused_add_norm": True}))
    assert load_model(out).config.chunk_size == tiny_config.chunk_size
    raw["ssm_cfg"]["n_qk_head"] = 2
    (out / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="unknown config key ssm_cfg.'n_qk_head'"):
        read_config(out)
    raw["ssm_cfg"] = {k: v for k, v in raw["ssm_cfg"].items() if k != "n_qk_head"} | {"chunk_size": 10**9}
    (out / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="chunk_size"):
        read_config(out)
