"""Seed statistics: bootstrap confidence intervals of means and paired per-seed differences."""

import numpy as np
import pytest

from bpo_fast.eval.stats import ci_excludes_zero, mean_ci, paired_differences


def test_mean_ci_known_cases():
    r = mean_ci([0.2, 0.4, 0.6])
    assert r["mean"] == pytest.approx(0.4) and r["n"] == 3
    # the bootstrap means of 3 values lie in [min, max]; the 95% interval is inside, not a point
    assert 0.2 <= r["lo"] < 0.4 < r["hi"] <= 0.6
    assert mean_ci([0.2, 0.4, 0.6]) == r                          # seeded: reproducible
    one = mean_ci({7: 0.3})
    assert (one["mean"], one["lo"], one["hi"], one["n"]) == (0.3, 0.3, 0.3, 1)
    assert mean_ci([0.5, None, 0.5])["n"] == 2 and mean_ci([0.5, 0.5])["lo"] == 0.5
    assert mean_ci([None])["mean"] is None and mean_ci([])["n"] == 0


def test_mean_ci_matches_a_direct_bootstrap():
    xs = np.random.default_rng(0).normal(1.0, 0.5, size=20)
    r = mean_ci(list(xs), n_boot=4000, seed=5)
    rng = np.random.default_rng(5)
    means = xs[rng.integers(0, 20, size=(4000, 20))].mean(axis=1)
    assert r["lo"] == pytest.approx(np.quantile(means, 0.025))
    assert r["hi"] == pytest.approx(np.quantile(means, 0.975))
    # close to the normal-theory interval for 20 normal values
    se = xs.std(ddof=1) / np.sqrt(20)
    assert r["lo"] == pytest.approx(xs.mean() - 1.96 * se, abs=0.6 * se)
    assert r["hi"] == pytest.approx(xs.mean() + 1.96 * se, abs=0.6 * se)


def test_paired_differences_count_what_the_table_shows():
    # 29.674 vs 29.702 prints as 29.7 = 29.7: a tie, not a win; 29.64 vs 29.70 is a win
    a, b = {0: 0.29674, 1: 0.2964, 2: 0.31}, {0: 0.29702, 1: 0.2970, 2: 0.30}
    raw = paired_differences(a, b)
    assert (raw["n_below"], raw["n_equal"], raw["n_above"]) == (2, 0, 1)
    shown = paired_differences(a, b, shown=lambda x: round(100 * x, 1))
    assert (shown["n_below"], shown["n_equal"], shown["n_above"]) == (1, 1, 1)
    assert shown["mean"] == raw["mean"] and shown["diffs"] == raw["diffs"]


def test_paired_differences():
    bpo = {0: 0.50, 1: 0.40, 2: 0.45, 3: None}
    ctl = {0: 0.55, 1: 0.48, 2: 0.44, 3: 0.30}
    d = paired_differences(bpo, ctl)
    assert d["diffs"] == pytest.approx({0: -0.05, 1: -0.08, 2: 0.01})
    assert d["n"] == 3 and d["n_below"] == 2 and d["n_above"] == 1 and d["n_equal"] == 0
    assert d["mean"] == pytest.approx(-0.04)
    assert d["lo"] < 0 < d["hi"] and not ci_excludes_zero(d)      # one seed the other way
    clear = paired_differences({0: 0.3, 1: 0.31, 2: 0.29}, {0: 0.4, 1: 0.42, 2: 0.41})
    assert clear["hi"] < 0 and ci_excludes_zero(clear)
    assert not ci_excludes_zero(paired_differences({0: 0.1}, {0: 0.5}))   # one seed: no claim


def test_bad_input():
    with pytest.raises(ValueError, match="same seeds"):
        paired_differences({0: 0.1}, {1: 0.1})
    with pytest.raises(TypeError, match="dicts seed"):
        paired_differences([0.1], [0.2])
    with pytest.raises(ValueError, match="finite"):
        mean_ci([0.1, float("nan")])
    with pytest.raises(TypeError, match="values"):
        mean_ci("0.1")
    with pytest.raises(ValueError, match="level"):
        mean_ci([0.1], level=95)
    with pytest.raises(ValueError, match="n_boot"):
        mean_ci([0.1], n_boot=0)
