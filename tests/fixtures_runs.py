"""A tiny but complete pipeline output tree for report tests: data, results, runs, params.yaml.

`make_run_tree(tmp_path)` writes
  data/tiny-test/jpg/*.jpg + gnd_tiny-test.pkl   revisitop layout, 4 queries (bbx), 3 distractors
  data/tiny-train/<class>/<k>.jpg                3 classes of 4 images
  results/evaluate/<method>/metrics.json         as `msvlad evaluate` writes it
  results/evaluate/<method>/tiny-test/           per_query{,_qe,_dba}.csv, ranks.npy, features.npz
  runs/<method>/train/                           log.csv (+ rounds.csv, triplets.csv, neighbors.csv
                                                 when trained)
  params.yaml                                    the repo's params, data.root -> data/, 3 methods
Rankings are seeded: "msvlad" ranks positives best, "msvlad-hardest" less so, "msvlad-ots" worst.
"""

from __future__ import annotations

import csv
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from msvlad.config import load_params, params_to_dict
from msvlad.evaluation.protocol import evaluate
from msvlad.storage import save_npz, write_json, write_text
from msvlad.training.logs import (
    LOG_FIELDS,
    NEIGHBOR_FIELDS,
    NEIGHBOR_K,
    ROUND_FIELDS,
    TRIPLET_FIELDS,
)

REPO = Path(__file__).resolve().parents[1]
DATASET = "tiny-test"
TRAIN_SET = "tiny-train"
METHODS = {
    "msvlad": {
        "label": "MS-NetVLAD + difficulty miner",
        "pooling": "msvlad",
        "miner": "difficulty",
    },
    "msvlad-hardest": {
        "label": "MS-NetVLAD + hardest-negative miner",
        "pooling": "msvlad",
        "miner": "hardest_negative",
    },
    "msvlad-ots": {"label": "MS-NetVLAD, k-means init", "pooling": "msvlad", "miner": None},
}
QUALITY = {
    "msvlad": 3.0,
    "msvlad-hardest": 1.5,
    "msvlad-ots": 0.4,
}  # how strongly positives are ranked up
VARIANT_BONUS = {"plain": 0.0, "qe": 0.5, "dba": 0.8}
NUM_SCENES = 4
TRAIN_CLASSES = ("bridge", "church", "tower")


@dataclass
class RunTree:
    """Where the fabricated tree lives."""

    root: Path
    params_file: Path
    data_root: Path
    results_dir: Path
    runs_dir: Path
    reports_dir: Path
    dataset: str = DATASET
    train_set: str = TRAIN_SET
    methods: dict[str, dict] = field(default_factory=lambda: dict(METHODS))

    @property
    def train_root(self) -> Path:
        return self.data_root / self.train_set


