"""Distillation benchmarks on the embedded teacher (CPU); numbers go to BENCHMARKS.md.

    python bench/bench_distill.py init        # both mixer inits: held-out ppl + per-layer error right after init
    python bench/bench_distill.py throughput  # stage-3 training tok/s vs the teacher's own forward+backward
    python bench/bench_distill.py report RUN_DIR [RUN_DIR ...]   # per-stage errors / ppl of finished runs
    python bench/bench_distill.py stream      # --stream on a large JSONL: tok/s, resume latency, peak memory
    python bench/bench_distill.py busy        # a stage idle, then beside one busy process (auto vs fixed threads)
    python bench/bench_distill.py compare [BASE] [FLAG ...]  # stages 2 and 3 tok/s: this tree (with the distill
                                              # FLAGs, e.g. --compile) vs commit BASE (default HEAD) without them

Each prints one JSON line per measurement.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch


def _teacher():
    from llamba.distill.cli import quiet_hf
    from llamba.distill.teacher import get_teacher

    quiet_hf()  # no transformers progress bars between the JSON rows
    return get_teacher("default", torch.device("cpu"))


def bench_init(eval_tokens: int = 512) -> None:
    from llamba.distill.data import build_token_data, load_documents
    from llamba.distill.evaluate import evaluate_tokens
    from llamba.distill.init import build_student

    t = _teacher()
    held = build_token_data(
        load_documents(None, teacher=t.model, tokenizer=t.tokenizer), t.tokenizer, 256
    ).heldout[: eval_tokens // 256]
    for init in ("llamba", "attention"):
        student = build_student(t.model, init=init, seed=0)
        ev = evaluate_tokens(student, t.model, held)
        print(json.dumps({"bench": "init", "init": init, **ev}), flush=True)


def bench_throughput(batch: int = 2, seq_len: int = 128, reps: int = 3, chunk_sizes=(128, 64)) -> None:
    """Teacher forward+backward (all parameters trainable) vs one stage-3 step (teacher forward + student
    forward + KD loss + backward), same batch, fp32. The two are timed back to back, `reps` times after a warm-up,
    and the median ratio is reported (the CPU is shared, so load drifts between measurements)."""
    import statistics

    from llamba.distill.init import build_student
    from llamba.distill.losses import kd_loss

    t = _teacher()
    ids = torch.randint(0, t.model.config.vocab_size, (batch, seq_len))

    def teacher_fb():
        t.model.requires_grad_(True)
        out = t.model(input_ids=ids, labels=ids)
        out.loss.backward()
        t.model.zero_grad(set_to_none=True)
        t.model.requires_grad_(False)

    def stage3(student):
        with torch.no_grad():
            tl = t.model(input_ids=ids).logits
        loss = kd_loss(student(ids).logits, tl)
        loss.backward()
        student.zero_grad(set_to_none=True)

    def timed(fn):
        t0 = time.time()
        fn()
        return time.time() - t0

    for cs in chunk_sizes:
        student = build_student(t.model, init="llamba", chunk_size=cs)
        teacher_fb(), stage3(student)  # warm-up
        pairs = [(timed(teacher_fb), timed(lambda s=student: stage3(s))) for _ in range(reps)]
        n = batch * seq_len
        print(
            json.dumps(
                {
                    "bench": "throughput",
                    "batch": batch,
                    "seq_len": seq_len,
                    "chunk_size": cs,
                    "threads": torch.get_num_threads(),
                    "teacher_fwd_bwd_tok_s": statistics.median(n / a for a, _ in pairs),
                    "stage3_tok_s": statistics.median(n / b for _, b in pairs),
                    "ratio": statistics.median(a / b for a, b in pairs),
                }
            ),
            flush=True,
        )


def _rss_mib() -> float:
    """Resident memory of this process now (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bench_stream(
    copies: int = 120, seq_len: int = 256, batches: int = 1000, batch: int = 8, shards: int = 8
) -> None:
    """The embedded teacher's tokenizer on a JSONL of `copies` x the default corpus: open (held-out scan), streamed
    tokens/s of packed rows, time to the first batch after a restore deep in the stream, and the growth of the
    process's resident memory, then the same file loaded in memory (`load_documents`) for comparison."""
    import tempfile

    from transformers import AutoTokenizer

    from llamba.distill.data import load_documents, python_docs_corpus
    from llamba.distill.distributed import DistContext
    from llamba.distill.stream import TokenStream, open_source
    from llamba.distill.teacher import embedded_gguf

    gguf = embedded_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    docs = python_docs_corpus()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "corpus.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for c in range(copies):
                for d in docs:
                    f.write(json.dumps({"text": f"[{c}] {d}"}) + "\n")
        ctx, rss0 = DistContext(), _rss_mib()
        t0 = time.time()
        stream = TokenStream(open_source(str(path)), tok, seq_len, shards)
        t_open = time.time() - t0
        t0 = time.time()
        for i in range(batches):
            stream.local_batch(i, batch, 0, ctx)
        tok_s = batches * batch * seq_len / (time.time() - t0)
        position = stream.position(ctx)
        t0 = time.time()
        again = TokenStream(open_source(str(path)), tok, seq_len, shards)
        again.restore(position)
        again.local_batch(batches, batch, 0, ctx)
        t_resume = time.time() - t0
        rss_stream = _rss_mib() - rss0
        t0 = time.time()
        loaded = load_documents(str(path), max_docs=10**9)
        t_load = time.time() - t0
        print(
            json.dumps(
                {
                    "bench": "stream",
                    "file_mib": round(path.stat().st_size / 2**20, 1),
                    "docs": len(loaded),
                    "seq_len": seq_len,
                    "shards": shards,
                    "open_s": round(t_open, 2),
                    "stream_tok_s": round(tok_s),
                    "resume_first_batch_s": round(t_resume, 2),
                    "rss_growth_stream_mib": round(rss_stream),
                    "load_documents_s": round(t_load, 2),
                    "rss_growth_load_documents_mib": round(_rss_mib() - rss0),
                }
            ),
            flush=True,
        )


def _stage_cmd(stage: int, init: Path, out: Path, tokens: int) -> list[str]:
    """`llamba distill stageK` from a saved init, quietly: what bench_busy and bench_compare time."""
    return [
        sys.executable,
        "-m",
        "llamba",
        "distill",
        f"stage{stage}",
        "--init-from",
        str(init),
        "--out",
        str(out),
        "--tokens",
        str(tokens),
        "--no-progress",
    ]


def bench_busy(stage: int = 3, tokens: int = 6144) -> None:
    """`llamba distill stageK` (a fresh student, the default chat data, 2 cores) run three ways: on an idle
    machine, beside one busy process (a one-core Python spin loop started just before it) with the automatic
    thread count, and beside it with `--threads` fixed at the core count. Prints the stage's tok/s (DONE.json) and
    each slowdown against idle. A fixed count that outnumbers the free cores stalls at OpenMP barriers."""
    import os
    import subprocess
    import tempfile

    from llamba.distill.init import build_student
    from llamba.distill.rundir import StageDir
    from llamba.threads import usable_cores

    t = _teacher()
    root = Path(tempfile.mkdtemp(prefix="bench_busy_"))
    init = root / "init"
    StageDir(init).save_weights(build_student(t.model, seed=0), t.tokenizer)
    cores = usable_cores()
    rows = {}
    for name, busy, threads in (
        ("idle", False, None),
        ("busy, auto threads", True, None),
        (f"busy, --threads {cores}", True, cores),
    ):
        out = root / name.replace(" ", "_").replace(",", "")
        cmd = _stage_cmd(stage, init, out, tokens) + (["--threads", str(threads)] if threads else [])
        spin = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            t0 = time.perf_counter()
            subprocess.run(
                cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONWARNINGS": "ignore"}
            )
            wall = time.perf_counter() - t0
        finally:
            if spin is not None:
                spin.kill()
        done = json.loads((out / f"stage{stage}" / "DONE.json").read_text())
        metrics = [json.loads(x) for x in (out / f"stage{stage}" / "metrics.jsonl").read_text().splitlines()]
        rows[name] = done["tok_s"]
        print(
            json.dumps(
                {
                    "bench": "busy",
                    "stage": stage,
                    "case": name,
                    "tok_s": done["tok_s"],
                    "slowdown_vs_idle": round(rows["idle"] / done["tok_s"], 2),
                    "wall_s": round(wall, 1),
                    "threads_used": sorted({m.get("threads") for m in metrics} - {None}),
                    "cores": cores,
                }
            ),
            flush=True,
        )


def _tree_at(ref: str, root: Path) -> Path:
    """An importable copy of commit `ref`: `git worktree` of it, then a folder whose `llamba/` holds the package with
    distill/, export/, icrl/, envs/ linked in (the package-dir mapping of pyproject.toml), to put on PYTHONPATH."""
    import shutil
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    work = root / "worktree"
    made = subprocess.run(
        ["git", "-C", str(repo), "worktree", "add", "--detach", str(work), ref],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    if made.returncode != 0:
        raise SystemExit(
            f"compare: cannot check out base {ref!r} ({made.stderr.strip()}); give a commit, e.g. HEAD~1"
        )
    site = root / "site"
    shutil.copytree(work / "llamba", site / "llamba")
    for sub in ("distill", "export", "icrl", "envs"):
        (site / "llamba" / sub).symlink_to(work / sub)
    return site


def bench_compare(
    base: str = "HEAD", flags: tuple[str, ...] = (), tokens: int = 4096, rounds: int = 2
) -> None:
    """Stages 2 and 3 of `llamba distill` (same init, the default chat data and settings, 2 cores) with the code of
    commit `base` and of this working tree (with the extra `flags`), alternated `rounds` times so a drifting load hits
    both alike. Prints each run's tok/s over the whole stage (DONE.json: optimizer steps and a compile included), its
    median step's tok/s after the first step and the first step's seconds, then the median ratios this/base."""
    import os
    import statistics
    import subprocess
    import tempfile

    from llamba.distill.init import build_student
    from llamba.distill.rundir import StageDir

    t = _teacher()
    root = Path(tempfile.mkdtemp(prefix="bench_compare_"))
    init = root / "init"
    StageDir(init).save_weights(build_student(t.model, seed=0), t.tokenizer)
    base_site = _tree_at(base, root / "base")
    repo = Path(__file__).resolve().parents[1]
    rates: dict[tuple[int, str], list[float]] = {}
    steady: dict[tuple[int, str], list[float]] = {}
    try:
        for r in range(rounds):
            for stage in (2, 3):
                for name, pythonpath, extra in (("base", str(base_site), ()), ("this", "", flags)):
                    out = root / f"{name}_s{stage}_r{r}"
                    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": pythonpath}
                    cmd = [*_stage_cmd(stage, init, out, tokens), *extra]
                    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env, cwd=root)
                    done = json.loads((out / f"stage{stage}" / "DONE.json").read_text())
                    rows = [
                        json.loads(x)
                        for x in (out / f"stage{stage}" / "metrics.jsonl").read_text().splitlines()
                    ]
                    step_tok_s = (
                        statistics.median(x["tok_s"] for x in rows[1:]) if len(rows) > 1 else done["tok_s"]
                    )
                    first_s = rows[0]["elapsed_s"]
                    rates.setdefault((stage, name), []).append(done["tok_s"])
                    steady.setdefault((stage, name), []).append(step_tok_s)
                    print(
                        json.dumps(
                            {
                                "bench": "compare",
                                "stage": stage,
                                "code": name if name == "this" else base,
                                "flags": " ".join(extra),
                                "round": r,
                                "tok_s": round(done["tok_s"], 1),
                                "step_tok_s": round(step_tok_s, 1),
                                "first_step_s": round(first_s, 1),
                            }
                        ),
                        flush=True,
                    )
    finally:
        subprocess.run(
            ["git", "-C", str(repo), "worktree", "remove", "--force", str(root / "base" / "worktree")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    for stage in (2, 3):
        b, n = statistics.median(rates[(stage, "base")]), statistics.median(rates[(stage, "this")])
        sb, sn = statistics.median(steady[(stage, "base")]), statistics.median(steady[(stage, "this")])
        print(
            json.dumps(
                {
                    "bench": "compare",
                    "stage": stage,
                    "base": base,
                    "flags": " ".join(flags),
                    "base_tok_s": round(b, 1),
                    "this_tok_s": round(n, 1),
                    "speedup": round(n / b, 2),
                    "step_speedup": round(sn / sb, 2),
                    "tokens": tokens,
                    "rounds": rounds,
                    "load_avg_1m": os.getloadavg()[0],
                }
            ),
            flush=True,
        )


def report(run_dirs: list[str]) -> None:
    for run in map(Path, run_dirs):
        row = {"bench": "run", "run": str(run)}
        for name in ("init/eval.json", "eval.json"):
            if (run / name).is_file():
                row[name] = json.loads((run / name).read_text())
        for k in (1, 2, 3):
            done = run / f"stage{k}" / "DONE.json"
            if done.is_file():
                row[f"stage{k}"] = json.loads(done.read_text())
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else "init"
    if "-h" in sys.argv[1:] or "--help" in sys.argv[1:]:
        print(__doc__)
    elif cmd == "init":
        bench_init()
    elif cmd == "throughput":
        bench_throughput()
    elif cmd == "stream":
        bench_stream()
    elif cmd == "compare":
        bench_compare(sys.argv[2] if len(sys.argv) > 2 else "HEAD", tuple(sys.argv[3:]))
    elif cmd == "busy":
        bench_busy()
    elif cmd == "report":
        report(sys.argv[2:])
    else:
        raise SystemExit(
            f"unknown benchmark {cmd!r}: one of init, throughput, report, stream, busy, compare (--help)"
        )
