"""Scale-out under torchrun on CPU (gloo): sharded extraction equals one process; DDP runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from msvlad.cli import main
from tinydata import make_retrieval_set, make_train_set


def _torchrun(args: list[str], cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free local port for each run: no clash with another job's port
        "--nproc_per_node",
        "2",
        "-m",
        "msvlad",
        *args,
    ]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _errors(res: subprocess.CompletedProcess) -> str:
    """Every rank's error lines (one-line errors, tracebacks' last lines), then the tail."""
    lines = [ln for ln in res.stderr.splitlines() if "error" in ln.lower()]
    return "\n".join(lines[-20:]) + "\n" + res.stderr[-1500:]


@pytest.mark.slow
def test_sharded_evaluation_and_ddp_training(tmp_path, repo_root):
    data = tmp_path / "data"
    make_train_set(data / "train", num_classes=6, per_class=5)
    make_retrieval_set(data, "test", num_scenes=5)
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw["base"]["device"] = "cpu"
    raw["data"].update(root=str(data), train_set="train", val_set="test", test_sets=["test"])
    raw["model"].update(image_size=64, num_clusters=4)
    raw["cluster"].update(num_images=20, max_locals=2000)
    raw["miner"].update(pool_size=24, images_per_class=4, triplets_per_round=6, delta=0.5)
    raw["train"].update(
        steps_per_epoch=2, epochs=1, checkpoint_every=2, warmup_steps=1, frozen_stages=0
    )
    raw["extract"].update(scales=[1.0], query_scale=1.0, image_size=None, resize=None)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    p = ["--params", str(params)]
    init = tmp_path / "init.pt"
    assert main(["cluster", *p, "--method", "msvlad", "--out", str(init)]) == 0

    assert (
        main(
            [
                "evaluate",
                *p,
                "--checkpoint",
                str(init),
                "--out",
                str(tmp_path / "single"),
                "--variants",
                "plain",
            ]
        )
        == 0
    )
    res = _torchrun(
        [
            "evaluate",
            *p,
            "--checkpoint",
            str(init),
            "--out",
            str(tmp_path / "multi"),
            "--variants",
            "plain",
        ],
        repo_root,
    )
    assert res.returncode == 0, _errors(res)
    one = np.load(tmp_path / "single" / "test" / "features.npz")
    two = np.load(tmp_path / "multi" / "test" / "features.npz")
    assert np.allclose(one["db"], two["db"], atol=1e-5) and np.allclose(
        one["q"], two["q"], atol=1e-5
    )
    m1 = json.loads((tmp_path / "single" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "multi" / "metrics.json").read_text())
    assert m1["test"]["plain"]["mAP"] == m2["test"]["plain"]["mAP"]

    res = _torchrun(
        ["train", *p, "--method", "msvlad", "--init", str(init), "--out", str(tmp_path / "ddp")],
        repo_root,
    )
    assert res.returncode == 0, _errors(res)
    assert (tmp_path / "ddp" / "model.pt").exists()
    log = (tmp_path / "ddp" / "log.csv").read_text().splitlines()
    assert len(log) == 3  # header, epoch 0, epoch 1 written once (rank 0 only)
