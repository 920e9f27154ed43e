"""Benchmark scripts: each main() runs at tiny sizes, writes JSON + PNG, and reports sane ratios.

Timings are not asserted (house rule: speed is reported as ratios by the scripts, never tested);
the tests check the record's structure, that ratios are finite and positive, and the helpers.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _repo_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # `benchmarks` is a top-level folder, not installed
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the scripts' --threads must not leak into other tests


def _finite_positive(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def _check_outputs(record, out, name):
    from msvlad.storage import read_json

    assert out.is_file() and out.with_suffix(".png").is_file()
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = read_json(out)
    assert on_disk["benchmark"] == name == record["benchmark"]
    env = on_disk["environment"]
    assert env["device"] == "cpu" and env["device_name"] and env["torch_threads"] >= 1
    assert on_disk["memory_method"].startswith("cpu_")
    return on_disk


# ----------------------------------------------------------------------------- common helpers


def test_time_call_counts_runs_and_reports_median():
    from benchmarks.common import Timing, time_call

    calls = []
    t = time_call(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5 and len(t.times) == 3
    assert Timing((3.0, 1.0, 2.0)).median == 2.0 and Timing((3.0, 1.0, 2.0)).best == 1.0
    with pytest.raises(ValueError, match="repeats"):
        time_call(lambda: None, repeats=0)


def test_time_interleaved_runs_round_robin():
    from benchmarks.common import time_interleaved

    order = []
    t = time_interleaved(
        {"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=2, warmup=1
    )
    assert order == ["a", "b"] * 3
    assert set(t) == {"a", "b"} and all(len(v.times) == 2 for v in t.values())


def test_time_call_measures_a_sleep():
    from benchmarks.common import time_call

    t = time_call(lambda: time.sleep(0.02), repeats=2, warmup=0)
    assert 0.015 < t.median < 1.0


def test_peak_memory_sees_a_large_allocation():
    from benchmarks.common import PeakMemory

    with PeakMemory(torch.device("cpu")) as mem:
        x = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        del x
    assert mem.method.startswith("cpu_")
    if mem.method == "cpu_vmhwm_delta":
        assert 50 < mem.peak_mib < 200


def test_ratio_and_table_formatting():
    from benchmarks.common import format_table, ratio

    assert ratio(3.0, 2.0) == 1.5
    assert math.isnan(ratio(1.0, 0.0)) and math.isnan(ratio(float("nan"), 1.0))
    text = format_table([{"name": "a", "x": 1.23456, "n": 3}, {"name": "bb", "x": None, "n": 10}])
    lines = text.splitlines()
    assert lines[0].split() == ["name", "x", "n"]
    assert lines[2].split() == ["a", "1.235", "3"] and lines[3].split() == ["bb", "-", "10"]


def test_list_arguments_reject_bad_values():
    from benchmarks.common import int_list

    assert int_list("1, 2,4") == [1, 2, 4]
    for bad in ("", "a", "0,1"):
        with pytest.raises(argparse.ArgumentTypeError):
            int_list(bad)


# ----------------------------------------------------------------------------- the scripts


def test_bench_extraction_tiny(tmp_path):
    from benchmarks import bench_extraction

    out = tmp_path / "bench" / "extraction.json"
    record = bench_extraction.main(
        [
            "--out",
            str(out),
            "--device",
            "cpu",
            "--quiet",
            "--threads",
            "1",
            "--batch-sizes",
            "1,2",
            "--mini-size",
            "64",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--e2e-images",
            "4",
            "--e2e-side",
            "80",
            "--e2e-batch",
            "2",
            "--e2e-workers",
            "0",
        ]
    )
    on_disk = _check_outputs(record, out, "bench_extraction")
    rows = on_disk["forward"]
    assert {(r["batch"], r["variant"]) for r in rows} == {
        (b, v) for b in (1, 2) for v in bench_extraction.VARIANTS
    }
    for r in rows:
        assert _finite_positive(r["images_per_s"]) and _finite_positive(r["speed_vs_backbone"])
        assert r["peak_mib"] >= 0
        if r["variant"] == "backbone":
            assert r["pool_share"] is None and r["speed_vs_backbone"] == 1.0
        else:
            assert _finite_positive(r["pool_share"])
    dims = {r["variant"]: r["dim"] for r in rows if r["batch"] == 1}
    cfg = bench_extraction.setting_config("mini")
    assert dims == {
        "backbone": 320,
        "gem": 320,
        "netvlad": cfg.num_clusters * 320,
        "msvlad": cfg.num_clusters * cfg.split,
    }
    e2e = on_disk["end_to_end"]
    assert [(r["policy"], r["batch"]) for r in e2e] == [
        ("square", 2),
        ("max_side", 2),
        ("max_side", 1),
    ]
    assert all(_finite_positive(r["speedup_vs_peer"]) for r in e2e)
    assert [r["speedup_vs_peer"] for r in e2e][2] == 1.0
    assert set(on_disk["summary"]["mini"]["max_pool_share"]) == {"gem", "netvlad", "msvlad"}


def test_bench_extraction_jpegs_have_mixed_aspects(tmp_path):
    from benchmarks.bench_extraction import make_jpegs
    from PIL import Image

    paths = make_jpegs(tmp_path, 6, 60, seed=0)
    sizes = {Image.open(p).size for p in paths}
    assert (60, 45) in sizes and (45, 60) in sizes and (60, 60) in sizes and len(sizes) == 6


def test_bench_search_tiny(tmp_path):
    from benchmarks import bench_search

    out = tmp_path / "search.json"
    record = bench_search.main(
        [
            "--out",
            str(out),
            "--device",
            "cpu",
            "--quiet",
            "--threads",
            "1",
            "--sizes",
            "400,1200",
            "--dim",
            "32",
            "--queries",
            "8",
            "--k",
            "10",
            "--repeats",
            "1",
            "--warmup",
            "0",
        ]
    )
    on_disk = _check_outputs(record, out, "bench_search")
    rows = on_disk["rows"]
    assert {(r["n"], r["method"]) for r in rows} == {
        (n, m) for n in (400, 1200) for m in bench_search.METHODS
    }
    for r in rows:
        assert _finite_positive(r["ms_per_query"]) and _finite_positive(r["speedup_vs_numpy"])
        assert _finite_positive(r["speedup_vs_flat"]) and 0 <= r["recall"] <= 1
    exact = [r for r in rows if r["method"] in ("numpy", "flat")]
    assert all(r["recall"] == 1.0 for r in exact)
    assert all(r["speedup_vs_numpy"] == 1.0 for r in rows if r["method"] == "numpy")


def test_search_helpers_against_brute_force():
    from benchmarks.bench_search import (
        clustered_descriptors,
        make_centres,
        numpy_search,
        recall_at_k,
    )

    rng = np.random.default_rng(0)
    centres = make_centres(5, 16, rng)
    x = clustered_descriptors(50, 16, centres, 0.5, rng, chunk=7)
    assert x.dtype == np.float32 and np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    top = numpy_search(x[:3], x, 4)
    assert (top[:, 0] == np.arange(3)).all()  # each vector is its own nearest neighbour
    assert recall_at_k(top, top) == 1.0
    assert recall_at_k(np.array([[0, 1, -1, 7]]), np.array([[0, 1, 2, 3]])) == 0.5


def test_bench_train_tiny(tmp_path):
    from benchmarks import bench_train

    out = tmp_path / "train.json"
    record = bench_train.main(
        [
            "--out",
            str(out),
            "--device",
            "cpu",
            "--quiet",
            "--threads",
            "1",
            "--mini-size",
            "64",
            "--triplets",
            "2",
            "--micro-batches",
            "1,2",
            "--repeats",
            "1",
            "--warmup",
            "1",
            "--rounds",
            "8:2",
        ]
    )
    on_disk = _check_outputs(record, out, "bench_train")
    steps = on_disk["steps"]
    assert [r["config"] for r in steps] == ["mb1 fp32", "mb2 fp32"]
    for r in steps:
        assert _finite_positive(r["triplets_per_s"]) and _finite_positive(r["speedup_vs_base"])
        assert r["peak_mib"] >= 0
    assert steps[0]["speedup_vs_base"] == 1.0
    (rnd,) = on_disk["rounds"]
    assert rnd["pool"] == 8 and rnd["round_triplets"] == 2 and rnd["steps"] == 1
    assert 0 < rnd["mining_share"] < 1 and _finite_positive(rnd["mining_vs_training"])
    assert rnd["mined"] <= 2


def test_train_step_matches_one_big_batch():
    """Accumulating over micro-batches of 1 gives the gradients of one forward of all triplets."""
    from benchmarks.bench_train import setting_params, train_step

    from msvlad.nn.model import build_model

    params = setting_params("mini", 64)
    torch.manual_seed(0)
    images = torch.rand(2, 3, 3, 64, 64)
    grads = []
    for micro in (1, 2):
        torch.manual_seed(1)
        model = build_model(params.model, pretrained=False).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        captured = {}
        opt.step = lambda m=model, c=captured: c.update(
            {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        )
        loss = train_step(model, opt, images, micro_batch=micro, margin=1.0, amp=False)
        grads.append((loss, captured))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5)
    assert grads[0][1].keys() == grads[1][1].keys() and grads[0][1]
    for name, g in grads[0][1].items():
        torch.testing.assert_close(g, grads[1][1][name], rtol=1e-3, atol=1e-6)


def test_bench_storage_tiny(tmp_path):
    from benchmarks import bench_storage

    out = tmp_path / "storage.json"
    record = bench_storage.main(
        [
            "--out",
            str(out),
            "--device",
            "cpu",
            "--quiet",
            "--db-size",
            "200",
            "--queries",
            "6",
            "--landmarks",
            "3",
            "--dim",
            "32",
            "--agree-k",
            "20",
        ]
    )
    on_disk = _check_outputs(record, out, "bench_storage")
    assert [r["setup"] for r in on_disk["map"]] == ["easy", "medium", "hard"]
    for r in on_disk["map"]:
        assert 0 < r["map_fp32"] <= 100 and _finite_positive(r["map_ratio"])
        assert abs(r["delta_points"]) < 5
    b = on_disk["bytes"]
    assert b["memory_fp32"] == 2 * b["memory_fp16"] == (6 + 200) * 32 * 4
    assert 0.45 < b["npz_ratio"] < 0.6 and b["memory_ratio"] == 0.5
    assert 0 < on_disk["max_abs_value_error"] < 1e-3


def test_synthetic_revisited_gnd_is_consistent():
    from benchmarks.bench_storage import synthetic_revisited

    q, db, gnd = synthetic_revisited(1000, 8, 4, 64, np.random.default_rng(0))
    assert q.shape == (8, 64) and db.shape == (1000, 64) and len(gnd) == 8
    for i, g in enumerate(gnd):
        lists = [set(g[k].tolist()) for k in ("easy", "hard", "junk")]
        assert not (lists[0] & lists[1]) and not (lists[0] & lists[2]) and not (lists[1] & lists[2])
        assert all(0 <= j < 1000 for s in lists for j in s)
        # queries of one landmark share gnd
        assert gnd[i]["easy"].tolist() == gnd[i % 4]["easy"].tolist()
    labelled = np.concatenate([g[k] for g in gnd[:4] for k in ("easy", "hard", "junk")])
    assert len(np.unique(labelled)) == len(labelled) == 200  # 20% of the database, each once
    # easy images are closer to their query than hard ones, hard than junk, junk than the rest
    mean_sim = {
        k: np.mean([(db[g[k]] @ q[i]).mean() for i, g in enumerate(gnd)])
        for k in ("easy", "hard", "junk")
    }
    rest = np.setdiff1d(np.arange(1000), labelled)
    assert mean_sim["easy"] > mean_sim["hard"] > mean_sim["junk"] > (db[rest] @ q.T).mean()


def test_bench_storage_reads_real_features(tmp_path):
    import pickle

    from benchmarks import bench_storage
    from benchmarks.bench_storage import synthetic_revisited

    from msvlad.storage import save_npz

    q, db, gnd = synthetic_revisited(120, 4, 2, 16, np.random.default_rng(1))
    save_npz(tmp_path / "ds" / "features.npz", q=q, db=db)
    (tmp_path / "gnd.pkl").write_bytes(pickle.dumps({"gnd": gnd, "imlist": [], "qimlist": []}))
    record = bench_storage.main(
        [
            "--out",
            str(tmp_path / "s.json"),
            "--device",
            "cpu",
            "--quiet",
            "--features",
            str(tmp_path / "ds" / "features.npz"),
            "--gnd",
            str(tmp_path / "gnd.pkl"),
        ]
    )
    assert record["source"] == "ds" and record["protocol"] == "revisited"
    assert record["n_db"] == 120 and record["dim"] == 16
    with pytest.raises(SystemExit):
        bench_storage.main(["--features", str(tmp_path / "ds" / "features.npz")])
