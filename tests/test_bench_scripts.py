"""The pooling, amortised-mining and GPU-profile benchmark scripts run and record what they claim.

Speed is never asserted: only that the scripts run at toy sizes, that their records hold the
fields and invariants the docs quote (ratios in range, the pool sizes they say they described),
and that their summaries compute what they state on hand-made inputs.
"""

from __future__ import annotations

import math

import pytest

from msvlad.storage import read_json

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_gpu_paper_profile_smoke_runs_on_the_cpu(tmp_path):
    from benchmarks.gpu_paper_profile import SMOKE, main

    record = main(["--smoke", "--out", str(tmp_path / "gpu.json")])
    assert read_json(tmp_path / "gpu.json")["benchmark"] == "gpu_paper_profile"
    assert (tmp_path / "gpu.png").is_file()
    assert record["smoke"] and record["environment"]["device"] == "cpu"
    assert record["environment"]["load_before"] is not None
    assert record["profile"]["model"]["backbone"] == "resnet101"  # the paper profile, small
    (step,) = record["steps"]
    assert step["micro_batch"] == 1 and step["step_s"]["median_s"] > 0
    pool = SMOKE["pool_size"]
    by_fraction = {r["fraction"]: r for r in record["rounds"]}
    assert by_fraction[1.0]["refreshed"] == pool and by_fraction[0.5]["refreshed"] == pool // 2
    for r in record["rounds"]:
        assert 0 < r["mining_share"] < 1 and r["steps_per_round"] == 2
        share = (r["describe_s"] + r["mine_s"]) / (r["describe_s"] + r["mine_s"] + r["train_s"])
        assert math.isclose(r["mining_share"], share)
    assert record["extraction"][0]["images_per_s"] > 0
    (pooling,) = record["pooling"]
    assert pooling["max_abs_diff"] < 1e-5 and 0 < pooling["fused_share_median"] < 1
    cover = record["coverage"]
    assert cover["images"] >= 1_580_470 and len(cover["in_bank"]) == 20
    assert cover["in_bank"][0] == cover["ever_described"][0] == 0.0  # nothing before round 0
    assert all(b <= e for b, e in zip(cover["in_bank"], cover["ever_described"], strict=True))
    (rolling,) = cover["rolling"]  # fraction 0.5: half of every later pool is the last one's
    assert rolling["fraction"] == 0.5 and rolling["in_bank_mean"] >= 0.5 * 19 / 20 - 0.02
    assert rolling["images_seen"] < cover["summary"]["images_seen"]


def test_bench_pooling_records_shares_against_the_backbone(tmp_path):
    from benchmarks.bench_pooling import main

    argv = ["--settings", "mini", "--batch-sizes", "1", "--repeats", "1", "--inner", "2"]
    record = main([*argv, "--out", str(tmp_path / "pool.json")])
    (row,) = record["rows"]
    assert (tmp_path / "pool.png").is_file() and record["environment"]["load_before"] is not None
    assert row["fmap"] == [320, 7, 7] and row["goal"] == 0.05
    assert row["max_abs_diff"] < 1e-5  # fused and unfused descriptors agree
    for m in ("fused", "unfused"):
        t, base = row[f"{m}_s"], row["backbone_s"]
        assert math.isclose(row[f"{m}_share_median"], t["median_s"] / base["median_s"])
        assert math.isclose(row[f"{m}_share_min"], t["best_s"] / base["best_s"])


def test_amortised_summary_compares_each_seed_with_its_full_refresh():
    from benchmarks.amortised_mining import summarise

    def run(seed, f, val_map, overlap, share):
        keys = ("yield", "refreshed_mean", "age_mean", "age_max", "share_median")
        return {
            "seed": seed,
            "fraction": f,
            "final_val_map": val_map,
            "overlap_mean": overlap,
            "share_mean": share,
            **dict.fromkeys(keys, 1),
        }

    runs = [run(0, 1.0, 80.0, 1.0, 0.5), run(1, 1.0, 82.0, 1.0, 0.4)]
    runs += [run(0, 0.1, 81.0, 0.4, 0.2), run(1, 0.1, 80.0, 0.6, 0.1)]
    full, amortised = summarise(runs)
    assert full["fraction"] == 1.0 and full["map_diff_to_full_mean"] == 0.0
    assert amortised["fraction"] == 0.1 and amortised["seeds"] == 2
    assert amortised["map_diff_to_full_mean"] == pytest.approx((1.0 - 2.0) / 2)
    assert (amortised["final_val_map_min"], amortised["final_val_map_max"]) == (80.0, 81.0)
    assert amortised["overlap_mean"] == pytest.approx(0.5)
    assert amortised["share_mean"] == pytest.approx(0.15)


def test_bench_allocator_times_default_then_tuned_on_the_same_inputs(tmp_path):
    from benchmarks.bench_allocator import main

    argv = ["--workloads", "full-384", "--repeats", "1", "--warmup", "0"]
    record = main([*argv, "--out", str(tmp_path / "alloc.json")])
    (row,) = record["rows"]
    assert (tmp_path / "alloc.png").is_file() and row["workload"] == "full-384"
    assert row["identical"] is True  # the allocator never changes the numbers
    t0, t1 = row["default_s"], row["tuned_s"]
    assert math.isclose(row["ratio_median"], t1["median_s"] / t0["median_s"])
    assert math.isclose(row["ratio_min"], t1["best_s"] / t0["best_s"])
    assert row["faults_default"] >= 0 and row["faults_tuned"] >= 0
