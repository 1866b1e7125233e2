"""Experiment grid: methods x data budgets x random hyperparameter draws -> CSV, Markdown, PNG plots.

Every method and budget gets the same hyperparameter draws (draw i is seeded by (grid.seed, i) alone, so shared
keys are paired), the same step budget, and nested data: budgets that differ only in ``n_train_tasks`` use
prefixes of one set of histories. Runs go in draw-major order, so a grid stopped early holds complete, paired
draws. Finished runs are appended to ``runs.jsonl`` in the run directory (see ``store.py``); a killed grid
re-run with the same command continues where it stopped.
"""

from __future__ import annotations

import csv
import io
import json
import os
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from llamba.atomic import atomic_write
from llamba.icrl.config import ExperimentConfig, draw_hparams, method_model_config, section_values  # noqa: F401
from llamba.icrl.evaluate import heldout_loss, in_context_returns, random_returns, score
from llamba.icrl.histories import Histories, generate, improvement, learning_histories
from llamba.icrl.metrics import efficiency_ratio, emp_band, share_at_least, sign_test
from llamba.icrl.store import RunStore
from llamba.icrl.train import train

EMP_N = 20  # EMP(n) is reported for n = 1..max(EMP_N, draws)
GOOD = 0.5  # "a working config": share of draws scoring at least this


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
    """Train one model with one hyperparameter assignment and evaluate it in context
    -> (row dict, normalised returns (tasks, episodes), model).
    ``test_h``: histories on the held-out tasks for the held-out imitation loss (skipped when None)."""
    model_cfg = method_model_config(cfg, method_overrides, hp)
    train_cfg = replace(cfg.train, **section_values(hp, "train"), seed=seed)
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


@dataclass
class Job:
    """One (method, budget, draw) run with everything a worker process needs."""

    key: tuple[str, int, int]  # (method, budget index, draw)
    cfg: ExperimentConfig
    h: Histories  # training histories of the budget
    test: np.ndarray  # held-out tasks
    test_h: Histories  # held-out histories (imitation loss)
    overrides: dict  # the method's model overrides
    hp: dict  # the draw's hyperparameters


def _run_job(job: Job, progress=None) -> tuple:
    """-> (key, row, mean normalised return per in-context episode); picklable for workers."""
    row, norm_returns, _ = run_one(
        job.cfg, job.h, job.test, job.overrides, job.hp, job.key[2], progress, job.test_h
    )
    return job.key, row, norm_returns.mean(0)


def _worker_init(parent: int) -> None:
    """Runs in every worker: exit as soon as the parent is gone (killed with -9 it cannot clean up)."""

    def watch():
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(0.25)

    threading.Thread(target=watch, daemon=True).start()


def run_spec(cfg: ExperimentConfig) -> dict:
    """The resolved config as JSON: what must match for a run directory to be resumed."""
    return {
        "env": cfg.spec.name,
        "env_kwargs": cfg.spec.kwargs,
        "context_episodes": cfg.context_episodes,
        "data": asdict(cfg.data),
        "model": cfg.raw,
        "train": {k: v for k, v in asdict(cfg.train).items() if k != "threads"},
        "eval": asdict(cfg.eval),
        "grid": asdict(cfg.grid),
    }


def budget_data(cfg: ExperimentConfig, log=print) -> list[dict]:
    """Per budget: its data config, training histories, held-out tasks and held-out histories. Budgets that
    differ only in n_train_tasks share one generation (the largest), so their data are nested."""
    out, cache = [], {}
    biggest: dict[str, int] = {}
    cfgs = [replace(cfg.data, **b) for b in cfg.grid.budgets]
    group = [json.dumps({**asdict(d), "n_train_tasks": 0}, sort_keys=True) for d in cfgs]
    for g, d in zip(group, cfgs, strict=True):
        biggest[g] = max(biggest.get(g, 0), d.n_train_tasks)
    for b_i, (g, d) in enumerate(zip(group, cfgs, strict=True)):
        if g not in cache:
            full, _ = generate(cfg.spec, replace(d, n_train_tasks=biggest[g]))
            _, test = cfg.spec.split(biggest[g], d.n_test_tasks, seed=d.split_seed)
            # the same learner on the held-out tasks (other seed): data for the held-out imitation loss
            test_h = learning_histories(cfg.spec, test, replace(d, histories_per_task=1, seed=d.seed + 1))
            cache[g] = (full, test, test_h)
        full, test, test_h = cache[g]
        h = full.take(d.n_train_tasks * d.histories_per_task)
        info = {"transitions": h.total_transitions, "histories": h.num_histories, **improvement(h)}
        log(
            f"budget {b_i}: {d.n_train_tasks} tasks, {info['transitions']:,} transitions "
            f"({info['histories']} histories), {d.source} first/last return {info['first']:.2f} -> "
            f"{info['last']:.2f} of optimal"
        )
        out.append({"data": d, "h": h, "test": test, "test_h": test_h, "info": info})
    return out


