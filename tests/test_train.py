"""Training: the loop runs, logs every mined triplet, and an interrupted run resumes exactly."""

from __future__ import annotations

import csv

import pytest
import torch

from msvlad.config import load_params, with_overrides
from msvlad.nn.model import build_model, save_model
from msvlad.training.schedule import lr_at
from tinydata import make_retrieval_set, make_train_set


def _tiny_params(repo_root, data_root, **train):
    p = load_params(repo_root / "params.yaml")
    return with_overrides(
        p,
        base={"device": "cpu"},
        data={"root": str(data_root), "train_set": "train", "val_set": "val", "test_sets": ["val"]},
        model={"pretrained": False, "num_clusters": 4, "image_size": 64},
        miner={
            "name": "difficulty",
            "delta": 1.0,
            "pool_size": 24,
            "images_per_class": 4,
            "triplets_per_round": 6,
        },
        train={
            "batch_triplets": 3,
            "micro_batch": 2,
            "steps_per_epoch": 3,
            "epochs": 2,
            "checkpoint_every": 2,
            "warmup_steps": 2,
            "lr": 1e-3,
            "lr_start": 1e-4,
            **train,
        },
        extract={"scales": [1.0], "batch_size": 8},
    )


@pytest.fixture
def setup(tmp_path, repo_root):
    make_train_set(tmp_path / "data" / "train")
    make_retrieval_set(tmp_path / "data", "val")
    params = _tiny_params(repo_root, tmp_path / "data")
    torch.manual_seed(0)
    init = save_model(build_model(params.model), tmp_path / "init.pt")
    return params, init, tmp_path


def _run(params, init, out, max_steps=None):
    from msvlad.training.trainer import Trainer

    trainer = Trainer(params, init, out, device=torch.device("cpu"))
    trainer.run(max_steps)
    return trainer


def test_lr_schedule_warmup_and_decay(repo_root):
    paper = load_params(repo_root / "params.paper.yaml")
    cfg = with_overrides(paper, train={"lr_schedule": "aligned"}).train
    assert lr_at(0, cfg) == pytest.approx(1e-6)
    assert lr_at(1000, cfg) == pytest.approx(1e-6 + 0.5 * 9e-6)
    assert lr_at(2000, cfg) == pytest.approx(1e-5 / (1 + 2000 * 1e-6))
    assert lr_at(48000, cfg) == pytest.approx(1e-6)  # x0.1 at the period boundary
    assert lr_at(48000 + 10, cfg) == pytest.approx(1e-6 / (1 + 10 * 1e-6))


@pytest.mark.slow
def test_interrupted_run_resumes_to_identical_weights(setup):
    params, init, tmp = setup
    full = _run(params, init, tmp / "full")
    assert full.step == 6 and (tmp / "full" / "model.pt").exists()

    # stops mid-round (6 triplets = 2 steps per round)
    part = _run(params, init, tmp / "part", max_steps=4)
    assert part.step == 4 and not (tmp / "part" / "model.pt").exists()
    resumed = _run(params, init, tmp / "part")
    assert resumed.step == 6
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), (
        "resumed weights differ from the uninterrupted run"
    )
    # the logs were cut back and continued: same rows as the uninterrupted run
    for name in ("log.csv", "rounds.csv", "triplets.csv", "neighbors.csv"):
        rows_full = list(csv.DictReader((tmp / "full" / name).open()))
        rows_part = list(csv.DictReader((tmp / "part" / name).open()))
        drop = {"seconds", "describe_seconds", "mine_seconds"}
        kept_full = [{k: v for k, v in r.items() if k not in drop} for r in rows_full]
        kept_part = [{k: v for k, v in r.items() if k not in drop} for r in rows_part]
        assert kept_full == kept_part, name


@pytest.mark.slow
def test_triplet_log_columns_and_rules(setup):
    params, init, tmp = setup
    _run(params, init, tmp / "run")
    rows = list(csv.DictReader((tmp / "run" / "triplets.csv").open()))
    assert rows, "no triplet mined"
    for r in rows:
        assert r["anchor"].split("/")[0] == r["positive"].split("/")[0] == r["anchor_label"]
        assert r["negative"].split("/")[0] == r["negative_label"] != r["anchor_label"]
        assert r["kind"] in {"semi-hard", "hard"}
    log = list(csv.DictReader((tmp / "run" / "log.csv").open()))
    assert [int(r["epoch"]) for r in log] == [0, 1, 2]  # epoch 0 = k-means-initialised model
    assert all(0 <= float(r["val_map"]) <= 100 for r in log)


@pytest.mark.slow
def test_resume_after_a_kill_between_checkpoints_logs_each_round_once(setup):
    """A hard kill after a round was logged but before the next checkpoint: rows not duplicated."""
    import shutil

    params, init, tmp = setup
    _run(params, init, tmp / "full")
    part = tmp / "part"
    _run(params, init, part, max_steps=4)  # checkpoint at step 4, rounds 0-1 logged
    shutil.copy(part / "checkpoint.pt", tmp / "ckpt_step4.pt")
    _run(params, init, part, max_steps=1)  # mines and logs round 2, checkpoints at step 5
    shutil.copy(tmp / "ckpt_step4.pt", part / "checkpoint.pt")  # as if killed before that
    _run(params, init, part)
    for name in ("rounds.csv", "triplets.csv", "neighbors.csv"):
        rows_full = list(csv.DictReader((tmp / "full" / name).open()))
        rows_part = list(csv.DictReader((part / name).open()))
        drop = {"describe_seconds", "mine_seconds"}
        kept_full = [{k: v for k, v in r.items() if k not in drop} for r in rows_full]
        kept_part = [{k: v for k, v in r.items() if k not in drop} for r in rows_part]
        assert kept_full == kept_part, name


@pytest.mark.slow
def test_neighbor_log_matches_the_mined_ranks(setup):
    from msvlad.training.logs import NEIGHBOR_FIELDS, NEIGHBOR_K

    params, init, tmp = setup
    _run(params, init, tmp / "run")
    triplets = list(csv.DictReader((tmp / "run" / "triplets.csv").open()))
    with (tmp / "run" / "neighbors.csv").open() as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == NEIGHBOR_FIELDS
        neighbors = list(reader)
    lists: dict[tuple[str, str], list[dict]] = {}
    for r in neighbors:
        lists.setdefault((r["round"], r["anchor"]), []).append(r)
    # one list per mined anchor and round, NEIGHBOR_K long, ranked by decreasing similarity
    assert set(lists) == {(t["round"], t["anchor"]) for t in triplets}
    for (_, anchor), rows in lists.items():
        assert [int(r["rank"]) for r in rows] == list(range(NEIGHBOR_K))
        sims = [float(r["sim"]) for r in rows]
        assert sims == sorted(sims, reverse=True)
        assert anchor not in {r["neighbor"] for r in rows}
        assert all(r["neighbor"].split("/")[0] == r["label"] for r in rows)
    # the miner's positive / negative sit at their logged ranks with their logged similarities
    checked = 0
    for t in triplets:
        rows = lists[(t["round"], t["anchor"])]
        for who in ("positive", "negative"):
            rank, sim = f"{who[:3]}_rank", f"{who[:3]}_sim"
            if int(t[rank]) < NEIGHBOR_K:
                row = rows[int(t[rank])]
                assert row["neighbor"] == t[who]
                assert float(row["sim"]) == pytest.approx(float(t[sim]), abs=2e-6)
                checked += 1
    assert checked >= len(triplets)  # at least one of the two per triplet falls in the top k
