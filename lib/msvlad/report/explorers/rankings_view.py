"""How the rankings explorer draws a selection: the static figure, the embedding map, the texts.

The static figure (papermill, export) wraps each method's list into rows of at most `PER_ROW`
thumbnails, so a top-k of 30 keeps thumbnails as large as a top-k of 8. Colour code as in
`msvlad.report.figures`: green positive, red negative, grey junk, blue the query.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from msvlad.report.drawing import COLORS, THUMB, relevance_legend, rotation_of, show_thumbnail, wrap
from msvlad.report.explorers.base import THUMBNAILS, ThumbnailCache, encode_jpeg, png
from msvlad.report.explorers.ranking import Landmarks, RankedList
from msvlad.storage import write_bytes, write_text

if TYPE_CHECKING:
    from msvlad.data.testsets import RetrievalDataset

PER_ROW = 10  # thumbnails per row of the static figure (longer lists wrap)
MAP_COLOURS = ("landmark", "status")
MAP_LEGEND = 24  # landmarks named in the map's legend (more: colours only)


def query_thumbnail(
    dataset: RetrievalDataset, rl: RankedList, cache: ThumbnailCache = THUMBNAILS
) -> np.ndarray:
    """The query as shown: the whole image with its box drawn and the outside dimmed.

    A clicked database image is shown whole; a query without a box (Holidays) or a rotated one
    is shown as the network saw it.
    """
    if rl.from_db:
        i = rl.query_index
        return cache.get(dataset.image_path(i), None, rotation_of(dataset, dataset.imlist[i]))
    q = rl.query_index
    rot = rotation_of(dataset, dataset.qimlist[q])
    path, bbx = dataset.query_path(q), dataset.query_bbx(q)
    image = cache.get(path, None, rot)
    if bbx is None or rot:
        return cache.get(path, bbx, rot) if rot else image
    width, _ = cache.original_size(path, None, rot)
    scale = image.shape[1] / width
    x1, y1, x2, y2 = (v * scale for v in bbx)
    dimmed = (image.astype(np.float32) * 0.45 + 255 * 0.55).astype(np.uint8)
    ys = slice(max(0, int(y1)), int(math.ceil(y2)))
    xs = slice(max(0, int(x1)), int(math.ceil(x2)))
    dimmed[ys, xs] = image[ys, xs]
    canvas = Image.fromarray(dimmed)
    ImageDraw.Draw(canvas).rectangle((x1, y1, x2, y2), outline=COLORS["query"], width=2)
    return np.asarray(canvas)


def query_jpeg(dataset: RetrievalDataset, rl: RankedList, cache: ThumbnailCache) -> bytes:
    """`query_thumbnail` as JPEG bytes (the query panel of the widget)."""
    return encode_jpeg(query_thumbnail(dataset, rl, cache))


def _get(item: Any, name: str) -> Any:
    """A field of a shown item: a DataFrame row (Series) or an itertuples row."""
    return item[name] if isinstance(item, pd.Series) else getattr(item, name)


def item_image(
    dataset: RetrievalDataset, item: Any, cache: ThumbnailCache = THUMBNAILS
) -> np.ndarray:
    """A ranked database image's thumbnail (grey for a distractor outside the dataset)."""
    if _get(item, "kind") == "distractor":
        return np.full((THUMB, THUMB, 3), 200, dtype=np.uint8)
    idx = int(_get(item, "db_index"))
    return cache.get(dataset.image_path(idx), None, rotation_of(dataset, dataset.imlist[idx]))


def item_jpeg(dataset: RetrievalDataset, item: Any, cache: ThumbnailCache = THUMBNAILS) -> bytes:
    """A result tile's JPEG (encoded once per image by the cache)."""
    if _get(item, "kind") == "distractor":
        return encode_jpeg(item_image(dataset, item, cache))
    idx = int(_get(item, "db_index"))
    return cache.jpeg(dataset.image_path(idx), None, rotation_of(dataset, dataset.imlist[idx]))


def item_caption(item: Any) -> str:
    """A result's caption: rank (junk has none), kind and cosine."""
    rank, kind, sim = (_get(item, k) for k in ("rank", "kind", "sim"))
    text = f" · {sim:.2f}" if np.isfinite(sim) else ""
    return f"#{rank} {kind}{text}" if rank else f"{kind}{text}"


def scores_text(rl: RankedList) -> str:
    """AP and P@k of one list, or why there are none."""
    if not np.isfinite(rl.ap):
        return "no positive"
    return f"AP {rl.ap:.1f} · P@{rl.k} {rl.precision:.1f}"


