"""Learning histories: batched learners per task (tabular Q-learning, a noisy oracle, or a frontier explorer),
stored flat with per-episode returns.

A dataset holds ``H`` histories (``tasks_per_history`` tells which task each one learns). History ``h`` is the
slice ``offsets[h]:offsets[h+1]`` of the flat ``states, actions, rewards`` arrays: one entry per env step
(state before the step, action, reward), episodes back to back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llamba.envs import EnvSpec
from llamba.envs.grid import manhattan, toward

SOURCES = ("qlearning", "noisy_oracle", "explorer")


@dataclass
class DataConfig:
    n_train_tasks: int = 64  # training tasks (goals / key-door pairs)
    n_test_tasks: int = 16  # held-out tasks for evaluation
    histories_per_task: int = 4  # independent Q-learning runs per task
    episodes_per_history: int = 60  # episodes each Q-learner plays
    subsample: int = 1  # keep every k-th episode of each history (AD ablation)
    lr: float = 0.5  # Q-learning step size
    gamma: float = 0.9
    q_init: float = 1.0  # Q ~ U(0, q_init): mild optimism drives exploration
    eps_decay_frac: float = 0.9  # epsilon falls linearly 1 -> 0 over this fraction of the episodes
    split_seed: int = 0  # seed of the train/test task split
    seed: int = 0  # seed of the Q-learners and env starts
    # "qlearning": the paper's grid source; "noisy_oracle": ADε-style shortest-path agent with the same epsilon
    # schedule (acts on the true task); "explorer": a frontier-search learner that knows only what its own
    # history shows (see `Explorer`): it searches until the first reward, then exploits
    source: str = "qlearning"
    noise: float = 0.0  # explorer only: probability of a uniformly random action at every step

    def __post_init__(self):
        for name in ("n_train_tasks", "histories_per_task", "episodes_per_history", "subsample"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_test_tasks < 0:
            raise ValueError("data.n_test_tasks must be >= 0")
        if self.source not in SOURCES:
            raise ValueError(f"data.source must be one of {SOURCES}, got {self.source!r}")
        if not 0 <= self.noise < 1:
            raise ValueError(f"data.noise must be in [0, 1), got {self.noise}")
        if not (0 < self.lr <= 1 and 0 <= self.gamma < 1 and 0 < self.eps_decay_frac <= 1):
            raise ValueError("data.lr must be in (0, 1], data.gamma in [0, 1), data.eps_decay_frac in (0, 1]")


@dataclass
class Histories:
    states: np.ndarray  # (N,) int16
    actions: np.ndarray  # (N,) int8
    rewards: np.ndarray  # (N,) int8
    offsets: np.ndarray  # (H + 1,) start of each history in the flat arrays
    returns: np.ndarray  # (H, E) return of every kept episode
    tasks: np.ndarray  # (H,) or (H, 2) task of each history
    env: str
    env_kwargs: dict
    starts: np.ndarray | None = None  # (N,) bool, True on the first step of every kept episode

    @property
    def total_transitions(self) -> int:
        return int(len(self.states))

    @property
    def num_histories(self) -> int:
        return len(self.offsets) - 1

    def take(self, n: int) -> Histories:
        """The first ``n`` histories (with tasks in split order: the histories of a prefix of the tasks)."""
        end = int(self.offsets[n])
        return Histories(
            self.states[:end],
            self.actions[:end],
            self.rewards[:end],
            self.offsets[: n + 1].copy(),
            self.returns[:n],
            self.tasks[:n],
            self.env,
            self.env_kwargs,
            None if self.starts is None else self.starts[:end],
        )

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = json.dumps({"env": self.env, "env_kwargs": self.env_kwargs})
        np.savez_compressed(
            path,
            states=self.states,
            actions=self.actions,
            rewards=self.rewards,
            offsets=self.offsets,
            returns=self.returns,
            tasks=self.tasks,
            starts=self.starts if self.starts is not None else np.zeros(0, bool),
            meta=np.array(meta),
        )

    @classmethod
    def load(cls, path: str | Path) -> Histories:
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
            starts = z["starts"] if "starts" in z and len(z["starts"]) else None  # older files have none
            return cls(
                z["states"],
                z["actions"],
                z["rewards"],
                z["offsets"],
                z["returns"],
                z["tasks"],
                meta["env"],
                meta["env_kwargs"],
                starts,
            )


def learning_histories(spec: EnvSpec, tasks: np.ndarray, cfg: DataConfig, progress=None) -> Histories:
    """Run ``len(tasks) * cfg.histories_per_task`` learners of ``cfg.source`` (epsilon-greedy tabular
    Q-learning, the noisy oracle or the explorer) side by side in one batched env; histories of one task are
    consecutive, tasks in the given order.
    tasks: (n,) or (n, 2). ``progress(k)`` is called after each episode.

    In Key-to-Door the cell alone is not Markov (has the key been picked up?), so the learner indexes its table
    by (cell, rewards seen so far this episode, capped at 1): a fact of its own history, not privileged state."""
    rng = np.random.default_rng(cfg.seed)
    tasks = np.repeat(np.asarray(tasks), cfg.histories_per_task, axis=0)  # (b,) or (b, 2)
    b, s_n, a_n, T, E = len(tasks), spec.num_states, spec.num_actions, spec.horizon, cfg.episodes_per_history
    env = spec.batched(tasks)
    levels = spec.subgoals
    q = rng.uniform(0, cfg.q_init, size=(b, s_n * levels, a_n))
    idx = np.arange(b)
    buf_s = np.zeros((b, E * T), np.int16)
    buf_a = np.zeros((b, E * T), np.int8)
    buf_r = np.zeros((b, E * T), np.int8)
    lengths = np.zeros((b, E), np.int64)
    returns = np.zeros((b, E))
    fill = np.zeros(b, np.int64)
    explorer = Explorer(spec, b, levels, rng) if cfg.source == "explorer" else None
    for e in range(E):
        eps = cfg.noise if explorer else max(0.0, 1.0 - e / max(1.0, cfg.eps_decay_frac * E))
        obs = env.reset(rng)
        mem = np.zeros(b, np.int64)  # rewards seen this episode, capped at levels - 1
        if explorer:
            explorer.observe(obs, np.zeros(b), mem, np.ones(b, bool))
        for _ in range(T):
            active = ~env.done
            if not active.any():
                break
            qs = obs + s_n * mem
            if cfg.source == "qlearning":
                greedy = q[idx, qs].argmax(-1)
            elif explorer:
                greedy = explorer.act(obs, mem)
            else:
                greedy = oracle_action(spec, tasks, obs, mem)
            explore = rng.random(b) < eps
            act = np.where(explore, rng.integers(0, a_n, size=b), greedy)
            nxt, rew, term, _ = env.step(act)
            if explorer:
                explorer.observe(nxt, rew, mem, active)
            mem = np.minimum(mem + (rew > 0), levels - 1)
            if cfg.source == "qlearning":  # the other sources ignore the table
                target = rew + cfg.gamma * (~term) * q[idx, nxt + s_n * mem].max(-1)
                q[idx, qs, act] += active * cfg.lr * (target - q[idx, qs, act])
            rows = idx[active]
            buf_s[rows, fill[rows]], buf_a[rows, fill[rows]], buf_r[rows, fill[rows]] = (
                obs[rows],
                act[rows],
                rew[rows],
            )
            fill += active
            lengths[:, e] += active
            returns[:, e] += rew
            obs = nxt
        if progress is not None:
            progress(1)
    keep = np.zeros(E, bool)
    keep[:: cfg.subsample] = True
    parts_s, parts_a, parts_r, parts_start, offsets = [], [], [], [], [0]
    for h in range(b):
        ends = np.cumsum(lengths[h])
        mask = np.repeat(keep, lengths[h])  # which flat steps belong to kept episodes
        n = ends[-1]
        parts_s.append(buf_s[h, :n][mask])
        parts_a.append(buf_a[h, :n][mask])
        parts_r.append(buf_r[h, :n][mask])
        start = np.zeros(int(mask.sum()), bool)
        start[np.concatenate([[0], np.cumsum(lengths[h][keep])[:-1]])] = True
        parts_start.append(start)
        offsets.append(offsets[-1] + int(mask.sum()))
    return Histories(
        np.concatenate(parts_s),
        np.concatenate(parts_a),
        np.concatenate(parts_r),
        np.asarray(offsets, np.int64),
        returns[:, keep],
        tasks,
        spec.name,
        dict(spec.kwargs),
        np.concatenate(parts_start),
    )


def oracle_action(spec: EnvSpec, tasks: np.ndarray, obs: np.ndarray, mem: np.ndarray) -> np.ndarray:
    """Shortest-path action toward the task's next subgoal: the goal, or the key and then the door (mem = subgoals
    reached this episode)."""
    cells = np.asarray(tasks).reshape(len(tasks), spec.subgoals)  # (b, subgoals)
    return toward(obs, cells[np.arange(len(cells)), np.minimum(mem, spec.subgoals - 1)], spec.size)


class Explorer:
    """A learner that knows only its own history: frontier search until a reward, then exploitation.

    Dark Room: walk (shortest path, vertical first) to the nearest cell not yet visited in this history, ties
    broken at random, until a reward reveals the goal; from then on go to the goal and stay. Key-to-Door: the
    same search for the key (every cell visited before the key is found is ruled out), then for the door (only
    cells visited while holding the key are ruled out, since the door is silent without it); once both are
    known, key then door. Its returns improve within a few episodes and reach the optimum once the task is
    solved, so a context of a few episodes shows search turning into exploitation: the improvement operator
    that AD distils (departure from the paper, whose grid histories come from Q-learning; see icrl/README.md).
    ``noise`` random actions (DataConfig) are mixed in by the caller."""

    def __init__(self, spec: EnvSpec, b: int, levels: int, rng: np.random.Generator):
        """levels: search phases (1 in Dark Room; 2 in Key-to-Door: key, then door)."""
        s_n = spec.num_states
        self.spec, self.rng, self.levels = spec, rng, levels
        cells = np.arange(s_n)
        self.dist = manhattan(cells[:, None], cells[None, :], spec.size)  # (S, S)
        self.ruled_out = np.zeros((self.levels, b, s_n), bool)  # per search phase: cells known not to pay
        self.known = np.full((self.levels, b), -1)  # per phase: the rewarding cell once seen, else -1
        self.target = np.full((self.levels, b), -1)  # per phase: the cell being walked to
        self.idx = np.arange(b)

    def observe(self, cells: np.ndarray, rew: np.ndarray, phase: np.ndarray, active: np.ndarray):
        """cells: (b,) where each env is now (after reset or a step); rew: (b,) the reward of that step;
        phase: (b,) rewards seen this episode before it (the search it belonged to); only ``active`` envs moved."""
        found, silent = active & (rew > 0), active & (rew == 0)
        self.known[phase[found], self.idx[found]] = cells[found]
        self.ruled_out[phase[silent], self.idx[silent], cells[silent]] = True

    def act(self, obs: np.ndarray, mem: np.ndarray) -> np.ndarray:
        """obs, mem: (b,) -> (b,) actions."""
        known, target = self.known[mem, self.idx], self.target[mem, self.idx]
        ruled = self.ruled_out[mem, self.idx]  # (b, S)
        stale = (target < 0) | ruled[self.idx, np.maximum(target, 0)]
        if stale.any():  # a new frontier target: the nearest cell not ruled out (random ties)
            cost = (
                self.dist[obs[stale]]
                + 1000 * ruled[stale]
                + self.rng.random((int(stale.sum()), ruled.shape[1]))
            )
            target = target.copy()
            target[stale] = cost.argmin(-1)
            self.target[mem[stale], self.idx[stale]] = target[stale]
        return toward(obs, np.where(known >= 0, known, target), self.spec.size)


def improvement(h: Histories, frac: float = 0.1) -> dict:
    """Mean return of the first vs the last ``frac`` of episodes, normalised by the optimal return."""
    spec = EnvSpec(h.env, h.env_kwargs)
    opt = spec.optimal_return(h.tasks)[:, None]
    k = max(1, int(round(frac * h.returns.shape[1])))
    first, last = (h.returns[:, :k] / opt).mean(), (h.returns[:, -k:] / opt).mean()
    return {"first": float(first), "last": float(last), "improves": bool(last > first)}


def window_improvement(h: Histories, episodes: int) -> float:
    """Mean gain in normalised return from the first to the last episode of every window of ``episodes``
    consecutive episodes: how much policy improvement one AD context shows. AD can only distil an improvement
    operator it can see inside its context; Q-learning histories of 60 Dark Room episodes gain ~0.01-0.03 per
    3-episode window, which the model reads as noise."""
    e = h.returns.shape[1]
    if episodes < 2 or e < episodes:
        return 0.0
    r = h.returns / EnvSpec(h.env, h.env_kwargs).optimal_return(h.tasks)[:, None]
    return float((r[:, episodes - 1 :] - r[:, : e - episodes + 1]).mean())


def generate(spec: EnvSpec, cfg: DataConfig, progress=None) -> tuple[Histories, dict]:
    """Histories on the seeded training split; returns them and a summary (transitions, improvement)."""
    train, _ = spec.split(cfg.n_train_tasks, cfg.n_test_tasks, seed=cfg.split_seed)
    h = learning_histories(spec, train, cfg, progress)
    return h, {"transitions": h.total_transitions, "histories": h.num_histories, **improvement(h)}
