"""The triplet explorer: the triplets a run mined, filtered, and the pool around a chosen one.

State (`select(...)`): the run (method), mining round, anchor class, kind, predicted-loss range,
sort and triplet. A filter value that the newly chosen run does not have (a kind, round or class
of another run) falls back to "all", so switching runs never leaves a menu on a missing value.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from msvlad import paths
from msvlad.config import Params, method_params
from msvlad.report import runs
from msvlad.report.drawing import KIND_COLORS, message_figure, shorten
from msvlad.report.explorers.base import MAX_OPTIONS, THUMBNAILS, ExplorerBase, ThumbnailCache, png
from msvlad.report.explorers.triplets_view import BAND_MINER, plot_triplet_neighbors, triplet_html

ALL = "all"  # the menu entry of an unset filter


class TripletExplorer(ExplorerBase):
    """Filters for method, round, anchor class, kind and predicted-loss range; a triplet menu."""

    STATE = ("method", "round", "label", "kind", "loss", "sort", "triplet")
    CSS_CLASS = "msvlad-triplets"

    def __init__(
        self,
        params: Params,
        runs_dir: str | os.PathLike,
        *,
        method: str | None = None,
        sort: str = "loss_desc",
        cache: ThumbnailCache = THUMBNAILS,
    ) -> None:
        super().__init__()
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
        if sort not in runs.TRIPLET_SORTS:
            raise ValueError(f"sort: expected one of {list(runs.TRIPLET_SORTS)}, got {sort!r}")
        self.method = method or self.methods[0]
        self.round: int | None = None
        self.label: str | None = None
        self.kind: str | None = None
        self.loss: tuple[float, float] | None = None
        self.sort = sort
        self.triplet = -1  # row of triplets.csv; -1: the first one of the current filters
        self.image: Any = None
        self.summary: Any = None
        self.shown: pd.Series | None = None
        self.shown_neighbors = pd.DataFrame()
        self._runs: dict[str, dict[str, Any]] = {}
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

    def choices(self) -> dict[str, list]:
        """The values each filter can take in the current run: rounds, classes, kinds."""
        trip = self.run()["triplets"]
        if trip.empty:
            return {"round": [], "label": [], "kind": []}
        kinds = set(trip["kind"].astype(str))
        return {
            "round": sorted(int(r) for r in pd.unique(trip["round"])),
            "label": sorted(str(v) for v in pd.unique(trip["anchor_label"])),
            "kind": [k for k in KIND_COLORS if k in kinds] + sorted(kinds - set(KIND_COLORS)),
        }

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
        unknown = set(changes) - set(self.STATE)
        if unknown:
            raise ValueError(f"select: unknown control(s) {sorted(unknown)}")
        if "method" in changes and changes["method"] not in self.methods:
            raise ValueError(f"method: {changes['method']!r} is not one of {self.methods}")
        if "sort" in changes and changes["sort"] not in runs.TRIPLET_SORTS:
            raise ValueError(
                f"sort: expected one of {list(runs.TRIPLET_SORTS)}, got {changes['sort']!r}"
            )
        if changes.get("method", self.method) != self.method and "loss" not in changes:
            self.loss = None  # another run: its own loss range
        for key, value in changes.items():
            setattr(self, key, None if value == ALL else value)
        self._normalise()
        return self

    def _normalise(self) -> None:
        """Filters the run does not have fall back to all; a loss range clipped to the run's."""
        choices = self.choices()
        for key in ("round", "label", "kind"):
            if getattr(self, key) is not None and getattr(self, key) not in choices[key]:
                setattr(self, key, None)
        if self.loss is not None and not self.run()["triplets"].empty:
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

    def miner_band(self) -> tuple[float, float | None]:
        """The run's own margin, and its delta when its miner is the difficulty miner."""
        run = method_params(self.params, self.method)
        return run.miner.margin, run.miner.delta if run.miner.name == BAND_MINER else None

    def figure(self) -> Figure:
        """The selected triplet drawn (also what papermill shows)."""
        triplet = self.chosen()
        label = self.params.methods[self.method].label
        self.shown = triplet
        if triplet is None:
            self.shown_neighbors = pd.DataFrame()
            return message_figure("no triplet passes the filters", label)
        recorded = self.run()["neighbors"]
        self.shown_neighbors = runs.triplet_neighbors(recorded, triplet)
        run = method_params(self.params, self.method)
        margin, delta = self.miner_band()
        return plot_triplet_neighbors(
            paths.resolve(run.data.root) / run.data.train_set,
            triplet,
            self.shown_neighbors,
            self.run()["stats"],
            margin=margin,
            delta=delta,
            cache=self.cache,
            title=label,
            recorded=recorded is not None,
        )

    def summary_html(self) -> str:
        """Text of the selected triplet and its neighbours."""
        triplet = self.chosen()
        if triplet is None:
            return "<div class='msvlad-triplet'>no triplet passes the filters</div>"
        n = len(self.candidates())
        head = f"<div>{n} triplet{'s' if n != 1 else ''} pass the filters</div>"
        neighbors = runs.triplet_neighbors(self.run()["neighbors"], triplet)
        return head + triplet_html(triplet, neighbors, *self.miner_band())

    # ---------------------------------------------------------------- widgets
    def _build(self, widgets: Any) -> list[Any]:
        desc, c = {"description_width": "60px"}, self.controls
        sizes = {
            "method": "400px",
            "round": "180px",
            "label": "300px",
            "sort": "300px",
            "triplet": "620px",
        }
        texts = {"label": "class"}
        for key, width in sizes.items():
            c[key] = widgets.Dropdown(
                description=texts.get(key, key), style=desc, layout=widgets.Layout(width=width)
            )
        c["kind"] = widgets.ToggleButtons(
            description="kind", style={**desc, "button_width": "120px"}
        )
        c["loss"] = widgets.FloatRangeSlider(
            description="loss", continuous_update=False, readout_format=".3f", style=desc,
            layout=widgets.Layout(width="420px"),
        )  # fmt: skip
        c["triplet"].add_class("msvlad-triplet-menu")
        for key, control in c.items():
            control.add_class(f"msvlad-control-{key}")
        self.image = widgets.Image(format="png")
        self.summary = widgets.HTML()
        self.summary.add_class("msvlad-triplet-summary")
        return [
            widgets.HBox([c["method"], c["round"], c["label"]]),
            widgets.HBox([c["kind"], c["loss"]]),
            widgets.HBox([c["sort"], c["triplet"]]),
            widgets.VBox([self.image, self.summary]),
        ]

    def _control_value(self, key: str, value: Any) -> dict[str, Any]:
        if key == "loss":
            return {"loss": tuple(float(v) for v in value)}
        if key == "triplet" and (value is None or int(value) < 0):
            return {}  # the "no triplet" / "more" entries select nothing
        return {key: value}

    def _sync_controls(self) -> None:
        c, choices = self.controls, self.choices()
        lo, hi = self.loss_range()
        chosen = self.candidates()
        options = [
            (
                f"r{t.round} · {shorten(str(t.anchor), 40)} · {t.kind} · loss {t.loss:.4f}",
                int(t.mined),
            )
            for t in chosen.head(MAX_OPTIONS).itertuples(index=False)
        ]
        if len(chosen) > MAX_OPTIONS:
            options.append((f"… {len(chosen) - MAX_OPTIONS} more: narrow the filters", -2))
        c["method"].options = [(shorten(self.params.methods[m].label, 40), m) for m in self.methods]
        c["method"].value = self.method
        for key in ("round", "label", "kind"):
            c[key].options = [ALL, *choices[key]]
            c[key].value = ALL if getattr(self, key) is None else getattr(self, key)
        c["loss"].min, c["loss"].max = -1e9, 1e9  # widen first: min/max/value stay ordered
        c["loss"].min, c["loss"].max = lo, hi if hi > lo else lo + 1e-6
        c["loss"].step = max((hi - lo) / 200, 1e-6)
        c["loss"].value = self.loss if self.loss is not None else (lo, c["loss"].max)
        c["sort"].options = [(text, key) for key, text in runs.TRIPLET_SORTS.items()]
        c["sort"].value = self.sort
        c["triplet"].options = options or [("no triplet passes the filters", -1)]
        c["triplet"].value = self.triplet if options else -1

    def redraw(self) -> None:
        """Draw the selected triplet into the image and the summary."""
        fig = self.figure()
        if self.image is not None:
            self.image.value = png(fig)
            self.summary.value = self.summary_html()


def triplet_explorer(
    params: Params,
    runs_dir: str | os.PathLike,
    *,
    method: str | None = None,
    interactive: bool = True,
) -> Any:
    """The triplet explorer: its widgets (any notebook frontend), or with interactive=False the
    figure of its first view, the triplet with the highest predicted loss (the report stage)."""
    explorer = TripletExplorer(params, runs_dir, method=method)
    return explorer if interactive else explorer.figure()
