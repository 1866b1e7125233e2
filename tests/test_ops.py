"""The chunked scan, the step recurrence and the materialized matrix are three views of one recurrence."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err

from llamba.ops import (
    KernelsUnavailable,
    causal_conv1d,
    causal_conv1d_step,
    cuda_kernels_available,
    materialize_mixer,
    resolve_kernels,
    segsum,
    ssd_chunked,
    ssd_recurrent,
    ssd_step,
)

TOL = {torch.float32: (3e-4, 1e-3), torch.bfloat16: (1e-2, 5e-2), torch.float16: (5e-3, 1e-2)}
# Triton's tl.dot reads fp32 inputs as TF32 on NVIDIA GPUs (10 mantissa bits): 4e-4 at the shapes below.
GPU_FP32_RTOL = 2e-3


def random_inputs(b, l, h, g, p, n, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=gen)
    log_decay = -F.softplus(torch.randn(b, l, h, generator=gen))
    B = torch.randn(b, l, g, n, generator=gen) / n**0.5
    C = torch.randn(b, l, g, n, generator=gen) / n**0.5
    s0 = torch.randn(b, h, p, n, generator=gen)
    return x.to(dtype), log_decay, B.to(dtype), C.to(dtype), s0


@pytest.mark.parametrize("l,chunk", [(1, 4), (7, 4), (16, 4), (33, 8), (64, 64), (100, 16)])
@pytest.mark.parametrize("h,g", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_matches_recurrent_fp32(l, chunk, h, g, with_state):
    x, a, B, C, s0 = random_inputs(2, l, h, g, 3, 5)
    init = s0 if with_state else None
    y_ref, s_ref = ssd_recurrent(x, a, B, C, initial_state=init)
    y, s = ssd_chunked(x, a, B, C, chunk, initial_state=init)
    assert rel_err(y, y_ref) < 1e-5, rel_err(y, y_ref)
    assert rel_err(s, s_ref) < 1e-5, rel_err(s, s_ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_matches_recurrent_low_precision(dtype):
    x, a, B, C, s0 = random_inputs(2, 40, 4, 2, 8, 8, dtype)
    y_ref, s_ref = ssd_recurrent(x.float(), a, B.float(), C.float(), initial_state=s0)
    y, s = ssd_chunked(x, a, B, C, 16, initial_state=s0)
    assert y.dtype == dtype
    rtol, _ = TOL[dtype]
    err = rel_err(y, y_ref)
    print(f"{dtype}: relative error {err:.2e}")
    assert err < rtol


def test_chunked_gradients_match_recurrent():
    x, a, B, C, s0 = random_inputs(1, 19, 4, 2, 3, 4)
    leaves = [t.clone().requires_grad_() for t in (x, a, B, C, s0)]
    target = torch.randn(1, 19, 4, 3)

    def grads(fn):
        for t in leaves:
            t.grad = None
        y, s = fn(leaves[0], leaves[1], leaves[2], leaves[3], 8, initial_state=leaves[4])
        ((y * target).sum() + s.square().sum()).backward()
        return [t.grad.clone() for t in leaves]

    for g_chunk, g_ref in zip(grads(ssd_chunked), grads(ssd_recurrent), strict=True):
        assert rel_err(g_chunk, g_ref) < 1e-5


def test_split_sequence_carries_state():
    """Scanning [0, t) then [t, l) from the carried state equals one scan over [0, l)."""
    x, a, B, C, _ = random_inputs(2, 30, 4, 4, 3, 5)
    y_full, s_full = ssd_chunked(x, a, B, C, 8)
    y1, s1 = ssd_chunked(x[:, :11], a[:, :11], B[:, :11], C[:, :11], 8)
    y2, s2 = ssd_chunked(x[:, 11:], a[:, 11:], B[:, 11:], C[:, 11:], 8, initial_state=s1)
    assert rel_err(torch.cat([y1, y2], 1), y_full) < 1e-5
    assert rel_err(s2, s_full) < 1e-5


def test_step_matches_recurrent():
    x, a, B, C, s0 = random_inputs(2, 12, 4, 2, 3, 5)
    y_ref, s_ref = ssd_recurrent(x, a, B, C, initial_state=s0)
    state, ys = s0.clone(), []
    for t in range(12):
        y, state = ssd_step(x[:, t], a[:, t], B[:, t], C[:, t], state)
        ys.append(y)
    assert rel_err(torch.stack(ys, 1), y_ref) < 1e-6
    assert rel_err(state, s_ref) < 1e-6


def test_materialized_matrix_applies_as_the_scan():
    x, a, B, C, _ = random_inputs(2, 21, 6, 3, 4, 5)
    D = torch.randn(6)
    M = materialize_mixer(a, B, C, D)
    assert M.shape == (2, 6, 21, 21)
    assert torch.all(M.triu(1) == 0), "the mixing matrix must be causal"
    y_ref, _ = ssd_recurrent(x, a, B, C)
    y_ref = y_ref + D[:, None] * x
    assert rel_err(torch.einsum("bhls,bshp->blhp", M, x), y_ref) < 1e-5


def test_materialized_matrix_hand_values():
    """One head, n = 1: M[i, j] = C_i B_j prod_{k=j+1..i} a_k, computed by hand."""
    a = torch.tensor([0.5, 0.25, 0.8]).log().view(1, 3, 1)
    B = torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    C = torch.tensor([1.0, -1.0, 0.5]).view(1, 3, 1, 1)
    M = materialize_mixer(a, B, C)[0, 0]
    expected = torch.tensor(
        [
            [1.0 * 1.0, 0.0, 0.0],
            [-1.0 * 1.0 * 0.25, -1.0 * 2.0, 0.0],
            [0.5 * 1.0 * 0.25 * 0.8, 0.5 * 2.0 * 0.8, 0.5 * 3.0],
        ]
    )
    torch.testing.assert_close(M, expected)


def test_segsum_exact_small_segments():
    a = torch.tensor([-1.0, -2.0, -3.0])
    s = segsum(a)
    assert s[2, 0] == -5.0 and s[2, 2] == 0.0 and s[1, 0] == -2.0
    assert torch.isinf(s[0, 1]) and s[0, 1] < 0


def test_conv_state_continuation_and_step():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 13, generator=gen)
    w, bias = torch.randn(6, 4, generator=gen), torch.randn(6, generator=gen)
    ref = F.conv1d(x, w[:, None], bias, padding=3, groups=6)[..., :13]
    y, state = causal_conv1d(x, w, bias)
    torch.testing.assert_close(y, ref)
    y1, s1 = causal_conv1d(x[..., :5], w, bias)
    y2, s2 = causal_conv1d(x[..., 5:], w, bias, s1)
    torch.testing.assert_close(torch.cat([y1, y2], -1), ref)
    torch.testing.assert_close(s2, state)
    st, outs = torch.zeros(2, 6, 3), []
    for t in range(13):
        yt, st = causal_conv1d_step(x[..., t], st, w, bias)
        outs.append(yt)
    torch.testing.assert_close(torch.stack(outs, -1), ref)


def test_kernel_dispatch_without_cuda():
    assert resolve_kernels("auto", "cpu") == "torch"
    assert resolve_kernels("torch", "cpu") == "torch"
    with pytest.raises(ValueError, match="kernels must be one of"):
        resolve_kernels("triton", "cpu")
    if not cuda_kernels_available():
        with pytest.raises(KernelsUnavailable, match=r"llamba\[cuda\]"):
            resolve_kernels("cuda", "cpu")


@pytest.mark.skipif(not cuda_kernels_available(), reason="needs a CUDA GPU with mamba-ssm and causal-conv1d")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernels_match_reference(dtype):
    x, a, B, C, s0 = random_inputs(2, 300, 8, 2, 64, 64, dtype)
    x, a, B, C, s0 = (t.cuda() for t in (x, a, B, C, s0))
    y_ref, s_ref = ssd_chunked(x, a, B, C, 64, initial_state=s0, kernels="torch")
    y, s = ssd_chunked(x, a, B, C, 64, initial_state=s0, kernels="cuda")
    rtol = GPU_FP32_RTOL if dtype == torch.float32 else TOL[dtype][0]
    assert rel_err(y, y_ref) < rtol and rel_err(s, s_ref) < rtol
    state_ref, state = s0.clone(), s0.clone()
    y1, state_ref = ssd_step(x[:, 0], a[:, 0], B[:, 0], C[:, 0], state_ref, kernels="torch")
    y2, state = ssd_step(x[:, 0], a[:, 0], B[:, 0], C[:, 0], state, kernels="cuda")
    assert rel_err(y2, y1) < rtol and rel_err(state, state_ref) < rtol
    xc = torch.randn(2, 40, 50, device="cuda", dtype=dtype)
    w, bias = torch.randn(40, 4, device="cuda", dtype=dtype), torch.randn(40, device="cuda", dtype=dtype)
    yc_ref, sc_ref = causal_conv1d(xc, w, bias, kernels="torch")
    yc, sc = causal_conv1d(xc, w, bias, kernels="cuda")
    assert rel_err(yc, yc_ref) < rtol and rel_err(sc, sc_ref) < rtol


def test_chunked_stable_under_strong_decay():
    """Log decays down to about -60 per step (closed forget gates): still equal to the loop, finite gradients."""
    x, _, B, C, s0 = random_inputs(1, 50, 4, 2, 3, 5)
    gen = torch.Generator().manual_seed(1)
    a = (-F.softplus(4 * torch.randn(1, 50, 4, generator=gen)) * 15).requires_grad_()
    y_ref, s_ref = ssd_recurrent(x, a.detach(), B, C, initial_state=s0)
    y, s = ssd_chunked(x, a, B, C, 16, initial_state=s0)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5
    (y.sum() + s.sum()).backward()
    assert torch.isfinite(a.grad).all()


def test_step_updates_fp32_state_in_place_and_grouped():
    x, a, B, C, s0 = random_inputs(2, 1, 6, 2, 3, 5)
    state = s0.clone()
    y, new = ssd_step(x[:, 0], a[:, 0], B[:, 0], C[:, 0], state)
    y_ref, s_ref = ssd_recurrent(x, a, B, C, initial_state=s0)
    assert new.data_ptr() == state.data_ptr()
    assert rel_err(y, y_ref[:, 0]) < 1e-6 and rel_err(new, s_ref) < 1e-6
    leaf = s0.clone().requires_grad_()  # autograd through the state: out of place, the leaf untouched
    y2, new2 = ssd_step(x[:, 0], a[:, 0], B[:, 0], C[:, 0], leaf)
    assert new2.data_ptr() != leaf.data_ptr() and torch.equal(leaf.detach(), s0)
    assert rel_err(y2, y_ref[:, 0]) < 1e-6


def test_compile_failure_falls_back_to_eager(monkeypatch):
    import llamba.ops as ops

    def broken(fn, *args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setitem(ops._COMPILE, "fn", None)
    x, a, B, C, s0 = random_inputs(1, 20, 4, 2, 3, 5)
    ops.use_compile(True)
    try:
        with pytest.warns(UserWarning, match="no C.. compiler found"):
            y, s = ssd_chunked(x, a, B, C, 8, initial_state=s0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # fallen back for good: no second warning
            y2, _ = ssd_chunked(x, a, B, C, 8, initial_state=s0)
        assert torch.equal(y, y2)
    finally:
        ops.use_compile(False)
    y_ref, s_ref = ssd_recurrent(x, a, B, C, initial_state=s0)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5
