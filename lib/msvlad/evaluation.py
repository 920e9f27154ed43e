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

Holidays ground truth (built by `holidays_gnd`): the query image is part of the database; each
entry is `{"ok": int64 array of the other images of its group, "query_db_index": int}` and the
query is removed from its own ranking (treated as junk) before AP, as in INRIA's holidays_map.py.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, Literal

import numpy as np
import pandas as pd

from msvlad.storage import write_text

logger = logging.getLogger(__name__)

Protocol = Literal["revisited", "classic", "holidays"]
PROTOCOLS: tuple[str, ...] = ("revisited", "classic", "holidays")
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


def holidays_gnd(imlist: Sequence[str]) -> tuple[list[str], list[dict]]:
    """Holidays queries and gnd from file names: 6 digits, group = first 4, query = xxxx00."""
    groups: dict[str, list[int]] = {}
    queries: dict[str, int] = {}
    for idx, name in enumerate(imlist):
        stem = PurePath(str(name)).stem
        if len(stem) != 6 or not stem.isdigit():
            raise ValueError(f"imlist[{idx}]: {name!r} is not a 6-digit Holidays image name")
        group = stem[:4]
        if stem[4:] == "00":
            if group in queries:
                raise ValueError(f"imlist[{idx}]: {name!r} repeats the query of group {group}")
            queries[group] = idx
        groups.setdefault(group, []).append(idx)
    no_query = sorted(set(groups) - set(queries))
    if no_query:
        raise ValueError(f"imlist: group(s) {no_query[:5]} have no query image (xxxx00)")
    qimlist: list[str] = []
    gnd: list[dict] = []
    for group, q_idx in sorted(queries.items(), key=lambda item: item[1]):
        ok = np.asarray([j for j in groups[group] if j != q_idx], dtype=np.int64)
        qimlist.append(str(imlist[q_idx]))
        gnd.append({"ok": ok, "query_db_index": int(q_idx)})
    return qimlist, gnd


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

    def write_per_query_csv(
        self, path: str | os.PathLike, qimlist: Sequence[str] | None = None
    ) -> Path:
        """Write per_query_frame as CSV atomically (full float precision)."""
        text = self.per_query_frame(qimlist).to_csv(index=False)
        return write_text(path, text)


def format_table(metrics_by_name: Mapping[str, RetrievalMetrics]) -> str:
    """Plain-text table: one row per name, mAP per setup then mP@k per setup (percent)."""
    columns: list[tuple[str, str, int | None]] = []  # (header, setup, kappa or None for mAP)
    seen_setups: list[str] = []
    seen_kappas: dict[str, list[int]] = {}
    for metrics in metrics_by_name.values():
        for setup in metrics.setups:
            if setup not in seen_setups:
                seen_setups.append(setup)
                seen_kappas[setup] = []
            for k in metrics.kappas:
                if k not in seen_kappas[setup]:
                    seen_kappas[setup].append(k)
    for setup in seen_setups:
        columns.append((f"mAP {_setup_label(setup)}", setup, None))
    for setup in seen_setups:
        for k in seen_kappas[setup]:
            columns.append((f"mP@{k} {_setup_label(setup)}", setup, k))
    header = ["name", *[c[0] for c in columns]]
    rows = [header]
    for name, metrics in metrics_by_name.items():
        row = [str(name)]
        for _, setup, k in columns:
            m = metrics.setups.get(setup)
            if m is None or (k is not None and k not in metrics.kappas):
                row.append("-")
            elif k is None:
                row.append(_fmt_percent(m.mAP))
            else:
                row.append(_fmt_percent(m.mpr[metrics.kappas.index(k)]))
        rows.append(row)
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])]
        cells += [v.rjust(w) for v, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Protocol entry points
# --------------------------------------------------------------------------------------------


def evaluate_revisited(
    ranks: np.ndarray,
    gnd_raw: Sequence[Mapping[str, Any]] | Mapping[str, Any],
    kappas: Sequence[int] = DEFAULT_KAPPAS,
) -> RetrievalMetrics:
    """ROxford5k / RParis6k: Easy, Medium and Hard setups from easy/hard/junk lists."""
    kappas = _check_kappas(kappas)
    setups = revisited_setups(gnd_raw)
    return RetrievalMetrics(
        protocol="revisited",
        kappas=kappas,
        setups={name: SetupMetrics(*compute_map(ranks, g, kappas)) for name, g in setups.items()},
    )


def evaluate_classic(
    ranks: np.ndarray,
    gnd_raw: Sequence[Mapping[str, Any]] | Mapping[str, Any],
    kappas: Sequence[int] = DEFAULT_KAPPAS,
) -> RetrievalMetrics:
    """Oxford5k / Paris6k: ok = good + ok images, junk removed by position shifting."""
    kappas = _check_kappas(kappas)
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
    return RetrievalMetrics(
        "classic", kappas, {"all": SetupMetrics(*compute_map(ranks, gnd, kappas))}
    )


def evaluate_holidays(
    ranks: np.ndarray,
    gnd_raw: Sequence[Mapping[str, Any]],
    kappas: Sequence[int] = DEFAULT_KAPPAS,
) -> RetrievalMetrics:
    """INRIA Holidays: the query sits in the database and is removed from its own ranking."""
    kappas = _check_kappas(kappas)
    gnd = []
    for i, g in enumerate(_gnd_list(gnd_raw)):
        if "ok" not in g or "query_db_index" not in g:
            raise ValueError(f"gnd[{i}]: Holidays entries need 'ok' and 'query_db_index'")
        ok = _as_index_array(g["ok"], f"gnd[{i}]['ok']")
        q_idx = int(g["query_db_index"])
        if np.any(ok == q_idx):
            raise ValueError(f"gnd[{i}]: query_db_index {q_idx} must not be listed in 'ok'")
        gnd.append({"ok": ok, "junk": np.asarray([q_idx], dtype=np.int64)})
    return RetrievalMetrics(
        "holidays", kappas, {"all": SetupMetrics(*compute_map(ranks, gnd, kappas))}
    )


def evaluate(
    ranks: np.ndarray,
    gnd_raw: Sequence[Mapping[str, Any]] | Mapping[str, Any],
    protocol: Protocol,
    kappas: Sequence[int] = DEFAULT_KAPPAS,
) -> RetrievalMetrics:
    """Dispatch to the evaluation of `protocol` (revisited, classic or holidays)."""
    if protocol == "revisited":
        return evaluate_revisited(ranks, gnd_raw, kappas)
    if protocol == "classic":
        return evaluate_classic(ranks, gnd_raw, kappas)
    if protocol == "holidays":
        return evaluate_holidays(ranks, gnd_raw, kappas)
    raise ValueError(f"protocol: expected one of {PROTOCOLS}, got {protocol!r}")


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


def _fmt_percent(x: float) -> str:
    p = _percent(x)
    return "nan" if p is None else f"{p:.2f}"
