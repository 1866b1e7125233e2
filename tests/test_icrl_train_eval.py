"""Training loop, schedule, in-context evaluation and EMP."""

import numpy as np
import pytest
import torch

from llamba.envs import EnvSpec
from llamba.icrl.evaluate import EvalConfig, in_context_returns, random_returns, score
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

    def forward(self, states, prev_actions, prev_rewards, episode_start=None):
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
        def forward(self, states, prev_actions, prev_rewards, episode_start=None):
            assert episode_start is None  # no marker: no flag
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
    target = WindowSampler(h, 20, 5, 2, seed=0).sample(16).targets
    logp = torch.log_softmax(torch.tensor([-10.0, -10.0, 10.0, -10.0, -10.0]), -1)
    assert heldout_loss(model, h, windows=16) == pytest.approx(float(-logp[target].mean()), rel=1e-5)


@pytest.mark.parametrize("marker", [False, True])
def test_eval_context_tokens_match_training_windows(marker):
    """Train/eval parity (checked while diagnosing the non-learning AD baseline): the context the evaluator
    feeds for a trajectory is token for token what WindowSampler builds from the same trajectory stored as a
    history, across episode boundaries (s_t with a_{t-1}, r_{t-1}; pads at the history start only; with the
    episode marker also the episode-start flag, which leaves a_{t-1}, r_{t-1} alone)."""
    from llamba.icrl.histories import Histories
    from llamba.icrl.train import WindowSampler

    seen = []
    spec = EnvSpec("darkroom")
    model = Recorder(ADConfig(seq_len=60, episode_marker=marker), seen)
    in_context_returns(model, spec, np.array([44]), EvalConfig(episodes=3, last_k=1))  # goal: right wall
    s_eval, pa_eval, pr_eval, start_eval = seen[-1]  # last step: the whole 3-episode trajectory, 60 tokens
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
    s, pa, pr, target, start = WindowSampler(h, 60, 5, 2, episode_marker=marker).sample(1)
    assert torch.equal(s, s_eval) and torch.equal(pa, pa_eval) and torch.equal(pr, pr_eval)
    assert (target == 2).all()
    # pads only at the history start; the first token of episodes 2 and 3 carries the last step before it
    assert (pa[0, 0], pr[0, 0]) == (5, 2)
    assert pa[0, [20, 40]].tolist() == [2, 2] and pr[0, [20, 40]].tolist() == [1, 1]
    assert (pa[0, 1:] == 2).all()
    if marker:  # the flag marks every episode start, the history start included
        assert torch.equal(start, start_eval)
        assert start[0].nonzero().flatten().tolist() == [0, 20, 40]
    else:
        assert start is None and start_eval is None


class Recorder(Scripted):
    """Scripted "right" policy (or ``policy(states) -> (b,) actions`` of the last token) that records every
    input it is fed: (states, prev_actions, prev_rewards, episode_start)."""

    def __init__(self, cfg, seen, policy=None):
        super().__init__(cfg)
        self.seen, self.policy = seen, policy

    def forward(self, states, prev_actions, prev_rewards, episode_start=None):
        assert (episode_start is not None) == self.cfg.episode_marker
        start = None if episode_start is None else episode_start.clone()
        self.seen.append((states.clone(), prev_actions.clone(), prev_rewards.clone(), start))
        logits = super().forward(states, prev_actions, prev_rewards)
        if self.policy is not None:
            logits = torch.full_like(logits, -10.0)
            logits[torch.arange(len(states)), -1, self.policy(states[:, -1])] = 10.0
        return logits


def _door_history():
    """Hand-made Key-to-Door-like histories; state t = flat index t, so a window locates itself. History 0:
    episode A ends at the door (reward 1 on its last step), B is truncated, C ends at the door; history 1:
    one episode ending at the door, then another."""
    from llamba.icrl.histories import Histories

    episodes = [[0, 1, 0, 0, 1], [0, 0, 0, 0], [1, 0, 1], [0, 0, 1, 0, 0, 1], [0, 1, 0, 1]]
    rewards = np.concatenate(episodes).astype(np.int8)
    starts = np.concatenate([np.arange(len(e)) == 0 for e in episodes])
    n = len(rewards)
    h = Histories(
        np.arange(n, dtype=np.int16),
        (np.arange(n) % 4 + 1).astype(np.int8),
        rewards,
        np.array([0, 12, n]),
        np.zeros((2, 3)),
        np.array([[0, 1], [2, 3]]),
        "keytodoor",
        {},
        starts,
    )
    return h, [12 + 6]  # ...and the flat index of the first token after a door inside a history


