"""Architecture facts: stage deps cover what each stage imports, registries match the config, the
architecture note names only modules that exist."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import get_args

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "lib"
CLI_FILES = {"lib/msvlad/__init__.py", "lib/msvlad/__main__.py", "lib/msvlad/cli.py"}


def _module_file(module: str) -> Path | None:
    base = LIB / module.replace(".", "/")
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _typing_only(tree: ast.AST) -> set[ast.AST]:
    """Nodes inside `if TYPE_CHECKING:` blocks (annotation-only imports: never executed)."""
    out: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in (
            "TYPE_CHECKING",
            "typing.TYPE_CHECKING",
        ):
            out |= {n for stmt in node.body for n in ast.walk(stmt)}
    return out


def _imports(source: str, *, typing: bool = True) -> set[str]:
    """msvlad modules a source imports anywhere (module level or inside functions).

    `typing=False` leaves out the imports under `if TYPE_CHECKING:`, which never run.
    """
    out: set[str] = set()
    tree = ast.parse(source)
    skip = set() if typing else _typing_only(tree)
    for node in ast.walk(tree):
        if node in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in out if m.split(".")[0] == "msvlad" and _module_file(m)}


def import_closure(start: set[str]) -> set[str]:
    """Files (repo-relative) of every msvlad module reached from `start`, parents included."""
    seen: set[str] = set()
    todo = list(start)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += sorted(_imports(_module_file(module).read_text()) - seen)
    return {str(_module_file(m).relative_to(ROOT)) for m in seen}


def _notebook_imports() -> set[str]:
    out: set[str] = set()
    for nb in (ROOT / "notebooks").glob("*.ipynb"):
        cells = json.loads(nb.read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code").replace(
            "%matplotlib inline", ""
        )
        out |= _imports(code)
    return out


def _stage_deps() -> dict[str, list[str]]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: (s.get("do") or s)["deps"] for name, s in stages.items()}


STAGES = sorted(_stage_deps())


def test_every_stage_has_its_module() -> None:
    from msvlad.stages import STAGES as ORDER

    assert sorted(ORDER) == STAGES
    for stage in STAGES:
        assert (LIB / "msvlad" / "stages" / f"{stage}.py").is_file()


@pytest.mark.parametrize("stage", STAGES)
def test_stage_deps_cover_every_imported_module(stage: str) -> None:
    deps = [d for d in _stage_deps()[stage] if d.startswith("lib/")]
    start = {f"msvlad.stages.{stage}"} | (_notebook_imports() if stage == "report" else set())
    needed = import_closure(start) | CLI_FILES
    missing = sorted(f for f in needed if not any(f == d or f.startswith(d + "/") for d in deps))
    assert not missing, f"dvc.yaml stage {stage}: add to deps {missing}"
    assert f"lib/msvlad/stages/{stage}.py" in deps


def test_closure_follows_function_level_imports(tmp_path: Path) -> None:
    # cli imports every stage lazily; the closure of the train stage must reach the miners
    files = import_closure({"msvlad.stages.train"})
    assert "lib/msvlad/mining/difficulty.py" in files
    assert "lib/msvlad/training/trainer.py" in files
    assert "lib/msvlad/report/figures.py" not in files


def test_registries_equal_the_config_names() -> None:
    from msvlad.config import VLAD_POOLINGS, MinerName, PoolingName
    from msvlad.mining.registry import MINERS
    from msvlad.nn.pooling import POOLINGS

    assert sorted(POOLINGS) == sorted(get_args(PoolingName))
    assert sorted(MINERS) == sorted(get_args(MinerName))
    assert set(VLAD_POOLINGS) <= set(POOLINGS)
    for name, cls in MINERS.items():
        assert cls.name == name


def test_architecture_note_names_only_existing_modules() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    modules = set(re.findall(r"`(msvlad(?:\.\w+)+)`", text))
    files = set(re.findall(r"`(lib/msvlad/[\w/.]+)`", text))
    assert len(modules) + len(files) > 20, "the note should name the modules it describes"
    missing = [m for m in modules if _module_file(m) is None and not _is_attribute(m)]
    missing += [f for f in files if not (ROOT / f).exists()]
    assert not missing, f"docs/architecture.md names what does not exist: {missing}"


def _is_attribute(dotted: str) -> bool:
    """`msvlad.mod.Name`: an attribute of an existing module."""
    module, _, attr = dotted.rpartition(".")
    path = _module_file(module)
    if path is None:
        return False
    tree = ast.parse(path.read_text())
    names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)}
    names |= {
        t.id
        for n in tree.body
        if isinstance(n, ast.Assign)
        for t in n.targets
        if isinstance(t, ast.Name)
    }
    names |= {
        n.target.id
        for n in tree.body
        if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
    }
    return attr in names


# ----------------------------------------------------------------------------- who imports whom


def documented_layers() -> dict[str, int]:
    """Unit -> layer, read off the table under 'Who may import whom' in docs/architecture.md."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Who may import whom", 1)[1].split("\n## ", 1)[0]
    layers: dict[str, int] = {}
    for line in section.splitlines():
        row = re.fullmatch(r"\|\s*(\d+)\s*\|(.*)\|\s*", line)
        for unit in re.findall(r"`(msvlad(?:\.\w+)*)`", row.group(2)) if row else ():
            assert unit not in layers, f"docs/architecture.md: {unit} in two layers"
            layers[unit] = int(row.group(1))
    return layers


