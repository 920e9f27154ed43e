"""The project's Jupyter server settings: report notebooks are saved exactly as git stores them.

JupyterLab reads this file when started from the repository root as the README says:

    JUPYTER_CONFIG_PATH=$PWD/.jupyter .venv/bin/jupyter lab notebooks/

Every save (autosave too) of a notebook under notebooks/ drops outputs, execution counts, widget
state, kernel version details and view-only cell metadata, and keeps the stored kernelspec (whose
display name differs between installs), so running the notebooks leaves `git status` clean and
the report stage (which depends on notebooks/) unchanged for DVC. Notebooks elsewhere are saved
untouched.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CELL_METADATA = ("tags",)  # the cell metadata a report notebook keeps (papermill's parameters tag)


def strip_notebook(nb: dict[str, Any]) -> dict[str, Any]:
    """A notebook (nbformat 4 dict) as stored: no outputs, counts, widget state or view metadata."""
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
        meta = cell.get("metadata", {})
        cell["metadata"] = {k: meta[k] for k in CELL_METADATA if k in meta}
    meta = nb.setdefault("metadata", {})
    meta.pop("widgets", None)
    if "language_info" in meta:
        meta["language_info"] = {"name": meta["language_info"].get("name", "python")}
    return nb


def strip_report_notebooks(
    model: dict[str, Any], path: str, contents_manager: Any, **_: Any
) -> None:
    """pre_save_hook: strip a notebook being saved under notebooks/ (see `strip_notebook`)."""
    if model.get("type") != "notebook" or not model.get("content"):
        return
    target = (Path(contents_manager.root_dir) / path.lstrip("/")).resolve()
    if NOTEBOOKS.resolve() not in target.parents:
        return
    nb = strip_notebook(model["content"])
    try:
        stored = json.loads(target.read_text(encoding="utf-8")).get("metadata", {})
    except (OSError, ValueError):
        return  # a new notebook: nothing to keep
    spec = stored.get("kernelspec")
    if spec and spec.get("name") == nb["metadata"].get("kernelspec", {}).get("name"):
        nb["metadata"]["kernelspec"] = spec


c = get_config()  # noqa: F821 - provided by the Jupyter config loader
c.ContentsManager.pre_save_hook = strip_report_notebooks