def run_grid(
    cfg: ExperimentConfig,
    out: str | Path,
    progress=None,
    log=print,
    workers: int = 1,
    methods: list[str] | None = None,
    draws: int | None = None,
) -> dict:
    """Run (or resume) the whole grid in run directory ``out``; writes results.csv, results.md, summary.json
    and plots there. ``workers`` > 1 trains that many runs at once in separate processes (one torch thread
    each), which die with the parent; the results are the same as with one worker and the same after a resume,
    since every run is seeded by its draw index. ``methods``: run only these of the grid's methods now;
    ``draws``: only the first this many of the grid's draws now (a later call with more extends the same grid)."""
    store = RunStore(out, run_spec(cfg))
    out = Path(out)
    g = cfg.grid
    data = budget_data(cfg, log)
    jobs = []
    n_draws = g.draws if draws is None else min(draws, g.draws)
    for draw in range(n_draws):
        hp = draw_hparams(g.search, g.seed, draw)
        for b_i, d in enumerate(data):
            for method, overrides in g.methods.items():
                if methods is not None and method not in methods:
                    continue
                jobs.append(Job((method, b_i, draw), cfg, d["h"], d["test"], d["test_h"], overrides, hp))
    done = store.load()
    todo = [j for j in jobs if j.key not in done]
    if done:
        log(f"resuming: {len(jobs) - len(todo)} of {len(jobs)} runs already done in {out}")
        if progress is not None:
            progress((len(jobs) - len(todo)) * cfg.train.steps)

    def record(key, row, curve):
        d = data[key[1]]
        row = {
            "method": key[0],
            "budget": key[1],
            "transitions": d["info"]["transitions"],
            "n_train_tasks": d["data"].n_train_tasks,
            "histories": d["info"]["histories"],
            "draw": key[2],
            **row,
        }
        store.append({"key": list(key), "row": row, "curve": [float(c) for c in curve]})
        log(
            f"  {key[0]:>8} budget {key[1]} draw {key[2]}: score {row['score']:.3f} (loss "
            f"{row['final_loss']:.3f}, held-out {row['test_loss']:.3f}, {row['train_s']}s train)"
        )

    if workers <= 1 or len(todo) <= 1:
        for job in todo:
            record(*_run_job(job, progress))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        pool = ProcessPoolExecutor(
            workers, mp_context=mp.get_context("spawn"), initializer=_worker_init, initargs=(os.getpid(),)
        )
        try:
            futures = [pool.submit(_run_job, job) for job in todo]
            for fut in as_completed(futures):
                record(*fut.result())
                if progress is not None:
                    progress(cfg.train.steps)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return report(cfg, out, repair=True)


def report(cfg: ExperimentConfig, out: str | Path, repair: bool = False) -> dict:
    """Tables, summary and plots from the finished runs in ``out`` (all of them, or those of a stopped grid:
    cells then hold the draws done so far, and paired statistics use the draws common to the cells). Safe to call
    while the grid is still running: it only reads ``runs.jsonl``."""
    out = Path(out)
    done = RunStore(out, run_spec(cfg)).load(repair)
    if not done:
        raise ValueError(f"{out} holds no finished runs yet")
    order = {m: i for i, m in enumerate(cfg.grid.methods)}
    keys = sorted(done, key=lambda k: (k[1], order.get(k[0], 99), k[2]))
    rows = [done[k]["row"] for k in keys]
    curves = {k: np.asarray(done[k]["curve"]) for k in keys}
    summary = summarize(rows, cfg.grid.threshold, n_max=max(EMP_N, cfg.grid.draws))
    summary["runs_done"], summary["runs_total"] = (
        len(rows),
        (len(cfg.grid.methods) * len(cfg.grid.budgets) * cfg.grid.draws),
    )
    summary["random"] = random_baseline(cfg)
    write_results(out, rows, summary, cfg)
    plot_results(out, rows, curves, summary, cfg.spec.name)
    return summary


