"""llamba: Llama -> Llamba (discrete Mamba-2) distillation, on-device inference, in-context RL.

The model package: config, scan ops, mixer, model, recurrent state, generation, checkpoints.
"""

from llamba.cache import LlambaState
from llamba.checkpoints import CheckpointError, atomic_save, load_model, register_auto_classes
from llamba.config import ConfigError, LlambaConfig
from llamba.generate import SamplingParams, generate, stream_generate
from llamba.model import LlambaForCausalLM

register_auto_classes()

__all__ = [
    "CheckpointError",
    "ConfigError",
    "LlambaConfig",
    "LlambaForCausalLM",
    "LlambaState",
    "SamplingParams",
    "atomic_save",
    "generate",
    "load_model",
    "register_auto_classes",
    "stream_generate",
]
