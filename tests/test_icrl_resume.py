"""Resumable grids: killed `llamba icrl run` (1 and 2 workers) resumes to the uninterrupted result, workers die
with their parent, torn result lines are dropped, a different config into the same --out is refused."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from llamba.icrl.cli import icrl
from llamba.icrl.config import CONFIG_DIR, load_config
from llamba.icrl.runner import run_grid
from llamba.icrl.store import RunStore, first_difference


def _config(tmp: Path, steps: int = 40) -> Path:
    """The tiny grid with runs long enough (a fraction of a second each) to be killed in the middle of the grid."""
    raw = json.loads((CONFIG_DIR / "tiny.json").read_text())
    raw["train"]["steps"] = steps
    path = tmp / "cfg.json"
    path.write_text(json.dumps(raw))
    return path


def _rows(out: Path) -> list[dict]:
    rows = list(csv.DictReader(open(out / "results.csv")))
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]  # timings differ


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    cfg_path = _config(tmp)
    run_grid(load_config("darkroom", str(cfg_path)), tmp / "out", log=lambda s: None)
    return cfg_path, _rows(tmp / "out")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("workers", [1, 2])
def test_killed_run_resumes_to_the_uninterrupted_result(reference, tmp_path, workers):
    cfg_path, expected = reference
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "llamba", "icrl", "run", "--env", "darkroom", "--config", str(cfg_path)]
    cmd += ["--out", str(out), "--workers", str(workers)]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    runs = out / "runs.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if runs.exists() and runs.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the grid ended before it could be killed: {proc.stderr.read()!r}"
    os.kill(proc.pid, signal.SIGKILL)  # the parent only: its workers must notice on their own
    proc.wait()
    done_before = runs.read_bytes().count(b"\n")
    assert 2 <= done_before < len(expected)
    deadline = time.time() + 15
    while _group_alive(proc.pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not _group_alive(proc.pid), "a worker outlived its killed parent"
    with open(runs, "ab") as f:  # as if killed in the middle of appending the next result
        f.write(b'{"key": ["ad", 1, 0], "row": {"sco')
    res = CliRunner().invoke(
        icrl, ["run", "--env", "darkroom", "--config", str(cfg_path), "--out", str(out), "--workers", "1"]
    )
    assert res.exit_code == 0, res.output
    assert f"resuming: {done_before} of {len(expected)} runs already done" in res.output
    assert _rows(out) == expected
    assert runs.read_bytes().count(b"\n") == len(expected)  # the torn line is gone, nothing done twice


def test_first_draws_now_the_rest_later_give_the_whole_grid(reference, tmp_path):
    """--draws N runs draws 0..N-1 of every method and budget; a later run without it adds the rest, and the
    grid ends equal to the one run in one go."""
    cfg_path, expected = reference
    out = tmp_path / "out"
    base = ["run", "--env", "darkroom", "--config", str(cfg_path), "--out", str(out)]
    r = CliRunner()
    res = r.invoke(icrl, [*base, "--draws", "1"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["draw"] for r in rows} == {"0"} and len(rows) == len(expected) // 2
    assert f"{len(rows)} of {len(expected)} runs finished" in res.output
    res = r.invoke(icrl, base)
    assert res.exit_code == 0, res.output
    assert f"resuming: {len(expected) // 2} of {len(expected)} runs already done" in res.output
    assert _rows(out) == expected
    res = r.invoke(icrl, [*base, "--draws", "0"])
    assert res.exit_code != 0 and "Invalid value for '--draws'" in res.output


def test_rerun_with_another_config_is_refused_and_changes_nothing(tmp_path):
    out = tmp_path / "out"
    first = _config(tmp_path, steps=5)
    r = CliRunner()
    assert (
        r.invoke(icrl, ["run", "--env", "darkroom", "--config", str(first), "--out", str(out)]).exit_code == 0
    )
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    raw = json.loads(first.read_text())
    raw["train"]["steps"] = 6
    other = tmp_path / "other.json"
    other.write_text(json.dumps(raw))
    res = r.invoke(icrl, ["run", "--env", "darkroom", "--config", str(other), "--out", str(out)])
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert "holds a run of another config (train.steps differs: 5 there, 6 now)" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # the same config again: nothing to do, the results are reprinted from the finished runs
    res = r.invoke(icrl, ["run", "--env", "darkroom", "--config", str(first), "--out", str(out)])
    assert res.exit_code == 0 and "resuming: 8 of 8 runs already done" in res.output
    # a report of the finished runs, as for a stopped grid
    res = r.invoke(icrl, ["report", "--env", "darkroom", "--config", str(first), "--out", str(out)])
    assert res.exit_code == 0 and "8 of 8 runs finished" in res.output


def test_store_drops_a_torn_line_and_names_the_differing_field(tmp_path):
    store = RunStore(tmp_path, {"a": {"b": 1, "c": [1, 2]}})
    store.append({"key": ["ad", 0, 0], "row": {"score": 0.5}})
    store.append({"key": ["ad", 0, 1], "row": {"score": 0.25}})
    with open(store.runs_path, "ab") as f:
        f.write(b'{"key": ["ad", 0, 2], "ro')
    torn = store.runs_path.read_bytes()
    assert len(store.load(repair=False)) == 2 and store.runs_path.read_bytes() == torn  # a reader leaves it
    assert {k: v["row"]["score"] for k, v in store.load().items()} == {("ad", 0, 0): 0.5, ("ad", 0, 1): 0.25}
    assert store.runs_path.read_bytes().count(b"\n") == 2 and store.runs_path.read_bytes().endswith(b"\n")
    store.append({"key": ["ad", 0, 2], "row": {"score": 1.0}})
    assert len(RunStore(tmp_path, {"a": {"b": 1, "c": [1, 2]}}).load()) == 3
    with pytest.raises(ValueError, match=r"a\.c differs: \[1, 2\] there, \[1, 3\] now"):
        RunStore(tmp_path, {"a": {"b": 1, "c": [1, 3]}})
    assert first_difference({"x": 1}, {"x": 1, "y": 2}) == "y"
    assert first_difference({"x": {"y": 1}}, {"x": {"y": 1}}) is None
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        RunStore(tmp_path / "f", {})
