"""Retrieval evaluation: revisited ROxf/RPar (E/M/H), classic Oxford5k/Paris6k, INRIA Holidays.

The numbers follow the revisitop protocol (Radenović et al., CVPR 2018,
https://github.com/filipradenovic/revisitop, `python/evaluate.py`) to the last bit:

- AP is the original Oxford trapezoid rule: for the j-th positive (0-based) at 0-based position r,
  add (p0 + p1) / 2 / n_pos with p0 = j / r (1 when r = 0) and p1 = (j + 1) / (r + 1).
- Junk images are removed from the ranked list by shifting each positive's position down by the
  number of junk images ranked before it.
- P@k uses k' = min(last positive position (1-based), k), so a query whose positives all come
  before rank k is not penalised for having fewer than k positives.
- Queries without positives get NaN and are left out of the means.

Conventions: `ranks` is (n_db, n_queries) (or the top-k rows of it), one column per query, holding
database indices; `gnd[i]` has `ok` and `junk` index arrays. All values here are fractions in
[0, 1]; `RetrievalMetrics.to_json` turns them into percent with 2 decimals, as revisitop prints.

Holidays ground truth (built by `msvlad.data.official.holidays_gnd`): the query image is part of
the database; each entry is `{"ok": int64 array of the other images of its group,
"query_db_index": int}` and the query is removed from its own ranking (treated as junk) before
AP, as in INRIA's holidays_map.py.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, get_args

import numpy as np
import pandas as pd

from msvlad.data.catalog import Protocol

logger = logging.getLogger(__name__)

PROTOCOLS: tuple[str, ...] = get_args(Protocol)
REVISITED_SETUPS: tuple[str, ...] = ("easy", "medium", "hard")
DEFAULT_KAPPAS: tuple[int, ...] = (1, 5, 10)


# --------------------------------------------------------------------------------------------
# Core metrics (revisitop semantics)
# --------------------------------------------------------------------------------------------


def compute_ap(ranks: np.ndarray, nres: int) -> float:
    """Trapezoid AP (original Oxford rule) from the sorted 0-based positions of the positives."""
    ranks = np.asarray(ranks)
    if nres <= 0:
        raise ValueError(f"nres: expected a positive number of positives, got {nres}")
    if ranks.size == 0:
        return 0.0
    j = np.arange(ranks.size, dtype=np.float64)
    r = ranks.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision_0 = np.where(r == 0, 1.0, j / r)
    precision_1 = (j + 1.0) / (r + 1.0)
    terms = (precision_0 + precision_1) * (1.0 / nres) / 2.0
    # cumsum adds left to right, exactly like revisitop's loop (np.sum would add pairwise)
    return float(np.cumsum(terms)[-1])


def compute_map(
    ranks: np.ndarray,
    gnd: Sequence[Mapping[str, Any]],
    kappas: Sequence[int] = DEFAULT_KAPPAS,
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """mAP, per-query AP, mP@k and per-query P@k of a ranking, exactly as revisitop computes them.

    Args:
        ranks: (n_rows, n_q) integer database indices, best first, one column per query. n_rows
            may be the full database or only its top k; positives below it count as not retrieved.
        gnd: n_q mappings with `ok` (positives) and optionally `junk` (ignored) index arrays.
        kappas: the k of P@k.

    Returns:
        (mAP, aps (n_q,), mpr (len(kappas),), prs (n_q, len(kappas))); queries with no positives
        have NaN in aps/prs and are excluded from mAP/mpr (NaN when every query is empty).
    """
    ranks = _check_ranks(ranks, len(gnd))
    kappas = _check_kappas(kappas)
    n_rows, nq = ranks.shape
    aps = np.zeros(nq)
    prs = np.zeros((nq, len(kappas)))
    valid = np.ones(nq, dtype=bool)
    kq_cap = np.asarray(kappas, dtype=np.int64)
    for i in range(nq):
        ok = _as_index_array(gnd[i].get("ok", ()), f"gnd[{i}]['ok']")
        if ok.size == 0:
            aps[i] = np.nan
            prs[i, :] = np.nan
            valid[i] = False
            continue
        junk = _as_index_array(gnd[i].get("junk", ()), f"gnd[{i}]['junk']")
        col = ranks[:, i]
        pos = np.flatnonzero(np.isin(col, ok))  # sorted 0-based positions of positives
        if junk.size:
            junk_pos = np.flatnonzero(np.isin(col, junk))
            # drop junk from the list: a positive moves up by the number of junk strictly before it
            pos = pos - np.searchsorted(junk_pos, pos, side="left")
        aps[i] = compute_ap(pos, int(ok.size))
        if pos.size == 0:  # only possible with truncated ranks: nothing retrieved
            prs[i, :] = 0.0
            continue
        pos1 = pos + 1  # 1-based
        kq = np.minimum(pos1.max(), kq_cap)
        prs[i, :] = (pos1[None, :] <= kq[:, None]).sum(axis=1) / kq
    n_valid = int(valid.sum())
    if n_valid == 0:
        logger.warning("compute_map: no query has a positive; mAP is NaN")
        return float("nan"), aps, np.full(len(kappas), np.nan), prs
    # sequential sums, as revisitop accumulates them
    mean_ap = float(np.cumsum(aps[valid])[-1] / n_valid)
    mpr = np.cumsum(prs[valid], axis=0)[-1] / n_valid if len(kappas) else np.zeros(0)
    return mean_ap, aps, mpr, prs


# --------------------------------------------------------------------------------------------
# Ground truth per protocol
# --------------------------------------------------------------------------------------------


def revisited_setups(
    gnd_raw: Sequence[Mapping[str, Any]] | Mapping[str, Any],
) -> dict[str, list[dict]]:
    """Build the Easy / Medium / Hard ground truths from revisitop's easy/hard/junk lists."""
    gnd = _gnd_list(gnd_raw)
    setups: dict[str, list[dict]] = {name: [] for name in REVISITED_SETUPS}
    for i, g in enumerate(gnd):
        missing = [key for key in ("easy", "hard", "junk") if key not in g]
        if missing:
            raise ValueError(f"gnd[{i}]: missing key(s) {missing} for the revisited protocol")
        easy = _as_index_array(g["easy"], f"gnd[{i}]['easy']")
        hard = _as_index_array(g["hard"], f"gnd[{i}]['hard']")
        junk = _as_index_array(g["junk"], f"gnd[{i}]['junk']")
        setups["easy"].append({"ok": easy, "junk": np.concatenate([junk, hard])})
        setups["medium"].append({"ok": np.concatenate([easy, hard]), "junk": junk})
        setups["hard"].append({"ok": hard, "junk": np.concatenate([junk, easy])})
    return setups


