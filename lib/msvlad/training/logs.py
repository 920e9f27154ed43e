"""The CSV logs of a training run, stated once: their columns and the builders of their rows.

`log.csv` has one row per epoch (and the epoch-0 row of the initial model), `rounds.csv` one row
per mining round, `triplets.csv` one row per mined triplet, `neighbors.csv` the top `NEIGHBOR_K`
pool neighbours of every mined anchor (what the miner saw when it chose the triplet). The trainer
writes them; the reports, `dvc plots` and the tests read them through these column lists.

These logs hold only what the run computed, so a run repeated gives the same bytes (DVC hashes
the run folder). Wall-clock times go to `timing.csv` (`TIMING_FIELDS`): a mining round's describe
and mine seconds, and the seconds since the training process started at each epoch's end. It sits
in the run folder but `.dvcignore` keeps it out of every hash.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from msvlad.errors import InputError
from msvlad.paths import LOG, NEIGHBORS, ROUNDS, RUN_TIMING, TRIPLETS
from msvlad.storage import atomic_path

if TYPE_CHECKING:
    import torch

    from msvlad.data.trainsets import TrainingSet

AGE_FIELDS = ["anchor_age", "positive_age", "negative_age"]  # steps since each descriptor's weights
LOG_FIELDS = ["epoch", "step", "lr", "loss", "triplets", "rounds", "yield", "val_map"]
ROUND_FIELDS = [
    "round",
    "step",
    "pool",  # images described and mined from
    "failed",  # images drawn for the pool that could not be read, dropped from the round
    "refreshed",  # images embedded this round; the rest came from the descriptor bank
    "age_mean",  # optimiser steps since the weights that computed the pool's descriptors: mean
    "age_max",  # and max (0 for every image with miner.refresh_fraction 1)
    "candidates",
    "triplets",
    "semi_hard",
    "hard",
    "mean_loss",
]
TRIPLET_FIELDS = [
    "round",
    "step",
    "anchor",
    "positive",
    "negative",
    "anchor_label",
    "negative_label",
    "pos_rank",
    "neg_rank",
    "pos_sim",
    "neg_sim",
    "loss",
    "kind",
    *AGE_FIELDS,
]
# one row per (round, mined anchor, neighbour): rank is 0-based in the anchor's ranked list of the
# round's pool (self excluded), as pos_rank/neg_rank in triplets.csv; sim is the cosine
NEIGHBOR_FIELDS = ["round", "anchor", "rank", "neighbor", "label", "sim"]
NEIGHBOR_K = 10  # neighbours kept per anchor: bounds neighbors.csv to 10 rows per mined triplet

# wall-clock seconds (never hashed): event "describe" / "mine" of a round (its seconds), "epoch"
# (seconds since the training process started; round left empty)
TIMING_FILE = RUN_TIMING
TIMING_FIELDS = ["event", "round", "step", "seconds"]

# every log of a run folder: its columns and the column that says which checkpoint covers a row
RUN_LOGS: dict[str, tuple[list[str], str]] = {
    LOG: (LOG_FIELDS, "step"),
    ROUNDS: (ROUND_FIELDS, "round"),
    TRIPLETS: (TRIPLET_FIELDS, "round"),
    NEIGHBORS: (NEIGHBOR_FIELDS, "round"),
}
# the columns of the logs that hold names; every other column holds a number (blank or nan: none)
TEXT_FIELDS = frozenset(
    {
        "anchor",
        "positive",
        "negative",
        "anchor_label",
        "negative_label",
        "kind",
        "neighbor",
        "label",
    }
)


@dataclass(frozen=True)
class PoolDescriptors:
    """A round's pool as the miner saw it (`msvlad.training.bank.describe_pool`) and the logs
    record it: indices, descriptors, their ages, how many images were embedded or unreadable."""

    pool_idx: np.ndarray  # (P,) training-image indices, unreadable images dropped
    desc: torch.Tensor  # (P, D) raw descriptors on the embedding device
    ages: np.ndarray  # (P,) optimiser steps since the weights that computed each descriptor
    refreshed: int  # images embedded this round (unreadable ones included)
    failed: int  # images drawn for the pool that could not be read


def append_csv(path: Path, fields: list[str], rows: list[dict[str, Any]]) -> None:
    """Append rows (header first if the file is new)."""
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def write_header(path: Path, fields: list[str]) -> None:
    """An empty log with its header only (e.g. for an untrained, off-the-shelf method)."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        csv.DictWriter(fh, fieldnames=fields).writeheader()


