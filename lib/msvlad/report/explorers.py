"""Interactive explorers for JupyterLab: retrieval rankings per query and mined triplets per round.

Each explorer keeps its selection as plain state (`select(...)`), draws it as a matplotlib Figure
(`figure()`) with a text summary (`summary_html()`), and builds ipywidgets controls on demand
(`widget()`). The notebooks call `rankings_explorer` / `triplet_explorer` in one line: in a kernel
that a Jupyter server started (JupyterLab, Notebook) they return the widgets; under papermill (the
`report` stage) they return the static figure of the first view, so no widget state is stored in
the executed notebook and nobody edits code to switch. Images are decoded only when shown and kept
in a thumbnail cache, so going back to a query or a triplet decodes nothing.
Colour code as in `msvlad.report.figures`: green positive / same class, red negative / other
class, grey junk, blue the query or anchor.
"""

from __future__ import annotations

import html
import io
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from PIL import Image

from msvlad import paths
from msvlad.config import Params, method_params
from msvlad.report import results, runs
from msvlad.report.figures import (
    COLORS,
    KIND_COLORS,
    THUMB,
    _message_figure,
    _short,
    _show,
    _wrap,
)
from msvlad.report.tables import SETUP_SHORT

if TYPE_CHECKING:
    from msvlad.data.testsets import RetrievalDataset

log = logging.getLogger(__name__)

QUERY_ORDERS: dict[str, str] = {
    "ap_asc": "AP, lowest first",
    "ap_desc": "AP, highest first",
    "gain_desc": "AP gain over the 2nd method, largest first",
    "gain_asc": "AP gain over the 2nd method, smallest first",
    "index": "dataset order",
}
MAX_OPTIONS = 500  # entries in a query / triplet menu (the rest stay reachable through filters)
MAX_TOP_K = 30
PNG_DPI = 100


def interactive_session() -> bool:
    """True in a kernel that a Jupyter server started (it sets JPY_SESSION_NAME); not papermill."""
    return bool(os.environ.get("JPY_SESSION_NAME"))


# --------------------------------------------------------------------------------------------
# Thumbnails
# --------------------------------------------------------------------------------------------


class ThumbnailCache:
    """LRU cache of decoded thumbnails keyed by (file, crop box, rotation, size)."""

    def __init__(self, max_items: int = 2048) -> None:
        self.max_items = max_items
        self._items: OrderedDict[tuple, tuple[np.ndarray, tuple[int, int]]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        """Number of cached thumbnails."""
        return len(self._items)

    def get(
        self,
        path: str | os.PathLike,
        bbx: Sequence[float] | None = None,
        rotation: float = 0,
        size: int = THUMB,
    ) -> np.ndarray:
        """RGB thumbnail (longest side `size`), decoded on first use; grey if unreadable."""
        return self._entry(path, bbx, rotation, size)[0]

    def original_size(
        self, path: str | os.PathLike, bbx: Sequence[float] | None = None, rotation: float = 0
    ) -> tuple[int, int]:
        """(width, height) of the image the thumbnail was made from (after crop and rotation)."""
        return self._entry(path, bbx, rotation, THUMB)[1]

    def _entry(
        self, path: str | os.PathLike, bbx: Sequence[float] | None, rotation: float, size: int
    ) -> tuple[np.ndarray, tuple[int, int]]:
        key = (str(path), None if bbx is None else tuple(float(v) for v in bbx), rotation, size)
        if key in self._items:
            self.hits += 1
            self._items.move_to_end(key)
            return self._items[key]
        self.misses += 1
        entry = _decode_thumbnail(path, bbx, rotation, size)
        self._items[key] = entry
        if len(self._items) > self.max_items:
            self._items.popitem(last=False)
        return entry


THUMBNAILS = ThumbnailCache()  # shared by every explorer of a kernel


def _decode_thumbnail(
    path: str | os.PathLike, bbx: Sequence[float] | None, rotation: float, size: int
) -> tuple[np.ndarray, tuple[int, int]]:
    from msvlad.data.images import ImageLoadError, load_image, rotate_image

    try:
        img = load_image(path, bbx)
        img = rotate_image(img, rotation) if rotation else img
    except (ImageLoadError, OSError) as err:
        log.warning("thumbnail: %s", err)
        return np.full((size, size, 3), 200, dtype=np.uint8), (size, size)
    original = img.size
    img.thumbnail((size, size), Image.BILINEAR)
    return np.asarray(img), original


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PNG_DPI, facecolor="white")  # constrained: no 2nd pass
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# Rankings: data
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankedList:
    """One query's top-k under one method: what the rankings explorer draws and prints.

    `items` has one row per shown rank: rank (1-based), db_index, image, relevance (positive /
    negative / junk), kind (easy / hard on revisited sets, else pos / neg / junk / distractor)
    and sim (cosine from features.npz; NaN without it). AP and precision (P@k) are percent.
    """

    method: str
    label: str
    query_index: int
    query: str
    setup: str
    k: int
    ap: float
    precision: float
    items: pd.DataFrame
    positive_ranks: np.ndarray  # 1-based ranks of every positive in the whole list
    num_positives: int