# --------------------------------------------------------------------------------------------
# Results container
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SetupMetrics:
    """compute_map output for one setup: fractions in [0, 1], NaN for queries without positives."""

    mAP: float
    aps: np.ndarray  # (n_q,)
    mpr: np.ndarray  # (len(kappas),)
    prs: np.ndarray  # (n_q, len(kappas))


@dataclass(frozen=True, eq=False)
class RetrievalMetrics:
    """Metrics of one ranking under one protocol: setups easy/medium/hard (revisited) or all."""

    protocol: str
    kappas: tuple[int, ...]
    setups: dict[str, SetupMetrics]

    @property
    def n_queries(self) -> int:
        """Number of queries (columns of the ranking)."""
        return int(next(iter(self.setups.values())).aps.shape[0])

    def to_json(self) -> dict[str, dict]:
        """Percent values with 2 decimals: {"mAP": {setup: x}, "mP@k": {setup: {"1": x, ...}}}."""
        return {
            "mAP": {name: _percent(m.mAP) for name, m in self.setups.items()},
            "mP@k": {
                name: {str(k): _percent(v) for k, v in zip(self.kappas, m.mpr, strict=True)}
                for name, m in self.setups.items()
            },
        }

    def per_query_frame(self, qimlist: Sequence[str] | None = None) -> pd.DataFrame:
        """One row per (setup, query): query, setup, AP, P@k... (fractions; NaN = no positive)."""
        names = _query_names(qimlist, self.n_queries)
        frames = []
        for setup, m in self.setups.items():
            cols: dict[str, Any] = {"query": names, "setup": setup, "AP": m.aps}
            for j, k in enumerate(self.kappas):
                cols[f"P@{k}"] = m.prs[:, j]
            frames.append(pd.DataFrame(cols))
        return pd.concat(frames, ignore_index=True)


