"""The ablation grid's table (`msvlad ablate collect` writes it) and the report's views of it.

One row per grid point and test set (`COLUMNS`): the axis, the value (JSON text), whether it is
the row's own value, the mAPs and mP@10, the last validation mAP, the experiment, its revision, the
code that ran it and the row's params. `notebooks/ablations.ipynb` draws it against each axis.
"""

from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from msvlad.config import ConfigError, Params
from msvlad.storage import write_text

log = logging.getLogger(__name__)

# The paper's ablation axes: params key -> axis title. Other section.key names work too.
AXES: dict[str, str] = {
    "miner.delta": "δ: loss band m ± δ",
    "miner.threshold": "rank threshold of the hard positive",
    "model.num_clusters": "K: NetVLAD clusters",
    "model.pool_sizes": "windows: max-pool sizes",
    "model.split": "split: channels per chunk",
    "miner.pool_size": "mining pool (images)",
    "miner.semi_hard_prob": "semi-hard probability",
}
# metrics.json setup -> column: revisited Easy/Medium/Hard, or the one setup of classic/Holidays
SETUP_COLUMNS = {"easy": "E", "medium": "M", "hard": "H", "all": "all"}
KAPPA = 10  # the mP@k reported beside the mAPs
# The table's columns, in order: what the point is, what it scored, what made it.
COLUMNS = [
    "axis",
    "value",
    "default",
    "method",
    "dataset",
    *SETUP_COLUMNS.values(),
    *(f"mP@{KAPPA} {c}" for c in SETUP_COLUMNS.values()),
    "val_mAP",
    "experiment",
    "rev",
    "code",
    "params",
]


class GridError(ConfigError):
    """A grid point that cannot be queued or a result that cannot be read."""


def value_text(value: Any) -> str:
    """A value as the table stores it (JSON: 0.04, [2, 3], null)."""
    return json.dumps(value)


def sort_table(table: pd.DataFrame) -> pd.DataFrame:
    """Points in axis order (`AXES` first), then by value; one row per point and test set."""
    order = {a: i for i, a in enumerate(AXES)}
    keys = table.assign(
        _axis=table["axis"].map(lambda a: order.get(a, len(order))),
        _value=table["value"].map(_sort_key),
    )
    keys = keys.sort_values(["_axis", "axis", "_value", "dataset"], kind="stable")
    return keys.drop(columns=["_axis", "_value"]).reset_index(drop=True)


def _sort_key(text: str) -> tuple[float, ...]:
    value = json.loads(text)
    if value is None:
        return (math.inf,)
    if isinstance(value, list):
        return (len(value), *map(float, value))
    return (float(value),)


def write_table(table: pd.DataFrame, out: str | Path) -> Path:
    """Write the grid table as CSV (full precision), atomically."""
    buf = io.StringIO()
    table.to_csv(buf, index=False)
    return write_text(out, buf.getvalue())


def load_table(path: str | Path) -> pd.DataFrame:
    """Read a grid table; a missing file gives an empty table (no grid has been collected yet)."""
    path = Path(path)
    if not path.is_file():
        log.warning("%s: no ablation grid collected yet (python -m msvlad ablate)", path)
        return pd.DataFrame(columns=COLUMNS)
    table = pd.read_csv(path, dtype={"value": str, "rev": str, "code": str})
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise GridError(f"{path}: not an ablation table (no column {missing[0]!r})")
    table["default"] = table["default"].astype(bool)
    return table[COLUMNS]


def table_path(folder: str | Path, params: Params) -> Path:
    """Where the grid table of the params' profile lives: <folder>/<profile>.csv."""
    return Path(folder) / f"{params.base.profile}.csv"


# ----------------------------------------------------------------------------- report views


def points_table(table: pd.DataFrame) -> pd.DataFrame:
    """The report's view: a row per axis value and test set, mAP and mP@10, the default starred."""
    view = table.assign(
        axis=table["axis"].map(lambda a: AXES.get(a, a)),
        value=table["value"] + np.where(table["default"], " *", ""),
    )
    scored = [c for c in SETUP_COLUMNS.values() if view[c].notna().any()]
    kappa = [f"mP@{KAPPA} {c}" for c in scored if c in ("M", "all")]
    cols = ["axis", "value", "dataset", *scored, *kappa, "val_mAP", "code"]
    return view[cols].rename(columns={"val_mAP": "val mAP"})


def plot_axes(table: pd.DataFrame, dataset: str | None = None) -> Figure:
    """mAP (E/M/H, and validation mAP when recorded) against each axis; the default is marked."""
    axes_found = list(dict.fromkeys(table["axis"]))
    if not axes_found:
        fig = Figure(figsize=(6, 1.5))
        fig.text(0.5, 0.5, "no ablation grid collected yet: python -m msvlad ablate", ha="center")
        return fig
    dataset = dataset or str(table["dataset"].iloc[0])
    table = table[table["dataset"] == dataset]
    fig = Figure(figsize=(4.2 * len(axes_found), 3.4), layout="constrained")
    for ax, axis in zip(
        fig.subplots(1, len(axes_found), squeeze=False)[0], axes_found, strict=True
    ):
        rows = table[table["axis"] == axis]
        x = np.arange(len(rows))
        for letter, marker in zip(SETUP_COLUMNS.values(), "os^v", strict=True):
            if rows[letter].notna().any():
                ax.plot(x, rows[letter], f"{marker}-", label=f"{dataset} {letter}")
        if rows["val_mAP"].notna().any():
            ax.plot(
                x, rows["val_mAP"], "d--", color="grey", label="validation mAP (end of training)"
            )
        for i in np.flatnonzero(rows["default"].to_numpy()):
            ax.axvline(i, color="black", linestyle=":", linewidth=1)
            ax.annotate(
                "default",
                (i, 1.0),
                xycoords=("data", "axes fraction"),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_xticks(x, rows["value"].tolist())
        ax.set_xlabel(AXES.get(axis, axis))
        ax.set_ylabel("mAP (%)")
        ax.grid(alpha=0.3)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=8)
    return fig