def truncate_csv(path: Path, column: str, limit: float, fields: list[str] | None = None) -> None:
    """Keep the rows whose `column` is <= limit (atomic rewrite; untouched if none is dropped).

    A row cut short by a kill mid-append is dropped; with `fields`, the header becomes `fields`
    (a log from before a column was added gets it, empty in its old rows).
    """
    if not path.exists():
        return
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        old_fields = reader.fieldnames or []
        rows = list(reader)
    kept = [r for r in rows if _number(r.get(column)) <= limit]
    fields = fields or old_fields
    if len(kept) == len(rows) and old_fields == fields:
        return
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(kept)


def truncate_logs(folder: Path, step: int, next_round: int) -> None:
    """Cut every log of a run folder back to what a checkpoint at (step, next_round) covers."""
    for name, (fields, column) in RUN_LOGS.items():
        limit = step if column == "step" else next_round - 1
        truncate_csv(folder / name, column, limit, fields)
    _truncate_timing(folder / TIMING_FILE, step, next_round - 1)


def _truncate_timing(path: Path, step: int, last_round: int) -> None:
    """timing.csv: epoch rows up to `step`, round rows up to `last_round` (atomic rewrite)."""
    if not path.exists():
        return
    try:
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, csv.Error, UnicodeDecodeError):
        rows = []  # unreadable wall-clock notes: start them again
    kept = [
        r
        for r in rows
        if (r.get("event") == "epoch" and _number(r.get("step")) <= step)
        or (r.get("event") != "epoch" and _number(r.get("round")) <= last_round)
    ]
    if len(kept) == len(rows) and rows:
        return
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=TIMING_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(kept)


def last_logged_step(path: Path) -> int | None:
    """The step of the last complete row of a run's log.csv (None: no row, or not readable)."""
    try:
        with path.open(newline="") as fh:
            steps = [_number(r.get("step")) for r in csv.DictReader(fh)]
    except (OSError, csv.Error, UnicodeDecodeError):
        return None
    return int(steps[-1]) if steps and steps[-1] != float("inf") else None


def read_log(path: Path) -> pd.DataFrame:
    """A run log (a name of RUN_LOGS) read after checking it against its columns.

    Every column of the schema must be in the header (older logs may hold more), every row as
    many fields as the header, every number a finite number or nan (blank: a column added after
    the row was written). A binary tail, a cut or garbage row is an `InputError` naming the file
    and the line; a missing file is a FileNotFoundError.
    """
    path = Path(path)
    fields = RUN_LOGS[path.name][0]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: training log not found")
    data = path.read_bytes()
    if b"\0" in data:
        line = data[: data.index(b"\0")].count(b"\n") + 1
        raise InputError(f"{path}: line {line}: binary data (a NUL byte), not a CSV log")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise InputError(f"{path}: line {line}: binary data (not UTF-8), not a CSV log") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    missing = [f for f in fields if f not in (header or [])]
    if missing:
        raise InputError(f"{path}: line 1: header lacks column(s) {missing} (expected {fields})")
    numeric = [
        (i, name) for i, name in enumerate(header) if name in fields and name not in TEXT_FIELDS
    ]
    try:
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise InputError(
                    f"{path}: line {reader.line_num}: {len(row)} fields, the header has "
                    f"{len(header)} (a cut or garbage row)"
                )
            for i, name in numeric:
                if not _is_number(row[i]):
                    raise InputError(
                        f"{path}: line {reader.line_num}: {name}={row[i][:40]!r} is not a number"
                    )
    except csv.Error as err:
        raise InputError(f"{path}: line {reader.line_num}: not CSV ({err})") from None
    text_cols = {name: str for name in header if name in TEXT_FIELDS}
    return pd.read_csv(io.StringIO(text), dtype=text_cols)


