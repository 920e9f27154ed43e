"""Every output file and folder of the project, named once; folders anchored at the repo root.

papermill runs a notebook's kernel in the caller's directory (the repo root under DVC) while
JupyterLab runs it in `notebooks/`; resolving every relative path against ROOT makes both agree.
`dvc.yaml` necessarily repeats the paths of its stages' deps and outs; `tests/test_architecture.py`
checks that they agree with the names here.

    runs/<row>/init.pt                       INIT: k-means initialised model (cluster)
    runs/<row>/train/                        TRAIN: the run folder (train), `run_dir`
        model.pt checkpoint.pt run.json      MODEL, CHECKPOINT, RUN_FILE
        log.csv rounds.csv triplets.csv      LOG, ROUNDS, TRIPLETS
        neighbors.csv                        NEIGHBORS
    runs/<row>/model.pt                      MODEL: the whitened model (whiten), `model_file`
    results/evaluate/<row>/                  EVALUATE, `results_dir` (evaluate)
        metrics.json summary.json            METRICS, SUMMARY
        manifest.json                        MANIFEST (also of a prepared dataset folder)
        <dataset>/features.npz ranks.npy     FEATURES, RANKS
        <dataset>/metrics[_<variant>].json   `metrics_file`
        <dataset>/per_query[_<variant>].csv  `per_query_file`
        <distractors>_features.npz           `distractor_features`
    reports/{notebooks,figures,tables}/      REPORT_NOTEBOOKS, REPORT_FIGURES, REPORT_TABLES
    results/bench/                           BENCH: the benchmarks' JSON and figures
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # lib/msvlad/paths.py -> repo root

DATA = ROOT / "data"
RUNS = ROOT / "runs"
RESULTS = ROOT / "results"
EVALUATE = RESULTS / "evaluate"
BENCH = RESULTS / "bench"  # the benchmarks' JSON and figures
REPORTS = ROOT / "reports"
NOTEBOOKS = ROOT / "notebooks"
PARAMS = ROOT / "params.yaml"

# a results-table row's folder, runs/<row>/
INIT = "init.pt"
MODEL = "model.pt"  # the whitened model here; the trained one in the run folder
TRAIN = "train"

# the run folder, runs/<row>/train/
CHECKPOINT = "checkpoint.pt"
RUN_FILE = "run.json"
LOG = "log.csv"
ROUNDS = "rounds.csv"
TRIPLETS = "triplets.csv"
NEIGHBORS = "neighbors.csv"
RUN_TIMING = "timing.csv"  # wall-clock seconds of a run: never hashed (.dvcignore)

# an evaluate folder, results/evaluate/<row>/, and its <dataset>/ folders
METRICS = "metrics.json"
SUMMARY = "summary.json"
MANIFEST = "manifest.json"
FEATURES = "features.npz"
RANKS = "ranks.npy"
EVAL_TIMING = "timing.json"  # wall-clock seconds per dataset: never hashed (.dvcignore)

# the report folder, reports/
REPORT_NOTEBOOKS = "notebooks"
REPORT_FIGURES = "figures"
REPORT_TABLES = "tables"
FIGURES = REPORTS / REPORT_FIGURES
TABLES = REPORTS / REPORT_TABLES


def resolve(path: str | os.PathLike, base: str | os.PathLike = ROOT) -> Path:
    """Absolute path: `~` expanded; a relative path is taken relative to `base` (the repo root)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(base) / p


def run_dir(row: str, runs: str | os.PathLike = RUNS) -> Path:
    """The run folder of a results-table row: runs/<row>/train."""
    return Path(runs) / row / TRAIN


def init_file(row: str, runs: str | os.PathLike = RUNS) -> Path:
    """The k-means initialised model of a row: runs/<row>/init.pt."""
    return Path(runs) / row / INIT


def model_file(row: str, runs: str | os.PathLike = RUNS) -> Path:
    """The whitened model a row is evaluated with: runs/<row>/model.pt."""
    return Path(runs) / row / MODEL


def results_dir(row: str, results: str | os.PathLike = EVALUATE) -> Path:
    """The evaluate folder of a row: results/evaluate/<row>."""
    return Path(results) / row


def variant_tag(variant: str) -> str:
    """File-name tag of a re-ranking variant: none for plain, else ``_<variant>``."""
    return "" if variant == "plain" else f"_{variant}"


def metrics_file(variant: str = "plain") -> str:
    """A dataset's metrics of one variant: metrics.json, metrics_qe.json, ..."""
    return f"metrics{variant_tag(variant)}.json"


def per_query_file(variant: str = "plain") -> str:
    """A dataset's per-query metrics of one variant: per_query.csv, per_query_qe.csv, ..."""
    return f"per_query{variant_tag(variant)}.csv"


def distractor_features(name: str) -> str:
    """The cached descriptors of a distractor set in an evaluate folder: <name>_features.npz."""
    return f"{name}_features.npz"
