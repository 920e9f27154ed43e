"""Run the report notebooks with papermill and export each as HTML (the `report` stage).

The executed notebooks, their HTML and the figures are byte-identical from run to run (DVC hashes
`reports/`): the wall-clock times papermill and the kernel record per cell are left out, the
injected parameters cell gets a fixed id, paths under the repository are recorded relative to it,
and PDF figures carry a fixed date (SOURCE_DATE_EPOCH, which matplotlib honours).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
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
        with _fixed_dates():
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
    executed = deterministic(nbformat.read(partial, as_version=4))
    executed.metadata.get("papermill", {})["output_path"] = relative(dest)
    write_text(dest, nbformat.writes(executed) + "\n")
    partial.unlink()
    failed.unlink(missing_ok=True)
    exporter = HTMLExporter(exclude_input=True)
    html, _ = exporter.from_notebook_node(executed)
    write_text(dest.with_suffix(".html"), html)
    return dest


class NotebookError(InputError):
    """A report notebook stopped at a cell; the message names the notebook and the cell's error."""


def _first_line(text: str) -> str:
    """The first line of an error message, at most 300 characters (the one line of the CLI)."""
    line = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    return line[:300]


# what papermill and the kernel record that changes from run to run without changing a result
_TIMES = ("start_time", "end_time", "duration")
INJECTED = "injected-parameters"  # papermill's tag (and here the id) of the parameters cell


def deterministic(nb: Any) -> Any:
    """The executed notebook without wall-clock times, with a fixed id for papermill's injected
    cell and repository paths made relative (changed in place, returned)."""
    meta = nb.metadata.get("papermill", {})
    for key in _TIMES:
        meta.pop(key, None)
    for key in ("input_path", "output_path"):
        if meta.get(key):
            meta[key] = relative(meta[key])
    for cell in nb.cells:
        cell.metadata.pop("execution", None)  # the kernel's iopub/shell timestamps
        for key in _TIMES:
            cell.metadata.get("papermill", {}).pop(key, None)
        if INJECTED in cell.metadata.get("tags", []):
            cell["id"] = INJECTED
    return nb


def relative(path: str | Path) -> str:
    """A path under the repository root as relative to it (else unchanged)."""
    p = Path(path)
    try:
        return p.resolve().relative_to(paths.ROOT).as_posix() if p.is_absolute() else str(p)
    except ValueError:
        return str(path)


@contextmanager
def _fixed_dates() -> Iterator[None]:
    """SOURCE_DATE_EPOCH for the kernels started inside (figures' PDF creation date)."""
    old = os.environ.get("SOURCE_DATE_EPOCH")
    os.environ["SOURCE_DATE_EPOCH"] = old or "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SOURCE_DATE_EPOCH", None)


def run_reports(
    names: Sequence[str] = NOTEBOOKS, out_dir: Path = paths.REPORTS, **parameters: Any
) -> list[Path]:
    """Execute every report notebook (figures land in out_dir/figures, tables in out_dir/tables).

    The notebooks are independent: up to one per usable CPU runs at a time, each in its kernel.
    """
    params = {"reports_dir": str(out_dir), **parameters}
    workers = min(
        len(names), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    )
    with _fixed_dates(), ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(lambda n: run_notebook(n, out_dir, params), names))
