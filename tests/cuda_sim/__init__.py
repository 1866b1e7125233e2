"""Test-only harness that runs the `kernels="cuda"` path of llamba on CPU, without a GPU.

mamba-ssm's real Triton kernels run under Triton's interpreter (TRITON_INTERPRET=1, set before triton is
imported) and causal-conv1d's real Python layer runs over `conv_ext`, a CPU stand-in for its compiled
`causal_conv1d_cuda` extension that performs the argument checks of csrc/causal_conv1d.cpp (1.7.0).
Nothing here is imported by the library.

`install()` applies, once per process:
- mamba_ssm imported as a bare namespace, so its `__init__` (which imports the compiled
  `selective_scan_cuda`) never runs; only the Triton submodules are used;
- the causal-conv1d source tree (unpacked sdist, `make setup` fetches it) on sys.path, over `conv_ext`;
- `torch.cuda.device(None)` and `torch.cuda.get_device_properties` stand-ins for CPU tensors;
- Triton's autotuner ranks configs by tile size instead of timing them (timing needs an active driver);
- Triton's interpreter multiplies bf16 `tl.dot` operands as their raw uint16 bits: upcast them to fp32;
- `resolve_kernels` accepts `kernels="cuda"` for CPU tensors.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import types
from pathlib import Path

import torch

from . import conv_ext

MAMBA_SSM_VERSION = "2.3.2.post1"
TRITON_VERSION = "3.9.0"
CAUSAL_CONV1D_VERSION = "1.7.0"
REPO = Path(__file__).resolve().parents[2]
# Where `make setup` unpacks the causal-conv1d sdist (Python layer only, never built).
CAUSAL_CONV1D_SRC = Path(
    os.environ.get(
        "LLAMBA_CAUSAL_CONV1D_SRC", REPO / ".venv" / "src" / f"causal_conv1d-{CAUSAL_CONV1D_VERSION}"
    )
)

# Set by tests that want Triton's NVIDIA default for fp32 `tl.dot` (TF32 inputs) emulated.
EMULATE_TF32 = {"on": False}
_installed = False


def missing() -> str | None:
    """Why the harness cannot run here (one line naming the fix), or None."""
    if _installed:
        return None
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "needs TRITON_INTERPRET=1 set before triton is imported (make test runs it so)"
    for mod, pin in (("triton", TRITON_VERSION), ("mamba_ssm", MAMBA_SSM_VERSION), ("einops", None)):
        if importlib.util.find_spec(mod) is None:
            return f"needs {mod}{'==' + pin if pin else ''}: run `make setup`"
    if not (CAUSAL_CONV1D_SRC / "causal_conv1d" / "causal_conv1d_interface.py").exists():
        return f"needs the causal-conv1d {CAUSAL_CONV1D_VERSION} sdist unpacked at {CAUSAL_CONV1D_SRC}: run `make setup`"
    return None


def install() -> None:
    global _installed
    if _installed:
        return
    reason = missing()
    if reason:
        raise RuntimeError(f"cuda_sim {reason}")
    import triton

    if triton.__version__ != TRITON_VERSION:
        raise RuntimeError(
            f"cuda_sim is written against triton=={TRITON_VERSION}, found {triton.__version__}"
        )
    _import_mamba_ssm_without_extension()
    _import_causal_conv1d_over_stand_in()
    _patch_torch_cuda()
    _patch_autotuner()
    _patch_interpreter_dot()
    _patch_resolve_kernels()
    _installed = True


def _import_mamba_ssm_without_extension() -> None:
    spec = importlib.util.find_spec("mamba_ssm")
    pkg = types.ModuleType("mamba_ssm")
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__version__ = MAMBA_SSM_VERSION
    sys.modules["mamba_ssm"] = pkg
    import mamba_ssm.ops.triton.selective_state_update  # noqa: F401
    import mamba_ssm.ops.triton.ssd_combined  # noqa: F401


def _import_causal_conv1d_over_stand_in() -> None:
    sys.modules["causal_conv1d_cuda"] = conv_ext
    sys.path.insert(0, str(CAUSAL_CONV1D_SRC))
    import causal_conv1d

    if causal_conv1d.__version__ != CAUSAL_CONV1D_VERSION:
        raise RuntimeError(
            f"cuda_sim expects causal-conv1d {CAUSAL_CONV1D_VERSION}, found {causal_conv1d.__version__}"
        )


def _patch_torch_cuda() -> None:
    real_device, real_props = torch.cuda.device, torch.cuda.get_device_properties

    def device(index):  # the kernels wrap each launch in `with torch.cuda.device(t.device.index)`
        return contextlib.nullcontext() if index is None else real_device(index)

    def get_device_properties(dev=None):  # read by the backward kernels for their grid size
        if isinstance(dev, torch.device) and dev.type == "cpu":
            return types.SimpleNamespace(multi_processor_count=4, name="cuda_sim", gcnArchName="")
        return real_props(dev)

    torch.cuda.device = device
    torch.cuda.get_device_properties = get_device_properties


def _patch_autotuner() -> None:
    from triton.runtime import autotuner

    def bench_without_timing(self, *args, config, **meta):
        # Runs nothing (the kernels' in-place outputs stay untouched) and ranks configs by tile size:
        # the interpreter's cost grows with the tile, and the tests' shapes are small.
        size = 1
        for name, value in config.kwargs.items():
            if name.startswith("BLOCK"):
                size *= value
        return [float(size)] * 3

    autotuner.Autotuner._bench = bench_without_timing


def _patch_interpreter_dot() -> None:
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    real_dot = interpreter.InterpreterBuilder.create_dot

    def as_fp32(h):
        if h.dtype.scalar == tl.bfloat16:  # stored as uint16: the high half of an fp32
            data = (h.data.astype(np.uint32) << 16).view(np.float32)
            return interpreter.TensorHandle(data, tl.float32)
        return h

    def tf32(h):  # round-to-nearest to 10 mantissa bits, as NVIDIA tensor cores read fp32 inputs
        bits = h.data.astype(np.float32).view(np.uint32)
        bits = ((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)
        return interpreter.TensorHandle(bits, tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        a, b = as_fp32(a), as_fp32(b)
        if (
            EMULATE_TF32["on"]
            and a.dtype.scalar == tl.float32
            and "TF32" in str(input_precision).upper()
            and "X3" not in str(input_precision).upper()
        ):
            a, b = tf32(a), tf32(b)
        return real_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot


def _patch_resolve_kernels() -> None:
    import llamba.model
    import llamba.ops

    real = llamba.ops.resolve_kernels

    def resolve_kernels(kernels, device):
        if kernels == "cuda" and torch.device(device).type == "cpu":
            if llamba.ops._cuda_kernels() is None:
                return real(kernels, "cuda")  # raises with the import error
            return "cuda"
        return real(kernels, device)

    llamba.ops.resolve_kernels = resolve_kernels
    llamba.model.resolve_kernels = resolve_kernels
