"""Load an exported MLX Llamba directory and generate from it, with the sampling semantics of
`llamba.generate` (greedy at temperature 0, CTRL repetition penalty, then temperature, top-k, top-p).

The recurrent cache is the whole context: `MlxState` carries it (plus the last logits) across calls, so a
chat feeds only each turn's new tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from llamba.export import mlx_llamba
from llamba.export.convert import MODEL_FILE, ExportError
from llamba.generate import SamplingParams


def load(path: str | Path, tokenizer: bool = True):
    """An exported directory -> (model, tokenizer or None). Bad directories raise a one-line ExportError."""
    path = Path(path)
    file = path / "config.json"
    if not file.is_file():
        raise ExportError(
            f"{path} is not an exported MLX model (no config.json); create one with "
            "`llamba export mlx --model CKPT --out DIR`"
        )
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{file} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if config.get("model_type") != "llamba" or config.get("model_file") != MODEL_FILE:
        raise ExportError(
            f"{path} is not an MLX Llamba export (config.json lacks model_type 'llamba' and "
            f"model_file '{MODEL_FILE}'); for a PyTorch checkpoint use --backend torch"
        )
    weights_file = path / "model.safetensors"
    if not weights_file.is_file():
        raise ExportError(f"{path} has no model.safetensors; re-run `llamba export mlx`")
    try:
        args = mlx_llamba.ModelArgs.from_dict(config)
        weights = mx.load(str(weights_file))
    except (TypeError, ValueError, RuntimeError) as e:
        raise ExportError(f"{path}: cannot read the export ({str(e).splitlines()[0]})") from None
    model = mlx_llamba.Model(args)
    weights = model.sanitize(weights)
    if (quant := config.get("quantization")) is not None:
        nn.quantize(
            model,
            group_size=quant["group_size"],
            bits=quant["bits"],
            mode=quant.get("mode", "affine"),
            class_predicate=lambda p, m: hasattr(m, "to_quantized") and f"{p}.scales" in weights,
        )
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise ExportError(
            f"{path}: config.json does not match model.safetensors ({str(e).splitlines()[0]})"
        ) from None
    model.eval()
    mx.eval(model.parameters())
    tok = None
    if tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
    return model, tok


@dataclass
class MlxState:
    """What the model has read: the per-layer caches, how many tokens, and the logits after the last one."""

    cache: list
    seqlen: int = 0
    last_logits: mx.array | None = None  # (1, v) fp32
    extra: dict = field(default_factory=dict)

    @classmethod
    def alloc(cls, model) -> MlxState:
        return cls(model.make_cache())


def process_logits(logits: mx.array, params: SamplingParams, context: mx.array | None = None) -> mx.array:
    """logits (b, v) fp32, context (b, t) ids seen -> log-probabilities (b, v); removed tokens get -inf."""
    logits = logits.astype(mx.float32)
    if params.repetition_penalty != 1.0 and context is not None and context.size:
        seen = mx.take_along_axis(logits, context, axis=-1)
        seen = mx.where(seen > 0, seen / params.repetition_penalty, seen * params.repetition_penalty)
        logits = mx.put_along_axis(logits, context, seen, axis=-1)
    if params.temperature == 0:
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = mx.sort(logits, axis=-1)[:, -params.top_k][:, None]
        logits = mx.where(logits < kth, -mx.inf, logits)
    if params.top_p < 1.0:
        order = mx.argsort(-logits, axis=-1)
        sorted_logits = mx.take_along_axis(logits, order, axis=-1)
        probs = mx.softmax(sorted_logits, axis=-1)
        mass_before = mx.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        drop = mx.put_along_axis(
            mx.zeros(logits.shape, mx.bool_), order, mass_before >= params.top_p, axis=-1
        )
        logits = mx.where(drop, -mx.inf, logits)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def sample_next_token(
    logits: mx.array, params: SamplingParams, key: mx.array | None = None, context: mx.array | None = None
) -> mx.array:
    """logits (b, v) -> tokens (b,). Greedy at temperature 0."""
    logprobs = process_logits(logits, params, context)
    if params.temperature == 0:
        return mx.argmax(logprobs, axis=-1)
    return mx.random.categorical(logprobs, axis=-1, key=key)


def stream_generate(
    model,
    prompt_ids: Sequence[int],
    params: SamplingParams | None = None,
    state: MlxState | None = None,
    **overrides,
) -> Iterator[int]:
    """Yield sampled token ids one at a time (batch 1), like `llamba.generate.stream_generate`.

    `state` (optional) is updated in place with the prompt and every sampled token, the stop token included."""
    params = (params or SamplingParams()).with_overrides(**overrides)
    ids = mx.array(list(prompt_ids), dtype=mx.int32)[None]  # (1, l)
    state = state if state is not None else MlxState.alloc(model)
    if ids.shape[1] == 0 and state.last_logits is None:
        raise ValueError("empty prompt and the state holds no logits to continue from")
    key = mx.random.key(params.seed) if params.seed is not None else None
    if ids.shape[1]:
        state.last_logits = model(ids, cache=state.cache, num_last_tokens=1)[:, -1].astype(mx.float32)
        state.seqlen += ids.shape[1]
        mx.eval(state.last_logits)
    context = ids
    for _ in range(params.max_new_tokens):
        sub = None
        if key is not None:
            key, sub = mx.random.split(key)
        token = sample_next_token(state.last_logits, params, sub, context)
        tok = int(token.item())
        if params.repetition_penalty != 1.0:
            context = mx.concatenate([context, token[:, None].astype(mx.int32)], axis=1)
        state.last_logits = model(token[:, None], cache=state.cache)[:, -1].astype(mx.float32)
        state.seqlen += 1
        mx.async_eval(state.last_logits)  # the next step overlaps with the caller handling this token
        yield tok
        if tok in params.stop_token_ids:
            return


def generate(
    model,
    prompt_ids: Sequence[int],
    params: SamplingParams | None = None,
    state: MlxState | None = None,
    **overrides,
) -> list[int]:
    return list(stream_generate(model, prompt_ids, params, state, **overrides))
