"""`--device`: the one place a device string becomes a torch.device, with a one-line error for a device this
machine does not have."""

from __future__ import annotations

import re

from llamba.errors import LlambaError

DEVICE_SPEC = re.compile(r"^(auto|cpu|cuda|mps)(?::(\d+))?$")
HINT = "use auto, cpu, cuda, cuda:N or mps"


class DeviceError(LlambaError, ValueError):
    """A --device this machine cannot provide."""


def resolve_device(spec: str = "auto"):
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps' -> torch.device, checked against this machine.

    auto picks CUDA when a GPU is visible, else the CPU (never MPS: not every op runs there)."""
    import torch

    m = DEVICE_SPEC.match(str(spec).strip().lower())
    if m is None or (m.group(2) is not None and m.group(1) in ("auto", "cpu", "mps")):
        raise DeviceError(f"--device {spec!r} is not a device; {HINT}")
    kind, index = m.group(1), None if m.group(2) is None else int(m.group(2))
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise DeviceError(
                f"--device {spec}: MPS is not available here (it needs macOS on Apple silicon and a "
                "PyTorch built with MPS); use --device cpu"
            )
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"--device {spec}: this machine has no usable CUDA GPU (torch.cuda.is_available() is "
            "False); use --device cpu or auto"
        )
    count = torch.cuda.device_count()
    if index is not None and index >= count:
        raise DeviceError(
            f"--device {spec}: this machine has {count} CUDA GPU{'s' * (count != 1)} "
            f"(cuda:0 ... cuda:{count - 1}); pick one of them"
        )
    return torch.device("cuda", index) if index is not None else torch.device("cuda")
