"""llamba.allocator.keep_freed_memory: applied once per process on Linux/glibc, never with LLAMBA_MALLOC=0. Its effect
(fewer page faults per training step) is a benchmark figure (BENCHMARKS.md), not a test."""

import subprocess
import sys

import pytest

from llamba import allocator


def run(code: str, **env) -> str:
    import os

    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, check=True
    )
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_applied_once_on_linux_and_not_when_switched_off():
    code = "from llamba.allocator import keep_freed_memory as k; print(k(), k())"
    assert run(code, LLAMBA_MALLOC="1") == "True True"
    assert run(code, LLAMBA_MALLOC="0") == "False False"


def test_other_platforms_are_left_alone(monkeypatch):
    monkeypatch.setattr(allocator, "_DONE", {"tuned": False})
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator.keep_freed_memory() is False


def test_the_cli_tunes_before_running_a_command():
    code = (
        "import llamba.allocator as a; from click.testing import CliRunner; from llamba.cli import main; "
        "r = CliRunner().invoke(main, ['eval', '--help']); print(a._DONE['tuned'] == sys.platform.startswith('linux'))"
    )
    assert run("import sys; " + code) == "True"
