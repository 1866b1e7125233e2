"""End-to-end: the tiny grid through the CLI, CLI error messages, hyperparameter draws."""

import csv
import json
import time

import pytest
from click.testing import CliRunner

from llamba.icrl.cli import icrl
from llamba.icrl.config import draw_hparams, load_config
from llamba.icrl.report import data_efficiency


def test_tiny_run_end_to_end(tmp_path):
    t0 = time.time()
    res = CliRunner().invoke(icrl, ["run", "--env", "darkroom", "--config", "tiny", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert time.time() - t0 < 60
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert len(rows) == 2 * 2 * 2  # budgets x methods x draws
    assert {r["method"] for r in rows} == {"ad", "ngram"}
    assert [int(r["transitions"]) for r in rows[:1]] == [2 * 2 * 8 * 20]
    for r in rows:
        assert 0.0 <= float(r["score"]) <= 1.0
    # both methods got the same hyperparameter draws
    by = {(r["method"], r["budget"], r["draw"]): r["hp.train.lr"] for r in rows}
    assert all(by[("ad", b, d)] == by[("ngram", b, d)] for (_, b, d) in by)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["cells"]) == 4 and all(len(c["emp"]) == 20 for c in summary["cells"])
    assert summary["paired_draws"] == 2 and len(summary["sign_tests"]) == 2
    assert 0 <= summary["random"]["score"] < 0.5 and 0 <= summary["random"]["mean"] < 0.5
    assert "random policy scores" in (tmp_path / "results.md").read_text()
    plots = ("return_vs_episode.png", "return_vs_episode_draws.png", "return_vs_transitions.png", "emp.png")
    for name in ("results.md", *plots):
        assert (tmp_path / name).stat().st_size > 0


def test_generate_train_eval_cli(tmp_path):
    r = CliRunner()
    data = tmp_path / "h.npz"
    res = r.invoke(icrl, ["generate", "--env", "keytodoor", "--config", "tiny", "--out", str(data)])
    assert res.exit_code == 0 and "transitions" in res.output, res.output
    res = r.invoke(
        icrl,
        [
            "train",
            "--env",
            "keytodoor",
            "--config",
            "tiny",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "m"),
        ],
    )
    assert res.exit_code == 0, res.output
    res = r.invoke(
        icrl,
        [
            "eval",
            "--env",
            "keytodoor",
            "--config",
            "tiny",
            "--checkpoint",
            str(tmp_path / "m" / "model.pt"),
        ],
    )
    assert res.exit_code == 0 and "greedy" in res.output and "sampled" in res.output, res.output
    # wrong env for the data file: a one-line error, no traceback
    res = r.invoke(
        icrl,
        [
            "train",
            "--env",
            "darkroom",
            "--config",
            "tiny",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "m2"),
        ],
    )
    assert res.exit_code != 0 and "keytodoor histories" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--env", "maze", "--out", "x"], "Invalid value for '--env'"),
        (["run", "--env", "darkroom", "--config", "nope.json", "--out", "x"], "not found"),
        (["train", "--env", "darkroom", "--data", "missing.npz", "--out", "x"], "not found"),
        (["eval", "--env", "darkroom", "--checkpoint", "missing.pt"], "not found"),
    ],
)
def test_cli_errors_are_one_line(args, message, tmp_path):
    res = CliRunner().invoke(icrl, args)
    assert res.exit_code != 0 and message in res.output and "Traceback" not in res.output


