"""How the triplet explorer draws a mined triplet: the images, the anchor's pool neighbours, a
distance axis and the round, with ranks 1-based (the logs store them 0-based, self excluded).

The band of negatives whose predicted loss lies in m ± δ and the hard / semi-hard mix are the
difficulty miner's rule, so they are drawn for its runs only; every run shows the margin line
d2(a, p) + m beyond which a negative gives no loss.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from msvlad.report.drawing import COLORS, KIND_COLORS, shorten, show_thumbnail
from msvlad.report.explorers.base import THUMBNAILS, ThumbnailCache

BAND_MINER = "difficulty"  # the miner whose rule is the m ± delta band and the kind mix


def _d2(sim: float) -> float:
    return max(0.0, 2.0 - 2.0 * float(sim))


def plot_triplet_neighbors(
    train_root: str | os.PathLike,
    triplet: pd.Series,
    neighbors: pd.DataFrame,
    stats: pd.DataFrame,
    *,
    margin: float,
    delta: float | None,
    cache: ThumbnailCache = THUMBNAILS,
    title: str | None = None,
    recorded: bool = True,
) -> Figure:
    """A mined triplet and why: the anchor's ranked pool neighbours, a distance axis, the round.

    Top: anchor / positive / negative and the round's yield (and, for the difficulty miner, the
    kind mix) among all rounds. Middle: the anchor's top neighbours in that round's pool (green:
    anchor's class, red: other class), rank (1-based) and squared distance d2 = 2 - 2 cos. Bottom:
    the neighbours on a d2 axis with the chosen positive (P) and negative (N); `delta` (the
    difficulty miner's) adds the band d2(a, n) in d2(a, p) ± delta, where m + d2(a, p) - d2(a, n)
    lies in m ± delta.
    """
    train_root = Path(train_root)
    k = max(len(neighbors), 6)
    fig = Figure(figsize=(max(11.0, 1.25 * k), 8.2), layout="constrained")
    top, middle, bottom = fig.subfigures(3, 1, height_ratios=[1.25, 1.0, 0.8])
    left, right = top.subfigures(1, 2, width_ratios=[1.0, 1.2])
    _triplet_images(left, train_root, triplet, cache)
    _round_panels(right, stats, int(triplet["round"]), mix=delta is not None)
    _neighbour_row(middle, train_root, neighbors, cache, int(triplet["round"]), recorded)
    d2p, d2n = _d2(triplet["pos_sim"]), _d2(triplet["neg_sim"])
    _distance_axis(bottom.subplots(), neighbors, d2p, d2n, margin, delta)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def _triplet_images(sub: Any, root: Path, t: pd.Series, cache: ThumbnailCache) -> None:
    ax_a, ax_p, ax_n = sub.subplots(1, 3)
    show_thumbnail(
        ax_a,
        cache.get(root / str(t["anchor"])),
        COLORS["query"],
        f"anchor · {shorten(str(t['anchor_label']), 18)}\nround {int(t['round'])} · {t['kind']}",
    )
    show_thumbnail(
        ax_p,
        cache.get(root / str(t["positive"])),
        COLORS["positive"],
        f"positive · rank {int(t['pos_rank']) + 1}\nd2 {_d2(t['pos_sim']):.3f}",
    )
    show_thumbnail(
        ax_n,
        cache.get(root / str(t["negative"])),
        COLORS["negative"],
        f"neg · {shorten(str(t['negative_label']), 14)} · rank {int(t['neg_rank']) + 1}\n"
        f"d2 {_d2(t['neg_sim']):.3f} · loss {float(t['loss']):.3f}",
    )


def _neighbour_row(
    sub: Any,
    root: Path,
    neighbors: pd.DataFrame,
    cache: ThumbnailCache,
    round_: int,
    recorded: bool,
) -> None:
    """The anchor's top neighbours as bordered thumbnails, P and N marked by thick borders."""
    axes = np.atleast_1d(sub.subplots(1, max(len(neighbors), 6)))
    for j, ax in enumerate(axes):
        if j >= len(neighbors):
            ax.set_axis_off()
            continue
        nb = neighbors.iloc[j]
        tag = {"positive": "P · ", "negative": "N · "}.get(nb["role"], "")
        show_thumbnail(
            ax,
            cache.get(root / str(nb["neighbor"])),
            COLORS["positive"] if nb["same_class"] else COLORS["negative"],
            f"{tag}#{int(nb['rank']) + 1} {shorten(str(nb['label']), 12)}\nd2 {nb['d2']:.3f}",
        )
        if nb["role"]:
            for spine in ax.spines.values():
                spine.set_linewidth(7.0)
    if neighbors.empty:
        text = "no neighbours recorded for this anchor"
        if not recorded:
            text = "neighbours not recorded for this run (neighbors.csv is written by training)"
        sub.text(0.5, 0.5, text, ha="center", va="center", fontsize=10)
    else:
        sub.suptitle(
            f"the anchor's top {len(neighbors)} neighbours in round {round_}'s pool", fontsize=9
        )


def _round_panels(sub: Any, stats: pd.DataFrame, chosen: int, *, mix: bool) -> None:
    """Yield per round (and the hard / semi-hard mix when `mix`), the chosen round highlighted."""
    axes = np.atleast_1d(sub.subplots(2 if mix else 1, 1, sharex=True))
    ax_yield = axes[0]
    if stats.empty:
        ax_yield.text(0.5, 0.5, "no rounds logged", ha="center", va="center")
        return
    x = stats["round"].to_numpy()
    colors = np.where(x == chosen, "#4c72b0", "#c7c7c7")
    ax_yield.bar(x, stats["triplets"].to_numpy(dtype=float), color=colors, width=0.85)
    row = stats[stats["round"] == chosen]
    text = f"round {chosen}"
    if len(row):
        r = row.iloc[0]
        pool = f" from a pool of {int(r['pool'])}" if "pool" in r and pd.notna(r["pool"]) else ""
        text += f": {int(r['triplets'])} triplets{pool}"
        if mix and r["triplets"] > 0:
            text += f", {100 * r['hard'] / r['triplets']:.0f}% hard"
    ax_yield.set(ylabel="triplets", title=text)
    ax_yield.title.set_fontsize(9)
    if not mix:
        ax_yield.set_xlabel("mining round")
        return
    ax_mix, bottom = axes[1], np.zeros(len(x))
    for kind, col in (("semi-hard", "semi_hard_frac"), ("hard", "hard_frac")):
        values = stats[col].fillna(0.0).to_numpy(dtype=float)
        ax_mix.bar(x, values, bottom=bottom, color=KIND_COLORS[kind], width=0.85, label=kind)
        bottom += values
    ax_mix.bar([chosen], [1.0], fill=False, edgecolor="black", linewidth=1.5, width=0.85)
    ax_mix.set(xlabel="mining round", ylabel="kind mix", ylim=(0, 1.05))
    ax_mix.legend(fontsize=7, loc="lower right")


def _distance_axis(
    ax: Any, neighbors: pd.DataFrame, d2p: float, d2n: float, margin: float, delta: float | None
) -> None:
    """Neighbours, the chosen positive / negative, the margin line and (difficulty) the band."""
    handles = []
    if delta is not None:
        ax.axvspan(d2p - delta, d2p + delta, color="#f2c14e", alpha=0.35, lw=0)
        label = f"negatives kept: loss in m ± δ ({margin - delta:.2f}–{margin + delta:.2f})"
        handles.append(Patch(color="#f2c14e", alpha=0.5, label=label))
    ax.axvline(d2p + margin, color="black", ls=":", lw=1)
    ax.text(d2p + margin, 1.02, " d2(a,p) + m", fontsize=7, va="bottom")
    for nb in neighbors.itertuples(index=False):
        color = COLORS["positive"] if nb.same_class else COLORS["negative"]
        ax.plot([nb.d2], [0.5], "o", color=color, ms=7, alpha=0.8)
        ax.annotate(
            str(nb.rank + 1),
            (nb.d2, 0.5),
            xytext=(0, 7),
            textcoords="offset points",
            ha="center",
            fontsize=7,
        )
    for name, d2, marker in (("P", d2p, "^"), ("N", d2n, "v")):
        color = COLORS["positive" if name == "P" else "negative"]
        ax.plot([d2], [0.2], marker, color=color, ms=12, mec="black")
        ax.annotate(name, (d2, 0.2), xytext=(0, -14), textcoords="offset points", ha="center")
    band = delta or 0.0
    xs = [d2p - band, d2p + band + margin, d2n, *neighbors["d2"].astype(float).tolist()]
    lo, hi = min(xs), max(xs)
    pad = 0.08 * (hi - lo) + 1e-3
    ax.set(xlim=(lo - pad, hi + pad), ylim=(-0.15, 1.0), yticks=[])
    ax.set_xlabel("squared distance to the anchor, d2 = 2 − 2 cos", fontsize=8)
    handles += [
        Patch(color=COLORS["positive"], label="anchor's class"),
        Patch(color=COLORS["negative"], label="other class"),
    ]
    ax.legend(handles=handles, fontsize=7, loc="upper left", ncols=3, frameon=False)


def triplet_html(
    triplet: pd.Series, neighbors: pd.DataFrame, margin: float, delta: float | None
) -> str:
    """The chosen triplet as text: kind, predicted loss (band), positive, negative, neighbours."""
    d2p, d2n = _d2(triplet["pos_sim"]), _d2(triplet["neg_sim"])
    e = html.escape
    band = f" (band {margin - delta:.3f}–{margin + delta:.3f})" if delta is not None else ""
    lines = [
        f"<div class='msvlad-triplet'><b>round {int(triplet['round'])}</b> · anchor "
        f"<b>{e(str(triplet['anchor']))}</b> ({e(str(triplet['anchor_label']))}) · "
        f"{e(str(triplet['kind']))} · predicted loss {float(triplet['loss']):.4f}{band}",
        f"<br>positive {e(str(triplet['positive']))}: rank {int(triplet['pos_rank']) + 1}, "
        f"cos {float(triplet['pos_sim']):.4f}, d2 {d2p:.4f}",
        f"<br>negative {e(str(triplet['negative']))} ({e(str(triplet['negative_label']))}): "
        f"rank {int(triplet['neg_rank']) + 1}, cos {float(triplet['neg_sim']):.4f}, d2 {d2n:.4f}",
    ]
    if len(neighbors):
        items = " ".join(
            f"#{nb.rank + 1}&nbsp;{e(str(nb.neighbor))}{'✓' if nb.same_class else '✗'}"
            + (f"({nb.role[0].upper()})" if nb.role else "")
            for nb in neighbors.itertuples(index=False)
        )
        lines.append(f"<br><span style='font-size:85%'>neighbours: {items}</span>")
    return "".join(lines) + "</div>"
