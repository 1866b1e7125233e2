"""Llamba in MLX: the twin of `llamba.model.LlambaForCausalLM`, and the `model_file` of every exported directory.

This file is copied as-is into each export and exec'd by mlx-lm (`mlx_lm.load(dir, trust_remote_code=True)`),
so it is self-contained: absolute imports of mlx and mlx_lm only.

Dimension letters: b batch, l sequence length, d model width, h value heads, g B/C head groups, p head dim,
n state size, c chunks, q chunk length, k conv width, v vocab.

Per layer (docs/equations.md §M2), with a_t = exp(-softplus(A_log_t)) and no Δ on B:
    H_t = a_t H_{t-1} + x_t B_t^T,   y_t = H_t C_t + D x_t,   out = out_proj(y * silu(z + z_bias))

- Prefill (l > 1): the chunked SSD scan (`ssd_chunked`), continuing from the cache's state.
- Decode (l == 1 with a cache): one O(1) recurrent step (`ssd_step`), compiled; on Apple GPUs a Metal
  kernel (`_metal_ssd_step`) takes the step when its preconditions hold (`ssd_step_dispatch`).
- Cache: one `ArraysCache(size=2)` per layer: [conv window (b, k-1, conv_dim), SSM state (b, h, p, n) fp32].
- Batches (`mlx_lm.batch_generate`, `mlx_lm.server`): the cache's padding mask (`make_mask`: left padding and/or
  right-padded `lengths`) marks padded positions; there the conv input is zeroed and the SSM state is held
  (decay 1, x = 0), the conv window is taken at each row's last real token, and `advance` moves the padding
  bookkeeping on, so every row of a batch generates what it would alone.

Departures from the PyTorch module layout, all applied by `sanitize`:
- `mixer.in_proj` is split into `in_proj` (x | B | C | z rows) and `a_proj` (the A_log rows), so that
  quantization never touches the decay (its errors compound over time).
- `mixer.conv1d.weight` (conv_dim, 1, k) is stored channels-last as (k, conv_dim).
- a tied `lm_head.weight` is dropped (the embedding is used as the head).
"""

# No `from __future__ import annotations`: mlx-lm execs this file without registering it in sys.modules,
# and dataclasses then cannot resolve string annotations.
import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs
from mlx_lm.models.cache import ArraysCache


@dataclass
class ModelArgs(BaseModelArgs):
    # Field names follow llamba.config.LlambaConfig, so config.json is shared by both.
    model_type: str = "llamba"
    vocab_size: int = 49152
    d_model: int = 576
    n_layer: int = 30
    intermediate_size: int = 1536
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    mlp_bias: bool = False
    d_state: int = 64  # n
    n_v_heads: int = 9  # h
    n_qk_heads: int = 9  # g
    expand: int = 1
    d_conv: int = 4  # k
    chunk_size: int = 128  # q
    activation: str = "identity"
    bias: bool = False
    conv_bias: bool = True

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def headdim(self) -> int:  # p
        return self.d_inner // self.n_v_heads

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.n_qk_heads * self.d_state


