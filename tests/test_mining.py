"""Miners vs an independent brute-force reference (full N x N sort, per-anchor walk); rules."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from msvlad.mining.base import MinedTriplets, TripletMiner
from msvlad.mining.baselines import BatchHardMiner, HardestNegativeMiner, RandomMiner, SemiHardMiner
from msvlad.mining.difficulty import DifficultyMiner, difficulty_candidates, first_per_class
from msvlad.mining.registry import MINERS, build_miner
from msvlad.storage import load_torch, save_torch
from msvlad.training.logs import AGE_FIELDS, TRIPLET_FIELDS

# the triplet log minus round, step and the descriptor ages: MinedTriplets.to_frame()
COLUMNS = [f for f in TRIPLET_FIELDS[2:] if f not in AGE_FIELDS]


# ----------------------------------------------------------------------------- data and reference


def _pool(seed: int, n_classes: int = 12, max_size: int = 9, d: int = 16, noise: float = 0.45):
    """Clustered unit descriptors with uneven class sizes (singletons included), shuffled labels."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, max_size + 1, (n_classes,), generator=g)
    cls = torch.repeat_interleave(torch.arange(n_classes), sizes)
    cls = cls[torch.randperm(cls.numel(), generator=g)]
    centers = torch.randn(n_classes, d, generator=g)
    x = (
        centers[cls] / math.sqrt(d) * 2
        + noise * torch.randn(cls.numel(), d, generator=g) / math.sqrt(d) * 2
    )
    return torch.nn.functional.normalize(x, dim=1), cls * 7 + 3  # labels need not be 0..C-1


def _sim(x: torch.Tensor) -> np.ndarray:
    return x.double().numpy() @ x.double().numpy().T


def _ranked(s: np.ndarray, a: int) -> list[int]:
    """Anchor a's list without a, by (similarity desc, index asc)."""
    return sorted((j for j in range(s.shape[0]) if j != a), key=lambda j: (-s[a, j], j))


def _d2(s: float) -> float:
    return max(0.0, 2.0 - 2.0 * s)


def _draws(seed: int, n: int, p: float) -> tuple[np.ndarray, np.ndarray]:
    """The difficulty miner's documented draws: rand(N) < p, then randperm(N)."""
    g = torch.Generator().manual_seed(seed)
    coins = (torch.rand(n, generator=g) < p).numpy()
    order = torch.randperm(n, generator=g).numpy()
    return coins, order


def _reference_difficulty(x, labels, *, seed, margin, delta, threshold, p, cap):
    """Straight from the method note's pseudo-code, on the full sorted lists."""
    s = _sim(x)
    lab = labels.numpy()
    n = len(lab)
    coins, order = _draws(seed, n, p)
    cands = {}
    for a in range(n):
        ranked = _ranked(s, a)
        r_n = r_p = None
        for r, j in enumerate(ranked):
            if r_n is None:
                if lab[j] != lab[a]:
                    r_n = r
                    if r_n >= 1 and coins[a]:
                        r_p = r_n - 1
                        break
                continue
            if r - r_n >= threshold:
                break
            if lab[j] == lab[a]:
                r_p = r
                break
        if r_n is None or r_p is None:
            continue
        loss = margin + _d2(s[a, ranked[r_p]]) - _d2(s[a, ranked[r_n]])
        if margin - delta < loss < margin + delta:
            cands[a] = (ranked[r_p], ranked[r_n], r_p, r_n)
    out, seen = [], set()
    for a in order:
        if a in cands and lab[a] not in seen:
            seen.add(lab[a])
            out.append((int(a), *cands[a]))
            if len(out) == cap:
                break
    return out, len(cands)


def _rank(s: np.ndarray, a: int, j: int) -> int:
    return _ranked(s, a).index(j)


