"""One query's ranked list as the explorers show it, with ranks counted as revisitop counts them.

revisitop ignores junk: a positive's rank is its position in the list with every junk image
removed, 1-based (`compute_map` turns positions into that rank before P@k). The explorers number
results the same way, so a shown rank, P@k and the per-positive rank table agree: junk images are
shown greyed without a number, and the query's own photo (a junk database copy of the query's
picture, as revisitop declares "the query itself") is left out of the list and named above it.
A database image clicked to become the query is judged by landmark: the images the same queries
list as positives (`landmarks`).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from msvlad.report import results

if TYPE_CHECKING:
    from msvlad.data.testsets import RetrievalDataset

QUERY_ORDERS: dict[str, str] = {
    "ap_asc": "AP, lowest first",
    "ap_desc": "AP, highest first",
    "gain_desc": "AP gain over the 2nd method, largest first",
    "gain_asc": "AP gain over the 2nd method, smallest first",
    "index": "dataset order",
}
FAILURES: dict[str, str] = {
    "all": "every query",
    "beyond_k": "a positive beyond rank k",
    "above_first": "junk or a negative above the first positive",
}
MAX_TOP_K = 30  # the longest list an explorer shows
LANDMARK_SETUP = "landmark"  # the setup of a clicked database image: judged by landmark


@dataclass(frozen=True)
class QueryTruth:
    """Who is positive and junk for one query: dataset ground truth, or a clicked image's landmark.

    `own` (a subset of `junk`) is the query's own photo, left out of the shown list.
    """

    name: str
    setup: str
    ok: np.ndarray
    junk: np.ndarray
    easy: frozenset[int] = frozenset()
    own: frozenset[int] = frozenset()
    from_db: bool = False
    revisited: bool = False

    def kind(self, idx: int, n_images: int) -> tuple[str, str]:
        """(relevance, kind) of a database index: positive/negative/junk and easy/hard/..."""
        if idx >= n_images:  # a distractor appended to the database
            return "negative", "distractor"
        if idx in self._ok:
            if self.from_db:
                return "positive", "landmark"
            if self.revisited:
                return "positive", "easy" if idx in self.easy else "hard"
            return "positive", "pos"
        if idx in self._junk:
            return "junk", "own photo" if idx in self.own else "junk"
        return "negative", "neg"

    @cached_property
    def _ok(self) -> frozenset[int]:
        return frozenset(int(i) for i in self.ok)

    @cached_property
    def _junk(self) -> frozenset[int]:
        return frozenset(int(i) for i in self.junk)


@dataclass(frozen=True)
class RankedList:
    """One query's top-k under one method and descriptor variant: what an explorer shows.

    `items`: one row per shown image (own photo left out): rank (1-based with junk removed, as
    revisitop counts; 0 for junk), position (1-based in the full ranking), db_index, image,
    relevance (positive / negative / junk), kind (easy / hard / landmark / pos / neg / junk /
    distractor), sim (cosine; NaN without features). `positives`: every positive with its kind
    and rank. AP and precision (P@k) in percent, by `msvlad.evaluation.protocol.compute_map`.
    """

    method: str
    label: str
    variant: str
    query_index: int
    query: str
    from_db: bool
    setup: str
    k: int
    ap: float
    precision: float
    items: pd.DataFrame
    positives: pd.DataFrame
    own_photo: tuple[str, ...] = ()
    first_position: int = 0  # 1-based position of the first positive in the full ranking

    @property
    def positive_ranks(self) -> np.ndarray:
        """Ranks (junk removed, 1-based) of every positive, best first."""
        return np.sort(self.positives["rank"].to_numpy(dtype=np.int64))

    @property
    def num_positives(self) -> int:
        """How many positives the query has."""
        return len(self.positives)


def junk_free_ranks(column: np.ndarray, junk: np.ndarray) -> np.ndarray:
    """For every position of a ranking column, its rank with junk removed (1-based; 0 for junk)."""
    is_junk = np.isin(column, junk)
    ranks = np.cumsum(~is_junk)
    ranks[is_junk] = 0
    return ranks


def score_column(column: np.ndarray, truth: QueryTruth, k: int) -> tuple[float, float]:
    """AP and P@k (percent) of one ranking column by revisitop's rule (NaN without positives)."""
    from msvlad.evaluation.protocol import compute_map

    if truth.ok.size == 0:
        return math.nan, math.nan
    gnd = [{"ok": truth.ok, "junk": truth.junk}]
    _, aps, _, prs = compute_map(np.asarray(column)[:, None], gnd, kappas=(int(k),))
    return float(aps[0]) * 100.0, float(prs[0, 0]) * 100.0


