"""Run the report notebooks with papermill and export each as HTML (the `report` stage)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from msvlad import paths
from msvlad.errors import InputError
from msvlad.storage import write_text

log = logging.getLogger(__name__)

NOTEBOOKS = ("results", "rankings", "triplets", "training", "ablations")
# what each notebook reads: the evaluation results (results_dir) and/or the training runs (runs_dir)
READS: dict[str, tuple[str, ...]] = {
    "results": ("results", "runs"),
    "rankings": ("results",),
    "triplets": ("runs",),
    "training": ("runs",),
    "ablations": (),  # the collected grid (results/ablations), checked by its own reader
}


def run_notebook(
    name: str, out_dir: Path, parameters: dict[str, Any] | None = None, timeout: int = 900
) -> Path:
    """Execute notebooks/<name>.ipynb into out_dir/notebooks/ and write its HTML next to it."""
    import nbformat
    import papermill
    from nbconvert import HTMLExporter

    src = paths.NOTEBOOKS / f"{name}.ipynb"
    if not src.is_file():
        raise FileNotFoundError(f"{src}: notebook not found; choose from {list(NOTEBOOKS)}")
    dest = out_dir / paths.REPORT_NOTEBOOKS / f"{name}.ipynb"
    dest.parent.mkdir(parents=True, exist_ok=True)
    declared = papermill.inspect_notebook(str(src))
    parameters = {k: v for k, v in (parameters or {}).items() if k in declared}
    if "interactive" in declared:  # explorers: their static view
        parameters = {"interactive": False, **parameters}
    log.info("running %s", src.name)
    # executed beside its destination, which a failed run leaves as it was
    partial, failed = dest.with_suffix(".partial.ipynb"), dest.with_suffix(".failed.ipynb")
    try:
        papermill.execute_notebook(
            str(src),
            str(partial),
            parameters=parameters,
            kernel_name="python3",
            cwd=str(paths.ROOT),
            execution_timeout=timeout,
            progress_bar=False,
            log_output=False,
        )
    except papermill.PapermillExecutionError as err:
        os.replace(partial, failed)
        raise NotebookError(
            f"{src}: cell {err.exec_count} failed: {err.ename}: {_first_line(err.evalue)} "
            f"(the executed notebook with its traceback: {failed})"
        ) from None
    os.replace(partial, dest)
    failed.unlink(missing_ok=True)
    exporter = HTMLExporter(exclude_input=True)
    html, _ = exporter.from_notebook_node(nbformat.read(dest, as_version=4))
    write_text(dest.with_suffix(".html"), html)
    return dest


class NotebookError(InputError):
    """A report notebook stopped at a cell; the message names the notebook and the cell's error."""


def _first_line(text: str) -> str:
    """The first line of an error message, at most 300 characters (the one line of the CLI)."""
    line = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    return line[:300]


def run_reports(
    names: Sequence[str] = NOTEBOOKS, out_dir: Path = paths.REPORTS, **parameters: Any
) -> list[Path]:
    """Execute every report notebook (figures land in out_dir/figures, tables in out_dir/tables)."""
    params = {"reports_dir": str(out_dir), **parameters}
    return [run_notebook(n, out_dir, params) for n in names]
