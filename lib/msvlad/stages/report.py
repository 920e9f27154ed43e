"""`report` stage: execute the report notebooks with papermill and export them as HTML."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from msvlad.report.notebooks import NOTEBOOKS, run_reports
from msvlad.storage import check_writable

log = logging.getLogger(__name__)


def run(
    params_file: Path,
    out: Path,
    notebooks: Sequence[str] | None = None,
    results: Path | None = None,
    runs: Path | None = None,
) -> list[Path]:
    """Run `notebooks` (default all) into `out`; figures and tables land under it too."""
    check_writable(out)
    extra = {"params_file": str(Path(params_file).resolve())}
    if results:
        extra["results_dir"] = str(Path(results).resolve())
    if runs:
        extra["runs_dir"] = str(Path(runs).resolve())
    paths = run_reports(list(notebooks or NOTEBOOKS), Path(out), **extra)
    log.info("report: %d notebooks -> %s (+ .html, figures/, tables/)", len(paths), out)
    return paths
