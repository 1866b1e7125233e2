"""Training loop, schedule, in-context evaluation and EMP."""

import numpy as np
import pytest
import torch

from llamba.envs import EnvSpec
from llamba.icrl.evaluate import EvalConfig, in_context_returns, score
from llamba.icrl.histories import DataConfig, generate
from llamba.icrl.metrics import expected_max_performance
from llamba.icrl.model import ADConfig, ADTransformer
from llamba.icrl.train import TrainConfig, lr_at, train


def test_emp_matches_closed_form_and_brute_force():
    np.testing.assert_allclose(expected_max_performance([3.0]), [3.0])
    # N = 2: E[max of 1] = mean, E[max of 2 with replacement] = (1*1 + 3*3) / 4 = 2.5 for scores {1, 2}
    np.testing.assert_allclose(expected_max_performance([2.0, 1.0]), [1.5, 1.75])
    v = np.array([0.1, 0.5, 0.2, 0.9, 0.4])
    emp = expected_max_performance(v)
    # brute force: all 5^n ordered draws with replacement
    for n in (1, 2, 3):
        grids = np.stack(np.meshgrid(*[v] * n, indexing="ij"), -1).reshape(-1, n)
        assert emp[n - 1] == pytest.approx(grids.max(-1).mean())
    assert (np.diff(emp) >= 0).all() and emp[-1] <= v.max()


def test_lr_schedule():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_frac=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.5)
    assert lr_at(99, cfg) < 0.001


def test_training_reduces_loss_and_is_seeded():
    spec = EnvSpec("darkroom")
    h, _ = generate(spec, DataConfig(n_train_tasks=4, histories_per_task=2, episodes_per_history=20, seed=0))
    cfg = ADConfig(seq_len=40, d_model=16, n_heads=2, mlp_ratio=2, ngram_layers=[0])
    tc = TrainConfig(steps=60, batch_size=8, lr=1e-2, seed=1)
    m1, l1 = train(h, cfg, tc)
    m2, l2 = train(h, cfg, tc)
    assert l1 == l2  # same seed, same run
    assert np.mean(l1[-10:]) < np.mean(l1[:10]) - 0.1


class Scripted(ADTransformer):
    """A fake policy that always walks right: returns are known in closed form."""

    def forward(self, states, prev_actions, prev_rewards):
        logits = torch.full((*states.shape, 5), -10.0)
        logits[..., 2] = 10.0
        return logits


def test_in_context_returns_of_a_scripted_policy():
    spec = EnvSpec("darkroom")
    model = Scripted(ADConfig(seq_len=40))
    goals = np.array([44, 41, 0])  # wall cell right of the centre (d=4); passed-by neighbour; never visited
    r = in_context_returns(model, spec, goals, EvalConfig(episodes=3, last_k=1))
    np.testing.assert_array_equal(r, [[17] * 3, [1] * 3, [0] * 3])  # the wall keeps it on goal 44: 21 - 4
    opt = spec.optimal_return(goals)
    assert score(r, opt, 1) == pytest.approx(np.mean([1, 1 / 20, 0]))
    r = in_context_returns(model, spec, goals, EvalConfig(episodes=2, last_k=1, greedy=False))
    np.testing.assert_array_equal(r[:, 0], [17, 1, 0])


def test_context_window_carries_across_episodes():
    """The context at each step is the FIFO of the last seq_len transitions across episode boundaries."""
    seen = []

    class Recorder(Scripted):
        def forward(self, states, prev_actions, prev_rewards):
            seen.append((states.clone(), prev_actions.clone(), prev_rewards.clone()))
            return super().forward(states, prev_actions, prev_rewards)

    spec = EnvSpec("keytodoor", {"horizon": 5})
    model = Recorder(ADConfig(seq_len=7))
    in_context_returns(model, spec, np.array([[0, 1], [2, 3]]), EvalConfig(episodes=3, last_k=1))
    lengths = [s.shape[1] for s, _, _ in seen]
    assert max(lengths) == 7 and lengths[:7] == [1, 2, 3, 4, 5, 6, 7]
    s, pa, pr = seen[5]  # step 6 = first step of episode 2: previous action carried
    assert pa[0, 0] == 5 and pr[0, 0] == 2  # history start pads
    assert (pa[0, 1:] == 2).all()  # every later token carries the scripted "right"