def plot_ranked_lists(
    dataset: RetrievalDataset,
    lists: Sequence[RankedList],
    *,
    cache: ThumbnailCache = THUMBNAILS,
    title: str | None = None,
    per_row: int = PER_ROW,
) -> Figure:
    """The query and each method's bordered top-k, wrapped into rows of `per_row` thumbnails."""
    if not lists:
        raise ValueError("lists: expected at least one ranked list")
    widths = [max(1, min(per_row, len(rl.items))) for rl in lists]
    rows = [max(1, math.ceil(len(rl.items) / per_row)) for rl in lists]
    n_cols = max(widths) + 1
    fig = Figure(figsize=(1.55 * n_cols, 1.8 * sum(rows) + 0.8), layout="constrained")
    axes = np.asarray(fig.subplots(sum(rows), n_cols, squeeze=False))
    for ax in axes.ravel():
        ax.set_axis_off()
    top = 0
    for r, rl in enumerate(lists):
        head = f"{wrap(rl.label, 24)}\n{scores_text(rl)}"
        ax = axes[top, 0]
        ax.set_axis_on()
        show_thumbnail(
            ax,
            query_thumbnail(dataset, rl, cache) if r == 0 else _query_crop(dataset, rl, cache),
            COLORS["query"],
            head,
        )
        for j, item in enumerate(rl.items.itertuples(index=False)):
            cell = axes[top + j // per_row, 1 + j % per_row]
            cell.set_axis_on()
            show_thumbnail(
                cell, item_image(dataset, item, cache), COLORS[item.relevance], item_caption(item)
            )
        top += rows[r]
    relevance_legend(fig)
    fig.suptitle(
        f"{title} — {list_title(dataset, lists[0])}" if title else list_title(dataset, lists[0]),
        fontsize=10,
    )
    return fig


def _query_crop(dataset: RetrievalDataset, rl: RankedList, cache: ThumbnailCache) -> np.ndarray:
    """The query as the network saw it (its crop), for the rows under the first."""
    if rl.from_db:
        return query_thumbnail(dataset, rl, cache)
    q = rl.query_index
    return cache.get(
        dataset.query_path(q), dataset.query_bbx(q), rotation_of(dataset, dataset.qimlist[q])
    )


def list_title(dataset: RetrievalDataset, rl: RankedList) -> str:
    """Dataset, setup, query and the left-out own photo, in one line."""
    what = "clicked image" if rl.from_db else "query"
    own = f" · own photo {', '.join(rl.own_photo)} left out (junk)" if rl.own_photo else ""
    return f"{getattr(dataset, 'name', '')} ({rl.setup}) · {what} {rl.query}{own}"


def plot_embedding_map(
    db_xy: np.ndarray,
    query_xy: np.ndarray,
    rl: RankedList,
    marks: Landmarks,
    colour: str = "landmark",
) -> Figure:
    """The database descriptors in 2-D: by landmark or by status for this query, the query
    (star), its positives (green rings) and the top-k (numbered, as in the ranked list)."""
    if colour not in MAP_COLOURS:
        raise ValueError(f"colour: expected one of {MAP_COLOURS}, got {colour!r}")
    fig = Figure(figsize=(7.0, 5.0), layout="constrained")
    ax = fig.subplots()
    if colour == "landmark":
        _scatter_landmarks(ax, db_xy, marks)
    else:
        _scatter_status(ax, db_xy, rl)
    pos = rl.positives["db_index"].to_numpy(dtype=np.int64)
    ax.scatter(
        db_xy[pos, 0],
        db_xy[pos, 1],
        s=90,
        facecolors="none",
        edgecolors=COLORS["positive"],
        linewidths=1.5,
        label="the query's positives",
    )
    shown = rl.items[(rl.items["rank"] > 0) & (rl.items["db_index"] < len(db_xy))]
    for t in shown.itertuples(index=False):
        x, y = db_xy[int(t.db_index)]
        ax.annotate(
            str(t.rank),
            (x, y),
            xytext=(3, 3),
            textcoords="offset points",
            fontsize=7,
            color=COLORS[t.relevance],
            weight="bold",
        )
    ax.scatter(
        [query_xy[0]],
        [query_xy[1]],
        marker="*",
        s=260,
        color=COLORS["query"],
        edgecolors="black",
        zorder=5,
        label="query",
    )
    ax.set(xticks=[], yticks=[], xlabel="PCA 1", ylabel="PCA 2")
    ax.legend(fontsize=6.5, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.set_title(f"database descriptors (PCA) · coloured by {colour}", fontsize=9)
    return fig


def _scatter_landmarks(ax: Any, db_xy: np.ndarray, marks: Landmarks) -> None:
    none = marks.db < 0
    ax.scatter(db_xy[none, 0], db_xy[none, 1], s=10, color="#c7c7c7", label="no landmark")
    for i, name in enumerate(marks.names):
        inside = marks.db == i
        ax.scatter(
            db_xy[inside, 0],
            db_xy[inside, 1],
            s=14,
            color=f"C{i % 10}",
            marker="os^Dv"[i // 10 % 5],
            label=name if len(marks.names) <= MAP_LEGEND else None,
        )


def _scatter_status(ax: Any, db_xy: np.ndarray, rl: RankedList) -> None:
    status = np.full(len(db_xy), "negative", dtype=object)
    status[rl.positives["db_index"].to_numpy(dtype=np.int64)] = "positive"
    junk = rl.items.loc[rl.items["relevance"] == "junk", "db_index"].to_numpy(dtype=np.int64)
    status[junk[junk < len(db_xy)]] = "junk"
    for name in ("negative", "junk", "positive"):
        inside = status == name
        ax.scatter(
            db_xy[inside, 0], db_xy[inside, 1], s=12, color=COLORS[name], alpha=0.8, label=name
        )


def ranked_lists_html(lists: Sequence[RankedList]) -> str:
    """The shown lists as text: scores, where the positives fell, the shown results in order."""
    if not lists:
        return ""
    first = lists[0]
    what = "clicked image" if first.from_db else "query"
    own = (
        f" · own photo {html.escape(', '.join(first.own_photo))} left out (junk)"
        if first.own_photo
        else ""
    )
    parts = [
        f"<div class='msvlad-ranked'><b>{what} {html.escape(first.query)}</b> "
        f"(#{first.query_index}, setup {html.escape(first.setup)}){own}"
    ]
    marks = {"positive": "✓", "negative": "✗", "junk": "·"}
    for rl in lists:
        ranks = rl.positive_ranks
        pos = ", ".join(str(int(r)) for r in ranks[:12]) + ("…" if len(ranks) > 12 else "")
        items = " ".join(
            f"{'#' + str(it.rank) if it.rank else 'junk'}&nbsp;"
            f"{html.escape(it.image or 'distractor')}{marks[it.relevance]}"
            for it in rl.items.itertuples(index=False)
        )
        parts.append(
            f"<br><b>{html.escape(rl.label)}</b>: {scores_text(rl)} · "
            f"{rl.num_positives} positives, at ranks {pos}"
            f"<br><span style='font-size:85%'>{items}</span>"
        )
    return "".join(parts) + "</div>"


def positive_table_html(table: pd.DataFrame, k: int) -> str:
    """The per-positive rank table: ranks within the top-k bold, the change signed."""
    if table.empty:
        return "<div class='msvlad-positives'>no positive for this query</div>"
    methods = [c for c in table.columns if c not in ("db_index", "image", "kind", "change")]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["positive", "kind", *methods]) + (
        "<th>change</th>" if "change" in table else ""
    )
    body = []
    for row in table.itertuples(index=False):
        cells = [html.escape(str(row.image)), html.escape(str(row.kind))]
        for m in methods:
            r = int(row[table.columns.get_loc(m)])
            cells.append(f"<b>{r}</b>" if r <= k else str(r))
        if "change" in table:
            cells.append(f"{int(row[table.columns.get_loc('change')]):+d}")
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return (
        "<table class='msvlad-positives'><thead><tr>"
        + head
        + "</tr></thead><tbody>"
        + "".join(body)
        + "</tbody></table>"
    )


def export_files(
    fig: Figure, lists: Sequence[RankedList], dataset: str, folder: Path
) -> list[Path]:
    """Write a view's figure (PNG) and ranked lists (CSV) atomically, named after the view."""
    head = lists[0]
    parts = [dataset, head.query, head.method, head.variant, head.setup, f"top{head.k}"]
    stem = re.sub(r"[^A-Za-z0-9._+-]+", "_", "_".join(parts))
    frame = export_frame(lists, dataset)
    return [
        write_bytes(folder / f"{stem}.png", png(fig)),
        write_text(folder / f"{stem}.csv", frame.to_csv(index=False)),
    ]


def export_frame(lists: Sequence[RankedList], dataset: str) -> pd.DataFrame:
    """The shown ranked lists as one table (the CSV an export writes)."""
    frames = [
        rl.items.assign(
            dataset=dataset,
            query=rl.query,
            clicked=rl.from_db,
            setup=rl.setup,
            method=rl.method,
            variant=rl.variant,
            AP=rl.ap,
            **{f"P@{rl.k}": rl.precision},
        )
        for rl in lists
    ]
    front = ["dataset", "query", "clicked", "setup", "method", "variant"]
    out = pd.concat(frames, ignore_index=True)
    return out[front + [c for c in out.columns if c not in front]]
