"""gymnasium VectorEnvs over the batched NumPy twins (`gymnasium.make_vec(id, num_envs)`'s vector_entry_point).

Autoreset is gymnasium's default NEXT_STEP: the step after an env's episode ends restarts it (reward 0, the
action ignored). Tasks are fixed per env (``tasks=``) or drawn from the vector env's seed at every restart.
"""

from __future__ import annotations

import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from llamba.envs.grid import NUM_ACTIONS


class GridVectorEnv(VectorEnv):
    family_name = ""

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP, "render_modes": []}

    def __init__(self, num_envs: int = 1, tasks=None, max_episode_steps: int | None = None, **options):
        from llamba.envs.tasks import EnvSpec

        if options.get("horizon") is None and max_episode_steps is not None:
            # the env's horizon is the time limit (no TimeLimit wrapper)
            options["horizon"] = max_episode_steps
        self.env_spec = EnvSpec(self.family_name, options)
        self.num_envs = num_envs
        self.fixed_tasks = None if tasks is None else np.asarray(tasks, dtype=np.int64)
        if self.fixed_tasks is not None and len(self.fixed_tasks) != num_envs:
            raise ValueError(f"tasks has {len(self.fixed_tasks)} rows for num_envs={num_envs}")
        self.single_observation_space = spaces.Discrete(self.env_spec.num_states)
        self.single_action_space = spaces.Discrete(NUM_ACTIONS)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.twin = None
        self._autoreset = np.zeros(num_envs, dtype=bool)

    def _tasks(self, k: int):
        if self.fixed_tasks is not None:
            return None
        return self.env_spec.family.draw_tasks(self.np_random, k, self.env_spec.size)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        tasks = self.fixed_tasks if self.fixed_tasks is not None else self._tasks(self.num_envs)
        self.twin = self.env_spec.batched(tasks)
        obs = self.twin.reset(self.np_random)
        self._autoreset[:] = False
        return obs, {}

    def step(self, actions):
        """actions: (num_envs,) -> obs, rewards, terminations, truncations (num_envs,), infos {}."""
        if self.twin is None:
            raise RuntimeError("call reset() before step()")
        actions = np.asarray(actions, dtype=np.int64)
        restart = self._autoreset.copy()
        obs, rewards, terminated, truncated = self.twin.step(actions)  # finished envs stay frozen
        if restart.any():
            obs = self.twin.reset_rows(restart, self.np_random, self._tasks(int(restart.sum())))
            rewards = np.where(restart, 0.0, rewards)
            terminated, truncated = terminated & ~restart, truncated & ~restart
        self._autoreset = terminated | truncated
        return obs, rewards, terminated, truncated, {}


class DarkRoomVectorEnv(GridVectorEnv):
    family_name = "darkroom"


class KeyToDoorVectorEnv(GridVectorEnv):
    family_name = "keytodoor"