def test_keytodoor_eval_with_early_termination():
    """Walking right from the eval's seeded starts: +1 for a key to the right on the start row, +1 more for a
    door further right on that row (the episode then ends early)."""
    spec = EnvSpec("keytodoor")
    model = Scripted(ADConfig(seq_len=100))
    tasks = np.array([[3, 5], [8, 7], [76, 80], [3, 50]])
    r = in_context_returns(model, spec, tasks, EvalConfig(episodes=6, last_k=1, seed=0))
    rng, env = np.random.default_rng(0), spec.batched(tasks)  # replay the eval's start draws
    for e in range(6):
        starts = env.reset(rng)
        for i, (key, door) in enumerate(tasks):
            (sr, sc), (kr, kc), (dr, dc) = divmod(starts[i], 9), divmod(key, 9), divmod(door, 9)
            got_key = sr == kr and sc <= kc
            assert r[i, e] == got_key + (got_key and dr == kr and dc > kc)


def test_heldout_loss_matches_manual_cross_entropy():
    from llamba.icrl.evaluate import heldout_loss
    from llamba.icrl.train import WindowSampler

    spec = EnvSpec("darkroom")
    h, _ = generate(spec, DataConfig(n_train_tasks=2, histories_per_task=2, episodes_per_history=4, seed=0))
    model = Scripted(ADConfig(seq_len=20))
    _, _, _, target = WindowSampler(h, 20, 5, 2, seed=0).sample(16)
    logp = torch.log_softmax(torch.tensor([-10.0, -10.0, 10.0, -10.0, -10.0]), -1)
    assert heldout_loss(model, h, windows=16) == pytest.approx(float(-logp[target].mean()), rel=1e-5)


@pytest.mark.parametrize("marker", [False, True])
def test_eval_context_tokens_match_training_windows(marker):
    """Train/eval parity (checked while diagnosing the non-learning AD baseline): the context the evaluator
    feeds for a trajectory is token for token what WindowSampler builds from the same trajectory stored as a
    history, across episode boundaries (s_t with a_{t-1}, r_{t-1}; pads at the history start, and at every
    episode start with the episode marker)."""
    from llamba.icrl.histories import Histories
    from llamba.icrl.train import WindowSampler

    seen = []

    class Recorder(Scripted):
        def forward(self, states, prev_actions, prev_rewards):
            seen.append((states.clone(), prev_actions.clone(), prev_rewards.clone()))
            return super().forward(states, prev_actions, prev_rewards)

    spec = EnvSpec("darkroom")
    model = Recorder(ADConfig(seq_len=60, episode_marker=marker))
    in_context_returns(model, spec, np.array([44]), EvalConfig(episodes=3, last_k=1))  # goal: right wall
    s_eval, pa_eval, pr_eval = seen[-1]  # last step: the whole 3-episode trajectory, 60 tokens
    env, states, rewards = spec.batched(np.array([44])), [], []
    for _ in range(3):  # replay: always "right"
        obs = env.reset()
        for _ in range(20):
            states.append(int(obs[0]))
            obs, rew, _, _ = env.step(np.array([2]))
            rewards.append(int(rew[0]))
    h = Histories(
        np.array(states, np.int16),
        np.full(60, 2, np.int8),
        np.array(rewards, np.int8),
        np.array([0, 60]),
        np.zeros((1, 3)),
        np.array([44]),
        "darkroom",
        dict(spec.kwargs),
        np.arange(60) % 20 == 0,
    )
    s, pa, pr, target = WindowSampler(h, 60, 5, 2, episode_marker=marker).sample(1)
    assert torch.equal(s, s_eval) and torch.equal(pa, pa_eval) and torch.equal(pr, pr_eval)
    assert (target == 2).all()
    if marker:  # episode starts carry the pads (action 5, reward 2)
        assert pa[0, [0, 20, 40]].tolist() == [5, 5, 5] and pr[0, [0, 20, 40]].tolist() == [2, 2, 2]
        assert (pa[0, 1:20] == 2).all()
    else:  # the first token of episode 2 carries the last step of episode 1
        assert pr[0, 20] == 1 and pa[0, 20] == 2


def test_rowcol_state_embedding_shares_row_and_column_features():
    torch.manual_seed(0)
    model = ADTransformer(ADConfig(seq_len=4, d_model=16, n_heads=2, state_emb="rowcol"))
    e = model.embed_states(torch.tensor([[0, 1, 9, 10]]))[0]  # cells (0,0), (0,1), (1,0), (1,1)
    torch.testing.assert_close(e[0] + e[3], e[1] + e[2])  # additive in row and column
    back = ADTransformer.from_checkpoint(model.checkpoint())
    model.eval(), back.eval()  # default dropout 0.1
    s = torch.tensor([[40, 41, 42, 43]])
    torch.testing.assert_close(
        back(s, torch.zeros_like(s), torch.zeros_like(s)), model(s, torch.zeros_like(s), torch.zeros_like(s))
    )
    with pytest.raises(ValueError, match="state_emb"):
        ADConfig(state_emb="onehot")
    with pytest.raises(ValueError, match="square"):
        ADConfig(num_states=80, state_emb="rowcol")
