"""The mining benchmark runs end to end on tiny pools and writes its JSON and plot."""

from __future__ import annotations

from pathlib import Path

from benchmarks.bench_mining import METHODS, main

from msvlad.mining import neighbors
from msvlad.storage import read_json


def test_bench_mining_tiny(tmp_path: Path) -> None:
    out = tmp_path / "bench" / "mining.json"
    record = main(
        [
            "--sizes",
            "100",
            "200",
            "--dims",
            "16",
            "--images-per-class",
            "5",
            "--delta",
            "0.1",
            "--repeats",
            "1",
            "--device",
            "cpu",
            "--quiet",
            "--out",
            str(out),
        ]
    )
    assert out.is_file() and out.with_suffix(".png").stat().st_size > 0
    assert neighbors._DENSE_ROWS_PER_CANDIDATE == 64  # the forced candidate path is undone
    saved = read_json(out)
    assert saved["benchmark"] == "bench_mining" == record["benchmark"]
    rows = saved["rows"]
    assert {(r["n"], r["dim"], r["method"]) for r in rows} == {
        (n, 16, m) for n in (100, 200) for m in METHODS
    }
    for r in rows:
        assert r["time_s"] > 0 and r["peak_mib"] >= 0 and r["triplets"] > 0
        assert r["same_triplets"] is True  # top-k, faiss and the full sort mine the same triplets
        if r["method"] == "full_sort":
            assert r["time_ratio"] == 1.0
