"""Dark Room (Laskin et al. 2022): find an invisible goal; the agent only sees its own cell."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from llamba.envs.grid import NUM_ACTIONS, manhattan, move, render_ansi, to_cell

REWARD_MODES = ("repeat", "once")


class DarkRoom(gym.Env):
    """size x size grid, start at the centre, +1 on every step spent on the goal (``reward="repeat"``)
    or only the first time (``"once"``); ``terminate_on_goal`` ends the episode on reaching it.
    The episode is truncated after ``horizon`` steps. ``goal=None`` draws a non-centre goal on every reset.
    ``reset(options={"start": cell})`` overrides the start cell (used by equivalence tests).
    ``render_mode="ansi"``: ``render()`` returns the grid as text (A agent, G goal)."""

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(
        self,
        goal=None,
        size: int = 9,
        horizon: int = 20,
        reward: str = "repeat",
        terminate_on_goal: bool = False,
        render_mode: str | None = None,
    ):
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ValueError(
                f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}"
            )
        self.render_mode = render_mode
        if reward not in REWARD_MODES:
            raise ValueError(f"reward must be one of {REWARD_MODES}, got {reward!r}")
        if size < 2 or horizon < 1:
            raise ValueError("size must be >= 2 and horizon >= 1")
        self.size, self.horizon, self.reward_mode = size, horizon, reward
        self.terminate_on_goal = terminate_on_goal
        self.fixed_goal = None if goal is None else to_cell(goal, size)
        self.centre = (size // 2) * size + size // 2
        self.observation_space = spaces.Discrete(size * size)
        self.action_space = spaces.Discrete(NUM_ACTIONS)
        self.goal = self.fixed_goal if self.fixed_goal is not None else 0
        self.pos, self.t, self.reached = self.centre, 0, False

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if self.fixed_goal is None:
            cells = [c for c in range(self.size * self.size) if c != self.centre]
            self.goal = int(self.np_random.choice(cells))
        self.pos = to_cell(options["start"], self.size) if options and "start" in options else self.centre
        self.t, self.reached = 0, False
        return int(self.pos), {"goal": self.goal}

    def step(self, action):
        if not self.action_space.contains(action):
            raise ValueError(f"invalid action {action!r}")
        self.pos = int(move(np.array([self.pos]), np.array([action]), self.size)[0])
        self.t += 1
        on_goal = self.pos == self.goal
        reward = float(on_goal and (self.reward_mode == "repeat" or not self.reached))
        self.reached = self.reached or on_goal
        terminated = bool(on_goal and self.terminate_on_goal)
        truncated = self.t >= self.horizon and not terminated
        return int(self.pos), reward, terminated, truncated, {"goal": self.goal}

    def render(self) -> str | None:
        if self.render_mode == "ansi":
            return render_ansi(self.size, self.pos, {self.goal: "G"})
        return None


def darkroom_optimal_return(
    goals, size: int = 9, horizon: int = 20, reward: str = "repeat", terminate_on_goal: bool = False
) -> np.ndarray:
    """Closed form (docs/equations.md §R1): with repeated reward and no termination, 21 - d for d >= 1, 20 for d = 0
    (generally horizon - d + 1, capped at horizon); otherwise 1 if the goal is reachable in time."""
    centre = (size // 2) * size + size // 2
    d = manhattan(np.asarray(goals), centre, size)
    if reward == "repeat" and not terminate_on_goal:
        return np.clip(horizon - np.maximum(d, 1) + 1, 0, horizon).astype(np.float64)
    return (np.maximum(d, 1) <= horizon).astype(np.float64)