def ranked_list(
    dataset: RetrievalDataset,
    ranks: np.ndarray,
    query_index: int,
    top_k: int,
    setup: str = "medium",
    *,
    method: str = "",
    label: str = "",
    features: dict[str, np.ndarray] | None = None,
) -> RankedList:
    """The top-k of one query with relevance from `results.query_ground_truth`, AP and P@k."""
    if top_k < 1:
        raise ValueError(f"top_k: expected at least 1, got {top_k}")
    q = int(query_index)
    setup_used, ok, junk = results.query_ground_truth(dataset, q, setup)
    easy: set[int] = set()
    if dataset.protocol == "revisited":
        easy = set(results.query_ground_truth(dataset, q, "easy")[1].tolist())
    column = np.asarray(ranks)[:, q]
    top = column[:top_k].astype(np.int64)
    ok_set, junk_set = set(ok.tolist()), set(junk.tolist())

    def judge(idx: int) -> tuple[str, str]:
        if idx >= len(dataset.imlist):  # a distractor appended to the database
            return "negative", "distractor"
        if idx in ok_set:
            if dataset.protocol == "revisited":
                return "positive", "easy" if idx in easy else "hard"
            return "positive", "pos"
        return ("junk", "junk") if idx in junk_set else ("negative", "neg")

    judged = [judge(idx) for idx in top.tolist()]
    relevance, kind = [j[0] for j in judged], [j[1] for j in judged]
    image = [str(dataset.imlist[i]) if i < len(dataset.imlist) else "" for i in top.tolist()]
    sims = np.full(len(top), np.nan)
    if features is not None and q < len(features["q"]):
        inside = top < len(features["db"])
        sims[inside] = features["db"][top[inside]].astype(np.float64) @ features["q"][q]
    items = pd.DataFrame(
        {
            "rank": np.arange(1, len(top) + 1),
            "db_index": top,
            "image": image,
            "relevance": relevance,
            "kind": kind,
            "sim": sims,
        }
    )
    return RankedList(
        method=method,
        label=label or method,
        query_index=q,
        query=str(dataset.qimlist[q]),
        setup=setup_used,
        k=int(top_k),
        ap=results.query_ap(dataset, ranks, q, setup_used),
        precision=results.query_precision(dataset, ranks, q, int(top_k), setup_used),
        items=items,
        positive_ranks=np.flatnonzero(np.isin(column, ok)) + 1,
        num_positives=int(ok.size),
    )


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


class RunResults:
    """What `evaluate` wrote (results/evaluate/<method>/<dataset>/), loaded lazily and kept."""

    def __init__(self, params: Params, results_dir: str | os.PathLike) -> None:
        self.params = params
        self.results_dir = Path(results_dir)
        self.data_root = paths.resolve(params.data.root)
        self._cache: dict[tuple, Any] = {}

    def _memo(self, key: tuple, make: Any) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def datasets(self) -> list[str]:
        """Datasets some method has a ranking of: params' test sets first, then others by name."""
        found = {
            d.name
            for m in self.params.methods
            if (self.results_dir / m).is_dir()
            for d in (self.results_dir / m).iterdir()
            if (d / paths.RANKS).is_file()
        }
        listed = [d for d in self.params.data.test_sets if d in found]
        return listed + sorted(found - set(listed))

    def methods(self, dataset: str) -> list[str]:
        """Methods of params (in its order) with a ranking of `dataset`."""
        return [
            m
            for m in self.params.methods
            if (self.results_dir / m / dataset / paths.RANKS).is_file()
        ]

    def label(self, method: str) -> str:
        """The method's results-table label."""
        return self.params.methods[method].label

    def dataset(self, name: str) -> RetrievalDataset:
        """The test set (a "+distractors" suffix is dropped: its images are the same)."""
        from msvlad.data.testsets import load_dataset

        base = name.split("+", 1)[0]
        return self._memo(("dataset", base), lambda: load_dataset(self.data_root, base))

    def ranks(self, method: str, dataset: str) -> np.ndarray:
        """ranks.npy of (method, dataset)."""
        return self._memo(
            ("ranks", method, dataset),
            lambda: results.load_ranks(self.results_dir, method, dataset),
        )

    def per_query(self, method: str, dataset: str, setup: str) -> pd.DataFrame:
        """per_query.csv of (method, dataset), one setup, AP in percent."""
        frame = self._memo(
            ("per_query", method, dataset),
            lambda: results.load_per_query(self.results_dir, method, dataset),
        )
        s = results.pick_setup(frame["setup"], setup)
        return frame[frame["setup"] == s].reset_index(drop=True)

    def features(self, method: str, dataset: str) -> dict[str, np.ndarray] | None:
        """features.npz (q, db) of (method, dataset), or None when absent or unreadable."""

        def load() -> dict[str, np.ndarray] | None:
            from msvlad.storage import load_npz

            path = self.results_dir / method / dataset / paths.FEATURES
            try:
                feats = load_npz(path)
            except (OSError, ValueError) as err:
                log.info("%s: similarities left out (%s)", path, err)
                return None
            if "q" not in feats or "db" not in feats:
                return None
            return {"q": feats["q"].astype(np.float64), "db": feats["db"]}

        return self._memo(("features", method, dataset), load)


# --------------------------------------------------------------------------------------------
# Rankings: figure
# --------------------------------------------------------------------------------------------


