"""`report` stage: execute the report notebooks with papermill and export them as HTML."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from msvlad.report.notebooks import NOTEBOOKS, relative, run_reports
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
    # paths under the repository go in relative (the notebooks anchor them at its root), so the
    # executed notebooks do not depend on where the repository is
    extra = {"params_file": relative(Path(params_file).resolve())}
    extra["reports_dir"] = relative(Path(out).resolve())
    if results:
        extra["results_dir"] = relative(Path(results).resolve())
    if runs:
        extra["runs_dir"] = relative(Path(runs).resolve())
    paths = run_reports(list(notebooks or NOTEBOOKS), Path(out), **extra)
    log.info("report: %d notebooks -> %s (+ .html, figures/, tables/)", len(paths), out)
    return paths
