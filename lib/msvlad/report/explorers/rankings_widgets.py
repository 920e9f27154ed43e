"""The rankings explorer's ipywidgets: controls, clickable result tiles, query panel and map.

Result tiles wrap onto as many rows as the top-k needs (each tile keeps its size); a tile's
button makes that database image the query. The map and the per-positive table redraw with the
ranked lists, so the three always show the same selection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pandas as pd

from msvlad.report.drawing import COLORS, shorten
from msvlad.report.explorers.base import MAX_OPTIONS, png
from msvlad.report.explorers.data import VARIANT_LABELS
from msvlad.report.explorers.ranking import FAILURES, MAX_TOP_K, QUERY_ORDERS, RankedList
from msvlad.report.explorers.rankings_view import (
    MAP_COLOURS,
    item_caption,
    item_jpeg,
    list_title,
    positive_table_html,
    query_jpeg,
    ranked_lists_html,
    scores_text,
)
from msvlad.report.tables import SETUP_SHORT

if TYPE_CHECKING:
    from msvlad.report.explorers.rankings import RankingsExplorer

TILE_PX = 150  # shown size of a result tile (thumbnails are never shrunk to fit a long list)


class TileGrid:
    """A wrapping row of result tiles (image + caption button), reused from redraw to redraw."""

    def __init__(self, widgets: Any, on_click: Callable[[int], Any]) -> None:
        self.widgets = widgets
        self.on_click = on_click
        self.box = widgets.Box(layout=widgets.Layout(display="flex", flex_flow="row wrap"))
        self.box.add_class("msvlad-tiles")
        self.tiles: list[Any] = []
        self.indices: list[int] = []  # the database image each tile shows

    def _tile(self, slot: int) -> Any:
        w = self.widgets
        image = w.Image(
            format="jpeg",
            layout=w.Layout(width=f"{TILE_PX}px", height=f"{TILE_PX}px", object_fit="contain"),
        )
        button = w.Button(layout=w.Layout(width=f"{TILE_PX}px", height="auto"))
        button.add_class("msvlad-tile-button")
        button.on_click(lambda _b: self.on_click(self.indices[slot]))
        tile = w.VBox([image, button], layout=w.Layout(margin="3px", padding="2px"))
        tile.add_class("msvlad-tile")
        return tile

    def show(self, items: pd.DataFrame, images: list[bytes]) -> None:
        """One tile per row of `items` (bordered by relevance, captioned by rank and kind)."""
        while len(self.tiles) < len(items):
            self.indices.append(-1)
            self.tiles.append(self._tile(len(self.tiles)))
        self.indices[: len(items)] = [int(i) for i in items["db_index"]]
        for tile, item, jpeg in zip(
            self.tiles, items.itertuples(index=False), images, strict=False
        ):
            image, button = tile.children
            image.value = jpeg
            button.description = item_caption(item)
            button.tooltip = f"{item.image or 'distractor'}: click to make it the query"
            tile.layout.border = f"4px solid {COLORS[item.relevance]}"
        self.box.children = tuple(self.tiles[: len(items)])


class RankingsWidgets:
    """Builds, syncs and draws the rankings explorer's widgets from its state."""

    def __init__(self, ex: RankingsExplorer, widgets: Any) -> None:
        self.ex, self.w = ex, widgets
        desc, wide = {"description_width": "80px"}, widgets.Layout(width="360px")
        c = ex.controls
        for key, text in (("dataset", "dataset"), ("method", "method"), ("compare", "2nd method"),
                          ("variant", "descriptor"), ("order", "order"), ("failure", "show"),
                          ("colour", "map colour")):  # fmt: skip
            c[key] = widgets.Dropdown(description=text, style=desc, layout=wide)
        c["setup"] = widgets.ToggleButtons(
            description="setup", style={**desc, "button_width": "48px"}
        )
        c["top_k"] = widgets.IntSlider(
            description="top-k", min=1, continuous_update=False, style=desc
        )
        c["query"] = widgets.Dropdown(
            description="query", style=desc, layout=widgets.Layout(width="560px")
        )
        c["query"].add_class("msvlad-query")
        c["back"] = widgets.Button(description="◀ back", tooltip="the previous query")
        c["back"].on_click(lambda _b: ex._guarded(ex.back))
        c["export"] = widgets.Button(
            description="export PNG + CSV", icon="download", layout=widgets.Layout(width="190px")
        )
        c["export"].on_click(lambda _b: self.export())
        c["export"].add_class("msvlad-export")
        for key, control in c.items():
            control.add_class(f"msvlad-control-{key}")  # what a browser test or a theme finds
        self.title = widgets.HTML()
        self.query_image = widgets.Image(format="jpeg", layout=widgets.Layout(width="300px"))
        self.query_image.add_class("msvlad-query-image")
        self.map = widgets.Image(format="png", layout=widgets.Layout(width="600px"))
        self.map.add_class("msvlad-map")
        self.heads = [widgets.HTML(), widgets.HTML()]
        self.grids = [TileGrid(widgets, ex.click), TileGrid(widgets, ex.click)]
        self.positives = widgets.HTML()
        self.positives.add_class("msvlad-positives-table")
        self.summary = widgets.HTML()
        self.summary.add_class("msvlad-rankings-summary")
        self.lists = widgets.VBox()

    def children(self) -> list[Any]:
        """The box's rows: controls first, the view last."""
        w, c = self.w, self.ex.controls
        view = w.VBox(
            [
                self.title,
                w.HBox([self.query_image, self.map]),
                self.lists,
                self.positives,
                self.summary,
            ]
        )
        return [
            w.HBox([c["dataset"], c["method"], c["compare"]]),
            w.HBox([c["variant"], c["setup"], c["top_k"]]),
            w.HBox([c["order"], c["failure"], c["colour"]]),
            w.HBox([c["query"], c["back"], c["export"]]),
            view,
        ]

    def sync(self) -> None:
        """Options and values of every control from the explorer's state."""
        ex, c = self.ex, self.ex.controls
        labels = [(shorten(ex.data.label(m), 44), m) for m in ex.data.methods(ex.dataset)]
        c["dataset"].options = ex.data.datasets()
        c["dataset"].value = ex.dataset
        c["method"].options = labels
        c["method"].value = ex.method
        c["compare"].options = [("none", ""), *[x for x in labels if x[1] != ex.method]]
        c["compare"].value = ex.compare or ""
        c["variant"].options = [(VARIANT_LABELS[v], v) for v in ex.variants()]
        c["variant"].value = ex.variant
        c["setup"].options = [(SETUP_SHORT.get(s, s) or s, s) for s in ex.setups()]
        c["setup"].value = ex.setup
        c["order"].options = [
            (t, k) for k, t in QUERY_ORDERS.items() if ex.compare or not k.startswith("gain")
        ]
        c["order"].value = ex.order
        c["failure"].options = [(t, k) for k, t in FAILURES.items()]
        c["failure"].value = ex.failure
        c["colour"].options = list(MAP_COLOURS)
        c["colour"].value = ex.colour
        c["query"].options = self.query_options()
        c["query"].value = -1 - ex.clicked if ex.clicked is not None else ex.query
        c["top_k"].max = min(MAX_TOP_K, len(ex.data.dataset(ex.dataset)))
        c["top_k"].value = ex.top_k
        c["back"].disabled = not ex.history

    def query_options(self) -> list[tuple[str, int]]:
        """The query menu: the filtered queries in order, the current one always among them."""
        ex = self.ex
        ordered = ex.queries()
        table = ordered.head(MAX_OPTIONS)
        options = [(_query_option(t), int(t.query_index)) for t in table.itertuples()]
        if ex.query not in set(table["query_index"]):
            per_query = ex.data.per_query(ex.method, ex.dataset, ex.setup, ex.variant)
            row = per_query[per_query["query_index"] == ex.query]
            name = str(row["query"].iloc[0]) if len(row) else str(ex.query)
            options.append((f"{name} · not of the chosen kind", int(ex.query)))
        if ex.clicked is not None:
            name = ex.data.dataset(ex.dataset).imlist[ex.clicked]
            options.insert(0, (f"clicked: {name} (a database image)", -1 - int(ex.clicked)))
        return options

    def export(self) -> bool:
        """The export button: write the view's PNG + CSV and say where, in the status line."""

        def run() -> None:
            written = self.ex.export()
            self.ex.status.value = "exported " + ", ".join(f"<code>{p}</code>" for p in written)

        return self.ex._guarded(run, redraw=False)

    def draw(self) -> None:
        """Tiles, query panel, map, per-positive table and text of the explorer's `shown` lists."""
        ex = self.ex
        lists: list[RankedList] = ex.shown
        ds = ex.data.dataset(ex.dataset)
        self.title.value = f"<b>{list_title(ds, lists[0])}</b>"
        self.query_image.value = query_jpeg(ds, lists[0], ex.cache)
        rows = []
        for head, grid, rl in zip(self.heads, self.grids, lists, strict=False):
            head.value = f"<b>{rl.label}</b>: {scores_text(rl)} · {rl.num_positives} positives"
            images = [item_jpeg(ds, item, ex.cache) for item in rl.items.itertuples(index=False)]
            grid.show(rl.items, images)
            rows += [head, grid.box]
        self.lists.children = tuple(rows)
        fig = ex.map_figure()
        self.map.value = png(fig) if fig is not None else b""
        self.map.layout.display = None if fig is not None else "none"
        self.positives.value = positive_table_html(ex.positive_table(), ex.top_k)
        self.summary.value = ranked_lists_html(lists)


def _query_option(t: Any) -> str:
    if not pd.notna(t.AP):
        return f"{t.query} · no positive"
    if pd.notna(t.gain):
        return f"{t.query} · Δ {t.gain:+.1f} (AP {t.AP:.1f} vs {t.AP_b:.1f})"
    return f"{t.query} · AP {t.AP:.1f}"
