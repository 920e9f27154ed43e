"""What `evaluate` writes: the raw variant, the test-time input policy, a manifest, no stale files,
the umask's permissions, and a distractor cache that is only reused for the model that made it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from badinputs import World, make_world, snapshot
from msvlad.cli import main
from msvlad.data.testsets import load_dataset
from msvlad.evaluation.extract import describe_and_whiten
from msvlad.evaluation.pipeline import dataset_items
from msvlad.nn.model import load_model, save_model
from msvlad.storage import (
    atomic_path,
    load_torch,
    payload_digest,
    remove_stale_temps,
    save_torch,
    write_bytes,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return make_world(tmp_path_factory.mktemp("world"))


def _evaluate(w: World, out: Path, *extra: str, model: Path | None = None) -> int:
    ckpt = str(model or w.model)
    return main(["evaluate", *w.args("--checkpoint", ckpt, "--out", str(out), *extra)])


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())["test"]


def test_raw_variant_is_the_model_without_its_whitening(world: World, tmp_path: Path) -> None:
    assert _evaluate(world, tmp_path / "a") == 0
    unwhitened = load_model(world.model)
    unwhitened.whitening = None
    save_model(unwhitened, tmp_path / "raw.pt")
    assert _evaluate(world, tmp_path / "b", model=tmp_path / "raw.pt") == 0
    with_white, without = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert set(without) == {"plain", "qe", "dba"}  # no separate raw row without a whitening
    assert with_white["raw"]["mAP"] == without["plain"]["mAP"]
    assert with_white["raw"]["dim"] == without["plain"]["dim"] == unwhitened.raw_dim
    assert with_white["plain"]["dim"] == 8
    a = (tmp_path / "a" / "test" / "per_query_raw.csv").read_text()
    assert a == (tmp_path / "b" / "test" / "per_query.csv").read_text()


def test_whiten_dim_null_keeps_the_raw_descriptor(world: World, tmp_path: Path) -> None:
    from msvlad.report.results import descriptor_label

    raw_model = tmp_path / "nowhite.pt"
    argv = ["whiten", *world.args("--checkpoint", str(world.model), "--out", str(raw_model))]
    assert main([*argv, "--set", "whiten.dim=null"]) == 0
    assert load_model(raw_model).whitening is None
    assert _evaluate(world, tmp_path / "a") == 0
    assert _evaluate(world, tmp_path / "b", model=raw_model) == 0
    white, raw = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert white["plain"]["whitened"] and not white["raw"]["whitened"]
    assert not raw["plain"]["whitened"] and "raw" not in raw
    assert raw["plain"]["mAP"] == white["raw"]["mAP"]  # the same descriptor as the raw variant
    dim = load_model(world.model).raw_dim
    assert descriptor_label(white["plain"]) == "8-d PCA-w"
    assert descriptor_label(raw["plain"]) == f"{dim}-d raw"
    assert descriptor_label({"dim": 8}) == ""  # metrics written before the field existed


def test_test_time_input_policy_is_applied_and_recorded(world: World, tmp_path: Path) -> None:
    out = tmp_path / "o"
    args = ["--set", "extract.image_size=96", "--set", "extract.resize=max_side"]
    args += ["--set", "extract.scales=[1.0,0.75]", "--set", "extract.query_scale=1.0"]
    assert _evaluate(world, out, *args) == 0
    policy = {"image_size": 96, "resize": "max_side", "scales": [1.0, 0.75], "query_scale": 1.0}
    assert all(v["input"] == policy for v in _metrics(out).values())
    assert json.loads((out / "manifest.json").read_text())["input"] == policy
    model = load_model(world.model)
    queries, db = dataset_items(load_dataset(world.data, "test"))
    expected, _ = describe_and_whiten(
        model, db, image_size=96, scales=[1.0, 0.75], resize="max_side"
    )
    np.testing.assert_allclose(np.load(out / "test" / "features.npz")["db"], expected, atol=1e-6)
    assert model.config.image_size == 64  # the network itself is untouched


def test_reevaluation_leaves_no_stale_files(world: World, tmp_path: Path) -> None:
    out = tmp_path / "o"
    assert _evaluate(world, out) == 0
    assert (out / "test" / "metrics_qe.json").is_file()
    assert _evaluate(world, out, "--variants", "plain") == 0
    files = set(snapshot(out))
    assert files == {
        "manifest.json",
        "metrics.json",
        "summary.json",
        "timing.json",
        "test/features.npz",
        "test/metrics.json",
        "test/per_query.csv",
        "test/ranks.npy",
    }
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["variants"] == ["plain"] and sorted(manifest["files"]) == sorted(
        files - {"manifest.json"}
    )
    assert manifest["checkpoint"]["sha256"] == hashlib.sha256(world.model.read_bytes()).hexdigest()
    assert manifest["params"]["extract"]["scales"] == [1.0] and manifest["code"]["version"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]  # no temp folder


def test_outputs_honour_the_umask(world: World, tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        assert _evaluate(world, tmp_path / "o") == 0
        write_bytes(tmp_path / "f.bin", b"x")
    finally:
        os.umask(old)
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "o").rglob("*")}
    assert modes and all(m == (0o750 if p.is_dir() else 0o640) for p, m in modes.items())
    assert stat.S_IMODE((tmp_path / "o").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "f.bin").stat().st_mode) == 0o640


def test_distractor_cache_is_only_reused_by_the_same_model_and_input(world, tmp_path, monkeypatch):
    import msvlad.stages.evaluate as stage

    folder = world.data / "noise"
    (folder / "jpg").mkdir(parents=True, exist_ok=True)
    for i, src in enumerate(sorted(world.jpg.glob("s0_*.jpg"))):
        shutil.copy(src, folder / "jpg" / f"n{i}.jpg")
    (folder / "noise.txt").write_text("n0\nn1\nn2\n")
    calls = []
    real = stage.describe_multiscale
    monkeypatch.setattr(
        stage, "describe_multiscale", lambda *a, **k: calls.append(k["progress"]) or real(*a, **k)
    )
    out = tmp_path / "o"
    assert _evaluate(world, out, "--distractors", "noise") == 0
    first = json.loads((out / "metrics.json").read_text())
    assert first["test+noise"]["plain"]["num_db"] == 9 + 3 and calls == ["noise"]
    assert _evaluate(world, out, "--distractors", "noise") == 0
    assert calls == ["noise"]  # same model, same input: the cache of the old folder is reused
    assert _evaluate(world, out, "--distractors", "noise", "--set", "extract.scales=[0.75]") == 0
    assert calls == ["noise", "noise"]  # another input policy: described again
    second = json.loads((out / "metrics.json").read_text())
    assert second["test+noise"]["raw"]["num_db"] == 12


def test_checkpoint_digest_round_trip(tmp_path: Path) -> None:
    state = {"w": torch.arange(6.0).reshape(2, 3), "n": 3, "cfg": {"a": [1, 2.5, None]}}
    save_torch(tmp_path / "c.pt", state)
    loaded = load_torch(tmp_path / "c.pt")
    assert loaded["sha256"] == payload_digest(state) and torch.equal(loaded["w"], state["w"])
    assert payload_digest({**state, "n": 4}) != payload_digest(state)
    assert payload_digest({**state, "w": state["w"].to(torch.float64)}) != payload_digest(state)
    torch.save(state, tmp_path / "old.pt")  # written before digests existed: still loads
    assert load_torch(tmp_path / "old.pt")["n"] == 3


def test_stale_temp_files_are_removed_and_nothing_else(tmp_path: Path) -> None:
    (tmp_path / ".checkpoint.pt.abc123.tmp").write_bytes(b"half")
    (tmp_path / ".out.x1.tmp").mkdir()
    (tmp_path / "keep.tmp").write_text("a user's file")
    (tmp_path / "checkpoint.pt").write_text("kept")
    removed = remove_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == [".checkpoint.pt.abc123.tmp", ".out.x1.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "keep.tmp"]
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "f") as tmp:
        tmp.write_text("x")
        raise RuntimeError  # a failed write leaves neither the file nor its temp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "keep.tmp"]


def test_results_table_shows_the_raw_row(world: World, tmp_path: Path) -> None:
    from msvlad.config import load_params
    from msvlad.report.results import load_results, results_table

    assert _evaluate(world, tmp_path / "results" / "msvlad") == 0
    params = load_params(world.params)
    frame = load_results(tmp_path / "results", params, methods=["msvlad"])
    assert set(frame["input"]) == {"64 square x{1}, queries x0.7"}
    table = results_table(frame)
    assert list(table.index) == ["msvlad", "msvlad+raw", "msvlad+qe", "msvlad+dba"]
    assert list(table.columns[:4]) == ["Method", "Training set", "Descriptor", "Test input"]
    assert set(table["Test input"]) == {"64 square x{1}, queries x0.7"}  # each row names it
    assert table.loc["msvlad+raw", "Descriptor"].endswith("-d raw")
    assert table.loc["msvlad", "Descriptor"] == "8-d PCA-w"
    label = params.methods["msvlad"].label
    assert table.loc["msvlad+raw", "Method"] == f"{label} +raw (unwhitened)"
    raw = _metrics(tmp_path / "results" / "msvlad")["raw"]["mAP"]["medium"]
    assert table.loc["msvlad+raw", "test mAP M"] == pytest.approx(raw)