def ranked_list(
    dataset: RetrievalDataset,
    column: np.ndarray,
    truth: QueryTruth,
    top_k: int,
    *,
    method: str = "",
    label: str = "",
    variant: str = "plain",
    query_index: int = 0,
    sims: np.ndarray | None = None,
) -> RankedList:
    """The top-k non-junk results of one ranking column (junk between them shown, own photo not)."""
    if top_k < 1:
        raise ValueError(f"top_k: expected at least 1, got {top_k}")
    column = np.asarray(column).astype(np.int64)
    ranks = junk_free_ranks(column, truth.junk)
    n_img = len(dataset.imlist)
    own = np.isin(column, list(truth.own))
    rows, junk_shown, last = [], 0, 0
    for pos in np.flatnonzero(~own):
        if ranks[pos] > top_k or (ranks[pos] == 0 and last == top_k):
            break  # k results shown: later junk is not
        last = max(last, int(ranks[pos]))
        if ranks[pos] == 0:
            if junk_shown >= top_k:
                continue
            junk_shown += 1
        idx = int(column[pos])
        relevance, kind = truth.kind(idx, n_img)
        sim = float(sims[idx]) if sims is not None and idx < len(sims) else math.nan
        image = str(dataset.imlist[idx]) if idx < n_img else ""
        rows.append((int(ranks[pos]), int(pos) + 1, idx, image, relevance, kind, sim))
    items = pd.DataFrame(
        rows, columns=["rank", "position", "db_index", "image", "relevance", "kind", "sim"]
    )
    where = np.flatnonzero(np.isin(column, truth.ok))
    positives = pd.DataFrame(
        {
            "db_index": column[where],
            "image": [str(dataset.imlist[i]) for i in column[where]],
            "kind": [truth.kind(int(i), n_img)[1] for i in column[where]],
            "rank": ranks[where],
        }
    )
    ap, precision = score_column(column, truth, top_k)
    return RankedList(
        method=method,
        label=label or method,
        variant=variant,
        query_index=int(query_index),
        query=truth.name,
        from_db=truth.from_db,
        setup=truth.setup,
        k=int(top_k),
        ap=ap,
        precision=precision,
        items=items,
        positives=positives,
        own_photo=tuple(str(dataset.imlist[i]) for i in sorted(truth.own) if i < n_img),
        first_position=int(where[0]) + 1 if where.size else 0,
    )


def dataset_truth(
    dataset: RetrievalDataset, query_index: int, setup: str, own: Sequence[int] = ()
) -> QueryTruth:
    """Ground truth of a dataset query (`results.query_ground_truth`), its own photo marked."""
    q = int(query_index)
    setup_used, ok, junk = results.query_ground_truth(dataset, q, setup)
    easy: frozenset[int] = frozenset()
    if dataset.protocol == "revisited":
        easy = frozenset(int(i) for i in results.query_ground_truth(dataset, q, "easy")[1])
    return QueryTruth(
        name=str(dataset.qimlist[q]),
        setup=setup_used,
        ok=ok,
        junk=junk,
        easy=easy,
        own=frozenset(int(i) for i in own if int(i) in set(junk.tolist())),
        revisited=dataset.protocol == "revisited",
    )


@dataclass(frozen=True)
class Landmarks:
    """Queries grouped into landmarks (queries sharing a positive) and each image's landmark.

    `db` is -1 for an image no query lists as positive; `junk[l]` the junk of landmark l's queries.
    """

    names: list[str]
    query: np.ndarray
    db: np.ndarray
    junk: list[np.ndarray] = field(default_factory=list)


def landmarks(dataset: RetrievalDataset) -> Landmarks:
    """Connected groups of queries whose positives overlap, named by their names' common stem."""
    from msvlad.evaluation.protocol import ground_truth

    gnd = dataset.gnd["gnd"] if isinstance(dataset.gnd, dict) else dataset.gnd
    setups = ground_truth(gnd, dataset.protocol)
    truth = setups["medium" if "medium" in setups else next(iter(setups))]
    n_q, n_db = len(truth), len(dataset.imlist)
    parent = list(range(n_q))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner = np.full(n_db, -1, dtype=np.int64)
    for q, t in enumerate(truth):
        for idx in np.asarray(t["ok"], dtype=np.int64):
            if owner[idx] < 0:
                owner[idx] = q
            else:
                parent[root(q)] = root(int(owner[idx]))
    roots = sorted({root(q) for q in range(n_q)})
    label = {r: i for i, r in enumerate(roots)}
    query = np.array([label[root(q)] for q in range(n_q)], dtype=np.int64)
    db = np.where(owner >= 0, query[np.maximum(owner, 0)], -1)
    names = [
        _stem([dataset.qimlist[q] for q in range(n_q) if query[q] == i], i) for i in label.values()
    ]
    names = [n if names.count(n) == 1 else f"{n} ({i})" for i, n in enumerate(names)]
    junk = [
        np.unique(
            np.concatenate(
                [np.asarray(truth[q]["junk"], dtype=np.int64) for q in np.flatnonzero(query == i)]
            )
        )
        for i in label.values()
    ]
    return Landmarks(names=names, query=query, db=db, junk=junk)


def _stem(names: Sequence[str], index: int) -> str:
    """A landmark's name: its queries' common stem ("all_souls_000013", ... -> "all_souls";
    "graf_q0", "graf_q1" -> "graf"), or the name of its only query."""
    if len(names) == 1:
        return str(names[0])
    stem = os.path.commonprefix([str(n) for n in names]).rstrip("_-0123456789 ")
    stem = stem[:-2] if stem.endswith("_q") else stem
    return stem or f"landmark {index}"