def graph_of(sources: dict[str, str], *, typing: bool = True) -> dict[str, set[str]]:
    """Module -> the msvlad modules its source imports, at module level or inside functions."""
    return {
        module: _imports(source, typing=typing) - {module} for module, source in sources.items()
    }


def library_sources() -> dict[str, str]:
    """Every module of lib/msvlad by its dotted name (a package by its own name)."""
    out = {}
    for f in sorted((LIB / "msvlad").rglob("*.py")):
        parts = f.relative_to(LIB).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f.read_text()
    return out


def unit_of(module: str) -> str:
    """The subpackage or top-level module a module belongs to (`msvlad.data.catalog` -> data)."""
    return ".".join(module.split(".")[:2])


def layer_violations(graph: dict[str, set[str]], layers: dict[str, int]) -> list[str]:
    """Imports of a unit in the same or a higher layer (a unit's own modules excepted)."""
    out = []
    for module, targets in sorted(graph.items()):
        src = unit_of(module)
        for target in sorted(targets):
            dst = unit_of(target)
            if dst != src and layers[dst] >= layers[src]:
                out.append(f"{module} -> {target} ({src}: {layers[src]}, {dst}: {layers[dst]})")
    return out


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Groups of modules that import each other (strongly connected components of 2+, Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_every_unit_has_one_documented_layer() -> None:
    layers = documented_layers()
    units = {unit_of(m) for m in library_sources()}
    assert units == set(layers), (
        f"docs/architecture.md 'Who may import whom': add {sorted(units - set(layers))}, "
        f"remove {sorted(set(layers) - units)}"
    )


def test_every_import_goes_down_the_documented_layers() -> None:
    violations = layer_violations(graph_of(library_sources()), documented_layers())
    assert not violations, "imports against docs/architecture.md:\n" + "\n".join(violations)


def test_no_import_cycle_between_modules_lazy_imports_included() -> None:
    # a back-reference for annotations only (under TYPE_CHECKING) never runs, so it is no circle
    assert import_cycles(graph_of(library_sources(), typing=False)) == []


def test_the_checks_catch_an_upward_import_and_a_lazy_cycle() -> None:
    # the circle data had before its catalog: testsets reached up to the registry lazily
    sources = {
        "msvlad.data.testsets": "def hint():\n    from msvlad.data.official import DATASETS\n",
        "msvlad.data.official": "from msvlad.data.trainsets import build_sfm120k\n",
        "msvlad.data.trainsets": "from msvlad.data.testsets import check_relative_name\n",
        "msvlad.nn.backbones": "def fetch():\n    from msvlad.training.trainer import train\n",
        "msvlad.training.trainer": "from msvlad.nn.backbones import build_backbone\n",
    }
    graph = graph_of(sources)
    assert graph["msvlad.data.testsets"] == {"msvlad.data.official"}
    assert import_cycles(graph) == [
        ["msvlad.data.official", "msvlad.data.testsets", "msvlad.data.trainsets"],
        ["msvlad.nn.backbones", "msvlad.training.trainer"],
    ]
    assert layer_violations(graph, documented_layers()) == [
        "msvlad.nn.backbones -> msvlad.training.trainer (msvlad.nn: 3, msvlad.training: 5)"
    ]
    layers = {**documented_layers(), "msvlad.training": 3}  # the same layer is no way up either
    assert len(layer_violations(graph, layers)) == 2


def test_an_annotation_only_back_reference_is_no_cycle_but_a_lazy_one_is() -> None:
    typed = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from msvlad.report.figures import COLORS\n"
    )
    lazy = "def f():\n    from msvlad.report.figures import COLORS\n"
    back = "from msvlad.report.drawing import COLORS\n"
    for source, cycles in ((typed, 0), (lazy, 1)):
        sources = {"msvlad.report.drawing": source, "msvlad.report.figures": back}
        assert len(import_cycles(graph_of(sources, typing=False))) == cycles
        assert len(import_cycles(graph_of(sources))) == 1  # the default graph keeps both


