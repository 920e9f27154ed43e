"""Canonical project folders, anchored at the repository root so no path depends on the cwd.

papermill runs a notebook's kernel in the caller's directory (the repo root under DVC) while
JupyterLab runs it in `notebooks/`; resolving every relative path against ROOT makes both agree.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # lib/msvlad/paths.py -> repo root

DATA = ROOT / "data"
RUNS = ROOT / "runs"
RESULTS = ROOT / "results"
REPORTS = ROOT / "reports"
FIGURES = REPORTS / "figures"
TABLES = REPORTS / "tables"
NOTEBOOKS = ROOT / "notebooks"
PARAMS = ROOT / "params.yaml"


def resolve(path: str | os.PathLike, base: str | os.PathLike = ROOT) -> Path:
    """Absolute path: `~` expanded; a relative path is taken relative to `base` (the repo root)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(base) / p
