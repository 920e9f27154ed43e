"""float16 vs float32 descriptor storage: bytes, and how much retrieval mAP changes.

Storing descriptors in float16 (extract.float16) halves their size; they are cast back to float32
before search, as `msvlad.evaluation.pipeline.extract_dataset` does. This benchmark measures both
sides:
bytes in memory and in an .npz file, and mAP / mP@k (via `msvlad.evaluation.protocol.evaluate`,
exact flat
search via `msvlad.evaluation.search.search`) computed from the float32 and the float16 copies.

Default data: a synthetic revisited-style benchmark that runs anywhere. Landmarks are unit
centres; a database image of a landmark is its centre + noise, labelled easy / hard / junk by
the noise level; "confusers" are images of near-miss centres (similar buildings) and the rest are
unrelated distractors; queries are low-noise views of a landmark. The gnd has revisitop's
easy / hard / junk lists, so Easy / Medium / Hard mAP are computed as for ROxf/RPar.

Real data: `--features runs/.../features.npz` (arrays q and db, as `msvlad evaluate` writes) with
`--gnd gnd_roxford5k.pkl` (any protocol: revisited, classic or holidays; inferred from the keys).

    python -m benchmarks.bench_storage
    python -m benchmarks.bench_storage --features results/evaluate/roxford5k/features.npz \
        --gnd data/paper/roxford5k/gnd_roxford5k.pkl
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    base_parser,
    check_positive,
    format_table,
    new_figure,
    plot_path,
    ratio,
    report,
    save_figure,
    setup_run,
    write_results,
)
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
                "map_ratio": ratio(v16, v32),
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
            "memory_ratio": ratio(bytes16, bytes32),
            "npz_ratio": ratio(file16, file32),
        },
    }


def plot(result: dict[str, Any], path: Path) -> Path:
    """mAP per setup for float32 vs float16, and the bytes of each."""
    fig, axes = new_figure(ncols=2)
    rows = result["map"]
    xs = np.arange(len(rows))
    ax = axes[0][0]
    ax.bar(xs - 0.2, [r["map_fp32"] or 0 for r in rows], width=0.4, label="float32")
    ax.bar(xs + 0.2, [r["map_fp16"] or 0 for r in rows], width=0.4, label="float16")
    ax.set_xticks(xs, [r["setup"] for r in rows])
    ax.set_ylabel("mAP (%)")
    ax.set_title(f"{result['source']}: mAP")
    ax.legend(fontsize=8)
    b = result["bytes"]
    ax = axes[0][1]
    ax.bar([0, 1], [b["npz_fp32"] / 2**20, b["npz_fp16"] / 2**20], color=["tab:blue", "tab:orange"])
    ax.set_xticks([0, 1], ["float32", "float16"])
    ax.set_ylabel("MiB (.npz)")
    ax.set_title(f"storage ({result['n_queries'] + result['n_db']} x {result['dim']})")
    return save_figure(fig, path)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    """Command-line options of this benchmark."""
    p = base_parser(NAME, __doc__.splitlines()[0])
    p.add_argument(
        "--db-size", type=int, default=5000, help="synthetic database images (ROxf: 4993)"
    )
    p.add_argument("--queries", type=int, default=70, help="synthetic queries (ROxf: 70)")
    p.add_argument("--landmarks", type=int, default=11, help="synthetic landmarks (ROxf: 11)")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--agree-k", type=int, default=100, help="top-k compared for identical rankings")
    p.add_argument("--features", type=Path, default=None, help="features.npz with arrays q and db")
    p.add_argument("--gnd", type=Path, default=None, help="gnd pickle matching --features")
    args = p.parse_args(argv)
    check_positive(p, args, "db_size", "queries", "landmarks", "dim", "agree_k")
    if (args.features is None) != (args.gnd is None):
        p.error("--features and --gnd go together")
    return args, p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the storage benchmark; print the table, write JSON + PNG, return the record."""
    args, _ = parse_args(argv)
    device = setup_run(args)
    if args.features is not None:
        q, db, gnd, protocol = load_real(args.features, args.gnd)
        source = args.features.parent.name or str(args.features)
    else:
        rng = np.random.default_rng(args.seed)
        q, db, gnd = synthetic_revisited(args.db_size, args.queries, args.landmarks, args.dim, rng)
        protocol, source = "revisited", "synthetic"
    result = {"source": source, **compare(q, db, gnd, protocol, args.agree_k)}
    b = result["bytes"]
    report(
        format_table(
            result["map"],
            headers={
                "map_fp32": "mAP fp32",
                "map_fp16": "mAP fp16",
                "delta_points": "delta (points)",
                "map_ratio": "fp16/fp32",
            },
        ),
        args,
    )
    report(
        "\n"
        + format_table(
            [
                {
                    "storage": "memory",
                    "float32_bytes": b["memory_fp32"],
                    "float16_bytes": b["memory_fp16"],
                    "ratio": b["memory_ratio"],
                },
                {
                    "storage": "npz file",
                    "float32_bytes": b["npz_fp32"],
                    "float16_bytes": b["npz_fp16"],
                    "ratio": b["npz_ratio"],
                },
            ]
        ),
        args,
    )
    report(
        f"\nmax |fp16 - fp32| value {result['max_abs_value_error']:.2e}, top-1 score "
        f"{result['max_abs_score_error']:.2e}; identical top-{result['agree_k']} rankings: "
        f"{100 * result['same_topk_fraction']:.1f}% of queries",
        args,
    )
    # device is irrelevant here (numpy + faiss-cpu) but recorded like everywhere else
    record = write_results(
        args.out,
        NAME,
        args,
        device,
        {
            **result,
            "baselines": {
                "map_ratio": "mAP from float16-stored descriptors / from float32",
                "memory_ratio": "float16 bytes / float32 bytes",
            },
        },
    )
    plot(result, plot_path(args.out))
    return record


if __name__ == "__main__":
    from msvlad.runtime import setup_logging

    setup_logging()
    main()
