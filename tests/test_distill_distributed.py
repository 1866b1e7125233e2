"""The distillation stages under torchrun: 2 CPU processes (gloo) end with the weights and losses of 1 process on
the same global batch and seed, for FSDP2 and DDP students and a replicated or FSDP2-sharded teacher; a stage
killed under 2 processes resumes under 1 (DCP reshards), reading in-memory or streamed data."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_corpus, tiny_teacher, write_tiny_teacher
from safetensors.torch import load_file

from llamba.checkpoints import load_model
from llamba.distill.init import build_student

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(Path(__file__).with_name("_distill_dist_worker.py"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(nproc: int, *args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def weights(stage_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(stage_dir / "model.safetensors")


def losses(stage_dir: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def assert_close_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        # Adam normalizes tiny reduction-order differences of near-zero gradients into O(lr * 1e-2) steps
        # (one element in 16k moved 1.9e-4 on an AMD EPYC, whose reductions order differently)
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-3, atol=5e-4, msg=lambda m, k=k: f"{k}: {m}")
    torch.testing.assert_close(losses(a), losses(b), rtol=1e-4, atol=0)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    teacher = write_tiny_teacher(root / "teacher")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in tiny_corpus()))
    init = root / "init"
    build_student(tiny_teacher(), seed=0).save_pretrained(init)
    return root, teacher, corpus, init


def worker_args(files, stage, out, *extra):
    root, teacher, corpus, init = files
    return [
        WORKER,
        "--stage",
        str(stage),
        "--teacher",
        str(teacher),
        "--data",
        str(corpus),
        "--out",
        str(out),
        "--init-from",
        str(init),
        *extra,
    ]


@pytest.fixture(scope="module")
def single_runs(files):
    root = files[0]
    torchrun(1, *worker_args(files, "1,2,3", root / "single", "--strategy", "none"))
    return root / "single"


@pytest.mark.parametrize(
    "stage,strategy,teacher",
    [
        (2, "fsdp", "replicate"),
        (3, "fsdp", "replicate"),
        (1, "ddp", "fsdp"),
        (2, "ddp", "replicate"),
        (3, "ddp", "replicate"),
        (3, "fsdp", "fsdp"),
    ],
)
def test_two_processes_equal_one(files, single_runs, stage, strategy, teacher):
    out = files[0] / f"{strategy}-{teacher}-{stage}"
    torchrun(2, *worker_args(files, stage, out, "--strategy", strategy, "--teacher-strategy", teacher))
    assert_close_weights(single_runs / f"stage{stage}", out / f"stage{stage}")
    done = json.loads((out / f"stage{stage}" / "DONE.json").read_text())
    assert (done["world_size"], done["steps"], done["strategy"], done["teacher_strategy"]) == (
        2,
        6,
        strategy,
        teacher,
    )
    loaded, saved = load_model(out / f"stage{stage}").state_dict(), weights(out / f"stage{stage}")
    for k, v in saved.items():  # the consolidated HF-layout checkpoint loads (lm_head is tied, not saved)
        assert torch.equal(loaded[k], v), k


def test_killed_under_two_resumes_under_one(files, single_runs):
    out = files[0] / "resume"
    torchrun(2, *worker_args(files, 3, out, "--strategy", "fsdp", "--stop-after", "3"))
    assert (out / "stage3" / "resume").is_dir() and not (out / "stage3" / "DONE.json").exists()
    torchrun(1, *worker_args(files, 3, out, "--strategy", "none"))
    assert_close_weights(single_runs / "stage3", out / "stage3")
    rows = [json.loads(x) for x in (out / "stage3" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))


def test_stream_killed_under_two_resumes_under_one(files):
    """Streamed data: the stopped 2-process run and its 1-process continuation read the batches of one
    uninterrupted process (the stream position is in the DCP checkpoint)."""
    root = files[0]
    torchrun(1, *worker_args(files, 3, root / "stream1", "--strategy", "none", "--stream"))
    out = root / "stream-resume"
    torchrun(2, *worker_args(files, 3, out, "--strategy", "fsdp", "--stream", "--stop-after", "3"))
    assert (out / "stage3" / "resume").is_dir() and not (out / "stage3" / "DONE.json").exists()
    torchrun(1, *worker_args(files, 3, out, "--strategy", "none", "--stream"))
    assert_close_weights(root / "stream1" / "stage3", out / "stage3")
    assert json.loads((out / "stage3" / "spec.json").read_text())["stream"] is True


def test_cli_under_torchrun(files, tmp_path):
    root, teacher, corpus, init = files
    torchrun(
        2,
        "-m",
        "llamba",
        "distill",
        "stage2",
        "--teacher",
        str(teacher),
        "--data",
        str(corpus),
        "--out",
        str(tmp_path / "cli"),
        "--init-from",
        str(init),
        "--tokens",
        "256",
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--no-progress",
    )
    assert (tmp_path / "cli" / "stage2" / "model.safetensors").is_file()
