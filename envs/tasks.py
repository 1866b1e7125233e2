"""Task splits and a small registry of env specs (name -> constructors, sizes, optimal returns)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llamba.envs.batched import BatchedDarkRoom, BatchedKeyToDoor
from llamba.envs.darkroom import DarkRoom, darkroom_optimal_return
from llamba.envs.grid import NUM_ACTIONS, to_cell
from llamba.envs.keytodoor import KeyToDoor, keytodoor_optimal_return


def darkroom_split(n_train: int, n_test: int, seed: int = 0, size: int = 9) -> tuple[np.ndarray, np.ndarray]:
    """Seeded permutation of the size^2 - 1 non-centre goals -> train (n_train,), test (n_test,), disjoint.
    Smaller n_train with the same seed gives a prefix of the larger train set."""
    centre = (size // 2) * size + size // 2
    goals = np.array([c for c in range(size * size) if c != centre])
    if n_train + n_test > len(goals):
        raise ValueError(f"Dark Room {size}x{size} has {len(goals)} goals; asked for {n_train} + {n_test}")
    perm = np.random.default_rng(seed).permutation(goals)
    return perm[n_test : n_test + n_train].copy(), perm[:n_test].copy()


def keytodoor_split(n_train: int, n_test: int, seed: int = 0, size: int = 9) -> tuple[np.ndarray, np.ndarray]:
    """Seeded permutation of all ordered (key, door) pairs with key != door -> train (n_train, 2), test
    (n_test, 2), disjoint; smaller n_train with the same seed gives a prefix of the larger one."""
    n = size * size
    pairs = np.array([(k, d) for k in range(n) for d in range(n) if k != d])
    if n_train + n_test > len(pairs):
        raise ValueError(f"Key-to-Door {size}x{size} has {len(pairs)} tasks; asked for {n_train} + {n_test}")
    perm = pairs[np.random.default_rng(seed).permutation(len(pairs))]
    return perm[n_test : n_test + n_train].copy(), perm[:n_test].copy()


@dataclass
class EnvSpec:
    """Everything the lab needs to know about one env family; ``kwargs`` are the env options."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.name not in ("darkroom", "keytodoor"):
            raise ValueError(f"unknown env {self.name!r}; choose darkroom or keytodoor")
        allowed = {
            "darkroom": {"size", "horizon", "reward", "terminate_on_goal"},
            "keytodoor": {"size", "horizon", "terminate_at_door"},
        }[self.name]
        bad = set(self.kwargs) - allowed
        if bad:
            raise ValueError(f"unknown {self.name} option(s) {sorted(bad)}; allowed: {sorted(allowed)}")
        defaults = {"darkroom": {"size": 9, "horizon": 20}, "keytodoor": {"size": 9, "horizon": 50}}[
            self.name
        ]
        self.kwargs = {**defaults, **self.kwargs}

    @property
    def size(self) -> int:
        return self.kwargs["size"]

    @property
    def horizon(self) -> int:
        return self.kwargs["horizon"]

    @property
    def num_states(self) -> int:
        return self.size * self.size

    num_actions = NUM_ACTIONS
    num_rewards = 2  # per-step rewards are 0 or 1 in both envs

    def split(self, n_train: int, n_test: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        fn = darkroom_split if self.name == "darkroom" else keytodoor_split
        return fn(n_train, n_test, seed=seed, size=self.size)

    def batched(self, tasks: np.ndarray):
        cls = BatchedDarkRoom if self.name == "darkroom" else BatchedKeyToDoor
        return cls(tasks, **self.kwargs)

    def make(self, task):
        """One gymnasium env for one task."""
        if self.name == "darkroom":
            return DarkRoom(goal=int(task), **self.kwargs)
        return KeyToDoor(key=int(task[0]), door=int(task[1]), **self.kwargs)

    def optimal_return(self, tasks: np.ndarray) -> np.ndarray:
        """(b,) or (b, 2) tasks -> (b,) optimal (expected, for random starts) episode return."""
        if self.name == "darkroom":
            return darkroom_optimal_return(tasks, **self.kwargs)
        kw = {k: v for k, v in self.kwargs.items() if k != "terminate_at_door"}
        return keytodoor_optimal_return(tasks, **kw)


def optimal_return(env: str, task, **kwargs) -> float:
    """Optimal return of one task: a goal (cell or (row, col)) or a (key, door) pair of cells."""
    spec = EnvSpec(env, kwargs)
    task = to_cell(task, spec.size) if env == "darkroom" else [to_cell(c, spec.size) for c in task]
    return float(spec.optimal_return(np.asarray([task]))[0])
