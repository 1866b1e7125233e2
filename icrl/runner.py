"""Experiment grid: methods x data budgets x random hyperparameter draws -> CSV, Markdown, PNG plots.

Every method and budget gets the same hyperparameter draws (draw i is seeded by (grid.seed, i) alone, so shared
keys are paired), the same step budget, and nested data: budgets that differ only in ``n_train_tasks`` use
prefixes of one set of histories. Runs go in draw-major order, so a grid stopped early holds complete, paired
draws. Finished runs are appended to ``runs.jsonl`` in the run directory (see ``store.py``); a killed grid
re-run with the same command continues where it stopped.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np

from llamba.icrl.config import ExperimentConfig, draw_hparams, method_model_config, run_spec, section_values
from llamba.icrl.evaluate import heldout_loss, in_context_returns, score
from llamba.icrl.histories import Histories, generate, improvement, learning_histories
from llamba.icrl.report import report
from llamba.icrl.stacked import StackedAD, StackRun, stacked_in_context_returns, structure_key, train_stacked
from llamba.icrl.store import RunStore
from llamba.icrl.train import train


def run_configs(cfg: ExperimentConfig, method_overrides: dict, hp: dict, seed: int):
    """-> (model config, train config) of one run: the method's model under the draw, the drawn train keys, the
    run's seed."""
    return method_model_config(cfg, method_overrides, hp), replace(
        cfg.train, **section_values(hp, "train"), seed=seed
    )


def result_row(cfg: ExperimentConfig, model, losses, returns, optimal, test_loss, hp: dict, seconds) -> dict:
    """The row of one trained and evaluated run; returns: (tasks, episodes), optimal: (tasks,); seconds: (train,
    eval) spent on this run (with a stack: its share)."""
    return {
        "score": score(returns, optimal, cfg.eval.last_k),
        "final_loss": float(np.mean(losses[-20:])),
        "test_loss": test_loss,
        "params": model.num_params(),
        "train_s": round(seconds[0], 1),
        "eval_s": round(seconds[1], 1),
        **{f"hp.{k}": v for k, v in hp.items()},
    }


def _heldout(model, test_h) -> float:
    return heldout_loss(model, test_h) if test_h is not None else float("nan")


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
    model_cfg, train_cfg = run_configs(cfg, method_overrides, hp, seed)
    t0 = time.time()
    model, losses = train(h, model_cfg, train_cfg, progress)
    t_train = time.time() - t0
    returns = in_context_returns(model, cfg.spec, test_tasks, replace(cfg.eval, seed=seed))
    optimal = cfg.spec.optimal_return(test_tasks)
    test_loss = _heldout(model, test_h)
    t_eval = time.time() - t0 - t_train
    row = result_row(cfg, model, losses, returns, optimal, test_loss, hp, (t_train, t_eval))
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


@dataclass
class StackOptions:
    """How ``run_grid`` trains: ``size`` > 1 trains up to that many runs of one model structure at once with
    stacked weights (icrl/stacked.py) and evaluates them at once; ``device`` runs that on e.g. "cuda"."""

    size: int = 1
    device: str = "cpu"

    def __post_init__(self):
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"--stack must be an integer >= 1, got {self.size!r}")

    @property
    def stacked(self) -> bool:
        return self.size > 1 or self.device != "cpu"


