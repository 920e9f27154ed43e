"""msvlad.report.explorers: every control, driven through the widget API, redraws what it should.

Expected lists, ranks, AP, query orders, failure filters and variant rankings are recomputed here
independently (numpy argsort, revisitop's AP by hand), never read back from the explorer.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

from fixtures_runs import DATASET, make_run_tree
from msvlad.config import load_params
from msvlad.data.testsets import load_dataset
from msvlad.report import explorers, runs
from msvlad.report.drawing import COLORS
from msvlad.report.explorers import rankings_view

PNG = b"\x89PNG\r\n\x1a\n"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory):
    tree = make_run_tree(tmp_path_factory.mktemp("explore"))
    # the hardest-negative miner logs its own kind, as the real miner does
    path = tree.runs_dir / "msvlad-hardest" / "train" / "triplets.csv"
    frame = pd.read_csv(path)
    frame.assign(kind="hardest-negative").to_csv(path, index=False)
    return tree


@pytest.fixture(scope="module")
def params(tree):
    return load_params(tree.params_file)


@pytest.fixture(scope="module")
def dataset(tree):
    return load_dataset(tree.data_root, DATASET)


# ------------------------------------------------------------------ independent references
def _truth(dataset, q: int, setup: str) -> tuple[np.ndarray, np.ndarray]:
    g = dataset.gnd[q]
    easy, hard, junk = (np.asarray(g[k], dtype=np.int64) for k in ("easy", "hard", "junk"))
    if setup == "easy":
        return easy, np.concatenate([junk, hard])
    if setup == "hard":
        return hard, np.concatenate([junk, easy])
    return np.concatenate([easy, hard]), junk


def _ap(column: np.ndarray, ok: np.ndarray, junk: np.ndarray) -> float:
    """revisitop's trapezoid AP (percent) with junk removed, written out by hand."""
    if ok.size == 0:
        return math.nan
    kept = [i for i in column if i not in set(junk.tolist())]
    pos = [r for r, i in enumerate(kept) if i in set(ok.tolist())]
    ap = 0.0
    for j, r in enumerate(pos):
        p0 = 1.0 if r == 0 else j / r
        ap += (p0 + (j + 1) / (r + 1)) / 2 / len(ok)
    return 100 * ap


def _expected_items(column, ok, junk, own, k: int) -> list[tuple[int, int, str]]:
    """(rank, db index, relevance) of a shown list: own photo out, junk unnumbered, k ranks."""
    out, rank, junk_shown = [], 0, 0
    for i in column:
        i = int(i)
        if i in own:
            continue
        if i in set(junk.tolist()):
            if rank < k and junk_shown < k:
                out.append((0, i, "junk"))
                junk_shown += 1
            continue
        rank += 1
        if rank > k:
            break
        out.append((rank, i, "positive" if i in set(ok.tolist()) else "negative"))
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _expand(x: np.ndarray, nbrs: np.ndarray, alpha: float) -> np.ndarray:
    w = np.clip(np.einsum("nd,nkd->nk", x, nbrs), 0, None) ** alpha
    return _unit(x + np.einsum("nk,nkd->nd", w, nbrs))


def _variant_ranks(tree, params, method: str, variant: str) -> np.ndarray:
    """The variant's (n_db, n_q) ranking from features.npz by numpy alone."""
    if variant == "plain":
        return np.load(tree.results_dir / method / DATASET / "ranks.npy")
    f = np.load(tree.results_dir / method / DATASET / "features.npz")
    q, db = f["q"].astype(np.float64), f["db"].astype(np.float64)
    cfg = params.evaluate
    if variant == "dba":
        order = np.argsort(-(db @ db.T), axis=1, kind="stable")
        nn = np.array([[j for j in row if j != i][: cfg.dba_k] for i, row in enumerate(order)])
        db = _expand(db, db[nn], cfg.dba_alpha)
    if variant == "qe":
        top = np.argsort(-(q @ db.T), axis=1, kind="stable")[:, : cfg.qe_k]
        q = _expand(q, db[top], cfg.qe_alpha)
    return np.argsort(-(db @ q.T), axis=0, kind="stable")


def _border(ax) -> str:
    colors = {to_hex(s.get_edgecolor()) for s in ax.spines.values()}
    assert len(colors) == 1, colors
    return colors.pop()


def _counting(ex) -> list[int]:
    """Count the explorer's redraws (each control change must redraw once)."""
    count, draw = [0], ex.redraw

    def redraw() -> None:
        draw()
        count[0] += 1

    ex.redraw = redraw
    return count


