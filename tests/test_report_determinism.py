"""The report stage writes the same bytes each run: no wall-clock times, random ids, clone paths."""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
import pytest

from msvlad import paths
from msvlad.report.notebooks import INJECTED, deterministic, relative, run_notebook


def _executed(tmp_path: Path) -> nbformat.NotebookNode:
    """A notebook as papermill leaves it: times per cell and overall, a random injected cell id."""
    nb = nbformat.v4.new_notebook()
    injected = nbformat.v4.new_code_cell("x = 1", id="3f2a9c1e")
    injected.metadata = {
        "tags": [INJECTED],
        "papermill": {"start_time": "2026-01-01T00:00:00", "end_time": "t", "duration": 0.1},
        "execution": {"iopub.status.busy": "2026-01-01T00:00:00Z"},
    }
    plain = nbformat.v4.new_code_cell("y = 2", id="keep-me")
    plain.metadata = {"papermill": {"duration": 0.2, "status": "completed", "exception": False}}
    nb.cells = [injected, plain]
    nb.metadata["papermill"] = {
        "start_time": "a",
        "end_time": "b",
        "duration": 3.0,
        "input_path": str(paths.ROOT / "notebooks" / "training.ipynb"),
        "output_path": str(tmp_path / "out.ipynb"),
        "parameters": {"runs_dir": "runs"},
    }
    return nb


def test_times_ids_and_repository_paths_are_normalised(tmp_path):
    nb = deterministic(_executed(tmp_path))
    meta = nb.metadata["papermill"]
    assert not {"start_time", "end_time", "duration"} & set(meta)
    assert meta["input_path"] == "notebooks/training.ipynb"  # under the repository: relative
    assert meta["output_path"] == str(tmp_path / "out.ipynb")  # elsewhere: kept as it is
    assert meta["parameters"] == {"runs_dir": "runs"}
    injected, plain = nb.cells
    assert injected.id == INJECTED and "execution" not in injected.metadata
    assert injected.metadata["papermill"] == {} and injected.metadata["tags"] == [INJECTED]
    assert plain.id == "keep-me"  # the notebook's own ids are stable already
    assert plain.metadata["papermill"] == {"status": "completed", "exception": False}
    nbformat.validate(nb)


def test_relative_paths():
    assert relative(paths.ROOT / "params.yaml") == "params.yaml"
    assert relative("params.yaml") == "params.yaml"
    assert relative("/elsewhere/params.yaml") == "/elsewhere/params.yaml"


@pytest.mark.slow
def test_a_notebook_run_twice_writes_the_same_bytes(tmp_path):
    from fixtures_runs import make_run_tree

    tree = make_run_tree(tmp_path / "tree")
    out = tmp_path / "reports"
    parameters = {
        "params_file": str(tree.params_file),
        "reports_dir": str(out),
        "runs_dir": str(tree.runs_dir),
    }
    runs = []
    for i in range(2):
        run_notebook("training", out, parameters)
        copy = tmp_path / f"run{i}"
        shutil.copytree(out, copy)
        runs.append(
            {p.relative_to(copy).as_posix(): p.read_bytes() for p in copy.rglob("*") if p.is_file()}
        )
    files = set(runs[0])
    assert {"notebooks/training.ipynb", "notebooks/training.html"} <= files
    assert any(k.endswith(".pdf") for k in files)  # a PDF carries a date unless fixed
    for name in sorted(files):
        assert runs[0][name] == runs[1][name], name
    assert runs[0].keys() == runs[1].keys()
