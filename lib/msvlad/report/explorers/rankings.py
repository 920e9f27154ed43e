"""The rankings explorer: one query's ranked lists under two methods, a map, filters and export.

State (`select(...)`): dataset, method, 2nd method, descriptor variant (as evaluated / +raw /
+QE / +DBA), setup, query order, failure filter, query (or a clicked database image), top-k and
the map colouring. `figure()` draws it statically (papermill, export); `widget()` shows it with
clickable result tiles (a click makes that image the query), the linked embedding map and the
per-positive rank table (`rankings_widgets`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

import msvlad.report.explorers.rankings_widgets as rankings_widgets
from msvlad import paths
from msvlad.config import Params
from msvlad.report.explorers.base import THUMBNAILS, ExplorerBase, ThumbnailCache
from msvlad.report.explorers.data import VARIANT_LABELS, RunResults
from msvlad.report.explorers.ranking import (
    FAILURES,
    MAX_TOP_K,
    QUERY_ORDERS,
    RankedList,
    failures,
    positive_table,
    query_order,
    ranked_list,
)
from msvlad.report.explorers.rankings_view import (
    MAP_COLOURS,
    export_files,
    plot_embedding_map,
    plot_ranked_lists,
)

CHOICES = {
    "order": QUERY_ORDERS,
    "failure": FAILURES,
    "variant": VARIANT_LABELS,
    "colour": MAP_COLOURS,
}
EXPORT_DIR = paths.ROOT / "exports"  # git- and DVC-ignored


class RankingsExplorer(ExplorerBase):
    """Menus for dataset, methods, variant, setup, order, failure type and query; top-k; map."""

    STATE = (
        "dataset", "method", "compare", "variant", "setup", "order", "failure", "query",
        "clicked", "top_k", "colour", "history",
    )  # fmt: skip
    CSS_CLASS = "msvlad-rankings"

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
        variant: str = "plain",
        cache: ThumbnailCache = THUMBNAILS,
        export_dir: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        self.data = RunResults(params, results_dir)
        self.cache = cache
        self.export_dir = Path(export_dir) if export_dir is not None else EXPORT_DIR
        found = self.data.datasets()
        if not found:
            raise FileNotFoundError(
                f"{results_dir}: no <method>/<dataset>/ranks.npy for the methods of params "
                "(run `dvc repro` or `python -m msvlad evaluate` first)"
            )
        chosen = dict(method=method, compare=compare, dataset=dataset, order=order, variant=variant)
        self._check(chosen)
        self.dataset = dataset or found[0]
        self.method, self.compare, self.variant = method, compare, variant
        self.setup, self.top_k, self.order = setup, int(top_k), order
        self.failure, self.colour = "all", "landmark"
        self.query = -1  # -1: the first query of the current order
        self.clicked: int | None = None  # a database image clicked to be the query
        self.history: tuple[tuple[int, int | None], ...] = ()
        self.shown: list[RankedList] = []
        self.view_widgets: rankings_widgets.RankingsWidgets | None = None
        self._normalise()

    # ---------------------------------------------------------------- state
    def setups(self) -> list[str]:
        """Setups of the current dataset's protocol."""
        protocol = self.data.dataset(self.dataset).protocol
        return ["easy", "medium", "hard"] if protocol == "revisited" else ["all"]

    def variants(self) -> list[str]:
        """Descriptor variants the current method can be ranked with."""
        return self.data.variants(self.method, self.dataset)

    def queries(self) -> pd.DataFrame:
        """The dataset's queries passing the failure filter, in the current order."""
        per_query = self.data.per_query(self.method, self.dataset, self.setup, self.variant)
        other = None
        if self.compare:
            v = (
                self.variant
                if self.variant in self.data.variants(self.compare, self.dataset)
                else "plain"
            )
            other = self.data.per_query(self.compare, self.dataset, self.setup, v)
        ordered = query_order(per_query, self.order, other)
        if self.failure == "all":
            return ordered
        flags = self.failure_flags()
        keep = set(flags.loc[flags[self.failure], "query_index"].tolist())
        return ordered[ordered["query_index"].isin(keep)].reset_index(drop=True)

    def failure_flags(self) -> pd.DataFrame:
        """Per query of the method's ranking: a positive beyond rank k, junk/negative first."""
        key = ("failures", self.method, self.dataset, self.variant, self.setup, self.top_k)
        ds, ranks = (
            self.data.dataset(self.dataset),
            self.data.ranks(self.method, self.dataset, self.variant),
        )
        return self.data._memo(
            key,
            lambda: failures(
                ranks,
                lambda q: self.data.truth(self.dataset, self.setup, q),
                len(ds.qimlist),
                self.top_k,
            ),
        )

    def select(self, **changes: Any) -> RankingsExplorer:
        """Change any of the state's controls (see STATE); keeps the rest valid."""
        unknown = set(changes) - set(self.STATE)
        if unknown:
            raise ValueError(f"select: unknown control(s) {sorted(unknown)}")
        self._check(changes)
        moves = {"query", "clicked", "dataset"} & set(changes)
        if moves and "history" not in changes:
            self.history = (*self.history, (self.query, self.clicked))[-50:]
        if changes.get("dataset", self.dataset) != self.dataset:
            self.query, self.clicked, self.history = -1, None, ()
        if "query" in changes and "clicked" not in changes:
            self.clicked = None
        if changes.get("order", self.order) != self.order and "query" not in changes:
            self.query, self.clicked = -1, None  # another order: its first query
        for key, value in changes.items():
            setattr(self, key, value)
        self._normalise(keep_query="query" in changes)
        return self

    def _check(self, changes: dict[str, Any]) -> None:
        """A one-line error for a control value that does not exist (None: unset, allowed)."""
        for key in ("method", "compare"):
            if changes.get(key) and changes[key] not in self.data.params.methods:
                methods = list(self.data.params.methods)
                raise ValueError(f"{key}: {changes[key]!r} is not a method of params {methods}")
        found = self.data.datasets()
        if changes.get("dataset") is not None and changes["dataset"] not in found:
            where = self.data.results_dir
            raise ValueError(f"dataset: {changes['dataset']!r} has no ranking in {where} ({found})")
        for key, choices in CHOICES.items():
            if key in changes and changes[key] not in choices:
                raise ValueError(f"{key}: expected one of {list(choices)}, got {changes[key]!r}")

    def back(self) -> RankingsExplorer:
        """Return to the query shown before the last query change (a click or a menu pick)."""
        if self.history:
            (query, clicked), rest = self.history[-1], self.history[:-1]
            self.select(query=query, clicked=clicked, history=rest)
        return self

    def _normalise(self, keep_query: bool = False) -> None:
        """Make the state consistent: methods of the dataset, its setups, a valid query.

        A query the filters leave out gives way to their first one, unless it was just chosen.
        """
        methods = self.data.methods(self.dataset)
        if self.method not in methods:
            self.method = methods[0]
        if self.compare not in methods or self.compare == self.method:
            self.compare = None
        if self.variant not in self.variants():
            self.variant = "plain"
        if self.setup not in self.setups():
            self.setup = "medium" if "medium" in self.setups() else self.setups()[0]
        if self.order.startswith("gain") and self.compare is None:
            self.order = "ap_asc"
        ds = self.data.dataset(self.dataset)
        self.top_k = max(1, min(int(self.top_k), MAX_TOP_K, len(ds)))
        if self.clicked is not None and not 0 <= int(self.clicked) < len(ds.imlist):
            raise ValueError(f"clicked: {self.clicked} is not a database image of {self.dataset}")
        listed = self.queries()["query_index"]
        if not 0 <= int(self.query) < len(ds.qimlist):
            self.query = int(listed.iloc[0]) if len(listed) else 0
        elif not keep_query and len(listed) and self.query not in set(listed):
            self.query = int(listed.iloc[0])

    # ---------------------------------------------------------------- view
    def view(self) -> list[RankedList]:
        """The ranked lists of the current selection: the method's, then the 2nd method's."""
        ds = self.data.dataset(self.dataset)
        from_db = self.clicked is not None
        index = int(self.clicked) if from_db else int(self.query)
        truth = self.data.truth(self.dataset, self.setup, index, from_db)
        out = []
        for m in [self.method] + ([self.compare] if self.compare else []):
            v = self.variant if self.variant in self.data.variants(m, self.dataset) else "plain"
            if from_db:
                column, sims = self.data.db_ranking(m, self.dataset, v, index)
            else:
                column = self.data.ranks(m, self.dataset, v)[:, index]
                sims = self.data.query_sims(m, self.dataset, v, index)
            suffix = "" if v == "plain" else " " + VARIANT_LABELS[v]
            out.append(
                ranked_list(
                    ds,
                    column,
                    truth,
                    self.top_k,
                    method=m,
                    label=self.data.label(m) + suffix,
                    variant=v,
                    query_index=index,
                    sims=sims,
                )  # fmt: skip
            )
        return out

    def figure(self) -> Figure:
        """The current selection drawn (what papermill shows and an export writes)."""
        self.shown = self.view()
        return plot_ranked_lists(self.data.dataset(self.dataset), self.shown, cache=self.cache)

    def map_figure(self) -> Figure | None:
        """The embedding map of the current selection (None without features.npz)."""
        lists = self.shown or self.view()
        coords = self.data.embedding(lists[0].method, self.dataset, lists[0].variant)
        if coords is None:
            return None
        db_xy, q_xy = coords
        point = db_xy[lists[0].query_index] if lists[0].from_db else q_xy[lists[0].query_index]
        marks = self.data.landmarks(self.dataset)
        return plot_embedding_map(db_xy, point, lists[0], marks, self.colour)

    def positive_table(self) -> pd.DataFrame:
        """Every positive of the query with its rank under each shown method."""
        return positive_table(self.shown or self.view())

    def summary_html(self) -> str:
        """Text of the current selection (AP, P@k, positives' ranks, the shown names)."""
        from msvlad.report.explorers.rankings_view import ranked_lists_html

        return ranked_lists_html(self.view())

    def export(self, folder: str | os.PathLike | None = None) -> list[Path]:
        """Write the current view: its figure (PNG) and its ranked lists (CSV); return the paths."""
        fig = self.figure()
        out = Path(folder) if folder is not None else self.export_dir
        return export_files(fig, self.shown, self.dataset, out)

    # ---------------------------------------------------------------- widgets
    def _build(self, widgets: Any) -> list[Any]:
        self.view_widgets = rankings_widgets.RankingsWidgets(self, widgets)
        return self.view_widgets.children()

    def _control_value(self, key: str, value: Any) -> dict[str, Any]:
        if key == "compare":
            return {"compare": value or None}
        if key == "query":
            return {} if value is None or int(value) < 0 else {"query": int(value), "clicked": None}
        return {key: value}

    def _sync_controls(self) -> None:
        if self.view_widgets is not None:
            self.view_widgets.sync()

    def redraw(self) -> None:
        """Draw the current selection into the widgets (tiles, query, map, tables)."""
        self.shown = self.view()
        if self.view_widgets is not None:
            self.view_widgets.draw()

    def click(self, db_index: int) -> bool:
        """Make a shown database image the query (what clicking its tile does)."""
        return self._guarded(lambda: self.select(clicked=int(db_index)))


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
    interactive: bool = True,
) -> Any:
    """The rankings explorer: its widgets (any notebook frontend), or with interactive=False the
    figure of its first view (what the report stage renders).

    The first view is the method's query with the lowest AP, ranked by `method` and by `compare`.
    """
    explorer = RankingsExplorer(
        params, results_dir, method=method, compare=compare, dataset=dataset, setup=setup,
        top_k=top_k, order=order,
    )  # fmt: skip
    return explorer if interactive else explorer.figure()
