"""Benchmark scripts: each main() runs at tiny sizes, writes JSON + PNG, and reports sane ratios.

Timings are not asserted (house rule: speed is reported as ratios by the scripts, never tested);
the tests check the record's structure, that ratios are finite and positive, the machine record
and the helpers.
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


def _argv(out: Path, **options) -> list[str]:
    """A tiny CPU run: --out, --device cpu, --quiet, one untimed-free repeat, then the options."""
    argv = ["--out", str(out), "--device", "cpu", "--quiet", "--repeats", "1", "--warmup", "0"]
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def _check_outputs(record, out, name):
    from msvlad.storage import read_json

    assert out.is_file() and out.with_suffix(".png").is_file()
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = read_json(out)
    assert on_disk["benchmark"] == name == record["benchmark"]
    env = on_disk["environment"]
    assert env["device"] == "cpu" and env["device_name"] and env["torch_threads"] >= 1
    assert env["cpu_count"] >= 1 and env["cpu_model"]
    assert len(env["load_before"]) == len(env["load_after"]) == 3  # 1, 5, 15 minute averages
    assert on_disk["memory_method"].startswith("cpu_") and on_disk["wall_s"] > 0
    return on_disk


# ----------------------------------------------------------------------------- common helpers


def test_time_call_counts_runs_and_reports_median():
    from benchmarks.common import Timing, time_call

    calls = []
    t = time_call(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5 and len(t.times) == 3
    assert Timing((3.0, 1.0, 2.0)).median == 2.0 and Timing((3.0, 1.0, 2.0)).best == 1.0
    assert Timing((3.0, 1.0, 2.0)).to_json() == {
        "median_s": 2.0,
        "best_s": 1.0,
        "runs_s": [3.0, 1.0, 2.0],
    }
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
    assert 0.015 < t.best <= t.median < 1.0


def test_peak_memory_sees_a_large_allocation():
    from benchmarks.common import PeakMemory

    with PeakMemory(torch.device("cpu")) as mem:
        x = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        del x
    assert mem.method.startswith("cpu_")
    if mem.method == "cpu_vmhwm_delta":
        assert 50 < mem.peak_mib < 200


def test_ratio_and_the_markdown_table(capsys):
    from benchmarks.common import print_table, ratio

    assert ratio(3.0, 2.0) == 1.5
    assert math.isnan(ratio(1.0, 0.0)) and math.isnan(ratio(float("nan"), 1.0))
    rows = [{"name": "a", "x": 1.23456, "n": 3, "extra": 1}, {"name": "bb", "x": None, "n": 10}]
    text = print_table(
        rows, ["name", "x", "n"], argparse.Namespace(quiet=False), headers={"x": "x (s)"}
    )
    assert capsys.readouterr().out.strip() == text.strip()
    lines = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()]
    assert lines[0] == ["name", "x (s)", "n"] and lines[1][1].endswith(":")  # numbers right
    assert lines[2] == ["a", "1.235", "3"] and lines[3] == ["bb", "–", "10"]
    quiet = print_table(rows, ["n"], argparse.Namespace(quiet=True), decimals={"n": 0})
    assert capsys.readouterr().out == "" and "10" in quiet


def test_list_arguments_reject_bad_values():
    from benchmarks.common import count_list, int_list

    assert int_list("1, 2,4") == [1, 2, 4] and count_list("0,2") == [0, 2]
    for bad in ("", "a", "0,1"):
        with pytest.raises(argparse.ArgumentTypeError):
            int_list(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        count_list("-1")


def test_profile_params_reads_both_profiles():
    from benchmarks.common import profile_params

    mini, paper = profile_params("mini"), profile_params("paper", image_size=96)
    assert paper.model.image_size == 96 and paper.model.backbone != mini.model.backbone
    with pytest.raises(ValueError, match="--settings"):
        profile_params("huge")


def test_machine_caption_names_device_cores_and_load():
    from benchmarks.common import machine_caption, machine_info

    env = machine_info(torch.device("cpu"))
    assert env["cpu_count"] >= 1 and len(env["load_average"]) == 3
    text = machine_caption({**env, "load_before": [0.5, 0, 0], "load_after": [2.25, 0, 0]})
    assert env["cpu_model"] in text and "load (1 min) 0.5 -> 2.2" in text
    assert f"torch {torch.__version__}" in text
    assert "load not recorded" in machine_caption({"device_name": "old GPU"})


def test_replot_redraws_a_result_without_measuring(tmp_path):
    from benchmarks import bench_storage

    out = tmp_path / "storage.json"
    bench_storage.main(_argv(out, db_sizes="60,120", queries=4, landmarks=2, dim=16, agree_k=10))
    out.with_suffix(".png").unlink()
    record = bench_storage.main(["--replot", str(out)])
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert [r["n_db"] for r in record["results"]] == [60, 120]


# ----------------------------------------------------------------------------- the scripts


def test_bench_extraction_tiny(tmp_path):
    from benchmarks import bench_extraction

    out = tmp_path / "bench" / "extraction.json"
    record = bench_extraction.main(
        _argv(
            out,
            threads=1,
            batch_sizes="1,2",
            mini_size=64,
            e2e_images=4,
            e2e_side=80,
            e2e_batch_sizes=2,
            e2e_workers=0,
        )
    )
    on_disk = _check_outputs(record, out, "bench_extraction")
    rows = on_disk["forward"]
    assert {(r["batch"], r["variant"]) for r in rows} == {
        (b, v) for b in (1, 2) for v in bench_extraction.VARIANTS
    }
    for r in rows:
        assert _finite_positive(r["images_per_s"]) and _finite_positive(r["speed_vs_backbone"])
        assert r["peak_mib"] >= 0 and 0 < r["seconds_per_batch_min"] <= r["seconds_per_batch"]
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
        ("square", 1),
        ("square", 2),
        ("max_side", 1),
        ("max_side", 2),
    ]
    assert all(_finite_positive(r["speedup_vs_peer"]) for r in e2e)
    assert e2e[2]["speedup_vs_peer"] == 1.0  # max_side, batch 1: the baseline
    summary = on_disk["summary"]["mini"]
    assert set(summary["max_pool_share"]) == {"gem", "netvlad", "msvlad"}
    assert summary["goal"] == bench_extraction.POOL_SHARE_GOAL["mini"]


def test_bench_extraction_jpegs_have_mixed_aspects(tmp_path):
    from benchmarks.bench_extraction import make_jpegs
    from PIL import Image

    paths = make_jpegs(tmp_path, 6, 60, seed=0)
    sizes = {Image.open(p).size for p in paths}
    assert (60, 45) in sizes and (45, 60) in sizes and (60, 60) in sizes and len(sizes) == 6


# a bench_search run small enough for the test suite: two database sizes, 16-d, 4 queries
TINY_SEARCH = {
    "threads": 1,
    "sizes": "300,600",
    "dim": 16,
    "queries": 4,
    "k": 10,
    "cluster_size": 20,
}


def test_bench_search_tiny(tmp_path):
    from benchmarks import bench_search

    from msvlad.storage import save_npz

    rng = np.random.default_rng(3)
    real = rng.standard_normal((46, 16)).astype(np.float32)
    real /= np.linalg.norm(real, axis=1, keepdims=True)
    features = save_npz(tmp_path / "m" / "d" / "features.npz", q=real[:6], db=real[6:])
    out = tmp_path / "search.json"
    record = bench_search.main(
        _argv(
            out,
            **TINY_SEARCH,
            copy_limit=500,  # N = 600 runs without the flat index, as R1M does
            features=features,
        )
    )
    on_disk = _check_outputs(record, out, "bench_search")
    rows = on_disk["rows"]
    synthetic = [r for r in rows if r["source"] == "synthetic"]
    assert {(r["n"], r["method"]) for r in synthetic} == {
        (n, m) for n in (300, 600) for m in bench_search.METHODS if (n, m) != (600, "flat")
    }
    for r in rows:
        assert _finite_positive(r["ms_per_query"]) and _finite_positive(r["speedup_vs_flat"])
        assert 0 < r["ms_per_query_min"] <= r["ms_per_query"] and 0 <= r["recall"] <= 1
        assert _finite_positive(r["index_bytes"]) and r["build_s"] >= 0
    assert all(r["recall"] == 1.0 for r in rows if r["method"] in ("numpy", "flat"))
    # one default point per (source, n, family), and every family sweeps >= 4 settings
    defaults = [(r["source"], r["n"], r["method"]) for r in rows if r["default"]]
    assert (
        len(defaults)
        == len(set(defaults))
        == len({(r["source"], r["n"], r["method"]) for r in rows})
    )
    for method, sweeps in bench_search.SWEEPS.items():
        for option, values in sweeps:
            sel = [r for r in synthetic if r["n"] == 300 and r["method"] == method]
            assert {f"{option}={v}" for v in values} <= {r["setting"] for r in sel}
    mem = {r["method"]: r["memory_vs_flat"] for r in synthetic if r["n"] == 600}
    assert mem["ivfpq"] < mem["ivfsq8"] < mem["ivf"] and mem["numpy"] == 1.0
    assert {r["k"] for r in rows if r["source"] == "real:m/d"} == {10}  # a quarter of 40
    assert set(on_disk["profile"]) == {"300", "600", "real:m/d"}
    assert on_disk["summary"]["n"] == 600


def test_bench_search_restricts_the_families_above_a_size(tmp_path):
    from benchmarks import bench_search

    out = tmp_path / "search.json"
    record = bench_search.main(
        _argv(
            out,
            **TINY_SEARCH,
            methods="numpy,ivf,ivfsq8,hnsw",
            restrict_above=300,
            restricted_methods="ivfsq8,opq",  # opq is not asked for: it stays out
        )
    )
    got = {(r["n"], r["method"]) for r in record["rows"]}
    assert got == {(300, m) for m in ("numpy", "ivf", "ivfsq8", "hnsw")} | {(600, "ivfsq8")}


def test_landmark_model_is_seeded_clustered_and_fills_a_memmap(tmp_path):
    from benchmarks.bench_search import LandmarkModel, database_array

    model = LandmarkModel.make(2000, 32, np.random.default_rng(0), cluster_size=20)
    assert model.centres.shape == (100, 32) and math.isclose(model.popularity.sum(), 1.0)
    assert np.all(np.diff(model.popularity) < 0)  # Zipf: the first landmark is the most popular
    x = model.draw(500, np.random.default_rng(1))
    np.testing.assert_array_equal(x, model.draw(500, np.random.default_rng(1)))
    assert x.dtype == np.float32 and np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    # views of a landmark are far closer to its centre than random unit vectors are (1/sqrt(32))
    assert np.max(x @ model.centres.T, axis=1).mean() > 0.4
    stored = model.fill(database_array(300, 32, tmp_path), np.random.default_rng(1), chunk=7)
    in_memory = model.fill(database_array(300, 32, None), np.random.default_rng(1), chunk=7)
    assert isinstance(stored, np.memmap) and (tmp_path / "db_300x32.npy").is_file()
    assert not isinstance(in_memory, np.memmap)
    np.testing.assert_array_equal(np.asarray(stored), in_memory)


def test_search_helpers_against_brute_force():
    from benchmarks.bench_search import (
        exact_search,
        numpy_search,
        recall_at_k,
        similarity_profile,
    )

    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 16)).astype(np.float32)
    top = numpy_search(x[:3], x, 4, block=2)
    assert (top[:, 0] == np.arange(3)).all()  # each vector is its own nearest neighbour
    scores, ids = exact_search(x[:3], x, 4)
    np.testing.assert_array_equal(ids, top)
    assert recall_at_k(top, top) == 1.0
    assert recall_at_k(np.array([[0, 1, -1, 7]]), np.array([[0, 1, 2, 3]])) == 0.5
    profile = similarity_profile(np.tile(np.linspace(1, 0, 20), (2, 1)))
    assert set(profile) == {"rank_1", "rank_10"} and profile["rank_1"] == 1.0


def test_bench_train_tiny(tmp_path):
    from benchmarks import bench_train

    out = tmp_path / "train.json"
    record = bench_train.main(
        _argv(out, threads=1, mini_size=64, triplets=2, micro_batches="1,2", rounds="8:2,16:2")
    )
    on_disk = _check_outputs(record, out, "bench_train")
    steps = on_disk["steps"]
    assert [r["config"] for r in steps] == ["mb1 fp32", "mb2 fp32"]
    for r in steps:
        assert _finite_positive(r["triplets_per_s"]) and _finite_positive(r["speedup_vs_base"])
        assert r["peak_mib"] >= 0 and r["seconds_per_step_min"] <= r["seconds_per_step"]
    assert steps[0]["speedup_vs_base"] == 1.0
    assert [(r["pool"], r["round_triplets"], r["steps"]) for r in on_disk["rounds"]] == [
        (8, 2, 1),
        (16, 2, 1),
    ]
    for rnd in on_disk["rounds"]:
        assert 0 < rnd["mining_share"] < 1 and _finite_positive(rnd["mining_vs_training"])
        assert rnd["mined"] <= 2


def test_default_rounds_scale_the_profile():
    from benchmarks.bench_train import ROUND_SCALES, default_rounds
    from benchmarks.common import profile_params

    params = profile_params("paper")
    rounds = default_rounds(params)
    assert len(rounds) == len(ROUND_SCALES) >= 4
    assert (params.miner.pool_size, params.miner.triplets_per_round) in rounds
    assert rounds[0] == (2000, 64)  # a quarter of 8000 images and 256 triplets
    assert [p for p, _ in rounds] == sorted(p for p, _ in rounds)


def test_train_step_matches_one_big_batch():
    """Accumulating over micro-batches of 1 gives the gradients of one forward of all triplets."""
    from benchmarks.bench_train import train_step
    from benchmarks.common import profile_params

    from msvlad.nn.model import build_model

    params = profile_params("mini", 64)
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
        _argv(out, db_sizes="200,400", queries=6, landmarks=3, dim=32, agree_k=20)
    )
    on_disk = _check_outputs(record, out, "bench_storage")
    assert [r["n_db"] for r in on_disk["results"]] == [200, 400]
    for result in on_disk["results"]:
        assert [r["setup"] for r in result["map"]] == ["easy", "medium", "hard"]
        for r in result["map"]:
            assert 0 < r["map_fp32"] <= 100 and _finite_positive(r["map_ratio"])
            assert abs(r["delta_points"]) < 5
        b = result["bytes"]
        n = result["n_db"]
        assert b["memory_fp32"] == 2 * b["memory_fp16"] == (6 + n) * 32 * 4
        assert 0.45 < b["npz_ratio"] < 0.6 and b["memory_ratio"] == 0.5
        assert 0 < result["max_abs_value_error"] < 1e-3


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
    save_npz(tmp_path / "m" / "ds" / "features.npz", q=q, db=db)
    (tmp_path / "gnd.pkl").write_bytes(pickle.dumps({"gnd": gnd, "imlist": [], "qimlist": []}))
    record = bench_storage.main(
        _argv(
            tmp_path / "s.json",
            db_sizes=60,
            queries=4,
            landmarks=2,
            dim=16,
            features=tmp_path / "m" / "ds" / "features.npz",
            gnd=tmp_path / "gnd.pkl",
        )
    )
    real = record["results"][-1]
    assert real["source"] == "real:m/ds" and real["protocol"] == "revisited"
    assert real["n_db"] == 120 and real["dim"] == 16
    with pytest.raises(SystemExit):
        bench_storage.main(["--features", str(tmp_path / "m" / "ds" / "features.npz")])
