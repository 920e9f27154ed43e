"""End to end through the CLI on tiny data: cluster -> train -> whiten -> evaluate -> report."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import yaml

from msvlad.cli import main
from tinydata import make_retrieval_set, make_train_set


@pytest.fixture
def tiny_params(tmp_path, repo_root):
    data = tmp_path / "data"
    make_train_set(data / "train", num_classes=6, per_class=5)
    make_retrieval_set(data, "val", num_scenes=3)
    make_retrieval_set(data, "test", num_scenes=4, seed=7)
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw["base"]["device"] = "cpu"
    raw["data"].update(root=str(data), train_set="train", val_set="val", test_sets=["test"])
    raw["model"].update(image_size=64, num_clusters=4)
    raw["cluster"].update(num_images=20, max_locals=2000)
    raw["miner"].update(pool_size=24, images_per_class=4, triplets_per_round=6, delta=0.5)
    raw["train"].update(steps_per_epoch=2, epochs=2, checkpoint_every=2, warmup_steps=1)
    raw["whiten"].update(num_images=30, dim=8)
    raw["extract"].update(scales=[1.0, 0.75], image_size=None, resize=None)  # the 64 px input
    raw["report"].update(bootstrap=50, top_k=3, num_queries=2)
    raw["methods"] = {k: raw["methods"][k] for k in ("msvlad", "msvlad-hardest", "msvlad-ots")}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, tmp_path


def test_train_stage_runs_cluster_train_whiten_as_the_three_commands_do(tiny_params):
    params, tmp = tiny_params
    p = ["--params", str(params), "--method", "msvlad"]
    a, b = tmp / "a", tmp / "b"
    assert main(["cluster", *p, "--out", str(a / "init.pt")]) == 0
    assert main(["train", *p, "--init", str(a / "init.pt"), "--out", str(a / "train")]) == 0
    whiten = ["--checkpoint", str(a / "train" / "model.pt"), "--out", str(a / "model.pt")]
    assert main(["whiten", *p, *whiten]) == 0
    # the DVC stage's command: one process, the same three files
    stage = ["train", *p, "--cluster", "--init", str(b / "init.pt"), "--out", str(b / "train")]
    stage += ["--restart=if-changed", "--whiten", str(b / "model.pt")]
    assert main(stage) == 0
    for name in ("init.pt", "train/model.pt", "train/log.csv", "model.pt"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    # rerun as DVC does after a whitening change: k-means and whitening again, training kept
    log = (b / "train" / "log.csv").read_bytes()
    assert main([*stage, "--set", "whiten.dim=4"]) == 0
    assert not (b / "train.previous").exists() and (b / "train" / "log.csv").read_bytes() == log
    from msvlad.nn.model import load_model

    assert load_model(b / "model.pt").out_dim == 4
    assert (b / "init.pt").read_bytes() == (a / "init.pt").read_bytes()


@pytest.mark.slow
def test_cli_pipeline_end_to_end(tiny_params):
    params, tmp = tiny_params
    p = ["--params", str(params)]
    for method in ("msvlad", "msvlad-hardest", "msvlad-ots"):
        run = tmp / "runs" / method
        assert main(["cluster", *p, "--method", method, "--out", str(run / "init.pt")]) == 0
        assert (
            main(
                [
                    "train",
                    *p,
                    "--method",
                    method,
                    "--init",
                    str(run / "init.pt"),
                    "--out",
                    str(run / "train"),
                ]
            )
            == 0
        )
        assert (
            main(
                [
                    "whiten",
                    *p,
                    "--method",
                    method,
                    "--checkpoint",
                    str(run / "train" / "model.pt"),
                    "--out",
                    str(run / "model.pt"),
                ]
            )
            == 0
        )
        out = tmp / "results" / "evaluate" / method
        assert (
            main(
                [
                    "evaluate",
                    *p,
                    "--method",
                    method,
                    "--checkpoint",
                    str(run / "model.pt"),
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        metrics = json.loads((out / "metrics.json").read_text())
        plain = metrics["test"]["plain"]
        assert set(plain["mAP"]) == {"easy", "medium", "hard"}
        assert all(0 <= v <= 100 for v in plain["mAP"].values())
        assert set(metrics["test"]) == {"plain", "raw", "qe", "dba"}  # raw: before whitening
        assert metrics["test"]["raw"]["dim"] > plain["dim"] == 8
        assert plain["input"] == {
            "image_size": 64,
            "resize": "square",
            "scales": [1.0, 0.75],
            "query_scale": 0.7,
        }
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["variants"] == ["plain", "raw", "qe", "dba"]
        assert (
            len(manifest["checkpoint"]["sha256"]) == 64
            and "test/per_query_raw.csv" in (manifest["files"])
        )
        summary = json.loads((out / "summary.json").read_text())  # what dvc metrics show reads
        assert summary["test"]["M"] == plain["mAP"]["medium"]
        assert summary["test"]["H+QE"] == metrics["test"]["qe"]["mAP"]["hard"]
        assert len(summary["test"]) == 6
        feats = np.load(out / "test" / "features.npz")
        assert (
            feats["q"].shape == (4, 8)
            and feats["db"].shape == (12, 8)
            and feats["q"].dtype == np.float32
        )
        assert np.load(out / "test" / "ranks.npy").shape == (12, 4)
        assert (out / "test" / "per_query.csv").exists()
    trained = tmp / "runs" / "msvlad" / "train"
    assert (trained / "triplets.csv").read_text().count("\n") > 1
    # a second train call finds the finished checkpoint and does not train again
    before = (trained / "log.csv").read_text()
    assert (
        main(
            [
                "train",
                *p,
                "--method",
                "msvlad",
                "--init",
                str(tmp / "runs" / "msvlad" / "init.pt"),
                "--out",
                str(trained),
            ]
        )
        == 0
    )
    assert (trained / "log.csv").read_text() == before
    # the report notebooks run on these results
    reports = tmp / "reports"
    assert (
        main(
            [
                "report",
                *p,
                "--out",
                str(reports),
                "--results",
                str(tmp / "results" / "evaluate"),
                "--runs",
                str(tmp / "runs"),
            ]
        )
        == 0
    )
    for name in ("results", "rankings", "triplets", "training"):
        assert (reports / "notebooks" / f"{name}.html").stat().st_size > 10_000
        assert list((reports / "figures" / name).glob("*.png")), name
    table = (reports / "tables" / "results.md").read_text()
    assert "MS-NetVLAD + difficulty miner (paper)" in table and "+QE" in table


def test_cli_errors_are_one_line(tiny_params, capsys):
    params, tmp = tiny_params
    assert main(["info", "--params", str(params), "--set", "model.num_cluster=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model.num_cluster: unknown key" in err
    assert (
        main(
            [
                "evaluate",
                "--params",
                str(params),
                "--checkpoint",
                str(tmp / "nope.pt"),
                "--out",
                str(tmp / "o"),
            ]
        )
        == 2
    )
    assert "nope.pt" in capsys.readouterr().err


def test_info_prints_dimensions(repo_root):
    out = subprocess.run(
        [sys.executable, "-m", "msvlad", "info", "--params", str(repo_root / "params.paper.yaml")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert (
        "raw dim       32768" in out
        and "1684 descriptors of 512-d" in out
        and "whitened dim  2048" in out
        and "variant       the authors' released code (8 of 8 options" in out
    )


def test_dvc_pipeline_graph(repo_root):
    dvc = [sys.executable, "-m", "dvc"]
    out = subprocess.run([*dvc, "dag", "--md"], cwd=repo_root, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    names = dict(re.findall(r'(node\d+)\["([^"]+)"\]', out.stdout))
    edges = {(names[a], names[b]) for a, b in re.findall(r"(node\d+)-->(node\d+)", out.stdout)}
    # each row: prepare -> train (k-means, training, whitening) -> evaluate -> report
    for row in ("msvlad", "gem-ots", "lite2-msvlad"):
        train, evaluate = f"train@{row}", f"evaluate@{row}"
        assert {("prepare", train), (train, evaluate), ("prepare", evaluate)} <= edges
        assert (evaluate, "report") in edges and (train, "report") in edges
    assert {n.partition("@")[0] for n in names.values()} == {
        "prepare",
        "train",
        "evaluate",
        "report",
    }
