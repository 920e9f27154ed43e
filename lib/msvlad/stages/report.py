"""`report` stage: check what the notebooks read, execute them with papermill, export HTML.

Before any notebook runs, every results-table row's evaluation results must be present, intact
and made by the row's model and parameters (`msvlad.report.results.check_results`), and every log
of a trained row valid by its schema (`msvlad.report.runs.check_run_logs`): a report never renders
a table without a row, another row's numbers, claims over a subset of the queries or curves of
garbage. A notebook that stops is one line naming it and the cell's error.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from msvlad import paths
from msvlad.config import load_params
from msvlad.errors import InputError
from msvlad.report.notebooks import NOTEBOOKS, READS, relative, run_reports
from msvlad.report.results import check_results
from msvlad.report.runs import check_run_logs
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
    names = list(notebooks or NOTEBOOKS)
    unknown = [n for n in names if n not in NOTEBOOKS]
    if unknown:
        raise InputError(f"--notebook: {unknown} not among {list(NOTEBOOKS)}")
    results_dir = Path(results).resolve() if results else paths.EVALUATE
    runs_dir = Path(runs).resolve() if runs else paths.RUNS
    params = load_params(params_file)
    reads = {r for n in names for r in READS[n]}
    if "results" in reads:
        check_results(results_dir, runs_dir, params)
    if "runs" in reads:
        check_run_logs(runs_dir, params)
    check_writable(out)
    # paths under the repository go in relative (the notebooks anchor them at its root), so the
    # executed notebooks do not depend on where the repository is
    extra = {
        "params_file": relative(Path(params_file).resolve()),
        "reports_dir": relative(Path(out).resolve()),
        "results_dir": relative(results_dir),
        "runs_dir": relative(runs_dir),
    }
    paths_out = run_reports(names, Path(out), **extra)
    log.info("report: %d notebooks -> %s (+ .html, figures/, tables/)", len(paths_out), out)
    return paths_out
