"""MLX Llamba vs PyTorch Llamba on the same weights: prefill, every decode step, dtypes; MLX scans."""

import numpy as np
import pytest
import torch
from conftest import random_model, tiny_llamba_config

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from mlx.utils import tree_flatten  # noqa: E402

from llamba.export.mlx_llamba import (  # noqa: E402
    Model,
    ModelArgs,
    _metal_ssd_step,
    sanitize,
    ssd_chunked,
    ssd_recurrent,
    ssd_step,
    ssd_step_dispatch,
)


def max_rel_err(a, b) -> float:
    """max |a - b| / max |b| (the worst logit against the largest), for torch / NumPy / MLX arrays."""
    a = a.astype(mx.float32) if isinstance(a, mx.array) else a
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    return float(np.abs(a - b).max() / np.abs(b).max())


# Max |Δlogit| / max |logit| against the fp32 PyTorch model, per MLX weight dtype. For scale, torch's own
# fp16 / bf16 copies of these random models drift 3e-3..7e-3 / 3e-2..6e-2 from fp32.
TOL = {"float32": 1e-4, "float16": 3e-2, "bfloat16": 1e-1}


def to_mlx(model, dtype: str = "float32") -> Model:
    args = ModelArgs.from_dict(model.config.to_dict())
    weights = {
        k: mx.array(v.detach().float().numpy()).astype(getattr(mx, dtype))
        for k, v in model.state_dict().items()
    }
    mlx_model = Model(args)
    mlx_model.load_weights(list(sanitize(weights, args).items()), strict=True)
    return mlx_model


def test_chunked_scan_matches_recurrence():
    mx.random.seed(0)
    b, l, h, p, g, n = 2, 29, 4, 6, 2, 5
    x = mx.random.normal((b, l, h, p))
    log_decay = -mx.random.uniform(0.01, 2.0, (b, l, h))
    B, C = mx.random.normal((b, l, g, n)), mx.random.normal((b, l, g, n))
    state = mx.random.normal((b, h, p, n))
    y_ref, s_ref = ssd_recurrent(x, log_decay, B, C, state)
    for chunk in (1, 4, 8, 64):
        y, s = ssd_chunked(x, log_decay, B, C, chunk, state)
        err_y, err_s = mx.abs(y - y_ref).max().item(), mx.abs(s - s_ref).max().item()
        print(f"chunk {chunk}: max|dy| {err_y:.2e} max|dstate| {err_s:.2e}")
        assert err_y < 1e-4 and err_s < 1e-4


def test_step_dispatch_uses_pure_mlx_off_metal():
    mx.random.seed(1)
    x, log_decay = mx.random.normal((1, 4, 3)), -mx.random.uniform(shape=(1, 4))
    B, C, state = mx.random.normal((1, 2, 5)), mx.random.normal((1, 2, 5)), mx.random.normal((1, 4, 3, 5))
    y1, s1 = ssd_step_dispatch(x, log_decay, B, C, state)
    y2, s2 = ssd_step(x, log_decay, B, C, state)
    assert mx.array_equal(y1, y2) and mx.array_equal(s1, s2)


@pytest.mark.skipif(not mx.metal.is_available(), reason="the Metal decode kernel needs an Apple GPU")
def test_metal_step_matches_pure_mlx():
    mx.random.seed(2)
    x, log_decay = mx.random.normal((2, 4, 16)), -mx.random.uniform(shape=(2, 4))
    B, C, state = mx.random.normal((2, 2, 8)), mx.random.normal((2, 2, 8)), mx.random.normal((2, 4, 16, 8))
    with mx.stream(mx.gpu):
        y1, s1 = _metal_ssd_step(x, log_decay, B, C, state)
    y2, s2 = ssd_step(x, log_decay, B, C, state)
    assert mx.allclose(y1, y2, atol=1e-4) and mx.allclose(s1, s2, atol=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_embeddings": False, "activation": "silu"},
        {"bias": True, "n_qk_heads": 4, "expand": 2},
    ],
    ids=["tied", "untied-silu", "bias-expand"],
)
def test_prefill_and_every_decode_step_match_torch_fp32(overrides):
    model = random_model(tiny_llamba_config(**overrides), seed=3)
    mlx_model = to_mlx(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 27), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    err = max_rel_err(mlx_model(mx.array(ids.numpy())), ref)
    print("full forward rel err", err)
    assert err < TOL["float32"]

    # Prefill 11 tokens into a cache (2 chunks), then decode the rest one by one; compare every step.
    state, cache = model.alloc_state(2), mlx_model.make_cache()
    with torch.no_grad():
        ref = model(ids[:, :11], state=state).logits
    err = max_rel_err(mlx_model(mx.array(ids[:, :11].numpy()), cache=cache), ref)
    assert err < TOL["float32"], f"prefill rel err {err}"
    worst = 0.0
    for t in range(11, ids.shape[1]):
        ref = model.step(ids[:, t], state)
        out = mlx_model(mx.array(ids[:, t : t + 1].numpy()), cache=cache)[:, 0]
        worst = max(worst, max_rel_err(out, ref))
    print("worst decode-step rel err", worst)
    assert worst < TOL["float32"]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_within_tolerance(dtype):
    model = random_model(tiny_llamba_config(), seed=4)
    mlx_model = to_mlx(model, dtype)
    ids = torch.randint(0, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    cache = mlx_model.make_cache()
    err = max_rel_err(mlx_model(mx.array(ids[:, :12].numpy()), cache=cache), ref[:, :12])
    for t in range(12, 20):
        out = mlx_model(mx.array(ids[:, t : t + 1].numpy()), cache=cache)[:, 0]
        err = max(err, max_rel_err(out, ref[:, t]))
    print(f"{dtype}: worst rel err {err:.2e} (tolerance {TOL[dtype]})")
    assert err < TOL[dtype]
    assert cache[0][1].dtype == mx.float32  # the SSM state stays fp32 whatever the weights' dtype


def test_num_last_tokens_and_sanitize_idempotent():
    model = random_model(tiny_llamba_config(), seed=5)
    mlx_model = to_mlx(model)
    ids = mx.array([[1, 5, 9, 11, 3]])
    full = mlx_model(ids)
    assert mx.allclose(mlx_model(ids, num_last_tokens=1)[:, 0], full[:, -1], atol=1e-6)
    weights = dict(tree_flatten(mlx_model.parameters()))
    again = mlx_model.sanitize(weights)
    assert again.keys() == weights.keys()
    assert all(again[k].shape == weights[k].shape for k in weights)