def random_baseline(cfg: ExperimentConfig) -> dict:
    """The uniform random policy on the grid's held-out tasks (those of the first budget; every budget of a
    split seed shares them), scored like a run: its score and its mean normalised return per episode."""
    d = replace(cfg.data, **cfg.grid.budgets[0])
    _, test = cfg.spec.split(d.n_train_tasks, d.n_test_tasks, seed=d.split_seed)
    returns = random_returns(cfg.spec, test, cfg.eval.episodes, cfg.eval.seed)  # (tasks, episodes)
    norm = returns / cfg.spec.optimal_return(test)[:, None]
    return {"score": float(norm[:, -cfg.eval.last_k :].mean()), "mean": float(norm.mean())}


def summarize(rows: list[dict], threshold: float, n_max: int = EMP_N) -> dict:
    """Per (method, budget): draws, best (EMP at N), mean, share >= 0.5, EMP(1..n_max) with a bootstrap band;
    per budget: paired sign tests of every method against the first (the baseline); per method: goals and
    transitions to reach ``threshold`` with the best draw and the data-efficiency ratio with a paired bootstrap
    interval."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    budgets = sorted({r["budget"] for r in rows})
    out = {
        "threshold": threshold,
        "good": GOOD,
        "cells": [],
        "sign_tests": [],
        "transitions_to_threshold": {},
    }
    by = {(r["method"], r["budget"], r["draw"]): r for r in rows}
    for method in methods:
        reached = None
        for b in budgets:
            cell = [r for r in rows if r["method"] == method and r["budget"] == b]
            if not cell:
                continue
            scores = [r["score"] for r in cell]
            band = emp_band(scores, n_max, seed=b)
            out["cells"].append(
                {
                    "method": method,
                    "budget": b,
                    "transitions": cell[0]["transitions"],
                    "n_train_tasks": cell[0]["n_train_tasks"],
                    "draws": len(cell),
                    "params": int(np.mean([r["params"] for r in cell])),
                    "best": float(max(scores)),
                    "mean": float(np.mean(scores)),
                    "share_good": share_at_least(scores, GOOD),
                    "test_loss": float(np.nanmin([r["test_loss"] for r in cell])),
                    **band,
                }
            )
            if reached is None and max(scores) >= threshold:
                reached = cell[0]["transitions"]
        out["transitions_to_threshold"][method] = reached
    base = methods[0]
    # paired draws: those finished for every method at every budget
    common = sorted(
        set.intersection(*({k[2] for k in by if k[:2] == (m, b)} for m in methods for b in budgets))
    )
    out["paired_draws"] = len(common)
    for b in budgets:
        for m in methods[1:]:
            pairs = [d for d in sorted({k[2] for k in by}) if (m, b, d) in by and (base, b, d) in by]
            t = sign_test([by[(m, b, d)]["score"] for d in pairs], [by[(base, b, d)]["score"] for d in pairs])
            out["sign_tests"].append({"method": m, "baseline": base, "budget": b, "pairs": len(pairs), **t})
    out["data_efficiency"] = data_efficiency(out["transitions_to_threshold"])
    out["ratios"] = {}
    if common:
        goals = [by[(base, b, common[0])]["n_train_tasks"] for b in budgets]
        grid = {m: [[by[(m, b, d)]["score"] for d in common] for b in budgets] for m in methods}
        for m in methods[1:]:
            out["ratios"][m] = efficiency_ratio(goals, grid[base], grid[m], threshold)
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
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write(out / "results.csv", buf.getvalue())
    atomic_write(
        out / "summary.json", json.dumps({**summary, "config": run_spec(cfg)}, indent=1, default=str)
    )
    atomic_write(out / "results.md", markdown_table(summary, cfg))


def _f(v, fmt=".3f") -> str:
    return "n/a" if v is None else format(v, fmt)


def markdown_table(summary: dict, cfg: ExperimentConfig | None = None) -> str:
    lines = []
    if cfg is not None:
        d = cfg.data
        lines += [
            f"# {cfg.spec.name}: {' vs '.join(dict.fromkeys(c['method'] for c in summary['cells']))}",
            "",
            f"{summary.get('runs_done', '?')} of {summary.get('runs_total', '?')} runs finished "
            f"({summary['paired_draws']} complete paired draws). Source `{d.source}`, "
            f"{d.histories_per_task} histories per task, {d.episodes_per_history} episodes each, "
            + (
                f"every {d.subsample}th kept (deviation: AD's subsampling, not in the paper); "
                if d.subsample > 1
                else "all kept; "
            )
            + f"{cfg.train.steps} steps x batch {cfg.train.batch_size}; score = mean return / optimal over the "
            f"last {cfg.eval.last_k} of {cfg.eval.episodes} in-context episodes on {d.n_test_tasks} held-out "
            "tasks; bands are 90% bootstrap intervals over the draws.",
            "",
        ]
    lines += [
        f"| method | train tasks | transitions | params | draws | best | mean | share >= {summary['good']} | "
        "held-out loss | EMP(1) | EMP(5) | EMP(20) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]

    def at(c, n):
        i = min(n, len(c["emp"])) - 1
        return f"{c['emp'][i]:.2f} [{c['lo'][i]:.2f}, {c['hi'][i]:.2f}]"

    for c in summary["cells"]:
        lines.append(
            f"| {c['method']} | {c['n_train_tasks']} | {c['transitions']:,} | {c['params']:,} | {c['draws']} | "
            f"{c['best']:.3f} | {c['mean']:.3f} | {c['share_good']:.2f} | {c['test_loss']:.3f} | {at(c, 1)} | "
            f"{at(c, 5)} | {at(c, 20)} |"
        )
    if summary["sign_tests"]:
        lines += [
            "",
            "Paired sign tests (same draw, same data): wins / losses / ties against the baseline.",
            "",
        ]
        for t in summary["sign_tests"]:
            lines.append(
                f"- budget {t['budget']}: {t['method']} vs {t['baseline']}: {t['wins']} / {t['losses']} / "
                f"{t['ties']} of {t['pairs']} pairs, two-sided p = {t['p']:.3g}"
            )
    if "random" in summary:
        random_score = summary["random"]["score"]
        lines += ["", f"A uniform random policy scores {random_score:.3f} on the same tasks and episodes."]
    lines += ["", f"Transitions to reach {summary['threshold']:.0%} of the optimal return (best draw):", ""]
    for method, t in summary["transitions_to_threshold"].items():
        lines.append(f"- {method}: {'not reached' if t is None else f'{t:,}'}")
    for method, text in summary.get("data_efficiency", {}).items():
        lines.append(f"- data efficiency of {method}: {text}")
    for method, r in summary.get("ratios", {}).items():
        lines.append(
            f"- goals ratio {method}: {_f(r['ratio'], '.3g')} (baseline {r['goals_base']}, {method} "
            f"{r['goals_m']} goals; paired bootstrap over draws: both reach in {r['both_reach']:.0%}, "
            f"5-95% of the ratio {_f(r['lo'], '.3g')}-{_f(r['hi'], '.3g')}; only {method} reaches "
            f"{r['only_m']:.0%}, only the baseline {r['only_base']:.0%}, neither {r['neither']:.0%})"
        )
    return "\n".join(lines) + "\n"


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write(path, buf.getvalue())


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
            if not cell:
                continue
            best = max(cell, key=lambda r: r["score"])
            curve = curves[(m, b, best["draw"])]
            ax.plot(np.arange(1, len(curve) + 1), curve, label=m)
        ax.set_title(f"{cell[0]['n_train_tasks']} tasks, {cell[0]['transitions']:,} transitions", fontsize=9)
        ax.set_xlabel("episode in context")
    axes[0][0].set_ylabel("return / optimal (best draw)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"{env}: in-context return on held-out tasks")
    fig.tight_layout()
    _save(fig, out / "return_vs_episode.png")
    plt.close(fig)
    # 1b. the same over all draws (seeds): mean with a min-max band, and the random policy
    size = (max(6, 4 * len(budgets)), 3.6)
    fig, axes = plt.subplots(1, len(budgets), figsize=size, squeeze=False, sharey=True)
    for ax, b in zip(axes[0], budgets, strict=True):
        for m in methods:
            cell = [r for r in rows if r["method"] == m and r["budget"] == b]
            if not cell:
                continue
            cs = np.stack([curves[(m, b, r["draw"])] for r in cell])  # (draws, episodes)
            x = np.arange(1, cs.shape[1] + 1)
            line = ax.plot(x, cs.mean(0), label=f"{m} (mean of {len(cs)})")[0]
            ax.fill_between(x, cs.min(0), cs.max(0), color=line.get_color(), alpha=0.2)
        if "random" in summary:
            ax.axhline(summary["random"]["mean"], color="grey", lw=0.8, ls=":", label="random policy")
        ax.set_title(f"{cell[0]['n_train_tasks']} tasks, {cell[0]['transitions']:,} transitions", fontsize=9)
        ax.set_xlabel("episode in context")
    axes[0][0].set_ylabel("return / optimal")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"{env}: in-context return on held-out tasks (mean, band min-max over draws)", fontsize=10)
    fig.tight_layout()
    _save(fig, out / "return_vs_episode_draws.png")
    plt.close(fig)
    # 2. claim 1, data efficiency: EMP at 1, 5 and 20 draws vs training tasks, with bands
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), sharey=True)
    for ax, n in zip(axes, (1, 5, 20), strict=True):
        for m in methods:
            cs = [cells[(m, b)] for b in budgets if (m, b) in cells]
            xs = [c["n_train_tasks"] for c in cs]
            i = [min(n, len(c["emp"])) - 1 for c in cs]
            ys = [c["emp"][j] for c, j in zip(cs, i, strict=True)]
            line = ax.plot(xs, ys, "o-", label=m)[0]
            ax.fill_between(
                xs,
                [c["lo"][j] for c, j in zip(cs, i, strict=True)],
                [c["hi"][j] for c, j in zip(cs, i, strict=True)],
                color=line.get_color(),
                alpha=0.2,
            )
        ax.axhline(summary["threshold"], color="grey", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ticks = sorted({c["n_train_tasks"] for c in summary["cells"]})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("training tasks")
        ax.set_title(f"EMP({n}): expected best of {n} draws", fontsize=9)
    axes[0].set_ylabel("return / optimal")
    axes[-1].legend(fontsize=7)
    fig.suptitle(f"{env}: data efficiency (90% bootstrap bands)")
    fig.tight_layout()
    _save(fig, out / "return_vs_transitions.png")
    plt.close(fig)
    # 3. claim 2, hyperparameter robustness: EMP(n) curves with bands, one panel per budget
    fig, axes = plt.subplots(1, len(budgets), figsize=(4 * len(budgets), 3.2), squeeze=False, sharey=True)
    for ax, b in zip(axes[0], budgets, strict=True):
        for m in methods:
            if (m, b) not in cells:
                continue
            c = cells[(m, b)]
            x = np.arange(1, len(c["emp"]) + 1)
            line = ax.plot(x, c["emp"], "-", label=f"{m} ({c['draws']} draws)")[0]
            ax.fill_between(x, c["lo"], c["hi"], color=line.get_color(), alpha=0.2)
        c0 = next(cells[(m, b)] for m in methods if (m, b) in cells)
        ax.set_title(f"{c0['n_train_tasks']} tasks, {c0['transitions']:,} transitions", fontsize=9)
        ax.set_xlabel("hyperparameter assignments n")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("EMP(n): expected max return / optimal")
    fig.suptitle(f"{env}: hyperparameter robustness (90% bootstrap bands)")
    fig.tight_layout()
    _save(fig, out / "emp.png")
    plt.close(fig)
