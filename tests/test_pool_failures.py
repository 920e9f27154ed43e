"""Unreadable images in a training pool: dropped from their round and counted, never fatal."""

from __future__ import annotations

import csv
import shutil

import pytest
import torch

from badinputs import make_world
from msvlad.cli import main
from msvlad.config import load_params, with_overrides

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

BAD = ("class01/2.jpg", "class03/0.jpg")  # a truncated JPEG and a text file


@pytest.fixture
def world(tmp_path):
    w = make_world(tmp_path)
    train = w.data / "train"
    (train / BAD[0]).write_bytes((train / BAD[0]).read_bytes()[:150])
    (train / BAD[1]).write_text("not an image")
    shutil.copy(w.model, tmp_path / "init.pt")
    return w


@pytest.mark.parametrize("frozen", [0, 3], ids=["decoded", "trunk-cache"])
def test_unreadable_pool_images_are_dropped_and_counted(world, tmp_path, frozen):
    from msvlad.training.trainer import Trainer

    params = with_overrides(load_params(world.params), train={"frozen_stages": frozen})
    trainer = Trainer(params, tmp_path / "init.pt", tmp_path / "run", device=torch.device("cpu"))
    (tmp_path / "run").mkdir()
    trainer.inputs.cache_trunk(frozen)
    failures: dict[int, str] = {}
    pool = trainer.pool.sample(0)
    desc = trainer.inputs.describe(pool, failures)
    names = trainer.train_set.names
    assert sorted(names[pool[i]] for i in failures) == sorted(BAD)  # every bad one, only those
    assert desc.shape[0] == len(pool)
    trainer.mine_round()  # the miner only sees L2-normalised rows: it would raise otherwise
    with (tmp_path / "run" / "rounds.csv").open() as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["failed"] == "2" and row["pool"] == str(len(pool) - 2)
    used = {int(i) for t in trainer.progress.round_triplets for i in t}
    assert not {names[i] for i in used} & set(BAD)


def test_training_with_unreadable_images_finishes(world, tmp_path, capsys):
    argv = ["train", *world.args("--init", str(tmp_path / "init.pt"), "--out", str(tmp_path / "r"))]
    assert main(argv) == 0
    with (tmp_path / "r" / "rounds.csv").open() as fh:
        rounds = list(csv.DictReader(fh))
    assert rounds and all(r["failed"] == "2" for r in rounds)
    with (tmp_path / "r" / "triplets.csv").open() as fh:
        triplets = list(csv.DictReader(fh))
    named = {r[k] for r in triplets for k in ("anchor", "positive", "negative")}
    assert triplets and not named & set(BAD)
    assert (tmp_path / "r" / "model.pt").is_file()
