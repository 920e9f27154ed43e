"""Interactive explorers for any notebook frontend: retrieval rankings per query, mined triplets.

Each explorer keeps its selection as plain state (`select(...)`), draws it as a matplotlib Figure
(`figure()`), and builds ipywidgets controls on demand (`widget()`). The notebooks call
`rankings_explorer` / `triplet_explorer` in one line: by default they return the explorer, which
displays as its widgets in JupyterLab, Notebook, VS Code or a kernel run by nbclient; with
`interactive=False` (what the `report` stage passes) they return the static figure of the first
view, so no widget state is stored in the rendered report. Images are decoded only when shown and
kept in a thumbnail cache (`base.THUMBNAILS`), so going back to a query decodes nothing.

Modules: `base` (thumbnail cache, widget scaffolding, error display), `ranking` (one query's
ranked list, ranks counted as revisitop counts them), `data` (what evaluate wrote, variant
rankings), `rankings` / `rankings_view` / `rankings_widgets` (the rankings explorer),
`triplets` / `triplets_view` (the triplet explorer).
"""

from msvlad.report.explorers.base import THUMBNAILS, ExplorerBase, ThumbnailCache
from msvlad.report.explorers.data import VARIANT_LABELS, RunResults
from msvlad.report.explorers.ranking import (
    FAILURES,
    QUERY_ORDERS,
    Landmarks,
    QueryTruth,
    RankedList,
    dataset_truth,
    failures,
    landmarks,
    own_photos,
    positive_table,
    query_order,
    ranked_list,
)
from msvlad.report.explorers.rankings import RankingsExplorer, rankings_explorer
from msvlad.report.explorers.rankings_view import (
    plot_embedding_map,
    plot_ranked_lists,
    ranked_lists_html,
)
from msvlad.report.explorers.triplets import TripletExplorer, triplet_explorer
from msvlad.report.explorers.triplets_view import plot_triplet_neighbors, triplet_html

__all__ = [
    "FAILURES",
    "QUERY_ORDERS",
    "THUMBNAILS",
    "VARIANT_LABELS",
    "ExplorerBase",
    "Landmarks",
    "QueryTruth",
    "RankedList",
    "RankingsExplorer",
    "RunResults",
    "ThumbnailCache",
    "TripletExplorer",
    "dataset_truth",
    "failures",
    "landmarks",
    "own_photos",
    "plot_embedding_map",
    "plot_ranked_lists",
    "plot_triplet_neighbors",
    "positive_table",
    "query_order",
    "ranked_list",
    "ranked_lists_html",
    "rankings_explorer",
    "triplet_explorer",
    "triplet_html",
]
