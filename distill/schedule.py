"""Warmup-stable-decay learning rate (docs/equations.md §D2), restarted for every stage."""

from __future__ import annotations


def wsd_lr(
    step: int, total_steps: int, peak_lr: float, warmup: float = 0.1, decay: float = 0.1, min_lr: float = 1e-8
) -> float:
    """LR for optimizer step `step` (0-based) of `total_steps`: linear warmup over the first `warmup` fraction,
    constant, then a linear decay to `min_lr` over the last `decay` fraction."""
    total_steps = max(total_steps, 1)
    n_warm = int(round(warmup * total_steps))
    n_decay = int(round(decay * total_steps))
    if step < n_warm:
        return peak_lr * (step + 1) / n_warm
    start_decay = total_steps - n_decay
    if step >= start_decay and n_decay > 0:
        frac = (step - start_decay + 1) / n_decay
        return peak_lr + (min_lr - peak_lr) * frac
    return peak_lr
