"""Stacked training and evaluation (icrl/stacked.py): K same-shape models at once equal K runs of ``train()`` /
``in_context_returns``, each with its own seed, data and hyperparameters; the grid through stacks equals the grid
one run at a time."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import rel_err

from llamba.envs import EnvSpec
from llamba.icrl.cli import icrl
from llamba.icrl.config import load_config
from llamba.icrl.evaluate import EvalConfig, in_context_returns
from llamba.icrl.histories import DataConfig, generate
from llamba.icrl.model import ADConfig, ADTransformer
from llamba.icrl.runner import Job, StackOptions, budget_data, run_grid, stack_jobs
from llamba.icrl.stacked import StackedAD, StackRun, stacked_in_context_returns, train_stacked
from llamba.icrl.train import TrainConfig, train


@pytest.fixture(scope="module")
def histories():
    spec = EnvSpec("darkroom")
    h, _ = generate(spec, DataConfig(n_train_tasks=4, histories_per_task=2, episodes_per_history=8, lr=0.9))
    return h


def _model(**kw) -> ADConfig:
    base = dict(d_model=16, n_layers=2, n_heads=2, mlp_ratio=2, seq_len=40, state_emb="rowcol")
    return ADConfig(**{**base, "dropout": 0.0, "attn_dropout": 0.0, "emb_dropout": 0.0, **kw})


def _runs(h, models: list[ADConfig], **train_kw) -> list[StackRun]:
    """Runs that differ in seed, data (a prefix of h), lr, weight decay, beta1, label smoothing and clip norm."""
    hp = [
        dict(lr=3e-3, weight_decay=1e-2, beta1=0.9, label_smoothing=0.0, grad_clip=1.0),
        dict(lr=1e-3, weight_decay=0.3, beta1=0.5, label_smoothing=0.2, grad_clip=0.05),
        dict(lr=8e-3, weight_decay=1e-5, beta1=0.95, label_smoothing=0.1, grad_clip=3.0),
    ]
    out = []
    for i, m in enumerate(models):
        cfg = TrainConfig(steps=25, batch_size=4, seed=11 + i, **{**hp[i % 3], **train_kw})
        out.append(StackRun(h.take(4 + 2 * (i % 3)), m, cfg))
    return out


CASES = {
    "ad": [_model(), _model(), _model()],
    # n-gram layer at block 1 with different order sets: the stack holds orders [1, 2, 3], each model its own
    "ngram": [_model(ngram_layers=[1], ngram_orders=o) for o in ([1], [1, 2], [3])],
    "marker_cell": [_model(episode_marker=True, state_emb="cell") for _ in range(2)],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_stacked_training_equals_one_at_a_time(histories, case):
    """Without dropout, K stacked models follow train() with the same seeds and data: losses and weights."""
    runs = _runs(histories, CASES[case])
    stacked = train_stacked(runs)
    for run, (model, losses) in zip(runs, stacked, strict=True):
        ref, ref_losses = train(run.h, run.model, run.train)
        err = rel_err(torch.tensor(losses), torch.tensor(ref_losses))
        print(case, "loss rel err", err)
        assert err < 1e-5
        ref_params = dict(ref.named_parameters())
        assert set(ref_params) == {n for n, _ in model.named_parameters()}  # exactly its own heads
        errs = {name: rel_err(p, ref_params[name]) for name, p in model.named_parameters()}
        flat = lambda m: torch.cat([p.detach().flatten() for _, p in sorted(m.named_parameters())])
        print(case, "param rel err: all", rel_err(flat(model), flat(ref)), "worst", max(errs.values()))
        assert rel_err(flat(model), flat(ref)) < 1e-5
        # the key bias has no true gradient (softmax ignores a shift shared by all keys): Adam turns its rounding
        # noise into lr-sized steps, so it is the least reproducible tensor; every other one is far tighter
        assert max(errs.values()) < 1e-3, errs
        assert model.num_params() == ref.num_params()


def test_per_model_hyperparameters_act_per_model(histories):
    """The same seed and data with lr 1e-9 vs 1e-2 in one stack: the first barely moves, the second does."""
    m = _model()
    runs = [StackRun(histories, m, TrainConfig(steps=20, batch_size=4, lr=lr, seed=3)) for lr in (1e-9, 1e-2)]
    torch.manual_seed(3)
    init = ADTransformer(m)
    (slow, _), (fast, _) = train_stacked(runs)
    moved = lambda model: max(
        (p - q).abs().max().item() for p, q in zip(model.parameters(), init.parameters(), strict=True)
    )
    assert moved(slow) < 1e-7 and moved(fast) > 1e-3


def test_dropout_is_each_runs_own(histories):
    """With dropout, a run's result does not depend on its stack companions, and the dropout is really applied."""
    drop = _model(dropout=0.2, attn_dropout=0.3, emb_dropout=0.1)
    runs = _runs(histories, [drop, _model(dropout=0.5, attn_dropout=0.1, emb_dropout=0.4)])
    alone = train_stacked(runs[:1])[0][1]
    together = train_stacked(runs)[0][1]
    assert rel_err(torch.tensor(together), torch.tensor(alone)) < 1e-5
    no_drop = train_stacked([runs[0]._replace(model=_model())])[0][1]
    assert rel_err(torch.tensor(alone), torch.tensor(no_drop)) > 1e-3


