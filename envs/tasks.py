"""Task splits and the registry of env families: one `EnvFamily` record per env (constructors, batched twin,
gymnasium id, options, splits, optimal returns), so adding an env is one `register_family` call."""

from __future__ import annotations

from collections.abc import Callable
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


def _draw_goals(rng: np.random.Generator, k: int, size: int) -> np.ndarray:
    """k uniform non-centre Dark Room goals, as DarkRoom(goal=None) draws them."""
    centre = (size // 2) * size + size // 2
    draw = rng.integers(0, size * size - 1, size=k)
    return draw + (draw >= centre)


def _draw_pairs(rng: np.random.Generator, k: int, size: int) -> np.ndarray:
    """k uniform (key, door) pairs with key != door."""
    n = size * size
    key = rng.integers(0, n, size=k)
    door = rng.integers(0, n - 1, size=k)
    return np.stack([key, door + (door >= key)], axis=1)


@dataclass(frozen=True)
class EnvFamily:
    """Everything the lab and gymnasium need to know about one env family."""

    name: str  # EnvSpec name, e.g. "darkroom"
    gym_id: str  # namespaced gymnasium id
    env: type  # gymnasium env class; env(**task_kwargs(task), **options)
    batched: type  # batched NumPy twin; batched(tasks, **options)
    vector: str  # "module:Class" of the gymnasium VectorEnv (gymnasium.make_vec)
    defaults: dict[str, Any]  # option defaults (size and horizon at least)
    options: frozenset[str]  # every option the env takes
    split: Callable  # (n_train, n_test, seed=, size=) -> (train tasks, test tasks)
    optimal: Callable  # (tasks, **optimal options) -> (b,) optimal returns
    optimal_options: frozenset[str]  # the options `optimal` takes
    task_kwargs: Callable[[Any], dict]  # one task -> env constructor kwargs
    parse_task: Callable[[Any, int], Any]  # user task (cells or (row, col)) and size -> canonical task
    draw_tasks: Callable[[np.random.Generator, int, int], np.ndarray]  # (rng, k, size) -> k random tasks
    subgoals: int  # rewarded cells of a task, reached in order (goal: 1; key, then door: 2)
    ends_early: (
        str  # the option that ends an episode at its last subgoal (else every episode runs the horizon)
    )


FAMILIES: dict[str, EnvFamily] = {}


def register_family(family: EnvFamily) -> None:
    FAMILIES[family.name] = family


register_family(
    EnvFamily(
        name="darkroom",
        gym_id="llamba/DarkRoom-v0",
        env=DarkRoom,
        batched=BatchedDarkRoom,
        vector="llamba.envs.vector:DarkRoomVectorEnv",
        defaults={"size": 9, "horizon": 20},
        options=frozenset({"size", "horizon", "reward", "terminate_on_goal"}),
        split=darkroom_split,
        optimal=darkroom_optimal_return,
        optimal_options=frozenset({"size", "horizon", "reward", "terminate_on_goal"}),
        task_kwargs=lambda task: {"goal": int(task)},
        parse_task=to_cell,
        draw_tasks=_draw_goals,
        subgoals=1,
        ends_early="terminate_on_goal",
    )
)
register_family(
    EnvFamily(
        name="keytodoor",
        gym_id="llamba/KeyToDoor-v0",
        env=KeyToDoor,
        batched=BatchedKeyToDoor,
        vector="llamba.envs.vector:KeyToDoorVectorEnv",
        defaults={"size": 9, "horizon": 50},
        options=frozenset({"size", "horizon", "terminate_at_door"}),
        split=keytodoor_split,
        optimal=keytodoor_optimal_return,
        optimal_options=frozenset({"size", "horizon"}),
        task_kwargs=lambda task: {"key": int(task[0]), "door": int(task[1])},
        parse_task=lambda task, size: [to_cell(c, size) for c in task],
        draw_tasks=_draw_pairs,
        subgoals=2,
        ends_early="terminate_at_door",
    )
)


def family(name: str) -> EnvFamily:
    if name not in FAMILIES:
        raise ValueError(f"unknown env {name!r}; choose {' or '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def register_envs() -> None:
    """Register every family with gymnasium (idempotent): `gym.make("llamba.envs:llamba/DarkRoom-v0")` imports
    this package and registers; the pyproject entry point (group "gymnasium.envs") names this function too."""
    import gymnasium as gym

    for fam in FAMILIES.values():
        if fam.gym_id not in gym.registry:
            gym.register(
                id=fam.gym_id,
                entry_point=fam.env,
                vector_entry_point=fam.vector,
                max_episode_steps=fam.defaults["horizon"],
            )


@dataclass
class EnvSpec:
    """One env family with its options; ``kwargs`` are the env options (defaults filled in)."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        fam = family(self.name)
        bad = set(self.kwargs) - fam.options
        if bad:
            raise ValueError(f"unknown {self.name} option(s) {sorted(bad)}; allowed: {sorted(fam.options)}")
        self.kwargs = {**fam.defaults, **self.kwargs}

    @property
    def family(self) -> EnvFamily:
        return FAMILIES[self.name]

    @property
    def size(self) -> int:
        return self.kwargs["size"]

    @property
    def subgoals(self) -> int:
        return self.family.subgoals

    @property
    def fixed_length(self) -> bool:
        """Every episode runs `horizon` steps (none ends at its last subgoal)."""
        return not self.kwargs.get(self.family.ends_early)

    @property
    def horizon(self) -> int:
        return self.kwargs["horizon"]

    @property
    def num_states(self) -> int:
        return self.size * self.size

    num_actions = NUM_ACTIONS
    num_rewards = 2  # per-step rewards are 0 or 1 in both envs

    def split(self, n_train: int, n_test: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        return self.family.split(n_train, n_test, seed=seed, size=self.size)

    def batched(self, tasks: np.ndarray):
        return self.family.batched(tasks, **self.kwargs)

    def make(self, task, render_mode: str | None = None):
        """One gymnasium env for one task."""
        return self.family.env(**self.family.task_kwargs(task), **self.kwargs, render_mode=render_mode)

    def optimal_return(self, tasks: np.ndarray) -> np.ndarray:
        """(b,) or (b, 2) tasks -> (b,) optimal (expected, for random starts) episode return."""
        fam = self.family
        return fam.optimal(tasks, **{k: v for k, v in self.kwargs.items() if k in fam.optimal_options})


def optimal_return(env: str, task, **kwargs) -> float:
    """Optimal return of one task: a goal (cell or (row, col)) or a (key, door) pair of cells."""
    spec = EnvSpec(env, kwargs)
    task = spec.family.parse_task(task, spec.size)
    return float(spec.optimal_return(np.asarray([task]))[0])