def plot_ranked_lists(
    dataset: RetrievalDataset,
    lists: Sequence[RankedList],
    *,
    cache: ThumbnailCache = THUMBNAILS,
    title: str | None = None,
) -> Figure:
    """The query (whole image, its box drawn, the rest dimmed) and each method's bordered top-k."""
    if not lists:
        raise ValueError("lists: expected at least one ranked list")
    n_cols = max(rl.k for rl in lists) + 1
    fig = Figure(figsize=(1.55 * n_cols, 1.8 * len(lists) + 0.7), layout="constrained")
    axes = np.asarray(fig.subplots(len(lists), n_cols, squeeze=False))
    rotations = getattr(dataset, "rotations", None) or {}
    for r, rl in enumerate(lists):
        q = rl.query_index
        scores = (
            f"AP {rl.ap:.1f} · P@{rl.k} {rl.precision:.1f}" if np.isfinite(rl.ap) else "no positive"
        )
        head = f"{_wrap(rl.label, 24)}\n{scores}"
        if r == 0:
            _query_with_box(axes[r, 0], dataset, q, cache, head)
        else:
            rot = rotations.get(dataset.qimlist[q], 0)
            image = cache.get(dataset.query_path(q), dataset.query_bbx(q), rot)
            _show(axes[r, 0], image, COLORS["query"], head)
        for j in range(n_cols - 1):
            ax = axes[r, j + 1]
            if j >= len(rl.items):
                ax.set_axis_off()
                continue
            item = rl.items.iloc[j]
            if item["kind"] == "distractor":
                image = np.full((THUMB, THUMB, 3), 200, dtype=np.uint8)
            else:
                idx = int(item["db_index"])
                rot = rotations.get(dataset.imlist[idx], 0)
                image = cache.get(dataset.image_path(idx), None, rot)
            sim = f" · {item['sim']:.2f}" if np.isfinite(item["sim"]) else ""
            _show(ax, image, COLORS[item["relevance"]], f"#{item['rank']} {item['kind']}{sim}")
    fig.legend(
        handles=[
            Patch(facecolor="white", edgecolor=COLORS[k], linewidth=2, label=k)
            for k in ("query", "positive", "negative", "junk")
        ],
        loc="outside lower center",
        ncols=4,
        frameon=False,
        fontsize=8,
    )
    rl = lists[0]
    head = f"{getattr(dataset, 'name', '')} ({rl.setup}) · query {rl.query}"
    fig.suptitle(f"{title} — {head}" if title else head, fontsize=10)
    return fig


def _query_with_box(
    ax: Any, dataset: RetrievalDataset, q: int, cache: ThumbnailCache, head: str
) -> None:
    """The whole query image with its crop box drawn and the outside dimmed."""
    rot = (getattr(dataset, "rotations", None) or {}).get(dataset.qimlist[q], 0)
    path, bbx = dataset.query_path(q), dataset.query_bbx(q)
    image = cache.get(path, None, rot)
    if bbx is None or rot:  # no box (Holidays) or a rotated file: the crop is the whole image
        _show(ax, image, COLORS["query"], head)
        return
    width, _ = cache.original_size(path, None, rot)
    scale = image.shape[1] / width
    x1, y1, x2, y2 = (v * scale for v in bbx)
    dimmed = (image.astype(np.float32) * 0.45 + 255 * 0.55).astype(np.uint8)
    ys, xs = slice(max(0, int(y1)), int(math.ceil(y2))), slice(max(0, int(x1)), int(math.ceil(x2)))
    dimmed[ys, xs] = image[ys, xs]
    _show(ax, dimmed, COLORS["query"], head)
    ax.add_patch(
        Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=COLORS["query"], linewidth=1.5)
    )


def ranked_lists_html(lists: Sequence[RankedList]) -> str:
    """The shown ranked lists as text: scores, where the positives fell, the top-k names."""
    if not lists:
        return ""
    first = lists[0]
    parts = [
        f"<div class='msvlad-ranked'><b>query {html.escape(first.query)}</b> "
        f"(#{first.query_index}, setup {html.escape(first.setup)})"
    ]
    marks = {"positive": "✓", "negative": "✗", "junk": "·"}
    for rl in lists:
        pos = ", ".join(str(int(r)) for r in rl.positive_ranks[:12])
        more = "…" if len(rl.positive_ranks) > 12 else ""
        scores = (
            f"AP {rl.ap:.1f} · P@{rl.k} {rl.precision:.1f}"
            if np.isfinite(rl.ap)
            else "no positive in this setup"
        )
        items = " ".join(
            f"#{it.rank}&nbsp;{html.escape(it.image or 'distractor')}{marks[it.relevance]}"
            for it in rl.items.itertuples(index=False)
        )
        parts.append(
            f"<br><b>{html.escape(rl.label)}</b>: {scores} · {rl.num_positives} positives, "
            f"at ranks {pos}{more}<br><span style='font-size:85%'>{items}</span>"
        )
    return "".join(parts) + "</div>"


# --------------------------------------------------------------------------------------------
# Rankings: explorer
# --------------------------------------------------------------------------------------------