@pytest.mark.parametrize("env, greedy", [("darkroom", False), ("keytodoor", True), ("keytodoor", False)])
def test_stacked_evaluation_equals_one_at_a_time(env, greedy):
    """Stacked in-context rollouts give each model the returns in_context_returns gives it (Key-to-Door: episodes
    end at the door, so contexts are ragged across tasks and models)."""
    spec = EnvSpec(env)
    tasks = spec.split(8, 6)[1]
    n = dict(num_states=spec.num_states, num_actions=spec.num_actions, num_rewards=spec.num_rewards)
    cfgs = [_model(**n, seq_len=30, ngram_layers=[0], ngram_orders=o) for o in ([1], [1, 2])]
    models = []
    for seed, c in enumerate(cfgs):
        torch.manual_seed(seed)
        m = ADTransformer(c).eval()
        with torch.no_grad():
            m.head.weight.mul_(50.0)  # sharper policies than at init, so returns differ between models
        models.append(m)
    evals = [EvalConfig(episodes=3, last_k=1, greedy=greedy, seed=s) for s in (5, 6)]
    got = stacked_in_context_returns(StackedAD(models, [0, 1]), spec, tasks, evals)
    for m, e, g in zip(models, evals, got, strict=True):
        np.testing.assert_array_equal(g, in_context_returns(m, spec, tasks, e))


res_args = lambda tmp: ["run", "--env", "darkroom", "--config", "tiny", "--out", str(tmp / "st")]


def test_grid_through_stacks_equals_the_grid_one_at_a_time(tmp_path):
    """The tiny grid (no dropout) with --stack: the same runs, rows and curves as one run at a time."""
    cfg = load_config("darkroom", "tiny")
    run_grid(cfg, tmp_path / "one", log=lambda s: None)
    res = CliRunner().invoke(icrl, [*res_args(tmp_path), "--stack", "4"])
    assert res.exit_code == 0, res.output
    load = lambda d: {tuple(r["key"]): r for r in map(json.loads, open(tmp_path / d / "runs.jsonl"))}
    one, st = load("one"), load("st")
    assert len(one) == 8 and set(one) == set(st)
    for key, rec in one.items():
        ra, rb = rec["row"], st[key]["row"]
        assert set(ra) == set(rb)
        for col, va in ra.items():
            if col in ("score", "final_loss", "test_loss"):
                assert rb[col] == pytest.approx(va, rel=1e-4, abs=1e-6), (key, col)
            elif not col.endswith("_s"):  # timings differ
                assert rb[col] == va, (key, col)
        np.testing.assert_allclose(st[key]["curve"], rec["curve"], rtol=1e-4, atol=1e-6)
    assert "resuming: 8 of 8" in CliRunner().invoke(icrl, [*res_args(tmp_path), "--stack", "4"]).output


def test_stack_jobs_groups_by_structure():
    cfg = load_config("darkroom", "tiny")
    data = budget_data(cfg, log=lambda s: None)
    from llamba.icrl.config import draw_hparams

    jobs = [
        Job(
            (m, b, d),
            cfg,
            data[b]["h"],
            data[b]["test"],
            None,
            cfg.grid.methods[m],
            draw_hparams(cfg.grid.search, 0, d),
        )
        for d in range(3)
        for b in range(2)
        for m in ("ad", "ngram")
    ]
    stacks = stack_jobs(jobs, 4)
    assert sorted(len(s) for s in stacks) == [3, 3, 3, 3]  # 6 ad and 6 ngram (orders differ, shapes do not)
    assert all(len({j.key[0] for j in s}) == 1 for s in stacks)
    assert sorted(j.key for s in stacks for j in s) == sorted(j.key for j in jobs)
    assert stacks[0][0].key == ("ad", 0, 0)
    assert sorted(len(s) for s in stack_jobs(jobs, 6)) == [6, 6]
    assert sorted(len(s) for s in stack_jobs(jobs, 6, workers=2)) == [
        3,
        3,
        3,
        3,
    ]  # equal shares for 2 workers


def test_bad_stacks_are_refused(histories, tmp_path):
    with pytest.raises(ValueError, match="share their structure"):
        StackedAD([ADTransformer(_model()), ADTransformer(_model(n_layers=3))], [0, 1])
    runs = _runs(histories, [_model(), _model()])
    with pytest.raises(ValueError, match="train.steps and train.batch_size"):
        train_stacked([runs[0], runs[1]._replace(train=replace(runs[1].train, steps=3))])
    with pytest.raises(ValueError, match="--stack must be an integer >= 1"):
        StackOptions(0)
    args = ["run", "--env", "darkroom", "--config", "tiny", "--out", str(tmp_path)]
    res = CliRunner().invoke(icrl, [*args, "--device", "nodevice"])
    assert (
        res.exit_code != 0
        and "--device nodevice is not usable" in res.output
        and "Traceback" not in res.output
    )
    res = CliRunner().invoke(icrl, [*args, "--stack", "0"])
    assert res.exit_code != 0 and "Traceback" not in res.output


def test_stacked_grid_in_worker_processes(tmp_path):
    """Stacks trained in 2 worker processes give the rows of stacks trained in this process."""
    cfg = load_config("darkroom", "tiny")
    load = lambda d: {tuple(r["key"]): r for r in map(json.loads, open(tmp_path / d / "runs.jsonl"))}
    run_grid(cfg, tmp_path / "here", log=lambda s: None, stack=StackOptions(4))
    run_grid(cfg, tmp_path / "workers", log=lambda s: None, workers=2, stack=StackOptions(4))
    here, there = load("here"), load("workers")
    assert set(here) == set(there) and len(here) == 8
    for key, rec in here.items():
        assert there[key]["row"]["score"] == pytest.approx(rec["row"]["score"], rel=1e-4, abs=1e-6)
        assert there[key]["row"]["final_loss"] == pytest.approx(rec["row"]["final_loss"], rel=1e-4)