def test_catalog_is_the_bottom_of_data_and_the_network_reaches_only_downloads() -> None:
    graph = graph_of(library_sources())
    data = {m for m in graph if m.startswith("msvlad.data.")}
    assert not graph["msvlad.data.catalog"] & data
    for module in ("msvlad.data.testsets", "msvlad.data.trainsets", "msvlad.data.official"):
        assert "msvlad.data.catalog" in graph[module]
    assert {m for m in data if "msvlad.data.official" in graph[m]} == set()
    assert {t for t in graph["msvlad.nn.backbones"] if t in data} == {"msvlad.data.download"}


# ----------------------------------------------------------------------------- output names


def _rel(path: Path) -> str:
    from msvlad import paths

    return path.relative_to(paths.ROOT).as_posix()


def _stage(name: str, row: str) -> dict:
    """A dvc.yaml stage, a foreach stage's `do` with `${key}` set to `row`."""
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][name]
    return yaml.safe_load(yaml.safe_dump(stage.get("do", stage)).replace("${key}", row))


def _outs(stage: dict) -> list[str]:
    return [next(iter(o)) if isinstance(o, dict) else o for o in stage["outs"]]


def test_dvc_stage_paths_are_the_ones_paths_names() -> None:
    from msvlad import paths

    row = "msvlad-hardest"
    init, run = _rel(paths.init_file(row)), _rel(paths.run_dir(row))
    model, results = _rel(paths.model_file(row)), _rel(paths.results_dir(row))
    assert (init, run, model, results) == (
        f"runs/{row}/init.pt",
        f"runs/{row}/train",
        f"runs/{row}/model.pt",
        f"results/evaluate/{row}",
    )
    train, evaluate = (_stage(s, row) for s in ("train", "evaluate"))
    # one stage, in order: k-means into init.pt, training into the run folder, whitening
    assert _outs(train) == [init, run, model]
    assert f"--cluster --init {init} " in train["cmd"] and f"--out {run} " in train["cmd"]
    assert train["cmd"].endswith(f"--whiten {model}")
    assert not {init, run, model} & set(train["deps"])  # its own outputs are no inputs
    assert model in evaluate["deps"] and f"--checkpoint {model} " in evaluate["cmd"]
    assert _outs(evaluate) == [results] and f"--out {results}" in evaluate["cmd"]
    report = _stage("report", row)
    assert {_rel(paths.EVALUATE), _rel(paths.RUNS)} <= set(report["deps"])
    assert _outs(report) == [_rel(paths.REPORTS)]
    assert f"--out {_rel(paths.REPORTS)}" in report["cmd"]


