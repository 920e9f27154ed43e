"""A training run killed at any point resumes to the weights and logs of an uninterrupted run.

Each case runs `python -m msvlad train` in a subprocess that dies at a named point
(`MSVLAD_FAULT`, `msvlad.training.checkpoint.fault_point`: SIGKILL, or SIGTERM/SIGINT for a
graceful stop), then reruns the same command in process and compares model.pt, every log, row for
row, and the final checkpoint's descriptor bank with an uninterrupted run (time columns aside).
The runs use amortised mining (`miner.refresh_fraction` 0.5), so each round's pool mixes fresh and
banked descriptors and the bank must survive every interruption; the full refresh resumes exactly
in tests/test_train.py. Leftover temp files must be gone.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from badinputs import World, make_world
from msvlad.cli import main
from msvlad.storage import load_torch
from msvlad.training.logs import RUN_LOGS

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

TIME_COLUMNS = {"seconds", "describe_seconds", "mine_seconds"}
EPOCHS = ["--set", "train.epochs=3"]  # 6 steps, checkpoints at steps 2, 4, 6, ~6 mining rounds
BANK = ["--set", "miner.refresh_fraction=0.5"]  # half of each 16-image pool re-embedded


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    w = make_world(tmp_path_factory.mktemp("world"))
    shutil.copy(w.model, w.root / "init.pt")
    return w


def _argv(w: World, out: Path) -> list[str]:
    args = ("--init", str(w.root / "init.pt"), "--out", str(out), *EPOCHS, *BANK)
    return ["train", *w.args(*args)]


@pytest.fixture(scope="module")
def reference(world: World) -> Path:
    """The uninterrupted run."""
    out = world.root / "reference"
    assert main(_argv(world, out)) == 0
    refreshed = [int(r["refreshed"]) for r in _rows(out / "rounds.csv")]
    assert refreshed[0] == 16 and set(refreshed[1:]) == {8}  # later rounds reuse the bank
    return out


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return [{k: v for k, v in r.items() if k not in TIME_COLUMNS} for r in csv.DictReader(fh)]


def _assert_same_run(run: Path, reference: Path) -> None:
    a = load_torch(reference / "model.pt")["state_dict"]
    b = load_torch(run / "model.pt")["state_dict"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "weights differ from the uninterrupted run"
    for name in RUN_LOGS:
        assert _rows(run / name) == _rows(reference / name), name
    bank_a = load_torch(reference / "checkpoint.pt")["bank"]
    bank_b = load_torch(run / "checkpoint.pt")["bank"]
    assert bank_a["ids"].numel() == 16, "the bank holds every training image"
    order_a, order_b = bank_a["ids"].argsort(), bank_b["ids"].argsort()
    for key in ("ids", "stamp", "desc"):
        assert torch.equal(bank_a[key][order_a], bank_b[key][order_b]), f"bank {key}"
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]


def _killed(w: World, out: Path, fault: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MSVLAD_FAULT": fault, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "msvlad", *_argv(w, out)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


KILLS = {
    # point (n-th pass)      what the folder holds when the process dies
    "epoch0": "the epoch-0 log row, no checkpoint yet",
    "checkpoint:1": "the logs of steps 1-2 and a complete temp file of the first checkpoint",
    "mined:2": "the checkpoint of step 2 and the logs of the next round, mined after it",
    "step:3": "the checkpoint of step 2, mid-way through step 3",
    "checkpoint:2": "the checkpoint of step 2 and a complete temp file of the one of step 4",
}


@pytest.mark.parametrize("fault", list(KILLS))
def test_killed_run_resumes_exactly(world: World, reference: Path, tmp_path: Path, fault: str):
    out = tmp_path / "run"
    proc = _killed(world, out, fault)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (out / "model.pt").exists()
    if fault.startswith("checkpoint"):  # the write the kill interrupted left its temp file
        assert [p for p in out.iterdir() if p.name.startswith(".checkpoint.pt.")]
    assert main(_argv(world, out)) == 0
    _assert_same_run(out, reference)


@pytest.mark.parametrize(("fault", "status"), [("step:3:TERM", 143), ("mined:2:INT", 130)])
def test_signal_checkpoints_then_exits(world, reference, tmp_path, fault: str, status: int):
    out = tmp_path / "run"
    proc = _killed(world, out, fault)
    assert proc.returncode == status, proc.stderr[-2000:]
    assert "stopped: " in proc.stderr and "rerun the same command to resume" in proc.stderr
    step = load_torch(out / "checkpoint.pt")["step"]  # saved at the stop, not at a period
    assert f"at step {step}: stopped by signal" in proc.stderr and 0 < step < 6
    assert not (out / "model.pt").exists()
    assert main(_argv(world, out)) == 0
    _assert_same_run(out, reference)


def test_finished_run_is_left_alone(world: World, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main(_argv(world, out)) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
