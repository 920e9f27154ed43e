"""Evaluation against hand-computed APs and an independent re-implementation of revisitop."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from msvlad.data.official import holidays_gnd
from msvlad.evaluation.protocol import (
    RetrievalMetrics,
    compute_ap,
    compute_map,
    evaluate,
    metrics_summary,
    metrics_table,
    revisited_setups,
)


def col(*ids: int) -> np.ndarray:
    """A one-query ranking (n_db, 1)."""
    return np.asarray(ids, dtype=np.int64)[:, None]


# ---------------------------------------------------------------- compute_ap


def test_compute_ap_trapezoid_three_positives() -> None:
    # positives at 0-based positions 0, 2, 5; nres = 3; term = (p0 + p1) / 2 / 3
    # j=0 r=0: p0 = 1,   p1 = 1/1 = 1    -> 2/6          = 1/3
    # j=1 r=2: p0 = 1/2, p1 = 2/3        -> (7/6)/6      = 7/36
    # j=2 r=5: p0 = 2/5, p1 = 3/6 = 1/2  -> (9/10)/6     = 3/20
    # total = 1/3 + 7/36 + 3/20 = 61/90
    assert compute_ap(np.array([0, 2, 5]), 3) == pytest.approx(61 / 90, abs=1e-15)
    # a fourth positive never retrieved: every term scales by 3/4
    assert compute_ap(np.array([0, 2, 5]), 4) == pytest.approx(61 / 120, abs=1e-15)


def test_compute_ap_differs_from_stepwise_ap() -> None:
    # step-wise (sklearn-style) AP, positives at 1-based ranks 1, 3, 6: (1 + 2/3 + 3/6) / 3 = 13/18
    assert compute_ap(np.array([0, 2, 5]), 3) != pytest.approx(13 / 18)


def test_compute_ap_edge_cases() -> None:
    assert compute_ap(np.array([], dtype=np.int64), 2) == 0.0
    assert compute_ap(np.array([0, 1, 2]), 3) == 1.0
    with pytest.raises(ValueError, match="nres"):
        compute_ap(np.array([0]), 0)


# ---------------------------------------------------------------- compute_map


def test_junk_before_and_between_positives_shifts_positions() -> None:
    # list: J P J N P  (J = 10, 11; P = 1, 2; N = 3), positions of P: 1, 4, junk at 0, 2
    # shifted: 1 - 1 = 0, 4 - 2 = 2
    # AP(nres 2) = (1 + 1)/4 + (1/2 + 2/3)/4 = 1/2 + 7/24 = 19/24
    # P@k on 1-based positions [1, 3]: k=1 -> kq 1 -> 1; k=5 -> kq = min(3, 5) = 3 -> 2/3;
    # k=10 -> 2/3
    ranks = col(10, 1, 11, 3, 2)
    gnd = [{"ok": np.array([1, 2]), "junk": np.array([10, 11])}]
    m, aps, mpr, prs = compute_map(ranks, gnd, (1, 5, 10))
    assert m == pytest.approx(19 / 24, abs=1e-15)
    assert aps[0] == pytest.approx(19 / 24, abs=1e-15)
    np.testing.assert_allclose(prs[0], [1.0, 2 / 3, 2 / 3], atol=1e-15)
    np.testing.assert_allclose(mpr, [1.0, 2 / 3, 2 / 3], atol=1e-15)


def test_junk_after_all_positives_changes_nothing() -> None:
    ranks = col(1, 2, 10, 3)
    with_junk = compute_map(ranks, [{"ok": [1, 2], "junk": [10]}])[0]
    without = compute_map(ranks, [{"ok": [1, 2]}])[0]
    assert with_junk == without == 1.0


def test_mpk_rule_with_fewer_positives_than_k() -> None:
    # 2 positives at the top: kq = min(max pos = 2, k) = 2 -> P@5 = P@10 = 2/2 = 1 (not 2/5)
    ranks = col(7, 8, 0, 1, 2, 3, 4, 5, 6)
    _, _, mpr, _ = compute_map(ranks, [{"ok": [7, 8], "junk": []}], (1, 5, 10))
    np.testing.assert_allclose(mpr, [1.0, 1.0, 1.0])
    # positives at 1-based 1 and 7: P@5 -> kq = 5 -> 1/5; P@10 -> kq = 7 -> 2/7
    ranks = col(7, 0, 1, 2, 3, 4, 8, 5, 6)
    _, _, mpr, _ = compute_map(ranks, [{"ok": [7, 8], "junk": []}], (1, 5, 10))
    np.testing.assert_allclose(mpr, [1.0, 1 / 5, 2 / 7])


def test_empty_positive_query_is_nan_and_excluded() -> None:
    ranks = np.stack([np.array([0, 1, 2, 3]), np.array([0, 1, 2, 3])], axis=1)
    # query 0: positive at position 1 -> AP = (0/1 + 1/2)/2 = 1/4; query 1: no positives
    gnd = [{"ok": [1], "junk": []}, {"ok": [], "junk": [2]}]
    m, aps, mpr, prs = compute_map(ranks, gnd, (1, 5))
    assert aps[0] == pytest.approx(0.25)
    assert math.isnan(aps[1]) and np.isnan(prs[1]).all()
    assert m == pytest.approx(0.25)
    # P@1: kq = min(2, 1) = 1 -> 0; P@5: kq = 2 -> 1/2
    np.testing.assert_allclose(mpr, [0.0, 0.5])


def test_all_queries_empty_gives_nan() -> None:
    m, aps, mpr, _ = compute_map(col(0, 1), [{"ok": []}])
    assert math.isnan(m) and math.isnan(aps[0]) and np.isnan(mpr).all()


def test_truncated_ranks_count_missing_positives_as_not_retrieved() -> None:
    # top-3 of a list; 3 positives, only 2 in the list at positions 0 and 2
    # AP = (1 + 1)/6 + (1/2 + 2/3)/6 = 1/3 + 7/36 = 19/36
    top3 = col(5, 9, 6)
    gnd = [{"ok": [5, 6, 7], "junk": []}]
    m, _, mpr, _ = compute_map(top3, gnd, (1, 5))
    assert m == pytest.approx(19 / 36)
    np.testing.assert_allclose(mpr, [1.0, 2 / 3])  # kq = min(3, 5) = 3
    # nothing retrieved: AP 0 and P@k 0 (not NaN: the query has positives)
    m, aps, mpr, prs = compute_map(col(1, 2), gnd, (1, 5))
    assert m == 0.0 and aps[0] == 0.0 and (prs == 0).all()


def test_truncated_equals_full_when_all_positives_inside() -> None:
    rng = np.random.default_rng(3)
    full = np.stack([rng.permutation(50) for _ in range(4)], axis=1)
    gnd = [{"ok": full[[0, 2, 5], i], "junk": full[[1, 7], i]} for i in range(4)]
    a = compute_map(full, gnd, (1, 5, 10))
    b = compute_map(full[:10], gnd, (1, 5, 10))
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[3], b[3])


def _naive_map(ranks: np.ndarray, gnd: list[dict], kappas: tuple[int, ...]):
    """Independent oracle: delete junk from each list, then walk it (trapezoid AP, quirky P@k)."""
    aps, prs = [], []
    for i, g in enumerate(gnd):
        ok, junk = set(int(x) for x in g["ok"]), set(int(x) for x in g["junk"])
        if not ok:
            aps.append(float("nan"))
            prs.append([float("nan")] * len(kappas))
            continue
        clean = [int(x) for x in ranks[:, i] if int(x) not in junk or int(x) in ok]
        hits = [r for r, x in enumerate(clean) if x in ok]
        ap = 0.0
        for j, r in enumerate(hits):
            p0 = 1.0 if r == 0 else j / r
            p1 = (j + 1) / (r + 1)
            ap += (p0 + p1) / (2 * len(g["ok"]))
        aps.append(ap)
        row = []
        for k in kappas:
            if not hits:
                row.append(0.0)
                continue
            kq = min(hits[-1] + 1, k)
            row.append(sum(1 for r in hits if r + 1 <= kq) / kq)
        prs.append(row)
    aps, prs = np.array(aps), np.array(prs)
    valid = ~np.isnan(aps)
    return aps[valid].mean(), aps, prs[valid].mean(axis=0), prs


def test_compute_map_matches_independent_oracle_on_random_rankings() -> None:
    rng = np.random.default_rng(0)
    kappas = (1, 3, 5, 10)
    for _ in range(200):
        n_db, nq = int(rng.integers(5, 60)), int(rng.integers(1, 6))
        ranks = np.stack([rng.permutation(n_db) for _ in range(nq)], axis=1)
        if rng.random() < 0.3:  # truncated lists
            ranks = ranks[: int(rng.integers(1, n_db + 1))]
        gnd = []
        for _ in range(nq):
            perm = rng.permutation(n_db)
            n_ok = int(rng.integers(0, min(8, n_db)))
            n_junk = int(rng.integers(0, min(8, n_db - n_ok) + 1))
            gnd.append({"ok": perm[:n_ok], "junk": perm[n_ok : n_ok + n_junk]})
        if all(len(g["ok"]) == 0 for g in gnd):
            gnd[0]["ok"] = np.array([0])
            gnd[0]["junk"] = np.setdiff1d(gnd[0]["junk"], [0])
        got = compute_map(ranks, gnd, kappas)
        want = _naive_map(ranks, gnd, kappas)
        assert got[0] == pytest.approx(want[0], rel=1e-12, abs=1e-12)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got[2], want[2], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got[3], want[3], rtol=1e-12, atol=1e-12)


def test_compute_map_bad_input() -> None:
    gnd = [{"ok": [1]}]
    with pytest.raises(ValueError, match="columns"):
        compute_map(np.zeros((3, 2), dtype=np.int64), gnd)
    with pytest.raises(ValueError, match="integer"):
        compute_map(np.zeros((3, 1)), gnd)
    with pytest.raises(ValueError, match="n_db, n_queries"):
        compute_map(np.zeros(3, dtype=np.int64), gnd)
    with pytest.raises(ValueError, match="kappas"):
        compute_map(col(0, 1), gnd, (0,))


# ---------------------------------------------------------------- protocols

RAW = [{"easy": [2, 5], "hard": [1], "junk": [0], "bbx": [0, 0, 1, 1]}]


def test_revisited_setups_construction() -> None:
    s = revisited_setups(RAW)
    assert set(s) == {"easy", "medium", "hard"}
    assert sorted(s["easy"][0]["ok"]) == [2, 5] and sorted(s["easy"][0]["junk"]) == [0, 1]
    assert sorted(s["medium"][0]["ok"]) == [1, 2, 5] and sorted(s["medium"][0]["junk"]) == [0]
    assert sorted(s["hard"][0]["ok"]) == [1] and sorted(s["hard"][0]["junk"]) == [0, 2, 5]
    assert s["hard"][0]["ok"].dtype == np.int64
    # the whole gnd_<ds>.pkl dict is accepted too
    assert sorted(revisited_setups({"gnd": RAW})["medium"][0]["ok"]) == [1, 2, 5]
    with pytest.raises(ValueError, match="missing key"):
        revisited_setups([{"easy": [1]}])


def test_evaluate_revisited_hand_computed() -> None:
    ranks = col(0, 1, 2, 3, 4, 5, 6, 7)
    # Easy: ok {2,5}, junk {0,1}: positions 2, 5 -> 0, 3; AP = 1/2 + (1/3 + 2/4)/4 = 17/24
    # Medium: ok {1,2,5}, junk {0}: positions 1, 2, 5 -> 0, 1, 4
    #   AP = 1/3 + (1 + 1)/6 + (2/4 + 3/5)/6 = 2/3 + 11/60 = 51/60
    #   P@1 = 1; P@5: kq = min(5, 5) -> 3/5; P@10: kq = 5 -> 3/5
    # Hard: ok {1}, junk {0,2,5}: position 1 -> 0; AP = 1
    m = evaluate(ranks, RAW, "revisited")
    assert m.setups["easy"].mAP == pytest.approx(17 / 24)
    assert m.setups["medium"].mAP == pytest.approx(51 / 60)
    assert m.setups["hard"].mAP == pytest.approx(1.0)
    out = m.to_json()
    assert out["mAP"] == {"easy": 70.83, "medium": 85.0, "hard": 100.0}
    assert out["mP@k"]["medium"] == {"1": 100.0, "5": 60.0, "10": 60.0}
    assert out["mP@k"]["easy"] == {"1": 100.0, "5": 50.0, "10": 50.0}  # 1-based [1, 4]: kq 4
    json.dumps(out)  # serialisable


def test_evaluate_classic_oxford_ap() -> None:
    # ok (good + ok) {3, 4, 7}, junk {1}; list 3 1 4 0 2 5 6 7 -> positions 0, 2, 7 -> 0, 1, 6
    # AP = 1/3 + 2/6 + (2/6 + 3/7)/6 = 2/3 + 8/63 = 50/63
    ranks = col(3, 1, 4, 0, 2, 5, 6, 7)
    m = evaluate(ranks, [{"ok": [3, 4, 7], "junk": [1]}], "classic")
    assert list(m.setups) == ["all"]
    assert m.setups["all"].mAP == pytest.approx(50 / 63)
    assert m.to_json()["mAP"] == {"all": round(100 * 50 / 63, 2)}


def test_holidays_gnd_from_names() -> None:
    imlist = ["100000.jpg", "100001.jpg", "jpg/100100.jpg", "100101", "100102.jpg"]
    qimlist, gnd = holidays_gnd(imlist)
    assert qimlist == ["100000.jpg", "jpg/100100.jpg"]
    assert [g["query_db_index"] for g in gnd] == [0, 2]
    assert [list(g["ok"]) for g in gnd] == [[1], [3, 4]]
    with pytest.raises(ValueError, match="6-digit"):
        holidays_gnd(["10000.jpg"])
    with pytest.raises(ValueError, match="no query"):
        holidays_gnd(["100000.jpg", "100101.jpg"])


def test_evaluate_holidays_excludes_query() -> None:
    _, gnd = holidays_gnd(["100000", "100001", "100100", "100101", "100102"])
    # q0 (db 0): list 0 2 1 3 4 -> self removed -> positive 1 at position 1: AP = (0 + 1/2)/2 = 1/4
    # q1 (db 2): list 2 3 0 4 1 -> self removed -> positives at 0, 2: AP = 1/2 + 7/24 = 19/24
    ranks = np.stack([np.array([0, 2, 1, 3, 4]), np.array([2, 3, 0, 4, 1])], axis=1)
    m = evaluate(ranks, gnd, "holidays")
    np.testing.assert_allclose(m.setups["all"].aps, [1 / 4, 19 / 24])
    assert m.setups["all"].mAP == pytest.approx(25 / 48)
    assert evaluate(ranks, gnd, "holidays").setups["all"].mAP == m.setups["all"].mAP
    bad = [{"ok": np.array([0, 1]), "query_db_index": 0}]
    with pytest.raises(ValueError, match="query_db_index"):
        evaluate(col(0, 1), bad, "holidays")


def test_evaluate_dispatch_and_unknown_protocol() -> None:
    ranks = col(0, 1, 2, 3, 4, 5, 6, 7)
    assert evaluate(ranks, RAW, "revisited").protocol == "revisited"
    assert evaluate(ranks, [{"ok": [1]}], "classic").setups["all"].mAP == pytest.approx(0.25)
    with pytest.raises(ValueError, match="protocol"):
        evaluate(ranks, RAW, "oxford")  # type: ignore[arg-type]


# ---------------------------------------------------------------- outputs


def _two_query_metrics() -> RetrievalMetrics:
    raw = RAW + [{"easy": [], "hard": [3], "junk": []}]
    ranks = np.stack([np.arange(8), np.arange(8)[::-1]], axis=1)
    return evaluate(ranks, raw, "revisited")


def test_per_query_frame_and_csv_round_trip(tmp_path) -> None:
    m = _two_query_metrics()
    df = m.per_query_frame(["q0", "q1"])
    assert list(df.columns) == ["query", "setup", "AP", "P@1", "P@5", "P@10"]
    assert len(df) == 6
    easy = df[df.setup == "easy"].set_index("query")
    assert easy.loc["q0", "AP"] == pytest.approx(17 / 24)
    assert math.isnan(easy.loc["q1", "AP"])  # no easy positive
    path = tmp_path / "roxford5k.csv"
    df.to_csv(path, index=False)
    back = pd.read_csv(path)
    pd.testing.assert_frame_equal(back, df)
    with pytest.raises(ValueError, match="qimlist"):
        m.per_query_frame(["only-one"])


def test_to_json_nan_becomes_null() -> None:
    m = evaluate(col(0, 1), [{"ok": []}], "classic")
    assert m.to_json() == {
        "mAP": {"all": None},
        "mP@k": {"all": {"1": None, "5": None, "10": None}},
    }


def test_metrics_table() -> None:
    rev = _two_query_metrics()
    cls = evaluate(col(3, 1, 4, 0, 2, 5, 6, 7), [{"ok": [3, 4, 7], "junk": [1]}], "classic")
    table = metrics_table({"roxford5k": rev, "oxford5k": cls})
    assert list(table.columns[:4]) == ["mAP E", "mAP M", "mAP H", "mAP all"]
    assert list(table.index) == ["roxford5k", "oxford5k"]
    assert table.loc["roxford5k", "mAP E"] == pytest.approx(round(100 * rev.setups["easy"].mAP, 2))
    assert table.loc["oxford5k", "mAP all"] == pytest.approx(round(100 * 50 / 63, 2))
    assert math.isnan(table.loc["oxford5k", "mAP E"]) and math.isnan(
        table.loc["roxford5k", "mAP all"]
    )
    assert table.columns[4].startswith("mP@1")


def test_metrics_summary_keeps_only_plain_and_qe_map() -> None:
    # revisited: positives at 0-based positions 0 and 2 of 4 (Medium) -> AP (1 + 1 + 2/3 ... )
    rev = evaluate(
        np.array([[0], [5], [1], [2], [3], [4]]),
        [{"easy": [0], "hard": [1], "junk": [4], "bbx": [0, 0, 1, 1]}],
        "revisited",
    )
    cls = evaluate(col(3, 1, 4, 0, 2, 5, 6, 7), [{"ok": [3, 4, 7], "junk": [1]}], "classic")
    result = {
        "roxford5k": {v: {**rev.to_json(), "dim": 8} for v in ("plain", "qe", "dba")},
        "oxford5k": {"plain": cls.to_json(), "dba": cls.to_json()},
    }
    summary = metrics_summary(json.loads(json.dumps(result)))
    # easy: ok [0] at position 0 -> 100; medium: ok [0, 1] at 0 and 2 -> (1 + (1/2 + 2/3)/2)/2;
    # hard: ok [1], easy 0 is junk -> position 1 -> (0 + 1/2)/2 = 25
    medium = round(100 * (1 + (1 / 2 + 2 / 3) / 2) / 2, 2)
    assert summary["roxford5k"] == {
        "E": 100.0,
        "M": medium,
        "H": 25.0,
        "E+QE": 100.0,
        "M+QE": medium,
        "H+QE": 25.0,
    }
    assert summary["oxford5k"] == {"mAP": round(100 * 50 / 63, 2)}  # no qe variant: plain only
    with pytest.raises(ValueError, match="roxford5k"):
        metrics_summary({"roxford5k": {"qe": rev.to_json()}})