def test_dvc_metrics_and_plots_are_evaluate_and_run_files() -> None:
    from msvlad import paths
    from msvlad.config import load_params
    from msvlad.training.logs import RUN_LOGS

    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    rows = load_params(ROOT / "params.yaml").methods
    for metric in dvc["metrics"]:
        row = Path(metric).parent.name
        assert row in rows and metric == _rel(paths.results_dir(row) / paths.SUMMARY)
    plotted = 0
    for plot in dvc["plots"]:
        (spec,) = plot.values()
        for file, columns in spec["y"].items():
            row, name = Path(file).parent.parent.name, Path(file).name
            assert row in rows and file == _rel(paths.run_dir(row) / name)
            assert name in (paths.LOG, paths.ROUNDS)
            columns = [columns] if isinstance(columns, str) else columns
            assert set(columns) <= set(RUN_LOGS[name][0]), f"dvc.yaml plots: {file} {columns}"
            plotted += 1
    assert plotted >= 4


def test_output_file_names_are_written_only_in_paths() -> None:
    from msvlad import paths

    names = {
        value
        for key, value in vars(paths).items()
        if key.isupper() and isinstance(value, str) and "." in value
    }
    assert {"model.pt", "run.json", "log.csv", "metrics.json", "ranks.npy"} <= names
    found = []
    for module, source in library_sources().items():
        if module == "msvlad.paths":
            continue
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Constant) and node.value in names:
                found.append(f"{module}:{node.lineno}: {node.value!r}")
    assert not found, "use the name from msvlad.paths:\n" + "\n".join(found)


MAX_CLASS_LINES, MAX_FUNCTION_LINES = 250, 80


def oversized(source: str, name: str, max_class: int, max_function: int) -> list[str]:
    """`file:name:lines` of every class and function (methods and nested ones included) longer
    than its limit, counted from its `def`/`class` line to its last line, docstring included."""
    out = []
    for node in ast.walk(ast.parse(source)):
        limit = {ast.ClassDef: max_class, ast.FunctionDef: max_function}.get(type(node))
        if isinstance(node, ast.AsyncFunctionDef):
            limit = max_function
        if limit is not None:
            lines = node.end_lineno - node.lineno + 1
            if lines > limit:
                out.append(f"{name}:{node.name}:{lines}")
    return out


def test_no_class_over_250_lines_and_no_function_over_80() -> None:
    found = [
        hit
        for path in sorted((LIB / "msvlad").rglob("*.py"))
        for hit in oversized(
            path.read_text(), str(path.relative_to(ROOT)), MAX_CLASS_LINES, MAX_FUNCTION_LINES
        )
    ]
    assert not found, (
        f"too long (limits: class {MAX_CLASS_LINES}, function {MAX_FUNCTION_LINES}): {found}"
    )


def test_the_size_check_counts_docstrings_methods_and_nested_functions() -> None:
    source = """
class A:
    \"\"\"Doc.\"\"\"

    def f(self):
        x = 1
        y = 2
        return x + y


def g():
    \"\"\"Doc
    on two lines.\"\"\"

    def h():
        x = 1
        y = 2
        return x + y

    return h
"""
    assert oversized(source, "m.py", 7, 4) == ["m.py:g:10"]  # A: 7 lines, f: 4, g: 10, h: 4
    assert oversized(source, "m.py", 6, 3) == ["m.py:A:7", "m.py:g:10", "m.py:f:4", "m.py:h:4"]
    assert oversized(source, "m.py", 7, 10) == []
