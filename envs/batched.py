"""Batched NumPy twins of the gymnasium envs: b tasks stepped at once, used for data generation and evaluation.

Every env keeps its own episode clock; ``step`` returns ``done`` per env and leaves finished envs frozen
(zero reward, ``done`` stays True) until ``reset``. Tests check step-for-step equality with the gym envs.
"""

from __future__ import annotations

import numpy as np

from llamba.envs.grid import move


class BatchedDarkRoom:
    """goals: (b,) cell indices."""

    def __init__(
        self, goals, size: int = 9, horizon: int = 20, reward: str = "repeat", terminate_on_goal: bool = False
    ):
        self.goals = np.asarray(goals, dtype=np.int64).reshape(-1)
        self.size, self.horizon, self.reward_mode = size, horizon, reward
        self.terminate_on_goal = terminate_on_goal
        self.centre = (size // 2) * size + size // 2
        self.b = len(self.goals)

    def reset(self, rng: np.random.Generator | None = None, start: np.ndarray | None = None) -> np.ndarray:
        """-> (b,) observations. Dark Room always starts at the centre unless ``start`` is given."""
        self.pos = np.full(self.b, self.centre, dtype=np.int64) if start is None else np.asarray(start).copy()
        self.t = np.zeros(self.b, dtype=np.int64)
        self.reached = np.zeros(self.b, dtype=bool)
        self.done = np.zeros(self.b, dtype=bool)
        return self.pos.copy()

    def reset_rows(self, rows: np.ndarray, rng: np.random.Generator | None = None, tasks=None) -> np.ndarray:
        """Restart the envs where rows (b,) is True, with new goals (k,) when given -> (b,) observations."""
        if tasks is not None:
            self.goals[rows] = np.asarray(tasks, dtype=np.int64).reshape(-1)
        self.pos[rows], self.t[rows], self.reached[rows], self.done[rows] = self.centre, 0, False, False
        return self.pos.copy()

    def step(self, actions: np.ndarray):
        """actions: (b,) -> obs (b,), reward (b,), terminated (b,), truncated (b,)."""
        active = ~self.done
        self.pos = np.where(active, move(self.pos, actions, self.size), self.pos)
        self.t += active
        on_goal = active & (self.pos == self.goals)
        give = on_goal if self.reward_mode == "repeat" else on_goal & ~self.reached
        self.reached |= on_goal
        terminated = on_goal & self.terminate_on_goal
        truncated = active & ~terminated & (self.t >= self.horizon)
        self.done |= terminated | truncated
        return self.pos.copy(), give.astype(np.float64), terminated, truncated


class BatchedKeyToDoor:
    """tasks: (b, 2) [key, door] cell indices."""

    def __init__(self, tasks, size: int = 9, horizon: int = 50, terminate_at_door: bool = True):
        tasks = np.asarray(tasks, dtype=np.int64).reshape(-1, 2)
        self.key, self.door = tasks[:, 0].copy(), tasks[:, 1].copy()
        self.size, self.horizon, self.terminate_at_door = size, horizon, terminate_at_door
        self.b = len(tasks)

    def reset(self, rng: np.random.Generator | None = None, start: np.ndarray | None = None) -> np.ndarray:
        """-> (b,) observations; the start is uniform over the cells other than the key."""
        if start is None:
            rng = rng if rng is not None else np.random.default_rng()
            n = self.size * self.size
            draw = rng.integers(0, n - 1, size=self.b)  # uniform over n - 1 cells, skipping the key
            start = draw + (draw >= self.key)
        self.pos = np.asarray(start, dtype=np.int64).copy()
        self.t = np.zeros(self.b, dtype=np.int64)
        self.has_key = np.zeros(self.b, dtype=bool)
        self.done = np.zeros(self.b, dtype=bool)
        return self.pos.copy()

    def reset_rows(self, rows: np.ndarray, rng: np.random.Generator | None = None, tasks=None) -> np.ndarray:
        """Restart the envs where rows (b,) is True (new random starts; new (k, 2) tasks when given)."""
        rng = rng if rng is not None else np.random.default_rng()
        if tasks is not None:
            tasks = np.asarray(tasks, dtype=np.int64).reshape(-1, 2)
            self.key[rows], self.door[rows] = tasks[:, 0], tasks[:, 1]
        draw = rng.integers(0, self.size * self.size - 1, size=int(rows.sum()))
        self.pos[rows] = draw + (draw >= self.key[rows])
        self.t[rows], self.has_key[rows], self.done[rows] = 0, False, False
        return self.pos.copy()

    def step(self, actions: np.ndarray):
        """actions: (b,) -> obs (b,), reward (b,), terminated (b,), truncated (b,)."""
        active = ~self.done
        self.pos = np.where(active, move(self.pos, actions, self.size), self.pos)
        self.t += active
        got_key = active & ~self.has_key & (self.pos == self.key)
        at_door = active & self.has_key & (self.pos == self.door)
        self.has_key |= got_key
        terminated = at_door & self.terminate_at_door
        truncated = active & ~terminated & (self.t >= self.horizon)
        self.done |= terminated | truncated
        return self.pos.copy(), (got_key | at_door).astype(np.float64), terminated, truncated
