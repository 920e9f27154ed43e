"""float16 vs float32 descriptor storage: bytes, and how much retrieval mAP changes.

Storing descriptors in float16 (extract.float16) halves their size; they are cast back to float32
before search, as `msvlad.evaluation.pipeline.describe_dataset` does. This benchmark measures both
sides:
bytes in memory and in an .npz file, and mAP / mP@k (via `msvlad.evaluation.protocol.evaluate`,
exact flat
search via `msvlad.evaluation.search.search`) computed from the float32 and the float16 copies.

Default data: synthetic revisited-style benchmarks that run anywhere, one per database size
(`--db-sizes`), so the figure shows how the change moves with the database. Landmarks are unit
centres; a database image of a landmark is its centre + noise, labelled easy / hard / junk by
the noise level; "confusers" are images of near-miss centres (similar buildings) and the rest are
unrelated distractors; queries are low-noise views of a landmark. The gnd has revisitop's
easy / hard / junk lists, so Easy / Medium / Hard mAP are computed as for ROxf/RPar.

Real data: `--features results/evaluate/<method>/<dataset>/features.npz` (arrays q and db, as
`msvlad evaluate` writes) with `--gnd gnd_roxford5k.pkl` (any protocol: revisited, classic or
holidays; inferred from the keys) adds one point measured on real descriptors.

    python -m benchmarks.bench_storage
    python -m benchmarks.bench_storage --features results/evaluate/msvlad/roxford5k/features.npz \
        --gnd data/paper/roxford5k/gnd_roxford5k.pkl
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common
from benchmarks.common import Panel
from msvlad.evaluation.protocol import evaluate
from msvlad.evaluation.search import search
from msvlad.storage import load_npz, save_npz

NAME = "bench_storage"
LEVELS = {
    "easy": (0.6, 1.2),
    "hard": (1.2, 2.2),
    "junk": (2.2, 3.5),
}  # noise norm ranges per gnd label
LEVEL_PROBS = (0.45, 0.35, 0.20)
RATIO = "ratio to the float32 baseline"
BASELINES: dict[str, str] = {
    "map_ratio": "mAP from float16-stored descriptors / from float32",
    "memory_ratio": "float16 bytes / float32 bytes",
}


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _noisy(centres: np.ndarray, scale: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """centres (n, D) + scale (n,) * N(0, I/D) noise, L2-normalised (noise norm about `scale`)."""
    dim = centres.shape[1]
    noise = rng.standard_normal(centres.shape).astype(np.float32) / np.float32(np.sqrt(dim))
    return _unit(centres + scale[:, None].astype(np.float32) * noise)


def synthetic_revisited(
    n_db: int,
    n_queries: int,
    n_landmarks: int,
    dim: int,
    rng: np.random.Generator,
    *,
    landmark_fraction: float = 0.2,
    confuser_fraction: float = 0.3,
    query_noise: float = 0.7,
) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """(q (n_q, D), db (n_db, D), gnd): clustered float32 descriptors with revisitop-style gnd."""
    if n_landmarks < 1 or n_queries < 1 or n_db < n_landmarks:
        raise ValueError(
            f"synthetic benchmark: need n_db >= landmarks >= 1 and queries >= 1, "
            f"got n_db={n_db}, landmarks={n_landmarks}, queries={n_queries}"
        )
    centres = _unit(rng.standard_normal((n_landmarks, dim)))
    n_land = max(n_landmarks, round(n_db * landmark_fraction))
    n_conf = min(n_db - n_land, round(n_db * confuser_fraction))
    n_other = n_db - n_land - n_conf
    # landmark images: every landmark gets at least one
    land_of = np.concatenate(
        [np.arange(n_landmarks), rng.integers(0, n_landmarks, n_land - n_landmarks)]
    )
    level = rng.choice(len(LEVELS), size=n_land, p=LEVEL_PROBS)
    bounds = np.array(list(LEVELS.values()), dtype=np.float64)
    scale = rng.uniform(bounds[level, 0], bounds[level, 1])
    land = _noisy(centres[land_of], scale, rng)
    # confusers: images of a near-miss centre of a random landmark
    near = _noisy(centres[rng.integers(0, n_landmarks, n_conf)], rng.uniform(0.8, 1.5, n_conf), rng)
    conf = _noisy(near, rng.uniform(0.6, 1.5, n_conf), rng)
    other = _noisy(_unit(rng.standard_normal((n_other, dim))), rng.uniform(0.6, 1.5, n_other), rng)
    db_all = np.concatenate([land, conf, other])
    order = rng.permutation(n_db)  # shuffle: positives are not a prefix of the database
    db = db_all[order]
    position = np.empty(n_db, dtype=np.int64)
    position[order] = np.arange(n_db)  # old index -> new index
    q_land = np.arange(n_queries) % n_landmarks
    q = _noisy(centres[q_land], np.full(n_queries, query_noise), rng)
    names = list(LEVELS)
    gnd = []
    for lm in q_land:
        entry: dict[str, Any] = {}
        for j, name in enumerate(names):
            entry[name] = np.sort(position[np.flatnonzero((land_of == lm) & (level == j))])
        gnd.append(entry)
    return q, db, gnd


def to_float16_and_back(x: np.ndarray) -> np.ndarray:
    """What float16 storage returns when loaded for search: float32 values rounded to float16."""
    return x.astype(np.float16).astype(np.float32)


def npz_bytes(arrays: dict[str, np.ndarray]) -> int:
    """Bytes of an .npz holding the arrays (msvlad.storage.save_npz into a temp folder)."""
    with tempfile.TemporaryDirectory(prefix="bench_storage_") as tmp:
        return save_npz(Path(tmp) / "features.npz", **arrays).stat().st_size


def load_real(features: Path, gnd_path: Path) -> tuple[np.ndarray, np.ndarray, Any, str]:
    """(q, db, gnd, protocol) from a features.npz (arrays q, db) and a gnd pickle."""
    from msvlad.data.safe_pickle import load_pickle
    from msvlad.data.testsets import infer_protocol

    arrays = load_npz(features)
    missing = [k for k in ("q", "db") if k not in arrays]
    if missing:
        raise ValueError(f"{features}: missing array(s) {missing} (expected q and db)")
    raw = load_pickle(gnd_path)  # restricted unpickler: plain containers and arrays only
    gnd = raw.get("gnd") if isinstance(raw, Mapping) else raw
    if not isinstance(gnd, list):
        raise ValueError(f"{gnd_path}: expected a gnd list or a dict with key 'gnd'")
    protocol = infer_protocol(gnd, source=str(gnd_path))
    if protocol is None:
        raise ValueError(f"{gnd_path}: empty ground truth")
    q, db = (np.ascontiguousarray(arrays[k], dtype=np.float32) for k in ("q", "db"))
    if len(gnd) != len(q):
        raise ValueError(f"{gnd_path}: {len(gnd)} queries in the gnd but {len(q)} in {features}")
    return q, db, gnd, protocol


def compare(q: np.ndarray, db: np.ndarray, gnd: Any, protocol: str, k_agree: int) -> dict[str, Any]:
    """mAP / mP@k from float32 and float16 copies, score and ranking differences, and bytes."""
    q16, db16 = to_float16_and_back(q), to_float16_and_back(db)
    ranks32, scores32 = search(q, db)
    ranks16, scores16 = search(q16, db16)
    m32, m16 = evaluate(ranks32, gnd, protocol), evaluate(ranks16, gnd, protocol)
    k = min(k_agree, db.shape[0])
    same_topk = np.mean([np.array_equal(ranks32[:k, i], ranks16[:k, i]) for i in range(q.shape[0])])
    rows = []
    for setup, s32 in m32.setups.items():
        v32, v16 = 100.0 * s32.mAP, 100.0 * m16.setups[setup].mAP  # unrounded percent
        rows.append(
            {
                "setup": setup,
                "map_fp32": v32,
                "map_fp16": v16,
                "delta_points": v16 - v32,
                "map_ratio": common.ratio(v16, v32),
            }
        )
    bytes32 = int(q.nbytes + db.nbytes)
    bytes16 = int(q.astype(np.float16).nbytes + db.astype(np.float16).nbytes)
    file32 = npz_bytes({"q": q, "db": db})
    file16 = npz_bytes({"q": q.astype(np.float16), "db": db.astype(np.float16)})
    return {
        "protocol": protocol,
        "n_queries": int(q.shape[0]),
        "n_db": int(db.shape[0]),
        "dim": int(q.shape[1]),
        "map": rows,
        "mp_at_k": {"fp32": m32.to_json()["mP@k"], "fp16": m16.to_json()["mP@k"]},
        "max_abs_value_error": float(np.abs(db16 - db).max()),
        "max_abs_score_error": float(np.abs(scores16[0] - scores32[0]).max()),
        "agree_k": k,
        "same_topk_fraction": float(same_topk),
        "bytes": {
            "memory_fp32": bytes32,
            "memory_fp16": bytes16,
            "npz_fp32": file32,
            "npz_fp16": file16,
            "memory_ratio": common.ratio(bytes16, bytes32),
            "npz_ratio": common.ratio(file16, file32),
        },
    }


def figure(record: dict[str, Any]) -> Any:
    """mAP per setup from float32 and float16 copies, their ratio, and the file sizes, against N."""
    rows = [
        {"n_db": r["n_db"], "source": r["source"], "precision": prec, **m, **r["bytes"]}
        for r in record["results"]
        for m in r["map"]
        for prec in ("fp32", "fp16")
    ]
    for row in rows:
        row["map"] = row[f"map_{row['precision']}"]
        row["npz_mib"] = row[f"npz_{row['precision']}"] / 2**20
    fp16 = [r for r in rows if r["precision"] == "fp16"]
    first = [r for r in rows if r["setup"] == rows[0]["setup"]] if rows else []
    n = "database images"
    ratio = (n, "mAP fp16 / fp32", RATIO)
    sources = ", ".join(sorted({r["source"] for r in record["results"]}))
    return common.draw_panels(
        [
            (rows, Panel("n_db", "map", "{setup} {precision}", (n, "mAP (%)", "mAP"), True)),
            (fp16, Panel("n_db", "map_ratio", "{setup}", ratio, xlog=True, reference=1)),
            (first, Panel("n_db", "npz_mib", "{precision}", (n, "MiB", ".npz file"), True, True)),
        ],
        f"float16 vs float32 descriptor storage ({sources})",
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options of this benchmark."""
    p = common.base_parser(NAME, __doc__.splitlines()[0])
    p.add_argument(
        "--db-sizes",
        type=common.int_list,
        default=[1000, 2000, 5000, 10000, 20000],
        help="synthetic database images (ROxf: 4993)",
    )
    p.add_argument("--queries", type=int, default=70, help="synthetic queries (ROxf: 70)")
    p.add_argument("--landmarks", type=int, default=11, help="synthetic landmarks (ROxf: 11)")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--agree-k", type=int, default=100, help="top-k compared for identical rankings")
    p.add_argument("--features", type=Path, default=None, help="features.npz with arrays q and db")
    p.add_argument("--gnd", type=Path, default=None, help="gnd pickle matching --features")
    args = p.parse_args(argv)
    common.check_positive(p, args, "queries", "landmarks", "dim", "agree_k")
    if (args.features is None) != (args.gnd is None):
        p.error("--features and --gnd go together")
    return args


