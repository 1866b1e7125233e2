"""CPU stand-in for causal-conv1d's compiled extension `causal_conv1d_cuda` (csrc/causal_conv1d.cpp, 1.7.0).

Each entry point performs the TORCH_CHECKs of the C++ (dtypes, shapes, the channel-last layout rules and
stride multiples of 8, widths 2-4, state layouts) except `is_cuda`, then computes with the package's own
reference math (`causal_conv1d_ref`, `causal_conv1d_update_ref`) and writes the outputs in place, as the
kernels do. The backward is the adjoint of that math, written out (custom ops run below autograd).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _check(cond: bool, msg: str = "") -> None:
    if not cond:
        raise RuntimeError(f"Expected {msg or 'condition'} to be true (causal_conv1d_cuda stand-in)")


def _check_shape(t: torch.Tensor, *shape: int, name: str) -> None:
    _check(tuple(t.shape) == tuple(shape), f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _common(x, weight, bias_, seq_idx_=None):
    _check(x.dtype in FLOATS, "input dtype float/half/bf16")
    _check(weight.dtype in FLOATS, "weight dtype float/half/bf16")
    batch, dim, seqlen = x.shape
    width = weight.shape[-1]
    _check_shape(weight, dim, width, name="weight")
    _check(x.stride(2) == 1 or x.stride(1) == 1, "x.stride(2) == 1 || x.stride(1) == 1")
    channel_last = x.stride(1) == 1 and x.stride(2) > 1
    if channel_last:
        _check(dim % 8 == 0, "causal_conv1d only supports channel dimension divisible by 8 for now")
        _check(
            x.stride(2) % 8 == 0 and x.stride(0) % 8 == 0,
            "causal_conv1d with channel last layout requires strides (x.stride(0) and x.stride(2)) "
            "to be multiples of 8",
        )
    _check(2 <= width <= 4, "causal_conv1d only supports width between 2 and 4")
    if bias_ is not None:
        _check(bias_.dtype == weight.dtype, "bias.scalar_type() == weight_type")
        _check(bias_.stride(-1) == 1, "bias.stride(-1) == 1")
        _check_shape(bias_, dim, name="bias")
    if seq_idx_ is not None:
        _check(channel_last, "seq_idx is only supported for channel last layout")
        _check(seq_idx_.dtype == torch.int32 and seq_idx_.is_contiguous(), "seq_idx int32 contiguous")
        _check_shape(seq_idx_, batch, seqlen, name="seq_idx")
    return batch, dim, seqlen, width, channel_last


def _check_state(t, name, channel_last, x, batch, dim, width, stride1=True):
    _check(channel_last, f"{name} is only supported for channel last layout")
    _check(t.dtype == x.dtype, f"{name}.scalar_type() == input_type")
    _check_shape(t, batch, dim, width - 1, name=name)
    if stride1:
        _check(t.stride(1) == 1, f"{name}.stride(1) == 1")


def _ref():
    from causal_conv1d.causal_conv1d_interface import causal_conv1d_ref, causal_conv1d_update_ref

    return causal_conv1d_ref, causal_conv1d_update_ref


def causal_conv1d_fwd(x, weight, bias_, seq_idx_, initial_states_, out, final_states_out_, silu_activation):
    batch, dim, seqlen, width, channel_last = _common(x, weight, bias_, seq_idx_)
    if initial_states_ is not None:
        _check_state(initial_states_, "initial_states", channel_last, x, batch, dim, width)
    if final_states_out_ is not None:
        _check_state(final_states_out_, "final_states", channel_last, x, batch, dim, width)
    ref, _ = _ref()
    with torch.no_grad():
        res = ref(
            x,
            weight,
            bias_,
            initial_states=initial_states_,
            return_final_states=final_states_out_ is not None,
            activation="silu" if silu_activation else None,
            seq_idx=seq_idx_,
        )
    y, final = res if final_states_out_ is not None else (res, None)
    out.copy_(y)
    if final is not None:
        final_states_out_.copy_(final)


def causal_conv1d_bwd(
    x,
    weight,
    bias_,
    dout,
    seq_idx_,
    initial_states_,
    dfinal_states_,
    dx,
    dweight,
    dbias_,
    dinitial_states_,
    silu_activation,
):
    _check((bias_ is None) == (dbias_ is None), "bias_.has_value() == dbias_.has_value()")
    batch, dim, seqlen, width, channel_last = _common(x, weight, bias_, seq_idx_)
    _check_shape(dout, batch, dim, seqlen, name="dout")
    if channel_last:
        if dout.stride(1) != 1:
            dout = dout.transpose(-1, -2).contiguous().transpose(-1, -2)
        _check(
            dout.stride(2) % 8 == 0 and dout.stride(0) % 8 == 0,
            "causal_conv1d with channel last layout requires strides (dout.stride(0) and dout.stride(2)) "
            "to be multiples of 8",
        )
    _check(dx.dtype == x.dtype, "dx.scalar_type() == input_type")
    _check_shape(dx, batch, dim, seqlen, name="dx")
    _check(dx.stride(1) == 1 if channel_last else dx.stride(2) == 1, "dx layout matches x")
    if initial_states_ is not None:
        _check_state(initial_states_, "initial_states", channel_last, x, batch, dim, width)
    if dfinal_states_ is not None:
        _check_state(dfinal_states_, "dfinal_states", channel_last, x, batch, dim, width, stride1=False)
    if dinitial_states_ is not None:
        _check(dinitial_states_.stride(1) == 1, "dinitial_states.stride(1) == 1")
    _check(seq_idx_ is None, "seq_idx unsupported by the stand-in's backward")
    # The adjoint of the reference conv (run below autograd here, so by hand), in fp32:
    # xs = [initial_states | x] (b, d, k-1+l), pre[t] = bias + sum_j w[j] xs[t+j], out = act(pre),
    # final_states = xs[..., -(k-1):].
    w = weight.float()
    past = (
        initial_states_.float() if initial_states_ is not None else x.new_zeros(batch, dim, width - 1).float()
    )
    xs = torch.cat([past, x.float()], dim=-1)
    g = dout.float()
    if silu_activation:
        pre = F.conv1d(xs, w[:, None], None if bias_ is None else bias_.float(), groups=dim)
        sig = torch.sigmoid(pre)
        g = g * sig * (1 + pre * (1 - sig))
    dxs = F.conv1d(F.pad(g, (width - 1, width - 1)), w.flip(-1)[:, None], groups=dim)[..., : xs.shape[-1]]
    if dfinal_states_ is not None:
        dxs[..., xs.shape[-1] - (width - 1) :] += dfinal_states_.float()
    dweight.add_(torch.einsum("bct,bctj->cj", g, xs.unfold(-1, width, 1)))
    if dbias_ is not None:
        dbias_.add_(g.sum((0, 2)))
    dx.copy_(dxs[..., width - 1 :])
    if dinitial_states_ is not None:
        dinitial_states_.copy_(dxs[..., : width - 1])


def causal_conv1d_update(
    x, conv_state, weight, bias_, out, silu_activation, cache_seqlens_, conv_state_indices_
):
    _check(x.dtype in FLOATS, "input dtype float/half/bf16")
    _check(weight.dtype in FLOATS, "weight dtype float/half/bf16")
    _check(conv_state.dtype == x.dtype, "conv_state.scalar_type() == input_type")
    batch, dim, seqlen = x.shape
    width = weight.shape[-1]
    state_len = conv_state.shape[2]
    _check(state_len >= width - 1, "conv_state_len >= width - 1")
    _check_shape(weight, dim, width, name="weight")
    _check(2 <= width <= 4, "causal_conv1d only supports width between 2 and 4")
    if bias_ is not None:
        _check(bias_.dtype == weight.dtype, "bias.scalar_type() == weight_type")
        _check(bias_.stride(-1) == 1, "bias.stride(-1) == 1")
        _check_shape(bias_, dim, name="bias")
    _check(conv_state_indices_ is None, "conv_state_indices unsupported by the stand-in")
    _check_shape(conv_state, batch, dim, state_len, name="conv_state")
    if cache_seqlens_ is not None:
        _check(cache_seqlens_.dtype == torch.int32 and cache_seqlens_.stride(-1) == 1, "cache_seqlens int32")
        _check_shape(cache_seqlens_, batch, name="cache_seqlens")
    _, update_ref = _ref()
    with torch.no_grad():
        y = update_ref(
            x,
            conv_state,
            weight,
            bias_,
            activation="silu" if silu_activation else None,
            cache_seqlens=cache_seqlens_,
        )
    out.copy_(y)
