"""The fixed n-gram successor matrix (docs/equations.md §R3) and the keys it matches on.

Position t holds token x_t = (a_{t-1}, r_{t-1}, s_t) and predicts a_t. For order n,
    M[t, u] = 1  iff  u < t  and  x[t-k] == x[u-1-k] for k = 0..n-1  (all indices >= 0),
i.e. u is the position right after an earlier occurrence of the length-n suffix ending at t.
A = M / row sum (zero rows where nothing matches). A depends only on x[<= t] and points only at u < t, so
the token of a_t (position t + 1) can never leak into the prediction of a_t.
"""

from __future__ import annotations

import torch


def match_keys(
    states: torch.Tensor,
    prev_actions: torch.Tensor,
    prev_rewards: torch.Tensor,
    key: str,
    num_states: int,
    num_rewards: int,
) -> torch.Tensor:
    """states, prev_actions, prev_rewards: (b, l) ints -> keys (b, l).
    "state": x_t = s_t.  "sar": x_t = id(a_{t-1}, r_{t-1}, s_t) = (a (R + 1) + r) S + s, one id per triple for
    rewards in [0, R] (R = ``num_rewards`` is the pad reward) and any action, the pad action included."""
    if key == "state":
        return states
    if key == "sar":
        return (prev_actions * (num_rewards + 1) + prev_rewards) * num_states + states
    raise ValueError(f"unknown match key {key!r}; use 'state' or 'sar'")


@torch.no_grad()
def ngram_mask(keys: torch.Tensor, n: int) -> torch.Tensor:
    """keys: (b, l) -> M: (b, l, l) bool, M[:, t, u] as in the module docstring."""
    if n < 1:
        raise ValueError(f"n-gram order must be >= 1, got {n}")
    b, l = keys.shape
    eq = keys[:, :, None] == keys[:, None, :]  # (b, l, l): x_t == x_j
    match = eq.clone()  # suffix ending at t == window ending at j
    for k in range(1, n):
        shifted = torch.zeros_like(eq)
        shifted[:, k:, k:] = eq[:, :-k, :-k]  # x_{t-k} == x_{j-k}, False where an index < 0
        match &= shifted
    mask = torch.zeros_like(eq)
    mask[:, :, 1:] = match[:, :, :-1]  # successor u = j + 1
    return mask & torch.ones(l, l, dtype=torch.bool, device=keys.device).tril(-1)  # strictly causal: u < t


@torch.no_grad()
def ngram_attention(keys: torch.Tensor, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """keys: (b, l) -> A: (b, l, l), rows normalised over the matched successors, zero rows without a match."""
    m = ngram_mask(keys, n).to(dtype)
    return m / m.sum(-1, keepdim=True).clamp(min=1)


@torch.no_grad()
def permuted_attention(a: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Control: a: (b, l, l) -> same per-row number of successors, but placed at random causal positions u < t
    (uniform weights). Keeps sparsity and causality, destroys the match structure."""
    b, l, _ = a.shape
    count = (a > 0).sum(-1, keepdim=True)  # (b, l, 1)
    r = torch.rand(b, l, l, generator=generator, device=a.device)
    causal = torch.ones(l, l, dtype=torch.bool, device=a.device).tril(-1)
    r = r.masked_fill(~causal, 2.0)  # non-causal slots sort last
    rank = r.argsort(-1).argsort(-1)
    m = (rank < count).to(a.dtype)
    return m / m.sum(-1, keepdim=True).clamp(min=1)


def ngram_attention_ref(keys: list[int], n: int) -> list[list[float]]:
    """Slow per-sample reference with explicit loops (for tests)."""
    l = len(keys)
    rows = []
    for t in range(l):
        succ = [
            u
            for u in range(t)
            if u - n >= 0 and all(keys[t - k] == keys[u - 1 - k] for k in range(n)) and t - (n - 1) >= 0
        ]
        rows.append([1.0 / len(succ) if u in succ else 0.0 for u in range(l)])
    return rows
