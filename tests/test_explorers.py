"""msvlad.report.explorers: widgets driven from Python show the expected images and numbers."""

from __future__ import annotations

import shutil

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
from msvlad.report.figures import COLORS

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory):
    return make_run_tree(tmp_path_factory.mktemp("explore"))


@pytest.fixture(scope="module")
def params(tree):
    return load_params(tree.params_file)


@pytest.fixture(scope="module")
def dataset(tree):
    return load_dataset(tree.data_root, DATASET)


def _csv(tree, method: str, setup: str) -> pd.DataFrame:
    """per_query.csv read independently of msvlad.report (fractions -> percent)."""
    frame = pd.read_csv(tree.results_dir / method / DATASET / "per_query.csv")
    frame = frame[frame["setup"] == setup].reset_index(drop=True)
    return frame.assign(AP=frame["AP"] * 100, **{"P@5": frame["P@5"] * 100})


def _border(ax) -> str:
    colors = {to_hex(s.get_edgecolor()) for s in ax.spines.values()}
    assert len(colors) == 1, colors
    return colors.pop()


def test_interactive_session_follows_the_jupyter_server(monkeypatch, tree, params) -> None:
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    assert not explorers.interactive_session()
    static = explorers.rankings_explorer(params, tree.results_dir, method="msvlad")
    assert isinstance(static, Figure)  # papermill / plain kernels: the first view as a figure
    monkeypatch.setenv("JPY_SESSION_NAME", "/lab/notebooks/rankings.ipynb")  # set by jupyter_server
    assert explorers.interactive_session()
    live = explorers.rankings_explorer(params, tree.results_dir, method="msvlad")
    assert isinstance(live, explorers.RankingsExplorer)
    assert isinstance(
        explorers.rankings_explorer(params, tree.results_dir, interactive=False), Figure
    )
    trip = explorers.triplet_explorer(params, tree.runs_dir)
    assert isinstance(trip, explorers.TripletExplorer)


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


def test_ranked_list_relevance_ap_and_precision(dataset) -> None:
    g = dataset.gnd[0]
    easy0, easy1, hard, junk = int(g["easy"][0]), int(g["easy"][1]), int(g["hard"][0]), g["junk"][0]
    other = next(i for i in range(len(dataset.imlist)) if i not in {*g["easy"], *g["hard"], junk})
    head = [easy0, int(junk), other, hard, easy1]
    column = head + [i for i in range(len(dataset.imlist)) if i not in head]
    ranks = np.stack([np.array(column)] * len(dataset.qimlist), axis=1)
    feats = {
        "q": np.eye(4, 8)[: len(dataset.qimlist)],
        "db": np.random.default_rng(0).normal(size=(len(dataset.imlist), 8)),
    }
    rl = explorers.ranked_list(dataset, ranks, 0, 4, "medium", label="m", features=feats)
    assert rl.items["db_index"].tolist() == head[:4]
    assert rl.items["relevance"].tolist() == ["positive", "junk", "negative", "positive"]
    assert rl.items["kind"].tolist() == ["easy", "junk", "neg", "hard"]
    np.testing.assert_allclose(rl.items["sim"], feats["db"][head[:4], 0])  # q0 = e0
    # junk dropped: positives at 0-based positions 0, 2, 3 of 3 -> trapezoid AP by hand
    ap = (1.0 + (1 / 2 + 2 / 3) / 2 + (2 / 3 + 3 / 4) / 2) / 3
    assert rl.ap == pytest.approx(100 * ap)
    assert rl.precision == pytest.approx(75.0)  # P@4: 3 positives in the first 4 non-junk
    assert rl.positive_ranks.tolist() == [1, 4, 5] and rl.num_positives == 3
    assert explorers.ranked_list(dataset, ranks, 0, 2, "medium").precision == pytest.approx(50.0)
    hard_only = explorers.ranked_list(dataset, ranks, 0, 4, "hard")
    assert hard_only.items["relevance"].tolist() == ["junk", "junk", "negative", "positive"]