def _check_rankings_view(ex, tree, params, dataset) -> None:
    """What the explorer shows equals the reference for its state: lists, tiles, text, table."""
    assert ex.last_error is None, ex.last_error
    q = ex.query
    ok, junk = _truth(dataset, q, ex.setup)
    methods = [ex.method] + ([ex.compare] if ex.compare else [])
    assert [rl.method for rl in ex.shown] == methods
    for rl, grid in zip(ex.shown, ex.view_widgets.grids, strict=False):
        assert rl.query_index == q and rl.query == dataset.qimlist[q] and rl.setup == ex.setup
        column = _variant_ranks(tree, params, rl.method, rl.variant)[:, q]
        want = _expected_items(column, ok, junk, set(), ex.top_k)
        got = list(zip(rl.items["rank"], rl.items["db_index"], rl.items["relevance"], strict=True))
        assert got == want, (rl.method, rl.variant)
        assert rl.ap == pytest.approx(_ap(column, ok, junk), abs=1e-9)
        tiles = grid.box.children
        assert len(tiles) == len(want)
        for tile, (rank, _, relevance) in zip(tiles, want, strict=True):
            assert tile.layout.border == f"4px solid {COLORS[relevance]}"
            assert tile.children[1].description.startswith(f"#{rank} " if rank else "junk")
            assert bytes(tile.children[0].value).startswith(b"\xff\xd8")  # a JPEG thumbnail
        free = [i for i in column if i not in set(junk.tolist())]
        assert sorted(rl.positive_ranks.tolist()) == sorted(free.index(i) + 1 for i in ok.tolist())
    summary = ex.view_widgets.summary.value
    assert f"query {dataset.qimlist[q]}" in summary
    assert f"AP {ex.shown[0].ap:.1f}" in summary
    table = ex.view_widgets.positives.value
    assert all(dataset.imlist[i] in table for i in ok.tolist())


# ------------------------------------------------------------------ the notebook entry points
def test_explorers_are_widgets_by_default_in_any_kernel(monkeypatch, tree, params) -> None:
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)  # VS Code, nbclient, jupyter execute
    live = explorers.rankings_explorer(params, tree.results_dir, method="msvlad")
    assert isinstance(live, explorers.RankingsExplorer)
    bundle = live._repr_mimebundle_()
    assert WIDGET_MIME in bundle[0] if isinstance(bundle, tuple) else WIDGET_MIME in bundle
    trip = explorers.triplet_explorer(params, tree.runs_dir)
    assert isinstance(trip, explorers.TripletExplorer)
    bundle = trip._repr_mimebundle_()
    assert WIDGET_MIME in (bundle[0] if isinstance(bundle, tuple) else bundle)
    # the report stage asks for the static view
    static = explorers.rankings_explorer(params, tree.results_dir, interactive=False)
    assert isinstance(static, Figure)
    assert isinstance(explorers.triplet_explorer(params, tree.runs_dir, interactive=False), Figure)


def test_query_order_by_ap_and_by_gain() -> None:
    a = pd.DataFrame(
        {"query_index": [0, 1, 2, 3], "query": list("abcd"), "AP": [50.0, np.nan, 20.0, 90.0]}
    )
    b = a.assign(AP=[10.0, np.nan, 40.0, 85.0])
    order = explorers.query_order
    assert order(a, "ap_asc")["query_index"].tolist() == [2, 0, 3, 1]  # no positive: last
    assert order(a, "ap_desc")["query_index"].tolist() == [3, 0, 2, 1]
    assert order(a, "index")["query_index"].tolist() == [0, 1, 2, 3]
    gains = order(a, "gain_desc", b)
    assert gains["query_index"].tolist() == [0, 3, 2, 1]
    np.testing.assert_allclose(gains["gain"].iloc[:3], [40.0, 5.0, -20.0])
    assert order(a, "gain_asc", b)["query_index"].tolist() == [2, 3, 0, 1]
    with pytest.raises(ValueError, match="second method"):
        order(a, "gain_desc")
    with pytest.raises(ValueError, match="different queries"):
        order(a, "ap_asc", b.assign(query=list("abce")))


# ------------------------------------------------------------------ ranked lists
def test_ranked_list_counts_ranks_as_revisitop(dataset) -> None:
    g = dataset.gnd[0]
    e0, e1, hard, junk = int(g["easy"][0]), int(g["easy"][1]), int(g["hard"][0]), int(g["junk"][0])
    others = [i for i in range(len(dataset.imlist)) if i not in {e0, e1, hard, junk}]
    own = others[0]  # pretend this negative is the query's own photo: then it is junk
    head = [own, e0, junk, others[1], hard, e1]
    column = np.array(head + [i for i in range(len(dataset.imlist)) if i not in head])
    truth = explorers.QueryTruth(
        name="q0",
        setup="medium",
        ok=np.array([e0, e1, hard]),
        junk=np.array([junk, own]),
        easy=frozenset([e0, e1]),
        own=frozenset([own]),
        revisited=True,
    )
    sims = np.linspace(1, 0, len(dataset.imlist))
    rl = explorers.ranked_list(dataset, column, truth, 3, label="m", sims=sims)
    # own photo left out, junk shown without a number, ranks 1..3 over the non-junk results
    assert rl.items["db_index"].tolist() == [e0, junk, others[1], hard]
    assert rl.items["rank"].tolist() == [1, 0, 2, 3]
    assert rl.items["position"].tolist() == [2, 3, 4, 5]
    assert rl.items["kind"].tolist() == ["easy", "junk", "neg", "hard"]
    assert rl.own_photo == (dataset.imlist[own],) and rl.first_position == 2
    np.testing.assert_allclose(rl.items["sim"], sims[[e0, junk, others[1], hard]])
    assert rl.positive_ranks.tolist() == [1, 3, 4]
    ap = ((1 + 1) / 2 + (1 / 2 + 2 / 3) / 2 + (2 / 3 + 3 / 4) / 2) / 3
    assert rl.ap == pytest.approx(100 * ap)
    assert rl.precision == pytest.approx(100 * 2 / 3)  # P@3: 2 positives in 3 non-junk results
    assert rankings_view.item_caption(rl.items.iloc[1]) == f"junk · {sims[junk]:.2f}"
    with pytest.raises(ValueError, match="top_k"):
        explorers.ranked_list(dataset, column, truth, 0)


