"""export/mlx_llamba.ModelArgs copies the model-shaping fields of llamba.config.LlambaConfig (config.json is shared):
a field added to one and not the other would be dropped silently on export. This test makes that a failure."""

import dataclasses

import pytest

from llamba.config import LlambaConfig

pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from llamba.export.mlx_llamba import ModelArgs  # noqa: E402

# LlambaConfig fields the MLX model does not read, each with the reason.
NOT_IN_MLX = {
    "hidden_act": "LlambaConfig.check() accepts only 'silu', the MLX MLP's activation",
    "distillation": "provenance for the model card",
    "pad_token_id": "tokenizer ids: the MLX chat reads them from the tokenizer / generation config",
    "bos_token_id": "as pad_token_id",
    "eos_token_id": "as pad_token_id",
}


def config_fields() -> dict[str, object]:
    """The fields LlambaConfig declares itself (annotations of the class), with their defaults."""
    return {
        name: getattr(LlambaConfig, name) for name in LlambaConfig.__annotations__ if name != "model_type"
    }


def test_every_llamba_config_field_reaches_model_args_with_the_same_default():
    mlx_fields = {f.name: f.default for f in dataclasses.fields(ModelArgs) if f.name != "model_type"}
    missing = sorted(set(config_fields()) - set(mlx_fields) - set(NOT_IN_MLX))
    assert not missing, (
        f"LlambaConfig fields ModelArgs drops: {missing} (add them to ModelArgs or to NOT_IN_MLX)"
    )
    extra = sorted(set(mlx_fields) - set(config_fields()))
    assert not extra, f"ModelArgs fields LlambaConfig does not have: {extra}"
    for name, default in mlx_fields.items():
        assert default == config_fields()[name], name


def test_a_non_default_config_round_trips_with_the_same_derived_sizes():
    cfg = LlambaConfig(
        vocab_size=96,
        d_model=48,
        n_layer=3,
        intermediate_size=80,
        d_state=8,
        n_v_heads=6,
        n_qk_heads=2,
        expand=2,
        d_conv=3,
        chunk_size=16,
        bias=True,
        conv_bias=False,
        mlp_bias=True,
        tie_embeddings=False,
        norm_eps=1e-6,
    )
    args = ModelArgs.from_dict(cfg.to_dict())
    for name in {f.name for f in dataclasses.fields(ModelArgs)} - {"model_type"}:
        assert getattr(args, name) == getattr(cfg, name), name
    for prop in ("d_inner", "headdim", "conv_dim"):
        assert getattr(args, prop) == getattr(cfg, prop), prop
