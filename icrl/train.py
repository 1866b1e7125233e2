"""Training: random context windows from learning histories, cross-entropy on every action, AdamW,
linear warmup + cosine decay, a fixed step budget."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from llamba.icrl.histories import Histories
from llamba.icrl.model import ADConfig, ADTransformer


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.99
    warmup_frac: float = 0.05
    grad_clip: float = 1.0
    label_smoothing: float = 0.0
    seed: int = 0
    threads: int = 1  # torch CPU threads (the lab models are tiny; 1 thread is near optimal)

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("train.steps and train.batch_size must be >= 1")
        if not (self.lr > 0 and 0 <= self.warmup_frac < 1 and 0 <= self.label_smoothing < 1):
            raise ValueError("train.lr must be > 0, train.warmup_frac and train.label_smoothing in [0, 1)")


class Window(NamedTuple):
    """A batch of training windows, each (batch, seq_len)."""

    states: torch.Tensor  # s_t
    prev_actions: torch.Tensor  # a_{t-1} (pad at a history start)
    prev_rewards: torch.Tensor  # r_{t-1} (pad at a history start)
    targets: torch.Tensor  # a_t
    episode_start: torch.Tensor | None  # bool, True on each episode's first token; None without the marker

    def inputs(self) -> tuple:
        """The model's inputs: ``model(*window.inputs())``."""
        if self.episode_start is None:
            return self.states, self.prev_actions, self.prev_rewards
        return self.states, self.prev_actions, self.prev_rewards, self.episode_start


class WindowSampler:
    """Random windows of ``seq_len`` consecutive transitions inside one history.
    Token t of a window carries s_t, a_{t-1}, r_{t-1} (pads at a history start only: across an episode boundary
    they are the previous episode's last action and reward), the target a_t, and with ``episode_marker`` a flag
    that is True on the first token of every episode (an extra model input, not a change to a_{t-1}, r_{t-1})."""

    def __init__(
        self,
        h: Histories,
        seq_len: int,
        num_actions: int,
        num_rewards: int,
        seed: int = 0,
        episode_marker: bool = False,
    ):
        n = h.total_transitions
        self.states = torch.from_numpy(h.states.astype(np.int64))
        self.actions = torch.from_numpy(h.actions.astype(np.int64))
        prev_a = np.concatenate([[num_actions], h.actions[:-1]]).astype(np.int64)
        prev_r = np.concatenate([[num_rewards], h.rewards[:-1]]).astype(np.int64)
        starts = h.offsets[:-1]
        prev_a[starts], prev_r[starts] = num_actions, num_rewards
        self.episode_start = None
        if episode_marker:
            if h.starts is None:
                raise ValueError("these histories carry no episode starts (an old file); generate them again")
            flag = np.asarray(h.starts, bool).copy()
            flag[starts] = True  # a history begins with an episode
            self.episode_start = torch.from_numpy(flag)
        self.prev_a, self.prev_r = torch.from_numpy(prev_a), torch.from_numpy(prev_r)
        lengths = np.diff(h.offsets)
        if lengths.min() < seq_len:
            raise ValueError(
                f"a history has {lengths.min()} transitions, fewer than seq_len={seq_len}; "
                "use more episodes per history or a shorter context"
            )
        # every valid window start, drawn uniformly
        self.valid = np.concatenate(
            [np.arange(o, o + m - seq_len + 1) for o, m in zip(starts, lengths, strict=True)]
        )
        self.seq_len, self.rng, self.n = seq_len, np.random.default_rng(seed), n

    def sample(self, batch: int) -> Window:
        """-> Window(states, prev_actions, prev_rewards, targets, episode_start): each (batch, seq_len);
        episode_start is None without ``episode_marker``."""
        idx = torch.from_numpy(self.rng.choice(self.valid, size=batch)[:, None] + np.arange(self.seq_len))
        start = None if self.episode_start is None else self.episode_start[idx]
        return Window(self.states[idx], self.prev_a[idx], self.prev_r[idx], self.actions[idx], start)


def lr_at(step: int, cfg: TrainConfig) -> float:
    warm = max(1, int(cfg.warmup_frac * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


def train(
    h: Histories, model_cfg: ADConfig, cfg: TrainConfig, progress=None
) -> tuple[ADTransformer, list[float]]:
    """Train a fresh model on histories h for cfg.steps steps; returns the model and the loss per step.
    ``progress(k)`` is called every step."""
    torch.manual_seed(cfg.seed)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    model = ADTransformer(model_cfg)
    sampler = WindowSampler(
        h, model_cfg.seq_len, model_cfg.num_actions, model_cfg.num_rewards, cfg.seed, model_cfg.episode_marker
    )
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
    )
    losses = []
    model.train()
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        w = sampler.sample(cfg.batch_size)
        logits = model(*w.inputs())  # (b, l, A)
        loss = F.cross_entropy(logits.flatten(0, 1), w.targets.flatten(), label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
        if progress is not None:
            progress(1)
    model.eval()
    return model, losses
