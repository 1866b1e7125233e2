"""Dark Room and Key-to-Door: gymnasium envs, batched NumPy twins and VectorEnvs, task splits, optimal returns.

Importing the package registers ``llamba/DarkRoom-v0`` and ``llamba/KeyToDoor-v0`` with gymnasium (render mode
"ansi", max_episode_steps = the default horizon: pass ``max_episode_steps`` with a longer ``horizon``;
`gymnasium.make_vec` uses the batched twins);
``gym.make("llamba.envs:llamba/DarkRoom-v0")`` does the import itself.
"""

from llamba.envs.batched import BatchedDarkRoom, BatchedKeyToDoor
from llamba.envs.darkroom import DarkRoom, darkroom_optimal_return
from llamba.envs.keytodoor import KeyToDoor, keytodoor_optimal_return
from llamba.envs.tasks import (
    FAMILIES,
    EnvFamily,
    EnvSpec,
    darkroom_split,
    keytodoor_split,
    optimal_return,
    register_envs,
    register_family,
)

register_envs()

__all__ = [
    "FAMILIES",
    "BatchedDarkRoom",
    "BatchedKeyToDoor",
    "DarkRoom",
    "EnvFamily",
    "EnvSpec",
    "KeyToDoor",
    "darkroom_optimal_return",
    "darkroom_split",
    "keytodoor_optimal_return",
    "keytodoor_split",
    "optimal_return",
    "register_envs",
    "register_family",
]
