"""Experiment grid: methods x data budgets x random hyperparameter draws -> CSV, Markdown, PNG plots.

Both methods see the same data, the same step budget and the same hyperparameter draws (shared keys are drawn
from one RNG stream per draw index), so their EMP curves are comparable.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from llamba.icrl.config import ExperimentConfig
from llamba.icrl.evaluate import expected_max_performance, heldout_loss, in_context_returns, score
from llamba.icrl.histories import generate, q_learning_histories
from llamba.icrl.train import train


def draw_hparams(search: dict[str, list], seed: int, draw: int) -> dict[str, object]:
    """One random assignment: {"train.lr": 1e-3, ...}. Keys are drawn in sorted order from one stream."""
    rng = np.random.default_rng([seed, draw])
    out = {}
    for key in sorted(search):
        kind, *args = search[key]
        if kind == "log":
            out[key] = float(np.exp(rng.uniform(np.log(args[0]), np.log(args[1]))))
        elif kind == "uniform":
            out[key] = float(rng.uniform(args[0], args[1]))
        else:
            out[key] = args[0][int(rng.integers(len(args[0])))]
    return out


def _split(hp: dict, section: str) -> dict:
    return {k.split(".", 1)[1]: v for k, v in hp.items() if k.startswith(section + ".")}


def run_one(
    cfg: ExperimentConfig,
    h,
    test_tasks,
    method_overrides: dict,
    hp: dict,
    seed: int,
    progress=None,
    test_h=None,
):
    """Train one model with one hyperparameter assignment and evaluate it in context -> (row dict, returns).
    ``test_h``: histories on the held-out tasks for the held-out imitation loss (skipped when None)."""
    model_hp = _split(hp, "model")
    if not method_overrides.get("ngram_layers"):  # plain AD: n-gram keys are drawn but have no effect
        model_hp = {k: v for k, v in model_hp.items() if not k.startswith("ngram")}
    elif "ngram_layers" in model_hp:  # a drawn layer position replaces the method's default
        model_hp["ngram_layers"] = list(model_hp["ngram_layers"])
    model_cfg = cfg.model_config(**{**method_overrides, **model_hp})
    train_cfg = replace(cfg.train, **_split(hp, "train"), seed=seed)
    t0 = time.time()
    model, losses = train(h, model_cfg, train_cfg, progress)
    t_train = time.time() - t0
    returns = in_context_returns(model, cfg.spec, test_tasks, replace(cfg.eval, seed=seed))
    optimal = cfg.spec.optimal_return(test_tasks)
    row = {
        "score": score(returns, optimal, cfg.eval.last_k),
        "final_loss": float(np.mean(losses[-20:])),
        "test_loss": heldout_loss(model, test_h) if test_h is not None else float("nan"),
        "params": model.num_params(),
        "train_s": round(t_train, 1),
        "eval_s": round(time.time() - t0 - t_train, 1),
        **{f"hp.{k}": v for k, v in hp.items()},
    }
    return row, returns / optimal[:, None], model


def _run_job(job: tuple, progress=None) -> tuple:
    """One (method, budget, draw) run -> (key, row, mean normalised return per episode); picklable for workers."""
    cfg, h, test, overrides, hp, draw, test_h, key = job
    row, norm_returns, _ = run_one(cfg, h, test, overrides, hp, draw, progress, test_h)
    return key, row, norm_returns.mean(0)


def run_grid(cfg: ExperimentConfig, out: str | Path, progress=None, log=print, workers: int = 1) -> dict:
    """Run the whole grid; writes results.csv, results.md, summary.json and plots into ``out``.
    ``workers`` > 1 trains that many runs at once in separate processes (one torch thread each); the results
    are the same as with one worker, since every run is seeded by its draw index."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    g = cfg.grid
    jobs, meta = [], {}
    for b_i, budget in enumerate(g.budgets):
        data_cfg = replace(cfg.data, **budget)
        h, info = generate(cfg.spec, data_cfg)
        _, test = cfg.spec.split(data_cfg.n_train_tasks, data_cfg.n_test_tasks, seed=data_cfg.split_seed)
        # the same learner on the held-out tasks (other seed): data for the held-out imitation loss
        test_h = q_learning_histories(
            cfg.spec, test, replace(data_cfg, histories_per_task=1, seed=data_cfg.seed + 1)
        )
        log(
            f"budget {b_i}: {info['transitions']:,} transitions ({info['histories']} histories), "
            f"{data_cfg.source} first/last return {info['first']:.2f} -> {info['last']:.2f} of optimal"
        )
        for method, overrides in g.methods.items():
            for draw in range(g.draws):
                key = (method, b_i, draw)
                meta[key] = {
                    "method": method,
                    "budget": b_i,
                    "transitions": info["transitions"],
                    "n_train_tasks": data_cfg.n_train_tasks,
                    "histories": info["histories"],
                    "draw": draw,
                }
                jobs.append(
                    (cfg, h, test, overrides, draw_hparams(g.search, g.seed, draw), draw, test_h, key)
                )
    results = {}

    def record(key, row, curve):
        results[key] = ({**meta[key], **row}, curve)
        log(
            f"  {key[0]:>8} budget {key[1]} draw {key[2]}: score {row['score']:.3f} (loss {row['final_loss']:.3f}, "
            f"held-out {row['test_loss']:.3f}, {row['train_s']}s train)"
        )

    if workers <= 1:
        for job in jobs:
            record(*_run_job(job, progress))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(_run_job, job) for job in jobs]
            for fut in as_completed(futures):
                record(*fut.result())
                if progress is not None:
                    progress(cfg.train.steps)
    rows = [results[job[-1]][0] for job in jobs]  # grid order, whatever order the workers finished in
    curves = {job[-1]: results[job[-1]][1] for job in jobs}
    summary = summarize(rows, g.threshold)
    write_results(out, rows, summary, cfg)
    plot_results(out, rows, curves, summary, cfg.spec.name)
    return summary


