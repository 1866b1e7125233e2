"""Dark Room / Key-to-Door: gymnasium compliance, closed-form optima, walls, termination, batched twins."""

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from llamba import envs
from llamba.envs import BatchedDarkRoom, BatchedKeyToDoor, DarkRoom, EnvSpec, KeyToDoor, optimal_return
from llamba.envs.grid import manhattan


def greedy_path(start: int, target: int, size: int = 9) -> list[int]:
    """Actions of a shortest path: vertical first (up 1 / down 3), then horizontal (right 2 / left 4)."""
    (r0, c0), (r1, c1) = divmod(start, size), divmod(target, size)
    return [3 if r1 > r0 else 1] * abs(r1 - r0) + [2 if c1 > c0 else 4] * abs(c1 - c0)


def test_registered_and_check_env():
    assert "DarkRoom-v0" in gym.registry and "KeyToDoor-v0" in gym.registry
    check_env(gym.make("DarkRoom-v0", goal=(1, 2)).unwrapped)
    check_env(gym.make("KeyToDoor-v0", key=3, door=70).unwrapped)
    check_env(gym.make("DarkRoom-v0").unwrapped)  # goal drawn from the reset seed
    check_env(gym.make("KeyToDoor-v0").unwrapped)


def test_seeded_reset_is_deterministic():
    e = KeyToDoor()
    a, b = e.reset(seed=7), e.reset(seed=7)
    assert a == b
    assert e.reset(seed=7)[0] != e.key


def test_darkroom_closed_form_values():
    # centre (4,4): goal (0,0) d=8 -> 13; neighbour d=1 -> 20; distances histogram and mean 16.5 (reference)
    assert optimal_return("darkroom", 0) == 13.0
    assert optimal_return("darkroom", (4, 5)) == 20.0
    assert optimal_return("darkroom", 40) == 20.0
    goals = [c for c in range(81) if c != 40]
    d = manhattan(np.array(goals), 40, 9)
    assert np.bincount(d).tolist() == [0, 4, 8, 12, 16, 16, 12, 8, 4]
    assert EnvSpec("darkroom").optimal_return(np.array(goals)).mean() == pytest.approx(16.5)
    assert optimal_return("darkroom", 0, reward="once") == 1.0
    assert optimal_return("keytodoor", (0, 80)) == 2.0


@pytest.mark.parametrize("goal", [0, 8, 39, 41, 72, 80, 13])
def test_darkroom_optimal_policy_attains_optimum(goal):
    e = DarkRoom(goal=goal)
    obs, _ = e.reset(seed=0)
    total, steps = 0.0, 0
    for a in greedy_path(obs, goal) + [0] * 40:
        obs, r, term, trunc, _ = e.step(a)
        total, steps = total + r, steps + 1
        if term or trunc:
            break
    assert steps == 20 and trunc and not term
    assert total == optimal_return("darkroom", goal)


def test_darkroom_reward_once_and_terminate():
    e = DarkRoom(goal=41, reward="once")
    e.reset(seed=0)
    rewards = [e.step(a)[1] for a in [2, 0, 0, 4, 2]]
    assert rewards == [1.0, 0.0, 0.0, 0.0, 0.0]
    e = DarkRoom(goal=41, terminate_on_goal=True)
    e.reset(seed=0)
    _, r, term, trunc, _ = e.step(2)
    assert (r, term, trunc) == (1.0, True, False)


def test_walls_clip():
    e = DarkRoom(goal=80)
    e.reset(seed=0)
    for _ in range(4):
        obs = e.step(1)[0]
    assert obs == 4  # row 0, col 4
    assert e.step(1)[0] == 4  # up into the wall: stays
    for _ in range(6):
        obs = e.step(4)[0]
    assert obs == 0  # top-left corner, clipped
    assert e.step(0)[0] == 0