@pytest.mark.parametrize(
    "content, message",
    [
        ({"data": {"n_train_tasks": 0}}, "n_train_tasks"),
        ({"model": {"d_model": 30, "n_heads": 4}}, "divisible"),
        ({"trian": {}}, "unknown section"),
        ({"train": {"stpes": 3}}, "unknown key"),
        ({"grid": {"search": {"lr": ["log", 1, 2]}}}, "grid.search"),
        ({"env": {"size": 9, "walls": 1}}, "unknown darkroom option"),
        ({"env": {"horizon": 0}}, "env.horizon must be an integer >= 1, got 0"),
        ({"env": {"size": -3}}, "env.size must be an integer >= 2, got -3"),
        (
            {"data": {"n_train_taskz": 3}},
            "unknown key(s) ['n_train_taskz'] in config section 'data'; valid: ",
        ),
        ({"grid": {"search": {"train.lrr": ["log", 1e-3, 1e-2]}}}, "is not a model / train field; valid: ["),
        ({"grid": {"search": {"train.lr": ["log", 1e-2, 1e-3]}}}, "low 0.01 > high 0.001"),
        ({"grid": {"search": {"train.lr": ["log", 0, 1e-3]}}}, "'log' needs 0 < low"),
        ({"grid": {"search": {"model.dropout": ["uniform", 0, "x"]}}}, "needs two finite numbers"),
        ({"grid": {"search": {"model.ngram_orders": ["choice", []]}}}, "non-empty list"),
        ({"grid": {"budgets": [{"n_train_taskz": 3}]}}, "section 'grid.budgets[0]'"),
        ({"grid": {"budgets": [{"n_train_tasks": 90}]}}, "has 80 goals"),
        ({"grid": {"methods": {"ad": {"n_layerz": 3}}}}, "section 'grid.methods['ad']'"),
        ({"grid": {"methods": {"ng": {"ngram_layers": [5]}}}}, "grid.methods['ng']"),
        ({"grid": {"threshold": 0}}, "grid.threshold must be in (0, 1]"),
        ({"grid": {"draws": 0}}, "grid.draws must be an integer >= 1"),
        ({"train": {"steps": "many"}}, "wrong type"),
        ({"context_episodes": 99}, "fewer than model.seq_len"),
        ({"context_episodes": 0}, "context_episodes must be an integer >= 1"),
        ({"data": {"n_test_tasks": 0}}, "n_test_tasks must be >= 1"),
        ({"model": []}, "section 'model' must be a JSON object"),
    ],
)
def test_bad_config_values(content, message, tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(content))
    res = CliRunner().invoke(
        icrl, ["run", "--env", "darkroom", "--config", str(path), "--out", str(tmp_path)]
    )
    assert res.exit_code != 0 and message in res.output and "Traceback" not in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "runs.jsonl").exists()
    path.write_text("{not json")
    res = CliRunner().invoke(
        icrl, ["run", "--env", "darkroom", "--config", str(path), "--out", str(tmp_path)]
    )
    assert res.exit_code != 0 and "not valid JSON" in res.output


def test_shipped_configs_load_and_draws_are_seeded():
    for env in ("darkroom", "keytodoor"):
        cfg = load_config(env)
        assert cfg.model.seq_len == cfg.context_episodes * cfg.spec.horizon
    search = {"train.lr": ["log", 1e-4, 1e-2], "model.ngram_orders": ["choice", [[1], [2], [3]]]}
    a, b = draw_hparams(search, 0, 3), draw_hparams(search, 0, 3)
    assert a == b and 1e-4 <= a["train.lr"] <= 1e-2 and a["model.ngram_orders"] in ([1], [2], [3])
    assert draw_hparams(search, 0, 4) != a


def test_workers_give_the_same_grid(tmp_path):
    """Runs trained in 2 worker processes give the same rows as one process (each run is seeded by its draw)."""
    from llamba.icrl.runner import run_grid

    cfg = load_config("darkroom", "tiny")
    one = run_grid(cfg, tmp_path / "one", log=lambda s: None)
    two = run_grid(cfg, tmp_path / "two", log=lambda s: None, workers=2)
    assert one["cells"] == two["cells"]
    rows = [list(csv.DictReader(open(tmp_path / d / "results.csv"))) for d in ("one", "two")]
    strip = lambda rs: [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rs]  # timings differ
    assert strip(rows[0]) == strip(rows[1])


def test_data_efficiency_wording():
    assert data_efficiency({"ad": 61440, "ngram": 3840}) == {"ngram": "16x fewer than ad"}
    assert data_efficiency({"ad": 3840, "ngram": 61440}) == {"ngram": "16x more than ad"}
    assert data_efficiency({"ad": 3840, "ngram": 3840}) == {"ngram": "the same number of transitions as ad"}
    assert data_efficiency({"ad": None, "ngram": 3840})["ngram"].startswith("reached; ad did not")
    assert data_efficiency({"ad": 1920, "ngram": None})["ngram"] == "not reached; ad reached at 1,920"
    assert data_efficiency({"ad": None, "ngram": None})["ngram"].startswith("untested")


def test_budgets_are_nested_and_paired_across_methods(tmp_path):
    """Budgets differing only in n_train_tasks get prefixes of one generation; the draws are shared."""
    from llamba.icrl.runner import budget_data

    cfg = load_config("darkroom", "tiny")
    small, big = budget_data(cfg, log=lambda s: None)
    n = small["h"].num_histories
    assert n == 2 * 2 and big["h"].num_histories == 4 * 2
    end = int(big["h"].offsets[n])
    assert (small["h"].states == big["h"].states[:end]).all() and (
        small["h"].tasks == big["h"].tasks[:n]
    ).all()
    assert (small["test"] == big["test"]).all()
    assert (small["h"].returns == big["h"].returns[:n]).all()
