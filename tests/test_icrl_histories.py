"""Q-learning histories: layout, improvement, subsampling, save/load, window sampler alignment."""

import numpy as np
import pytest

from llamba.envs import EnvSpec
from llamba.icrl.histories import DataConfig, Histories, generate, improvement
from llamba.icrl.train import WindowSampler


@pytest.mark.parametrize("env", ["darkroom", "keytodoor"])
def test_histories_improve(env):
    spec = EnvSpec(env)
    h, info = generate(
        spec,
        DataConfig(
            n_train_tasks=16, histories_per_task=4, episodes_per_history=60, lr=0.9, gamma=0.9, seed=0
        ),
    )
    assert info["improves"] and info["last"] > info["first"] + 0.4, info
    assert h.num_histories == 64 and h.returns.shape == (64, 60)
    assert h.total_transitions == info["transitions"] == h.offsets[-1]
    if env == "darkroom":  # no termination: every episode is 20 steps
        assert h.total_transitions == 64 * 60 * 20


def test_history_layout_replays_in_the_env():
    """Every stored (s, a, r) is what the gym env produces; returns per episode add up; episode starts are
    flagged where the replay resets."""
    spec = EnvSpec("keytodoor")
    h, _ = generate(
        spec,
        DataConfig(n_train_tasks=2, n_test_tasks=2, histories_per_task=2, episodes_per_history=6, seed=3),
    )
    for i in range(h.num_histories):
        s, a, r = (x[h.offsets[i] : h.offsets[i + 1]] for x in (h.states, h.actions, h.rewards))
        env = spec.make(h.tasks[i])
        t, ep, starts = 0, 0, h.starts[h.offsets[i] : h.offsets[i + 1]]
        while t < len(s):
            assert starts[t] and not starts[t + 1]
            env.reset(options={"start": int(s[t])})
            total = 0.0
            while True:
                obs, rew, term, trunc, _ = env.step(int(a[t]))
                assert rew == r[t]
                total += rew
                t += 1
                if term or trunc:
                    break
                assert obs == s[t]
            assert total == h.returns[i, ep]
            ep += 1
        assert ep == 6 and starts.sum() == 6


def test_subsample_and_save_load(tmp_path):
    spec = EnvSpec("darkroom")
    cfg = DataConfig(n_train_tasks=3, histories_per_task=2, episodes_per_history=10, seed=1)
    full, _ = generate(spec, cfg)
    sub, info = generate(spec, DataConfig(**{**cfg.__dict__, "subsample": 3}))
    assert sub.returns.shape == (6, 4)  # episodes 0, 3, 6, 9
    np.testing.assert_array_equal(sub.returns, full.returns[:, ::3])
    assert info["transitions"] == 6 * 4 * 20
    np.testing.assert_array_equal(sub.states[:20], full.states[:20])
    np.testing.assert_array_equal(sub.states[20:40], full.states[60:80])
    sub.save(tmp_path / "h.npz")
    back = Histories.load(tmp_path / "h.npz")
    np.testing.assert_array_equal(back.actions, sub.actions)
    np.testing.assert_array_equal(back.starts, np.arange(sub.total_transitions) % 20 == 0)  # subsampled too
    assert back.env == "darkroom" and back.total_transitions == sub.total_transitions
    assert improvement(back) == improvement(sub)


def test_window_sampler_tokens():
    spec = EnvSpec("darkroom")
    h, _ = generate(spec, DataConfig(n_train_tasks=2, histories_per_task=1, episodes_per_history=3, seed=0))
    ws = WindowSampler(h, 20, num_actions=5, num_rewards=2, seed=0)
    for _ in range(20):
        s, pa, pr, tgt, flag = ws.sample(4)
        assert flag is None  # no episode marker
        for i in range(4):  # locate the window in the flat arrays
            start = int(
                ws.valid[
                    np.flatnonzero(
                        [
                            np.array_equal(h.states[v : v + 20], s[i].numpy())
                            and np.array_equal(h.actions[v : v + 20], tgt[i].numpy())
                            for v in ws.valid
                        ]
                    )[0]
                ]
            )
            for t in range(20):
                g = start + t
                if g in h.offsets[:-1]:
                    assert (pa[i, t], pr[i, t]) == (5, 2)  # pads at a history start
                else:
                    assert (pa[i, t], pr[i, t]) == (h.actions[g - 1], h.rewards[g - 1])
    with pytest.raises(ValueError):
        WindowSampler(h, 61, 5, 2)


def test_bad_data_config():
    with pytest.raises(ValueError):
        DataConfig(histories_per_task=0)
    with pytest.raises(ValueError):
        DataConfig(gamma=1.0)


def test_toward_is_a_shortest_path_step():
    from llamba.envs.grid import manhattan, move, toward

    cells, targets = np.repeat(np.arange(81), 81), np.tile(np.arange(81), 81)
    acts = toward(cells, targets, 9)
    d0, d1 = manhattan(cells, targets, 9), manhattan(move(cells, acts, 9), targets, 9)
    assert ((d1 == d0 - 1) | ((d0 == 0) & (acts == 0))).all()


