"""Sampling and generation for the PyTorch Llamba: prefill with the chunked scan, then O(1) steps.

The recurrent state is the whole context, so a chat keeps one `LlambaState` across turns and feeds only
the new tokens of each turn (`incremental_ids`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, replace

import torch

from llamba.cache import LlambaState


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 -> greedy
    top_p: float = 1.0  # nucleus mass kept (1 = off)
    top_k: int = 0  # keep the k most likely (0 = off)
    repetition_penalty: float = 1.0  # >1 discourages tokens already in the context (CTRL-style)
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")

    def with_overrides(self, **overrides) -> SamplingParams:
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown sampling option(s) {sorted(unknown)}; known: {sorted(known)}")
        if "stop_token_ids" in overrides and overrides["stop_token_ids"] is not None:
            overrides["stop_token_ids"] = tuple(overrides["stop_token_ids"])
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


def process_logits(
    logits: torch.Tensor, params: SamplingParams, context: torch.Tensor | None = None
) -> torch.Tensor:
    """logits: (b, v) fp32, context: (b, t) token ids seen so far -> log-probabilities (b, v) after the
    repetition penalty, temperature, top-k and top-p (removed tokens get -inf). Order as in HF/mlx-lm."""
    logits = logits.float().clone()
    if params.repetition_penalty != 1.0 and context is not None and context.numel():
        seen = torch.gather(logits, 1, context)
        seen = torch.where(seen > 0, seen / params.repetition_penalty, seen * params.repetition_penalty)
        logits.scatter_(1, context, seen)
    if params.temperature == 0:
        return torch.log_softmax(logits, -1)
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        logits = _top_p(logits, params.top_p)
    return torch.log_softmax(logits, -1)


TOP_P_CANDIDATES = 256


def _top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """logits: (b, v) -> the nucleus: keep the most likely tokens until the mass of the more likely ones reaches
    top_p. Exact, but sorts only the TOP_P_CANDIDATES most likely tokens when they hold the nucleus (a full sort of a
    50k vocabulary per row is most of a CPU decode step's sampling time); rows whose nucleus is wider fall back to a
    full sort."""
    k = min(TOP_P_CANDIDATES, logits.shape[-1])
    probs_all = torch.softmax(logits, -1)
    top, order = torch.topk(probs_all, k, dim=-1)  # sorted, descending
    if bool((top.sum(-1) < top_p).any()) or k == logits.shape[-1]:
        top, order = torch.sort(probs_all, dim=-1, descending=True)
    mass_before = torch.cumsum(top, -1) - top  # mass of strictly more likely tokens
    keep_sorted = mass_before < top_p  # always keeps the most likely token
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter(1, order, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


def sample_next_token(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    context: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits: (b, v) -> next tokens (b,). Greedy when temperature == 0."""
    logprobs = process_logits(logits, params, context)
    if params.temperature == 0:
        return logprobs.argmax(-1)
    return torch.multinomial(logprobs.exp(), 1, generator=generator)[:, 0]


def _as_ids(prompt_ids: Sequence[int] | torch.Tensor, device) -> torch.Tensor:
    ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=device)
    return ids[None] if ids.dim() == 1 else ids  # (1, l)


@torch.no_grad()
def stream_generate(
    model,
    prompt_ids: Sequence[int] | torch.Tensor,
    params: SamplingParams | None = None,
    state: LlambaState | None = None,
    **overrides,
) -> Iterator[int]:
    """Yield sampled token ids one at a time (batch 1).

    `state` (optional) is the context already read; it is updated in place with the prompt and every sampled
    token, the stop token included, so the next call continues the same conversation."""
    params = (params or SamplingParams()).with_overrides(**overrides)
    ids = _as_ids(prompt_ids, model.device)
    if ids.shape[0] != 1:
        raise ValueError("stream_generate takes one sequence; batch prompts by calling model.step directly")
    state = state if state is not None else model.alloc_state(1)
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(params.seed)
    context = ids
    if ids.shape[1] == 0 and state.seqlen == 0:
        raise ValueError("empty prompt and empty state: nothing to condition on")
    if params.max_new_tokens == 0:
        if ids.shape[1]:
            state.last_logits = model(ids, state=state, num_last_tokens=1).logits[:, -1]
        return
    if ids.shape[1]:
        logits = model(ids, state=state, num_last_tokens=1).logits[:, -1]
        state.last_logits = logits
    elif state.last_logits is not None:
        logits = state.last_logits
    else:
        raise ValueError("empty prompt and the state holds no logits to continue from")
    for i in range(params.max_new_tokens):
        token = sample_next_token(logits, params, generator, context)
        context = torch.cat([context, token[:, None]], dim=1)
        tok = int(token)
        logits = model.step(token, state)
        state.last_logits = logits
        yield tok
        if tok in params.stop_token_ids or i == params.max_new_tokens - 1:
            return


def generate(
    model,
    prompt_ids: Sequence[int] | torch.Tensor,
    params: SamplingParams | None = None,
    state: LlambaState | None = None,
    **overrides,
) -> list[int]:
    """All tokens of `stream_generate` as a list."""
    return list(stream_generate(model, prompt_ids, params, state, **overrides))


def incremental_ids(fed: Sequence[int], full: Sequence[int]) -> list[int] | None:
    """For a chat turn: the suffix of `full` (the re-rendered conversation) still to be fed when `fed` (what
    the state has read) is a prefix of it, else None (the template re-wrote history: re-prefill)."""
    if len(fed) > len(full) or list(full[: len(fed)]) != list(fed):
        return None
    return list(full[len(fed) :])


def chat_stop_ids(tokenizer) -> tuple[int, ...]:
    """Token ids that end an assistant turn: eos plus the usual end-of-turn markers the vocab knows."""
    ids = set()
    eos = tokenizer.eos_token_id
    if eos is not None:
        ids.update(eos if isinstance(eos, list) else [eos])
    vocab = tokenizer.get_vocab()
    for marker in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "</s>", "<|endoftext|>"):
        if marker in vocab:
            ids.add(vocab[marker])
    return tuple(sorted(ids))
