"""torch.compile with an eager fallback: `compiled(fn, what)` runs fn through inductor; if compiling fails (no C++
compiler on this machine, an unsupported platform, an inductor bug) it warns once, naming `what`, and runs fn eagerly
from then on. Compile errors surface at the first call of each new input shape, so every call is guarded.

Used by the distillation stages (`--compile`: each stage-2 block, the stage-3 student forward) and the scan
(`llamba.ops.use_compile`)."""

from __future__ import annotations

import warnings
from collections.abc import Callable


def compiled(fn: Callable, what: str, **options) -> Callable:
    """fn through torch.compile(fn, **options), falling back to fn for good after the first failure."""
    import torch

    def fall_back(e: Exception) -> None:
        state["fn"] = fn
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        warnings.warn(
            f"torch.compile of {what} failed ({type(e).__name__}: {first[:200]}); running it eagerly",
            stacklevel=3,
        )

    state = {"fn": fn}
    try:
        state["fn"] = torch.compile(fn, **options)
    except Exception as e:
        fall_back(e)

    def call(*args, **kwargs):
        if state["fn"] is not fn:
            try:
                return state["fn"](*args, **kwargs)
            except Exception as e:  # dynamo / inductor / the C++ compiler; a real error recurs below, eagerly
                fall_back(e)
        return fn(*args, **kwargs)

    call.eager = fn
    return call