def _is_number(value: str) -> bool:
    """A log's number: blank, nan, or a finite float."""
    if value.strip() in ("", "nan", "NaN"):
        return True
    try:
        return math.isfinite(float(value))
    except ValueError:
        return False


def _number(value: str | None) -> float:
    try:
        return float(value) if value not in (None, "") else float("inf")
    except ValueError:
        return float("inf")


def round_row(
    round_index: int,
    step: int,
    pool_size: int,
    candidates: int,
    frame: pd.DataFrame,
    failed: int = 0,
    refreshed: int | None = None,
    ages: np.ndarray | None = None,
) -> dict[str, Any]:
    """The `rounds.csv` row of one mining round, from its `MinedTriplets.to_frame()`.

    `refreshed` defaults to the whole pool and `ages` to zeros (a full refresh).
    """
    kinds = frame["kind"].value_counts() if len(frame) else {}
    ages = np.zeros(pool_size, dtype=np.int64) if ages is None else np.asarray(ages)
    return {
        "round": round_index,
        "step": step,
        "pool": pool_size,
        "failed": failed,
        "refreshed": pool_size + failed if refreshed is None else refreshed,
        "age_mean": round(float(ages.mean()), 3) if len(ages) else float("nan"),
        "age_max": int(ages.max()) if len(ages) else 0,
        "candidates": candidates,
        "triplets": len(frame),
        "semi_hard": int(kinds.get("semi-hard", 0)),
        "hard": int(kinds.get("hard", 0)),
        "mean_loss": float(frame["loss"].mean()) if len(frame) else float("nan"),
    }