def summarize(rows: list[dict], threshold: float) -> dict:
    """Per (method, budget): transitions, best score (EMP at N), mean, EMP curve; per method: transitions to
    reach the threshold with the best draw (None if never)."""
    out = {"threshold": threshold, "cells": [], "transitions_to_threshold": {}}
    for method in dict.fromkeys(r["method"] for r in rows):
        reached = None
        for b in sorted({r["budget"] for r in rows}):
            cell = [r for r in rows if r["method"] == method and r["budget"] == b]
            scores = [r["score"] for r in cell]
            emp = expected_max_performance(scores)
            out["cells"].append(
                {
                    "method": method,
                    "budget": b,
                    "transitions": cell[0]["transitions"],
                    "n_train_tasks": cell[0]["n_train_tasks"],
                    "best": float(max(scores)),
                    "mean": float(np.mean(scores)),
                    "test_loss": float(min(r["test_loss"] for r in cell)),
                    "emp": emp.tolist(),
                }
            )
            if reached is None and max(scores) >= threshold:
                reached = cell[0]["transitions"]
        out["transitions_to_threshold"][method] = reached
    out["data_efficiency"] = data_efficiency(out["transitions_to_threshold"])
    return out


def data_efficiency(reached: dict[str, int | None]) -> dict[str, str]:
    """How many times fewer transitions each method needs than the first (the baseline) to reach the
    threshold: a number when both reach it, a bound when only one does, 'untested' when neither does."""
    (base, t_base), *others = reached.items()
    out = {}
    for method, t in others:
        if t is not None and t_base is not None:
            ratio = t_base / t
            if ratio == 1:
                out[method] = f"the same number of transitions as {base}"
            elif ratio > 1:
                out[method] = f"{ratio:.3g}x fewer than {base}"
            else:
                out[method] = f"{1 / ratio:.3g}x more than {base}"
        elif t is not None:
            out[method] = f"reached; {base} did not (ratio > grid span)"
        elif t_base is not None:
            out[method] = f"not reached; {base} reached at {t_base:,}"
        else:
            out[method] = "untested: neither reached the threshold"
    return out


