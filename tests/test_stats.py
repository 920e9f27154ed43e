"""Paired bootstrap: zero for identical runs, a CI above 0 for a clearly better run, seeded."""

from __future__ import annotations

import numpy as np
import pytest

from msvlad.evaluation.stats import paired_bootstrap


def test_identical_runs_give_zero_difference() -> None:
    ap = np.random.default_rng(0).random(70)
    res = paired_bootstrap(ap, ap.copy(), n_boot=500)
    assert res.diff == 0.0 and res.ci_low == 0.0 and res.ci_high == 0.0
    assert res.p_value == 1.0  # every resampled difference is <= 0
    assert res.n_queries == 70 and res.n_boot == 500


def test_clearly_better_run_has_ci_above_zero() -> None:
    rng = np.random.default_rng(1)
    b = rng.uniform(0.2, 0.7, size=70)
    a = np.clip(b + rng.uniform(0.05, 0.15, size=70), 0, 1)  # better on every query
    res = paired_bootstrap(a, b, n_boot=2000, seed=3)
    assert res.diff == pytest.approx(100 * (a.mean() - b.mean()))
    assert 0 < res.ci_low < res.diff < res.ci_high
    assert res.p_value == 0.0
    # swapping the runs mirrors the interval
    rev = paired_bootstrap(b, a, n_boot=2000, seed=3)
    assert rev.diff == pytest.approx(-res.diff)
    assert rev.ci_low == pytest.approx(-res.ci_high) and rev.ci_high == pytest.approx(-res.ci_low)
    assert rev.p_value == 1.0


def test_ci_matches_loop_bootstrap() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.random(30), rng.random(30)
    res = paired_bootstrap(a, b, n_boot=400, seed=7, ci=0.9)
    # same stream of draws, one resample at a time
    gen = np.random.default_rng(7)
    idx = gen.integers(0, 30, size=(400, 30))
    diffs = np.array([100 * (a[i] - b[i]).mean() for i in idx])
    assert res.ci_low == pytest.approx(np.quantile(diffs, 0.05))
    assert res.ci_high == pytest.approx(np.quantile(diffs, 0.95))
    assert res.p_value == pytest.approx(np.mean(diffs <= 0))


def test_seed_reproducibility_and_nan_queries() -> None:
    rng = np.random.default_rng(4)
    a, b = rng.random(50), rng.random(50)
    a[3] = np.nan
    b[10] = np.nan
    r1 = paired_bootstrap(a, b, n_boot=300, seed=11)
    r2 = paired_bootstrap(a, b, n_boot=300, seed=11)
    r3 = paired_bootstrap(a, b, n_boot=300, seed=12)
    assert r1 == r2
    assert (r1.ci_low, r1.ci_high) != (r3.ci_low, r3.ci_high)
    keep = np.ones(50, dtype=bool)
    keep[[3, 10]] = False
    assert r1.n_queries == 48
    assert r1.diff == pytest.approx(100 * (a[keep] - b[keep]).mean())
    assert set(r1.to_json()) == {
        "diff",
        "ci_low",
        "ci_high",
        "p_value",
        "n_queries",
        "n_boot",
        "ci",
    }


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="equal length"):
        paired_bootstrap(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="n_boot"):
        paired_bootstrap(np.zeros(3), np.zeros(3), n_boot=0)
    with pytest.raises(ValueError, match="ci"):
        paired_bootstrap(np.zeros(3), np.zeros(3), ci=1.5)
    with pytest.raises(ValueError, match="no query"):
        paired_bootstrap(np.array([np.nan]), np.array([0.5]))