def stack_jobs(jobs: list[Job], size: int, workers: int = 1) -> list[list[Job]]:
    """Jobs in stacks of at most ``size`` runs of one model structure, of near-equal sizes, each keeping the jobs'
    order; a structure's stack count is rounded up to a multiple of ``workers`` (while it has the jobs) so the
    workers get equal shares. The stacks are ordered by their first job (a draw-major list stays draw-major)."""
    groups: dict[str, list[tuple[int, Job]]] = {}
    for i, job in enumerate(jobs):
        key = structure_key(method_model_config(job.cfg, job.overrides, job.hp))
        groups.setdefault(key, []).append((i, job))
    stacks = []
    for group in groups.values():
        n = -(-len(group) // size)
        n = min(len(group), -(-n // workers) * workers)
        stacks += [group[j * len(group) // n : (j + 1) * len(group) // n] for j in range(n)]
    stacks.sort(key=lambda st: st[0][0])
    return [[job for _, job in st] for st in stacks]


def _run_stack(jobs: list[Job], device: str = "cpu", progress=None) -> list[tuple]:
    """Train the jobs (one model structure) as one stack and evaluate them together -> per job (key, row, mean
    normalised return per in-context episode), as ``_run_job`` gives them; picklable for workers. Each row's
    train_s / eval_s is its share of the stack's time."""
    cfg = jobs[0].cfg
    runs = [StackRun(j.h, *run_configs(j.cfg, j.overrides, j.hp, j.key[2])) for j in jobs]
    t0 = time.time()
    trained = train_stacked(runs, device, progress)
    t_train = (time.time() - t0) / len(jobs)
    returns: list = [None] * len(jobs)
    by_tasks: dict[bytes, list[int]] = {}  # one stacked evaluation per set of held-out tasks
    for i, j in enumerate(jobs):
        by_tasks.setdefault(np.ascontiguousarray(j.test).tobytes(), []).append(i)
    for idx in by_tasks.values():
        stack = StackedAD([trained[i][0] for i in idx], [jobs[i].key[2] for i in idx], device)
        evals = [replace(cfg.eval, seed=jobs[i].key[2]) for i in idx]
        for i, r in zip(
            idx, stacked_in_context_returns(stack, cfg.spec, jobs[idx[0]].test, evals), strict=True
        ):
            returns[i] = r
    test_losses = [_heldout(model, j.test_h) for j, (model, _) in zip(jobs, trained, strict=True)]
    t_eval = (time.time() - t0) / len(jobs) - t_train
    out = []
    for j, (model, losses), ret, test_loss in zip(jobs, trained, returns, test_losses, strict=True):
        optimal = cfg.spec.optimal_return(j.test)
        row = result_row(cfg, model, losses, ret, optimal, test_loss, j.hp, (t_train, t_eval))
        out.append((j.key, row, (ret / optimal[:, None]).mean(0)))
    return out


def _run_single(jobs: list[Job], progress=None) -> list[tuple]:
    """One job, unstacked (``train``): [(key, row, curve)]."""
    (job,) = jobs
    return [_run_job(job, progress)]


def _worker_init(parent: int) -> None:
    """Runs in every worker: exit as soon as the parent is gone (killed with -9 it cannot clean up)."""

    def watch():
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(0.25)

    threading.Thread(target=watch, daemon=True).start()


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
    stack: StackOptions | None = None,
) -> dict:
    """Run (or resume) the whole grid in run directory ``out``; writes results.csv, results.md, summary.json
    and plots there. ``workers`` > 1 trains that many runs at once in separate processes (one torch thread
    each), which die with the parent; the results are the same as with one worker and the same after a resume,
    since every run is seeded by its draw index. ``methods``: run only these of the grid's methods now;
    ``draws``: only the first this many of the grid's draws now (a later call with more extends the same grid).
    ``stack``: train runs of one model structure together (see ``StackOptions``); a stopped stacked grid keeps
    its finished stacks, and each worker runs whole stacks."""
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

    opts = stack if stack is not None else StackOptions()
    if opts.stacked:
        units, run_unit = stack_jobs(todo, opts.size, workers), partial(_run_stack, device=opts.device)
    else:
        units, run_unit = [[job] for job in todo], _run_single
    if workers <= 1 or len(units) <= 1:
        for unit in units:
            for result in run_unit(unit, progress=progress):
                record(*result)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        pool = ProcessPoolExecutor(
            workers, mp_context=mp.get_context("spawn"), initializer=_worker_init, initargs=(os.getpid(),)
        )
        try:
            futures = {pool.submit(run_unit, unit): len(unit) for unit in units}
            for fut in as_completed(futures):
                for result in fut.result():
                    record(*result)
                if progress is not None:
                    progress(cfg.train.steps * futures[fut])
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return report(cfg, out, repair=True)