class RankingsExplorer:
    """Menus for dataset, method, 2nd method, setup, query order and query, and a top-k slider."""

    def __init__(
        self,
        params: Params,
        results_dir: str | os.PathLike,
        *,
        method: str | None = None,
        compare: str | None = None,
        dataset: str | None = None,
        setup: str = "medium",
        top_k: int = 8,
        order: str = "ap_asc",
        cache: ThumbnailCache = THUMBNAILS,
    ) -> None:
        self.data = RunResults(params, results_dir)
        self.cache = cache
        found = self.data.datasets()
        if not found:
            raise FileNotFoundError(
                f"{results_dir}: no <method>/<dataset>/ranks.npy for the methods of params "
                "(run `dvc repro` or `python -m msvlad evaluate` first)"
            )
        for what, key in (("method", method), ("compare", compare)):
            if key is not None and key not in params.methods:
                raise ValueError(
                    f"{what}: {key!r} is not a method of params {list(params.methods)}"
                )
        if dataset is not None and dataset not in found:
            raise ValueError(
                f"dataset: {dataset!r} has no ranking in {results_dir} (found {found})"
            )
        if order not in QUERY_ORDERS:
            raise ValueError(f"order: expected one of {list(QUERY_ORDERS)}, got {order!r}")
        self.dataset = dataset or found[0]
        self.method, self.compare = method, compare
        self.setup, self.top_k, self.order = setup, int(top_k), order
        self.query = -1  # -1: the first query of the current order
        self.controls: dict[str, Any] = {}
        self.image: Any = None
        self.summary: Any = None
        self.shown: list[RankedList] = []
        self._widget: Any = None
        self._quiet = False
        self._normalise()

    # ---------------------------------------------------------------- state
    def setups(self) -> list[str]:
        """Setups of the current dataset's protocol."""
        protocol = self.data.dataset(self.dataset).protocol
        return ["easy", "medium", "hard"] if protocol == "revisited" else ["all"]

    def queries(self) -> pd.DataFrame:
        """The current dataset's queries in the current order (see `query_order`)."""
        per_query = self.data.per_query(self.method, self.dataset, self.setup)
        other = (
            self.data.per_query(self.compare, self.dataset, self.setup) if self.compare else None
        )
        return query_order(per_query, self.order, other)

    def select(self, **changes: Any) -> RankingsExplorer:
        """Change dataset, method, compare, setup, order, query or top_k; keeps the rest valid."""
        unknown = set(changes) - {
            "dataset",
            "method",
            "compare",
            "setup",
            "order",
            "query",
            "top_k",
        }
        if unknown:
            raise ValueError(f"select: unknown control(s) {sorted(unknown)}")
        if "dataset" in changes and changes["dataset"] not in self.data.datasets():
            raise ValueError(
                f"dataset: {changes['dataset']!r} has no ranking in {self.data.results_dir}"
            )
        if changes.get("dataset", self.dataset) != self.dataset and "query" not in changes:
            self.query = -1  # another dataset: its own first query
        for key, value in changes.items():
            setattr(self, key, value)
        self._normalise()
        return self

    def _normalise(self) -> None:
        """Make the state consistent: methods of the dataset, its setups, a valid query."""
        methods = self.data.methods(self.dataset)
        if self.method not in methods:
            self.method = methods[0]
        if self.compare not in methods or self.compare == self.method:
            self.compare = None
        setups = self.setups()
        if self.setup not in setups:
            self.setup = "medium" if "medium" in setups else setups[0]
        if self.order.startswith("gain") and self.compare is None:
            self.order = "ap_asc"
        n_q = len(self.data.dataset(self.dataset).qimlist)
        if not 0 <= int(self.query) < n_q:
            self.query = int(self.queries()["query_index"].iloc[0])
        self.top_k = max(1, min(int(self.top_k), MAX_TOP_K, len(self.data.dataset(self.dataset))))

    def view(self) -> list[RankedList]:
        """The ranked lists of the current selection: the method's, then the 2nd method's."""
        ds = self.data.dataset(self.dataset)
        out = []
        for m in [self.method] + ([self.compare] if self.compare else []):
            out.append(
                ranked_list(
                    ds,
                    self.data.ranks(m, self.dataset),
                    self.query,
                    self.top_k,
                    self.setup,
                    method=m,
                    label=self.data.label(m),
                    features=self.data.features(m, self.dataset),
                )
            )
        return out

    def figure(self) -> Figure:
        """The current selection drawn (also what papermill shows)."""
        self.shown = self.view()
        return plot_ranked_lists(self.data.dataset(self.dataset), self.shown, cache=self.cache)

    def summary_html(self) -> str:
        """Text of the current selection (AP, P@k, positives' ranks, the top-k names)."""
        return ranked_lists_html(self.view())

    # ---------------------------------------------------------------- widgets
    def widget(self) -> Any:
        """The ipywidgets box: controls on top, the figure and the text summary under them."""
        if self._widget is not None:
            return self._widget
        import ipywidgets as widgets

        wide, desc = widgets.Layout(width="360px"), {"description_width": "80px"}
        c = self.controls
        c["dataset"] = widgets.Dropdown(description="dataset", style=desc, layout=wide)
        c["method"] = widgets.Dropdown(description="method", style=desc, layout=wide)
        c["compare"] = widgets.Dropdown(description="2nd method", style=desc, layout=wide)
        c["setup"] = widgets.ToggleButtons(
            description="setup", style={**desc, "button_width": "48px"}
        )
        c["order"] = widgets.Dropdown(description="order", style=desc, layout=wide)
        c["query"] = widgets.Dropdown(
            description="query", style=desc, layout=widgets.Layout(width="520px")
        )
        c["top_k"] = widgets.IntSlider(
            description="top-k", min=1, max=MAX_TOP_K, continuous_update=False, style=desc
        )
        c["query"].add_class("msvlad-query")
        self.image = widgets.Image(format="png")
        self.summary = widgets.HTML()
        self.summary.add_class("msvlad-rankings-summary")
        self._sync_controls()
        for key, control in c.items():
            control.observe(self._on_change(key), names="value")
        rows = [
            widgets.HBox([c["dataset"], c["method"], c["compare"]]),
            widgets.HBox([c["setup"], c["top_k"]]),
            widgets.HBox([c["order"], c["query"]]),
        ]
        self._widget = widgets.VBox([*rows, self.image, self.summary])
        self._widget.add_class("msvlad-rankings")
        self.redraw()
        return self._widget

    def _on_change(self, key: str) -> Any:
        def handler(change: dict) -> None:
            if self._quiet:
                return
            value = change["new"]
            self.select(**{key: None if key == "compare" and value == "" else value})
            self._sync_controls()
            self.redraw()

        return handler

    def _sync_controls(self) -> None:
        """Options and values of every control from the state, without firing the handlers."""
        c = self.controls
        methods = self.data.methods(self.dataset)
        labels = [(_short(self.data.label(m), 44), m) for m in methods]
        orders = [
            (text, key)
            for key, text in QUERY_ORDERS.items()
            if self.compare or not key.startswith("gain")
        ]
        ordered = self.queries()
        table = ordered.head(MAX_OPTIONS)
        if self.query not in set(table["query_index"]):
            table = pd.concat([table, ordered[ordered["query_index"] == self.query]])
        self._quiet = True
        try:
            c["dataset"].options = self.data.datasets()
            c["dataset"].value = self.dataset
            c["method"].options = labels
            c["method"].value = self.method
            c["compare"].options = [("none", ""), *[x for x in labels if x[1] != self.method]]
            c["compare"].value = self.compare or ""
            c["setup"].options = [(SETUP_SHORT.get(s, s) or s, s) for s in self.setups()]
            c["setup"].value = self.setup
            c["order"].options = orders
            c["order"].value = self.order
            c["query"].options = [
                (_query_option(t), int(t.query_index)) for t in table.itertuples()
            ]
            c["query"].value = self.query
            c["top_k"].max = min(MAX_TOP_K, len(self.data.dataset(self.dataset)))
            c["top_k"].value = self.top_k
        finally:
            self._quiet = False

    def redraw(self) -> None:
        """Draw the current selection into the image and the summary."""
        fig = self.figure()
        if self.image is not None:
            self.image.value = _png(fig)
            self.summary.value = ranked_lists_html(self.shown)

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget()._repr_mimebundle_(**kwargs)


