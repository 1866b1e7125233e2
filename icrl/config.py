"""Experiment config: one JSON file with sections env / data / model / train / eval / grid.

Unknown keys are errors (a typo should not silently fall back to a default). ``model.seq_len`` defaults to
``context_episodes * horizon``; the env sets the state / action counts.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

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
        if not isinstance(self.draws, int) or self.draws < 1:
            raise ValueError(f"grid.draws must be an integer >= 1, got {self.draws!r}")
        if not isinstance(self.methods, dict) or not self.methods:
            raise ValueError("grid.methods must be a non-empty object: method name -> model overrides")
        if not isinstance(self.budgets, list) or not self.budgets:
            raise ValueError("grid.budgets must be a non-empty list of data overrides")
        if not 0 < self.threshold <= 1:
            raise ValueError(
                f"grid.threshold must be in (0, 1] (a fraction of the optimum), got {self.threshold}"
            )
        for name, over in self.methods.items():
            if not isinstance(over, dict):
                raise ValueError(f"grid.methods[{name!r}] must be an object of model overrides")
            _check_keys(f"grid.methods[{name!r}]", over, ADConfig)
        for i, budget in enumerate(self.budgets):
            if not isinstance(budget, dict):
                raise ValueError(f"grid.budgets[{i}] must be an object of data overrides")
            _check_keys(f"grid.budgets[{i}]", budget, DataConfig)
        valid = sorted(
            [f"model.{f.name}" for f in fields(ADConfig) if f.name not in _ENV_FIELDS]
            + [f"train.{f.name}" for f in fields(TrainConfig) if f.name != "seed"]
        )
        for key, rule in self.search.items():
            if key not in valid:
                raise ValueError(f"grid.search key {key!r} is not a model / train field; valid: {valid}")
            if not (isinstance(rule, list) and rule and rule[0] in ("log", "uniform", "choice")):
                raise ValueError(
                    f"grid.search[{key!r}] must be ['log'|'uniform', lo, hi] or ['choice', [...]]"
                )
            if rule[0] == "choice":
                if len(rule) != 2 or not isinstance(rule[1], list) or not rule[1]:
                    raise ValueError(f"grid.search[{key!r}]: 'choice' needs one non-empty list of options")
                continue
            lo_hi = rule[1:]
            if len(lo_hi) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in lo_hi):
                raise ValueError(f"grid.search[{key!r}]: {rule[0]!r} needs two finite numbers lo, hi")
            lo, hi = lo_hi
            if lo > hi:
                raise ValueError(f"grid.search[{key!r}]: low {lo} > high {hi}")
            if rule[0] == "log" and lo <= 0:
                raise ValueError(f"grid.search[{key!r}]: 'log' needs 0 < low, got {lo}")


_ENV_FIELDS = ("num_states", "num_actions", "num_rewards")


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
    """Unknown keys are an error that lists the valid ones."""
    allowed = {f.name for f in fields(cls)}
    if cls is ADConfig:
        allowed -= set(_ENV_FIELDS)  # set by the env
    bad = set(given) - allowed
    if bad:
        raise ValueError(
            f"unknown key(s) {sorted(bad)} in config section '{section}'; valid: {sorted(allowed)}"
        )


def validate(cfg: ExperimentConfig) -> None:
    """Cross-section checks of a loaded config: env ranges, every budget's data and split, every method's model
    (with the first draw), and histories long enough for the context window."""
    spec = cfg.spec
    for name, low in (("size", 2), ("horizon", 1)):
        v = spec.kwargs.get(name)
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise ValueError(f"env.{name} must be an integer >= {low}, got {v!r}")
    g = cfg.grid
    for i, budget in enumerate(g.budgets):
        try:
            d = replace(cfg.data, **budget)
        except ValueError as e:
            raise ValueError(f"grid.budgets[{i}]: {e}") from None
        if d.n_test_tasks < 1:
            raise ValueError("data.n_test_tasks must be >= 1 for a grid (runs are scored on held-out tasks)")
        spec.split(
            d.n_train_tasks, d.n_test_tasks, seed=d.split_seed
        )  # raises when the env has too few tasks
        kept = -(-d.episodes_per_history // d.subsample)
        if spec.fixed_length and kept * spec.horizon < cfg.model.seq_len:
            raise ValueError(
                f"grid.budgets[{i}]: a history keeps {kept} episodes x {spec.horizon} steps, fewer than "
                f"model.seq_len={cfg.model.seq_len}; raise data.episodes_per_history or lower context_episodes"
            )
    hp = draw_hparams(g.search, g.seed, 0)
    for name, over in g.methods.items():
        try:
            method_model_config(cfg, over, hp)
            replace(cfg.train, **{k.split(".", 1)[1]: v for k, v in hp.items() if k.startswith("train.")})
        except (ValueError, TypeError) as e:
            raise ValueError(f"grid.methods[{name!r}] with the drawn hyperparameters: {e}") from None


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
    for name in ("data", "train", "eval", "grid", "model", "env"):
        if not isinstance(raw.get(name, {}), dict):
            raise ValueError(f"config section '{name}' must be a JSON object")
    spec = EnvSpec(env, raw.get("env", {}))
    parts = {}
    for name, cls in (
        ("data", DataConfig),
        ("train", TrainConfig),
        ("eval", EvalConfig),
        ("grid", GridConfig),
    ):
        _check_keys(name, raw.get(name, {}), cls)
        try:
            parts[name] = cls(**raw.get(name, {}))
        except TypeError as e:
            raise ValueError(f"config section '{name}' holds a value of the wrong type ({e})") from None
    context = raw.get("context_episodes", 4)
    if not isinstance(context, int) or isinstance(context, bool) or context < 1:
        raise ValueError(f"context_episodes must be an integer >= 1, got {context!r}")
    model = build_model_config(spec, raw.get("model", {}), context, {})
    cfg = ExperimentConfig(spec, model=model, context_episodes=context, raw=raw.get("model", {}), **parts)
    validate(cfg)
    return cfg


# Hyperparameter draws of a grid (grid.search), and the model config of one method under one draw.
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


def section_values(hp: dict, section: str) -> dict:
    """The drawn keys of one config section, without the prefix: {"train.lr": x} -> {"lr": x} for "train"."""
    return {k.split(".", 1)[1]: v for k, v in hp.items() if k.startswith(section + ".")}


def method_model_config(cfg: ExperimentConfig, method_overrides: dict, hp: dict):
    """The model config of one method under one draw: the config's model section, the method's overrides, then
    the drawn model.* keys (n-gram keys only for methods with n-gram layers; a drawn layer position replaces the
    method's default)."""
    model_hp = section_values(hp, "model")
    if not method_overrides.get("ngram_layers"):  # plain AD: n-gram keys are drawn but have no effect
        model_hp = {k: v for k, v in model_hp.items() if not k.startswith("ngram")}
    elif "ngram_layers" in model_hp:
        model_hp["ngram_layers"] = list(model_hp["ngram_layers"])
    return cfg.model_config(**{**method_overrides, **model_hp})


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
