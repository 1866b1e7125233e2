"""Experiment config: one JSON file with sections env / data / model / train / eval / grid.

Unknown keys are errors (a typo should not silently fall back to a default). ``model.seq_len`` defaults to
``context_episodes * horizon``; the env sets the state / action counts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from llamba.envs import EnvSpec
from llamba.icrl.evaluate import EvalConfig
from llamba.icrl.histories import DataConfig
from llamba.icrl.model import ADConfig
from llamba.icrl.train import TrainConfig

CONFIG_DIR = Path(__file__).parent / "configs"
SECTIONS = ("env", "data", "model", "train", "eval", "grid", "context_episodes")


@dataclass
class GridConfig:
    """The experiment grid of ``llamba icrl run``: methods x data budgets x random hyperparameter draws."""

    # method name -> model overrides (e.g. {"ngram_layers": [0]}); every method gets the same draws and steps
    methods: dict[str, dict] = field(default_factory=lambda: {"ad": {}, "ngram": {"ngram_layers": [0]}})
    # each budget overrides data fields (n_train_tasks, histories_per_task, ...)
    budgets: list[dict] = field(default_factory=lambda: [{"n_train_tasks": 8}, {"n_train_tasks": 32}])
    draws: int = 3  # random hyperparameter assignments per (method, budget)
    # "section.field" -> ["log", lo, hi] | ["uniform", lo, hi] | ["choice", [options]]; keys of a section a
    # method does not use (e.g. model.ngram_* for plain AD) are still drawn, so shared keys stay paired
    search: dict[str, list] = field(default_factory=lambda: {"train.lr": ["log", 3e-4, 3e-3]})
    threshold: float = 0.9  # fraction of the optimal return that counts as "reached"
    seed: int = 0

    def __post_init__(self):
        if self.draws < 1 or not self.methods or not self.budgets:
            raise ValueError("grid.draws must be >= 1 and grid.methods / grid.budgets non-empty")
        for key, rule in self.search.items():
            section = key.split(".")[0]
            if section not in ("model", "train") or "." not in key:
                raise ValueError(f"grid.search key {key!r} must look like 'model.<field>' or 'train.<field>'")
            if not (isinstance(rule, list) and rule and rule[0] in ("log", "uniform", "choice")):
                raise ValueError(
                    f"grid.search[{key!r}] must be ['log'|'uniform', lo, hi] or ['choice', [...]]"
                )


@dataclass
class ExperimentConfig:
    spec: EnvSpec
    data: DataConfig
    model: ADConfig
    train: TrainConfig
    eval: EvalConfig
    grid: GridConfig
    context_episodes: int = 4
    raw: dict = field(default_factory=dict)  # the model section as written (methods and draws override it)

    def model_config(self, **overrides: Any) -> ADConfig:
        return build_model_config(self.spec, self.raw, self.context_episodes, overrides)


def _check_keys(section: str, given: dict, cls) -> None:
    allowed = {f.name for f in fields(cls)}
    bad = set(given) - allowed
    if bad:
        raise ValueError(
            f"unknown key(s) {sorted(bad)} in config section '{section}'; allowed: {sorted(allowed)}"
        )


def build_model_config(spec: EnvSpec, model: dict, context_episodes: int, overrides: dict) -> ADConfig:
    merged = {**model, **overrides}
    _check_keys("model", merged, ADConfig)
    merged.setdefault("seq_len", context_episodes * spec.horizon)
    return ADConfig(
        num_states=spec.num_states,
        num_actions=spec.num_actions,
        num_rewards=spec.num_rewards,
        **{k: v for k, v in merged.items() if k not in ("num_states", "num_actions", "num_rewards")},
    )


def resolve_path(config: str | None, env: str) -> Path:
    """None -> the shipped config of the env; a shipped name ("tiny") or a file path."""
    if config is None:
        return CONFIG_DIR / f"{env}.json"
    shipped = CONFIG_DIR / f"{config}.json"
    if "/" not in config and shipped.exists():
        return shipped
    path = Path(config)
    if not path.exists():
        names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
        raise FileNotFoundError(f"config {config!r} not found; pass a JSON file or a shipped name ({names})")
    return path


def load_config(env: str, config: str | None = None) -> ExperimentConfig:
    """Raises ValueError / FileNotFoundError with a one-line message on bad input."""
    path = resolve_path(config, env)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object with sections {SECTIONS}")
    bad = set(raw) - set(SECTIONS)
    if bad:
        raise ValueError(f"unknown section(s) {sorted(bad)} in {path}; allowed: {list(SECTIONS)}")
    spec = EnvSpec(env, raw.get("env", {}))
    parts = {}
    for name, cls in (
        ("data", DataConfig),
        ("train", TrainConfig),
        ("eval", EvalConfig),
        ("grid", GridConfig),
    ):
        _check_keys(name, raw.get(name, {}), cls)
        parts[name] = cls(**raw.get(name, {}))
    context = int(raw.get("context_episodes", 4))
    if context < 1:
        raise ValueError("context_episodes must be >= 1")
    model = build_model_config(spec, raw.get("model", {}), context, {})
    return ExperimentConfig(spec, model=model, context_episodes=context, raw=raw.get("model", {}), **parts)