def measure(run: common.Run) -> dict[str, Any]:
    """Every synthetic size, then the real features if given; the tables printed."""
    args = run.args
    rng = np.random.default_rng(args.seed)
    results = []
    for n_db in args.db_sizes:
        q, db, gnd = synthetic_revisited(n_db, args.queries, args.landmarks, args.dim, rng)
        results.append({"source": "synthetic", **compare(q, db, gnd, "revisited", args.agree_k)})
    if args.features is not None:
        q, db, gnd, protocol = load_real(args.features, args.gnd)
        source = f"real:{args.features.parent.parent.name}/{args.features.parent.name}"
        results.append({"source": source, **compare(q, db, gnd, protocol, args.agree_k)})
    common.print_table(
        [{"source": r["source"], "n_db": r["n_db"], **m} for r in results for m in r["map"]],
        "source n_db setup map_fp32 map_fp16 delta_points map_ratio",
        args,
        headers={
            "map_fp32": "mAP fp32",
            "map_fp16": "mAP fp16",
            "delta_points": "delta (points)",
            "map_ratio": "fp16/fp32",
        },
        decimals={"map_fp32": 2, "map_fp16": 2, "delta_points": 3, "map_ratio": 4},
    )
    common.print_table(
        [
            {
                "source": r["source"],
                "n_db": r["n_db"],
                **r["bytes"],
                "max_value_error": r["max_abs_value_error"],
                "same_topk": r["same_topk_fraction"],
            }
            for r in results
        ],
        "source n_db npz_fp32 npz_fp16 npz_ratio memory_ratio max_value_error same_topk",
        args,
        headers={"same_topk": f"identical top-{args.agree_k}"},
        decimals={"npz_ratio": 3, "memory_ratio": 2, "max_value_error": 6, "same_topk": 3},
    )
    return {"results": results, "baselines": BASELINES}


main = common.entry_point(NAME, parse_args, measure, figure)

if __name__ == "__main__":
    common.script(main)
