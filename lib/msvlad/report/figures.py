"""Figure builders for the report notebooks: ranked-list and triplet galleries, curves, bars.

Every builder returns a `matplotlib.figure.Figure` made without pyplot (no global figure state,
safe under the Agg backend and in loops); `save_figure` writes it atomically as PNG and PDF
under reports/figures/<notebook>/. Every loop the notebooks need lives here.
Colour code of ranked lists: green = positive, red = negative, grey = junk (ignored by AP),
blue = the query (cropped to its bounding box, as the protocol describes it).
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from msvlad import paths
from msvlad.report import tables
from msvlad.report.drawing import (
    COLORS,
    DPI,
    KIND_COLORS,
    SETUP_COLORS,
    message_figure,
    relevance_legend,
    rotation_of,
    shorten,
    show_thumbnail,
    thumbnail,
    wrap,
)
from msvlad.storage import write_bytes

if TYPE_CHECKING:
    from msvlad.data.testsets import RetrievalDataset

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def save_figure(
    fig: Figure,
    notebook: str,
    name: str,
    figures_dir: str | os.PathLike | None = None,
    *,
    dpi: int = DPI,
    pdf: bool = True,
    write: bool = True,
) -> list[Path]:
    """Write `fig` to <figures_dir>/<notebook>/<name>.png (and .pdf) atomically; return paths.

    write=False writes nothing and returns []: a notebook run by hand (JupyterLab) leaves the
    report stage's figures alone; only the report stage (papermill) passes write=True.
    """
    for what, value in (("notebook", notebook), ("name", name)):
        if not value or Path(value).name != value:
            raise ValueError(f"{what}: expected a plain file name, got {value!r}")
    if not write:
        return []
    folder = (paths.FIGURES if figures_dir is None else Path(figures_dir)) / notebook
    out = []
    for fmt in ("png", "pdf") if pdf else ("png",):
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=dpi, bbox_inches="tight", facecolor="white")
        out.append(write_bytes(folder / f"{name}.{fmt}", buf.getvalue()))
    log.info("figure %s/%s -> %s", notebook, name, folder)
    return out


# --------------------------------------------------------------------------------------------
# Ranked lists
# --------------------------------------------------------------------------------------------


def plot_ranking(
    dataset: RetrievalDataset,
    ranks: np.ndarray,
    query_index: int,
    top_k: int = 8,
    setup: str = "medium",
    *,
    title: str | None = None,
) -> Figure:
    """One query (cropped to its bbx) and its top-k database images, bordered by relevance."""
    return plot_rankings_grid(dataset, ranks, [query_index], top_k, setup, title=title)


def plot_rankings_grid(
    dataset: RetrievalDataset,
    ranks: np.ndarray,
    query_indices: Sequence[int],
    top_k: int = 8,
    setup: str = "medium",
    *,
    title: str | None = None,
) -> Figure:
    """Several queries of one ranking, a row each: the query crop, then its bordered top-k."""
    rows = [(f"query {_qname(dataset, q)}", ranks, int(q)) for q in query_indices]
    return _ranking_figure(dataset, rows, top_k, setup, title)


def plot_ranking_comparison(
    dataset: RetrievalDataset,
    rankings: Mapping[str, np.ndarray],
    query_index: int,
    top_k: int = 8,
    setup: str = "medium",
    *,
    title: str | None = None,
) -> Figure:
    """One query ranked by several methods ({label: ranks}), one row per method."""
    rows = [(label, ranks, int(query_index)) for label, ranks in rankings.items()]
    title = title or f"query {_qname(dataset, query_index)}"
    return _ranking_figure(dataset, rows, top_k, setup, title)


def _ranking_figure(
    dataset: RetrievalDataset,
    rows: Sequence[tuple[str, np.ndarray, int]],
    top_k: int,
    setup: str,
    title: str | None,
) -> Figure:
    """Rows of (label, ranks, query): the query crop, then its top-k as the explorers show it.

    Ranks count as revisitop counts them (junk removed, 1-based); junk is shown unnumbered and
    the query's own photo left out (`msvlad.report.explorers.ranking`).
    """
    from msvlad.report.explorers.ranking import dataset_truth, own_photos, ranked_list
    from msvlad.report.explorers.rankings_view import item_caption, item_image

    if not rows:
        raise ValueError("query_indices: expected at least one query")
    if top_k < 1:
        raise ValueError(f"top_k: expected at least 1, got {top_k}")
    own = own_photos(dataset)
    lists = []
    for label, ranks, q in rows:
        ranks = np.asarray(ranks)
        if ranks.ndim != 2 or not 0 <= q < ranks.shape[1]:
            raise ValueError(
                f"ranks: query {q} is not a column of a (n_db, n_q) array of shape {ranks.shape}"
            )
        truth = dataset_truth(dataset, q, setup, own[q])
        lists.append(ranked_list(dataset, ranks[:, q], truth, top_k, label=label, query_index=q))
    n_cols = max(len(rl.items) for rl in lists) + 1
    fig = Figure(figsize=(1.55 * n_cols, 1.7 * len(rows) + 0.6), layout="constrained")
    axes = np.asarray(fig.subplots(len(rows), n_cols, squeeze=False))
    for r, rl in enumerate(lists):
        q = rl.query_index
        crop = thumbnail(
            dataset.query_path(q), dataset.query_bbx(q), rotation_of(dataset, dataset.qimlist[q])
        )
        scores = f"AP {rl.ap:.1f}" if np.isfinite(rl.ap) else "no positive"
        show_thumbnail(axes[r, 0], crop, COLORS["query"], f"{wrap(rl.label, 22)}\n{scores}")
        for j in range(n_cols - 1):
            if j >= len(rl.items):
                axes[r, j + 1].set_axis_off()
                continue
            item = rl.items.iloc[j]
            color = COLORS[item["relevance"]]
            show_thumbnail(axes[r, j + 1], item_image(dataset, item), color, item_caption(item))
    relevance_legend(fig)
    own_note = " · own photos left out (junk)" if any(rl.own_photo for rl in lists) else ""
    head = f"{getattr(dataset, 'name', '')} ({lists[-1].setup}){own_note}".strip()
    fig.suptitle(f"{title} — {head}" if title else head, fontsize=10)
    return fig


# --------------------------------------------------------------------------------------------
# Triplets and the miner
# --------------------------------------------------------------------------------------------


def plot_triplets(
    train_root: str | os.PathLike,
    triplets: pd.DataFrame,
    n: int | None = None,
    *,
    title: str | None = None,
) -> Figure:
    """Mined triplets as rows of anchor / positive / negative thumbnails: ranks, sims, loss, kind.

    Image paths in `triplets` are relative to the training-set folder `train_root`; ranks are
    shown 1-based (the logs store them 0-based).
    """
    train_root = Path(train_root)
    frame = triplets if n is None else triplets.head(n)
    if frame.empty:
        return message_figure("no mined triplets to show", title)
    fig = Figure(figsize=(6.3, 2.25 * len(frame) + 0.4), layout="constrained")
    axes = np.asarray(fig.subplots(len(frame), 3, squeeze=False))
    for r, t in enumerate(frame.itertuples(index=False)):
        show_thumbnail(
            axes[r, 0],
            thumbnail(train_root / t.anchor),
            COLORS["query"],
            f"anchor · {shorten(str(t.anchor_label), 16)}\nround {t.round} · {t.kind}",
        )
        show_thumbnail(
            axes[r, 1],
            thumbnail(train_root / t.positive),
            COLORS["positive"],
            f"positive · rank {t.pos_rank + 1}\nsim {t.pos_sim:.3f}",
        )
        show_thumbnail(
            axes[r, 2],
            thumbnail(train_root / t.negative),
            COLORS["negative"],
            f"neg · {shorten(str(t.negative_label), 12)} · rank {t.neg_rank + 1}\n"
            f"sim {t.neg_sim:.3f} · loss {t.loss:.3f}",
        )
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_miner_stats(
    stats: pd.DataFrame, triplets: pd.DataFrame, *, title: str | None = None
) -> Figure:
    """Miner diagnostics: yield per round, difficulty mix, predicted loss and similarities."""
    if stats.empty:
        return message_figure("no mining rounds logged", title)
    fig = Figure(figsize=(10, 6.5), layout="constrained")
    (ax_yield, ax_mix), (ax_loss, ax_sim) = fig.subplots(2, 2)
    x = stats["round"].to_numpy()
    ax_yield.bar(x, stats["triplets"].to_numpy(), color="#4c72b0", width=0.8)
    ax_yield.set(xlabel="mining round", ylabel="triplets mined", title="yield per round")
    # fraction of each triplet kind per round (difficulty miner: hard, semi-hard; others: one kind)
    if len(triplets):
        mix = (
            pd.crosstab(triplets["round"], triplets["kind"], normalize="index")
            .reindex(x)
            .fillna(0.0)
        )
    else:
        mix = stats.set_index("round")[["hard_frac", "semi_hard_frac"]].fillna(0.0)
        mix.columns = ["hard", "semi-hard"]
    kinds = [k for k in KIND_COLORS if k in mix.columns] + sorted(
        k for k in mix.columns if k not in KIND_COLORS
    )
    bottom = np.zeros(len(mix))
    for i, kind in enumerate(kinds):
        values = mix[kind].to_numpy(dtype=float)
        color = KIND_COLORS.get(kind, f"C{i}")
        ax_mix.bar(x, values, bottom=bottom, color=color, width=0.8, label=str(kind))
        bottom += values
    ax_mix.set(
        xlabel="mining round", ylabel="fraction of triplets", title="difficulty mix", ylim=(0, 1.05)
    )
    ax_mix.legend(fontsize=8, loc="lower right")
    if triplets.empty:
        for ax in (ax_loss, ax_sim):
            ax.text(0.5, 0.5, "no triplets", ha="center", va="center", transform=ax.transAxes)
    else:
        loss_bins = np.linspace(triplets["loss"].min(), triplets["loss"].max() + 1e-9, 31)
        for i, kind in enumerate(kinds):
            losses = triplets.loc[triplets["kind"] == kind, "loss"].to_numpy()
            ax_loss.hist(
                losses,
                bins=loss_bins,
                alpha=0.6,
                color=KIND_COLORS.get(kind, f"C{i}"),
                label=str(kind),
            )
        ax_loss.set(
            xlabel="predicted triplet loss at mining", ylabel="triplets", title="predicted loss"
        )
        ax_loss.legend(fontsize=8)
        bins = np.linspace(
            min(triplets["pos_sim"].min(), triplets["neg_sim"].min()),
            max(triplets["pos_sim"].max(), triplets["neg_sim"].max()),
            31,
        )
        ax_sim.hist(
            triplets["pos_sim"].to_numpy(),
            bins=bins,
            alpha=0.6,
            color=COLORS["positive"],
            label="anchor–positive",
        )
        ax_sim.hist(
            triplets["neg_sim"].to_numpy(),
            bins=bins,
            alpha=0.6,
            color=COLORS["negative"],
            label="anchor–negative",
        )
        ax_sim.set(xlabel="cosine similarity at mining", ylabel="triplets", title="similarities")
        ax_sim.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


# --------------------------------------------------------------------------------------------
# Training curves and result summaries
# --------------------------------------------------------------------------------------------


LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def curve_styles(logs: pd.DataFrame, columns: Sequence[str]) -> dict[str, dict[str, object]]:
    """Per method of `logs`: colour, line style, marker and label, distinct for every method.

    A method whose curves equal an earlier method's in every column (e.g. the fp16 mining pool
    on the CPU, which changes no triplet) says so in its label, and its dashed line and other
    marker keep both visible where they overlap.
    """
    styles: dict[str, dict[str, object]] = {}
    seen: dict[tuple, str] = {}
    groups = logs.groupby("method", sort=False) if "method" in logs else [("run", logs)]
    for i, (key, frame) in enumerate(groups):
        label = str(frame["label"].iloc[0]) if "label" in frame else str(key)
        cols = [c for c in columns if c in frame]
        values = tuple(
            tuple(np.round(frame.dropna(subset=[c])[c].to_numpy(dtype=float), 10)) for c in cols
        ) + (tuple(frame["step"]),)
        twin = seen.get(values)
        if twin is None:
            seen[values] = label
        styles[str(key)] = {
            "color": f"C{i % 10}",
            "ls": LINE_STYLES[i % len(LINE_STYLES)] if twin is None else (0, (4, 3)),
            "marker": MARKERS[i % len(MARKERS)],
            "label": label if twin is None else f"{label} (identical to {shorten(twin, 40)})",
            "lw": 1.6 if twin is None else 2.4,
        }
    return styles


def plot_training_curves(logs: pd.DataFrame, *, title: str | None = None) -> Figure:
    """Loss, miner yield, learning rate and validation mAP against the step, one line per method."""
    if logs.empty:
        return message_figure("no trained method has a training log", title)
    fig = Figure(figsize=(10, 6.5), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True).ravel()
    panels = (
        ("loss", "training loss"),
        ("yield", "triplets per mining round"),
        ("lr", "learning rate"),
        ("val_map", "validation mAP (%)"),
    )
    fig.set_size_inches(10, 6.5 + 0.2 * logs["method"].nunique() if "method" in logs else 6.5)
    styles = curve_styles(logs, [c for c, _ in panels])
    groups = logs.groupby("method", sort=False) if "method" in logs else [("run", logs)]
    for key, frame in groups:
        style = styles[str(key)]
        for ax, (col, _) in zip(axes, panels, strict=True):
            if col in frame:
                points = frame.dropna(subset=[col])  # val_map: only the validated epochs
                ax.plot(
                    points["step"].to_numpy(),
                    points[col].to_numpy(dtype=float),
                    ms=4,
                    mfc="none" if "identical" in str(style["label"]) else None,
                    **style,
                )
    for ax, (col, name) in zip(axes, panels, strict=True):
        ax.set(title=name, ylabel=col)
        ax.grid(alpha=0.3)
    axes[2].set_yscale("log")
    axes[2].set_xlabel("step")
    axes[3].set_xlabel("step")
    handles, labels = axes[0].get_legend_handles_labels()  # under the panels: hides no curve
    fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def plot_validation_curves(logs: pd.DataFrame, *, title: str | None = None) -> Figure:
    """Validation mAP against the training step, one line per method (validated epochs only)."""
    if logs.empty or "val_map" not in logs or logs["val_map"].isna().all():
        return message_figure("no validation mAP in the training logs", title)
    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.subplots()
    validated = logs.dropna(subset=["val_map"])
    styles = curve_styles(validated, ["val_map"])
    for key, frame in validated.groupby("method", sort=False):
        style = styles[str(key)]
        mfc = "none" if "identical" in str(style["label"]) else None
        ax.plot(frame["step"], frame["val_map"], ms=4, mfc=mfc, **style)
    ax.set(xlabel="training step", ylabel="validation mAP (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=11)
    return fig


def plot_results_bars(
    results: pd.DataFrame, *, variant: str = "plain", metric: str = "mAP", title: str | None = None
) -> Figure:
    """Horizontal grouped bars of `metric` per method, one panel per dataset, one bar per setup."""
    frame = results[results["variant"] == variant]
    if frame.empty:
        raise ValueError(f"results: no rows of variant {variant!r}")
    datasets = list(dict.fromkeys(frame["dataset"]))
    labels = list(dict.fromkeys(frame["label"]))
    fig = Figure(
        figsize=(4.2 * len(datasets) + 3.5, 0.75 * len(labels) + 1.2), layout="constrained"
    )
    axes = np.asarray(fig.subplots(1, len(datasets), sharey=True, squeeze=False)).ravel()
    for ax, ds in zip(axes, datasets, strict=True):
        sub = frame[frame["dataset"] == ds]
        setups = [s for s in tables.SETUP_ORDER if s in set(sub["setup"])]
        height = 0.8 / len(setups)
        y = np.arange(len(labels))
        for i, s in enumerate(setups):
            values = (
                sub[sub["setup"] == s]
                .set_index("label")[metric]
                .reindex(labels)
                .to_numpy(dtype=float)
            )
            bars = ax.barh(
                y - 0.4 + (i + 0.5) * height,
                values,
                height=height,
                color=SETUP_COLORS.get(s),
                label=s,
                edgecolor="white",
            )
            ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
        ax.set_yticks(y, labels=[shorten(lab, 44) for lab in labels], fontsize=8)
        ax.invert_yaxis()
        ax.set(title=ds, xlabel=f"{metric} (%)")
        ax.set_xlim(
            0, max(100.0, float(np.nanmax(sub[metric].to_numpy(dtype=float), initial=0.0)) * 1.1)
        )
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title or f"{metric} per method ({variant})", fontsize=11)
    return fig


def plot_bootstrap(boot: pd.DataFrame, *, title: str | None = None) -> Figure:
    """Forest plot of paired-bootstrap mAP differences with their CIs, one panel per dataset."""
    if boot.empty:
        raise ValueError("boot: empty bootstrap table")
    datasets = list(dict.fromkeys(boot["Dataset"]))
    n_rows = boot.groupby("Dataset").size().max()
    fig = Figure(figsize=(5.5 * len(datasets) + 3, 0.45 * n_rows + 1.4), layout="constrained")
    axes = np.asarray(fig.subplots(1, len(datasets), squeeze=False)).ravel()
    for ax, ds in zip(axes, datasets, strict=True):
        sub = boot[boot["Dataset"] == ds]
        y = np.arange(len(sub))
        diff = sub["Δ mAP"].to_numpy(dtype=float)
        err = np.vstack(
            [
                diff - sub["CI low"].to_numpy(dtype=float),
                sub["CI high"].to_numpy(dtype=float) - diff,
            ]
        )
        colors = [
            COLORS["positive"] if lo > 0 else COLORS["negative"] if hi < 0 else COLORS["junk"]
            for lo, hi in zip(sub["CI low"], sub["CI high"], strict=True)
        ]
        for i, color in enumerate(colors):
            ax.errorbar(
                diff[i], y[i], xerr=err[:, i : i + 1], fmt="o", color=color, elinewidth=2, capsize=4
            )
        ax.axvline(0.0, color="black", lw=0.8)
        ax.set_yticks(y, labels=[shorten(lab, 44) for lab in sub["Method"]], fontsize=8)
        ax.set_ylim(len(sub) - 0.4, -0.6)  # first row on top
        ax.set(
            xlabel=f"Δ mAP {sub['Setup'].iloc[0]} (points)",
            title=f"{ds}: vs {shorten(sub['Reference'].iloc[0], 40)}",
        )
        ax.grid(axis="x", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def plot_query_gains(
    gains: pd.DataFrame, *, label_a: str | None = None, label_b: str | None = None, n_label: int = 3
) -> Figure:
    """Per-query AP of two methods (scatter against the diagonal) and the sorted per-query gains."""
    if gains.empty:
        return message_figure("no query with a finite AP in both runs")
    label_a = label_a or gains.attrs.get("method_a", "A")
    label_b = label_b or gains.attrs.get("method_b", "B")
    fig = Figure(figsize=(11, 4.3), layout="constrained")
    ax_sc, ax_bar = fig.subplots(1, 2, width_ratios=[1, 1.5])
    colors = np.where(
        gains["gain"] > 0,
        COLORS["positive"],
        np.where(gains["gain"] < 0, COLORS["negative"], COLORS["junk"]),
    )
    ax_sc.scatter(gains["AP_b"], gains["AP_a"], c=colors, s=22)
    ax_sc.plot([0, 100], [0, 100], color="black", lw=0.8)
    ax_sc.set(
        xlim=(-2, 102),
        ylim=(-2, 102),
        xlabel=f"AP {shorten(label_b, 35)}",
        ylabel=f"AP {shorten(label_a, 35)}",
    )
    ax_sc.set_aspect("equal")
    extremes = pd.concat([gains.head(n_label), gains.tail(n_label)]).drop_duplicates("query_index")
    for t in extremes.itertuples(index=False):
        ax_sc.annotate(
            shorten(str(t.query), 14),
            (t.AP_b, t.AP_a),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    x = np.arange(len(gains))
    ax_bar.bar(x, gains["gain"].to_numpy(), color=colors)
    ax_bar.axhline(0.0, color="black", lw=0.8)
    ax_bar.set(
        xlabel="queries, largest gain first",
        ylabel="AP gain (points)",
        title=f"mean gain {gains['gain'].mean():+.2f} points over {len(gains)} queries",
    )
    if len(gains) <= 40:
        ax_bar.set_xticks(
            x, labels=[shorten(str(q), 12) for q in gains["query"]], rotation=90, fontsize=7
        )
    setup = gains.attrs.get("setup", "")
    fig.suptitle(
        f"{shorten(label_a, 40)} vs {shorten(label_b, 40)}"
        + (f" — {gains.attrs.get('dataset', '')} ({setup})" if setup else ""),
        fontsize=10,
    )
    return fig


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _qname(dataset: RetrievalDataset, q: int) -> str:
    if not 0 <= int(q) < len(dataset.qimlist):
        raise ValueError(
            f"query index {q} out of range: the dataset has {len(dataset.qimlist)} queries"
        )
    return str(dataset.qimlist[q])