def _query_option(t: Any) -> str:
    if not np.isfinite(t.AP):
        return f"{t.query} · no positive"
    if np.isfinite(t.gain):
        return f"{t.query} · Δ {t.gain:+.1f} (AP {t.AP:.1f} vs {t.AP_b:.1f})"
    return f"{t.query} · AP {t.AP:.1f}"


def rankings_explorer(
    params: Params,
    results_dir: str | os.PathLike,
    *,
    method: str | None = None,
    compare: str | None = None,
    dataset: str | None = None,
    setup: str = "medium",
    top_k: int = 8,
    order: str = "ap_asc",
    interactive: bool | None = None,
) -> Any:
    """The rankings explorer: widgets in JupyterLab, else (papermill) the figure of its first view.

    interactive None decides by `interactive_session()`; the first view is the method's query
    with the lowest AP, ranked by `method` and by `compare` under it.
    """
    explorer = RankingsExplorer(
        params,
        results_dir,
        method=method,
        compare=compare,
        dataset=dataset,
        setup=setup,
        top_k=top_k,
        order=order,
    )
    if interactive_session() if interactive is None else interactive:
        return explorer
    return explorer.figure()


# --------------------------------------------------------------------------------------------
# Triplets
# --------------------------------------------------------------------------------------------


def plot_triplet_neighbors(
    train_root: str | os.PathLike,
    triplet: pd.Series,
    neighbors: pd.DataFrame,
    stats: pd.DataFrame,
    *,
    margin: float,
    delta: float,
    cache: ThumbnailCache = THUMBNAILS,
    title: str | None = None,
    recorded: bool = True,
) -> Figure:
    """A mined triplet and why: the anchor's ranked pool neighbours, a distance axis, the round.

    Top: anchor / positive / negative, and the round's yield and kind mix among all rounds. Middle:
    the anchor's top neighbours in that round's pool (green: anchor's class, red: other class),
    rank and squared distance d2 = 2 - 2 cos. Bottom: the same neighbours on a d2 axis with the
    chosen positive (P) and negative (N) and the band of negatives whose predicted loss
    m + d2(a, p) - d2(a, n) lies in m ± delta, i.e. d2(a, n) in d2(a, p) ± delta.
    """
    train_root = Path(train_root)
    k = max(len(neighbors), 6)
    fig = Figure(figsize=(max(11.0, 1.25 * k), 8.2), layout="constrained")
    top, middle, bottom = fig.subfigures(3, 1, height_ratios=[1.25, 1.0, 0.8])
    left, right = top.subfigures(1, 2, width_ratios=[1.0, 1.2])
    d2p = max(0.0, 2.0 - 2.0 * float(triplet["pos_sim"]))
    d2n = max(0.0, 2.0 - 2.0 * float(triplet["neg_sim"]))
    ax_a, ax_p, ax_n = left.subplots(1, 3)
    _show(
        ax_a,
        cache.get(train_root / str(triplet["anchor"])),
        COLORS["query"],
        f"anchor · {_short(str(triplet['anchor_label']), 18)}\n"
        f"round {int(triplet['round'])} · {triplet['kind']}",
    )
    _show(
        ax_p,
        cache.get(train_root / str(triplet["positive"])),
        COLORS["positive"],
        f"positive · rank {int(triplet['pos_rank'])}\nd2 {d2p:.3f}",
    )
    _show(
        ax_n,
        cache.get(train_root / str(triplet["negative"])),
        COLORS["negative"],
        f"neg · {_short(str(triplet['negative_label']), 14)} · rank {int(triplet['neg_rank'])}\n"
        f"d2 {d2n:.3f} · loss {float(triplet['loss']):.3f}",
    )
    _round_panels(right, stats, int(triplet["round"]))
    axes = np.atleast_1d(middle.subplots(1, k))
    for j, ax in enumerate(axes):
        if j >= len(neighbors):
            ax.set_axis_off()
            continue
        nb = neighbors.iloc[j]
        color = COLORS["positive"] if nb["same_class"] else COLORS["negative"]
        tag = {"positive": "P · ", "negative": "N · "}.get(nb["role"], "")
        _show(
            ax,
            cache.get(train_root / str(nb["neighbor"])),
            color,
            f"{tag}#{int(nb['rank'])} {_short(str(nb['label']), 12)}\nd2 {nb['d2']:.3f}",
        )
        if nb["role"]:
            for spine in ax.spines.values():
                spine.set_linewidth(7.0)
    if neighbors.empty:
        middle.text(
            0.5,
            0.5,
            "neighbours not recorded for this run (neighbors.csv is written by training)"
            if not recorded
            else "no neighbours recorded for this anchor",
            ha="center",
            va="center",
            fontsize=10,
        )
    else:
        middle.suptitle(
            f"the anchor's top {len(neighbors)} neighbours in round {int(triplet['round'])}'s pool",
            fontsize=9,
        )
    _distance_axis(bottom.subplots(), neighbors, d2p, d2n, margin, delta)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def _round_panels(sub: Any, stats: pd.DataFrame, chosen: int) -> None:
    """Yield per round and kind mix per round, the chosen round highlighted."""
    ax_yield, ax_mix = sub.subplots(2, 1, sharex=True)
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
        if r["triplets"] > 0:
            text += f", {100 * r['hard'] / r['triplets']:.0f}% hard"
    ax_yield.set(ylabel="triplets", title=text)
    ax_yield.title.set_fontsize(9)
    bottom = np.zeros(len(x))
    for kind, col in (("semi-hard", "semi_hard_frac"), ("hard", "hard_frac")):
        values = stats[col].fillna(0.0).to_numpy(dtype=float)
        ax_mix.bar(x, values, bottom=bottom, color=KIND_COLORS[kind], width=0.85, label=kind)
        bottom += values
    ax_mix.bar([chosen], [1.0], fill=False, edgecolor="black", linewidth=1.5, width=0.85)
    ax_mix.set(xlabel="mining round", ylabel="kind mix", ylim=(0, 1.05))
    ax_mix.legend(fontsize=7, loc="lower right")


