"""In-context RL benchmark: batched-env throughput, then the Dark Room and Key-to-Door grids (AD vs n-gram AD).

Prints a table and appends an `## In-context RL` section to bench/results/HISTORY.md (current figures: BENCHMARKS.md).
    .venv/bin/python bench/bench_icrl.py                      # both envs, shipped configs, one after the other
    .venv/bin/python bench/bench_icrl.py --envs darkroom --no-append --workers 2
    .venv/bin/python bench/bench_icrl.py --from-run RUN_DIR --env darkroom --config paper_darkroom
        # a section from the finished runs of a (possibly stopped) `llamba icrl run` directory
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import append_history  # noqa: E402

from llamba.envs import EnvSpec  # noqa: E402
from llamba.icrl.histories import DataConfig, generate  # noqa: E402


def env_throughput(name: str, b: int = 4096, steps: int = 2000) -> float:
    """Random-action env steps per second of the batched NumPy env (b tasks at once)."""
    spec = EnvSpec(name)
    rng = np.random.default_rng(0)
    tasks = spec.split(64, 16)[0]
    env = spec.batched(np.resize(tasks, (b, *tasks.shape[1:])))
    env.reset(rng)
    done_steps, t0 = 0, time.perf_counter()
    for _ in range(steps):
        active = int((~env.done).sum())
        env.step(rng.integers(0, 5, size=b))
        done_steps += active
        if env.done.all():
            env.reset(rng)
    return done_steps / (time.perf_counter() - t0)


def history_throughput(name: str, source: str = "qlearning") -> tuple[float, int]:
    """Env steps per second of learning-history generation (64 tasks x 8 histories x 60 episodes)."""
    spec = EnvSpec(name)
    cfg = DataConfig(
        n_train_tasks=64, histories_per_task=8, episodes_per_history=60, lr=0.9, gamma=0.9, source=source
    )
    t0 = time.perf_counter()
    h, _ = generate(spec, cfg)
    return h.total_transitions / (time.perf_counter() - t0), h.total_transitions


def run_env_grid(args: tuple[str, str | None, str, int]) -> dict:
    env, config, out, workers = args
    import torch

    from llamba.icrl.config import load_config
    from llamba.icrl.runner import run_grid

    torch.set_num_threads(1)
    cfg = load_config(env, config)
    lines = []
    t0 = time.time()
    summary = run_grid(
        cfg,
        Path(out) / env,
        log=lambda s: (lines.append(s), print(f"[{env}] {s}", flush=True)),
        workers=workers,
    )
    return {
        "env": env,
        "seconds": time.time() - t0,
        "summary": summary,
        "log": lines,
        "steps": cfg.train.steps,
        "draws": cfg.grid.draws,
        "batch": cfg.train.batch_size,
        "context": cfg.model.seq_len,
        "d_model": cfg.model.d_model,
        "eval_episodes": cfg.eval.episodes,
        "greedy": cfg.eval.greedy,
        "workers": workers,
        "source": cfg.data.source,
    }


def section(throughput: dict, results: list[dict], note: str, title: str = "In-context RL") -> str:
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    import torch

    out = [
        "",
        f"## {title}",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores (shared with other "
        f"jobs), torch {torch.__version__}, numpy {np.__version__}; {now}. Script: `bench/bench_icrl.py`.",
        "",
    ]
    if note:
        out += [note, ""]
    out += [
        "### Data generation (batched NumPy envs)",
        "",
        "| env | random-action env steps/s (4096 envs) | Q-learning history steps/s | explorer history steps/s |",
        "|---|---:|---:|---:|",
    ]
    for env, t in throughput.items():
        out.append(f"| {env} | {t['env']:,.0f} | {t['qlearn']:,.0f} | {t['explorer']:,.0f} |")
    for r in results:
        s = r["summary"]
        out += [
            "",
            f"### {r['env']} grid ({r['seconds'] / 60:.1f} min, {r['workers']} worker process(es))",
            "",
            f"Histories from the `{r['source']}` source. {r['draws']} random hyperparameter draws per method and budget, {r['steps']} AdamW steps each "
            f"(batch {r['batch']}, context {r['context']} transitions, d_model {r['d_model']}); score = return / "
            f"optimal on 16 held-out tasks, mean of the last 3 of {r['eval_episodes']} in-context episodes "
            f"({'greedy' if r['greedy'] else 'sampled'} actions); held-out loss = lowest action cross-entropy over "
            "the draws on histories of the data source recorded on the held-out tasks (uniform policy: ln 5 = 1.609).",
            "",
        ]
        out.append(
            "| method | train tasks | transitions | best score | mean score | held-out loss | EMP n=1..N |"
        )
        out.append("|---|---:|---:|---:|---:|---:|---|")
        for c in s["cells"]:
            out.append(
                f"| {c['method']} | {c['n_train_tasks']} | {c['transitions']:,} | {c['best']:.3f} | "
                f"{c['mean']:.3f} | {c['test_loss']:.3f} | {' '.join(f'{v:.2f}' for v in c['emp'])} |"
            )
        reach = s["transitions_to_threshold"]
        out += [
            "",
            f"Transitions to reach {s['threshold']:.0%} of optimal (best draw): "
            + ", ".join(f"{m}: {'not reached' if t is None else f'{t:,}'}" for m, t in reach.items()),
            "",
            *(f"Data efficiency of {m}: {text}." for m, text in s["data_efficiency"].items()),
            "",
        ]
    return "\n".join(out) + "\n"


def from_run(run_dir: str, env: str, config: str, title: str, note: str) -> str:
    """A BENCHMARKS.md section from the runs finished so far in a run directory (see `llamba icrl report`)."""
    from llamba.icrl.config import load_config
    from llamba.icrl.report import report

    cfg = load_config(env, config)
    summary = report(cfg, run_dir)
    rows = [json.loads(line)["row"] for line in open(Path(run_dir) / "runs.jsonl")]
    train_s = [r["train_s"] + r["eval_s"] for r in rows]
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["?"] * 3
    body = (Path(run_dir) / "results.md").read_text().split("\n", 2)[2]  # without the results.md heading
    out = [
        "",
        f"## {title}",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores (load average "
        f"{' / '.join(load)} when this section was written; the note says what ran beside the grid); {now}. Config "
        f"`{config}`, {summary['runs_done']} of {summary['runs_total']} runs; median {np.median(train_s):.0f} s per "
        "run (train + eval, one torch thread each). Made by `bench/bench_icrl.py --from-run`.",
        "",
    ]
    if note:
        out += [note, ""]
    return "\n".join(out) + body


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--envs", default="darkroom,keytodoor")
    p.add_argument("--darkroom-config", default=None)
    p.add_argument("--keytodoor-config", default=None)
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_icrl"))
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="runs trained at once per grid")
    p.add_argument("--note", default="", help="a line added to the BENCHMARKS.md section")
    p.add_argument("--title", default="In-context RL", help="heading of the BENCHMARKS.md section")
    p.add_argument("--no-append", action="store_true")
    p.add_argument("--from-run", default=None, help="summarise this `llamba icrl run` directory instead")
    p.add_argument("--env", default="darkroom", help="with --from-run: the run's env")
    p.add_argument("--config", default="paper_darkroom", help="with --from-run: the run's config")
    args = p.parse_args()
    if args.from_run:
        text = from_run(args.from_run, args.env, args.config, args.title, args.note)
        print(text)
        if not args.no_append:
            append_history(text)
        return
    envs = [e for e in args.envs.split(",") if e]
    throughput = {}
    for env in ("darkroom", "keytodoor"):
        q, _ = history_throughput(env)
        x, _ = history_throughput(env, "explorer")
        throughput[env] = {"env": env_throughput(env), "qlearn": q, "explorer": x}
        print(
            f"{env}: {throughput[env]['env']:,.0f} env steps/s, Q-learning {q:,.0f}, explorer {x:,.0f} steps/s",
            flush=True,
        )
    results = [run_env_grid((e, getattr(args, f"{e}_config"), args.out, args.workers)) for e in envs]
    text = section(throughput, results, args.note, args.title)
    print(text)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench.json").write_text(
        json.dumps({"throughput": throughput, "results": results}, indent=1)
    )
    if not args.no_append:
        append_history(text)


if __name__ == "__main__":
    main()
