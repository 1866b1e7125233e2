"""In-context evaluation on held-out tasks and Expected Maximum Performance.

The model acts with frozen weights in one batched env per task set; its context is a FIFO window of the last
``seq_len`` transitions, carried across episode boundaries (the env resets every episode).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from llamba.envs import EnvSpec
from llamba.icrl.model import ADTransformer


@dataclass
class EvalConfig:
    episodes: int = 20  # episodes played in context per task
    last_k: int = 3  # score = mean normalised return of the last k episodes
    greedy: bool = True  # argmax actions; False samples from the policy
    seed: int = 0

    def __post_init__(self):
        if self.episodes < 1 or not 1 <= self.last_k <= self.episodes:
            raise ValueError("eval.episodes must be >= 1 and eval.last_k in [1, eval.episodes]")


@torch.no_grad()
def in_context_returns(model: ADTransformer, spec: EnvSpec, tasks: np.ndarray, cfg: EvalConfig) -> np.ndarray:
    """tasks: (b,) or (b, 2) -> returns (b, episodes)."""
    c = model.cfg
    model.eval()
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    env = spec.batched(tasks)
    b = env.b
    # running context per task; ragged only while it fills up, so forward passes group equal lengths
    ctx = [[] for _ in range(b)]  # list of (s_t, a_{t-1}, r_{t-1}, episode start)
    # pads only at the history start; across episodes a_{t-1}, r_{t-1} carry the last step (e.g. the door reward)
    prev_a, prev_r = np.full(b, c.num_actions), np.full(b, c.num_rewards)
    returns = np.zeros((b, cfg.episodes))
    for e in range(cfg.episodes):
        obs = env.reset(rng)
        # True while a task's next token is its episode's first (fed as the flag with episode_marker)
        first = np.ones(b, bool)
        while not env.done.all():
            active = np.flatnonzero(~env.done)
            for i in active:
                ctx[i].append((obs[i], prev_a[i], prev_r[i], first[i]))
                del ctx[i][: -c.seq_len]
            first[active] = False
            actions = np.zeros(b, np.int64)
            lengths = np.array([len(ctx[i]) for i in active])
            for length in np.unique(lengths):
                group = active[lengths == length]
                seq = torch.tensor(np.array([ctx[i] for i in group]), dtype=torch.long)  # (g, l, 4)
                flag = (seq[..., 3] == 1,) if c.episode_marker else ()  # episode_start only with the marker
                logits = model(seq[..., 0], seq[..., 1], seq[..., 2], *flag)[:, -1]  # (g, A)
                if cfg.greedy:
                    act = logits.argmax(-1)
                else:
                    act = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen).squeeze(-1)
                actions[group] = act.numpy()
            obs, rew, _, _ = env.step(actions)
            prev_a = np.where(~np.isin(np.arange(b), active), prev_a, actions)
            prev_r = np.where(~np.isin(np.arange(b), active), prev_r, rew.astype(np.int64))
            returns[:, e] += rew
    return returns


def random_returns(spec: EnvSpec, tasks: np.ndarray, episodes: int, seed: int = 0) -> np.ndarray:
    """The uniform random policy on the same tasks and episode count: tasks (b,) or (b, 2) -> returns
    (b, episodes). The floor a trained model has to clear (it has no context, so every episode is alike)."""
    rng = np.random.default_rng(seed)
    env = spec.batched(tasks)
    returns = np.zeros((env.b, episodes))
    for e in range(episodes):
        env.reset(rng)
        while not env.done.all():
            _, rew, _, _ = env.step(rng.integers(0, spec.num_actions, size=env.b))  # finished envs pay 0
            returns[:, e] += rew
    return returns


@torch.no_grad()
def heldout_loss(model: ADTransformer, h, windows: int = 256, seed: int = 0) -> float:
    """Mean action cross-entropy on seeded random windows of histories ``h`` (e.g. recorded on held-out tasks):
    how well the model imitates the source learner on tasks it never saw."""
    import torch.nn.functional as F

    from llamba.icrl.train import WindowSampler

    c = model.cfg
    model.eval()
    sampler = WindowSampler(h, c.seq_len, c.num_actions, c.num_rewards, seed, c.episode_marker)
    w = sampler.sample(windows)
    return float(F.cross_entropy(model(*w.inputs()).flatten(0, 1), w.targets.flatten()))


def score(returns: np.ndarray, optimal: np.ndarray, last_k: int) -> float:
    """returns: (b, E), optimal: (b,) -> mean over tasks of the normalised return of the last k episodes."""
    return float((returns[:, -last_k:] / optimal[:, None]).mean())