def _distance_axis(
    ax: Any, neighbors: pd.DataFrame, d2p: float, d2n: float, margin: float, delta: float
) -> None:
    """Neighbours, the chosen positive/negative and the m ± delta band on a d2 axis."""
    ax.axvspan(d2p - delta, d2p + delta, color="#f2c14e", alpha=0.35, lw=0)
    ax.axvline(d2p + margin, color="black", ls=":", lw=1)
    ax.text(d2p + margin, 1.02, " d2(a,p) + m", fontsize=7, va="bottom")
    for nb in neighbors.itertuples(index=False):
        color = COLORS["positive"] if nb.same_class else COLORS["negative"]
        ax.plot([nb.d2], [0.5], "o", color=color, ms=7, alpha=0.8)
        ax.annotate(
            str(nb.rank),
            (nb.d2, 0.5),
            xytext=(0, 7),
            textcoords="offset points",
            ha="center",
            fontsize=7,
        )
    ax.plot([d2p], [0.2], "^", color=COLORS["positive"], ms=12, mec="black")
    ax.annotate("P", (d2p, 0.2), xytext=(0, -14), textcoords="offset points", ha="center")
    ax.plot([d2n], [0.2], "v", color=COLORS["negative"], ms=12, mec="black")
    ax.annotate("N", (d2n, 0.2), xytext=(0, -14), textcoords="offset points", ha="center")
    xs = [d2p - delta, d2p + delta + margin, d2n, *neighbors["d2"].astype(float).tolist()]
    lo, hi = min(xs), max(xs)
    pad = 0.08 * (hi - lo) + 1e-3
    ax.set(xlim=(lo - pad, hi + pad), ylim=(-0.15, 1.0), yticks=[])
    ax.set_xlabel("squared distance to the anchor, d2 = 2 − 2 cos", fontsize=8)
    ax.legend(
        handles=[
            Patch(
                color="#f2c14e",
                alpha=0.5,
                label=f"negatives kept: loss in m ± δ ({margin - delta:.2f}–{margin + delta:.2f})",
            ),
            Patch(color=COLORS["positive"], label="anchor's class"),
            Patch(color=COLORS["negative"], label="other class"),
        ],
        fontsize=7,
        loc="upper left",
        ncols=3,
        frameon=False,
    )


def triplet_html(triplet: pd.Series, neighbors: pd.DataFrame, margin: float, delta: float) -> str:
    """The chosen triplet as text: kind, predicted loss and band, positive, negative, neighbours."""
    d2p = max(0.0, 2.0 - 2.0 * float(triplet["pos_sim"]))
    d2n = max(0.0, 2.0 - 2.0 * float(triplet["neg_sim"]))
    e = html.escape
    lines = [
        f"<div class='msvlad-triplet'><b>round {int(triplet['round'])}</b> · anchor "
        f"<b>{e(str(triplet['anchor']))}</b> ({e(str(triplet['anchor_label']))}) · "
        f"{e(str(triplet['kind']))} · predicted loss {float(triplet['loss']):.4f} "
        f"(band {margin - delta:.3f}–{margin + delta:.3f})",
        f"<br>positive {e(str(triplet['positive']))}: rank {int(triplet['pos_rank'])}, "
        f"cos {float(triplet['pos_sim']):.4f}, d2 {d2p:.4f}",
        f"<br>negative {e(str(triplet['negative']))} ({e(str(triplet['negative_label']))}): "
        f"rank {int(triplet['neg_rank'])}, cos {float(triplet['neg_sim']):.4f}, d2 {d2n:.4f}",
    ]
    if len(neighbors):
        items = " ".join(
            f"#{nb.rank}&nbsp;{e(str(nb.neighbor))}{'✓' if nb.same_class else '✗'}"
            + (f"({nb.role[0].upper()})" if nb.role else "")
            for nb in neighbors.itertuples(index=False)
        )
        lines.append(f"<br><span style='font-size:85%'>neighbours: {items}</span>")
    return "".join(lines) + "</div>"