def _check_common(
    res: MinedTriplets, x: torch.Tensor, labels: torch.Tensor, cap: int, margin: float
) -> None:
    """Rules every miner obeys: labels, one per anchor and class, cap, record consistency."""
    s = _sim(x)
    lab = labels.numpy()
    frame = res.to_frame()
    assert list(frame.columns) == COLUMNS
    assert len(frame) == len(res) <= cap
    assert frame["anchor"].is_unique and frame["anchor_label"].is_unique
    assert res.anchors.dtype == res.positives.dtype == res.negatives.dtype == torch.int64
    for r in frame.itertuples(index=False):
        a, p, n = r.anchor, r.positive, r.negative
        assert a != p and lab[a] == lab[p] != lab[n]
        assert r.anchor_label == lab[a] and r.negative_label == lab[n]
        assert r.pos_sim == pytest.approx(s[a, p], abs=1e-12)
        assert r.neg_sim == pytest.approx(s[a, n], abs=1e-12)
        assert r.loss == pytest.approx(margin + _d2(s[a, p]) - _d2(s[a, n]), abs=1e-12)
        assert r.pos_rank == _rank(s, a, p) and r.neg_rank == _rank(s, a, n)


# ----------------------------------------------------------------------------- DifficultyMiner


CONFIGS = [
    dict(margin=0.1, delta=0.02, threshold=20, p=0.5, cap=256),
    dict(margin=0.1, delta=0.1, threshold=3, p=0.5, cap=4),
    dict(margin=0.2, delta=0.15, threshold=2, p=0.0, cap=256),
    dict(margin=0.1, delta=0.08, threshold=6, p=1.0, cap=256),
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_difficulty_equals_bruteforce_reference(cfg: dict) -> None:
    total = 0
    for seed in range(8):
        x, labels = _pool(seed)
        for backend in ("torch", "faiss"):
            miner = DifficultyMiner(
                margin=cfg["margin"],
                delta=cfg["delta"],
                threshold=cfg["threshold"],
                semi_hard_prob=cfg["p"],
                triplets_per_round=cfg["cap"],
                seed=seed,
                backend=backend,
                chunk_size=17,
            )
            res = miner.mine(x, labels)
            ref, n_cand = _reference_difficulty(
                x,
                labels,
                seed=seed,
                margin=cfg["margin"],
                delta=cfg["delta"],
                threshold=cfg["threshold"],
                p=cfg["p"],
                cap=cfg["cap"],
            )
            got = list(
                zip(
                    res.anchors.tolist(),
                    res.positives.tolist(),
                    res.negatives.tolist(),
                    res.pos_ranks.tolist(),
                    res.neg_ranks.tolist(),
                    strict=True,
                )
            )
            assert got == ref, (seed, backend)
            assert res.with_candidate == n_cand and res.considered == len(labels)
        total += len(ref)
    assert total > 0  # the sweep does exercise kept triplets


@pytest.mark.parametrize("cfg", CONFIGS)
def test_difficulty_triplets_satisfy_every_rule(cfg: dict) -> None:
    kinds = set()
    for seed in range(12):
        x, labels = _pool(seed + 100, n_classes=10, max_size=12)
        res = DifficultyMiner(
            margin=cfg["margin"],
            delta=cfg["delta"],
            threshold=cfg["threshold"],
            semi_hard_prob=cfg["p"],
            triplets_per_round=cfg["cap"],
            seed=seed,
        ).mine(x, labels)
        _check_common(res, x, labels, cfg["cap"], cfg["margin"])
        s, lab = _sim(x), labels.numpy()
        for r in res.to_frame().itertuples(index=False):
            ranked = _ranked(s, r.anchor)
            r_n, r_p = ranked.index(r.negative), ranked.index(r.positive)
            assert all(lab[j] == lab[r.anchor] for j in ranked[:r_n])  # n is the first negative
            if r.kind == "semi-hard":
                assert r_p == r_n - 1 and r.loss <= cfg["margin"] + 1e-12
            else:
                assert r.kind == "hard" and r_p > r_n and r.loss >= cfg["margin"] - 1e-12
                # first positive below n
                assert all(lab[j] != lab[r.anchor] for j in ranked[r_n:r_p])
                assert r_p - r_n < cfg["threshold"]
            assert cfg["margin"] - cfg["delta"] < r.loss < cfg["margin"] + cfg["delta"]
            kinds.add(r.kind)
    expected = {0.0: {"hard"}, 1.0: {"semi-hard", "hard"}, 0.5: {"semi-hard", "hard"}}[cfg["p"]]
    assert kinds <= expected and kinds


def test_difficulty_hand_built_lists() -> None:
    # pool labels: 0, 0, 0, 1, 1, 2; rows 0-3 hold hand-made ranked lists (self excluded)
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    idx = torch.tensor(
        [
            [1, 3, 2, 4, 5],  # r_n = 1; semi: p=1 (L = 0.0); hard: p=2 (L = 0.11)
            [3, 0, 2, 4, 5],  # r_n = 0: semi impossible; hard p=0 (L = 0.11)
            [0, 1, 3, 4, 5],  # r_n = 2; semi: p=1 (L = 0.098); hard: no positive below n
            [0, 1, 2, 5, 4],  # r_n = 0; hard p=4 at rank 4: gap 4
            [3, 0, 1, 2, 5],
            [0, 1, 2, 3, 4],
        ]
    )
    sims = torch.tensor(
        [
            [0.9, 0.85, 0.845, 0.5, 0.1],
            [0.7, 0.695, 0.6, 0.2, 0.0],
            [0.95, 0.9, 0.899, 0.3, 0.2],
            [0.5, 0.49, 0.48, 0.47, 0.46],
            [0.9, 0.1, 0.0, -0.1, -0.2],
            [0.9, 0.1, 0.0, -0.1, -0.2],
        ],
        dtype=torch.float64,
    )
    kw = dict(margin=0.1, delta=0.1)
    semi = difficulty_candidates(
        sims, idx, labels, torch.ones(6, dtype=torch.bool), threshold=5, **kw
    )
    hard = difficulty_candidates(
        sims, idx, labels, torch.zeros(6, dtype=torch.bool), threshold=4, **kw
    )
    assert semi["keep"][:4].tolist() == [False, True, True, True]
    assert semi["semi"][:4].tolist() == [True, False, True, False]
    assert semi["p_idx"][1:4].tolist() == [0, 1, 4] and semi["n_idx"][1:4].tolist() == [3, 3, 0]
    assert semi["loss"][1:4].tolist() == pytest.approx([0.11, 0.098, 0.18])
    assert hard["keep"][:4].tolist() == [True, True, False, False]  # row 3: gap 4 is not < 4
    assert hard["p_idx"][:2].tolist() == [2, 0] and hard["r_p"][:2].tolist() == [2, 1]
    assert hard["loss"][:2].tolist() == pytest.approx([0.11, 0.11])


def _anchor_is_top_ranked(s: np.ndarray, lab: np.ndarray, i: int, threshold: int):
    """Their walk for pool row i: the anchor is the top of the list *with* self (ties: any order,
    here the lowest index first) while the label tests use lab[i]; first candidate only."""
    row = sorted(range(s.shape[0]), key=lambda j: (-s[i, j], j))
    j_neg = j_pos = None
    for j, col in enumerate(row):
        if j_neg is None and lab[col] == lab[i]:
            continue
        if j_neg is None:
            j_neg = j
        elif lab[col] == lab[i]:
            j_pos = j
        if j_pos is not None:
            return row[0], row[j_pos], row[j_neg]
        if j - j_neg == threshold:
            return None
    return None


@pytest.mark.parametrize("seed", range(6))
def test_duplicates_across_classes_never_make_the_anchor_its_own_negative(seed: int) -> None:
    # exact copies of anchors filed under another class (a duplicate in two landmark folders)
    x, labels = _pool(seed, n_classes=8, max_size=8)
    lab = labels.numpy()
    g = torch.Generator().manual_seed(seed)
    copies = {}
    for a in torch.randperm(len(lab), generator=g)[:6].tolist():
        others = np.flatnonzero(lab != lab[a])
        b = int(others[torch.randint(len(others), (1,), generator=g)])
        if a not in copies.values() and b not in copies and b not in copies.values():
            x[b], copies[b] = x[a], a  # row b (other class) is a copy of row a
    s = _sim(x)
    # the authors' anchor rule turns a tie with a lower-index copy into an a = n triplet
    low = [b for b, a in copies.items() if b < a]
    if low:
        theirs = _anchor_is_top_ranked(s, lab, copies[low[0]], threshold=20)
        assert theirs is not None and theirs[0] == theirs[2] == low[0]
    miner = DifficultyMiner(delta=0.5, threshold=20, semi_hard_prob=0.5, triplets_per_round=999)
    res = miner.mine(x, labels)
    assert len(res) > 0
    _check_common(res, x, labels, 999, 0.1)  # anchor != positive, lab[a] == lab[p] != lab[n]
    for r in res.to_frame().itertuples(index=False):
        assert r.anchor != r.negative
        if copies.get(r.negative) == r.anchor or copies.get(r.anchor) == r.negative:
            # the copy is the anchor's nearest negative: a hard triplet, loss m + d2(a, p) > m
            assert r.kind == "hard" and r.neg_rank == 0 and r.neg_sim == pytest.approx(1.0)
            assert r.loss == pytest.approx(0.1 + _d2(r.pos_sim)) and r.loss > 0.1


def test_first_per_class_keeps_order_and_cap() -> None:
    labels = torch.tensor([5, 5, 7, 7, 9, 9, 2])
    keep = torch.tensor([True, True, False, True, True, True, False])
    order = torch.tensor([6, 1, 3, 0, 5, 2, 4])
    assert first_per_class(order, keep, labels, 10).tolist() == [1, 3, 5]
    assert first_per_class(order, keep, labels, 2).tolist() == [1, 3]
    assert first_per_class(order, torch.zeros(7, dtype=torch.bool), labels, 3).numel() == 0


def test_same_seed_same_triplets_different_seed_differs() -> None:
    x, labels = _pool(7, n_classes=20, max_size=10)
    kw = dict(delta=0.1, threshold=10, triplets_per_round=8)
    a = DifficultyMiner(seed=3, **kw).mine(x, labels)
    b = DifficultyMiner(seed=3, **kw).mine(x, labels)
    assert len(a) > 0 and torch.equal(torch.stack(a.as_tuple()), torch.stack(b.as_tuple()))
    others = [DifficultyMiner(seed=s, **kw).mine(x, labels) for s in range(4, 10)]
    assert any(
        not torch.equal(torch.stack(a.as_tuple()), torch.stack(o.as_tuple())) for o in others
    )


@pytest.mark.parametrize("name", sorted(MINERS))
def test_state_dict_resumes_mining_exactly(name: str, tmp_path) -> None:
    x, labels = _pool(9, n_classes=15)
    kw = dict(delta=0.1, threshold=10, triplets_per_round=6, seed=4)
    miner = build_miner(name, **kw)
    miner.mine(x, labels)
    save_torch(tmp_path / "miner.pt", miner.state_dict())
    second = miner.mine(x, labels)
    resumed = build_miner(name, **{**kw, "seed": 99})
    resumed.load_state_dict(load_torch(tmp_path / "miner.pt"))
    again = resumed.mine(x, labels)
    assert torch.equal(torch.stack(second.as_tuple()), torch.stack(again.as_tuple()))
    assert resumed.rounds == miner.rounds == 2
    with pytest.raises(ValueError, match="saved by"):
        other = "random" if name != "random" else "difficulty"
        build_miner(other).load_state_dict(miner.state_dict())


def test_record_stats_and_frame() -> None:
    x, labels = _pool(1, n_classes=20)
    res = DifficultyMiner(delta=0.1, threshold=10).mine(x, labels)
    stats = res.stats()
    assert stats["num_triplets"] == len(res) > 0
    assert stats["yield"] == pytest.approx(res.with_candidate / len(labels))
    assert stats["mean_loss"] == pytest.approx(float(res.losses.mean()))
    assert 0 <= stats["semi_hard_fraction"] <= 1
    assert res.num_candidates == res.with_candidate >= len(res)
    assert isinstance(res.to_frame(), pd.DataFrame)


def test_empty_round() -> None:
    # two far-apart classes: every predicted loss is far below the window, nothing is kept
    x = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3), dim=1)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    for name in MINERS:
        res = build_miner(name, margin=0.1, delta=0.02).mine(x, labels)
        frame = res.to_frame()
        assert list(frame.columns) == COLUMNS
        if name in ("difficulty", "semi_hard"):
            assert len(res) == 0 and len(frame) == 0 and math.isnan(res.stats()["mean_loss"])