def test_own_photos_by_name_or_same_bytes(tree, tmp_path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tree.data_root / DATASET, data / DATASET)
    ds = load_dataset(data, DATASET)
    junk0, junk1 = int(ds.gnd[0]["junk"][0]), int(ds.gnd[1]["junk"][0])
    # query 0's junk image is a byte copy of the query photo (the mini benchmark's case)
    shutil.copyfile(ds.query_path(0), ds.image_path(junk0))
    assert explorers.own_photos(ds) == [frozenset([junk0]), frozenset(), frozenset(), frozenset()]
    # query 1's photo is a database image by name (revisited Oxford's case)
    import pickle

    cfg = pickle.loads((data / DATASET / f"gnd_{DATASET}.pkl").read_bytes())
    cfg["imlist"][junk1] = cfg["qimlist"][1]
    shutil.copyfile(data / DATASET / "jpg" / f"{ds.imlist[junk1]}.jpg", ds.query_path(1))
    (data / DATASET / f"gnd_{DATASET}.pkl").write_bytes(pickle.dumps(cfg))
    ds = load_dataset(data, DATASET)
    assert explorers.own_photos(ds)[:2] == [frozenset([junk0]), frozenset([junk1])]


def test_landmarks_join_queries_that_share_positives(tree, tmp_path) -> None:
    import pickle

    data = tmp_path / "data"
    shutil.copytree(tree.data_root / DATASET, data / DATASET)
    path = data / DATASET / f"gnd_{DATASET}.pkl"
    cfg = pickle.loads(path.read_bytes())
    cfg["qimlist"] = ["bridge_q0", "bridge_q1", "tower_q0", "tower_q1"]
    for old, new in zip(["q0", "q1", "q2", "q3"], cfg["qimlist"], strict=True):
        (data / DATASET / "jpg" / f"{old}.jpg").rename(data / DATASET / "jpg" / f"{new}.jpg")
    cfg["gnd"][1]["hard"] = np.array([cfg["gnd"][1]["hard"][0], cfg["gnd"][0]["easy"][0]])
    path.write_bytes(pickle.dumps(cfg))
    ds = load_dataset(data, DATASET)
    marks = explorers.landmarks(ds)
    assert marks.query.tolist() == [0, 0, 1, 2]  # q0 and q1 share a positive
    assert marks.names == ["bridge", "tower_q0", "tower_q1"]
    pos = {i for q in (0, 1) for k in ("easy", "hard") for i in cfg["gnd"][q][k]}
    assert set(np.flatnonzero(marks.db == 0)) == pos
    assert (marks.db[[int(cfg["gnd"][q]["junk"][0]) for q in range(4)]] == -1).all()
    truth = explorers.ranking.landmark_truth(ds, marks, min(pos))
    assert set(truth.ok.tolist()) == pos - {min(pos)} and min(pos) in truth.own
    assert {int(cfg["gnd"][q]["junk"][0]) for q in (0, 1)} <= set(truth.junk.tolist())


def test_failure_flags_and_positive_table(dataset) -> None:
    n = len(dataset.imlist)
    cols = []
    for q in range(len(dataset.qimlist)):
        ok, junk = _truth(dataset, q, "medium")
        rest = [i for i in range(n) if i not in {*ok, *junk}]
        if q == 0:  # positives first: nothing wrong at k=3
            head = [*ok, *junk]
        elif q == 1:  # junk above the first positive
            head = [*junk, *ok]
        elif q == 2:  # a negative first, the last positive beyond rank 3
            head = [rest[0], ok[0], ok[1], rest[1], ok[2]]
        else:  # positives first but spread beyond k
            head = [ok[0], ok[1], *rest[:3], ok[2]]
        cols.append(head + [i for i in range(n) if i not in head])
    ranks = np.array(cols).T
    flags = explorers.failures(
        ranks, lambda q: explorers.dataset_truth(dataset, q, "medium"), len(cols), 3
    )
    assert flags["beyond_k"].tolist() == [False, False, True, True]
    assert flags["above_first"].tolist() == [False, True, True, False]
    assert flags["first_rank"].tolist() == [1, 1, 2, 1]
    truth = explorers.dataset_truth(dataset, 2, "medium")
    a = explorers.ranked_list(dataset, ranks[:, 2], truth, 3, label="A")
    b = explorers.ranked_list(dataset, ranks[:, 0], truth, 3, label="B")
    table = explorers.positive_table([a, b])
    ok, _ = _truth(dataset, 2, "medium")
    free = {
        i: r + 1 for r, i in enumerate(x for x in ranks[:, 2] if x != dataset.gnd[2]["junk"][0])
    }
    assert table["A"].tolist() == sorted(free[i] for i in ok)
    assert (table["change"] == table["B"] - table["A"]).all()


