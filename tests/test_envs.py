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
    assert "llamba/DarkRoom-v0" in gym.registry and "llamba/KeyToDoor-v0" in gym.registry
    for env in (
        gym.make("llamba/DarkRoom-v0", goal=(1, 2), render_mode="ansi"),
        gym.make("llamba/KeyToDoor-v0", key=3, door=70, render_mode="ansi"),
        gym.make("llamba/DarkRoom-v0"),  # goal drawn from the reset seed
        gym.make("llamba/KeyToDoor-v0"),
    ):
        check_env(env.unwrapped)
    assert gym.spec("llamba/DarkRoom-v0").max_episode_steps == 20
    assert gym.spec("llamba/KeyToDoor-v0").max_episode_steps == 50


def test_make_by_module_id_and_entry_point_without_importing_envs():
    """gymnasium 1.x: "module:id" imports and registers; the declared entry point names the registrar."""
    import subprocess
    import sys

    probe = (
        "import gymnasium as gym, importlib.metadata as md\n"
        "e = gym.make('llamba.envs:llamba/DarkRoom-v0', goal=3)\n"
        "assert e.reset(seed=0)[0] == 40 and e.spec.max_episode_steps == 20\n"
        "(ep,) = [p for p in md.entry_points(group='gymnasium.envs') if p.name == 'llamba']\n"
        "ep.load()(); ep.load()()  # idempotent\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_ansi_render():
    e = gym.make("llamba/KeyToDoor-v0", key=(0, 0), door=(2, 2), size=3, render_mode="ansi")
    e.reset(seed=0, options={"start": (1, 1)})
    assert e.render() == "K . .\n. A .\n. . D\n"
    e.step(1)  # up to (0, 1)
    e.step(4)  # left onto the key: it disappears
    assert e.render() == "A . .\n. . .\n. . D\n"
    with pytest.raises(ValueError, match="render_mode"):
        DarkRoom(render_mode="human")


def test_longer_horizon_through_make():
    """max_episode_steps is the default horizon; a longer episode needs both (the env truncates by itself)."""
    e = gym.make("llamba/DarkRoom-v0", goal=0, horizon=30, max_episode_steps=30)
    e.reset(seed=0)
    steps = 0
    while not any(e.step(0)[2:4]):
        steps += 1
    assert steps + 1 == 30


@pytest.mark.parametrize("kwargs", [{}, {"terminate_on_goal": True, "horizon": 6}])
def test_make_vec_equals_sync_vector_env(kwargs):
    """The batched twin as gymnasium's vector_entry_point steps exactly like SyncVectorEnv over gym envs,
    next-step autoreset included."""
    goals = [41, 39, 0, 31]
    fast = gym.make_vec("llamba/DarkRoom-v0", num_envs=4, tasks=goals, **kwargs)
    # The env truncates at its own horizon; a longer TimeLimit stays out of the way (TimeLimit would also flag
    # truncation on a terminating last step, which the env itself does not).
    slow = gym.vector.SyncVectorEnv(
        [lambda g=g: gym.make("llamba/DarkRoom-v0", goal=g, max_episode_steps=1000, **kwargs) for g in goals]
    )
    assert fast.single_action_space == slow.single_action_space
    assert fast.metadata["autoreset_mode"] == slow.metadata["autoreset_mode"]
    a, b = fast.reset(seed=0)[0], slow.reset(seed=0)[0]
    assert np.array_equal(a, b)
    rng = np.random.default_rng(0)
    for _ in range(50):
        actions = rng.integers(0, 5, size=4)
        fa, sa = fast.step(actions), slow.step(actions)
        for x, y in zip(fa[:4], sa[:4], strict=True):
            assert np.array_equal(x, y)


def test_make_vec_draws_tasks_per_reset_for_keytodoor():
    v = gym.make_vec("llamba/KeyToDoor-v0", num_envs=64, horizon=3)
    obs, _ = v.reset(seed=1)
    keys = v.twin.key.copy()
    assert obs.shape == (64,) and (obs != keys).all() and (v.twin.key != v.twin.door).all()
    for _ in range(3):
        *_, trunc, _ = v.step(np.zeros(64, dtype=np.int64))
    assert trunc.all()
    v.step(np.zeros(64, dtype=np.int64))  # every env restarts, with a new task
    assert not np.array_equal(v.twin.key, keys) and (v.twin.t == 0).all()


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


def test_a_new_family_is_one_registration():
    from dataclasses import replace

    from llamba.envs.tasks import FAMILIES, register_family

    register_family(
        replace(
            FAMILIES["darkroom"],
            name="darkroom5",
            gym_id="llamba/DarkRoom5-v0",
            defaults={"size": 5, "horizon": 8},
        )
    )
    try:
        spec = EnvSpec("darkroom5")
        assert (spec.size, spec.horizon, spec.num_states) == (5, 8, 25)
        assert spec.optimal_return(np.array([0])).tolist() == [5.0]  # d = 4 from the centre: 8 - 4 + 1
        assert spec.make(3).reset(seed=0)[0] == 12 and spec.batched([3, 4]).reset().tolist() == [12, 12]
    finally:
        del FAMILIES["darkroom5"]
    with pytest.raises(ValueError, match="unknown env 'darkroom5'"):
        EnvSpec("darkroom5")
