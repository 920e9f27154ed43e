"""msvlad.report.figures: expected panels, border colours and titles; saving is atomic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

from fixtures_runs import DATASET, make_run_tree
from msvlad.config import load_params
from msvlad.data.testsets import load_dataset
from msvlad.report import figures, results, runs


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory):
    return make_run_tree(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def params(tree):
    return load_params(tree.params_file)


@pytest.fixture(scope="module")
def dataset(tree):
    return load_dataset(tree.data_root, DATASET)


def _border(ax) -> str:
    colors = {to_hex(s.get_edgecolor()) for s in ax.spines.values()}
    assert len(colors) == 1, colors
    return colors.pop()


def test_save_figure_png_and_pdf(tmp_path: Path) -> None:
    fig = Figure()
    fig.subplots().plot([0, 1], [1, 0])
    out = figures.save_figure(fig, "demo", "line", tmp_path)
    assert [p.name for p in out] == ["line.png", "line.pdf"]
    assert out[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out[1].read_bytes()[:5] == b"%PDF-"
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == [
        "line.pdf",
        "line.png",
    ]  # no temp files
    assert [p.name for p in figures.save_figure(fig, "demo", "only", tmp_path, pdf=False)] == [
        "only.png"
    ]
    with pytest.raises(ValueError, match="name"):
        figures.save_figure(fig, "demo", "../escape", tmp_path)


def test_plot_ranking_borders_and_ap(dataset) -> None:
    g = dataset.gnd[0]
    easy, hard, junk = int(g["easy"][0]), int(g["hard"][0]), int(g["junk"][0])
    other = [i for i in range(len(dataset.imlist)) if i not in {*g["easy"], *g["hard"], *g["junk"]}]
    column = [
        easy,
        junk,
        other[0],
        hard,
        *[i for i in range(len(dataset.imlist)) if i not in {easy, junk, other[0], hard}],
    ]
    ranks = np.stack([np.array(column)] * len(dataset.qimlist), axis=1)
    fig = figures.plot_ranking(dataset, ranks, 0, top_k=4, setup="medium")
    # 4 ranked results and the junk between them, unnumbered (ranks count as revisitop's)
    assert isinstance(fig, Figure) and len(fig.axes) == 6
    c = figures.COLORS
    assert [_border(ax) for ax in fig.axes] == [
        c["query"],
        c["positive"],
        c["junk"],
        c["negative"],
        c["positive"],
        c["positive"],
    ]
    titles = [ax.get_title() for ax in fig.axes[1:]]
    assert titles == ["#1 easy", "junk", "#2 neg", "#3 hard", "#4 easy"]
    ap = results.query_ap(dataset, ranks, 0, "medium")
    assert f"AP {ap:.1f}" in fig.axes[0].get_title()
    # the query thumbnail is the bbx crop (60 x 44 pixels of an 80 x 60 image)
    assert fig.axes[0].images[0].get_array().shape[:2] == (44, 60)
    # hard setup: easy positives become junk
    hard_fig = figures.plot_ranking(dataset, ranks, 0, top_k=2, setup="hard")
    assert [_border(ax) for ax in hard_fig.axes[1:]] == [c["junk"], c["junk"], c["negative"]] + [
        c["positive"]
    ]


def test_plot_rankings_grid_and_comparison(tree, dataset) -> None:
    ranks = results.load_ranks(tree.results_dir, "msvlad", DATASET)
    fig = figures.plot_rankings_grid(dataset, ranks, [0, 2, 3], top_k=3)
    assert len(fig.axes) == 3 * 4
    assert "query q2" in fig.axes[4].get_title()
    other = results.load_ranks(tree.results_dir, "msvlad-ots", DATASET)
    cmp = figures.plot_ranking_comparison(
        dataset, {"trained": ranks, "off-the-shelf": other}, 1, top_k=2
    )
    assert len(cmp.axes) == 2 * 3
    assert cmp.axes[0].get_title().startswith("trained") and cmp.axes[3].get_title().startswith(
        "off-the-shelf"
    )
    with pytest.raises(ValueError, match="out of range"):
        figures.plot_rankings_grid(dataset, ranks, [9], top_k=2)
    with pytest.raises(ValueError, match="ranks"):
        figures.plot_rankings_grid(dataset, ranks[:, :2], [3], top_k=2)


def test_plot_triplets_gallery(tree) -> None:
    trip = runs.load_triplets(tree.runs_dir / "msvlad" / "train")
    fig = figures.plot_triplets(tree.train_root, trip, n=4)
    assert len(fig.axes) == 4 * 3
    c = figures.COLORS
    assert [_border(ax) for ax in fig.axes[:3]] == [c["query"], c["positive"], c["negative"]]
    first = trip.iloc[0]
    assert f"rank {first['pos_rank'] + 1}\n" in fig.axes[1].get_title()  # logs are 0-based
    assert f"rank {first['neg_rank'] + 1}\n" in fig.axes[2].get_title()
    assert (
        f"loss {first['loss']:.3f}" in fig.axes[2].get_title()
        and first["kind"] in fig.axes[0].get_title()
    )
    assert fig.axes[0].images[0].get_array().shape[:2] == (56, 56)
    empty = figures.plot_triplets(tree.train_root, trip.iloc[:0])
    assert len(empty.axes) == 1 and empty.axes[0].texts[0].get_text() == "no mined triplets to show"


def test_missing_image_becomes_grey_tile(tree) -> None:
    trip = (
        runs.load_triplets(tree.runs_dir / "msvlad" / "train").head(1).assign(anchor="gone/0.jpg")
    )
    fig = figures.plot_triplets(tree.train_root, trip)
    tile = fig.axes[0].images[0].get_array()
    assert tile.shape == (figures.THUMB, figures.THUMB, 3) and np.all(np.asarray(tile) == 200)


def test_plot_miner_stats_panels(tree) -> None:
    run = tree.runs_dir / "msvlad" / "train"
    stats, trip = runs.miner_stats(run), runs.load_triplets(run)
    fig = figures.plot_miner_stats(stats, trip)
    assert len(fig.axes) == 4
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights == list(stats["triplets"])
    # 2 x 30 bins
    assert "similarities" in fig.axes[3].get_title() and len(fig.axes[3].patches) == 60
    mix = fig.axes[1]
    assert [t.get_text() for t in mix.get_legend().get_texts()] == ["hard", "semi-hard"]
    hard = [p.get_height() for p in mix.patches[:5]]
    np.testing.assert_allclose(hard, list(stats["hard_frac"].fillna(0.0)))
    # another miner's kinds get their own band; each round's bands sum to 1
    other = figures.plot_miner_stats(stats, trip.assign(kind="hardest-negative"))
    assert [t.get_text() for t in other.axes[1].get_legend().get_texts()] == ["hardest-negative"]
    np.testing.assert_allclose([p.get_height() for p in other.axes[1].patches][:4], [1.0] * 4)


def test_plot_training_curves(tree, params) -> None:
    logs = runs.load_training_logs(tree.runs_dir, params)
    fig = figures.plot_training_curves(logs)
    assert len(fig.axes) == 4
    assert len(fig.axes[0].lines) == 2 and fig.axes[2].get_yscale() == "log"
    np.testing.assert_allclose(fig.axes[3].lines[0].get_ydata(), [46.0, 51.0, 56.0])
    assert len(figures.plot_training_curves(logs.iloc[:0]).axes) == 1


def test_identical_training_curves_stay_distinguishable(tree, params) -> None:
    logs = runs.load_training_logs(tree.runs_dir, params)
    first = logs[logs["method"] == "msvlad"]
    twin = first.assign(method="msvlad-fp16-pool", label="… fp16 mining pool")  # same run
    fig = figures.plot_training_curves(pd.concat([first, twin, logs[logs["method"] != "msvlad"]]))
    lines = fig.axes[0].lines
    labels = [line.get_label() for line in lines]
    assert labels[1] == f"… fp16 mining pool (identical to {first['label'].iloc[0]})"
    np.testing.assert_array_equal(lines[0].get_ydata(), lines[1].get_ydata())
    styles = [(line.get_linestyle(), line.get_marker(), line.get_color()) for line in lines]
    assert len(set(styles)) == 3  # every method its own colour, line style and marker
    assert (
        lines[1].get_linewidth() > lines[0].get_linewidth()
        and lines[1].get_markerfacecolor() == "none"
    )
    assert "identical" not in labels[2]
    val = figures.plot_validation_curves(pd.concat([first, twin]))
    assert "identical to" in val.axes[0].lines[1].get_label()


def test_save_figure_writes_only_when_asked(tmp_path: Path) -> None:
    fig = Figure()
    fig.subplots().plot([0, 1], [1, 0])
    assert figures.save_figure(fig, "demo", "line", tmp_path, write=False) == []
    assert not (tmp_path / "demo").exists()


def test_plot_validation_curves_skips_epochs_without_validation(tree, params) -> None:
    logs = runs.load_training_logs(tree.runs_dir, params)
    logs.loc[logs["epoch"] == 1, "val_map"] = np.nan  # val_every 2: no value at epoch 1
    fig = figures.plot_validation_curves(logs, title="val")
    ax = fig.axes[0]
    assert len(ax.lines) == logs["method"].nunique()
    first = logs[logs["method"] == logs["method"].iloc[0]].dropna(subset=["val_map"])
    np.testing.assert_allclose(ax.lines[0].get_xdata(), first["step"])
    np.testing.assert_allclose(ax.lines[0].get_ydata(), first["val_map"])
    assert not np.isnan(ax.lines[0].get_ydata()).any()
    empty = figures.plot_validation_curves(logs.assign(val_map=np.nan))
    assert "no validation mAP" in empty.axes[0].texts[0].get_text()


def test_plot_results_bars_and_bootstrap(tree, params) -> None:
    df = results.load_results(tree.results_dir, params)
    fig = figures.plot_results_bars(df)
    assert len(fig.axes) == 1
    plain = df[(df["variant"] == "plain") & (df["setup"] == "medium")]
    widths = sorted(
        round(p.get_width(), 6)
        for p in fig.axes[0].patches
        if p.get_facecolor()[:3]
        == pytest.approx(
            tuple(int(figures.SETUP_COLORS["medium"][i : i + 2], 16) / 255 for i in (1, 3, 5))
        )
    )
    assert widths == sorted(round(v, 6) for v in plain["mAP"])
    boot = results.bootstrap_table(tree.results_dir, "msvlad-ots", params, n_boot=100)
    bfig = figures.plot_bootstrap(boot)
    assert len(bfig.axes) == 1 and [t.get_text() for t in bfig.axes[0].get_yticklabels()] == list(
        boot["Method"]
    )


def test_plot_query_gains(tree) -> None:
    gains = results.per_query_gains(tree.results_dir, "msvlad", "msvlad-ots", DATASET)
    fig = figures.plot_query_gains(gains)
    assert len(fig.axes) == 2
    np.testing.assert_allclose([p.get_height() for p in fig.axes[1].patches], gains["gain"])
    assert len(figures.plot_query_gains(gains.iloc[:0]).axes) == 1
