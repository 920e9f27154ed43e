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


def _imports(source: str) -> set[str]:
    """msvlad modules a source imports anywhere (module level or inside functions)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
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