# ------------------------------------------------------------------ the rankings explorer
@pytest.mark.slow  # about 150 redraws
def test_rankings_explorer_every_control(tree, params, dataset, tmp_path) -> None:
    cache = explorers.ThumbnailCache()
    ex = explorers.RankingsExplorer(params, tree.results_dir, top_k=3, cache=cache)
    assert len(cache) == 0  # nothing decoded before something is shown
    box = ex.widget()
    assert "msvlad-rankings" in box._dom_classes
    redraws = _counting(ex)
    c = ex.controls
    assert c["dataset"].options == (DATASET,)
    methods = [v for _, v in c["method"].options]
    assert methods == ["msvlad", "msvlad-hardest", "msvlad-ots"]
    for method in methods[::-1]:  # the first differs from the explorer's first view
        before = redraws[0]
        c["method"].value = method
        assert redraws[0] == before + 1 and ex.method == method
        _check_rankings_view(ex, tree, params, dataset)
        for compare in [v for _, v in c["compare"].options]:
            c["compare"].value = compare
            assert ex.compare == (compare or None)
            _check_rankings_view(ex, tree, params, dataset)
        assert [v for _, v in c["variant"].options] == ["plain", "qe", "dba"]  # no raw arrays
        for variant in ["qe", "dba", "plain"]:
            c["variant"].value = variant
            _check_rankings_view(ex, tree, params, dataset)
        for setup in [v for _, v in c["setup"].options]:
            c["setup"].value = setup
            _check_rankings_view(ex, tree, params, dataset)
        for q in [v for _, v in c["query"].options]:
            c["query"].value = q
            assert ex.query == q
            _check_rankings_view(ex, tree, params, dataset)
        for k in (1, 5, c["top_k"].max):
            c["top_k"].value = k
            _check_rankings_view(ex, tree, params, dataset)
        assert redraws[0] > before + 10
    assert c["top_k"].max == len(dataset.imlist)  # 19 images: the slider stops there


def test_rankings_explorer_orders_and_failure_filters(tree, params, dataset) -> None:
    ex = explorers.RankingsExplorer(params, tree.results_dir, method="msvlad", top_k=2)
    ex.widget()
    c = ex.controls
    for method, compare, variant in [
        ("msvlad", "msvlad-ots", "plain"),
        ("msvlad-hardest", "", "dba"),
    ]:
        c["method"].value, c["compare"].value, c["variant"].value = method, compare, variant
        tag = "" if variant == "plain" else f"_{variant}"
        per = pd.read_csv(tree.results_dir / method / DATASET / f"per_query{tag}.csv")
        ap = per[per["setup"] == "medium"]["AP"].reset_index(drop=True) * 100
        orders = [v for _, v in c["order"].options]
        assert ("gain_desc" in orders) == bool(compare)
        for order in orders:
            c["order"].value = order
            menu = [v for _, v in c["query"].options]
            if order == "ap_asc":
                assert menu == ap.sort_values(kind="stable").index.tolist()
            if order == "ap_desc":
                assert menu == ap.sort_values(ascending=False, kind="stable").index.tolist()
            if order == "index":
                assert menu == list(range(len(dataset.qimlist)))
            if order == "gain_desc":
                other = pd.read_csv(tree.results_dir / compare / DATASET / "per_query.csv")
                gain = ap - other[other["setup"] == "medium"]["AP"].reset_index(drop=True) * 100
                assert menu == gain.sort_values(ascending=False, kind="stable").index.tolist()
            assert ex.query == menu[0] and ex.last_error is None
        c["order"].value = "index"
        ranks = _variant_ranks(tree, params, method, variant)
        # a filter, then another run: each keeps the menu to the queries of that kind
        for failure in ["beyond_k", "above_first", "all"]:
            c["failure"].value = failure
            want = []
            for q in range(len(dataset.qimlist)):
                ok, junk = _truth(dataset, q, "medium")
                free = [i for i in ranks[:, q] if i not in set(junk.tolist())]
                beyond = max(free.index(i) + 1 for i in ok) > 2
                above = int(ranks[0, q]) not in set(ok.tolist())
                if failure == "all" or (beyond if failure == "beyond_k" else above):
                    want.append(q)
            menu = [v for _, v in c["query"].options]
            assert menu[: len(want)] == want
            if want:
                assert ex.query in want
                _check_rankings_view(ex, tree, params, dataset)


def test_rankings_click_to_query_back_and_map(tree, params, dataset) -> None:
    ex = explorers.RankingsExplorer(params, tree.results_dir, method="msvlad", top_k=4)
    ex.widget()
    c, views = ex.controls, ex.view_widgets
    q = ex.query
    first = views.grids[0]
    target = int(ex.shown[0].items["db_index"].iloc[0])
    first.tiles[0].children[1].click()  # the tile's button: that image becomes the query
    rl = ex.shown[0]
    assert ex.clicked == target and rl.from_db and rl.query == dataset.imlist[target]
    assert c["query"].value == -1 - target and "clicked" in c["query"].options[0][0]
    f = np.load(tree.results_dir / "msvlad" / DATASET / "features.npz")
    db = f["db"].astype(np.float64)
    column = np.argsort(-(db @ db[target]), kind="stable")
    marks = explorers.landmarks(dataset)
    ok = np.array([i for i in np.flatnonzero(marks.db == marks.db[target]) if i != target])
    junk = np.union1d(marks.junk[marks.db[target]], [target])
    want = _expected_items(column, ok, junk, {target}, 4)
    assert list(zip(rl.items["rank"], rl.items["db_index"], strict=True)) == [
        (r, i) for r, i, _ in want
    ]
    assert rl.own_photo == (dataset.imlist[target],) and rl.setup == "landmark"
    assert rl.ap == pytest.approx(_ap(column, ok, junk))
    assert "left out" in views.title.value
    # the map: db points at their PCA coordinates, the clicked image a star, positives ringed
    fig = ex.map_figure()
    ax = fig.axes[0]
    centred = db - db.mean(axis=0)
    pcs = np.linalg.svd(centred, full_matrices=False)[2][:2]
    xy = centred @ pcs.T
    shown = np.concatenate([col.get_offsets() for col in ax.collections[:-2]])
    assert len(shown) == len(db)  # every database image once, landmarks + no landmark
    got = np.sort(np.abs(shown), axis=0)
    np.testing.assert_allclose(got, np.sort(np.abs(xy), axis=0), atol=1e-6)
    star = ax.collections[-1].get_offsets()[0]
    np.testing.assert_allclose(np.abs(star), np.abs(xy[target]), atol=1e-6)
    assert len(ax.collections[-2].get_offsets()) == len(ok)  # rings around the positives
    assert sorted(int(t.get_text()) for t in ax.texts) == [r for r, _, _ in want if r]
    assert bytes(views.map.value).startswith(PNG)
    c["colour"].value = "status"
    labels = [t.get_text() for t in ex.map_figure().axes[0].get_legend().get_texts()]
    assert labels[:3] == ["negative", "junk", "positive"]
    # back: the dataset query again, then nothing left to go back to
    c["back"].click()
    assert ex.clicked is None and ex.query == q and not ex.shown[0].from_db
    assert c["query"].value == q


