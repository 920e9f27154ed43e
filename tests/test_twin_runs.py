"""Rows that are the same training (they differ only in their test-time policy) train once, and a
run is tied to the initial model it started from (`msvlad.training.rundir`)."""

from __future__ import annotations

import csv
import dataclasses
import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from badinputs import World, make_world, snapshot
from msvlad.cli import main
from msvlad.config import load_params
from msvlad.data.testsets import load_dataset
from msvlad.evaluation.pipeline import validation_map
from msvlad.nn.model import load_model, save_model
from msvlad.storage import file_digest, read_json

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

# a row that differs from msvlad only in how test images are described and searched
TEST_POLICY = {
    "extract.scales": [1.0, 0.5],
    "extract.query_scale": 0.35,
    "extract.float16": True,
    "evaluate.index": "hnsw",
}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    w = make_world(tmp_path_factory.mktemp("twins"))
    raw = yaml.safe_load(w.params.read_text())
    raw["methods"]["msvlad-wide"] = {
        "label": "same training, another test-time policy",
        "pooling": "msvlad",
        "miner": "difficulty",
        "set": TEST_POLICY,
    }
    w.params.write_text(yaml.safe_dump(raw))
    return w


def _train(w: World, runs: Path, method: str, *extra: str, init: Path | None = None) -> int:
    init = init or runs / method / "init.pt"
    if not init.exists():
        init.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(w.model, init)
    out = runs / method / "train"
    argv = ["train", *w.args("--method", method, "--init", str(init), "--out", str(out), *extra)]
    return main(argv)


@pytest.fixture(scope="module")
def runs(world: World, tmp_path_factory) -> Path:
    """runs/msvlad/train: a finished run of the tiny world (4 steps)."""
    runs = tmp_path_factory.mktemp("runs")
    assert _train(world, runs, "msvlad") == 0
    return runs


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_a_row_with_the_same_training_copies_the_finished_run(world, runs, tmp_path, caplog):
    rows = tmp_path / "runs"
    shutil.copytree(runs, rows)
    with caplog.at_level(logging.INFO, "msvlad.training.rundir"):
        assert _train(world, rows, "msvlad-wide", "--restart=if-changed") == 0
    assert "copied from" in caplog.text
    paper, wide = snapshot(rows / "msvlad" / "train"), snapshot(rows / "msvlad-wide" / "train")

    # every file is the paper row's, byte for byte (log.csv's wall times included: copied, not
    # retrained); run.json records the row's own parameters
    def files(snap: dict[str, str]) -> dict[str, str]:
        return {k: v for k, v in snap.items() if k not in ("run.json", ".lock")}

    assert files(wide) == files(paper) and {"model.pt", "checkpoint.pt", "log.csv"} <= set(wide)
    record = read_json(rows / "msvlad-wide" / "train" / "run.json")
    assert record["params"]["extract"]["query_scale"] == TEST_POLICY["extract.query_scale"]
    assert record["init"] == file_digest(rows / "msvlad-wide" / "init.pt")
    # the row's next stage finds its own run finished: nothing rewritten
    before = snapshot(rows / "msvlad-wide" / "train")
    assert _train(world, rows, "msvlad-wide", "--restart=if-changed") == 0
    assert snapshot(rows / "msvlad-wide" / "train") == before


def test_the_copy_equals_training_the_row_itself(world, runs, tmp_path):
    """The test-time policy changes nothing in training or validation: the row trained on its
    own (no twins outside the runs/<row>/train layout) gives the same weights and val mAP."""
    init = tmp_path / "init.pt"
    shutil.copy(world.model, init)
    out = tmp_path / "alone"
    argv = ["train", *world.args("--method", "msvlad-wide", "--init", str(init), "--out", str(out))]
    assert main(argv) == 0
    ours, paper = load_model(out / "model.pt"), load_model(runs / "msvlad" / "train" / "model.pt")
    for (name, a), b in zip(ours.state_dict().items(), paper.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    vals = [[r["val_map"] for r in _rows(d / "log.csv")] for d in (out, runs / "msvlad" / "train")]
    assert vals[0] == vals[1] and len(vals[0]) == 3


def test_validation_reads_only_training_keys(world):
    params = load_params(world.params)
    val = load_dataset(params.data.root, params.data.val_set)
    torch.manual_seed(0)
    model = load_model(world.model).eval()
    base = validation_map(model, val, params, torch.device("cpu"))
    policy = dataclasses.replace(
        params,
        extract=dataclasses.replace(params.extract, query_scale=0.35, float16=True, scales=[2.0]),
        evaluate=dataclasses.replace(params.evaluate, index="hnsw", skip_failed_queries=True),
    )
    assert validation_map(model, val, policy, torch.device("cpu")) == base
    # the validation queries' own scale is read: queries at the 32-px floor instead of 45 px
    small = dataclasses.replace(
        params, train=dataclasses.replace(params.train, val_query_scale=0.1)
    )
    big = validation_map(model, val, small, torch.device("cpu"))
    assert big != base


def test_no_copy_from_another_init_an_unfinished_run_or_with_restart(world, runs, tmp_path, caplog):
    rows = tmp_path / "runs"
    shutil.copytree(runs, rows)
    other = tmp_path / "other-init.pt"
    model = load_model(world.model)
    with torch.no_grad():
        model.pooling.weight.add_(0.01)
    save_model(model, other)
    with caplog.at_level(logging.INFO, "msvlad.training.rundir"):
        assert _train(world, rows, "msvlad-wide", "--max-steps", "0", init=other) == 0
        assert "copied from" not in caplog.text  # another init: another run
        assert not (rows / "msvlad-wide" / "train" / "model.pt").exists()  # at step 0

        # an unfinished run is no twin
        shutil.rmtree(rows / "msvlad-wide")
        shutil.rmtree(rows / "msvlad" / "train")
        assert _train(world, rows, "msvlad", "--max-steps", "2") == 0
        assert _train(world, rows, "msvlad-wide", "--max-steps", "0") == 0
        assert "copied from" not in caplog.text
        assert not (rows / "msvlad-wide" / "train" / "model.pt").exists()

        # --restart=always trains anew even beside a finished twin
        shutil.rmtree(rows / "msvlad-wide")
        assert _train(world, rows, "msvlad") == 0  # finishes the paper row
        assert _train(world, rows, "msvlad-wide", "--restart", "--max-steps", "0") == 0
        assert "copied from" not in caplog.text
        assert not (rows / "msvlad-wide" / "train" / "model.pt").exists()


def test_a_run_from_another_init_is_another_run(world, runs, tmp_path, capsys):
    rows = tmp_path / "runs"
    shutil.copytree(runs, rows)
    run = rows / "msvlad" / "train"
    before = snapshot(run)
    other = rows / "msvlad" / "init.pt"  # a new k-means gave another initial model
    model = load_model(other)
    with torch.no_grad():
        model.pooling.weight.add_(0.01)
    save_model(model, other)
    assert _train(world, rows, "msvlad") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "init: sha256" in err[0] and "--restart" in err[0], err
    assert snapshot(run) == before
    assert _train(world, rows, "msvlad", "--restart=if-changed", "--max-steps", "0") == 0
    (moved,) = (rows / "msvlad" / "train.previous").iterdir()
    assert snapshot(moved) == {k: v for k, v in before.items() if k != ".lock"}
    assert read_json(run / "run.json")["init"] == file_digest(other)
