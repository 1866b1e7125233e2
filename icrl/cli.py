"""`llamba icrl generate|train|eval|run`: thin shells over histories / train / evaluate / runner."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import click
import numpy as np

ENVS = ("darkroom", "keytodoor")


def _load(env: str, config: str | None):
    from llamba.icrl.config import load_config

    try:
        return load_config(env, config)
    except (ValueError, FileNotFoundError, TypeError) as e:
        raise click.ClickException(f"bad config: {e}") from None


@contextmanager
def _bar(description: str, total: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        transient=True,
    ) as p:
        task = p.add_task(description, total=total)
        yield lambda k=1: p.advance(task, k)


env_option = click.option("--env", type=click.Choice(ENVS), required=True, help="Environment family.")
config_option = click.option(
    "--config",
    default=None,
    help="JSON config file or a shipped name (icrl/configs: "
    + ", ".join(
        sorted(p.stem for p in (Path(__file__).parent / "configs").glob("*.json"))
    )  # config.CONFIG_DIR
    + "); default: the env's.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def icrl() -> None:
    """In-context RL lab: Q-learning histories, Algorithm Distillation with n-gram layers, evaluation, grids."""


@icrl.command()
@env_option
@config_option
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="Output .npz file.")
def generate(env: str, config: str | None, out: str) -> None:
    """Generate Q-learning histories on the training tasks."""
    from llamba.icrl.histories import generate as gen

    cfg = _load(env, config)
    with _bar("Q-learning episodes", cfg.data.episodes_per_history) as advance:
        h, info = gen(cfg.spec, cfg.data, progress=advance)
    h.save(out)
    click.echo(f"{info['transitions']:,} transitions in {info['histories']} histories -> {out}")
    click.echo(
        f"return / optimal: first 10% of episodes {info['first']:.3f}, last 10% {info['last']:.3f}"
        + ("" if info["improves"] else "  (WARNING: histories do not improve)")
    )


@icrl.command("train")
@env_option
@config_option
@click.option("--data", "data_path", type=click.Path(dir_okay=False), required=True, help="Histories .npz.")
@click.option("--method", default="ngram", show_default=True, help="A method name from the config's grid.")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Output directory.")
def train_cmd(env: str, config: str | None, data_path: str, method: str, out: str) -> None:
    """Train one AD model (plain or n-gram) on saved histories."""
    import torch

    from llamba.icrl.train import train

    cfg = _load(env, config)
    if method not in cfg.grid.methods:
        raise click.ClickException(
            f"unknown method {method!r}; the config defines {sorted(cfg.grid.methods)}"
        )
    h = _load_histories(data_path, env)
    try:
        model_cfg = cfg.model_config(**cfg.grid.methods[method])
    except ValueError as e:
        raise click.ClickException(f"bad config: {e}") from None
    with _bar(f"training {method}", cfg.train.steps) as advance:
        try:
            model, losses = train(h, model_cfg, cfg.train, progress=advance)
        except ValueError as e:
            raise click.ClickException(str(e)) from None
    Path(out).mkdir(parents=True, exist_ok=True)
    torch.save(model.checkpoint(), Path(out) / "model.pt")
    (Path(out) / "losses.json").write_text(json.dumps(losses))
    click.echo(
        f"{model.num_params():,} parameters, {h.total_transitions:,} training transitions, "
        f"final loss {np.mean(losses[-20:]):.3f} -> {out}/model.pt"
    )


@icrl.command("eval")
@env_option
@config_option
@click.option("--checkpoint", type=click.Path(dir_okay=False), required=True, help="model.pt from `train`.")
@click.option("--train-tasks", is_flag=True, help="Evaluate on the training tasks instead of held-out ones.")
def eval_cmd(env: str, config: str | None, checkpoint: str, train_tasks: bool) -> None:
    """In-context evaluation: return per episode index on held-out tasks, greedy and sampled actions."""
    from dataclasses import replace

    import torch

    from llamba.icrl.evaluate import in_context_returns, score
    from llamba.icrl.model import ADTransformer, OldMarkerCheckpoint

    cfg = _load(env, config)
    if not Path(checkpoint).exists():
        raise click.ClickException(f"checkpoint {checkpoint} not found; train one with `llamba icrl train`")
    try:
        model = ADTransformer.from_checkpoint(torch.load(checkpoint, weights_only=False))
    except OldMarkerCheckpoint as e:
        raise click.ClickException(f"{checkpoint}: {e}") from None
    except Exception as e:  # any unreadable / foreign file
        raise click.ClickException(f"{checkpoint} is not an icrl checkpoint ({type(e).__name__})") from None
    if model.cfg.num_states != cfg.spec.num_states:
        raise click.ClickException(
            f"checkpoint was trained for {model.cfg.num_states} states, --env {env} has {cfg.spec.num_states}; "
            "pass the matching --env/--config"
        )
    train, test = cfg.spec.split(cfg.data.n_train_tasks, cfg.data.n_test_tasks, seed=cfg.data.split_seed)
    tasks = train if train_tasks else test
    optimal = cfg.spec.optimal_return(tasks)
    for greedy in (True, False):
        returns = in_context_returns(model, cfg.spec, tasks, replace(cfg.eval, greedy=greedy))
        curve = (returns / optimal[:, None]).mean(0)
        click.echo(
            f"{'greedy ' if greedy else 'sampled'} return / optimal per episode: "
            + " ".join(f"{v:.2f}" for v in curve)
        )
        click.echo(
            f"        score (last {cfg.eval.last_k} episodes, {len(tasks)} tasks): "
            f"{score(returns, optimal, cfg.eval.last_k):.3f}"
        )


@icrl.command()
@env_option
@config_option
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Output directory.")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Runs trained at once, each in its own process with one torch thread (use the core count).",
)
@click.option(
    "--methods",
    default=None,
    help="Comma-separated subset of the config's methods to run now (e.g. ad,ngram); the others can be run "
    "later into the same --out. Default: all.",
)
@click.option(
    "--draws",
    type=click.IntRange(min=1),
    default=None,
    help="Run only the first N of the config's hyperparameter draws now (each method and budget gets the same "
    "draws); a later run with a larger N, or none, into the same --out adds the rest. Default: all.",
)
@click.option(
    "--stack",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Train up to N runs of one model structure at once with stacked weights, and evaluate them at once "
    "(same rows; with dropout the noise is each run's own, not the one-at-a-time draws). 1: one at a time.",
)
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    help="Torch device of the stacked trainer (e.g. cuda); a device other than cpu trains stacked.",
)
def run(
    env: str,
    config: str | None,
    out: str,
    workers: int,
    methods: str | None,
    draws: int | None,
    stack: int,
    device: str,
) -> None:
    """Run the config's experiment grid; writes results.csv/.md, summary.json and PNG plots.

    Resumable: finished runs are kept in OUT/runs.jsonl, so re-running the same command after a kill continues
    where it stopped. A different config into an existing OUT is refused."""
    import torch

    from llamba.icrl.runner import StackOptions, run_grid

    cfg = _load(env, config)
    g = cfg.grid
    only = list(g.methods) if methods is None else [m.strip() for m in methods.split(",") if m.strip()]
    bad = [m for m in only if m not in g.methods]
    if bad or not only:
        raise click.ClickException(f"unknown --methods {bad}; the config defines {list(g.methods)}")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise click.ClickException(
            f"--device {device} is not usable here ({str(e).splitlines()[0]}); use cpu"
        ) from None
    n_draws = g.draws if draws is None else min(draws, g.draws)
    total = len(g.budgets) * len(only) * n_draws * cfg.train.steps
    with _bar("grid (train steps)", total) as advance:
        try:
            summary = run_grid(
                cfg,
                out,
                progress=advance,
                log=click.echo,
                workers=workers,
                methods=only,
                draws=n_draws,
                stack=StackOptions(stack, device),
            )
        except ValueError as e:
            raise click.ClickException(str(e)) from None
    click.echo((Path(out) / "results.md").read_text())
    click.echo(f"plots and tables in {out}/ ({', '.join(sorted(summary['transitions_to_threshold']))})")


@icrl.command()
@env_option
@config_option
@click.option("--out", type=click.Path(file_okay=False, exists=True), required=True, help="Run directory.")
def report(env: str, config: str | None, out: str) -> None:
    """Tables and plots from the runs finished so far in a run directory (e.g. of a stopped grid)."""
    from llamba.icrl.report import report as make_report

    cfg = _load(env, config)
    try:
        make_report(cfg, out)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo((Path(out) / "results.md").read_text())


def _load_histories(path: str, env: str):
    from llamba.icrl.histories import Histories

    if not Path(path).exists():
        raise click.ClickException(f"data file {path} not found; create it with `llamba icrl generate`")
    try:
        h = Histories.load(path)
    except (OSError, KeyError, ValueError) as e:
        raise click.ClickException(f"{path} is not a histories file ({e})") from None
    if h.env != env:
        raise click.ClickException(f"{path} holds {h.env} histories, not {env}; pass --env {h.env}")
    return h