def test_rankings_export_and_wrapping(tree, params, dataset, tmp_path) -> None:
    ex = explorers.RankingsExplorer(
        params, tree.results_dir, method="msvlad", compare="msvlad-ots", top_k=16,
        export_dir=tmp_path,
    )  # fmt: skip
    ex.widget()
    ex.controls["export"].click()
    assert ex.last_error is None and "exported" in ex.status.value
    png, csv = sorted(tmp_path.iterdir(), key=lambda p: p.suffix, reverse=True)
    assert png.suffix == ".png" and png.read_bytes().startswith(PNG)
    frame = pd.read_csv(csv)
    shown = pd.concat([rl.items for rl in ex.shown], ignore_index=True)
    assert frame["db_index"].tolist() == shown["db_index"].tolist()
    assert frame["rank"].tolist() == shown["rank"].tolist()
    assert set(frame["method"]) == {"msvlad", "msvlad-ots"} and set(frame["query"]) == {
        dataset.qimlist[ex.query]
    }
    # top-k 16: rows of 10 thumbnails, the same size as a short list's
    fig = ex.figure()
    n_items = [len(rl.items) for rl in ex.shown]
    rows = sum(math.ceil(n / 10) for n in n_items)
    assert fig.get_size_inches()[0] == pytest.approx(1.55 * 11)
    assert len(fig.axes) == rows * 11
    short = explorers.RankingsExplorer(params, tree.results_dir, method="msvlad", top_k=10)
    width = short.figure().axes[1].get_position().width
    assert fig.axes[1].get_position().width * fig.get_size_inches()[0] == pytest.approx(
        width * short.figure().get_size_inches()[0], rel=0.25
    )
    grid = ex.view_widgets.grids[0]
    assert grid.box.layout.flex_flow == "row wrap" and len(grid.box.children) == n_items[0]
    assert {t.children[0].layout.width for t in grid.box.children} == {"150px"}


def test_rankings_callback_errors_show_in_the_widget(tree, params, monkeypatch) -> None:
    ex = explorers.RankingsExplorer(params, tree.results_dir, method="msvlad")
    ex.widget()
    c = ex.controls
    shown = [rl.method for rl in ex.shown]
    image = ex.view_widgets.query_image.value

    def broken(*args, **kwargs):
        raise OSError("features.npz: read error\nsecond line")

    monkeypatch.setattr(ex.data, "ranks", broken)
    c["variant"].value = "dba"
    assert ex.last_error == "OSError: features.npz: read error"
    (out,) = ex.errors.outputs
    assert out["text"] == "error: OSError: features.npz: read error\n"
    # the state and every menu went back to what the figure still shows
    assert ex.variant == "plain" and c["variant"].value == "plain"
    assert [rl.method for rl in ex.shown] == shown
    assert ex.view_widgets.query_image.value == image
    monkeypatch.undo()
    c["variant"].value = "qe"
    assert ex.last_error is None and ex.errors.outputs == () and ex.variant == "qe"


def test_rankings_explorer_bad_input(tree, params, tmp_path) -> None:
    ex = explorers.RankingsExplorer(params, tree.results_dir)
    with pytest.raises(ValueError, match="unknown control"):
        ex.select(colour_map="red")
    with pytest.raises(ValueError, match="dataset: 'nope'"):
        ex.select(dataset="nope")
    with pytest.raises(ValueError, match="failure: expected one of"):
        ex.select(failure="sometimes")
    with pytest.raises(ValueError, match="clicked: 99"):
        ex.select(clicked=99)
    with pytest.raises(FileNotFoundError, match="ranks.npy"):
        explorers.RankingsExplorer(params, tmp_path)
    with pytest.raises(ValueError, match="compare: 'nope' is not a method"):
        explorers.RankingsExplorer(params, tree.results_dir, compare="nope")
    with pytest.raises(ValueError, match="order: expected one of"):
        explorers.RankingsExplorer(params, tree.results_dir, order="random")
    with pytest.raises(ValueError, match="method: 'msvlad-ots' has no"):
        explorers.TripletExplorer(params, tree.runs_dir, method="msvlad-ots")  # not trained


