"""Amortised mining: the descriptor bank chooses what a round re-embeds, and f = 1 changes nothing.

The bank's choice (no descriptor first, then the oldest, ties by pool position), its memory bound,
its checkpoint round trip and the assembly of a round's pool are checked against hand-computed
cases; a training run with `miner.refresh_fraction: 1` is checked against the same run with the
bank taken out (the pre-bank path): identical weights and logs.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from msvlad.config import with_overrides
from msvlad.nn import functional as LF
from msvlad.storage import load_torch, save_torch
from msvlad.training.bank import DescriptorBank, describe_pool
from msvlad.training.logs import AGE_FIELDS, RUN_LOGS, PoolDescriptors

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

DIM = 8


def _desc(ids, step: int) -> torch.Tensor:
    """A distinct unit descriptor per (image, step): recognisable after any gather."""
    ids = torch.as_tensor(np.asarray(ids), dtype=torch.float64)
    x = torch.stack([ids * 0 + 1, ids, ids**2 / 10, ids * 0 + step] + [ids * 0] * (DIM - 4), 1)
    return LF.l2n(x.float())


class FakeNet:
    """`describe(indices, failures)` of a network at a given step; records what it embedded."""

    def __init__(self, unreadable: tuple[int, ...] = ()) -> None:
        self.step, self.calls, self.unreadable = 0, [], set(unreadable)

    def __call__(self, idx: np.ndarray, failures: dict[int, str]) -> torch.Tensor:
        self.calls.append(idx.copy())
        out = _desc(idx, self.step)
        for pos, i in enumerate(idx):
            if int(i) in self.unreadable:
                failures[pos] = "unreadable"
                out[pos] = 0.0
        return out


def test_refresh_takes_missing_then_oldest_ties_by_position():
    bank = DescriptorBank(20, fraction=0.5, min_rows=20)
    pool = np.array([7, 3, 9, 1, 12, 5])
    assert bank.to_refresh(pool).tolist() == [0, 1, 2, 3, 4, 5]  # nothing stored: all missing
    bank.put(np.array([7, 3, 9, 1]), _desc([7, 3, 9, 1], 0), step=4)
    bank.put(np.array([9]), _desc([9], 6), step=6)
    # 12 and 5 have no descriptor (positions 4, 5); ceil(0.5 * 6) = 3: then the oldest, stamp 4,
    # of which 7 (position 0) comes first
    assert bank.to_refresh(pool).tolist() == [0, 4, 5]
    bank.put(np.array([12, 5]), _desc([12, 5], 0), step=6)
    assert bank.to_refresh(pool).tolist() == [0, 1, 3]  # stamp 4: 7, 3, 1; 9, 12, 5 are at 6
    bank.fraction = 0.0  # only what has no descriptor
    assert bank.to_refresh(pool).tolist() == []
    assert DescriptorBank(20, 1.0, 20).to_refresh(pool).tolist() == list(range(6))


def test_put_keeps_the_last_copy_and_evicts_the_oldest():
    # room for 4 rows of 8 float32 (the pool minimum is 3)
    bank = DescriptorBank(10, 0.5, min_rows=3, max_bytes=4 * 4 * DIM)
    first, again = _desc([2], 0), _desc([2], 9)
    bank.put(torch.tensor([2, 4, 2]), torch.cat([first, _desc([4], 0), again]), step=1)
    assert len(bank) == 2 and torch.equal(bank.get(np.array([2])), again)  # the last one wins
    bank.put(np.array([6, 8]), _desc([6, 8], 0), step=2)
    bank.put(np.array([4]), _desc([4], 3), step=3)  # 4 is now the newest
    bank.put(np.array([1, 3]), _desc([1, 3], 0), step=5)  # full: evicts stamp 1 (2), then 6 (id)
    assert sorted(bank.ids.tolist()) == [1, 3, 4, 8]
    assert bank.slot[2] == bank.slot[6] == -1
    assert bank.stamps(np.array([4, 8, 1])).tolist() == [3, 2, 5]
    torch.testing.assert_close(
        bank.get(np.array([4, 8])), torch.cat([_desc([4], 3), _desc([8], 0)])
    )
    with pytest.raises(ValueError, match="exceed"):
        bank.put(np.arange(5), _desc(np.arange(5), 0), step=6)


def test_full_refresh_keeps_nothing_and_training_updates_can_be_off():
    bank = DescriptorBank(10, 1.0, min_rows=4)
    bank.put(np.array([1, 2]), _desc([1, 2], 0), step=0)
    bank.put_training(torch.tensor([[1, 2, 3]]), _desc([1, 2, 3], 0).view(1, 3, -1), step=0)
    assert len(bank) == 0 and bank.desc is None and bank.state_dict()["ids"].numel() == 0
    off = DescriptorBank(10, 0.5, min_rows=4, from_training=False)
    off.put_training(torch.tensor([[1, 2, 3]]), _desc([1, 2, 3], 0).view(1, 3, -1), step=0)
    assert len(off) == 0


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_training_descriptors_at_pool_precision_and_unit_norm(precision):
    bank = DescriptorBank(10, 0.5, min_rows=4, precision=precision)
    d = torch.randn(2, 3, DIM, dtype=torch.bfloat16)  # an autocast output, not normalised
    bank.put_training(torch.tensor([[0, 1, 2], [3, 4, 5]]), d, step=7)
    ref = LF.l2n(d.float().view(6, DIM))
    if precision == "fp16":
        ref = LF.l2n(ref.half().float())
    got = bank.get(np.arange(6))
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert (got.norm(dim=1) - 1).abs().max() < 1e-5 and bank.stamps(np.arange(6)).tolist() == [
        7
    ] * 6


def test_state_round_trip_through_a_weights_only_file(tmp_path):
    bank = DescriptorBank(12, 0.25, min_rows=4)
    bank.put(np.array([5, 1, 9]), _desc([5, 1, 9], 0), step=2)
    bank.put(np.array([1, 11]), _desc([1, 11], 3), step=3)
    path = save_torch(tmp_path / "bank.pt", bank.state_dict())
    other = DescriptorBank(12, 0.25, min_rows=4)
    other.load_state_dict(load_torch(path))
    pool = np.array([11, 5, 9, 1, 0])
    assert other.to_refresh(pool).tolist() == bank.to_refresh(pool).tolist()
    stored = np.array([5, 1, 9, 11])
    assert torch.equal(other.get(stored), bank.get(stored))
    assert other.stamps(stored).tolist() == bank.stamps(stored).tolist() == [2, 3, 2, 3]
    other.load_state_dict(None)  # a checkpoint from before the bank
    assert len(other) == 0 and other.to_refresh(pool).tolist() == list(range(5))


def test_pool_mixes_fresh_and_banked_descriptors_with_their_ages():
    net, bank = FakeNet(unreadable=(4,)), DescriptorBank(10, 0.5, min_rows=6)
    first = describe_pool(bank, net, np.array([0, 1, 2, 3, 4, 5]), step=0)
    assert first.refreshed == 6 and first.failed == 1 and first.pool_idx.tolist() == [0, 1, 2, 3, 5]
    assert torch.equal(first.desc, _desc([0, 1, 2, 3, 5], 0)) and not first.ages.any()
    net.step = 5
    bank.put(np.array([2]), _desc([2], 4), step=4)  # a training forward at step 4
    pool = np.array([6, 2, 0, 4, 3, 1])
    # missing: 6 (pos 0) and 4 (pos 3, unreadable before); ceil(0.5 * 6) = 3: then the oldest,
    # stamp 0, first by position: 0 (pos 2)
    got = describe_pool(bank, net, pool, step=5)
    assert net.calls[-1].tolist() == [6, 0, 4]
    assert got.refreshed == 3 and got.failed == 1 and got.pool_idx.tolist() == [6, 2, 0, 3, 1]
    expected = torch.cat([_desc([6], 5), _desc([2], 4), _desc([0], 5), _desc([3, 1], 0)])
    assert torch.equal(got.desc, expected)
    assert got.ages.tolist() == [0, 1, 0, 5, 5]
    assert bank.stamps(np.array([6, 0, 2, 3])).tolist() == [5, 5, 4, 0] and bank.slot[4] == -1


def test_full_refresh_is_the_plain_embedding_call():
    net, bank = FakeNet(unreadable=(3,)), DescriptorBank(10, 1.0, min_rows=6)
    pool = np.array([5, 3, 1, 8])
    got = describe_pool(bank, net, pool, step=9)
    assert [c.tolist() for c in net.calls] == [[5, 3, 1, 8]]
    assert got.pool_idx.tolist() == [5, 1, 8] and got.refreshed == 4 and got.failed == 1
    assert torch.equal(got.desc, _desc([5, 1, 8], 0)) and got.ages.tolist() == [0, 0, 0]


# ----------------------------------------------------------------------------- trainer


def _plain_describe_pool(bank, describe, pool_idx, step, device) -> PoolDescriptors:
    """The pool path of a run without a bank: embed every pool image, drop the unreadable."""
    failures: dict[int, str] = {}
    desc = describe(pool_idx, failures)
    keep = np.setdiff1d(np.arange(len(pool_idx)), list(failures))
    desc = desc[torch.from_numpy(keep)] if failures else desc
    zeros = np.zeros(len(keep), dtype=np.int64)
    return PoolDescriptors(pool_idx[keep], desc, zeros, len(pool_idx), len(failures))


def _train(params, init, out, monkeypatch=None):
    from msvlad.training import trainer as module

    if monkeypatch is not None:  # the bank taken out
        monkeypatch.setattr(module, "describe_pool", _plain_describe_pool)
    t = module.Trainer(params, init, out, device=torch.device("cpu"))
    if monkeypatch is not None:
        monkeypatch.setattr(t.bank, "put_training", lambda *a: None)
    t.run()
    return t


def _rows(path):
    drop = {"seconds", "describe_seconds", "mine_seconds"}
    with path.open(newline="") as fh:
        return [{k: v for k, v in r.items() if k not in drop} for r in csv.DictReader(fh)]


@pytest.fixture
def tiny(tmp_path, repo_root):
    from msvlad.config import load_params
    from msvlad.nn.model import build_model, save_model
    from tinydata import make_retrieval_set, make_train_set

    make_train_set(tmp_path / "data" / "train", num_classes=4, per_class=4, size=32)
    make_retrieval_set(tmp_path / "data", "val", num_scenes=2, db_per_scene=2, size=32)
    params = with_overrides(
        load_params(repo_root / "params.yaml"),
        base={"device": "cpu"},
        data={"root": str(tmp_path / "data"), "train_set": "train", "val_set": "val"},
        model={"pretrained": False, "num_clusters": 4, "image_size": 32},
        miner={"pool_size": 16, "images_per_class": 4, "triplets_per_round": 4, "delta": 1.0},
        train={"batch_triplets": 2, "micro_batch": 1, "steps_per_epoch": 3, "epochs": 2},
        extract={"scales": [1.0], "batch_size": 8},
    )
    params = with_overrides(params, train={"frozen_stages": 0, "warmup_steps": 1})
    torch.manual_seed(0)
    return params, save_model(build_model(params.model), tmp_path / "init.pt"), tmp_path


def test_full_refresh_trains_exactly_as_without_the_bank(tiny, monkeypatch):
    params, init, tmp = tiny
    assert params.miner.refresh_fraction == 1.0  # the default of both profiles
    with_bank = _train(params, init, tmp / "bank")
    without = _train(params, init, tmp / "plain", monkeypatch)
    a, b = with_bank.model.state_dict(), without.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "weights differ from the run without a bank"
    for name in RUN_LOGS:
        assert _rows(tmp / "bank" / name) == _rows(tmp / "plain" / name), name
    rounds = _rows(tmp / "bank" / "rounds.csv")
    assert len(rounds) >= 3 and all(r["refreshed"] == r["pool"] == "16" for r in rounds)
    assert all(r["age_max"] == "0" for r in rounds) and len(with_bank.bank) == 0


def test_partial_refresh_reuses_the_bank_and_logs_ages(tiny):
    params, init, tmp = tiny
    params = with_overrides(params, miner={"refresh_fraction": 0.25})
    t = _train(params, init, tmp / "run")
    rounds = _rows(tmp / "run" / "rounds.csv")
    assert rounds[0]["refreshed"] == "16" and rounds[0]["age_max"] == "0"  # an empty bank
    assert all(r["refreshed"] == "4" for r in rounds[1:]) and len(rounds) >= 3
    assert any(int(r["age_max"]) > 0 for r in rounds[1:])
    # the training forward refreshed the images of the steps: their age is at most the round's
    # steps, stamped with the step of their weights
    triplets = _rows(tmp / "run" / "triplets.csv")
    ages = [int(r[k]) for r in triplets for k in AGE_FIELDS]
    assert max(ages) <= max(int(r["age_max"]) for r in rounds) and min(ages) >= 0
    assert len(t.bank) == 16 and t.bank.stamps(np.arange(16)).max() == t.step - 1


def test_rolling_pool_embeds_only_its_new_classes(tiny):
    """With rolling draws a round keeps the newer half of the last pool's classes (their images
    come from the bank) and re-embeds the half it brings in."""
    params, init, tmp = tiny
    miner = {"refresh_fraction": 0.5, "pool_draw": "rolling", "pool_size": 8}
    t = _train(with_overrides(params, miner=miner), init, tmp / "run")
    rounds = _rows(tmp / "run" / "rounds.csv")
    assert len(rounds) >= 3 and rounds[0]["refreshed"] == rounds[0]["pool"] == "8"
    labels = t.train_set.labels
    for r in range(1, len(rounds)):
        prev, cur = t.pool.sample(r - 1), t.pool.sample(r)
        assert np.array_equal(cur[:4], prev[4:])  # the newer class stays, first, same images
        assert len(np.unique(labels[cur])) == 2 and rounds[r]["refreshed"] == "4", r
        assert int(rounds[r]["age_max"]) > 0  # the kept class's descriptors are from the bank


def test_fraction_zero_with_every_image_banked_embeds_nothing():
    net, bank = FakeNet(), DescriptorBank(10, 0.0, min_rows=4)
    bank.put(np.array([1, 2, 3]), _desc([1, 2, 3], 2), step=2)
    got = describe_pool(bank, net, np.array([3, 1]), step=7, device="cpu")
    assert net.calls == [] and got.refreshed == 0 and got.failed == 0
    assert torch.equal(got.desc, _desc([3, 1], 2)) and got.ages.tolist() == [5, 5]
    missing = describe_pool(bank, net, np.array([3, 9]), step=8)  # 9 has no descriptor
    assert [c.tolist() for c in net.calls] == [[9]] and missing.ages.tolist() == [6, 0]


def test_training_forward_descriptors_equal_the_eval_ones(tiny, monkeypatch):
    """Train mode keeps BatchNorm frozen: the step's descriptors are the pool's, up to rounding."""
    from msvlad.training.trainer import Trainer

    params, init, tmp = tiny
    params = with_overrides(params, miner={"refresh_fraction": 0.5})
    trainer = Trainer(params, init, tmp / "run", device=torch.device("cpu"))
    monkeypatch.setattr(trainer.optimizer, "step", lambda: None)  # the weights stay as they are
    triplets = torch.tensor([[0, 1, 4], [5, 6, 12]])
    trainer.train_step(triplets)
    ids = np.unique(triplets.numpy())
    assert len(trainer.bank) == len(ids) and set(trainer.bank.stamps(ids)) == {0}
    eval_desc = trainer.inputs.describe(ids)
    torch.testing.assert_close(trainer.bank.get(ids), eval_desc, rtol=0, atol=1e-5)
