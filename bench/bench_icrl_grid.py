"""The cost of an ICRL hyperparameter grid: runs one at a time (``train`` + ``in_context_returns``) vs stacked
(``train_stacked`` + ``stacked_in_context_returns``, icrl/stacked.py) at the shapes of a grid config, and the
projected wall time of the whole grid.

Prints a table (machine, date, threads); appends nothing. Every run is a real grid run (same data, draws, eval).
    .venv/bin/python bench/bench_icrl_grid.py                                  # paper_darkroom: 20 draws x 200 steps
    .venv/bin/python bench/bench_icrl_grid.py --draws 4 --steps 50 --stack 8   # a short look (~2 min)
    .venv/bin/python bench/bench_icrl_grid.py --device cuda --stack 60         # a GPU
Projection: a run costs (train s/step) x grid steps + eval s (eval does not depend on the steps); the grid's
runs split evenly over --workers processes of --threads threads each (timed here one process at a time: two
processes on two cores share caches and memory bandwidth, so measure a real grid before trusting the last digit).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py; llamba comes from the installed package

from common import markdown_table  # noqa: E402


def cpu_summary() -> str:
    """lscpu model name and the vector-unit flags that matter for fp32 matmuls."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown CPU"
    info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = set(info.get("Flags", "").split())
    vec = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return f"{info.get('Model name', '?').strip()}, {os.cpu_count()} cores, flags: {' '.join(vec) or 'none'}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env", default="darkroom")
    ap.add_argument("--config", default="paper_darkroom")
    ap.add_argument("--methods", default="ad,ngram", help="comma-separated methods of the config")
    ap.add_argument("--draws", type=int, default=20, help="draws per method (budgets cycle over the draws)")
    ap.add_argument("--steps", type=int, default=200, help="train steps of the timed runs")
    ap.add_argument("--stack", default="20", help="comma-separated stack sizes to time")
    ap.add_argument("--seq-runs", type=int, default=2, help="runs per method timed one at a time")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--grid-steps", type=int, default=2000, help="steps of the projected grid")
    ap.add_argument("--workers", type=int, default=2, help="processes of the projected grid")
    ap.add_argument(
        "--real-grid",
        metavar="STACK",
        type=int,
        default=0,
        help="also run the whole grid (--grid-steps, --workers, --methods) with --stack STACK into a temporary "
        "directory and report its wall time",
    )
    args = ap.parse_args()

    import torch

    from llamba.icrl.config import draw_hparams, load_config
    from llamba.icrl.runner import Job, _run_job, _run_stack, budget_data, stack_jobs

    torch.set_num_threads(args.threads)
    cfg = load_config(args.env, args.config)
    cfg = replace(cfg, train=replace(cfg.train, steps=args.steps, threads=args.threads))
    data = budget_data(cfg, log=lambda s: None)
    methods = [m for m in args.methods.split(",") if m]
    per_draw = {m: cfg.grid.methods[m] for m in methods}
    grid_runs = cfg.grid.draws * len(cfg.grid.budgets)  # per method
    rows, projected = [], {}

    def jobs(method: str, n: int) -> list:
        """The method's first n grid runs: draw i on budget i mod budgets."""
        out = []
        for draw in range(n):
            b = draw % len(data)
            d = data[b]
            hp = draw_hparams(cfg.grid.search, cfg.grid.seed, draw)
            out.append(Job((method, b, draw), cfg, d["h"], d["test"], d["test_h"], per_draw[method], hp))
        return out

    def add(method: str, mode: str, results: list, wall: float) -> None:
        n = len(results)
        eval_s = (
            sum(r[1]["eval_s"] for r in results) / n
        )  # rows round to 0.1 s: train time from the wall clock
        train_s = max(wall / n - eval_s, 0.0)
        per_run_full = train_s * args.grid_steps / args.steps + eval_s
        grid_min = grid_runs * per_run_full / args.workers / 60
        projected.setdefault(mode, 0.0)
        projected[mode] += grid_min
        rows.append(
            [
                method,
                mode,
                n,
                f"{train_s:.2f}",
                f"{eval_s:.2f}",
                f"{n / wall * 60:.1f}",
                f"{per_run_full:.1f}",
            ]
        )
        print(f"  {method} {mode}: {n} runs in {wall:.1f} s", flush=True)

    from llamba.icrl.runner import run_configs
    from llamba.icrl.train import train

    warm = jobs(methods[0], 1)[0]  # first-call costs (thread pools, allocator) stay out of the table
    model_cfg, train_cfg = run_configs(cfg, warm.overrides, warm.hp, 0)
    train(warm.h, model_cfg, replace(train_cfg, steps=3))
    for method in methods:
        t0 = time.time()
        seq = [_run_job(j) for j in jobs(method, args.seq_runs)] if args.seq_runs > 0 else []
        if seq:
            add(method, "one at a time", seq, time.time() - t0)
        for k in (int(s) for s in args.stack.split(",") if s):
            batch = jobs(method, args.draws)
            t0, results = time.time(), []
            for stack in stack_jobs(batch, k):  # n-gram draws of different layer positions stack apart
                results += _run_stack(stack, args.device)
            add(method, f"stack {k} ({args.device})", results, time.time() - t0)

    print()
    print(
        f"{cpu_summary()}; torch {torch.__version__}, {args.threads} thread(s), "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; config {args.config}, {args.steps} steps per timed run"
    )
    head = [
        "method",
        "mode",
        "runs",
        "train s/run",
        "eval s/run",
        "runs/min",
        f"s/run at {args.grid_steps} steps",
    ]
    print(markdown_table(head, rows))
    print()
    total = grid_runs * len(methods)
    for mode, minutes in projected.items():
        print(
            f"projected grid ({total} runs x {args.grid_steps} steps, {args.workers} workers x {args.threads} "
            f"thread(s)), {mode}: {minutes:.1f} min"
        )
    if args.real_grid:
        import tempfile

        from llamba.icrl.runner import StackOptions, run_grid

        full = replace(cfg, train=replace(cfg.train, steps=args.grid_steps))
        with tempfile.TemporaryDirectory() as out:
            t0 = time.time()
            run_grid(
                full,
                out,
                log=lambda s: None,
                workers=args.workers,
                methods=methods,
                stack=StackOptions(args.real_grid, args.device),
            )
            print(
                f"measured grid ({total} runs x {args.grid_steps} steps, {args.workers} workers, --stack "
                f"{args.real_grid}, {args.device}): {(time.time() - t0) / 60:.1f} min wall"
            )


if __name__ == "__main__":
    main()