def test_keytodoor_rewards_and_termination():
    key, door = 10, 30
    e = KeyToDoor(key=key, door=door)
    obs, _ = e.reset(seed=1, options={"start": door})
    assert obs == door
    total = 0.0
    e.step(0)  # standing on the door without the key: nothing
    for a in greedy_path(door, key):
        obs, r, term, trunc, _ = e.step(a)
        total += r
        assert not term
    assert total == 1.0 and obs == key
    for a in greedy_path(key, door):
        obs, r, term, trunc, _ = e.step(a)
        total += r
    assert (obs, total, term, trunc) == (door, 2.0, True, False)
    e.reset(seed=1, options={"start": 0})
    for _ in range(50):
        *_, term, trunc, _ = e.step(0)
    assert trunc and not term


def test_keytodoor_optimal_policy_random_starts():
    rng = np.random.default_rng(0)
    for _ in range(20):
        key, door = rng.choice(81, 2, replace=False)
        e = KeyToDoor(key=int(key), door=int(door))
        obs, _ = e.reset(seed=int(rng.integers(1000)))
        total = sum(e.step(a)[1] for a in greedy_path(obs, key) + greedy_path(key, door))
        assert total == optimal_return("keytodoor", (key, door)) == 2.0


def test_splits_are_seeded_disjoint_and_nested():
    tr, te = envs.darkroom_split(64, 16, seed=3)
    assert len(set(tr)) == 64 and not set(tr) & set(te) and 40 not in tr and 40 not in te
    assert np.array_equal(envs.darkroom_split(8, 16, seed=3)[0], tr[:8])
    assert np.array_equal(envs.darkroom_split(64, 16, seed=3)[0], tr)
    tr, te = envs.keytodoor_split(100, 50, seed=0)
    assert (tr[:, 0] != tr[:, 1]).all()
    assert not {tuple(p) for p in tr} & {tuple(p) for p in te}
    with pytest.raises(ValueError):
        envs.darkroom_split(70, 16)


@pytest.mark.parametrize("name", ["darkroom", "keytodoor"])
@pytest.mark.parametrize(
    "kwargs", [{}, {"reward": "once"}, {"terminate_on_goal": True}, {"horizon": 7, "size": 5}]
)
def test_batched_matches_gym_step_for_step(name, kwargs):
    if name == "keytodoor":
        kwargs = {k: v for k, v in kwargs.items() if k in ("horizon", "size")}
    spec = EnvSpec(name, kwargs)
    rng = np.random.default_rng(0)
    n_cells = spec.num_states
    tasks = (
        rng.choice(n_cells, 6)
        if name == "darkroom"
        else np.array([rng.choice(n_cells, 2, replace=False) for _ in range(6)])
    )
    batched = spec.batched(tasks)
    singles = [spec.make(t) for t in tasks]
    for episode in range(3):
        starts = batched.reset(np.random.default_rng(episode))
        for i, e in enumerate(singles):
            assert e.reset(seed=episode, options={"start": int(starts[i])})[0] == starts[i]
        done = np.zeros(6, bool)
        for _ in range(spec.horizon + 2):
            acts = rng.integers(0, 5, size=6)
            obs, rew, term, trunc = batched.step(acts)
            for i, e in enumerate(singles):
                if done[i]:
                    assert rew[i] == 0 and not term[i] and not trunc[i]
                    continue
                o, r, te, tu, _ = e.step(int(acts[i]))
                assert (o, r, te, tu) == (obs[i], rew[i], term[i], trunc[i])
                done[i] = te or tu
        assert done.all() and batched.done.all()


def test_batched_keytodoor_start_never_on_key():
    env = BatchedKeyToDoor(np.array([[k, (k + 1) % 81] for k in range(81)] * 20))
    starts = env.reset(np.random.default_rng(0))
    assert (starts != env.key).all() and starts.min() >= 0 and starts.max() <= 80
    assert BatchedDarkRoom([3, 4]).reset().tolist() == [40, 40]


def test_bad_env_options():
    with pytest.raises(ValueError):
        EnvSpec("maze")
    with pytest.raises(ValueError):
        EnvSpec("darkroom", {"doors": 2})
    with pytest.raises(ValueError):
        KeyToDoor(key=3, door=3)
    with pytest.raises(ValueError):
        DarkRoom(goal=(9, 0))
