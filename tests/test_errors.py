"""The error boundary (llamba.errors) and the --device resolver (llamba.devices)."""

import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch

from llamba.devices import DeviceError, resolve_device
from llamba.errors import LlambaError, error_boundary, one_line


def _message(exc: Exception) -> str:
    with pytest.raises(click.ClickException) as info, error_boundary():
        raise exc
    return info.value.format_message()


def test_expected_errors_become_their_first_line():
    assert _message(LlambaError("bad --data x.bin: binary\nmore detail")) == "bad --data x.bin: binary"
    assert one_line(LlambaError("")) == "LlambaError"


def test_click_errors_and_exits_pass_through_unchanged():
    for exc in (click.UsageError("no such option"), click.exceptions.Exit(0), click.Abort()):
        with pytest.raises(type(exc)), error_boundary():
            raise exc


def test_oserror_without_a_path_is_unexpected(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMBA_TRACEBACKS", str(tmp_path))
    message = _message(OSError("disk on fire"))
    assert message.startswith("unexpected OSError: disk on fire (full traceback in ")
    assert len(list(tmp_path.iterdir())) == 1


def test_the_boundary_imports_no_torch():
    """`llamba --help` must stay fast: the boundary module pulls in nothing heavy."""
    code = (
        "import importlib.util, sys; spec = importlib.util.spec_from_file_location('e', sys.argv[1]); "
        "spec.loader.exec_module(importlib.util.module_from_spec(spec)); print('torch' in sys.modules)"
    )
    path = Path(__file__).parents[1] / "llamba" / "errors.py"
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("spec", ["bogus", "cuda:x", "cpu:0", "mps:1", "gpu", ""])
def test_malformed_devices_are_refused(spec):
    with pytest.raises(DeviceError, match="is not a device; use auto, cpu, cuda, cuda:N or mps"):
        resolve_device(spec)


def test_devices_this_machine_lacks_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("CPU") == torch.device("cpu")
    with pytest.raises(DeviceError, match="cuda:7: this machine has no usable CUDA GPU"):
        resolve_device("cuda:7")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="MPS is not available here"):
        resolve_device("mps")


def test_cuda_indices_are_checked_against_the_gpu_count(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match=r"has 2 CUDA GPUs \(cuda:0 ... cuda:1\)"):
        resolve_device("cuda:7")
