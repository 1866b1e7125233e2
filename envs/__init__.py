"""Dark Room and Key-to-Door: gymnasium envs, batched NumPy twins, task splits, optimal returns.

Importing the package registers ``DarkRoom-v0`` and ``KeyToDoor-v0`` with gymnasium.
"""

import gymnasium as gym

from llamba.envs.batched import BatchedDarkRoom, BatchedKeyToDoor
from llamba.envs.darkroom import DarkRoom, darkroom_optimal_return
from llamba.envs.keytodoor import KeyToDoor, keytodoor_optimal_return
from llamba.envs.tasks import EnvSpec, darkroom_split, keytodoor_split, optimal_return

for _id, _entry in (("DarkRoom-v0", "llamba.envs.darkroom:DarkRoom"), ("KeyToDoor-v0", "llamba.envs.keytodoor:KeyToDoor")):
    if _id not in gym.registry:
        gym.register(id=_id, entry_point=_entry)

__all__ = [
    "BatchedDarkRoom",
    "BatchedKeyToDoor",
    "DarkRoom",
    "EnvSpec",
    "KeyToDoor",
    "darkroom_optimal_return",
    "darkroom_split",
    "keytodoor_optimal_return",
    "keytodoor_split",
    "optimal_return",
]