@pytest.mark.parametrize("marker", [False, True])
def test_door_reward_reaches_training_windows(marker):
    """Key-to-Door episodes end at the door, so the door reward is the input r_{t-1} of the next episode's first
    token: the episode marker must not overwrite it (it is its own flag), and with the marker off the inputs
    are as before (pads at a history start only, no flag)."""
    from llamba.icrl.train import WindowSampler

    h, after_door = _door_history()
    ws = WindowSampler(h, 6, 5, 2, seed=0, episode_marker=marker)
    s, pa, pr, target, start = ws.sample(256)
    assert (start is not None) == marker
    hist_start = set(h.offsets[:-1].tolist())
    covered = set()
    for i in range(len(s)):
        for t, g in enumerate(s[i].tolist()):  # g: flat index of the token
            covered.add(g)
            assert target[i, t] == h.actions[g]
            if g in hist_start:
                assert (pa[i, t], pr[i, t]) == (5, 2)
            else:
                assert (pa[i, t], pr[i, t]) == (h.actions[g - 1], h.rewards[g - 1])
            if marker:
                assert start[i, t] == (h.starts[g] or g in hist_start)
    for g in [5, 9, *after_door]:  # episode starts after a door (5, 18) and after a truncation (9)
        assert g in covered
    for i, t in zip(*np.nonzero(np.isin(s.numpy(), after_door)), strict=True):
        assert pr[i, t] == 1  # the door reward reaches the model
        if marker:
            assert start[i, t]


def test_door_rewards_reach_training_windows_of_generated_keytodoor_histories():
    """On generated Key-to-Door histories (explorer source, terminating at the door): every token that starts an
    episode right after a door carries r_{t-1} = 1 and the flag, and sampled windows contain such tokens (the
    former marker fed none)."""
    from llamba.icrl.train import WindowSampler

    spec = EnvSpec("keytodoor")
    h, _ = generate(
        spec,
        DataConfig(n_train_tasks=2, histories_per_task=1, episodes_per_history=8, source="explorer", noise=0),
    )
    g = np.arange(h.total_transitions)
    after_door = g[h.starts & (np.roll(h.rewards, 1) == 1) & ~np.isin(g, h.offsets[:-1])]
    assert len(after_door) >= 4  # the explorer opens the door in most episodes
    ws = WindowSampler(h, 40, 5, 2, seed=0, episode_marker=True)
    assert (ws.prev_r[after_door] == 1).all() and ws.episode_start[after_door].all()
    assert torch.equal(ws.episode_start, torch.from_numpy(h.starts)) and h.starts[h.offsets[:-1]].all()
    w = ws.sample(64)
    door_then_start = w.episode_start & (w.prev_rewards == 1)
    assert door_then_start.sum() >= 10


def test_door_reward_reaches_the_model_in_evaluation():
    """In-context evaluation on Key-to-Door (2 x 2 grid, a clockwise policy that reaches key then door in every
    episode): the first token of every episode after the first carries r_{t-1} = 1 (the door) and the
    episode-start flag; the fed context equals WindowSampler's window of the same trajectory."""
    from llamba.envs.grid import move
    from llamba.icrl.histories import Histories
    from llamba.icrl.train import WindowSampler

    clockwise = np.array([2, 3, 1, 4])  # cell 0 right, 1 down, 2 up, 3 left: visits all 4 cells from anywhere
    seen = []
    spec = EnvSpec("keytodoor", {"size": 2})
    model = Recorder(
        ADConfig(num_states=4, seq_len=100, episode_marker=True),
        seen,
        lambda s: torch.from_numpy(clockwise)[s],
    )
    tasks = np.array([[0, 3]])
    r = in_context_returns(model, spec, tasks, EvalConfig(episodes=4, last_k=1, seed=0))
    assert (r == 2).all()  # key and door in every episode: each ends at the door
    s, pa, pr, start = seen[-1]
    # replay the evaluation's seeded starts with the same policy
    rng, env = np.random.default_rng(0), spec.batched(tasks)
    states, actions, rewards, starts = [], [], [], []
    for _ in range(4):
        obs = env.reset(rng)
        while not env.done.all():
            a = clockwise[obs]
            starts.append(bool(env.t[0] == 0))
            states.append(int(obs[0]))
            actions.append(int(a[0]))
            obs, rew, _, _ = env.step(a)
            rewards.append(int(rew[0]))
            assert (obs == move(np.array([states[-1]]), a, 2)).all()
    n = len(states)
    assert s.shape == (1, n)
    first = np.flatnonzero(starts)
    assert len(first) == 4 and first[0] == 0
    assert start[0].nonzero().flatten().tolist() == first.tolist()
    # the door reward and a real action, not pads
    assert pr[0, first[1:]].tolist() == [1, 1, 1] and (pa[0, first[1:]] < 5).all()
    assert (pa[0, 0], pr[0, 0]) == (5, 2)  # pads only at the history start
    h = Histories(
        np.array(states, np.int16),
        np.array(actions, np.int8),
        np.array(rewards, np.int8),
        np.array([0, n]),
        np.zeros((1, 4)),
        tasks,
        "keytodoor",
        dict(spec.kwargs),
        np.array(starts),
    )
    w = WindowSampler(h, n, 5, 2, episode_marker=True).sample(1)
    assert torch.equal(w.states, s) and torch.equal(w.prev_actions, pa) and torch.equal(w.prev_rewards, pr)
    assert torch.equal(w.episode_start, start) and torch.equal(w.targets[0], torch.tensor(actions))


