"""ClassBalancedPool: class balance, determinism per (seed, round), errors."""

from __future__ import annotations

import numpy as np
import pytest

from msvlad.mining.pool import ClassBalancedPool


def _labels() -> np.ndarray:
    # class c has c + 1 images (class 0 is a singleton), labels shuffled and not 0..C-1
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(30) * 10 + 5, np.arange(30) + 1)
    return rng.permutation(labels)


def test_pool_is_class_balanced() -> None:
    labels = _labels()
    counts = {c: int((labels == c).sum()) for c in np.unique(labels)}
    sampler = ClassBalancedPool(labels, pool_size=64, images_per_class=6, seed=1)
    assert sampler.classes_per_pool == 10
    for round_index in range(20):
        pool = sampler.sample(round_index)
        assert pool.dtype == np.int64 and pool.ndim == 1
        assert len(np.unique(pool)) == len(pool)  # no image twice
        drawn, per_class = np.unique(labels[pool], return_counts=True)
        assert len(drawn) == 10
        assert all(counts[c] >= 2 for c in drawn)  # singletons are never drawn
        # every drawn class contributes min(images_per_class, its size) images
        assert all(n == min(6, counts[c]) for c, n in zip(drawn, per_class, strict=True))
        assert len(pool) == sum(min(6, counts[c]) for c in drawn) <= 64


def test_truncates_to_pool_size_and_shuffles() -> None:
    labels = np.repeat(np.arange(8), 10)
    sampler = ClassBalancedPool(labels, pool_size=20, images_per_class=5, seed=0)
    pool = sampler.sample(0)
    assert len(pool) == 20 and len(np.unique(labels[pool])) == 4
    changes = int((np.diff(labels[pool]) != 0).sum())
    assert changes > 3  # not grouped by class


def test_deterministic_per_seed_and_round() -> None:
    labels = _labels()
    a = ClassBalancedPool(labels, 40, 4, seed=7)
    b = ClassBalancedPool(labels, 40, 4, seed=7)
    c = ClassBalancedPool(labels, 40, 4, seed=8)
    assert np.array_equal(a.sample(3), b.sample(3))
    # no hidden state: a resumed run re-draws round 3
    assert np.array_equal(a.sample(3), a.sample(3))
    assert not np.array_equal(a.sample(3), a.sample(4))
    assert not np.array_equal(a.sample(3), c.sample(3))


def test_classes_drawn_uniformly() -> None:
    labels = np.repeat(np.arange(20), 3)
    sampler = ClassBalancedPool(labels, pool_size=15, images_per_class=3, seed=0)
    hits = np.zeros(20)
    rounds = 400
    for r in range(rounds):
        hits[np.unique(labels[sampler.sample(r)])] += 1
    expected = rounds * 5 / 20
    assert np.all(np.abs(hits - expected) < 0.3 * expected)


def test_fewer_classes_than_asked() -> None:
    labels = np.array([0, 0, 1, 1, 1, 2])
    pool = ClassBalancedPool(labels, pool_size=100, images_per_class=2, seed=0).sample(0)
    assert sorted(np.unique(labels[pool]).tolist()) == [0, 1] and len(pool) == 4


@pytest.mark.parametrize(
    ("labels", "kwargs", "match"),
    [
        (np.array([0, 0, 1, 2, 3]), {}, "need at least 2 classes with >= 2 images, found 1"),
        (np.array([0.0, 0.0, 1.0, 1.0]), {}, "labels: expected a non-empty 1-D integer array"),
        (np.zeros((2, 2), dtype=int), {}, "labels"),
        (
            np.repeat(np.arange(3), 3),
            {"pool_size": 5, "images_per_class": 3},
            "images_per_class 3 must be >= 2",
        ),
        (np.repeat(np.arange(3), 3), {"images_per_class": 1}, "images_per_class"),
        (np.repeat(np.arange(3), 3), {"seed": -1}, "seed"),
    ],
)
def test_errors(labels: np.ndarray, kwargs: dict, match: str) -> None:
    args = {"pool_size": 10, "images_per_class": 2, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        ClassBalancedPool(labels, **args)


def test_bad_round_index() -> None:
    sampler = ClassBalancedPool(np.repeat(np.arange(3), 3), 6, 3, seed=0)
    with pytest.raises(ValueError, match="round_index"):
        sampler.sample(-1)


def _groups(labels: np.ndarray, pool: np.ndarray) -> dict[int, tuple[int, ...]]:
    return {
        int(c): tuple(sorted(pool[labels[pool] == c].tolist())) for c in np.unique(labels[pool])
    }


def test_rolling_pool_replaces_its_oldest_classes() -> None:
    labels = _labels()
    sampler = ClassBalancedPool(labels, 60, 5, seed=3, draw="rolling", turnover=0.3)
    g = sampler.classes_per_pool
    assert g == 12
    replace = int(np.ceil(0.3 * g))  # 4 classes a round
    pools = [sampler.sample(r) for r in range(40)]
    first_seen: dict[int, int] = {}
    for r, pool in enumerate(pools):
        assert len(np.unique(pool)) == len(pool) and len(np.unique(labels[pool])) == g
        order = list(dict.fromkeys(labels[pool].tolist()))  # classes in pool order: oldest first
        for c in order:
            first_seen.setdefault(c, r)
        if r == 0:
            continue
        prev, cur = _groups(labels, pools[r - 1]), _groups(labels, pool)
        prev_order = list(dict.fromkeys(labels[pools[r - 1]].tolist()))
        kept = prev_order[replace:]
        assert order[: g - replace] == kept  # the oldest 4 left, the others stay in order
        assert all(cur[c] == prev[c] for c in kept)  # with the same images
        assert not set(order[g - replace :]) & set(kept)  # the new ones were not in the pool
    # every class that can be drawn is drawn within a few turnovers (29 classes with positives)
    assert len(first_seen) == 29


def test_rolling_pool_is_replayed_from_its_seed() -> None:
    labels = _labels()
    a = ClassBalancedPool(labels, 40, 4, seed=7, draw="rolling", turnover=0.25)
    sequential = [a.sample(r) for r in range(8)]
    b = ClassBalancedPool(labels, 40, 4, seed=7, draw="rolling", turnover=0.25)
    assert np.array_equal(b.sample(6), sequential[6])  # a resumed run: replayed, same pool
    assert np.array_equal(b.sample(2), sequential[2])  # backwards: replayed from round 0
    assert np.array_equal(b.sample(7), sequential[7])
    c = ClassBalancedPool(labels, 40, 4, seed=8, draw="rolling", turnover=0.25)
    assert not np.array_equal(c.sample(6), sequential[6])
    # the first round of a rolling pool draws its classes as the first independent round does
    d = ClassBalancedPool(labels, 40, 4, seed=7)
    assert set(labels[d.sample(0)]) == set(labels[sequential[0]])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"draw": "sliding"}, "miner.pool_draw"),
        ({"draw": "rolling", "turnover": 0.0}, "miner.refresh_fraction"),
        ({"draw": "rolling", "turnover": 1.5}, "miner.refresh_fraction"),
    ],
)
def test_rolling_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ClassBalancedPool(_labels(), 40, 4, seed=0, **kwargs)
