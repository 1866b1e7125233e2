"""The inference seam: a multi-turn chat over any engine that streams token ids from a recurrent state.

    Engine       the protocol a backend implements (`TorchEngine` here; the MLX twin's `MlxEngine` in export/chat.py)
    ChatSession  a conversation whose whole context lives in one recurrent state
    TextStream   token ids -> printable text increments
    prompt_ids   a conversation -> prompt ids through the tokenizer's chat template, the assistant turn opened

Each turn renders the whole conversation with the chat template and feeds only the part the state has not read
(`llamba.generate.incremental_ids`); when the template rewrites history, it re-prefills once. Sampling itself is
`llamba.generate` (torch) and `llamba.export.mlx_generate` (MLX, the same `SamplingParams`).
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from llamba.errors import UsageError
from llamba.generate import SamplingParams, chat_stop_ids, incremental_ids


class Engine(Protocol):
    """What a chat needs from a backend: a tokenizer, a fresh state, and a token stream that advances the state."""

    name: str
    tokenizer: object

    def new_state(self): ...

    def stream(self, ids: list[int], state, params: SamplingParams) -> Iterator[int]:
        """Feed `ids` into `state`, then yield sampled ids until a stop id (yielded) or the token limit."""
        ...

    def reset_peak_memory(self) -> None: ...

    def peak_memory(self) -> int: ...


class TorchEngine:
    """A Llamba checkpoint (config.json + weights) in PyTorch, with its tokenizer (else the embedded teacher's)."""

    name = "torch"

    def __init__(self, path: str | Path):
        from llamba.checkpoints import load_model, load_tokenizer

        self.model = load_model(path)
        self.tokenizer = load_tokenizer(Path(path))

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


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The conversation so far plus the assistant header, through the chat template: what the model answers from."""
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError("the tokenizer has no chat template; use `llamba generate --raw`")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def prompt_messages(prompt: str, system: str | None = None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


class ChatSession:
    """A conversation whose context lives in one recurrent state. `send` streams the answer's token ids."""

    def __init__(self, engine: Engine, params: SamplingParams, system: str | None = None):
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
        full = prompt_ids(self.tokenizer, self.messages)
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