# ----------------------------------------------------------------------------- baselines


def _baseline_draws(seed: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The baselines' documented draws: randperm(N), rand(N) for positives, then for negatives."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g).numpy()
    u_pos = torch.rand(n, generator=g, dtype=torch.float64).numpy()
    u_neg = torch.rand(n, generator=g, dtype=torch.float64).numpy()
    return order, u_pos, u_neg


def test_random_miner_equals_reference() -> None:
    for seed in range(6):
        x, labels = _pool(seed + 30)
        lab = labels.numpy()
        res = RandomMiner(seed=seed, triplets_per_round=5).mine(x, labels)
        order, u_pos, u_neg = _baseline_draws(seed, len(lab))
        ref, seen = [], set()
        for a in order:
            pos = [j for j in range(len(lab)) if lab[j] == lab[a] and j != a]
            neg = [j for j in range(len(lab)) if lab[j] != lab[a]]
            if lab[a] in seen or not pos:
                continue
            seen.add(lab[a])
            ref.append((a, pos[int(u_pos[a] * len(pos))], neg[int(u_neg[a] * len(neg))]))
            if len(ref) == 5:
                break
        assert list(zip(*(t.tolist() for t in res.as_tuple()), strict=True)) == ref
        assert set(res.kinds) == {"random"}
        _check_common(res, x, labels, 5, 0.1)


def _cirtorch_negatives(s: np.ndarray, lab: np.ndarray, a: int, nnum: int) -> list[int]:
    """cirtorch create_epoch_tuples for query a: walk its ranked list, keep an image of another
    class unless its class already gave one of *this query's* negatives, stop at nnum."""
    negatives, clusters = [], set()
    for j in _ranked(s, a):
        if lab[j] != lab[a] and lab[j] not in clusters:
            negatives.append(j)
            clusters.add(lab[j])
        if len(negatives) == nnum:
            break
    return negatives


def test_hardest_negative_miner_equals_cirtorch_reference() -> None:
    total = 0
    for seed in range(6):
        x, labels = _pool(seed + 40, n_classes=10)
        s, lab = _sim(x), labels.numpy()
        res = HardestNegativeMiner(seed=seed, triplets_per_round=6).mine(x, labels)
        _check_common(res, x, labels, 6, 0.1)
        assert set(res.kinds) == {"hardest-negative"}
        order, u_pos, _ = _baseline_draws(seed, len(lab))
        ref, seen = [], set()
        for a in order:
            pos = [j for j in range(len(lab)) if lab[j] == lab[a] and j != a]
            if lab[a] in seen or not pos:
                continue
            seen.add(lab[a])
            ref.append((a, pos[int(u_pos[a] * len(pos))], _cirtorch_negatives(s, lab, a, 1)[0]))
            if len(ref) == 6:
                break
        assert list(zip(*(t.tolist() for t in res.as_tuple()), strict=True)) == ref
        total += len(ref)
    assert total == 36


def test_hardest_negative_reuses_a_negative_class_across_anchors() -> None:
    # class 2 sits between classes 0 and 1 and is the nearest other class of class 3 too:
    # every other anchor's nearest negative is image 4 (a tie with image 5 goes to the lower index)
    x = torch.nn.functional.normalize(
        torch.tensor(
            [
                [1.0, 0.0, 0.0],
                [1.0, 0.1, 0.0],
                [0.0, 1.0, 0.0],
                [0.1, 1.0, 0.0],
                [0.7, 0.7, 0.1],
                [0.7, 0.7, -0.1],
                [0.0, 0.0, 1.0],
                [0.0, 0.1, 1.0],
            ]
        ),
        dim=1,
    )
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    for seed in range(4):
        frame = HardestNegativeMiner(seed=seed, triplets_per_round=10).mine(x, labels).to_frame()
        assert sorted(frame["anchor_label"]) == [0, 1, 2, 3]
        others = frame[frame["anchor_label"] != 2]
        assert others["negative"].tolist() == [4, 4, 4]  # no round-wide one-class-per-round rule
        assert others["neg_rank"].tolist() == [1, 1, 1]  # right after the anchor's classmate
        assert frame[frame["anchor_label"] == 2]["negative"].tolist() == [1]  # tie 1 = 3: lower


def test_semi_hard_miner() -> None:
    found = 0
    for seed in range(8):
        x, labels = _pool(seed + 50, n_classes=10, noise=0.8)
        s, lab = _sim(x), labels.numpy()
        margin = 0.3
        res = SemiHardMiner(margin=margin, seed=seed, triplets_per_round=6).mine(x, labels)
        _check_common(res, x, labels, 6, margin)
        for r in res.to_frame().itertuples(index=False):
            d2p, d2n = _d2(s[r.anchor, r.positive]), _d2(s[r.anchor, r.negative])
            assert d2p < d2n < d2p + margin and 0 < r.loss < margin
            farther = [
                (_d2(s[r.anchor, j]), j)
                for j in range(len(lab))
                if lab[j] != lab[r.anchor] and _d2(s[r.anchor, j]) > d2p
            ]
            assert (d2n, r.negative) == min(farther)  # the hardest semi-hard negative
            found += 1
    assert found > 0


def test_batch_hard_miner() -> None:
    for seed in range(6):
        x, labels = _pool(seed + 60)
        s, lab = _sim(x), labels.numpy()
        res = BatchHardMiner(seed=seed, triplets_per_round=7).mine(x, labels)
        _check_common(res, x, labels, 7, 0.1)
        assert len(res) > 0
        for r in res.to_frame().itertuples(index=False):
            ranked = _ranked(s, r.anchor)
            assert r.negative == next(j for j in ranked if lab[j] != lab[r.anchor])
            assert r.positive == [j for j in ranked if lab[j] == lab[r.anchor]][-1]


@pytest.mark.parametrize("name", sorted(MINERS))
def test_one_per_class_and_cap(name: str) -> None:
    x, labels = _pool(3, n_classes=25, max_size=6)
    full = build_miner(name, delta=0.2, threshold=10, triplets_per_round=1000).mine(x, labels)
    capped = build_miner(name, delta=0.2, threshold=10, triplets_per_round=3).mine(x, labels)
    assert full.anchor_labels.unique().numel() == len(full) > 3
    assert len(capped) == 3
    assert capped.anchors.tolist() == full.anchors[:3].tolist()  # the cap keeps the first ones


# ------------------------------------------------------------------------- factory and validation


def test_registry_and_build_miner() -> None:
    assert set(MINERS) == {"difficulty", "random", "hardest_negative", "semi_hard", "batch_hard"}
    for name, cls in MINERS.items():
        miner = build_miner(
            name,
            margin=0.2,
            delta=0.05,
            threshold=5,
            semi_hard_prob=0.3,
            triplets_per_round=10,
            seed=1,
            backend="faiss",
        )
        assert isinstance(miner, cls) and isinstance(miner, TripletMiner) and miner.name == name
        assert miner.margin == 0.2 and miner.backend == "faiss"
    with pytest.raises(ValueError, match="unknown name 'hardest'"):
        build_miner("hardest")
    with pytest.raises(ValueError, match=r"unknown keyword\(s\) \['pool_size'\]"):
        build_miner("difficulty", pool_size=8000)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"margin": 0}, "margin"),
        ({"delta": -0.1}, "delta"),
        ({"threshold": 0}, "threshold"),
        ({"semi_hard_prob": 1.5}, "semi_hard_prob"),
        ({"triplets_per_round": 0}, "triplets_per_round"),
        ({"seed": -1}, "seed"),
        ({"backend": "annoy"}, "backend"),
        ({"threshold": 2.5}, "threshold"),
    ],
)
def test_bad_keywords(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DifficultyMiner(**kwargs)


def test_bad_inputs() -> None:
    x, labels = _pool(0)
    miner = DifficultyMiner()
    with pytest.raises(ValueError, match="L2-normalised"):
        miner.mine(x * 2, labels)
    with pytest.raises(ValueError, match="labels: expected shape"):
        miner.mine(x, labels[:-1])
    with pytest.raises(ValueError, match="labels: expected an integer"):
        miner.mine(x, labels.float())
    with pytest.raises(ValueError, match="descriptors: expected a floating"):
        miner.mine(x[0], labels)
    with pytest.raises(ValueError, match="at least 2 rows"):
        miner.mine(x[:1], labels[:1])
    bad = x.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        miner.mine(bad, labels)
    assert miner.rounds == 0


def test_mine_runs_without_grad() -> None:
    x, labels = _pool(2)
    x = x.clone().requires_grad_(True)
    res = DifficultyMiner(delta=0.2).mine(x, labels)
    assert not res.pos_sims.requires_grad and not res.losses.requires_grad


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(MINERS))
def test_cuda_matches_cpu(name: str) -> None:
    x, labels = _pool(5, n_classes=30)
    kw = dict(delta=0.1, threshold=10, seed=2)
    cpu = build_miner(name, **kw).mine(x, labels)
    gpu = build_miner(name, **kw).mine(x.cuda(), labels.cuda())
    assert torch.equal(torch.stack(cpu.as_tuple()), torch.stack(gpu.as_tuple()))
    assert not gpu.anchors.is_cuda
