"""EMP against brute force, bootstrap bands, the exact sign test, goals-to-threshold and the paired ratio."""

import itertools

import numpy as np
import pytest

from llamba.icrl.metrics import (
    efficiency_ratio,
    emp_band,
    emp_curve,
    expected_max_performance,
    goals_to_threshold,
    share_at_least,
    sign_test,
)


def test_emp_curve_is_the_expected_max_of_n_draws_with_replacement():
    scores = np.random.default_rng(0).random(4)
    curve = emp_curve(scores, 5)
    for n in range(1, 6):  # every ordered n-tuple of draws is equally likely
        brute = np.mean([max(t) for t in itertools.product(scores, repeat=n)])
        assert curve[n - 1] == pytest.approx(brute, rel=1e-12)
    np.testing.assert_allclose(curve[:4], expected_max_performance(scores), rtol=1e-12)
    assert np.all(np.diff(curve) >= -1e-15) and curve[-1] <= scores.max()


def test_emp_band_brackets_the_curve_and_is_seeded():
    scores = np.random.default_rng(1).random(10)
    a, b = emp_band(scores, 20, reps=300, seed=3), emp_band(scores, 20, reps=300, seed=3)
    assert a == b and len(a["emp"]) == 20
    assert np.all(np.array(a["lo"]) <= np.array(a["emp"]) + 1e-12)
    assert np.all(np.array(a["emp"]) <= np.array(a["hi"]) + 1e-12)
    const = emp_band([0.7] * 5, 3, reps=50)
    assert const["lo"] == const["hi"] == pytest.approx([0.7] * 3)


def test_sign_test_exact_values():
    assert sign_test([1] * 8, [0] * 8) == {"wins": 8, "losses": 0, "ties": 0, "p": 2 / 256}
    t = sign_test([1, 1, 0, 0.5, 2], [0, 0, 1, 0.5, 1])  # 3 wins, 1 loss, 1 tie: p = 2 * (1 + 4) / 16
    assert t == {"wins": 3, "losses": 1, "ties": 1, "p": 10 / 16}
    assert sign_test([0.5], [0.5])["p"] == 1.0
    assert share_at_least([0.1, 0.5, 0.9, 0.2], 0.5) == 0.5


def test_goals_to_threshold_and_paired_ratio():
    goals = [16, 32, 64]
    assert goals_to_threshold(goals, [0.1, 0.7, 0.9], 0.6) == 32
    assert goals_to_threshold(goals, [0.1, 0.2, 0.3], 0.6) is None
    # the method reaches 0.6 at 16 goals on every draw, the baseline only at 64: ratio 4 in every resample
    base = [[0.1, 0.2, 0.3], [0.3, 0.4, 0.5], [0.7, 0.8, 0.9]]
    m = [[0.7, 0.8, 0.9]] * 3
    r = efficiency_ratio(goals, base, m, 0.6, reps=200)
    assert (r["ratio"], r["lo"], r["hi"], r["both_reach"]) == (4.0, 4.0, 4.0, 1.0)
    # one lucky baseline draw at 32 goals: the point estimate is 2, resamples without it give 4
    base[1][2] = 0.65
    r = efficiency_ratio(goals, base, m, 0.6, reps=400, seed=1)
    assert r["ratio"] == 2.0 and r["lo"] == 2.0 and r["hi"] == 4.0
    r = efficiency_ratio(goals, [[0.1] * 3] * 3, m, 0.6, reps=50)
    assert r["ratio"] is None and r["only_m"] == 1.0 and r["lo"] is None