def metrics_table(metrics_by_name: Mapping[str, RetrievalMetrics]) -> pd.DataFrame:
    """One row per name: mAP per setup, then mP@k per setup (percent; NaN where absent)."""
    rows = []
    for name, metrics in metrics_by_name.items():
        js = metrics.to_json()
        row: dict[str, Any] = {"name": str(name)}
        row.update({f"mAP {_setup_label(s)}": v for s, v in js["mAP"].items()})
        for s, by_k in js["mP@k"].items():
            row.update({f"mP@{k} {_setup_label(s)}": v for k, v in by_k.items()})
        rows.append(row)
    table = pd.DataFrame(rows).set_index("name")
    first = [c for c in table.columns if c.startswith("mAP")]
    return table[first + [c for c in table.columns if c not in first]]


SUMMARY_VARIANTS: dict[str, str] = {"plain": "", "qe": "+QE"}  # variant -> key suffix


def metrics_summary(result: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float | None]]:
    """The few numbers a reader looks at first: mAP per dataset and setup, plain and +QE.

    `result` is metrics.json content, {dataset: {variant: RetrievalMetrics.to_json() + extras}}.
    Keys are E/M/H for revisited sets and "mAP" for single-setup protocols, "+QE" appended for
    query expansion; this is what `dvc metrics show` prints (the full metrics.json stays beside it).
    """
    out: dict[str, dict[str, float | None]] = {}
    for dataset, variants in result.items():
        if not isinstance(variants, Mapping) or "plain" not in variants:
            raise ValueError(f"result: {dataset}: expected {{variant: metrics}} with 'plain'")
        row: dict[str, float | None] = {}
        for variant, suffix in SUMMARY_VARIANTS.items():
            setups = variants.get(variant, {}).get("mAP", {})
            for setup, value in setups.items():
                name = _setup_label(setup) if setup in REVISITED_SETUPS else "mAP"
                row[name + suffix] = value
        out[dataset] = row
    return out


# --------------------------------------------------------------------------------------------
# Protocol entry points
# --------------------------------------------------------------------------------------------