def _pattern(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    coarse = rng.uniform(0, 255, size=(3, 4, 3)).astype(np.uint8)
    return np.asarray(
        Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32
    )


def _save(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, quality=92)


def _make_test_set(data_root: Path, rng: np.random.Generator) -> dict:
    folder = data_root / DATASET / "jpg"
    imlist, qimlist, gnd = [], [], []
    for s in range(NUM_SCENES):
        base = _pattern(rng, 80, 60)
        qimlist.append(f"q{s}")
        _save(base + rng.normal(0, 6, base.shape), folder / f"q{s}.jpg")
        ids = {"easy": [], "hard": [], "junk": []}
        for level, noise in (("easy", 8), ("easy", 8), ("hard", 40), ("junk", 90)):
            name = f"s{s}_{len(imlist)}"
            _save(
                np.roll(base, int(rng.integers(-6, 7)), axis=1) + rng.normal(0, noise, base.shape),
                folder / f"{name}.jpg",
            )
            ids[level].append(len(imlist))
            imlist.append(name)
        gnd.append({**ids, "bbx": [10.0, 8.0, 70.0, 52.0]})
    for d in range(3):
        imlist.append(f"d{d}")
        _save(_pattern(rng, 80, 60), folder / f"d{d}.jpg")
    cfg = {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}
    with (data_root / DATASET / f"gnd_{DATASET}.pkl").open("wb") as fh:
        pickle.dump(cfg, fh, protocol=4)
    return cfg


def _make_train_set(data_root: Path, rng: np.random.Generator) -> list[str]:
    rel = []
    for c in TRAIN_CLASSES:
        base = _pattern(rng, 56, 56)
        for k in range(4):
            _save(base + rng.normal(0, 15, base.shape), data_root / TRAIN_SET / c / f"{k}.jpg")
            rel.append(f"{c}/{k}.jpg")
    return rel


def _ranking(cfg: dict, quality: float, rng: np.random.Generator) -> np.ndarray:
    """(n_db, n_q) int32 ranking: positives get a bonus `quality` over noise."""
    n_db, cols = len(cfg["imlist"]), []
    for g in cfg["gnd"]:
        score = rng.normal(0, 1, n_db)
        score[g["easy"]] += quality * 1.2
        score[g["hard"]] += quality * 0.6
        cols.append(np.argsort(-score, kind="stable"))
    return np.stack(cols, axis=1).astype(np.int32)


def _write_results(results_dir: Path, cfg: dict, rng: np.random.Generator) -> None:
    for key in METHODS:
        out = results_dir / key / DATASET
        per_variant = {}
        for variant, bonus in VARIANT_BONUS.items():
            ranks = _ranking(cfg, QUALITY[key] + bonus, rng)
            metrics = evaluate(ranks, cfg["gnd"], "revisited", kappas=(1, 5, 10))
            js = metrics.to_json()
            js.update(
                {
                    "dataset": DATASET,
                    "protocol": "revisited",
                    "variant": variant,
                    "num_queries": len(cfg["qimlist"]),
                    "num_db": len(cfg["imlist"]),
                    "dim": 8,
                    "extract_seconds": 0.1,
                    "failed_images": 0,
                }
            )
            tag = "" if variant == "plain" else f"_{variant}"
            frame = metrics.per_query_frame(cfg["qimlist"])
            write_text(out / f"per_query{tag}.csv", frame.to_csv(index=False))
            write_json(out / f"metrics{tag}.json", js)
            if variant == "plain":
                np.save(out / "ranks.npy", ranks)
            per_variant[variant] = js
        save_npz(
            out / "features.npz",
            q=rng.normal(size=(len(cfg["qimlist"]), 8)).astype(np.float32),
            db=rng.normal(size=(len(cfg["imlist"]), 8)).astype(np.float32),
            qimlist=np.array(cfg["qimlist"]),
            imlist=np.array(cfg["imlist"]),
        )
        write_json(results_dir / key / "metrics.json", {DATASET: per_variant})


def _write_csv(path: Path, header: list[str], rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)


def _write_runs(runs_dir: Path, train_images: list[str], rng: np.random.Generator) -> None:
    for key, m in METHODS.items():
        out = runs_dir / key / "train"
        if m["miner"] is None:
            _write_csv(out / "log.csv", LOG_FIELDS, [])
            continue
        logs, rounds, triplets = [], [], []
        for r in range(4):
            kinds = (
                ["semi-hard", "hard", "semi-hard"] if r % 2 == 0 else ["hard", "hard", "semi-hard"]
            )
            for t, kind in enumerate(kinds):
                a = train_images[(r + t) % len(train_images)]
                cls = a.split("/")[0]
                p = f"{cls}/{(int(a.split('/')[1][0]) + 1) % 4}.jpg"
                n = train_images[(r * 5 + t * 4 + 4) % len(train_images)]
                if n.split("/")[0] == cls:
                    n = train_images[(train_images.index(n) + 4) % len(train_images)]
                pos_sim = round(float(rng.uniform(0.6, 0.9)), 6)
                neg_sim = round(float(pos_sim - rng.uniform(-0.05, 0.09)), 6)
                triplets.append(
                    {
                        "round": r,
                        "step": r * 5,
                        "anchor": a,
                        "positive": p,
                        "negative": n,
                        "anchor_label": cls,
                        "negative_label": n.split("/")[0],
                        "pos_rank": t + 1,
                        "neg_rank": t + 2,
                        "pos_sim": pos_sim,
                        "neg_sim": neg_sim,
                        "loss": round(max(0.0, 0.1 - 2 * pos_sim + 2 * neg_sim), 6),
                        "kind": kind,
                    }
                )
            mine = [x for x in triplets if x["round"] == r]
            rounds.append(
                {
                    "round": r,
                    "step": r * 5,
                    "pool": 12,
                    "candidates": 30,
                    "triplets": len(mine),
                    "semi_hard": sum(x["kind"] == "semi-hard" for x in mine),
                    "hard": sum(x["kind"] == "hard" for x in mine),
                    "mean_loss": float(np.mean([x["loss"] for x in mine])),
                }
            )
        rounds.append(
            {
                "round": 4,
                "step": 20,
                "pool": 12,
                "candidates": 0,
                "triplets": 0,
                "semi_hard": 0,
                "hard": 0,
                "mean_loss": float("nan"),
            }
        )
        for e in range(1, 4):
            logs.append(
                {
                    "epoch": e,
                    "step": e * 10,
                    "lr": 5e-6 * e,
                    "loss": 0.1 / e,
                    "triplets": 30,
                    "rounds": 2,
                    "yield": 3.0,
                    "val_map": 40.0 + 5 * e + (key == "msvlad"),
                }
            )
        _write_csv(out / "log.csv", LOG_FIELDS, logs)
        _write_csv(out / "rounds.csv", ROUND_FIELDS, rounds)
        _write_csv(out / "triplets.csv", TRIPLET_FIELDS, triplets)
        _write_csv(out / "neighbors.csv", NEIGHBOR_FIELDS, _neighbors(triplets, train_images))


def _neighbors(triplets: list[dict], train_images: list[str]) -> list[dict]:
    """Each anchor's top NEIGHBOR_K list per round, holding its triplet's positive and negative
    at their logged ranks and similarities; the other ranks get decreasing similarities."""
    rows = []
    for t in triplets:
        others = [x for x in train_images if x not in (t["anchor"], t["positive"], t["negative"])]
        ranked, fill = [], iter(others)
        for rank in range(NEIGHBOR_K):
            if rank == t["pos_rank"]:
                ranked.append((t["positive"], t["pos_sim"]))
            elif rank == t["neg_rank"]:
                ranked.append((t["negative"], t["neg_sim"]))
            else:
                ranked.append((next(fill), round(0.95 - 0.04 * rank, 6)))
        rows.extend(
            {
                "round": t["round"],
                "anchor": t["anchor"],
                "rank": rank,
                "neighbor": name,
                "label": name.split("/")[0],
                "sim": sim,
            }
            for rank, (name, sim) in enumerate(ranked)
        )
    return rows


def make_run_tree(root: Path, seed: int = 0) -> RunTree:
    """Write the whole tree under `root` and return where everything is."""
    rng = np.random.default_rng(seed)
    tree = RunTree(
        root=root,
        params_file=root / "params.yaml",
        data_root=root / "data",
        results_dir=root / "results" / "evaluate",
        runs_dir=root / "runs",
        reports_dir=root / "reports",
    )
    cfg = _make_test_set(tree.data_root, rng)
    train_images = _make_train_set(tree.data_root, rng)
    _write_results(tree.results_dir, cfg, rng)
    _write_runs(tree.runs_dir, train_images, rng)
    raw = params_to_dict(load_params(REPO / "params.yaml"))
    raw["data"].update(
        root=str(tree.data_root), train_set=TRAIN_SET, val_set=DATASET, test_sets=[DATASET]
    )
    raw["report"].update(top_k=5, num_queries=3, bootstrap=200)
    raw["methods"] = METHODS
    tree.params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    load_params(tree.params_file)  # the copy must stay valid
    return tree
