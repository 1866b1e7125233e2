"""The MLX engine of the chat (`llamba.chat.Engine` over the MLX twin) and the choice of backend for a model path.

The chat itself (session, prompt rendering, text stream) is backend-neutral and lives in llamba/chat.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from llamba.chat import TorchEngine
from llamba.checkpoints import CheckpointError
from llamba.export.convert import ExportError
from llamba.generate import SamplingParams

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
MLX_INSTALL = "pip install 'mlx-lm[cpu]' (Linux) or pip install mlx-lm (macOS), or pip install -e '.[mlx]'"


def require_mlx() -> None:
    """Raise a one-line ExportError with the install command when mlx / mlx-lm cannot be imported."""
    try:
        import mlx.core  # noqa: F401
        import mlx_lm  # noqa: F401
    except ImportError as e:
        raise ExportError(f"MLX is not installed ({e.name or e}); install it with: {MLX_INSTALL}") from None


def check_export_config(file: Path) -> None:
    """Range-check the Llamba fields of an exported config.json (as `llamba.checkpoints.read_config` does for
    checkpoints): a corrupt value must not reach the MLX allocator."""
    from llamba.config import BOOL_FIELDS, INT_RANGES, ConfigError, LlambaConfig

    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return  # the loader names the problem
    if not isinstance(raw, dict):
        raise ExportError(f"{file} holds a JSON {type(raw).__name__}, not an object of config fields")
    names = (*INT_RANGES, *BOOL_FIELDS, "norm_eps", "activation", "hidden_act")
    try:
        LlambaConfig(**{k: raw[k] for k in names if k in raw})
    except ConfigError as e:
        raise ExportError(f"{file}: {e}") from None


class MlxEngine:
    name = "mlx"

    def __init__(self, path: str | Path):
        require_mlx()
        from llamba.export import mlx_generate

        path = Path(path)
        check_export_config(path / "config.json")
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise ExportError(
                f"{path} has no tokenizer ({' / '.join(TOKENIZER_FILES)}): an interrupted export? "
                "Delete it and re-run `llamba export mlx`"
            )
        self._gen = mlx_generate
        self.model, self.tokenizer = mlx_generate.load(path)

    def new_state(self):
        return self._gen.MlxState.alloc(self.model)

    def stream(self, ids: list[int], state, params: SamplingParams) -> Iterator[int]:
        return self._gen.stream_generate(self.model, ids, params, state)

    def reset_peak_memory(self) -> None:
        import mlx.core as mx

        mx.reset_peak_memory()

    def peak_memory(self) -> int:
        import mlx.core as mx

        return mx.get_peak_memory()


def open_engine(path: str | Path, backend: str = "auto"):
    """backend 'auto' picks MLX for an exported directory (config.json names a model_file), else PyTorch."""
    path = Path(path)
    if not path.exists():
        raise ExportError(
            f"--model {path} does not exist; point it at an exported MLX directory or a Llamba checkpoint"
        )
    if not path.is_dir():
        raise ExportError(f"--model {path} is a file; point it at the directory holding config.json")
    if not (path / "config.json").is_file():
        stages = sorted(path.glob("stage[123]/config.json"))
        hint = f" (a distillation run? try --model {stages[-1].parent})" if stages else ""
        raise ExportError(
            f"{path} has no config.json; point --model at an exported MLX directory or a "
            f"Llamba checkpoint{hint}"
        )
    if backend == "auto":
        try:
            raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ExportError(
                f"{path / 'config.json'} is not valid JSON ({getattr(e, 'msg', 'not UTF-8')})"
            ) from None
        exported = isinstance(raw, dict) and "model_file" in raw
        backend = "mlx" if exported else "torch"
    if backend == "mlx":
        return MlxEngine(path)
    try:
        return TorchEngine(path)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
