"""llamba: Llama -> Llamba (discrete Mamba-2) distillation, on-device inference, in-context RL.

The model package: config, scan ops, mixer, model, recurrent state, generation, checkpoints.

Importing `llamba` is cheap: the names below load on first use (PEP 562), so `llamba --help` never imports
torch or transformers. The transformers Auto classes learn model_type "llamba" when `llamba.model` is imported,
and, through `_AutoRegistrar`, as soon as transformers' auto modules are imported after (or before)
`import llamba` - so `import llamba; AutoModelForCausalLM.from_pretrained(dir)` keeps working.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys

_EXPORTS = {
    "LlambaState": "llamba.cache",
    "CheckpointError": "llamba.checkpoints",
    "atomic_save": "llamba.checkpoints",
    "load_model": "llamba.checkpoints",
    "register_auto_classes": "llamba.checkpoints",
    "ConfigError": "llamba.config",
    "LlambaConfig": "llamba.config",
    "SamplingParams": "llamba.generate",
    "generate": "llamba.generate",
    "stream_generate": "llamba.generate",
    "LlambaForCausalLM": "llamba.model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'llamba' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


# transformers module whose registry must know "llamba" before it is consulted -> our module that registers.
# Each is imported only once its transformers module has finished loading: registering earlier (e.g. while
# transformers.modeling_utils is half-initialized and imports configuration_auto) is a circular import.
_AUTO_MODULES = {
    "transformers.models.auto.configuration_auto": "llamba.config",
    "transformers.models.auto.modeling_auto": "llamba.model",
}


class _AutoRegistrar(importlib.abc.MetaPathFinder):
    """A post-import hook: when one of `_AUTO_MODULES` finishes loading, import the llamba module that registers
    with it. Chosen over eager registration because that costs torch + transformers (seconds) on
    every `import llamba`; the hook costs nothing until transformers' Auto classes are imported anyway."""

    def find_spec(self, name, path, target=None):
        if name not in _AUTO_MODULES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_then_register(module):
            run(module)
            importlib.import_module(_AUTO_MODULES[name])

        spec.loader.exec_module = exec_then_register
        return spec


for _theirs, _ours in _AUTO_MODULES.items():
    if _theirs in sys.modules:
        importlib.import_module(_ours)
if not all(m in sys.modules for m in _AUTO_MODULES) and not any(
    isinstance(f, _AutoRegistrar) for f in sys.meta_path
):
    sys.meta_path.insert(0, _AutoRegistrar())