class TripletExplorer:
    """Filters for method, round, anchor class, kind and predicted-loss range; a triplet menu."""

    def __init__(
        self,
        params: Params,
        runs_dir: str | os.PathLike,
        *,
        method: str | None = None,
        sort: str = "loss_desc",
        cache: ThumbnailCache = THUMBNAILS,
    ) -> None:
        self.params = params
        self.runs_dir = Path(runs_dir)
        self.cache = cache
        self.methods = [
            m
            for m, cfg in params.methods.items()
            if cfg.miner is not None
            and (paths.run_dir(m, self.runs_dir) / paths.TRIPLETS).is_file()
        ]
        if not self.methods:
            raise FileNotFoundError(
                f"{self.runs_dir}: no <method>/train/triplets.csv for the trained methods of params"
            )
        if method is not None and method not in self.methods:
            raise ValueError(
                f"method: {method!r} has no {self.runs_dir}/{method}/train/triplets.csv "
                f"(trained methods with one: {self.methods})"
            )
        self.method = method or self.methods[0]
        self.round: int | None = None
        self.label: str | None = None
        self.kind: str | None = None
        self.loss: tuple[float, float] | None = None
        self.sort = sort
        self.triplet = -1  # row of triplets.csv; -1: the first one of the current filters
        self.controls: dict[str, Any] = {}
        self.image: Any = None
        self.summary: Any = None
        self.shown: pd.Series | None = None
        self.shown_neighbors = pd.DataFrame()
        self._runs: dict[str, dict[str, Any]] = {}
        self._widget: Any = None
        self._quiet = False
        self._normalise()

    # ---------------------------------------------------------------- state
    def run(self, method: str | None = None) -> dict[str, Any]:
        """The method's logs: triplets, per-round stats and neighbours (None if not recorded)."""
        method = method or self.method
        if method not in self._runs:
            run_dir = paths.run_dir(method, self.runs_dir)
            self._runs[method] = {
                "triplets": runs.load_triplets(run_dir),
                "stats": runs.miner_stats(run_dir),
                "neighbors": runs.load_neighbors(run_dir),
            }
        return self._runs[method]

    def candidates(self) -> pd.DataFrame:
        """Triplets passing the filters, in the chosen sort (`runs.filter_triplets`)."""
        return runs.filter_triplets(
            self.run()["triplets"],
            round_index=self.round,
            label=self.label,
            kind=self.kind,
            loss=self.loss,
            sort=self.sort,
        )

    def select(self, **changes: Any) -> TripletExplorer:
        """Change any of method, round, label, kind, loss, sort, triplet; keeps the rest valid."""
        unknown = set(changes) - {"method", "round", "label", "kind", "loss", "sort", "triplet"}
        if unknown:
            raise ValueError(f"select: unknown control(s) {sorted(unknown)}")
        if "method" in changes and changes["method"] not in self.methods:
            raise ValueError(f"method: {changes['method']!r} is not one of {self.methods}")
        if changes.get("method", self.method) != self.method:
            self.loss = None  # another run: its own loss range
        for key, value in changes.items():
            setattr(self, key, value)
        self._normalise()
        return self

    def _normalise(self) -> None:
        trip = self.run()["triplets"]
        if self.loss is not None and len(trip):
            lo, hi = self.loss_range()
            self.loss = (max(lo, float(self.loss[0])), min(hi, float(self.loss[1])))
        chosen = self.candidates()
        if self.triplet not in set(chosen["mined"]):
            self.triplet = int(chosen["mined"].iloc[0]) if len(chosen) else -1

    def loss_range(self) -> tuple[float, float]:
        """Smallest and largest predicted loss of the method's triplets."""
        loss = self.run()["triplets"]["loss"].astype(float)
        return (float(loss.min()), float(loss.max())) if len(loss) else (0.0, 0.0)

    def chosen(self) -> pd.Series | None:
        """The selected triplet (a triplets.csv row), None when the filters leave none."""
        trip = self.run()["triplets"]
        return None if self.triplet < 0 else trip.iloc[self.triplet]

    def figure(self) -> Figure:
        """The selected triplet drawn (also what papermill shows)."""
        triplet = self.chosen()
        label = self.params.methods[self.method].label
        self.shown = triplet
        if triplet is None:
            self.shown_neighbors = pd.DataFrame()
            return _message_figure("no triplet passes the filters", label)
        recorded = self.run()["neighbors"]
        self.shown_neighbors = runs.triplet_neighbors(recorded, triplet)
        run = method_params(self.params, self.method)  # the run's own miner settings
        m = run.miner
        return plot_triplet_neighbors(
            paths.resolve(run.data.root) / run.data.train_set,
            triplet,
            self.shown_neighbors,
            self.run()["stats"],
            margin=m.margin,
            delta=m.delta,
            cache=self.cache,
            title=label,
            recorded=recorded is not None,
        )

    def summary_html(self) -> str:
        """Text of the selected triplet and its neighbours."""
        triplet = self.chosen()
        if triplet is None:
            return "<div class='msvlad-triplet'>no triplet passes the filters</div>"
        m = method_params(self.params, self.method).miner
        n = len(self.candidates())
        head = f"<div>{n} triplet{'s' if n != 1 else ''} pass the filters</div>"
        neighbors = runs.triplet_neighbors(self.run()["neighbors"], triplet)
        return head + triplet_html(triplet, neighbors, m.margin, m.delta)

    # ---------------------------------------------------------------- widgets
    def widget(self) -> Any:
        """The ipywidgets box: filters on top, the figure and the text summary under them."""
        if self._widget is not None:
            return self._widget
        import ipywidgets as widgets

        desc = {"description_width": "60px"}
        wide = widgets.Layout(width="300px")
        c = self.controls
        c["method"] = widgets.Dropdown(
            description="method", style=desc, layout=widgets.Layout(width="400px")
        )
        c["round"] = widgets.Dropdown(
            description="round", style=desc, layout=widgets.Layout(width="180px")
        )
        c["label"] = widgets.Dropdown(description="class", style=desc, layout=wide)
        c["kind"] = widgets.ToggleButtons(
            description="kind", style={**desc, "button_width": "96px"}
        )
        c["loss"] = widgets.FloatRangeSlider(
            description="loss",
            continuous_update=False,
            readout_format=".3f",
            style=desc,
            layout=widgets.Layout(width="420px"),
        )
        c["sort"] = widgets.Dropdown(description="sort", style=desc, layout=wide)
        c["triplet"] = widgets.Dropdown(
            description="triplet", style=desc, layout=widgets.Layout(width="620px")
        )
        c["triplet"].add_class("msvlad-triplet-menu")
        self.image = widgets.Image(format="png")
        self.summary = widgets.HTML()
        self.summary.add_class("msvlad-triplet-summary")
        self._sync_controls()
        for key, control in c.items():
            control.observe(self._on_change(key), names="value")
        self._widget = widgets.VBox(
            [
                widgets.HBox([c["method"], c["round"], c["label"]]),
                widgets.HBox([c["kind"], c["loss"]]),
                widgets.HBox([c["sort"], c["triplet"]]),
                self.image,
                self.summary,
            ]
        )
        self._widget.add_class("msvlad-triplets")
        self.redraw()
        return self._widget

    def _on_change(self, key: str) -> Any:
        def handler(change: dict) -> None:
            if self._quiet:
                return
            value = change["new"]
            if key in ("round", "label", "kind") and value == "all":
                value = None
            if key == "loss":
                value = tuple(float(v) for v in value)
            self.select(**{key: value})
            self._sync_controls()
            self.redraw()

        return handler

    def _sync_controls(self) -> None:
        c = self.controls
        trip = self.run()["triplets"]
        rounds = sorted(int(r) for r in pd.unique(trip["round"])) if len(trip) else []
        labels = sorted(str(v) for v in pd.unique(trip["anchor_label"])) if len(trip) else []
        kinds = [k for k in KIND_COLORS if k in set(trip["kind"])] + sorted(
            str(k) for k in set(trip["kind"]) - set(KIND_COLORS)
        )
        lo, hi = self.loss_range()
        chosen = self.candidates()
        menu = chosen.head(MAX_OPTIONS)
        options = [
            (
                f"r{t.round} · {_short(str(t.anchor), 40)} · {t.kind} · loss {t.loss:.4f}",
                int(t.mined),
            )
            for t in menu.itertuples(index=False)
        ]
        if len(chosen) > MAX_OPTIONS:
            options.append((f"… {len(chosen) - MAX_OPTIONS} more: narrow the filters", -2))
        self._quiet = True
        try:
            c["method"].options = [
                (_short(self.params.methods[m].label, 40), m) for m in self.methods
            ]
            c["method"].value = self.method
            c["round"].options = ["all", *rounds]
            c["round"].value = "all" if self.round is None else self.round
            c["label"].options = ["all", *labels]
            c["label"].value = "all" if self.label is None else self.label
            c["kind"].options = ["all", *kinds]
            c["kind"].value = "all" if self.kind is None else self.kind
            c["loss"].min, c["loss"].max = -1e9, 1e9  # widen first: min/max/value stay ordered
            c["loss"].min, c["loss"].max = lo, hi if hi > lo else lo + 1e-6
            c["loss"].step = max((hi - lo) / 200, 1e-6)
            c["loss"].value = self.loss if self.loss is not None else (lo, c["loss"].max)
            c["sort"].options = [(text, key) for key, text in runs.TRIPLET_SORTS.items()]
            c["sort"].value = self.sort
            c["triplet"].options = options or [("no triplet passes the filters", -1)]
            c["triplet"].value = self.triplet if options else -1
        finally:
            self._quiet = False

    def redraw(self) -> None:
        """Draw the selected triplet into the image and the summary."""
        fig = self.figure()
        if self.image is not None:
            self.image.value = _png(fig)
            self.summary.value = self.summary_html()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget()._repr_mimebundle_(**kwargs)


def triplet_explorer(
    params: Params,
    runs_dir: str | os.PathLike,
    *,
    method: str | None = None,
    interactive: bool | None = None,
) -> Any:
    """The triplet explorer: widgets in JupyterLab, else (papermill) its first view as a figure.

    interactive None decides by `interactive_session()`; the first view is the triplet with the
    highest predicted loss of the whole run.
    """
    explorer = TripletExplorer(params, runs_dir, method=method)
    if interactive_session() if interactive is None else interactive:
        return explorer
    return explorer.figure()
