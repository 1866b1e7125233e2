"""A kill -9 in the middle of an MLX export leaves nothing that looks finished, and the next export succeeds."""

import subprocess
import sys
import textwrap

import pytest
from conftest import make_checkpoint, tiny_llamba_config

pytest.importorskip("mlx.core")

from llamba.export.convert import convert, export_complete  # noqa: E402

KILLER = textwrap.dedent("""
    import os, signal, sys
    from transformers import PreTrainedTokenizerBase
    from llamba.export.convert import convert

    def die(self, *args, **kwargs):  # the weights and config.json are written by now: kill -9 here
        os.kill(os.getpid(), signal.SIGKILL)

    PreTrainedTokenizerBase.save_pretrained = die
    convert(sys.argv[1], sys.argv[2], dtype="float32")
""")


def test_export_killed_midway_leaves_no_half_directory(tmp_path):
    src = tmp_path / "ckpt"
    make_checkpoint(src, tiny_llamba_config(d_model=64, intermediate_size=128, d_state=16, n_v_heads=4))
    out = tmp_path / "mlx"
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, str(src), str(out)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not out.exists() and not export_complete(out)  # the demo's test for "already exported"
    assert list(tmp_path.glob(".mlx.tmp-*"))  # what the kill left: a temporary beside it
    convert(src, out, dtype="float32")
    assert export_complete(out) and not list(tmp_path.glob(".mlx.tmp-*"))