def test_rankings_explorer_follows_its_controls(tree, params, dataset) -> None:
    cache = explorers.ThumbnailCache()
    ex = explorers.RankingsExplorer(
        params, tree.results_dir, method="msvlad", compare="msvlad-ots", top_k=5, cache=cache
    )
    assert len(cache) == 0  # nothing decoded before something is shown
    box = ex.widget()
    first = ex.query
    ours = np.load(tree.results_dir / "msvlad" / DATASET / "ranks.npy")
    theirs = np.load(tree.results_dir / "msvlad-ots" / DATASET / "ranks.npy")
    # decoded: the whole query, its crop (2nd row) and each shown database image once
    assert cache.misses == 2 + len({*ours[:5, first], *theirs[:5, first]})
    assert "msvlad-rankings" in box._dom_classes and bytes(ex.image.value).startswith(PNG)
    c = ex.controls
    assert c["dataset"].options == (DATASET,)
    assert [v for _, v in c["method"].options] == ["msvlad", "msvlad-hardest", "msvlad-ots"]
    assert [v for _, v in c["setup"].options] == ["easy", "medium", "hard"]
    # first view: the query with the lowest Medium AP of `method`, by both methods
    medium = _csv(tree, "msvlad", "medium")
    assert ex.query == int(medium["AP"].idxmin())
    assert [q for _, q in c["query"].options] == medium.sort_values("AP").index.tolist()

    q = int(medium["AP"].idxmax())
    before = ex.image.value
    c["query"].value = q
    a, b = ex.shown
    assert (a.method, b.method, a.query_index, b.query_index) == ("msvlad", "msvlad-ots", q, q)
    assert a.items["db_index"].tolist() == ours[:5, q].tolist()
    assert b.items["db_index"].tolist() == theirs[:5, q].tolist()
    assert a.ap == pytest.approx(medium.loc[q, "AP"], abs=1e-9)
    assert a.precision == pytest.approx(medium.loc[q, "P@5"], abs=1e-9)
    assert ex.image.value != before and bytes(ex.image.value).startswith(PNG)
    text = ex.summary.value
    assert (
        f"query {dataset.qimlist[q]}" in text and f"AP {a.ap:.1f} · P@5 {a.precision:.1f}" in text
    )
    assert all(dataset.imlist[i] in text for i in ours[:5, q])
    # the figure: query + top-5 per method, borders by relevance, the right thumbnails
    fig = ex.figure()
    axes = fig.axes
    assert len(axes) == 12
    gnd = dataset.gnd[q]
    pos, junk = {*gnd["easy"], *gnd["hard"]}, set(gnd["junk"])
    for j, idx in enumerate(ours[:5, q]):
        want = "positive" if idx in pos else "junk" if idx in junk else "negative"
        assert _border(axes[1 + j]) == COLORS[want]
        assert axes[1 + j].get_title().startswith(f"#{j + 1} ")
        np.testing.assert_array_equal(
            axes[1 + j].images[0].get_array(), cache.get(dataset.image_path(int(idx)))
        )
    assert _border(axes[0]) == COLORS["query"] and len(axes[0].patches) == 1  # the query's box

    # top-k slider, setup buttons, query order, second method
    c["top_k"].value = 3
    assert len(ex.shown[0].items) == 3 and len(ex.figure().axes) == 8
    c["setup"].value = "hard"
    hard = _csv(tree, "msvlad", "hard")
    assert ex.shown[0].setup == "hard" and ex.query == q  # the same query under another setup
    assert ex.shown[0].ap == pytest.approx(hard.loc[q, "AP"], abs=1e-9)
    c["order"].value = "gain_desc"
    gain = (hard["AP"] - _csv(tree, "msvlad-ots", "hard")["AP"]).sort_values(ascending=False)
    assert [q for _, q in c["query"].options] == gain.index.tolist()
    c["compare"].value = ""
    assert len(ex.shown) == 1 and ex.order == "ap_asc"
    assert "gain_desc" not in [v for _, v in c["order"].options]
    # going back to a query decodes nothing new
    c["query"].value = 0
    c["query"].value = 1
    misses = cache.misses
    c["query"].value = 0
    assert cache.misses == misses and cache.hits > 0


def test_rankings_explorer_bad_input(tree, params, tmp_path) -> None:
    ex = explorers.RankingsExplorer(params, tree.results_dir)
    with pytest.raises(ValueError, match="unknown control"):
        ex.select(colour="red")
    with pytest.raises(ValueError, match="dataset: 'nope'"):
        ex.select(dataset="nope")
    with pytest.raises(FileNotFoundError, match="ranks.npy"):
        explorers.RankingsExplorer(params, tmp_path)
    with pytest.raises(ValueError, match="compare: 'nope' is not a method"):
        explorers.RankingsExplorer(params, tree.results_dir, compare="nope")
    with pytest.raises(ValueError, match="order: expected one of"):
        explorers.RankingsExplorer(params, tree.results_dir, order="random")
    with pytest.raises(ValueError, match="method: 'msvlad-ots' has no"):
        explorers.TripletExplorer(params, tree.runs_dir, method="msvlad-ots")  # not trained