def triplet_rows(
    round_index: int,
    step: int,
    frame: pd.DataFrame,
    pool_idx: np.ndarray,
    names: Sequence[str],
    labels: np.ndarray,
    classes: Sequence[str],
    ages: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """The `triplets.csv` rows of one round: pool indices mapped to image names and class names.

    `ages` (P,) are the steps since each pool descriptor's weights (zeros by default).
    """
    ages = np.zeros(len(pool_idx), dtype=np.int64) if ages is None else np.asarray(ages)
    rows = []
    for r in frame.itertuples(index=False):
        a, p, n = int(pool_idx[r.anchor]), int(pool_idx[r.positive]), int(pool_idx[r.negative])
        at = (r.anchor, r.positive, r.negative)
        age = {k: int(ages[i]) for k, i in zip(AGE_FIELDS, at, strict=True)}
        rows.append(
            {
                "round": round_index,
                "step": step,
                "anchor": names[a],
                "positive": names[p],
                "negative": names[n],
                "anchor_label": classes[labels[a]],
                "negative_label": classes[labels[n]],
                "pos_rank": int(r.pos_rank),
                "neg_rank": int(r.neg_rank),
                "pos_sim": round(float(r.pos_sim), 6),
                "neg_sim": round(float(r.neg_sim), 6),
                "loss": round(float(r.loss), 6),
                "kind": r.kind,
                **age,
            }
        )
    return rows


def neighbor_rows(
    round_index: int,
    frame: pd.DataFrame,
    desc: torch.Tensor,
    pool_idx: np.ndarray,
    names: Sequence[str],
    labels: np.ndarray,
    classes: Sequence[str],
    k: int = NEIGHBOR_K,
) -> list[dict[str, Any]]:
    """The `neighbors.csv` rows of one round: each mined anchor's top-k neighbours in the pool.

    Ranked as the miners rank (`msvlad.mining.neighbors`: decreasing float64 cosine, ties by
    pool index, the anchor left out), only for the round's anchors, so the cost is a few rows of
    the pool's similarity matrix.
    """
    import torch

    from msvlad.mining.neighbors import similarity_rows

    anchors = list(dict.fromkeys(int(a) for a in frame["anchor"])) if len(frame) else []
    k = min(k, desc.shape[0] - 1)
    rows: list[dict[str, Any]] = []
    for start in range(0, len(anchors), 256):  # (256, N) float64 blocks
        block = torch.tensor(anchors[start : start + 256], dtype=torch.long)
        sims = similarity_rows(desc, block, exclude_self=True)
        top, idx = sims.sort(dim=1, descending=True, stable=True)  # stable: ties by index
        top, idx = top[:, :k].cpu().numpy(), idx[:, :k].cpu().numpy()
        for a, a_sims, a_idx in zip(block.tolist(), top, idx, strict=True):
            for rank, (s, j) in enumerate(zip(a_sims, a_idx, strict=True)):
                n = int(pool_idx[j])
                rows.append(
                    {
                        "round": round_index,
                        "anchor": names[int(pool_idx[a])],
                        "rank": rank,
                        "neighbor": names[n],
                        "label": classes[labels[n]],
                        "sim": round(float(s), 6),
                    }
                )
    return rows


def epoch_row(
    epoch: int,
    step: int,
    lr: float,
    losses: Sequence[float],
    triplets: int,
    round_sizes: Sequence[int],
    val_map: float,
) -> dict[str, Any]:
    """The `log.csv` row of one epoch."""
    return {
        "epoch": epoch,
        "step": step,
        "lr": lr,
        "loss": float(np.mean(losses)) if len(losses) else float("nan"),
        "triplets": triplets,
        "rounds": len(round_sizes),
        "yield": float(np.mean(round_sizes)) if len(round_sizes) else float("nan"),
        "val_map": round(val_map, 4),
    }


def write_epoch(folder: Path, row: dict[str, Any], seconds: float) -> None:
    """Append an `epoch_row` to log.csv and the seconds since the run started to timing.csv."""
    append_csv(folder / LOG, LOG_FIELDS, [row])
    event = {"event": "epoch", "round": "", "step": row["step"], "seconds": round(seconds, 1)}
    append_csv(folder / TIMING_FILE, TIMING_FIELDS, [event])


def write_round(
    folder: Path,
    round_index: int,
    step: int,
    pool: PoolDescriptors,
    frame: pd.DataFrame,
    candidates: int,
    seconds: tuple[float, float],
    train_set: TrainingSet,
) -> None:
    """Append one mining round to rounds.csv, triplets.csv and neighbors.csv of a run folder.

    `pool` is what the miner saw (`msvlad.training.bank.describe_pool`); `frame` and `candidates`
    are the round's `MinedTriplets.to_frame()` and `num_candidates`; `seconds` (describe, mine)
    go to timing.csv.
    """
    names, labels, classes = train_set.names, train_set.labels, train_set.classes
    pool_idx, n = pool.pool_idx, len(pool.pool_idx)
    row = round_row(round_index, step, n, candidates, frame, pool.failed, pool.refreshed, pool.ages)
    append_csv(folder / ROUNDS, ROUND_FIELDS, [row])
    events = [
        {"event": e, "round": round_index, "step": step, "seconds": round(t, 3)}
        for e, t in zip(("describe", "mine"), seconds, strict=True)
    ]
    append_csv(folder / TIMING_FILE, TIMING_FIELDS, events)
    rows = triplet_rows(round_index, step, frame, pool_idx, names, labels, classes, pool.ages)
    append_csv(folder / TRIPLETS, TRIPLET_FIELDS, rows)
    rows = neighbor_rows(round_index, frame, pool.desc, pool_idx, names, labels, classes)
    append_csv(folder / NEIGHBORS, NEIGHBOR_FIELDS, rows)
