"""Run the report notebooks with papermill and export each as HTML (the `report` stage)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from msvlad import paths
from msvlad.storage import write_text

log = logging.getLogger(__name__)

NOTEBOOKS = ("results", "rankings", "triplets", "training", "ablations")


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
    dest = out_dir / "notebooks" / f"{name}.ipynb"
    dest.parent.mkdir(parents=True, exist_ok=True)
    if "interactive" in papermill.inspect_notebook(str(src)):  # explorers: their static view
        parameters = {"interactive": False, **(parameters or {})}
    log.info("running %s", src.name)
    papermill.execute_notebook(
        str(src),
        str(dest),
        parameters=parameters or {},
        kernel_name="python3",
        cwd=str(paths.ROOT),
        execution_timeout=timeout,
        progress_bar=False,
        log_output=False,
    )
    exporter = HTMLExporter(exclude_input=True)
    html, _ = exporter.from_notebook_node(nbformat.read(dest, as_version=4))
    write_text(dest.with_suffix(".html"), html)
    return dest


def run_reports(
    names: Sequence[str] = NOTEBOOKS, out_dir: Path = paths.REPORTS, **parameters: Any
) -> list[Path]:
    """Execute every report notebook (figures land in out_dir/figures, tables in out_dir/tables)."""
    params = {"reports_dir": str(out_dir), **parameters}
    return [run_notebook(n, out_dir, params) for n in names]
