"""Training-run outputs -> pandas tables: epoch logs, mined triplets, per-round miner statistics."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from msvlad import paths
from msvlad.config import Params
from msvlad.errors import InputError
from msvlad.training.logs import RUN_LOGS, TRIPLET_FIELDS, read_log

log = logging.getLogger(__name__)


def check_run_logs(
    runs_dir: str | os.PathLike, params: Params, methods: Sequence[str] | None = None
) -> None:
    """Every log the notebooks read, of every trained row, present and valid by its schema.

    A trained row (miner set) must have each log of `RUN_LOGS` in RUNS/<row>/train, checked by
    `msvlad.training.logs.read_log`, and at least the initial epoch row in log.csv; InputError
    naming the file (and the line) otherwise. Off-the-shelf rows have no logs to read.
    """
    for key in params.methods if methods is None else methods:
        if params.methods[key].miner is None:
            continue
        for name in RUN_LOGS:
            path = paths.run_dir(key, runs_dir) / name
            if not path.is_file():
                raise InputError(
                    f"{path}: not found; row {key} is trained and the report reads its {name} "
                    f"(run `msvlad train --method {key}`, dvc repro train@{key})"
                )
            frame = read_log(path)
            if name == paths.LOG and frame.empty:
                raise InputError(f"{path}: no epoch row (the run of row {key} has not started)")


def training_curves(run_dir: str | os.PathLike) -> pd.DataFrame:
    """Per-epoch training log (log.csv), checked against its schema (`read_log`)."""
    return read_log(Path(run_dir) / paths.LOG)


def load_training_logs(
    runs_dir: str | os.PathLike, params: Params, methods: Sequence[str] | None = None
) -> pd.DataFrame:
    """Training logs of all trained methods, stacked with `method` and `label` columns.

    Off-the-shelf methods (miner null) and runs without a log are left out (with a warning; the
    report stage refuses a trained row without its logs beforehand, `check_run_logs`).
    """
    frames = []
    for key in params.methods if methods is None else methods:
        if params.methods[key].miner is None:
            continue
        path = paths.run_dir(key, runs_dir)
        try:
            frame = training_curves(path)
        except FileNotFoundError as err:
            log.warning("%s left out: %s", key, err)
            continue
        if frame.empty:
            continue
        frames.append(frame.assign(method=key, label=params.methods[key].label))
    if not frames:
        return pd.DataFrame(
            columns=["method", "label", "epoch", "step", "lr", "loss", "yield", "val_map"]
        )
    return pd.concat(frames, ignore_index=True)


def load_triplets(run_dir: str | os.PathLike) -> pd.DataFrame:
    """Every mined triplet of a run (triplets.csv); empty when the run mined nothing."""
    path = Path(run_dir) / paths.TRIPLETS
    if not path.is_file():
        log.warning("%s: no mined triplets", path)
        return pd.DataFrame(columns=TRIPLET_FIELDS)
    return read_log(path)


def load_neighbors(run_dir: str | os.PathLike) -> pd.DataFrame | None:
    """Each mined anchor's top pool neighbours per round (neighbors.csv); None if not recorded."""
    path = Path(run_dir) / paths.NEIGHBORS
    if not path.is_file():
        return None
    return read_log(path)


TRIPLET_SORTS: dict[str, str] = {
    "loss_desc": "predicted loss, highest first",
    "loss_asc": "predicted loss, lowest first",
    "mined": "mining order",
}


def filter_triplets(
    triplets: pd.DataFrame,
    *,
    round_index: int | None = None,
    label: str | None = None,
    kind: str | None = None,
    loss: tuple[float, float] | None = None,
    sort: str = "loss_desc",
) -> pd.DataFrame:
    """Triplets of one round / anchor class / kind with predicted loss in [lo, hi], sorted.

    None means no filter. The result keeps a `mined` column: the row's position in triplets.csv.
    """
    if sort not in TRIPLET_SORTS:
        raise ValueError(f"sort: expected one of {sorted(TRIPLET_SORTS)}, got {sort!r}")
    frame = triplets.reset_index(drop=True).rename_axis("mined").reset_index()
    keep = np.ones(len(frame), dtype=bool)
    if round_index is not None:
        keep &= frame["round"].to_numpy() == int(round_index)
    if label is not None:
        keep &= frame["anchor_label"].astype(str).to_numpy() == str(label)
    if kind is not None:
        keep &= frame["kind"].astype(str).to_numpy() == str(kind)
    if loss is not None:
        values = frame["loss"].to_numpy(dtype=float)
        keep &= (values >= loss[0]) & (values <= loss[1])
    frame = frame[keep]
    if sort != "mined":
        frame = frame.sort_values(
            ["loss", "mined"], ascending=[sort == "loss_asc", True], kind="stable"
        )
    return frame.reset_index(drop=True)