# ------------------------------------------------------------------ the triplet explorer
def _filtered(trip: pd.DataFrame, **f) -> list[int]:
    keep = pd.Series(True, index=trip.index)
    for col, key in (("round", "round"), ("anchor_label", "label"), ("kind", "kind")):
        if f.get(key) is not None:
            keep &= trip[col].astype(str) == str(f[key])
    if f.get("loss") is not None:
        keep &= trip["loss"].between(*f["loss"])
    sub = trip[keep]
    if f.get("sort", "loss_desc") == "mined":
        return sub.index.tolist()
    asc = f.get("sort") == "loss_asc"
    return sub.sort_values("loss", ascending=asc, kind="stable").index.tolist()


def test_triplet_explorer_method_switch_keeps_the_menus_valid(tree, params) -> None:
    ex = explorers.TripletExplorer(params, tree.runs_dir)
    ex.widget()
    c = ex.controls
    c["kind"].value = "semi-hard"
    c["method"].value = "msvlad-hardest"  # a run whose miner never logs semi-hard
    assert ex.last_error is None and ex.errors.outputs == ()
    assert ex.method == "msvlad-hardest" and ex.kind is None and c["kind"].value == "all"
    assert list(c["kind"].options) == ["all", "hardest-negative"]
    assert ex.shown["kind"] == "hardest-negative"
    assert ex.figure()._suptitle.get_text() == params.methods["msvlad-hardest"].label
    c["method"].value = "msvlad"  # and back: every later click works too
    c["kind"].value = "hard"
    assert ex.last_error is None and ex.shown["kind"] == "hard"


@pytest.mark.slow  # about 50 redraws of a 20-panel figure
def test_triplet_explorer_every_control(tree, params) -> None:
    ex = explorers.TripletExplorer(params, tree.runs_dir, cache=explorers.ThumbnailCache())
    ex.widget()
    redraws = _counting(ex)
    c = ex.controls
    assert [v for _, v in c["method"].options] == ["msvlad", "msvlad-hardest"]  # trained only
    for method in ["msvlad", "msvlad-hardest"]:
        c["method"].value = method
        trip = pd.read_csv(tree.runs_dir / method / "train" / "triplets.csv")
        assert ex.triplet == _filtered(trip)[0]  # first view: the highest predicted loss
        assert list(c["round"].options) == ["all", 0, 1, 2, 3]
        for key in ("round", "label", "kind"):
            for value in list(c[key].options)[1:]:
                before, previous = redraws[0], ex.triplet
                c[key].value = value
                want = _filtered(trip, **{key: value})
                assert redraws[0] == before + 1 and ex.last_error is None
                assert [v for _, v in c["triplet"].options] == want
                # the shown triplet stays if it passes the filter, else the first that does
                expected = previous if previous in want else want[0]
                assert ex.triplet == expected and int(ex.shown.name) == expected
                assert c["triplet"].value == expected
            c[key].value = "all"
        lo, hi = float(trip["loss"].min()), float(trip["loss"].max())
        c["loss"].value = (lo, (lo + hi) / 2)
        want = _filtered(trip, loss=(lo, (lo + hi) / 2))
        assert [v for _, v in c["triplet"].options] == want
        for sort in ["loss_asc", "mined", "loss_desc"]:
            c["sort"].value = sort
            assert [v for _, v in c["triplet"].options] == _filtered(
                trip, loss=(lo, (lo + hi) / 2), sort=sort
            )
        for value in [v for _, v in c["triplet"].options]:
            c["triplet"].value = value
            t = trip.loc[value]
            assert ex.shown["anchor"] == t["anchor"] and ex.last_error is None
            text = ex.summary.value
            assert f"rank {t['pos_rank'] + 1}," in text and f"rank {t['neg_rank'] + 1}," in text
        c["loss"].value = (c["loss"].min, c["loss"].max)


def test_triplet_panels_follow_the_miner_and_ranks_are_1_based(tree, params) -> None:
    ex = explorers.TripletExplorer(params, tree.runs_dir, method="msvlad")
    t = ex.chosen()
    fig = ex.figure()
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[1].startswith(f"positive · rank {t['pos_rank'] + 1}")
    assert any(s.startswith(f"P · #{t['pos_rank'] + 1} ") for s in titles)
    assert any(s.startswith(f"N · #{t['neg_rank'] + 1} ") for s in titles)
    axis = next(ax for ax in fig.axes if ax.get_xlabel().startswith("squared distance"))
    band = axis.patches[0].get_x(), axis.patches[0].get_x() + axis.patches[0].get_width()
    d2p, delta = 2 - 2 * t["pos_sim"], params.miner.delta
    np.testing.assert_allclose(band, [d2p - delta, d2p + delta])
    assert any(ax.get_ylabel() == "kind mix" for ax in fig.axes)
    assert "band" in ex.summary_html()
    # the hardest-negative miner has no band and no kind mix: neither is drawn
    hard = explorers.TripletExplorer(params, tree.runs_dir, method="msvlad-hardest")
    fig = hard.figure()
    axis = next(ax for ax in fig.axes if ax.get_xlabel().startswith("squared distance"))
    assert len(axis.patches) == 0 and not any(ax.get_ylabel() == "kind mix" for ax in fig.axes)
    assert any(line.get_linestyle() == ":" for line in axis.lines)  # the margin line stays
    assert "band" not in hard.summary_html()


def test_triplet_callback_errors_show_in_the_widget(tree, params, monkeypatch) -> None:
    ex = explorers.TripletExplorer(params, tree.runs_dir)
    ex.widget()
    before = ex.triplet, ex.image.value

    def broken(*args, **kwargs):
        raise ValueError("neighbors.csv: missing column(s) ['sim']")

    monkeypatch.setattr(runs, "triplet_neighbors", broken)
    ex.controls["kind"].value = "hard"
    assert ex.last_error == "ValueError: neighbors.csv: missing column(s) ['sim']"
    assert ex.errors.outputs[0]["text"].startswith("error: ValueError: neighbors.csv")
    assert ex.kind is None and ex.controls["kind"].value == "all"
    assert (ex.triplet, ex.image.value) == before


