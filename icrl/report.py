"""The grid's report: per (method, budget) the score statistics of its draws (EMP with bootstrap bands, share of
working draws, paired sign tests against the first method, data efficiency), the random-policy baseline, then
results.csv / results.md / summary.json and the PNG plots. Reads only the run store (``runs.jsonl``), so it is
safe while a grid still runs; the grid itself is ``runner.py``.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from llamba.atomic import atomic_write
from llamba.icrl.config import ExperimentConfig, run_spec
from llamba.icrl.evaluate import random_returns
from llamba.icrl.metrics import efficiency_ratio, emp_band, share_at_least, sign_test
from llamba.icrl.store import RunStore

EMP_N = 20  # EMP(n) is reported for n = 1..max(EMP_N, draws)
GOOD = 0.5  # "a working config": share of draws scoring at least this


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
