"""msvlad.report.figures: expected panels, border colours and titles; saving is atomic."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

from fixtures_runs import DATASET, make_run_tree
from msvlad.config import load_params
from msvlad.data.testsets import load_dataset
from msvlad.report import drawing, figures, results, runs


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
    c = drawing.COLORS
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
    c = drawing.COLORS
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
    assert tile.shape == (drawing.THUMB, drawing.THUMB, 3) and np.all(np.asarray(tile) == 200)


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
            tuple(int(drawing.SETUP_COLORS["medium"][i : i + 2], 16) / 255 for i in (1, 3, 5))
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


@pytest.mark.slow  # dvc plots show in a scratch repository (and Chromium when installed)
def test_dvc_plots_show_draws_offline_one_colour_per_method(tmp_path: Path) -> None:
    import json
    import re
    import shutil
    import subprocess
    import sys

    import yaml

    root = Path(__file__).resolve().parents[1]
    repo = tmp_path / "repo"
    repo.mkdir()
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([*dvc, "init", "-q"], cwd=repo, check=True)
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copyfile(root / name, repo / name)
    shutil.copyfile(root / ".dvc" / "config", repo / ".dvc" / "config")
    shutil.copytree(root / ".dvc" / "plots", repo / ".dvc" / "plots")
    plots = yaml.safe_load((root / "dvc.yaml").read_text())["plots"]
    files = sorted({f for p in plots for spec in p.values() for f in spec["y"]})
    for i, rel in enumerate(files):  # each method's curves differ (by i)
        path = repo / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith("log.csv"):
            rows = [f"{s},{0.1 + 0.01 * i - 0.001 * s:.4f},{70 + i + s / 10}" for s in (0, 20, 40)]
            path.write_text("step,loss,val_map\n" + "\n".join(rows) + "\n")
        else:
            rows = [f"{r},{30 + i + r},{10 + r},{20 - r}" for r in range(4)]
            path.write_text("round,triplets,semi_hard,hard\n" + "\n".join(rows) + "\n")
    out = tmp_path / "html"
    done = subprocess.run(
        [*dvc, "plots", "show", "-o", str(out)], cwd=repo, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    page = (out / "index.html").read_text()
    assert "<script src" not in page and "cdn" not in page  # nothing fetched from the network
    urls = set(re.findall(r"https?://[^\s\"'<>]+", page))
    assert urls <= {"http://www.w3.org/2000/svg", "https://vega.github.io/schema/vega-lite/v5.json"}
    specs = [json.loads(m) for m in re.findall(r"var spec = (\{.*?\});\n", page, flags=re.S)]
    assert len(specs) == len(plots)
    assert all(
        s["encoding"]["color"]["field"] == "series" and "msvlad" in s["usermeta"] for s in specs
    )
    from jupyterlab_browser import CHROMIUM_ARGS, chromium_path, missing_browser

    if missing_browser() is not None:
        return
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        tab = browser.new_page()
        requests: list[str] = []
        tab.on("request", lambda r: requests.append(r.url))
        tab.goto((out / "index.html").as_uri())
        drawn = tab.evaluate(
            "() => [...document.querySelectorAll('.msvlad-plot')].map(d => [...d.querySelectorAll("
            "'g.series')].map(g => [g.dataset.series, g.querySelector('polyline').getAttribute("
            "'stroke'), g.querySelectorAll('circle').length]))"
        )
        browser.close()
    assert requests == [(out / "index.html").as_uri()]
    miners = ["msvlad", "msvlad-batchhard", "msvlad-hardest", "msvlad-random"]
    colours = {}
    for lines in drawn[:3]:  # validation mAP, loss, triplets: one line per miner
        assert sorted(name for name, _, _ in lines) == miners
        for name, colour, _ in lines:
            assert colours.setdefault(name, colour) == colour  # a method keeps its colour
    assert len(set(colours.values())) == 4
    assert [n for n, _, _ in drawn[0]] and all(k == 3 for _, _, k in drawn[0])  # 3 logged steps
    assert sorted(n for n, _, _ in drawn[3]) == ["msvlad · hard", "msvlad · semi_hard"]


def test_styled_report_tables_two_decimals_yes_no_full_labels() -> None:
    from msvlad.report import tables

    label = "MS-NetVLAD + difficulty, fp16 mining pool (identical to the paper's row) +QE"
    frame = pd.DataFrame(
        {
            "Method": [label, "GeM"],
            "mAP": [62.123456, np.nan],
            "holds": [True, False],
            "lr": [5e-06, 1e-4],
            "Queries": [120, 120],
        }
    )
    html = tables.styled(frame, scientific=["lr"], index=False).to_html()
    cells = [c.strip() for c in re.findall(r"<td[^>]*>([^<]*)</td>", html)]
    assert cells == [label, "62.12", "yes", "5.00e-06", "120", "GeM", "–", "no", "1.00e-04", "120"]
    assert "62.1234" not in html and "True" not in html
    three = tables.styled(frame, decimals={"mAP": 3}).to_html()
    assert ">62.123<" in three.replace(" ", "") and ">0<" in three.replace(" ", "")  # index kept
    assert frame["mAP"].iloc[0] == 62.123456  # the frame itself is unchanged
    # the same table gives the same HTML bytes (no random id), another table another id; its
    # plain-text form (what a saved notebook keeps beside the HTML) is the table, not an address
    assert repr(tables.styled(frame)) == frame.to_string()
    assert tables.styled(frame, decimals={"mAP": 3}).to_html() == three
    other = tables.styled(frame.assign(Queries=[121, 120]), decimals={"mAP": 3}).to_html()
    assert re.search(r'id="(T_\w+)"', other)[1] != re.search(r'id="(T_\w+)"', three)[1]