def test_triplet_explorer_without_a_neighbor_log(tree, params, tmp_path) -> None:
    runs_dir = tmp_path / "runs"
    shutil.copytree(tree.runs_dir, runs_dir)
    (runs_dir / "msvlad" / "train" / "neighbors.csv").unlink()
    assert runs.load_neighbors(runs_dir / "msvlad" / "train") is None
    ex = explorers.TripletExplorer(params, runs_dir, method="msvlad")
    fig = ex.figure()
    assert ex.shown_neighbors.empty
    assert any("not recorded" in t.get_text() for sub in fig.subfigs for t in sub.texts)
    ex.select(loss=(5.0, 6.0))  # no triplet that costly
    assert ex.chosen() is None and "no triplet" in ex.summary_html()


def test_triplet_explorer_uses_the_runs_own_miner_settings(tree, tmp_path) -> None:
    raw = yaml.safe_load(tree.params_file.read_text())
    raw["methods"]["msvlad"]["set"] = {"miner.delta": 0.07}  # this row trained with its own band
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    ex = explorers.TripletExplorer(load_params(path), tree.runs_dir, method="msvlad")
    t = ex.chosen()
    axis = next(ax for ax in ex.figure().axes if ax.get_xlabel().startswith("squared distance"))
    d2p = 2 - 2 * t["pos_sim"]
    left, width = axis.patches[0].get_x(), axis.patches[0].get_width()
    np.testing.assert_allclose([left, left + width], [d2p - 0.07, d2p + 0.07])
    assert f"band {0.1 - 0.07:.3f}–{0.1 + 0.07:.3f}" in ex.summary_html()


# ------------------------------------------------------------------ notebooks in a plain kernel
@pytest.mark.slow
@pytest.mark.parametrize("name", ["rankings", "triplets"])
def test_notebook_in_a_plain_kernel_shows_widgets(name: str, tree, tmp_path: Path) -> None:
    import nbformat
    from nbclient import NotebookClient

    from jupyterlab_browser import write_notebook

    reports = tmp_path / "reports"
    parameters = {
        "params_file": str(tree.params_file),
        "results_dir": str(tree.results_dir),
        "runs_dir": str(tree.runs_dir),
        "reports_dir": str(reports),
    }
    path = write_notebook(name, tmp_path, parameters)
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    (cell,) = [c for c in nb.cells if c.get("id") == "explorer"]
    kinds = {k for o in cell.outputs for k in o.get("data", {})}
    assert WIDGET_MIME in kinds, cell.outputs
    assert not any(o.get("output_type") == "error" for c in nb.cells for o in c.get("outputs", []))
    assert not reports.exists()  # a hand run writes no report figures


# ------------------------------------------------------------------ the project's Jupyter config
def _hook() -> dict:
    import runpy

    from traitlets.config import Config

    cfg = Config()
    ns = runpy.run_path(
        str(Path(__file__).resolve().parents[1] / ".jupyter" / "jupyter_server_config.py"),
        init_globals={"get_config": lambda: cfg},
    )
    assert cfg.ContentsManager.pre_save_hook is ns["strip_report_notebooks"]
    return ns


@pytest.mark.parametrize("name", ["rankings", "triplets", "training", "results"])
def test_stored_notebooks_are_what_the_save_hook_writes(name: str) -> None:
    import json

    import nbformat

    path = Path(__file__).resolve().parents[1] / "notebooks" / f"{name}.ipynb"
    text = path.read_text()
    stripped = _hook()["strip_notebook"](json.loads(text))
    assert nbformat.writes(nbformat.from_dict(stripped), version=4) + "\n" == text


def test_save_hook_strips_report_notebooks_only(tmp_path: Path) -> None:
    import copy
    import json
    from types import SimpleNamespace

    ns = _hook()
    root = ns["NOTEBOOKS"].parent
    stored = json.loads((root / "notebooks" / "rankings.ipynb").read_text())
    ran = copy.deepcopy(stored)
    code = next(c for c in ran["cells"] if c["cell_type"] == "code")
    code.update(
        outputs=[{"output_type": "stream", "name": "stdout", "text": "x"}], execution_count=3
    )
    code["metadata"].update(scrolled=True, execution={"iopub.status.busy": "2024"})
    ran["metadata"]["widgets"] = {"application/vnd.jupyter.widget-state+json": {}}
    ran["metadata"]["kernelspec"]["display_name"] = "Python 3 (ipykernel)"
    ran["metadata"]["language_info"] = {"name": "python", "version": "3.11.2"}
    hook, manager = ns["strip_report_notebooks"], SimpleNamespace(root_dir=str(root))
    model = {"type": "notebook", "content": copy.deepcopy(ran)}
    hook(model=model, path="notebooks/rankings.ipynb", contents_manager=manager)
    assert model["content"] == stored  # what git stores, kernelspec included
    elsewhere = {"type": "notebook", "content": copy.deepcopy(ran)}
    hook(
        model=elsewhere,
        path="scratch.ipynb",
        contents_manager=SimpleNamespace(root_dir=str(tmp_path)),
    )
    assert elsewhere["content"] == ran  # a notebook outside notebooks/ keeps its outputs
    text = {"type": "file", "content": "x"}
    hook(model=text, path="notebooks/notes.txt", contents_manager=manager)
    assert text == {"type": "file", "content": "x"}