def landmark_truth(dataset: RetrievalDataset, marks: Landmarks, db_index: int) -> QueryTruth:
    """A clicked database image as the query: its landmark's images positive, itself junk."""
    i = int(db_index)
    lab = int(marks.db[i])
    ok = np.flatnonzero(marks.db == lab) if lab >= 0 else np.zeros(0, dtype=np.int64)
    ok = ok[ok != i]
    junk = marks.junk[lab] if lab >= 0 else np.zeros(0, dtype=np.int64)
    junk = np.union1d(np.setdiff1d(junk, ok), [i]).astype(np.int64)
    return QueryTruth(
        name=str(dataset.imlist[i]),
        setup=LANDMARK_SETUP,
        ok=ok.astype(np.int64),
        junk=junk,
        own=frozenset([i]),
        from_db=True,
    )


def own_photos(dataset: RetrievalDataset) -> list[frozenset[int]]:
    """Per query, its junk database images holding the query's own picture (same name or bytes)."""
    from msvlad.evaluation.protocol import ground_truth

    gnd = dataset.gnd["gnd"] if isinstance(dataset.gnd, dict) else dataset.gnd
    setups = ground_truth(gnd, dataset.protocol)
    truth = setups["medium" if "medium" in setups else next(iter(setups))]
    digest: dict[str, str] = {}
    out = []
    for q, t in enumerate(truth):
        qpath = Path(dataset.query_path(q))
        same = set()
        for idx in np.asarray(t["junk"], dtype=np.int64).tolist():
            if dataset.imlist[idx] == dataset.qimlist[q] or _same_file(
                qpath, Path(dataset.image_path(idx)), digest
            ):
                same.add(int(idx))
        out.append(frozenset(same))
    return out


def _same_file(a: Path, b: Path, digest: dict[str, str]) -> bool:
    """Same bytes (sizes compared first, so only same-size files are hashed)."""
    try:
        if a.stat().st_size != b.stat().st_size:
            return False
    except OSError:
        return False
    for p in (a, b):
        if str(p) not in digest:
            digest[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return digest[str(a)] == digest[str(b)]


def query_order(
    per_query: pd.DataFrame, order: str = "ap_asc", other: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Queries of one setup in an explorer order: query_index, query, AP, AP_b, gain (NaN last).

    `per_query` (and `other`, the second method) are `results.per_query_ap` frames of one setup;
    the gain orders need `other` and are AP - AP_b in points.
    """
    if order not in QUERY_ORDERS:
        raise ValueError(f"order: expected one of {sorted(QUERY_ORDERS)}, got {order!r}")
    frame = per_query[["query_index", "query", "AP"]].reset_index(drop=True).copy()
    frame["AP_b"] = math.nan
    if other is not None:
        if not (other["query"].to_numpy() == frame["query"].to_numpy()).all():
            raise ValueError("other: the two methods were evaluated on different queries")
        frame["AP_b"] = other["AP"].to_numpy()
    frame["gain"] = frame["AP"] - frame["AP_b"]
    if order.startswith("gain") and other is None:
        raise ValueError(f"order: {order!r} needs a second method")
    key = {"ap_asc": "AP", "ap_desc": "AP", "gain_desc": "gain", "gain_asc": "gain"}.get(order)
    if key is None:
        return frame
    ascending = order.endswith("asc")
    return frame.sort_values(
        [key, "query_index"], ascending=[ascending, True], na_position="last", kind="stable"
    ).reset_index(drop=True)


def failures(
    ranks: np.ndarray, truths: Callable[[int], QueryTruth], n_queries: int, k: int
) -> pd.DataFrame:
    """Per query: a positive beyond rank k? junk or a negative above the first positive?

    Ranks count as revisitop counts them (junk removed); the query's own photo is left out, so it
    does not count as junk above the first positive. Queries without positives flag nothing.
    """
    rows = []
    for q in range(n_queries):
        truth = truths(q)
        column = np.asarray(ranks)[:, q]
        if truth.ok.size == 0:
            rows.append((q, False, False, 0))
            continue
        keep = column[~np.isin(column, list(truth.own))]
        pos = np.flatnonzero(np.isin(keep, truth.ok))
        free = junk_free_ranks(keep, truth.junk)[pos]
        rows.append((q, bool(free.max() > k), bool(pos[0] > 0), int(free.min())))
    return pd.DataFrame(rows, columns=["query_index", "beyond_k", "above_first", "first_rank"])


def positive_table(lists: Sequence[RankedList]) -> pd.DataFrame:
    """Each positive of the query with its rank under every shown method (and the change)."""
    if not lists:
        return pd.DataFrame(columns=["image", "kind"])
    first = lists[0]
    table = first.positives[["db_index", "image", "kind"]].copy()
    for rl in lists:
        ranks = rl.positives.set_index("db_index")["rank"]
        table[rl.label] = table["db_index"].map(ranks).astype("Int64")
    if len(lists) == 2:
        table["change"] = table[lists[1].label] - table[first.label]
    return table.sort_values([first.label, "db_index"], kind="stable").reset_index(drop=True)
