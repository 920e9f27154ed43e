"""Amortised mining on the mini profile: refresh fractions against the full refresh at equal steps.

For each seed and `miner.refresh_fraction`, one training run of the profile (same k-means init,
same step budget) in a scratch folder, measuring:

- validation mAP per epoch (log.csv `val_map`) and the mean yield (triplets per round);
- the triplet-set overlap: at every round of an amortised run the pool is also described in full
  with the same weights and mined with the same draws (a copy of the miner at that round); the
  overlap is |T_bank ∩ T_fresh| / |T_bank ∪ T_fresh| over (anchor, positive, negative) index
  triplets, so it isolates what stale descriptors change (run 1.0 is 1 by construction);
- the mining share of a round: (describe + mine seconds) / (describe + mine + the seconds of the
  round's training steps), from the run's timing.csv and the steps timed in the same process;
- the bank's descriptor ages (rounds.csv `age_mean`, `age_max`).

The extra full description is done after the round and outside every timed section, draws no
random number and leaves the run's weights and logs unchanged. The frozen-trunk cache (the same
init and images for every run) is computed once and shared.

    python -m benchmarks.amortised_mining --fractions 1,0.25,0.1,0 --seeds 0,1,2 \\
        --init runs/msvlad/init.pt --out results/bench/amortised_mining.json
    python -m benchmarks.amortised_mining --draw rolling --fractions 1,0.25,0.1 --seeds 0,1,2 \\
        --out results/bench/amortised_mining_rolling.json   # rolling pools (miner.pool_draw)
"""

from __future__ import annotations

import argparse
import copy
import csv
import logging
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import common
from msvlad.cli import parse_sets
from msvlad.config import load_params, with_overrides
from msvlad.mining.pool import POOL_DRAWS
from msvlad.paths import LOG, ROOT, ROUNDS, init_file
from msvlad.storage import read_json, write_json
from msvlad.training.logs import TIMING_FILE
from msvlad.training.trainer import Trainer, make_miner

log = logging.getLogger(__name__)

NAME = "amortised_mining"
_TRUNKS: dict[tuple, Any] = {}  # frozen-trunk caches shared by the runs of one init


def seed_list(text: str) -> list[int]:
    """argparse type: "0,1,2" -> [0, 1, 2] (seeds >= 0)."""
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected seeds >= 0, got {text!r}")
    return values


def float_list(text: str) -> list[float]:
    """argparse type: "1,0.25" -> [1.0, 0.25] (each in [0, 1])."""
    values = [float(v) for v in text.split(",") if v.strip()]
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"expected fractions in [0, 1], got {text!r}")
    return values


class MeasuredTrainer(Trainer):
    """A Trainer that times its steps per round and mines each pool again from fresh descriptors."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.step_seconds: dict[int, float] = defaultdict(float)  # round -> seconds of its steps
        self.overlap: dict[int, float] = {}  # round -> Jaccard of bank and fresh triplet sets

    def train_step(self, triplets: torch.Tensor) -> float:
        t0 = time.perf_counter()
        loss = super().train_step(triplets)
        self.step_seconds[self.progress.round - 1] += time.perf_counter() - t0
        return loss

    def mine_round(self) -> None:
        super().mine_round()
        r = self.progress.round - 1
        if not self.bank.keeps:
            self.overlap[r] = 1.0
            return
        pool_idx = self.pool.sample(r)  # mini-train has no unreadable image
        miner = make_miner(self.params)
        miner.rounds = r
        desc = self.inputs.describe(pool_idx)
        labels = torch.from_numpy(self.train_set.labels[pool_idx]).to(desc.device)
        a, p, n = (pool_idx[t.numpy()].tolist() for t in miner.mine(desc, labels).as_tuple())
        fresh = set(zip(a, p, n, strict=True))
        used = {tuple(t) for t in self.progress.round_triplets.tolist()}
        union = fresh | used
        self.overlap[r] = len(fresh & used) / len(union) if union else 1.0


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def draw_for(draw: str, fraction: float) -> str:
    """The pool draw of a run: the full refresh (1.0) is always the paper's independent draws."""
    return draw if fraction < 1.0 else "independent"


