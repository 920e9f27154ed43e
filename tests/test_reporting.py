"""msvlad.report: tables against hand-built metrics, per-query logic, miner stats, exports."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml

from fixtures_runs import DATASET, TRAIN_SET, make_run_tree
from msvlad.config import load_params, params_from_dict
from msvlad.data.testsets import load_dataset
from msvlad.report import results, runs, tables
from msvlad.storage import read_json, write_json


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory):
    return make_run_tree(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def params(tree):
    return load_params(tree.params_file)


def _metrics(values: dict[str, float], variant: str, protocol: str = "revisited") -> dict:
    """metrics.json entry of one variant: mAP per setup = value, mP@k = value + k."""
    return {
        "mAP": dict(values),
        "mP@k": {s: {"1": v + 1, "5": v + 5, "10": v + 10} for s, v in values.items()},
        "dataset": "x",
        "protocol": protocol,
        "variant": variant,
        "num_queries": 7,
        "num_db": 50,
        "dim": 8,
        "extract_seconds": 1.0,
        "failed_images": 0,
    }


@pytest.fixture
def hand_results(tmp_path: Path, tree):
    """Hand-written metrics.json: two datasets (revisited, classic), four methods, one missing."""
    raw = yaml.safe_load(tree.params_file.read_text())
    raw["methods"]["gem-ots"] = {"label": "GeM", "pooling": "gem", "miner": None}
    raw["methods"]["absent"] = {"label": "Never evaluated", "pooling": "mac", "miner": None}
    raw["data"]["test_sets"] = ["roxf", "oxford5k"]  # table columns follow this order
    params = params_from_dict(raw)
    res = tmp_path / "results"
    e = {"easy": 80.0, "medium": 60.0, "hard": 30.0}
    for key, shift, variants in (
        ("msvlad", 0.0, ("plain", "qe", "dba")),
        ("msvlad-hardest", -5.0, ("plain", "qe")),
        ("msvlad-ots", -20.0, ("plain", "qe", "dba")),
        ("gem-ots", -30.0, ("plain",)),
    ):
        body = {
            "roxf": {
                v: _metrics({s: x + shift + 1.5 * i for s, x in e.items()}, v)
                for i, v in enumerate(variants)
            },
            "oxford5k": {
                v: _metrics({"all": 70.0 + shift + i}, v, "classic") for i, v in enumerate(variants)
            },
        }
        write_json(res / key / "metrics.json", body)
    return res, params


def test_load_results_long_format(hand_results) -> None:
    res, params = hand_results
    df = results.load_results(res, params)
    # 3 + 2 + 3 + 1 variants, each 3 revisited setups + 1 classic setup; "absent" skipped
    assert len(df) == (3 + 2 + 3 + 1) * 4
    assert list(dict.fromkeys(df["method"])) == [
        "msvlad",
        "msvlad-hardest",
        "msvlad-ots",
        "gem-ots",
    ]
    row = df[
        (df.method == "msvlad-hardest")
        & (df.variant == "qe")
        & (df.dataset == "roxf")
        & (df.setup == "hard")
    ]
    assert row["mAP"].item() == pytest.approx(30.0 - 5.0 + 1.5)
    assert row["mP@10"].item() == pytest.approx(30.0 - 5.0 + 1.5 + 10)
    assert set(df["training_set"]) == {
        TRAIN_SET,
        f"ImageNet + k-means on {TRAIN_SET}",
        "ImageNet only",
    }


def test_results_table_cells_rows_and_training_set(hand_results) -> None:
    res, params = hand_results
    table = results.results_table(results.load_results(res, params))
    assert list(table.index) == [
        "msvlad",
        "msvlad+qe",
        "msvlad+dba",
        "msvlad-hardest",
        "msvlad-hardest+qe",
        "msvlad-ots",
        "msvlad-ots+qe",
        "msvlad-ots+dba",
        "gem-ots",
    ]
    assert list(table.columns) == [
        "Method",
        "Training set",
        "roxf mAP E",
        "roxf mAP M",
        "roxf mAP H",
        "roxf mP@10 E",
        "roxf mP@10 M",
        "roxf mP@10 H",
        "oxford5k mAP",
        "oxford5k mP@10",
    ]
    assert table.at["msvlad", "roxf mAP M"] == pytest.approx(60.0)
    assert table.at["msvlad+dba", "roxf mAP E"] == pytest.approx(80.0 + 3.0)
    assert table.at["msvlad-ots+qe", "roxf mAP H"] == pytest.approx(30.0 - 20.0 + 1.5)
    assert table.at["msvlad-ots+qe", "roxf mP@10 H"] == pytest.approx(30.0 - 20.0 + 1.5 + 10)
    assert table.at["gem-ots", "oxford5k mAP"] == pytest.approx(40.0)
    assert table.at["msvlad-hardest+qe", "oxford5k mP@10"] == pytest.approx(70.0 - 5.0 + 1 + 10)
    assert table.at["msvlad+qe", "Method"] == "MS-NetVLAD + difficulty miner +QE"
    assert table.at["msvlad-ots+dba", "Method"] == "MS-NetVLAD, k-means init +DBA"
    assert table.at["msvlad+dba", "Training set"] == TRAIN_SET
    assert table.at["msvlad-ots+qe", "Training set"] == f"ImageNet + k-means on {TRAIN_SET}"
    assert table.at["gem-ots", "Training set"] == "ImageNet only"


def test_results_table_options(hand_results) -> None:
    res, params = hand_results
    df = results.load_results(res, params)
    plain = results.results_table(df, variants=("plain",), kappa=None, setups=("medium", "hard"))
    assert list(plain.index) == ["msvlad", "msvlad-hardest", "msvlad-ots", "gem-ots"]
    assert list(plain.columns) == [
        "Method",
        "Training set",
        "roxf mAP M",
        "roxf mAP H",
        "oxford5k mAP",
    ]
    with pytest.raises(ValueError, match="mP@20"):
        results.results_table(df, kappa=20)


def test_load_results_errors(tmp_path: Path, params) -> None:
    with pytest.raises(FileNotFoundError, match="no metrics.json"):
        results.load_results(tmp_path, params)
    with pytest.raises(ValueError, match="nope"):
        results.load_results(tmp_path, params, methods=["nope"])


def _csv_ap(tree, method: str, setup: str = "medium") -> dict[str, float]:
    path = tree.results_dir / method / DATASET / "per_query.csv"
    with path.open() as fh:
        return {r["query"]: float(r["AP"]) * 100 for r in csv.DictReader(fh) if r["setup"] == setup}


def test_per_query_matches_metrics_json(tree) -> None:
    pq = results.per_query_ap(tree.results_dir, "msvlad", DATASET, setup="hard")
    assert list(pq["query"]) == ["q0", "q1", "q2", "q3"]
    assert list(pq["query_index"]) == [0, 1, 2, 3]
    js = read_json(tree.results_dir / "msvlad" / "metrics.json")
    assert pq["AP"].mean() == pytest.approx(js[DATASET]["plain"]["mAP"]["hard"], abs=0.006)
    qe = results.per_query_ap(tree.results_dir, "msvlad", DATASET, variant="qe")
    assert qe["AP"].mean() == pytest.approx(js[DATASET]["qe"]["mAP"]["medium"], abs=0.006)
    with pytest.raises(FileNotFoundError, match="per_query_dba.csv"):
        results.per_query_ap(tree.results_dir, "msvlad", "other-set", variant="dba")


def test_per_query_gains_sorted_and_exact(tree) -> None:
    gains = results.per_query_gains(tree.results_dir, "msvlad", "msvlad-ots", DATASET)
    a, b = _csv_ap(tree, "msvlad"), _csv_ap(tree, "msvlad-ots")
    expected = sorted(((a[q] - b[q], q) for q in a), key=lambda t: -t[0])
    assert list(gains["query"]) == [q for _, q in expected]
    np.testing.assert_allclose(gains["gain"], [g for g, _ in expected])
    assert gains.attrs["setup"] == "medium"


def test_pick_queries_spreads_from_best_to_worst() -> None:
    frame = pd.DataFrame({"query_index": [0, 1, 2, 3, 4], "AP": [10.0, 90.0, 50.0, math.nan, 70.0]})
    assert results.pick_queries(frame, 3) == [1, 2, 0]
    assert results.pick_queries(frame, 10) == [1, 4, 2, 0]
    with pytest.raises(ValueError, match="n:"):
        results.pick_queries(frame, 0)


def test_bootstrap_table_against_per_query_csv(tree, params) -> None:
    boot = results.bootstrap_table(tree.results_dir, "msvlad-ots", params, n_boot=300, seed=1)
    assert list(boot.index) == ["msvlad", "msvlad-hardest"]
    a, ref = _csv_ap(tree, "msvlad"), _csv_ap(tree, "msvlad-ots")
    diff = np.mean([a[q] - ref[q] for q in a])
    row = boot.loc["msvlad"]
    assert row["Δ mAP"] == pytest.approx(diff)
    assert row["CI low"] <= row["Δ mAP"] <= row["CI high"]
    assert row["mAP ref"] == pytest.approx(np.mean(list(ref.values())))
    assert row["Queries"] == 4 and row["Setup"] == "medium" and row["Dataset"] == DATASET
    assert row["Reference"] == params.methods["msvlad-ots"].label
    with pytest.raises(ValueError, match="reference"):
        results.bootstrap_table(tree.results_dir, "unknown", params)


def test_query_ground_truth_and_ap(tree) -> None:
    ds = load_dataset(tree.data_root, DATASET)
    g = ds.gnd[1]
    setup, ok, junk = results.query_ground_truth(ds, 1, "medium")
    assert setup == "medium"
    assert sorted(ok) == sorted([*g["easy"], *g["hard"]]) and sorted(junk) == sorted(g["junk"])
    _, ok, junk = results.query_ground_truth(ds, 1, "hard")
    assert sorted(ok) == sorted(g["hard"]) and sorted(junk) == sorted([*g["junk"], *g["easy"]])
    ranks = results.load_ranks(tree.results_dir, "msvlad-hardest", DATASET)
    csv_ap = _csv_ap(tree, "msvlad-hardest", "hard")
    for q, name in enumerate(ds.qimlist):
        assert results.query_ap(ds, ranks, q, "hard") == pytest.approx(csv_ap[name])
    # classic and Holidays protocols: a single setup; Holidays' own db copy is junk
    classic = SimpleNamespace(protocol="classic", gnd=[{"ok": [2, 0], "junk": [1]}])
    assert results.query_ground_truth(classic, 0, "medium")[0] == "all"
    rank = np.array([[1], [2], [3], [0]])
    # positives at positions 0 and 2 after dropping junk (1): AP = (1 + (1/1 + 2/3)/2 ... ) by hand
    expected = ((1.0 + 1.0) / 2 + (1 / 2 + 2 / 3) / 2) / 2 * 100
    assert results.query_ap(classic, rank, 0) == pytest.approx(expected)
    holidays = SimpleNamespace(protocol="holidays", gnd=[{"ok": [3], "query_db_index": 0}])
    _, ok, junk = results.query_ground_truth(holidays, 0)
    assert list(ok) == [3] and list(junk) == [0]
    with pytest.raises(IndexError):
        results.query_ground_truth(holidays, 5)


def test_miner_stats_counts_and_fractions(tree) -> None:
    run = tree.runs_dir / "msvlad" / "train"
    stats = runs.miner_stats(run)
    trip = pd.read_csv(run / "triplets.csv")
    assert list(stats["round"]) == [0, 1, 2, 3, 4]
    for r in range(4):
        sub = trip[trip["round"] == r]
        row = stats[stats["round"] == r].iloc[0]
        assert row["triplets"] == len(sub)
        assert row["hard_frac"] == pytest.approx((sub["kind"] == "hard").mean())
        assert row["semi_hard_frac"] == pytest.approx((sub["kind"] == "semi-hard").mean())
        assert row["mean_pred_loss"] == pytest.approx(sub["loss"].mean())
        assert row["mean_neg_sim"] == pytest.approx(sub["neg_sim"].mean())
    empty = stats[stats["round"] == 4].iloc[0]
    assert empty["triplets"] == 0 and math.isnan(empty["hard_frac"])


def test_miner_stats_without_rounds_csv(tmp_path: Path, tree) -> None:
    (tmp_path / "triplets.csv").write_bytes(
        (tree.runs_dir / "msvlad" / "train" / "triplets.csv").read_bytes()
    )
    stats = runs.miner_stats(tmp_path)
    assert list(stats["round"]) == [0, 1, 2, 3]
    assert list(stats["triplets"]) == [3, 3, 3, 3]
    assert list(stats["hard"]) == [1, 2, 1, 2]
    assert runs.miner_stats(tmp_path / "nothing").empty


def test_select_and_spread_triplets(tree) -> None:
    trip = runs.load_triplets(tree.runs_dir / "msvlad" / "train")
    assert runs.spread_rounds(trip, 3) == [0, 2, 3]
    assert runs.spread_rounds(trip.iloc[:0], 3) == []
    chosen = runs.select_triplets(trip, rounds=[1, 3], per_round=2)
    assert list(chosen["round"]) == [1, 1, 3, 3]
    for r in (1, 3):
        top = trip[trip["round"] == r]["loss"].sort_values(ascending=False).head(2).to_numpy()
        np.testing.assert_allclose(chosen[chosen["round"] == r]["loss"], top)
    by_class = runs.select_triplets(trip, label="church", per_round=10)
    assert len(by_class) == (trip["anchor_label"] == "church").sum() and set(
        by_class["anchor_label"]
    ) == {"church"}
    with pytest.raises(ValueError, match="order"):
        runs.select_triplets(trip, order="bogus")


def test_training_logs_only_trained_methods(tree, params) -> None:
    logs = runs.load_training_logs(tree.runs_dir, params)
    assert list(dict.fromkeys(logs["method"])) == ["msvlad", "msvlad-hardest"]
    assert set(logs["label"]) == {
        params.methods["msvlad"].label,
        params.methods["msvlad-hardest"].label,
    }
    assert list(logs[logs["method"] == "msvlad"]["val_map"]) == [46.0, 51.0, 56.0]
    assert runs.training_curves(tree.runs_dir / "msvlad-ots" / "train").empty
    with pytest.raises(FileNotFoundError, match="log.csv"):
        runs.training_curves(tree.runs_dir / "missing")


def test_to_markdown_exact() -> None:
    frame = pd.DataFrame({"Method": ["a|b", "c"], "mAP": [1.234, math.nan]})
    assert tables.to_markdown(frame) == (
        "| Method |  mAP |\n| ------ | ---: |\n| a\\|b   | 1.23 |\n| c      |    – |\n"
    )


def test_to_markdown_decimals_per_column() -> None:
    frame = pd.DataFrame({"ms": [0.01234], "recall": [0.98765], "n": [7]})
    assert tables.to_markdown(frame, decimals={"ms": 3}) == (
        "|    ms | recall |   n |\n| ----: | -----: | --: |\n| 0.012 |   0.99 |   7 |\n"
    )


def test_export_table_writes_three_formats(tmp_path: Path) -> None:
    frame = pd.DataFrame(
        {"Method": ["MS_NetVLAD & co"], "mAP M": [61.2345], "n": [70]},
        index=pd.Index(["msvlad"], name="run"),
    )
    out = tables.export_table(frame, "demo", tmp_path, caption="mAP in %")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.csv", "demo.md", "demo.tex"]
    assert set(out) == {"md", "csv", "tex"}
    back = pd.read_csv(out["csv"])
    assert back["mAP M"].item() == pytest.approx(61.2345) and back["n"].item() == 70
    tex = out["tex"].read_text()
    assert r"MS\_NetVLAD \& co & 61.23 & 70 \\" in tex
    assert r"\caption{mAP in \%}" in tex and r"\begin{tabular}{lrr}" in tex
    assert "| MS_NetVLAD & co | 61.23 |  70 |" in out["md"].read_text()
    with pytest.raises(ValueError, match="stem"):
        tables.export_table(frame, "../x", tmp_path)


def test_paper_claims_name_every_other_miner(params, caplog) -> None:
    with caplog.at_level("WARNING", logger="msvlad.report.results"):
        claims = results.paper_claims(params, "msvlad")
    backbone = params.model.backbone
    assert [(c.claim, c.method, c.reference, c.setup, c.kind) for c in claims] == [
        (f"{backbone}: trained > its k-means init", "msvlad", "msvlad-ots", "medium", "better"),
        (f"{backbone}: trained > its k-means init", "msvlad", "msvlad-ots", "hard", "better"),
        (
            "difficulty miner > hardest_negative miner",
            "msvlad",
            "msvlad-hardest",
            "medium",
            "better",
        ),
        ("difficulty miner > hardest_negative miner", "msvlad", "msvlad-hardest", "hard", "better"),
    ]
    assert results.miner_rows(params, "msvlad") == ["msvlad", "msvlad-hardest"]
    # rows absent from this table: their claims are left out, each with a warning
    text = caplog.text
    assert (
        "msvlad has no untrained GeM row on its backbone; "
        f"'{backbone}: trained > off-the-shelf GeM' is left out"
    ) in text
    assert "only by model.pooling = netvlad" in text and "only by model.split;" in text
    with pytest.raises(ValueError, match="'nope' is not a trained row"):
        results.paper_claims(params, "nope")
    with pytest.raises(ValueError, match="'msvlad-ots' is not a trained row"):
        results.paper_claims(params, "msvlad-ots")


def test_claims_table_scores_the_reference_by_its_best_variant(tree, params) -> None:
    claims = [
        results.Claim("a", "msvlad", "msvlad-ots", "medium"),
        results.Claim("b", "msvlad", "msvlad-hardest", "hard"),
    ]
    table = results.claims_table(
        tree.results_dir, params, claims, reference_variants=("plain", "qe"), n_boot=300
    )
    assert len(table) == 2
    for claim, row in zip(claims, table.to_dict("records"), strict=True):
        ours = results.per_query_ap(tree.results_dir, claim.method, DATASET, setup=claim.setup)
        by_variant = {
            v: results.per_query_ap(
                tree.results_dir, claim.reference, DATASET, setup=claim.setup, variant=v
            )
            for v in ("plain", "qe")
        }
        best = max(by_variant, key=lambda v: by_variant[v]["AP"].mean())
        expected = (ours["AP"] - by_variant[best]["AP"]).mean()
        assert row["mAP ref"] == pytest.approx(by_variant[best]["AP"].mean())
        assert row["Δ mAP"] == pytest.approx(expected)
        assert (
            row["Reference"].endswith(tables.VARIANT_SUFFIX[best]) and row["Setup"] == claim.setup
        )
        assert row["CI low"] <= row["Δ mAP"] <= row["CI high"]
        assert row["Claim"] == claim.claim and row["Descriptor"] == ""  # no dim/whitened here
        assert row["Verdict"] == results.verdict("better", row["CI low"], row["CI high"])
    with pytest.raises(FileNotFoundError, match="no per-query results"):
        results.claims_table(
            tree.results_dir, params, claims[:1], reference_variants=("nonexistent",)
        )


# ----------------------------------------------------------------------------- network claims

CLAIM_ROWS = {
    "msvlad": {"label": "paper", "pooling": "msvlad", "miner": "difficulty"},
    "msvlad-hardest": {"label": "hardest", "pooling": "msvlad", "miner": "hardest_negative"},
    "alt-norm": {  # a trained ablation of another setting: no network claim
        "label": "across clusters",
        "pooling": "msvlad",
        "miner": "difficulty",
        "set": {"model.vlad_norm": "across_clusters"},
    },
    "longer": {  # another schedule: not a control (trained otherwise)
        "label": "longer",
        "pooling": "netvlad",
        "miner": "difficulty",
        "set": {"train.epochs": 8},
    },
    "msvlad-ots": {"label": "init", "pooling": "msvlad", "miner": None},
    "gem-ots": {"label": "GeM ots", "pooling": "gem", "miner": None, "set": {"whiten.dim": 320}},
    "netvlad": {"label": "single-scale", "pooling": "netvlad", "miner": "difficulty"},
    "gem": {"label": "GeM", "pooling": "gem", "miner": "difficulty", "set": {"whiten.dim": 320}},
    "nosplit": {
        "label": "no split",
        "pooling": "msvlad",
        "miner": "difficulty",
        "set": {"model.split": None},
    },
    "w2": {
        "label": "2x2",
        "pooling": "msvlad",
        "miner": "difficulty",
        "set": {"model.pool_sizes": [2]},
    },
    "b1": {
        "label": "Lite1",
        "pooling": "msvlad",
        "miner": "difficulty",
        "set": {"model.backbone": "efficientnet_lite1"},
    },
    "b1-ots": {
        "label": "Lite1 init",
        "pooling": "msvlad",
        "miner": None,
        "set": {"model.backbone": "efficientnet_lite1"},
    },
    "b1-gem-ots": {
        "label": "Lite1 GeM",
        "pooling": "gem",
        "miner": None,
        "set": {"model.backbone": "efficientnet_lite1", "whiten.dim": 320},
    },
    "b2": {  # a backbone with no untrained rows: both its claims left out, with warnings
        "label": "R50",
        "pooling": "msvlad",
        "miner": "difficulty",
        "set": {"model.backbone": "resnet50", "model.split": 512},
    },
}


@pytest.fixture
def claim_params(repo_root):
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw["methods"] = CLAIM_ROWS
    raw["data"]["test_sets"] = ["t"]
    return params_from_dict(raw)


def test_paper_claims_come_from_the_rows_settings(claim_params, caplog) -> None:
    with caplog.at_level("WARNING", logger="msvlad.report.results"):
        claims = results.paper_claims(claim_params, "msvlad", setups=("hard",))
    lite0, lite1 = "efficientnet_lite0", "efficientnet_lite1"
    assert [(c.claim, c.reference, c.kind) for c in claims] == [
        (f"{lite0}: trained > its k-means init", "msvlad-ots", "better"),
        (f"{lite0}: trained > off-the-shelf GeM", "gem-ots", "better"),
        ("multi-scale NetVLAD > single-scale NetVLAD (both trained)", "netvlad", "better"),
        ("multi-scale NetVLAD > GeM (both trained)", "gem", "better"),
        ("split into 160-d chunks: same mAP (within CI) as no split", "nosplit", "no_worse"),
        ("windows 2×2+3×3 > 2×2", "w2", "better"),
        (f"{lite1}: trained > its k-means init", "b1-ots", "better"),
        (f"{lite1}: trained > off-the-shelf GeM", "b1-gem-ots", "better"),
        ("difficulty miner > hardest_negative miner", "msvlad-hardest", "better"),
    ]
    assert [c.method for c in claims] == ["msvlad"] * 6 + ["b1", "b1"] + ["msvlad"]
    assert {c.setup for c in claims} == {"hard"}
    assert (
        "b2 has no untrained row of its network; 'resnet50: trained > its k-means init' is left out"
    ) in caplog.text
    assert "b2 has no untrained GeM row on its backbone" in caplog.text
    assert "no trained row" not in caplog.text  # every control is there
    diff = results.row_difference(claim_params, "msvlad", "gem")
    assert diff == {"model.pooling": ("msvlad", "gem"), "whiten.dim": (None, 320)}
    # an untrained row's training settings are not compared
    assert results.row_difference(claim_params, "msvlad", "msvlad-ots") == {}


def _hand_run(res: Path, method: str, variant: str, aps: dict[str, list[float]], dim: int) -> None:
    """per_query csv (AP fractions over queries q0..q3) and metrics.json entry of one variant."""
    folder = res / method / "t"
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {"query": f"q{i}", "setup": setup, "AP": ap}
        for setup, values in aps.items()
        for i, ap in enumerate(values)
    ]
    tag = "" if variant == "plain" else f"_{variant}"
    pd.DataFrame(rows).to_csv(folder / f"per_query{tag}.csv", index=False)
    path = res / method / "metrics.json"
    body = read_json(path) if path.is_file() else {"t": {}}
    body["t"][variant] = {"mAP": {}, "dim": dim, "whitened": variant == "plain" and dim == 320}
    write_json(path, body)


def test_claims_table_hand_computed_differences_and_verdicts(tmp_path, claim_params) -> None:
    res = tmp_path / "results"
    ours = {"medium": [0.6, 0.5, 0.7, 0.4], "hard": [0.3, 0.2, 0.4, 0.1]}

    def shifted(by: list[float]) -> dict[str, list[float]]:
        return {s: [a + b for a, b in zip(v, by, strict=True)] for s, v in ours.items()}

    _hand_run(res, "msvlad", "plain", ours, 5120)
    _hand_run(res, "msvlad-ots", "plain", shifted([-0.1] * 4), 5120)  # 10 points below
    _hand_run(res, "gem", "plain", shifted([0.05] * 4), 320)  # whitened: 5 points above
    _hand_run(res, "gem", "raw", shifted([0.08] * 4), 320)  # raw: 8 above, the better variant
    _hand_run(res, "nosplit", "plain", shifted([0.1, -0.1, 0.1, -0.1]), 10240)  # same mAP
    _hand_run(res, "w2", "plain", shifted([0.1, -0.1, 0.1, -0.1]), 5120)
    claims = [
        results.Claim("init", "msvlad", "msvlad-ots", "medium"),
        results.Claim("gem", "msvlad", "gem", "hard"),
        results.Claim("split", "msvlad", "nosplit", "medium", "no_worse"),
        results.Claim("split", "msvlad", "gem", "hard", "no_worse"),
        results.Claim("windows", "msvlad", "w2", "medium"),
    ]
    table = results.claims_table(res, claim_params, claims, n_boot=500)
    rows = table.to_dict("records")
    assert list(table.columns) == [
        *("Claim", "Method", "Reference", "Dataset", "Setup", "Descriptor", "Descriptor ref"),
        *("mAP", "mAP ref", "Δ mAP", "CI low", "CI high", "p", "Queries", "Verdict"),
    ]
    # every query 10 points above its init: the difference and its whole CI are +10
    init = rows[0]
    assert init["mAP"] == pytest.approx(55.0) and init["mAP ref"] == pytest.approx(45.0)
    assert [init[k] for k in ("Δ mAP", "CI low", "CI high")] == pytest.approx([10.0] * 3)
    assert init["Verdict"] == "holds" and init["Queries"] == 4 and init["p"] == 0.0
    assert (init["Descriptor"], init["Descriptor ref"]) == ("5120-d raw", "5120-d raw")
    # GeM scored by its better (raw) variant: 8 points above on every query
    gem = rows[1]
    assert gem["Reference"] == "GeM" + tables.VARIANT_SUFFIX["raw"]
    assert gem["Descriptor ref"] == "320-d raw" and gem["mAP ref"] == pytest.approx(33.0)
    assert [gem["CI low"], gem["CI high"]] == pytest.approx([-8.0, -8.0])
    assert gem["Verdict"] == "does not hold"
    # +10/-10 per query: mean 0, a CI across 0 (resamples of all + or all - are 1/16 each)
    split, no_split_loses, windows = rows[2], rows[3], rows[4]
    assert split["Δ mAP"] == pytest.approx(0.0, abs=1e-9)
    assert split["CI low"] == pytest.approx(-10.0) and split["CI high"] == pytest.approx(10.0)
    assert split["Verdict"] == "holds" and split["Descriptor ref"] == "10240-d raw"
    assert split["Claim"] == "split, at 5120-d against 10240-d raw"
    assert no_split_loses["Verdict"] == "does not hold"  # a whole CI below 0 fails it too
    assert no_split_loses["Claim"] == "split, at 5120-d against 320-d raw"
    assert windows["Verdict"] == "tie"


@pytest.mark.parametrize(
    ("kind", "low", "high", "smaller", "expected"),
    [
        ("better", 0.1, 2.0, False, "holds"),
        ("better", 0.0, 2.0, False, "tie"),  # a CI touching 0 is not above it
        ("better", -0.1, 2.0, False, "tie"),
        ("better", 0.0, 0.0, False, "tie"),
        ("better", -2.0, 0.0, False, "tie"),
        ("better", -2.0, -0.1, False, "does not hold"),
        ("better", -2.0, -0.1, True, "does not hold"),  # the dimension is not part of "better"
        ("no_worse", -3.0, 0.5, True, "holds"),
        ("no_worse", -3.0, 0.0, True, "holds"),  # 0 within the CI, at its edge
        ("no_worse", 0.5, 3.0, True, "holds"),
        ("no_worse", -3.0, -0.5, True, "does not hold"),
        ("no_worse", -3.0, 0.5, False, "does not hold"),  # same mAP, but not a smaller descriptor
    ],
)
def test_claim_verdicts(kind, low, high, smaller, expected) -> None:
    assert results.verdict(kind, low, high, smaller) == expected


def test_claims_table_ci_edges_hand_computed(tmp_path, claim_params) -> None:
    """Per-query differences (0, 0, 0, +8) and (0, 0, 0, -8) points on Hard, 2000 resamples of
    the 4 queries: a resample's mean is 2k for k draws of the odd query, P(k = 0) = (3/4)^4 = 32 %,
    P(k >= 3) = 13/256 = 5.1 %, P(k = 4) = 1/256 = 0.4 %: the 95 % CI is [0, +6] (or [-6, 0])."""
    res = tmp_path / "results"
    base = {"hard": [0.3, 0.2, 0.4, 0.1]}
    _hand_run(res, "msvlad", "plain", base, 5120)
    _hand_run(res, "msvlad-ots", "plain", {"hard": [0.3, 0.2, 0.4, 0.02]}, 5120)  # ours +8 on q3
    _hand_run(res, "nosplit", "plain", {"hard": [0.3, 0.2, 0.4, 0.18]}, 10240)  # ours -8 on q3
    _hand_run(res, "w2", "plain", {"hard": [0.3, 0.2, 0.4, 0.18]}, 5120)  # same, same dimension
    claims = [
        results.Claim("init", "msvlad", "msvlad-ots", "hard"),
        results.Claim("windows", "msvlad", "w2", "hard"),
        results.Claim("split", "msvlad", "nosplit", "hard", "no_worse"),
        results.Claim("same size", "msvlad", "w2", "hard", "no_worse"),
    ]
    rows = results.claims_table(res, claim_params, claims, n_boot=2000).to_dict("records")
    up, down, split, same_size = rows
    assert up["Δ mAP"] == pytest.approx(2.0)
    assert (up["CI low"], up["CI high"]) == pytest.approx((0.0, 6.0))
    assert up["Verdict"] == "tie"  # the CI touches 0: not wholly above it
    assert down["Δ mAP"] == pytest.approx(-2.0)
    assert (down["CI low"], down["CI high"]) == pytest.approx((-6.0, 0.0))
    assert down["Verdict"] == "tie"  # nor wholly below it
    # the split: 0 within the CI at half the raw dimension holds; at the same dimension it does not
    assert (split["CI low"], split["CI high"]) == pytest.approx((-6.0, 0.0))
    assert split["Claim"] == "split, at 5120-d against 10240-d raw" and split["Verdict"] == "holds"
    assert same_size["Claim"] == "same size, at 5120-d against 5120-d raw"
    assert same_size["Verdict"] == "does not hold"


def test_raw_dimension_from_the_raw_variant_or_an_unwhitened_plain(tmp_path, claim_params) -> None:
    """A whitened row's raw dimension is its `raw` variant's; without one (or without dims in
    metrics.json) the split claim cannot be shown and says so."""
    res = tmp_path / "results"
    aps = {"hard": [0.3, 0.2, 0.4, 0.1]}
    _hand_run(res, "msvlad", "plain", aps, 320)  # written as "320-d PCA-w" (whitened)
    _hand_run(res, "msvlad", "raw", aps, 5120)
    _hand_run(res, "nosplit", "plain", aps, 320)  # whitened, no raw variant: dimension unknown
    assert results._raw_dim(res, "msvlad", "t") == 5120
    assert results._raw_dim(res, "nosplit", "t") is None
    assert results._raw_dim(res, "absent", "t") is None
    claim = results.Claim("split", "msvlad", "nosplit", "hard", "no_worse")
    (row,) = results.claims_table(res, claim_params, [claim], n_boot=50).to_dict("records")
    assert row["Claim"] == "split (raw dimensions unknown)" and row["Verdict"] == "does not hold"
    assert row["Descriptor"] == "320-d PCA-w" and row["CI low"] == row["CI high"] == 0.0


# The paper profile's rows of the network claims (as params.paper.yaml names them): the claims
# builder must find the same claims there from the settings alone, whatever the rows are called.
PAPER_ROWS = {
    "msvlad": {"label": "paper", "pooling": "msvlad", "miner": "difficulty"},
    "msvlad-maxside": {  # another test-time input: neither a control nor another backbone
        "label": "max side",
        "pooling": "msvlad",
        "miner": "difficulty",
        "set": {"extract.image_size": 1024, "extract.resize": "max_side"},
    },
    "msvlad-hardest": {"label": "hardest", "pooling": "msvlad", "miner": "hardest_negative"},
    "netvlad": {
        "label": "single-scale",
        "pooling": "netvlad",
        "miner": "difficulty",
        "set": {"whiten.num_images": 16384},
    },
    "gem": {"label": "GeM", "pooling": "gem", "miner": "difficulty"},
    "msvlad-nosplit": {
        "label": "no split",
        "pooling": "msvlad",
        "miner": "difficulty",
        "set": {"model.split": None, "whiten.num_images": 16384},
    },
    "msvlad-2x2": {
        "label": "2x2",
        "pooling": "msvlad",
        "miner": "difficulty",
        "set": {"model.pool_sizes": [2]},
    },
    "msvlad-alt-norm": {
        "label": "intra",
        "pooling": "msvlad",
        "miner": "difficulty",
        "set": {"model.vlad_norm": "intra"},
    },
    "msvlad-ots": {"label": "init", "pooling": "msvlad", "miner": None},
    "netvlad-ots": {
        "label": "single-scale init",
        "pooling": "netvlad",
        "miner": None,
        "set": {"whiten.num_images": 16384},
    },
    "gem-ots": {"label": "GeM ots", "pooling": "gem", "miner": None},
    **{
        f"{short}-{row}": {
            "label": f"{short} {row}",
            "pooling": "gem" if row == "gem-ots" else "msvlad",
            "miner": "difficulty" if row == "msvlad" else None,
            "set": {"model.backbone": backbone, **extra},
        }
        for short, backbone, gem_dim in (("r50", "resnet50", None), ("vgg16", "vgg16", 512))
        for row, extra in (
            ("msvlad", {}),
            ("msvlad-ots", {}),
            ("gem-ots", {} if gem_dim is None else {"whiten.dim": gem_dim}),
        )
    },
}


def test_paper_profile_rows_give_every_network_claim(repo_root, caplog) -> None:
    raw = yaml.safe_load((repo_root / "params.paper.yaml").read_text())
    raw["methods"] = PAPER_ROWS
    paper = params_from_dict(raw)
    with caplog.at_level("WARNING", logger="msvlad.report.results"):
        claims = results.paper_claims(paper, "msvlad", setups=("hard",))
    assert caplog.text == ""  # every claim has its rows
    assert [(c.claim, c.method, c.reference, c.kind) for c in claims] == [
        ("resnet101: trained > its k-means init", "msvlad", "msvlad-ots", "better"),
        ("resnet101: trained > off-the-shelf GeM", "msvlad", "gem-ots", "better"),
        (
            "multi-scale NetVLAD > single-scale NetVLAD (both trained)",
            "msvlad",
            "netvlad",
            "better",
        ),
        ("multi-scale NetVLAD > GeM (both trained)", "msvlad", "gem", "better"),
        (
            "split into 512-d chunks: same mAP (within CI) as no split",
            "msvlad",
            "msvlad-nosplit",
            "no_worse",
        ),
        ("windows 2×2+3×3 > 2×2", "msvlad", "msvlad-2x2", "better"),
        ("resnet50: trained > its k-means init", "r50-msvlad", "r50-msvlad-ots", "better"),
        ("resnet50: trained > off-the-shelf GeM", "r50-msvlad", "r50-gem-ots", "better"),
        ("vgg16: trained > its k-means init", "vgg16-msvlad", "vgg16-msvlad-ots", "better"),
        ("vgg16: trained > off-the-shelf GeM", "vgg16-msvlad", "vgg16-gem-ots", "better"),
        ("difficulty miner > hardest_negative miner", "msvlad", "msvlad-hardest", "better"),
    ]