def test_raw_variant_when_evaluate_kept_the_unwhitened_descriptors(tree, params, tmp_path) -> None:
    from msvlad.storage import save_npz

    results_dir = tmp_path / "evaluate"
    shutil.copytree(tree.results_dir, results_dir)
    out = results_dir / "msvlad" / DATASET
    f = dict(np.load(out / "features.npz"))
    rng = np.random.default_rng(1)
    f["q_raw"] = rng.normal(size=(f["q"].shape[0], 6)).astype(np.float32)
    f["db_raw"] = rng.normal(size=(f["db"].shape[0], 6)).astype(np.float32)
    save_npz(out / "features.npz", **f)
    shutil.copyfile(out / "per_query.csv", out / "per_query_raw.csv")
    ex = explorers.RankingsExplorer(params, results_dir, method="msvlad", top_k=3)
    assert ex.variants() == ["plain", "raw", "qe", "dba"]
    ex.select(variant="raw")
    q = ex.query
    column = np.argsort(-(f["db_raw"].astype(np.float64) @ f["q_raw"][q]), kind="stable")
    ok, junk = _truth(load_dataset(tree.data_root, DATASET), q, ex.setup)
    (rl,) = ex.view()
    assert rl.variant == "raw" and rl.label.endswith("+raw (unwhitened)")
    want = _expected_items(column, ok, junk, set(), 3)
    assert (
        list(zip(rl.items["rank"], rl.items["db_index"], rl.items["relevance"], strict=True))
        == want
    )
    np.testing.assert_allclose(
        rl.items["sim"], f["db_raw"][rl.items["db_index"]].astype(np.float64) @ f["q_raw"][q]
    )
    other = explorers.RankingsExplorer(params, results_dir, method="msvlad-ots")
    assert "raw" not in other.variants()  # no unwhitened arrays there


# ------------------------------------------------------------------ the finished mini run
REPO = Path(__file__).resolve().parents[1]
MINI = REPO / "results" / "evaluate"


@pytest.mark.slow
@pytest.mark.skipif(
    not (MINI / "msvlad" / "mini-test" / "ranks.npy").is_file(),
    reason="needs a finished mini run (dvc repro) in results/evaluate",
)
def test_mini_run_variant_rankings_reproduce_evaluate_and_own_photos() -> None:
    import hashlib

    from msvlad.evaluation.pipeline import score

    params = load_params(REPO / "params.yaml")
    data = explorers.RunResults(params, MINI)
    ds = data.dataset("mini-test")
    for method in data.methods("mini-test"):
        _, plain = score(data.descriptors(method, "mini-test"), ds, data.evaluate_cfg(method))
        stored = np.load(MINI / method / "mini-test" / "ranks.npy")
        rows, cols = np.nonzero(plain != stored)  # only float32 ties may swap (see below)
        feats = data.features(method, "mini-test")
        sims = feats["db"].astype(np.float64) @ feats["q"].astype(np.float64).T
        gap = np.abs(sims[plain[rows, cols], cols] - sims[stored[rows, cols], cols])
        assert len(rows) <= 4 and (gap < 1e-6).all(), (method, rows, cols, gap)
        assert {"plain", "qe", "dba"} <= set(data.variants(method, "mini-test"))
        for variant in data.variants(method, "mini-test"):
            ranks = data.ranks(method, "mini-test", variant)
            for setup in ("easy", "medium", "hard"):
                want = data.per_query(method, "mini-test", setup, variant)["AP"].to_numpy()
                got = [
                    explorers.ranking.score_column(
                        ranks[:, q], data.truth("mini-test", setup, q), 10
                    )[0]
                    for q in range(len(ds.qimlist))
                ]
                # what evaluate scored; a query may differ only where two results tie within
                # float32 rounding (faiss breaks such ties by its thread count's summation order)
                bad = np.flatnonzero(~np.isclose(got, want, rtol=0, atol=1e-9) & np.isfinite(want))
                q_vec, db_vec = data.vectors(method, "mini-test", variant)
                for q in bad:
                    sims = np.sort(db_vec.astype(np.float64) @ q_vec[q].astype(np.float64))
                    assert np.diff(sims).min() < 1e-6, (method, variant, setup, q)
                    assert abs(got[q] - want[q]) < 0.01
                assert len(bad) <= 2, (method, variant, setup, bad)
    # the own photo: a junk database image with the query's bytes (e.g. graf_q0 -> graf_009)
    own = data.own_photos("mini-test")
    digest = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()  # noqa: E731
    for q, found in enumerate(own):
        junk = {int(i) for i in ds.gnd[q]["junk"]}
        same = {i for i in junk if digest(ds.image_path(i)) == digest(ds.query_path(q))}
        assert found == same
    assert own[0] == {ds.imlist.index("graf_009")} and sum(map(len, own)) > 0
    ex = explorers.RankingsExplorer(params, MINI, method="msvlad", top_k=30)
    for q in [q for q, o in enumerate(own) if o][:5]:
        ex.select(query=q)
        (rl,) = ex.view()
        assert not set(rl.items["db_index"]) & own[q] and rl.own_photo
        assert (rl.items["rank"] > 0).sum() == 30  # 30 ranked results, junk between them
    assert len(data.landmarks("mini-test").names) == 15  # the mini-test scenes