def run_one(args: argparse.Namespace, seed: int, fraction: float, folder: Path) -> dict[str, Any]:
    """One training run; its per-epoch mAP, yield, overlap, shares and ages."""
    params = load_params(args.params, parse_sets(args.set))
    params = with_overrides(
        params,
        base={"seed": seed, "device": "cpu"},
        data={"root": str(Path(params.data.root).resolve())},
        miner={"refresh_fraction": fraction, "pool_draw": draw_for(args.draw, fraction)},
        train={"val_every": args.val_every or params.train.val_every},
    )
    load = common.load_average()
    t0 = time.time()
    trainer = MeasuredTrainer(params, args.init, folder, device=torch.device("cpu"))
    key = (str(args.init), params.data.root, params.train.frozen_stages)
    if key in _TRUNKS:  # the frozen trunk of the same init and images: computed once
        trainer.inputs.trunk = copy.copy(_TRUNKS[key])
        trainer.inputs.trunk.model = trainer.model
    trainer.run()
    if trainer.inputs.trunk is not None:
        _TRUNKS.setdefault(key, trainer.inputs.trunk)
    wall = time.time() - t0
    epochs, rounds = _csv(folder / LOG), _csv(folder / ROUNDS)
    timing = {(e["event"], e["round"]): float(e["seconds"]) for e in _csv(folder / TIMING_FILE)}
    shares, describe, mine, steps = [], [], [], []
    for row in rounds:
        r = int(row["round"])
        if r not in trainer.step_seconds:  # the last round may have no step within the budget
            continue
        d, m, s = (
            timing[("describe", row["round"])],
            timing[("mine", row["round"])],
            trainer.step_seconds[r],
        )
        describe.append(d), mine.append(m), steps.append(s)
        shares.append((d + m) / (d + m + s))
    return {
        "seed": seed,
        "fraction": fraction,
        "draw": params.miner.pool_draw,
        "val_map": [float(e["val_map"]) for e in epochs],
        "final_val_map": float(epochs[-1]["val_map"]),
        "yield": statistics.mean(int(r["triplets"]) for r in rounds),
        "candidates": statistics.mean(int(r["candidates"]) for r in rounds),
        "rounds": len(rounds),
        "refreshed_mean": statistics.mean(int(r["refreshed"]) for r in rounds[1:]),
        "age_mean": statistics.mean(float(r["age_mean"]) for r in rounds),
        "age_max": max(int(r["age_max"]) for r in rounds),
        "overlap_mean": statistics.mean(trainer.overlap.values()),
        "overlap_min": min(trainer.overlap.values()),
        "share_median": statistics.median(shares),
        "share_mean": sum(d + m for d, m in zip(describe, mine, strict=True))
        / sum(d + m + s for d, m, s in zip(describe, mine, steps, strict=True)),
        "describe_s_median": statistics.median(describe),
        "mine_s_median": statistics.median(mine),
        "steps_s_median": statistics.median(steps),
        "wall_s": wall,
        "load_before": load,
        "load_after": common.load_average(),
    }


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per fraction: mean and spread over seeds, and mAP differences to 1.0 with the same seed."""
    full = {r["seed"]: r for r in runs if r["fraction"] == 1.0}
    out = []
    for f in sorted({r["fraction"] for r in runs}, reverse=True):
        rows = [r for r in runs if r["fraction"] == f]
        maps = [r["final_val_map"] for r in rows]
        diffs = [
            r["final_val_map"] - full[r["seed"]]["final_val_map"] for r in rows if r["seed"] in full
        ]
        out.append(
            {
                "fraction": f,
                "seeds": len(rows),
                "final_val_map_mean": float(np.mean(maps)),
                "final_val_map_min": min(maps),
                "final_val_map_max": max(maps),
                "map_diff_to_full_mean": float(np.mean(diffs)) if diffs else float("nan"),
                "yield_mean": float(np.mean([r["yield"] for r in rows])),
                "overlap_mean": float(np.mean([r["overlap_mean"] for r in rows])),
                "share_mean": float(np.mean([r["share_mean"] for r in rows])),
                "share_median": float(np.median([r["share_median"] for r in rows])),
                "refreshed_mean": float(np.mean([r["refreshed_mean"] for r in rows])),
                "age_mean": float(np.mean([r["age_mean"] for r in rows])),
                "age_max": max(r["age_max"] for r in rows),
            }
        )
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--init", type=Path, default=init_file("msvlad"))
    parser.add_argument("--fractions", type=float_list, default=[1.0, 0.5, 0.25, 0.1, 0.0])
    parser.add_argument("--seeds", type=seed_list, default=[0, 1, 2])
    parser.add_argument("--work", type=Path, default=None, help="keep the run folders here")
    parser.add_argument("--val-every", type=int, default=0, help="epochs (0: the profile's)")
    parser.add_argument(
        "--set", action="append", default=[], help="section.key=value over --params (repeatable)"
    )
    parser.add_argument(
        "--draw",
        choices=POOL_DRAWS,
        default="independent",
        help="miner.pool_draw of the runs with a fraction < 1 (1.0 stays independent)",
    )
    parser.set_defaults(threads=1)  # one thread: steady timings on a shared machine
    return parser.parse_args(argv)


def measure(run: common.Run) -> dict[str, Any]:
    """Every (seed, fraction) run, then the per-fraction summary (printed)."""
    args = run.args
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        for seed in args.seeds:
            for f in args.fractions:
                folder = work / f"seed{seed}-f{f}-{draw_for(args.draw, f)}"
                done = folder / "measure.json"  # a run measured before (with --work) is reused
                runs.append(read_json(done) if done.is_file() else run_one(args, seed, f, folder))
                write_json(done, runs[-1])
                log.info("%s", {k: runs[-1][k] for k in ("seed", "fraction", "final_val_map")})
    summary = summarise(runs)
    common.print_table(summary, SUMMARY_COLUMNS, args)
    return {"runs": runs, "summary": summary}


SUMMARY_COLUMNS = (
    "fraction seeds final_val_map_mean final_val_map_min final_val_map_max map_diff_to_full_mean "
    "yield_mean overlap_mean share_mean refreshed_mean age_mean age_max"
)


def figure(record: dict[str, Any]) -> Any:
    """Per seed against the refresh fraction: final val mAP, triplet overlap, mining share."""
    runs = record["runs"]
    return common.draw_panels(
        [
            (
                runs,
                common.Panel(
                    "fraction",
                    "final_val_map",
                    "seed {seed}",
                    ("refresh fraction", "val mAP (%)", "validation mAP, final"),
                ),
            ),
            (
                runs,
                common.Panel(
                    "fraction",
                    "overlap_mean",
                    "seed {seed}",
                    ("refresh fraction", "Jaccard", "triplets vs fresh mining"),
                    reference=1.0,
                ),
            ),
            (
                runs,
                common.Panel(
                    "fraction",
                    "share_mean",
                    "seed {seed}",
                    ("refresh fraction", "share", "mining share of a round"),
                    reference=0.1,
                ),
            ),
        ],
        "amortised mining, mini profile, equal steps (1.0 = the paper's full refresh)",
    )


main = common.entry_point(NAME, parse_args, measure, figure)

if __name__ == "__main__":
    common.script(main)