@pytest.mark.slow  # about 8 redraws of a 20-panel figure
def test_triplet_explorer_filters_neighbours_and_band(tree, params) -> None:
    ex = explorers.TripletExplorer(params, tree.runs_dir, cache=explorers.ThumbnailCache())
    ex.widget()
    c = ex.controls
    trip = pd.read_csv(tree.runs_dir / "msvlad" / "train" / "triplets.csv")
    assert [v for _, v in c["method"].options] == ["msvlad", "msvlad-hardest"]  # trained only
    assert ex.triplet == int(trip["loss"].idxmax())  # first view: the highest predicted loss
    assert list(c["round"].options) == ["all", 0, 1, 2, 3]

    c["kind"].value = "hard"
    want = trip[trip["kind"] == "hard"].sort_values("loss", ascending=False)
    assert [v for _, v in c["triplet"].options] == want.index.tolist()
    assert ex.shown["kind"] == "hard"
    c["round"].value = 1
    want = want[want["round"] == 1]
    assert [v for _, v in c["triplet"].options] == want.index.tolist()
    lo, hi = float(want["loss"].min()), float(want["loss"].max())
    c["loss"].value = (lo, (lo + hi) / 2)
    inside = want[(want["loss"] >= lo) & (want["loss"] <= (lo + hi) / 2)]
    assert [v for _, v in c["triplet"].options] == inside.index.tolist()
    c["sort"].value = "loss_asc"
    c["triplet"].value = int(inside.index[0])

    t = trip.loc[ex.triplet]
    nbs = pd.read_csv(tree.runs_dir / "msvlad" / "train" / "neighbors.csv")
    nbs = nbs[(nbs["round"] == t["round"]) & (nbs["anchor"] == t["anchor"])].sort_values("rank")
    shown = ex.shown_neighbors
    assert shown["neighbor"].tolist() == nbs["neighbor"].tolist()
    np.testing.assert_allclose(shown["d2"], 2 - 2 * nbs["sim"].to_numpy())
    assert shown.loc[t["pos_rank"], "role"] == "positive"
    assert shown.loc[t["neg_rank"], "role"] == "negative"
    assert shown["same_class"].tolist() == (nbs["label"] == t["anchor_label"]).tolist()
    # the figure: anchor / positive / negative, the neighbours (P and N marked), the band
    fig = ex.figure()
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[1].startswith(f"positive · rank {t['pos_rank']}")
    assert any(s.startswith(f"P · #{t['pos_rank']} ") for s in titles)
    assert any(s.startswith(f"N · #{t['neg_rank']} ") for s in titles)
    axis = next(ax for ax in fig.axes if ax.get_xlabel().startswith("squared distance"))
    band = axis.patches[0].get_x(), axis.patches[0].get_x() + axis.patches[0].get_width()
    d2p, delta = 2 - 2 * t["pos_sim"], params.miner.delta
    np.testing.assert_allclose(band, [d2p - delta, d2p + delta])
    text = ex.summary.value
    assert f"predicted loss {t['loss']:.4f}" in text and str(t["positive"]) in text
    assert f"{len(inside)} triplet" in text
    # another method: its own triplets and loss range
    c["method"].value = "msvlad-hardest"
    other = pd.read_csv(tree.runs_dir / "msvlad-hardest" / "train" / "triplets.csv")
    assert c["loss"].min == pytest.approx(other["loss"].min())
    assert ex.round == 1 and set(ex.candidates()["round"]) == {1}


def test_triplet_explorer_without_a_neighbor_log(tree, params, tmp_path) -> None:
    runs_dir = tmp_path / "runs"
    shutil.copytree(tree.runs_dir, runs_dir)
    (runs_dir / "msvlad" / "train" / "neighbors.csv").unlink()
    assert runs.load_neighbors(runs_dir / "msvlad" / "train") is None
    ex = explorers.TripletExplorer(params, runs_dir, method="msvlad")
    fig = ex.figure()
    assert ex.shown_neighbors.empty
    assert any("not recorded" in t.get_text() for sub in fig.subfigs for t in sub.texts)
    ex.select(kind="no-such-kind")
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
