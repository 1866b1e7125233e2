"""Multi-turn chat over either backend, carrying the context in the recurrent state.

Each turn renders the whole conversation with the tokenizer's chat template and feeds only the part the state
has not read (`llamba.generate.incremental_ids`); when the template rewrites history, it re-prefills once.
"""

from __future__ import annotations

import json
import resource
import sys
from collections.abc import Iterator
from pathlib import Path

from llamba.export.convert import ExportError, load_tokenizer
from llamba.generate import SamplingParams, chat_stop_ids, incremental_ids

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


class TorchEngine:
    name = "torch"

    def __init__(self, path: str | Path):
        from llamba.checkpoints import CheckpointError, load_model

        try:
            self.model = load_model(path)
        except CheckpointError as e:
            raise ExportError(str(e)) from None
        self.tokenizer = load_tokenizer(None, Path(path))

    def new_state(self):
        return self.model.alloc_state(1)

    def stream(self, ids: list[int], state, params: SamplingParams) -> Iterator[int]:
        from llamba.generate import stream_generate

        return stream_generate(self.model, ids, params, state)

    def reset_peak_memory(self) -> None:  # the process high-water mark cannot be reset
        pass

    def peak_memory(self) -> int:
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


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
    return MlxEngine(path) if backend == "mlx" else TorchEngine(path)


def render(tokenizer, messages: list[dict]) -> list[int]:
    """messages -> prompt ids of the chat template with the assistant turn opened."""
    if not tokenizer.chat_template:
        raise ExportError("the tokenizer has no chat template; use `llamba generate --raw`")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def prompt_messages(prompt: str, system: str | None = None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


class ChatSession:
    """A conversation whose context lives in one recurrent state. `send` streams the answer's token ids."""

    def __init__(self, engine, params: SamplingParams, system: str | None = None):
        self.engine, self.tokenizer, self.system = engine, engine.tokenizer, system
        self.params = params.with_overrides(
            stop_token_ids=params.stop_token_ids or chat_stop_ids(self.tokenizer)
        )
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.state = self.engine.new_state()
        self.fed: list[int] = []  # ids the state has read
        self.prefilled = 0  # tokens fed for the last turn's prompt

    def send(self, text: str) -> Iterator[int]:
        self.messages.append({"role": "user", "content": text})
        full = render(self.tokenizer, self.messages)
        suffix = incremental_ids(self.fed, full)
        if suffix is None:  # the template re-wrote earlier turns: start over from the full conversation
            self.state, self.fed, suffix = self.engine.new_state(), [], full
        self.prefilled = len(suffix)
        answer: list[int] = []
        for tok in self.engine.stream(suffix, self.state, self.params):
            answer.append(tok)
            yield tok
        self.fed = full + answer
        content = [t for t in answer if t not in self.params.stop_token_ids]
        self.messages.append(
            {"role": "assistant", "content": self.tokenizer.decode(content, skip_special_tokens=True)}
        )


class TextStream:
    """Token ids -> printable text increments (holds back incomplete multi-byte characters)."""

    def __init__(self, tokenizer, skip: tuple[int, ...] = ()):
        self.tokenizer, self.skip, self.ids, self.printed = tokenizer, set(skip), [], ""

    def push(self, tok: int) -> str:
        if tok in self.skip:
            return ""
        self.ids.append(tok)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        new, self.printed = text[len(self.printed) :], text
        return new
