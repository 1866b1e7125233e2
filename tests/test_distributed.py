"""Data parallelism with 2 CPU processes (gloo) gives the weights of one process on the same global batch,
and a DCP checkpoint written by 2 ranks resumes on 1."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = str(Path(__file__).with_name("_dist_worker.py"))
ROOT = Path(__file__).resolve().parents[1]


def run(nproc: int, *args: str) -> None:
    cmd = (
        [sys.executable, WORKER, *args]
        if nproc == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            WORKER,
            *args,
        ]
    )
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=240,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def assert_same_weights(a_path, b_path, tol=1e-5):
    a, b = torch.load(a_path), torch.load(b_path)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol, msg=k)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "w.pt"
    run(1, "--strategy", "none", "--steps", "3", "--out", str(out))
    return out


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_two_processes_match_one(single, tmp_path, strategy):
    run(2, "--strategy", strategy, "--steps", "3", "--out", str(tmp_path / "w.pt"))
    assert_same_weights(single, tmp_path / "w.pt")


def test_dcp_resume_on_a_different_world_size(single, tmp_path):
    ckpt = tmp_path / "dcp"
    run(2, "--strategy", "fsdp", "--steps", "2", "--save-dcp", str(ckpt), "--out", str(tmp_path / "half.pt"))
    assert ckpt.is_dir() and not (tmp_path / "dcp.tmp").exists()
    run(
        1,
        "--strategy",
        "fsdp",
        "--start",
        "2",
        "--steps",
        "1",
        "--load-dcp",
        str(ckpt),
        "--out",
        str(tmp_path / "resumed.pt"),
    )
    assert_same_weights(single, tmp_path / "resumed.pt")