def classic_setup(gnd_raw: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> list[dict]:
    """Oxford5k / Paris6k ground truth: ok = good + ok images, junk as listed."""
    gnd = []
    for i, g in enumerate(_gnd_list(gnd_raw)):
        if "ok" not in g:
            raise ValueError(f"gnd[{i}]: missing key 'ok' for the classic protocol")
        gnd.append(
            {
                "ok": _as_index_array(g["ok"], f"gnd[{i}]['ok']"),
                "junk": _as_index_array(g.get("junk", ()), f"gnd[{i}]['junk']"),
            }
        )
    return gnd


def holidays_setup(gnd_raw: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> list[dict]:
    """INRIA Holidays ground truth: the query's own database copy is junk (out of its list)."""
    gnd = []
    for i, g in enumerate(_gnd_list(gnd_raw)):
        if "ok" not in g or "query_db_index" not in g:
            raise ValueError(f"gnd[{i}]: Holidays entries need 'ok' and 'query_db_index'")
        ok = _as_index_array(g["ok"], f"gnd[{i}]['ok']")
        q_idx = int(g["query_db_index"])
        if np.any(ok == q_idx):
            raise ValueError(f"gnd[{i}]: query_db_index {q_idx} must not be listed in 'ok'")
        gnd.append({"ok": ok, "junk": np.asarray([q_idx], dtype=np.int64)})
    return gnd


def ground_truth(
    gnd_raw: Sequence[Mapping[str, Any]] | Mapping[str, Any], protocol: Protocol
) -> dict[str, list[dict]]:
    """Per setup, one {"ok", "junk"} index dict per query: the only place positives/junk are made.

    Revisited sets give easy/medium/hard; classic and Holidays sets give one setup, "all".
    """
    if protocol == "revisited":
        return revisited_setups(gnd_raw)
    if protocol == "classic":
        return {"all": classic_setup(gnd_raw)}
    if protocol == "holidays":
        return {"all": holidays_setup(gnd_raw)}
    raise ValueError(f"protocol: expected one of {PROTOCOLS}, got {protocol!r}")


def evaluate(
    ranks: np.ndarray,
    gnd_raw: Sequence[Mapping[str, Any]] | Mapping[str, Any],
    protocol: Protocol,
    kappas: Sequence[int] = DEFAULT_KAPPAS,
) -> RetrievalMetrics:
    """mAP and mP@k of a ranking under `protocol` (revisited, classic or holidays), every setup."""
    kappas = _check_kappas(kappas)
    setups = ground_truth(gnd_raw, protocol)
    return RetrievalMetrics(
        protocol=protocol,
        kappas=kappas,
        setups={name: SetupMetrics(*compute_map(ranks, g, kappas)) for name, g in setups.items()},
    )


# --------------------------------------------------------------------------------------------
# Internals
# --------------------------------------------------------------------------------------------


def _gnd_list(gnd_raw: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Accept the gnd list itself or the whole gnd_<ds>.pkl dict (with a 'gnd' key)."""
    if isinstance(gnd_raw, Mapping):
        if "gnd" not in gnd_raw:
            raise ValueError("gnd_raw: expected a list of per-query dicts or a dict with key 'gnd'")
        gnd_raw = gnd_raw["gnd"]
    return list(gnd_raw)


def _as_index_array(values: Any, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise ValueError(f"{name}: expected integer database indices, got dtype {arr.dtype}")
    return arr.reshape(-1).astype(np.int64, copy=False)


def _check_ranks(ranks: np.ndarray, n_queries: int) -> np.ndarray:
    ranks = np.asarray(ranks)
    if ranks.ndim != 2:
        raise ValueError(f"ranks: expected shape (n_db, n_queries), got {ranks.shape}")
    if ranks.dtype.kind not in "iu":
        raise ValueError(f"ranks: expected integer database indices, got dtype {ranks.dtype}")
    if ranks.shape[1] != n_queries:
        raise ValueError(
            f"ranks: has {ranks.shape[1]} columns but gnd has {n_queries} queries "
            "(ranks must be (n_db, n_queries); transpose it?)"
        )
    return ranks


def _check_kappas(kappas: Sequence[int]) -> tuple[int, ...]:
    out = tuple(int(k) for k in kappas)
    if any(k < 1 for k in out):
        raise ValueError(f"kappas: expected positive integers, got {list(kappas)}")
    return out


def _query_names(qimlist: Sequence[str] | None, n: int) -> list[str]:
    if qimlist is None:
        return [str(i) for i in range(n)]
    names = [str(q) for q in qimlist]
    if len(names) != n:
        raise ValueError(f"qimlist: has {len(names)} names but the metrics have {n} queries")
    return names


def _setup_label(setup: str) -> str:
    return setup[0].upper() if setup in REVISITED_SETUPS else setup


def _percent(x: float) -> float | None:
    x = float(x)
    if not np.isfinite(x):
        return None
    return float(np.around(x * 100.0, decimals=2))