# --------------------------------------------------------------------------------------------------
# Scans (fp32). x (b, l, h, p), log_decay (b, l, h), B, C (b, l, g, n), state (b, h, p, n)
# --------------------------------------------------------------------------------------------------
def expand_groups(t: mx.array, h: int, axis: int) -> mx.array:
    """Repeat each of the g B/C heads over its h/g value heads (value head i reads group i // (h/g))."""
    g = t.shape[axis]
    return t if g == h else mx.repeat(t, h // g, axis=axis)


def segsum(a: mx.array) -> mx.array:
    """a (..., q) -> (..., q, q): out[i, j] = sum_{k=j+1..i} a_k for i >= j, -inf above the diagonal.

    Masked cumsum rather than a difference of cumsums, so short segments stay exact."""
    q = a.shape[-1]
    i = mx.arange(q)[:, None]
    j = mx.arange(q)[None, :]
    rep = mx.broadcast_to(a[..., :, None], a.shape + (q,))  # rep[..., i, j] = a_i
    out = mx.cumsum(mx.where(i > j, rep, 0.0), axis=-2)
    return mx.where(i >= j, out, -math.inf)


def ssd_chunked(x, log_decay, B, C, chunk_size: int, state=None):
    """Chunked scan. x (b, l, h, p), log_decay (b, l, h), B, C (b, l, g, n), state (b, h, p, n) or None.

    Returns y (b, l, h, p) fp32 and the final state (b, h, p, n) fp32. The chunk length is
    min(chunk_size, l): the result does not depend on it, and short prompts are not padded."""
    b, l, h, p = x.shape
    n = B.shape[-1]
    q = min(chunk_size, l)
    pad = (-l) % q
    c = (l + pad) // q

    # (b, l, h, e) -> (b, c, h, q, e); padding with x = B = 0, log a = 0 leaves the state alone
    def chunks(t):
        t = mx.pad(t.astype(mx.float32), [(0, 0), (0, pad), (0, 0), (0, 0)])
        return t.reshape(b, c, q, h, t.shape[-1]).transpose(0, 1, 3, 2, 4)

    X = chunks(x)  # (b, c, h, q, p)
    Bc = chunks(expand_groups(B, h, 2))  # (b, c, h, q, n)
    Cc = chunks(expand_groups(C, h, 2))
    A = chunks(log_decay[..., None])[..., 0]  # (b, c, h, q)
    A_cum = mx.cumsum(A, axis=-1)

    # 1. Inside each chunk: y = (L o C B^T) X.
    scores = (Cc @ Bc.swapaxes(-1, -2)) * mx.exp(segsum(A))  # (b, c, h, q, q)
    y = scores @ X  # (b, c, h, q, p)

    # 2. The state each chunk leaves behind from its own inputs.
    decay_to_end = mx.exp(A_cum[..., -1:] - A_cum)  # (b, c, h, q)
    chunk_states = (X * decay_to_end[..., None]).swapaxes(-1, -2) @ Bc  # (b, c, h, p, n)

    # 3. Pass states across chunks: S_{c+1} = exp(sum of log a over chunk c) S_c + chunk_states_c.
    init = mx.zeros((b, 1, h, p, n), mx.float32) if state is None else state.astype(mx.float32)[:, None]
    states = mx.concatenate([init, chunk_states], axis=1).transpose(0, 2, 1, 3, 4)  # (b, h, c+1, p, n)
    totals = mx.pad(A_cum[..., -1].transpose(0, 2, 1), [(0, 0), (0, 0), (1, 0)])  # (b, h, c+1)
    mixed = mx.exp(segsum(totals)) @ states.reshape(b, h, c + 1, p * n)  # (b, h, c+1, p*n)
    mixed = mixed.reshape(b, h, c + 1, p, n)
    entering = mixed[:, :, :-1].transpose(0, 2, 1, 3, 4)  # (b, c, h, p, n)
    final = mixed[:, :, -1]  # (b, h, p, n)

    # 4. The entering state's contribution to each position of its chunk.
    y = y + (Cc @ entering.swapaxes(-1, -2)) * mx.exp(A_cum)[..., None]  # (b, c, h, q, p)
    y = y.transpose(0, 1, 3, 2, 4).reshape(b, c * q, h, p)[:, :l]
    return y, final


def ssd_recurrent(x, log_decay, B, C, state=None):
    """Reference loop with the same contract as `ssd_chunked`; the slow ground truth for tests."""
    b, l, h, p = x.shape
    state = mx.zeros((b, h, p, B.shape[-1]), mx.float32) if state is None else state
    ys = []
    for t in range(l):
        y_t, state = ssd_step(x[:, t], log_decay[:, t], B[:, t], C[:, t], state)
        ys.append(y_t)
    return mx.stack(ys, axis=1), state


@mx.compile
def ssd_step(x, log_decay, B, C, state):
    """One token. x (b, h, p), log_decay (b, h), B, C (b, g, n), state (b, h, p, n) fp32.

    Returns y (b, h, p) fp32 and the new state."""
    h = x.shape[1]
    Bh = expand_groups(B, h, 1).astype(mx.float32)
    Ch = expand_groups(C, h, 1).astype(mx.float32)
    state = mx.exp(log_decay)[..., None, None] * state + x.astype(mx.float32)[..., None] * Bh[:, :, None, :]
    y = (state @ Ch[..., None])[..., 0]
    return y, state


# Metal decode kernel: one thread per (b, h, p) row of the state, looping over n. Apple GPUs only.
_METAL_SOURCE = """
    uint row = thread_position_in_grid.x;          // over b * h * p
    uint bh = row / P;                              // b * h + head
    uint bi = bh / H;
    uint head = bh % H;
    uint grp = head / (H / G);
    float a = metal::exp(log_decay[bh]);
    float xv = static_cast<float>(x[row]);
    float acc = 0.0f;
    for (uint k = 0; k < N; ++k) {
        uint bc = (bi * G + grp) * N + k;
        float s = a * state_in[row * N + k] + xv * static_cast<float>(B[bc]);
        state_out[row * N + k] = s;
        acc += s * static_cast<float>(C[bc]);
    }
    y[row] = acc;
"""
_metal_kernel = None


def _metal_ssd_step(x, log_decay, B, C, state):
    global _metal_kernel
    if _metal_kernel is None:
        _metal_kernel = mx.fast.metal_kernel(
            name="llamba_ssd_step",
            input_names=["x", "log_decay", "B", "C", "state_in"],
            output_names=["y", "state_out"],
            source=_METAL_SOURCE,
        )
    b, h, p = x.shape
    g, n = B.shape[1], B.shape[2]
    y, new_state = _metal_kernel(
        inputs=[x, log_decay.astype(mx.float32), B, C, state],
        template=[("H", h), ("G", g), ("P", p), ("N", n)],
        grid=(b * h * p, 1, 1),
        threadgroup=(min(256, b * h * p), 1, 1),
        output_shapes=[(b, h, p), state.shape],
        output_dtypes=[mx.float32, mx.float32],
    )
    return y, new_state


def ssd_step_dispatch(x, log_decay, B, C, state):
    """The Metal kernel when running on an Apple GPU with an fp32 state, else the pure-MLX `ssd_step`."""
    if mx.default_device() == mx.gpu and mx.metal.is_available() and state.dtype == mx.float32:
        return _metal_ssd_step(x, log_decay, B, C, state)
    return ssd_step(x, log_decay, B, C, state)


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------
class CausalConv(nn.Module):
    """Depthwise causal conv over x, B, C, channels-last. weight (k, conv_dim), bias (conv_dim,)."""

    def __init__(self, channels: int, k: int, bias: bool):
        super().__init__()
        self.weight = mx.zeros((k, channels))
        if bias:
            self.bias = mx.zeros((channels,))

    def __call__(
        self, u: mx.array, window: mx.array | None, lengths: mx.array | None = None
    ) -> tuple[mx.array, mx.array]:
        """u (b, l, conv_dim), window (b, k-1, conv_dim) past inputs or None -> y (b, l, conv_dim), new window.
        lengths (b,): real tokens per row of a right-padded batch; the new window ends at the last of them."""
        k = self.weight.shape[0]
        b, l, d = u.shape
        past = mx.zeros((b, k - 1, d), u.dtype) if window is None else window.astype(u.dtype)
        xs = mx.concatenate([past, u], axis=1)  # (b, k-1+l, d)
        y = xs[:, 0:l] * self.weight[0]
        for j in range(1, k):
            y = y + xs[:, j : j + l] * self.weight[j]
        if "bias" in self:
            y = y + self.bias
        if lengths is None:
            return y, xs[:, l:]
        starts = mx.clip(
            lengths, 0, l
        )  # window = xs[start : start + k-1] holds the k-1 inputs before `lengths`
        return y, mx.take_along_axis(xs, (starts[:, None] + mx.arange(k - 1))[..., None], axis=1)


class DiscreteMamba2(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.h, self.g, self.p, self.n = args.n_v_heads, args.n_qk_heads, args.headdim, args.d_state
        self.in_proj = nn.Linear(args.d_model, args.conv_dim + args.d_inner, bias=args.bias)  # x | B | C | z
        self.a_proj = nn.Linear(args.d_model, args.n_v_heads, bias=args.bias)  # A_log rows of in_proj
        if not args.bias:
            self.z_bias = mx.zeros((args.d_inner,))
        self.conv1d = CausalConv(args.conv_dim, args.d_conv, args.conv_bias)
        self.D = mx.ones((args.n_v_heads,))
        self.out_proj = nn.Linear(args.d_inner, args.d_model, bias=args.bias)

    def __call__(
        self, u: mx.array, cache: ArraysCache | None = None, mask: mx.array | None = None
    ) -> mx.array:
        """u (b, l, d) -> (b, l, d). With a cache, continues from its state and updates it.
        mask (b, l) bool, False at padding: padded positions leave the state as it was."""
        b, l, _ = u.shape
        a = self.args
        xbc, z = mx.split(self.in_proj(u), [a.conv_dim], axis=-1)  # (b, l, conv_dim), (b, l, d_inner)
        log_decay = -mx.logaddexp(self.a_proj(u).astype(mx.float32), 0.0)  # (b, l, h) = -softplus(A_log)
        window, state = (cache[0], cache[1]) if cache is not None else (None, None)
        if mask is not None:
            xbc = mx.where(mask[..., None], xbc, 0)
        lengths = getattr(cache, "lengths", None) if cache is not None else None
        xbc, window = self.conv1d(xbc, window, lengths)
        if a.activation == "silu":
            xbc = nn.silu(xbc)
        x, B, C = mx.split(xbc, [a.d_inner, a.d_inner + self.g * self.n], axis=-1)
        x = x.reshape(b, l, self.h, self.p)
        B = B.reshape(b, l, self.g, self.n)
        C = C.reshape(b, l, self.g, self.n)
        if mask is not None:  # hold the state: decay 1 (log 0) and no input at padded positions
            x = mx.where(mask[..., None, None], x, 0)
            log_decay = mx.where(mask[..., None], log_decay, 0.0)
        if l == 1 and state is not None and mask is None:
            y, state = ssd_step_dispatch(x[:, 0], log_decay[:, 0], B[:, 0], C[:, 0], state)
            y = y[:, None]
        else:
            y, state = ssd_chunked(x, log_decay, B, C, a.chunk_size, state)
        if cache is not None:
            cache[0], cache[1] = window, state
            if hasattr(cache, "advance"):
                cache.advance(
                    l
                )  # mlx-lm's padding bookkeeping (left_padding / lengths) moves past these tokens
        y = y.astype(u.dtype) + self.D[:, None].astype(u.dtype) * x
        gate = z + self.z_bias if "z_bias" in self else z
        return self.out_proj(y.reshape(b, l, a.d_inner) * nn.silu(gate))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.d_model, args.intermediate_size, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.d_model, args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.d_model, bias=args.mlp_bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(args.d_model, eps=args.norm_eps)
        self.mixer = DiscreteMamba2(args)
        self.post_attention_layernorm = nn.RMSNorm(args.d_model, eps=args.norm_eps)
        self.mlp = MLP(args)

    def __call__(
        self, x: mx.array, cache: ArraysCache | None = None, mask: mx.array | None = None
    ) -> mx.array:
        x = x + self.mixer(self.input_layernorm(x), cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embedding = nn.Embedding(args.vocab_size, args.d_model)
        self.layers = [Block(args) for _ in range(args.n_layer)]
        self.final_layernorm = nn.RMSNorm(args.d_model, eps=args.norm_eps)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.backbone = Backbone(args)
        if not args.tie_embeddings:
            self.lm_head = nn.Linear(args.d_model, args.vocab_size, bias=False)

    def __call__(
        self, inputs: mx.array, cache: list[ArraysCache] | None = None, num_last_tokens: int = 0, **_ignored
    ) -> mx.array:
        """inputs (b, l) token ids -> logits (b, l, v) in the weights' dtype, or (b, num_last_tokens, v).
        `cache` from `make_cache()` is updated in place; without one the call starts from a zero state."""
        x = self.backbone.embedding(inputs)
        # mlx-lm's batch padding mask (b, l), or None: every layer's cache holds the same padding bookkeeping.
        mask = (
            cache[0].make_mask(inputs.shape[1])
            if cache is not None and hasattr(cache[0], "make_mask")
            else None
        )
        for i, layer in enumerate(self.backbone.layers):
            x = layer(x, cache[i] if cache is not None else None, mask)
        if num_last_tokens > 0:  # prefill: the head over the whole prompt is wasted work
            x = x[:, -num_last_tokens:]
        x = self.backbone.final_layernorm(x)
        if self.args.tie_embeddings:
            return self.backbone.embedding.as_linear(x)
        return self.lm_head(x)

    def make_cache(self) -> list[ArraysCache]:
        return [ArraysCache(size=2) for _ in range(self.args.n_layer)]

    @property
    def layers(self) -> list[Block]:
        return self.backbone.layers

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        return sanitize(weights, self.args)

    @staticmethod
    def quant_predicate(path: str, module: nn.Module, group_size: int = 64) -> bool:
        return quant_predicate(path, module, group_size)


def sanitize(weights: dict[str, mx.array], args: ModelArgs) -> dict[str, mx.array]:
    """PyTorch/cartesia Llamba names and shapes -> this module's. Idempotent (mlx-lm calls it again on load)."""
    out = dict(weights)
    split = args.conv_dim + args.d_inner
    for i in range(args.n_layer):
        pre = f"backbone.layers.{i}.mixer."
        if pre + "a_proj.weight" not in out and pre + "in_proj.weight" in out:
            for kind in ("weight", "bias"):
                if pre + f"in_proj.{kind}" in out:
                    w = out[pre + f"in_proj.{kind}"]
                    out[pre + f"in_proj.{kind}"], out[pre + f"a_proj.{kind}"] = w[:split], w[split:]
        conv = out.get(pre + "conv1d.weight")
        if conv is not None and conv.ndim == 3:  # (conv_dim, 1, k) -> (k, conv_dim)
            out[pre + "conv1d.weight"] = conv[:, 0, :].T
    if args.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def quant_predicate(path: str, module: nn.Module, group_size: int = 64) -> bool:
    """Quantize the projections, MLPs, embedding and head; leave norms, conv, D, z_bias and the decay
    projection (`a_proj`) in full precision, and any layer whose input width the group size does not divide."""
    if not hasattr(module, "to_quantized") or path.endswith("a_proj"):
        return False
    return module.weight.shape[-1] % group_size == 0
