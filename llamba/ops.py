"""Scans of the discrete Mamba-2 mixer: the pure-PyTorch reference paths and the CUDA kernel path, side by side.

The recurrence (docs/equations.md §M2), per value head h and token t, with x_t in R^p and B_t, C_t in R^n:

    H_t = a_t * H_{t-1} + x_t B_t^T        a_t = exp(log_decay_t) = exp(-softplus(A_log_t)),  H in R^{p x n}
    y_t = H_t C_t

There is no Δ multiplying B (no discretization). B and C have g heads; value head i reads group i // (h / g).

Conventions follow mamba_ssm's `ssd_minimal_discrete`:
    x (b, l, h, p)   log_decay (b, l, h)   B, C (b, l, g, n)   state (b, h, p, n)

Paths
- `ssd_recurrent`: a plain loop over t; the slow ground truth.
- `ssd_chunked`: the SSD block decomposition (intra-chunk quadratic form + inter-chunk state passing);
  any length, any chunk size, differentiable. The default on CPU; `use_compile()` (or LLAMBA_COMPILE=1) runs
  it through torch.compile, with the eager scan as the fallback when compiling fails.
- `ssd_step`: one token, O(1) in the context length (decoding).
- `materialize_mixer`: the (b, h, l, l) matrix M with y = M @ x (stage 1 of MOHAWK).
- `causal_conv1d`, `causal_conv1d_step`: the depthwise causal conv with a carried state.
- CUDA (`mamba-ssm`, `causal-conv1d` installed, tensors on a GPU): `mamba_chunk_scan_combined`,
  `selective_state_update`, `causal_conv1d_fn/update`, called through the same functions via `kernels=`.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from llamba.jit import compiled

KERNEL_CHOICES = ("auto", "torch", "cuda")


class KernelsUnavailable(RuntimeError):
    """kernels='cuda' was asked for but the packages or a GPU are missing."""


# --------------------------------------------------------------------------------------------------
# Kernel dispatch
# --------------------------------------------------------------------------------------------------
@functools.cache
def _cuda_kernels() -> dict | None:
    """The CUDA kernels, or None when mamba-ssm / causal-conv1d cannot be imported (`_cuda_import_error`
    says why: missing packages, or installed ones whose compiled extensions fail to load)."""
    try:
        from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception as e:  # a broken build raises ImportError, OSError (missing libcudart), RuntimeError...
        _import_errors.append(e)
        return None
    return {
        "chunk_scan": mamba_chunk_scan_combined,
        "state_update": selective_state_update,
        "conv_fn": causal_conv1d_fn,
        "conv_update": causal_conv1d_update,
    }


_import_errors: list[BaseException] = []  # the exception `_cuda_kernels` caught, kept for the message


def _cuda_import_error() -> str:
    """One line: why `_cuda_kernels()` is None, and the fix."""
    e = _import_errors[-1] if _import_errors else None
    install = "pip install 'llamba[cuda]' --no-build-isolation (CUDA GPU required)"
    if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] in ("mamba_ssm", "causal_conv1d"):
        return f"kernels='cuda' needs mamba-ssm and causal-conv1d: {install}"
    return (
        f"kernels='cuda': mamba-ssm / causal-conv1d are installed but failed to import "
        f"({type(e).__name__}: {e}); reinstall them built for this torch and CUDA: {install}"
    )


def cuda_kernels_available() -> bool:
    return torch.cuda.is_available() and _cuda_kernels() is not None


def resolve_kernels(kernels: str, device: torch.device | str) -> str:
    """'auto' -> 'cuda' when the kernels are installed and the tensors live on a GPU, else 'torch'."""
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {kernels!r}")
    on_gpu = torch.device(device).type == "cuda"
    if kernels == "cuda":
        if _cuda_kernels() is None:
            raise KernelsUnavailable(_cuda_import_error())
        if not on_gpu:
            raise KernelsUnavailable(
                "kernels='cuda' needs the model on a CUDA device; move it with .cuda() or use kernels='torch'"
            )
        return "cuda"
    if kernels == "auto" and on_gpu and _cuda_kernels() is not None:
        return "cuda"
    return "torch"


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------
def expand_groups(t: torch.Tensor, h: int, dim: int) -> torch.Tensor:
    """Repeat each of the g B/C heads over its h/g value heads (whole blocks, like GQA's repeat_kv)."""
    g = t.shape[dim]
    return t if g == h else t.repeat_interleave(h // g, dim=dim)


def segsum(a: torch.Tensor) -> torch.Tensor:
    """Stable segment sums: a (..., l) -> (..., l, l) with out[i, j] = sum_{k=j+1..i} a_k for i >= j, -inf above.

    Summing the masked values directly (not differences of a cumsum) keeps small segments exact."""
    l = a.shape[-1]
    rep = a[..., None].expand(*a.shape, l)  # rep[..., i, j] = a_i
    strict = torch.tril(torch.ones(l, l, dtype=torch.bool, device=a.device), diagonal=-1)
    out = torch.cumsum(rep.masked_fill(~strict, 0), dim=-2)
    keep = torch.tril(torch.ones(l, l, dtype=torch.bool, device=a.device), diagonal=0)
    return out.masked_fill(~keep, float("-inf"))


# --------------------------------------------------------------------------------------------------
# Scans
# --------------------------------------------------------------------------------------------------
def ssd_recurrent(x, log_decay, B, C, chunk_size: int | None = None, initial_state=None):
    """Reference loop. x: (b, l, h, p), log_decay: (b, l, h), B, C: (b, l, g, n), initial_state: (b, h, p, n).

    Returns y: (b, l, h, p) and the final state (b, h, p, n). `chunk_size` is accepted and ignored so the
    signature matches `ssd_chunked`. Accumulates in fp32."""
    b, l, h, p = x.shape
    n = B.shape[-1]
    Bh, Ch = expand_groups(B, h, 2).float(), expand_groups(C, h, 2).float()
    a = log_decay.float().exp()
    state = x.new_zeros(b, h, p, n, dtype=torch.float32) if initial_state is None else initial_state.float()
    ys = []
    for t in range(l):
        state = a[:, t, :, None, None] * state + x[:, t, :, :, None].float() * Bh[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(b, 0, h, p, dtype=torch.float32)
    return y.to(x.dtype), state


def ssd_chunked(x, log_decay, B, C, chunk_size: int, initial_state=None, kernels: str = "torch"):
    """Chunked SSD scan, same contract as `ssd_recurrent`; pads to a multiple of `chunk_size` internally.

    x: (b, l, h, p), log_decay: (b, l, h), B, C: (b, l, g, n), initial_state: (b, h, p, n) or None.
    Returns y: (b, l, h, p) in x.dtype and final_state: (b, h, p, n) in fp32."""
    if resolve_kernels(kernels, x.device) == "cuda":
        return _ssd_chunked_cuda(x, log_decay, B, C, chunk_size, initial_state)
    if _COMPILE["on"]:
        return _ssd_chunked_compiled(x, log_decay, B, C, chunk_size, initial_state)
    return _ssd_chunked_torch(x, log_decay, B, C, chunk_size, initial_state)


# torch.compile of the torch scan: opt-in (`use_compile()` or LLAMBA_COMPILE=1), never required.
_COMPILE = {"on": os.environ.get("LLAMBA_COMPILE", "") == "1", "fn": None}


def use_compile(enabled: bool = True) -> None:
    """Route the pure-PyTorch chunked scan through torch.compile (inductor; on CPU it needs a C++ compiler).

    Off by default: each new sequence shape compiles first (about a minute on 2 CPU cores), which pays off
    only over long runs (distillation, long prefills). If compiling fails, one warning and the eager scan."""
    _COMPILE["on"] = bool(enabled)


def _ssd_chunked_compiled(*args):
    if _COMPILE["fn"] is None:
        _COMPILE["fn"] = compiled(
            _ssd_chunked_torch, "the chunked scan (llamba.ops.use_compile(False) silences this)"
        )
    return _COMPILE["fn"](*args)


def _ssd_chunked_torch(x, log_decay, B, C, chunk_size, initial_state):
    # Layout: everything stays (b, c, q, ...) as it arrives (no head-major permute copies); value heads are
    # split as (g, r) with r = h / g so grouped B/C are never repeated: C B^T is computed once per group.
    b, l, h, p = x.shape
    g, n = B.shape[-2], B.shape[-1]
    r = h // g
    q = max(1, min(chunk_size, l))  # a sequence shorter than one chunk is one chunk, unpadded
    pad = (-l) % q
    c = (l + pad) // q

    def chunked(t):  # (b, l, ...) -> (b, c, q, ...), zero-padded; fp32
        t = t.float()
        if pad:
            t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        return t.view(b, c, q, *t.shape[2:])

    # Padding with x = 0 and log_decay = 0 (a = 1) leaves the final state untouched.
    X = chunked(x).view(b, c, q, g, r, p)
    Bc, Cc = chunked(B), chunked(C)  # (b, c, q, g, n)
    A_cum = torch.cumsum(chunked(log_decay).transpose(2, 3), dim=-1)  # (b, c, h, q)

    # 1. Inside each chunk: y = (L o C B^T) X. L[i, j] = exp(A_cum_i - A_cum_j) on and below the diagonal,
    #    masked to -inf before the exp (no overflow above it, so no inf * 0 in the backward); one buffer.
    causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril_()
    L = (
        (A_cum[..., :, None] - A_cum[..., None, :]).masked_fill_(~causal, float("-inf")).exp_()
    )  # (b, c, h, q, q)
    CB = torch.einsum("bcign,bcjgn->bcgij", Cc, Bc)  # (b, c, g, q, q)
    scores = L.view(b, c, g, r, q, q) * CB[:, :, :, None]
    y = torch.einsum("bcgrij,bcjgrp->bcigrp", scores, X)  # (b, c, q, g, r, p)

    # 2. The state each chunk leaves behind from its own inputs.
    decay_to_end = torch.exp(A_cum[..., -1:] - A_cum).transpose(2, 3).reshape(b, c, q, g, r, 1)
    chunk_states = torch.einsum("bcjgrp,bcjgn->bcgrpn", X * decay_to_end, Bc)  # (b, c, g, r, p, n)

    # 3. Pass states across chunks: S_{c+1} = exp(sum of A over chunk c) S_c + chunk_states_c. The chunk totals
    #    can be large, so this (c+1, c+1) decay uses the exact segment sums.
    if initial_state is None:
        init = x.new_zeros(b, 1, h, p * n, dtype=torch.float32)
    else:
        init = initial_state.float().reshape(b, 1, h, p * n)
    states = torch.cat([init, chunk_states.view(b, c, h, p * n)], dim=1)  # (b, c+1, h, p*n)
    chunk_decay = torch.exp(segsum(F.pad(A_cum[..., -1].transpose(1, 2), (1, 0))))  # (b, h, c+1, c+1)
    states = torch.einsum("bhzc,bchx->bzhx", chunk_decay, states)  # (b, c+1, h, p*n)
    entering, final_state = states[:, :-1].view(b, c, g, r, p, n), states[:, -1]

    # 4. Contribution of the entering state to every position of its chunk.
    y_off = torch.einsum("bcign,bcgrpn->bcigrp", Cc, entering)
    y = y + y_off * torch.exp(A_cum).transpose(2, 3).reshape(b, c, q, g, r, 1)
    y = y.reshape(b, c * q, h, p)[:, :l]
    return y.to(x.dtype), final_state.reshape(b, h, p, n).contiguous()


# The kernels compute H <- exp(dt*A) H + dt * B x'. With A = -1, dt = -log_decay = softplus(A_log) and
# x' = x / dt this is exactly the discrete recurrence (docs/equations.md §M2). dt needs a floor only against 0
# (softplus underflows for A_log < -88). At DT_MIN, exp(-dt) == 1 and dt * x' == x in fp32 and x/dt^2 (the
# backward) stays finite; a visible floor (1e-6) biases slow heads. dt and x' stay fp32: x' in bf16 rounds
# twice, and in fp16 it overflows to inf whenever |x| / dt > 65504. B and C go in as fp32 too: the kernels
# store the states passed between chunks in C's dtype, and bf16 states double the torch path's error.
DT_MIN = 1e-12


def _ssd_chunked_cuda(x, log_decay, B, C, chunk_size, initial_state):
    # x: (b, l, h, p), log_decay: (b, l, h), B, C: (b, l, g, n), initial_state: (b, h, p, n) or None
    k = _cuda_kernels()
    dt = (-log_decay.float()).clamp_min(DT_MIN)  # (b, l, h)
    A = -torch.ones(x.shape[2], device=x.device, dtype=torch.float32)
    y, final = k["chunk_scan"](
        x.float() / dt[..., None],
        dt,
        A,
        B.float(),
        C.float(),
        chunk_size,
        initial_states=None if initial_state is None else initial_state.float(),
        return_final_states=True,
    )
    return y.to(x.dtype), final.float()


def ssd_step(x, log_decay, B, C, state, kernels: str = "torch"):
    """One decoding step. x: (b, h, p), log_decay: (b, h), B, C: (b, g, n), state: (b, h, p, n) fp32.

    Returns y: (b, h, p) and the new state. Both paths update an fp32 `state` in place and return it (the torch
    path copies instead when autograd is recording through the state)."""
    if resolve_kernels(kernels, x.device) == "cuda":
        return _ssd_step_cuda(x, log_decay, B, C, state)
    return _ssd_step_torch(x, log_decay, B, C, state)


def _ssd_step_torch(x, log_decay, B, C, state):
    # Groups stay (g, r) views (no repeat of B, C); a plain fp32 state without autograd is updated in place
    # (two fused kernels, no new buffer), any other state out of place.
    b, h, p = x.shape
    g, n = B.shape[1], B.shape[2]
    r = h // g
    state = state if state.is_contiguous() else state.contiguous()
    a = log_decay.float().exp().view(b, g, r, 1, 1)
    xB = x.float().view(b, g, r, p, 1) * B.float().view(b, g, 1, 1, n)  # (b, g, r, p, n)
    s = state.view(b, g, r, p, n)
    if state.dtype == torch.float32 and not (
        torch.is_grad_enabled() and (state.requires_grad or xB.requires_grad)
    ):
        s.mul_(a).add_(xB)
    else:
        s = a * s.float() + xB
        state = s.view(b, h, p, n)
    y = (s @ C.float().view(b, g, 1, n, 1)).view(b, h, p)
    return y.to(x.dtype), state


def _ssd_step_cuda(x, log_decay, B, C, state):
    # x: (b, h, p), log_decay: (b, h), B, C: (b, g, n), state: (b, h, p, n) fp32, updated in place.
    # mamba-ssm 2.2-2.3 builds its launch arguments from D and dt_bias unconditionally, so both are passed
    # (zeros). Broadcast (stride-0) A, dt and dt_bias let the kernel read one value per head.
    h, p, n = x.shape[1], x.shape[2], B.shape[-1]
    dt = (-log_decay.float()).clamp_min(DT_MIN)[..., None].expand(-1, -1, p)  # (b, h, p)
    A = torch.full((h, 1, 1), -1.0, device=x.device).expand(h, p, n)
    zeros = torch.zeros(h, 1, device=x.device).expand(h, p)  # D and dt_bias: (h, p)
    y = _cuda_kernels()["state_update"](state, x.float() / dt, dt, A, B, C, D=zeros, dt_bias=zeros)
    return y.to(x.dtype), state


def materialize_mixer(log_decay, B, C, D=None):
    """The mixing matrix of the scan: log_decay (b, l, h), B, C (b, l, g, n), D (h,) or None -> M (b, h, l, l).

    M[i, j] = (C_i . B_j) * prod_{k=j+1..i} a_k for i >= j, else 0; plus D on the diagonal. Then
    y[:, i, h] = sum_j M[:, h, i, j] x[:, j, h] equals the scan output plus the D skip (rows = target time,
    columns = source time, oriented like attention weights)."""
    h = log_decay.shape[-1]
    Bh, Ch = expand_groups(B, h, 2), expand_groups(C, h, 2)
    L = torch.exp(segsum(log_decay.transpose(1, 2).float()))  # (b, h, l, l)
    M = torch.einsum("blhn,bshn->bhls", Ch.float(), Bh.float()) * L
    if D is not None:
        M = M + torch.diag_embed(D.float()[:, None].expand(h, M.shape[-1]))
    return M


# --------------------------------------------------------------------------------------------------
# Depthwise causal convolution over x, B, C
# --------------------------------------------------------------------------------------------------
def _conv_kernel_fits(d: int, k: int) -> bool:
    """causal-conv1d's channel-last kernels need d % 8 == 0 and width 2-4; other configs use the torch conv."""
    return d % 8 == 0 and 2 <= k <= 4


def _channel_last(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t: (b, d, l) -> the same values in a fresh (b, l, d)-contiguous buffer, viewed as (b, d, l).

    causal-conv1d carries states only in this layout and needs strides that are multiples of 8; a view of
    in_proj's output has stride d_in_proj, odd whenever n_v_heads is. Always a new buffer: for size-1 dims
    `.contiguous()` may keep the old strides."""
    b, d, l = t.shape
    return torch.empty(b, l, d, dtype=dtype, device=t.device).copy_(t.transpose(1, 2)).transpose(1, 2)


def _causal_conv1d_cuda(x, weight, bias, state):
    # x: (b, d, l), weight: (d, k), bias: (d,) or None, state: (b, d, k-1) or None
    init = None if state is None else _channel_last(state, x.dtype)
    bias = None if bias is None else bias.to(weight.dtype)
    y, new_state = _cuda_kernels()["conv_fn"](
        _channel_last(x, x.dtype), weight, bias, initial_states=init, return_final_states=True
    )
    return y, new_state  # y: (b, d, l) channel-last, new_state: (b, d, k-1) channel-last


def causal_conv1d(x, weight, bias=None, state=None, kernels: str = "torch"):
    """x: (b, d, l), weight: (d, k), bias: (d,), state: (b, d, k-1) past inputs or None (zeros).

    Returns y: (b, d, l) and the new state (b, d, k-1): the last k-1 inputs, for decoding to continue."""
    k = weight.shape[-1]
    if resolve_kernels(kernels, x.device) == "cuda" and _conv_kernel_fits(x.shape[1], k):
        return _causal_conv1d_cuda(x, weight, bias, state)
    past = x.new_zeros(x.shape[0], x.shape[1], k - 1) if state is None else state.to(x.dtype)
    xs = torch.cat([past, x], dim=-1)  # (b, d, k-1+l)
    y = F.conv1d(xs, weight[:, None, :], bias, groups=x.shape[1])
    return y, xs[..., xs.shape[-1] - (k - 1) :]


def causal_conv1d_step(x, state, weight, bias=None, kernels: str = "torch"):
    """One token. x: (b, d), state: (b, d, k-1), weight: (d, k) -> y: (b, d), new state (b, d, k-1)."""
    if resolve_kernels(kernels, x.device) == "cuda" and _conv_kernel_fits(x.shape[1], weight.shape[-1]):
        # The kernel updates its state in place and needs it in x's dtype: give it a copy, so the caller's
        # state (possibly an autograd output of the prefill conv) is never modified.
        new_state = state.to(dtype=x.dtype, copy=True)
        return _cuda_kernels()["conv_update"](x, new_state, weight, bias), new_state
    window = torch.cat([state.to(x.dtype), x[..., None]], dim=-1)  # (b, d, k)
    y = (window * weight).sum(-1)
    if bias is not None:
        y = y + bias
    return y, window[..., 1:]