def write_results(out: Path, rows: list[dict], summary: dict, cfg: ExperimentConfig) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    (out / "summary.json").write_text(
        json.dumps(
            {
                **summary,
                "config": {
                    "env": cfg.spec.name,
                    "env_kwargs": cfg.spec.kwargs,
                    "data": asdict(cfg.data),
                    "model": cfg.raw,
                    "train": asdict(cfg.train),
                    "eval": asdict(cfg.eval),
                    "grid": asdict(cfg.grid),
                },
            },
            indent=1,
            default=str,
        )
    )
    (out / "results.md").write_text(markdown_table(summary))


def markdown_table(summary: dict) -> str:
    lines = [
        "| method | train tasks | transitions | best score | mean score | held-out loss | EMP(n=1..N) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for c in summary["cells"]:
        emp = " ".join(f"{v:.2f}" for v in c["emp"])
        lines.append(
            f"| {c['method']} | {c['n_train_tasks']} | {c['transitions']:,} | {c['best']:.3f} | "
            f"{c['mean']:.3f} | {c['test_loss']:.3f} | {emp} |"
        )
    lines.append("")
    lines.append(f"Transitions to reach {summary['threshold']:.0%} of the optimal return (best draw):")
    lines.append("")
    for method, t in summary["transitions_to_threshold"].items():
        lines.append(f"- {method}: {'not reached' if t is None else f'{t:,}'}")
    for method, text in summary.get("data_efficiency", {}).items():
        lines.append(f"- data efficiency of {method}: {text}")
    return "\n".join(lines) + "\n"


def plot_results(out: Path, rows: list[dict], curves: dict, summary: dict, env: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows))
    budgets = sorted({r["budget"] for r in rows})
    cells = {(c["method"], c["budget"]): c for c in summary["cells"]}
    # 1. normalised return vs episode in context (best draw per method, one panel per budget)
    fig, axes = plt.subplots(1, len(budgets), figsize=(4 * len(budgets), 3.2), squeeze=False, sharey=True)
    for ax, b in zip(axes[0], budgets, strict=True):
        for m in methods:
            cell = [r for r in rows if r["method"] == m and r["budget"] == b]
            best = max(cell, key=lambda r: r["score"])
            ax.plot(
                np.arange(1, len(curves[(m, b, best["draw"])]) + 1), curves[(m, b, best["draw"])], label=m
            )
        ax.set_title(f"{cells[(methods[0], b)]['transitions']:,} transitions")
        ax.set_xlabel("episode in context")
    axes[0][0].set_ylabel("return / optimal")
    axes[0][-1].legend()
    fig.suptitle(f"{env}: in-context return on held-out tasks")
    fig.tight_layout()
    fig.savefig(out / "return_vs_episode.png", dpi=100)
    plt.close(fig)
    # 2. final score vs training transitions
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for m in methods:
        xs = [cells[(m, b)]["transitions"] for b in budgets]
        ax.plot(xs, [cells[(m, b)]["best"] for b in budgets], "o-", label=f"{m} (best draw)")
        ax.plot(xs, [cells[(m, b)]["mean"] for b in budgets], "x--", alpha=0.6, label=f"{m} (mean)")
    ax.axhline(summary["threshold"], color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("training transitions")
    ax.set_ylabel("return / optimal")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "return_vs_transitions.png", dpi=100)
    plt.close(fig)
    # 3. EMP curves
    fig, axes = plt.subplots(1, len(budgets), figsize=(4 * len(budgets), 3.2), squeeze=False, sharey=True)
    for ax, b in zip(axes[0], budgets, strict=True):
        for m in methods:
            emp = cells[(m, b)]["emp"]
            ax.plot(np.arange(1, len(emp) + 1), emp, "o-", label=m)
        ax.set_title(f"{cells[(methods[0], b)]['transitions']:,} transitions")
        ax.set_xlabel("hyperparameter assignments")
    axes[0][0].set_ylabel("expected max return / optimal")
    axes[0][-1].legend()
    fig.tight_layout()
    fig.savefig(out / "emp.png", dpi=100)
    plt.close(fig)
