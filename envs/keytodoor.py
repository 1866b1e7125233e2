"""Dark Key-to-Door (Laskin et al. 2022): pick up an invisible key, then reach an invisible door."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from llamba.envs.grid import NUM_ACTIONS, manhattan, move, render_ansi, to_cell


class KeyToDoor(gym.Env):
    """size x size grid, random start (never on the key), +1 on first reaching the key, +1 on reaching the door
    after the key; the episode ends at the door (``terminate_at_door``) or is truncated after ``horizon`` steps.
    ``key=None`` / ``door=None`` draw a distinct (key, door) pair on every reset.
    ``render_mode="ansi"``: ``render()`` returns the grid as text (A agent, K key until picked up, D door)."""

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(
        self,
        key=None,
        door=None,
        size: int = 9,
        horizon: int = 50,
        terminate_at_door: bool = True,
        render_mode: str | None = None,
    ):
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ValueError(
                f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}"
            )
        self.render_mode = render_mode
        if (key is None) != (door is None):
            raise ValueError("pass both key= and door=, or neither")
        if size < 2 or horizon < 1:
            raise ValueError("size must be >= 2 and horizon >= 1")
        self.size, self.horizon, self.terminate_at_door = size, horizon, terminate_at_door
        self.fixed = None
        if key is not None:
            self.fixed = (to_cell(key, size), to_cell(door, size))
            if self.fixed[0] == self.fixed[1]:
                raise ValueError("key and door must be different cells")
        self.observation_space = spaces.Discrete(size * size)
        self.action_space = spaces.Discrete(NUM_ACTIONS)
        self.key, self.door = self.fixed if self.fixed else (0, 1)
        self.pos, self.t, self.has_key = 0, 0, False

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        n = self.size * self.size
        if self.fixed is None:
            self.key, self.door = (int(c) for c in self.np_random.choice(n, size=2, replace=False))
        if options and "start" in options:
            self.pos = to_cell(options["start"], self.size)
        else:
            self.pos = int(self.np_random.choice([c for c in range(n) if c != self.key]))
        self.t, self.has_key = 0, False
        return int(self.pos), {"key": self.key, "door": self.door}

    def step(self, action):
        if not self.action_space.contains(action):
            raise ValueError(f"invalid action {action!r}")
        self.pos = int(move(np.array([self.pos]), np.array([action]), self.size)[0])
        self.t += 1
        reward, terminated = 0.0, False
        if not self.has_key and self.pos == self.key:
            reward, self.has_key = 1.0, True
        elif self.has_key and self.pos == self.door:
            reward, terminated = 1.0, self.terminate_at_door
        truncated = self.t >= self.horizon and not terminated
        return int(self.pos), reward, terminated, truncated, {"key": self.key, "door": self.door}

    def render(self) -> str | None:
        if self.render_mode == "ansi":
            marks = {self.door: "D"} | ({} if self.has_key else {self.key: "K"})
            return render_ansi(self.size, self.pos, marks)
        return None


def keytodoor_optimal_return(tasks, size: int = 9, horizon: int = 50) -> np.ndarray:
    """Expected optimal return over the uniform random start (start != key), tasks: (b, 2) [key, door].
    The key counts if reachable within the horizon, the door if start->key->door fits too; for 9x9 and 50
    steps every path fits (<= 32 steps), so this is 2 (docs/equations.md §R2)."""
    tasks = np.asarray(tasks).reshape(-1, 2)
    cells = np.arange(size * size)
    out = np.empty(len(tasks))
    for i, (key, door) in enumerate(tasks):
        starts = cells[cells != key]
        to_key = manhattan(starts, key, size)
        total = to_key + manhattan(key, door, size)
        out[i] = np.mean((to_key <= horizon).astype(float) + (total <= horizon).astype(float))
    return out