def triplet_neighbors(neighbors: pd.DataFrame | None, triplet: pd.Series) -> pd.DataFrame:
    """The anchor's ranked pool neighbours in the triplet's round, with d2 and the chosen roles.

    Columns: rank, neighbor, label, sim, d2 (= 2 - 2 sim, the loss's squared distance),
    same_class, role ("positive" / "negative" for the triplet's own images, else "").
    """
    cols = ["rank", "neighbor", "label", "sim", "d2", "same_class", "role"]
    if neighbors is None or neighbors.empty:
        return pd.DataFrame(columns=cols)
    rows = neighbors[
        (neighbors["round"] == int(triplet["round"]))
        & (neighbors["anchor"].astype(str) == str(triplet["anchor"]))
    ].sort_values("rank")
    out = rows[["rank", "neighbor", "label", "sim"]].reset_index(drop=True)
    out["d2"] = np.maximum(0.0, 2.0 - 2.0 * out["sim"].to_numpy(dtype=float))
    out["same_class"] = out["label"].astype(str) == str(triplet["anchor_label"])
    role = {str(triplet["positive"]): "positive", str(triplet["negative"]): "negative"}
    out["role"] = [role.get(str(n), "") for n in out["neighbor"]]
    return out[cols]


def miner_stats(run_dir: str | os.PathLike) -> pd.DataFrame:
    """Per mining round: yield, semi-hard / hard counts and fractions, predicted loss, ranks, sims.

    Built from rounds.csv (which also lists rounds that yielded nothing) joined with per-round
    means of triplets.csv; without rounds.csv the rounds come from triplets.csv alone.
    """
    run_dir = Path(run_dir)
    trip = load_triplets(run_dir)
    agg = pd.DataFrame({"round": pd.Series(dtype=int)})
    if not trip.empty:
        g = trip.groupby("round")
        agg = pd.DataFrame(
            {
                "n_triplets": g.size(),
                "n_semi_hard": g["kind"].apply(lambda k: int((k == "semi-hard").sum())),
                "n_hard": g["kind"].apply(lambda k: int((k == "hard").sum())),
                "mean_pred_loss": g["loss"].mean(),
                "mean_pos_rank": g["pos_rank"].mean(),
                "mean_neg_rank": g["neg_rank"].mean(),
                "mean_pos_sim": g["pos_sim"].mean(),
                "mean_neg_sim": g["neg_sim"].mean(),
            }
        ).reset_index()
    rounds_path = run_dir / paths.ROUNDS
    if rounds_path.is_file():
        stats = read_log(rounds_path).merge(
            agg.drop(columns=["n_triplets", "n_semi_hard", "n_hard"], errors="ignore"),
            on="round",
            how="left",
        )
    else:
        stats = agg.rename(
            columns={"n_triplets": "triplets", "n_semi_hard": "semi_hard", "n_hard": "hard"}
        )
        if not stats.empty:
            stats.insert(1, "step", trip.groupby("round")["step"].min().to_numpy())
            stats["mean_loss"] = stats["mean_pred_loss"]
    if stats.empty:
        return pd.DataFrame(
            columns=[
                "round",
                "step",
                "triplets",
                "semi_hard",
                "hard",
                "other",
                "semi_hard_frac",
                "hard_frac",
                "mean_loss",
            ]
        )
    stats["other"] = stats["triplets"] - stats["semi_hard"] - stats["hard"]
    denom = stats["triplets"].where(stats["triplets"] > 0)
    stats["semi_hard_frac"] = stats["semi_hard"] / denom
    stats["hard_frac"] = stats["hard"] / denom
    return stats.sort_values("round").reset_index(drop=True)


def spread_rounds(triplets: pd.DataFrame, n: int) -> list[int]:
    """`n` mining rounds evenly spread from the first to the last one that yielded triplets."""
    rounds = np.unique(triplets["round"].to_numpy()) if len(triplets) else np.zeros(0, dtype=int)
    if rounds.size == 0 or n < 1:
        return []
    pos = np.unique(np.round(np.linspace(0, rounds.size - 1, min(n, rounds.size))).astype(int))
    return [int(r) for r in rounds[pos]]


def select_triplets(
    triplets: pd.DataFrame,
    *,
    rounds: Sequence[int] | None = None,
    label: str | None = None,
    per_round: int = 4,
    order: Literal["loss", "neg_rank", "mined"] = "loss",
) -> pd.DataFrame:
    """Triplets to show: of the given rounds (all when None) and anchor class, `per_round` each.

    order "loss" shows the highest predicted loss first, "neg_rank" the closest negatives first,
    "mined" the miner's own order.
    """
    frame = triplets.reset_index(drop=True).rename_axis("mined").reset_index()
    if rounds is not None:
        frame = frame[frame["round"].isin(list(rounds))]
    if label is not None:
        frame = frame[frame["anchor_label"].astype(str) == str(label)]
    keys = {
        "loss": (["loss", "mined"], [False, True]),
        "neg_rank": (["neg_rank", "mined"], [True, True]),
        "mined": (["mined"], [True]),
    }
    if order not in keys:
        raise ValueError(f"order: expected one of {sorted(keys)}, got {order!r}")
    by, ascending = keys[order]
    frame = frame.sort_values(["round", *by], ascending=[True, *ascending], kind="stable")
    return (
        frame.groupby("round", sort=True)
        .head(per_round)
        .drop(columns="mined")
        .reset_index(drop=True)
    )