def test_episode_marker_off_keeps_inputs_and_parameters():
    """Marker off: evaluation feeds no flag and carries a_{t-1}, r_{t-1} across episodes, as before; the model
    has exactly the parameters it had before; a flag is refused. Marker on: one extra 2 x d embedding, the flag
    is required, and checkpoints round-trip."""
    seen = []
    spec = EnvSpec("keytodoor", {"size": 2})
    model = Recorder(ADConfig(num_states=4, seq_len=100), seen, lambda s: torch.tensor([2, 3, 1, 4])[s])
    in_context_returns(model, spec, np.array([[0, 3]]), EvalConfig(episodes=3, last_k=1, seed=0))
    s, pa, pr, start = seen[-1]
    assert start is None
    assert (pa[0, 0], pr[0, 0]) == (5, 2) and (pa[0, 1:] < 5).all() and (pr[0, 1:] < 2).all()  # no pads later
    assert pr[0, 1:].sum() == 5  # key + door + key + door + key: the 3rd episode's door is not yet an input

    cfg = ADConfig(seq_len=8, d_model=16, n_heads=2)
    off, on = ADTransformer(cfg), ADTransformer(ADConfig(**{**cfg.__dict__, "episode_marker": True}))
    names = [n for n, _ in off.named_parameters()]
    assert "emb_start.weight" not in names and not any("start" in n for n in names)
    d = cfg.d_model
    block = (
        4 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    )  # norms, qkv, out, mlp
    embeddings = (81 + 6 + 3 + 8) * d  # states, actions + pad, rewards + pad, positions
    assert off.num_params() == embeddings + cfg.n_layers * block + 2 * d + (d * 5 + 5)  # the pre-flag model
    assert on.num_params() == off.num_params() + 2 * d
    x = torch.randint(0, 5, (2, 8))
    flag = torch.zeros(2, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="episode_start"):
        off(x, x, x % 2, flag)
    with pytest.raises(ValueError, match="episode_start"):
        on(x, x, x % 2)
    on.eval()
    flag[:, [0, 5]] = True
    out = on(x, x, x % 2, flag)
    assert not torch.allclose(out, on(x, x, x % 2, torch.zeros_like(flag)))  # the flag reaches the logits
    back = ADTransformer.from_checkpoint(on.checkpoint())
    back.eval()
    torch.testing.assert_close(back(x, x, x % 2, flag), out)


def test_marker_configs_still_load_and_old_marker_checkpoints_are_refused():
    from pathlib import Path

    from llamba.icrl.config import load_config
    from llamba.icrl.model import OldMarkerCheckpoint

    root = Path(__file__).resolve().parents[1] / "icrl" / "configs"
    for name in ("paper_keytodoor.json", "keytodoor.json"):
        cfg = load_config("keytodoor", str(root / name))
        assert cfg.model.episode_marker
        assert hasattr(ADTransformer(cfg.model), "emb_start")
    ckpt = ADTransformer(ADConfig(seq_len=8, d_model=16, n_heads=2, episode_marker=True)).checkpoint()
    del ckpt["state_dict"]["emb_start.weight"]  # what a checkpoint of the former marker holds
    with pytest.raises(OldMarkerCheckpoint, match="train it again"):
        ADTransformer.from_checkpoint(ckpt)


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


def test_random_policy_returns():
    """One step from the centre (40) next to the goal: a uniform action pays 1 with probability 1/5; Key-to-Door
    returns are 0, 1 or 2 per episode; the same seed gives the same returns."""
    spec = EnvSpec("darkroom", {"horizon": 1})
    r = random_returns(spec, np.array([41, 0]), episodes=4000, seed=0)  # (2, 4000)
    assert r.shape == (2, 4000)
    assert abs(r[0].mean() - 0.2) < 0.02 and (r[1] == 0).all()  # goal 0 is 8 steps away
    k2d = EnvSpec("keytodoor")
    tasks = np.array([[0, 1], [40, 44]])
    r = random_returns(k2d, tasks, episodes=50, seed=1)
    assert set(np.unique(r)) <= {0.0, 1.0, 2.0}
    np.testing.assert_array_equal(r, random_returns(k2d, tasks, episodes=50, seed=1))