@pytest.mark.parametrize("env", ["darkroom", "keytodoor"])
def test_noisy_oracle_source_reaches_optimal(env):
    spec = EnvSpec(env)
    h, info = generate(spec, DataConfig(n_train_tasks=8, episodes_per_history=20, source="noisy_oracle"))
    assert info["improves"] and info["last"] == pytest.approx(1.0)  # epsilon 0 for the last 10%: optimal
    with pytest.raises(ValueError):
        DataConfig(source="a3c")


def test_shipped_darkroom_context_shows_improvement():
    """Regression for the non-learning AD baseline: the shipped Dark Room data must show clear improvement
    inside one context window (old config: Q-learning over 60 episodes gained ~0.02 of optimal per 3-episode
    window, so there was no in-context improvement for AD to distil)."""
    from dataclasses import replace

    from llamba.icrl.config import load_config
    from llamba.icrl.histories import window_improvement

    cfg = load_config("darkroom")
    assert cfg.model.seq_len >= 4 * cfg.spec.horizon  # a context of at least 4 episodes
    h, _ = generate(cfg.spec, replace(cfg.data, n_train_tasks=16))
    assert window_improvement(h, cfg.context_episodes) > 0.15
    old = replace(cfg.data, n_train_tasks=16, source="qlearning", episodes_per_history=60, eps_decay_frac=0.9)
    h_old, _ = generate(cfg.spec, old)
    assert window_improvement(h_old, 3) < 0.05


def _episodes(h, i):
    """History i -> list of (states, actions, rewards) per episode (Dark Room: fixed length)."""
    lengths = np.diff(h.offsets)[i] // h.returns.shape[1]
    s, a, r = (x[h.offsets[i] : h.offsets[i + 1]] for x in (h.states, h.actions, h.rewards))
    return [(s[k : k + lengths], a[k : k + lengths], r[k : k + lengths]) for k in range(0, len(s), lengths)]


def test_explorer_darkroom_searches_then_exploits():
    """Noise-free explorer: frontier search finds every goal within 8 episodes (its first episode alone covers
    >= 15 distinct cells of the 81); after the episode that found the goal, every episode is optimal."""
    spec = EnvSpec("darkroom")
    h, info = generate(
        spec,
        DataConfig(
            n_train_tasks=32, histories_per_task=2, episodes_per_history=12, source="explorer", noise=0
        ),
    )
    opt = spec.optimal_return(h.tasks)
    for i in range(h.num_histories):
        rets = h.returns[i]
        found = int(np.argmax(rets > 0))
        assert rets[found] > 0 and found < 8, rets
        assert (rets[found + 1 :] == opt[i]).all(), (i, rets, opt[i])
        first_states = _episodes(h, i)[0][0]
        assert len(set(first_states.tolist())) >= 15 or rets[0] > 0
    assert info["last"] == pytest.approx(1.0)


def test_explorer_keytodoor_learns_key_then_door():
    """Key-to-Door explorer: once the key and the door have both paid in some episode, every later episode
    collects both (return 2) along a shortest path start -> key -> door."""
    from llamba.envs.grid import manhattan

    spec = EnvSpec("keytodoor")
    h, _ = generate(
        spec,
        DataConfig(
            n_train_tasks=32, histories_per_task=2, episodes_per_history=10, source="explorer", noise=0
        ),
    )
    for i in range(h.num_histories):
        rets, (key, door) = h.returns[i], h.tasks[i]
        solved = int(np.argmax(rets == 2))
        assert rets[solved] == 2 and solved < 6, rets
        assert (rets[solved + 1 :] == 2).all(), rets
        # the last episode is a shortest path: its length is the start -> key -> door distance
        ends = h.offsets[i] + np.flatnonzero(h.rewards[h.offsets[i] : h.offsets[i + 1]]) + 1
        start = h.states[ends[-3]]  # the last episode begins right after the previous door
        assert ends[-1] - ends[-3] == manhattan(start, key, 9) + manhattan(key, door, 9)


def test_explorer_uses_only_its_own_history():
    """Before its first reward, the explorer's actions do not depend on where the goal is: two goals that the
    first episode does not reach give the same first episode (same seed)."""
    spec = EnvSpec("darkroom")
    from llamba.icrl.histories import learning_histories

    cfg = DataConfig(histories_per_task=1, episodes_per_history=1, source="explorer", noise=0, seed=5)
    a = learning_histories(spec, np.array([0]), cfg)
    b = learning_histories(spec, np.array([80]), cfg)
    if a.returns[0, 0] == 0 and b.returns[0, 0] == 0:
        assert (a.actions == b.actions).all() and (a.states == b.states).all()
    else:  # the frontier reached a corner in one episode: nothing to compare
        pytest.skip("first episode reached a corner goal")
    with pytest.raises(ValueError, match="noise"):
        DataConfig(noise=1.0)
