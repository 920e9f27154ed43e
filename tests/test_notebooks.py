"""Report notebooks: thin (literal parameters, no def/class/loops, short cells) and runnable."""

from __future__ import annotations

import ast
from pathlib import Path

import nbformat
import papermill as pm
import pytest

from fixtures_runs import make_run_tree

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("results", "rankings", "triplets", "training", "ablations")
PATH_PARAMETERS = {"params_file", "results_dir", "runs_dir", "reports_dir"}
FORBIDDEN = (
    ast.FunctionDef,
    ast.AsyncFunctionDef,
    ast.Lambda,
    ast.ClassDef,
    ast.For,
    ast.AsyncFor,
    ast.While,
    ast.ListComp,
    ast.SetComp,
    ast.DictComp,
    ast.GeneratorExp,
)
MAX_LINES = 5
EXPLORERS = ("rankings", "triplets")  # notebooks with an interactive explorer cell
# outputs each notebook must produce (relative to reports_dir)
EXPECTED = {
    "results": [
        "figures/results/map_bars.png",
        "figures/results/bootstrap_vs_ots.png",
        "figures/results/bootstrap_vs_hardest.png",
        "figures/results/validation_per_miner.png",
        "tables/claims.csv",
        "tables/results.csv",
        "tables/results.md",
        "tables/results.tex",
        "tables/bootstrap_vs_ots.csv",
        "tables/bootstrap_vs_hardest.csv",
    ],
    "rankings": [
        "figures/rankings/ranked_lists.png",
        "figures/rankings/query_gains.png",
        "figures/rankings/largest_gain.png",
        "figures/rankings/largest_loss.png",
    ],
    "triplets": ["figures/triplets/miner_stats.png", "figures/triplets/gallery.png"],
    "training": ["figures/training/curves.png"],
    "ablations": ["figures/ablations/axes.png", "tables/ablations.csv", "tables/ablations.md"],
}


def _code(cell: nbformat.NotebookNode) -> str:
    """Cell source without IPython magics (`%matplotlib inline`)."""
    return "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith("%"))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_thin(name: str) -> None:
    path = ROOT / "notebooks" / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    code = [c for c in nb.cells if c.cell_type == "code"]
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0] is nb.cells[1], (
        "one parameters cell, right after the title"
    )
    # literals only (papermill does not recompute derived values)
    for stmt in ast.parse(tagged[0].source).body:
        assert (
            isinstance(stmt, ast.Assign)
            and len(stmt.targets) == 1
            and isinstance(stmt.targets[0], ast.Name)
        )
        ast.literal_eval(stmt.value)
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, (
            f"{name}: outputs must be stripped"
        )
        tree = ast.parse(_code(cell))
        bad = [type(n).__name__ for n in ast.walk(tree) if isinstance(n, FORBIDDEN)]
        assert not bad, f"{name}: {bad} in cell {cell.id}; move it to msvlad.report"
        lines = [ln for ln in _code(cell).splitlines() if ln.strip()]
        assert cell is tagged[0] or len(lines) <= MAX_LINES, (
            f"{name}: cell {cell.id} has {len(lines)} lines"
        )
    # every code cell follows a markdown heading or a code cell
    for i, cell in enumerate(nb.cells[2:], start=2):
        if cell.cell_type == "markdown":
            assert cell.source.startswith("## "), (
                f"{name}: markdown cell {i} should open with a heading"
            )


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_parameters_declared(name: str) -> None:
    declared = pm.inspect_notebook(str(ROOT / "notebooks" / f"{name}.ipynb"))
    assert "params_file" in declared and "reports_dir" in declared
    for key in PATH_PARAMETERS & set(declared):
        default = ast.literal_eval(declared[key]["default"])
        # repo-relative defaults
        assert isinstance(default, str) and not Path(default).is_absolute()


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory):
    return make_run_tree(tmp_path_factory.mktemp("report"))


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name: str, tree, tmp_path: Path) -> None:
    parameters = {
        "params_file": str(tree.params_file),
        "reports_dir": str(tree.reports_dir),
        "results_dir": str(tree.results_dir),
        "runs_dir": str(tree.runs_dir),
        "offtheshelf": "msvlad-ots",  # the tree's only off-the-shelf row
        "interactive": False,  # as the report stage runs them: static views, figures written
    }
    declared = pm.inspect_notebook(str(ROOT / "notebooks" / f"{name}.ipynb"))
    out = tmp_path / f"{name}.ipynb"
    # the kernel runs in an unrelated cwd: every path comes from the parameters or msvlad.paths
    pm.execute_notebook(
        str(ROOT / "notebooks" / f"{name}.ipynb"),
        str(out),
        kernel_name="python3",
        cwd=str(tmp_path),
        parameters={k: v for k, v in parameters.items() if k in declared},
        progress_bar=False,
        execution_timeout=300,
    )
    for rel in EXPECTED[name]:
        path = tree.reports_dir / rel
        assert path.is_file() and path.stat().st_size > 0, f"{name}: {rel} not written"
    executed = nbformat.read(out, as_version=4)
    images = [
        o
        for c in executed.cells
        if c.cell_type == "code"
        for o in c.outputs
        if "image/png" in o.get("data", {})
    ]
    assert images, f"{name}: no figure shown in the executed notebook"
    # with interactive=False the explorers show their first view as a figure, not a widget
    explorer = [c for c in executed.cells if c.get("id") == "explorer"]
    assert len(explorer) == (name in EXPLORERS)
    for cell in explorer:
        kinds = {k for o in cell.outputs for k in o.get("data", {})}
        assert "image/png" in kinds and "application/vnd.jupyter.widget-view+json" not in kinds


def test_paths_are_anchored_at_the_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from msvlad import paths

    monkeypatch.chdir(tmp_path)  # the cwd must not matter
    assert paths.ROOT == ROOT and (paths.ROOT / "pyproject.toml").is_file()
    assert paths.resolve("params.yaml") == ROOT / "params.yaml"
    assert paths.resolve(tmp_path / "x") == tmp_path / "x"
    assert (
        paths.FIGURES == ROOT / "reports" / "figures"
        and paths.TABLES == ROOT / "reports" / "tables"
    )
