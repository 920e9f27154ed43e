"""The `report` stage against a hostile tree: before any notebook runs, every row's results must be
present, intact and made by the row's model and parameters, no query left out, and every run log
valid by its schema; a notebook that stops is one line naming it and the cell's error.

The tree is real: three rows of `badinputs.make_world` (two trained, one off-the-shelf), each with
its own model evaluated by `msvlad evaluate --method`, and the logs of a real two-step training.
Every case runs `msvlad.cli.main(["report", ...])`, checks the exit status and the one line naming
the file, that no notebook ran and that an earlier report is byte-identical.
"""

from __future__ import annotations

import json
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

import msvlad.stages.report as report_stage
from badinputs import World, make_world, snapshot
from msvlad.cli import main
from msvlad.config import load_params
from msvlad.nn.model import build_model, save_model
from msvlad.nn.whitening import Whitening
from test_bad_inputs import assert_error, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

ROWS = ("msvlad", "msvlad-hardest", "msvlad-ots")  # the notebooks' default rows


@dataclass
class Tree:
    """A finished pipeline's results, runs and report, and the params of its rows."""

    world: World
    root: Path
    params: Path

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    def report(self, *extra: str, params: Path | None = None) -> list[str]:
        return [
            "report",
            "--params",
            str(params or self.params),
            "--out",
            str(self.reports),
            "--results",
            str(self.results),
            "--runs",
            str(self.runs),
            *extra,
        ]

    def evaluate(self, row: str, *extra: str, params: Path | None = None) -> int:
        model = self.runs / row / "model.pt"
        out = self.results / row
        argv = ["--params", str(params or self.params), "--method", row]
        return main(["evaluate", *argv, "--checkpoint", str(model), "--out", str(out), *extra])


def _params(world: World, path: Path, rows=ROWS, **evaluate) -> Path:
    """The world's params with only `rows` (and `evaluate.*` overrides)."""
    raw = yaml.safe_load(world.params.read_text())
    raw["methods"] = {k: raw["methods"][k] for k in rows}
    raw["evaluate"].update(evaluate)
    raw["report"].update(bootstrap=50, top_k=3, num_queries=2)
    path.write_text(yaml.safe_dump(raw))
    return path


def _model(world: World, seed: int, path: Path) -> Path:
    """Another model of the world's architecture (another row's weights)."""
    torch.manual_seed(seed)
    model = build_model(load_params(world.params).model)
    model.whitening = Whitening.fit(torch.randn(40, model.raw_dim), 8)
    return save_model(model, path)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Tree:
    root = tmp_path_factory.mktemp("tree")
    world = make_world(root / "world")
    tree = Tree(world, root, _params(world, root / "params.yaml"))
    for seed, row in enumerate(ROWS):
        (tree.runs / row).mkdir(parents=True)
        _model(world, seed + 1, tree.runs / row / "model.pt")
    train = tree.runs / "msvlad" / "train"
    argv = ["train", "--params", str(tree.params), "--method", "msvlad"]
    assert main([*argv, "--init", str(world.model), "--out", str(train), "--max-steps", "2"]) == 0
    shutil.copytree(train, tree.runs / "msvlad-hardest" / "train")  # logs of the same shape
    for row in ROWS:
        assert tree.evaluate(row) == 0
    (tree.reports / "tables").mkdir(parents=True)
    (tree.reports / "tables" / "results.md").write_text("an earlier report\n")
    return tree


@pytest.fixture
def tree(built: Tree, tmp_path: Path) -> Tree:
    """A private copy of the built tree."""
    for name in ("results", "runs", "reports"):
        shutil.copytree(built.root / name, tmp_path / name, symlinks=True)
    shutil.copy(built.params, tmp_path / "params.yaml")
    return Tree(built.world, tmp_path, tmp_path / "params.yaml")


@pytest.fixture
def notebooks(monkeypatch) -> list[tuple[list[str], dict]]:
    """The notebook runs the report stage asked for (none is executed)."""
    calls: list[tuple[list[str], dict]] = []

    def record(names, out_dir, **parameters):
        calls.append((list(names), parameters))
        return []

    monkeypatch.setattr(report_stage, "run_reports", record)
    return calls


def test_a_consistent_tree_passes_the_checks(tree: Tree, capsys, notebooks) -> None:
    code, lines = run_cli(tree.report(), capsys)
    assert code == 0 and lines == []
    ((names, parameters),) = notebooks
    assert names == ["results", "rankings", "triplets", "training", "ablations"]
    assert parameters["results_dir"] == str(tree.results.resolve())
    assert parameters["runs_dir"] == str(tree.runs.resolve())


# ----------------------------------------------------------------------------- results


def _copy_file(tree: Tree, rel: str, src: str = "msvlad", dst: str = "msvlad-hardest") -> None:
    shutil.copy(tree.results / src / rel, tree.results / dst / rel)


def _copy_row(tree: Tree, src: str = "msvlad", dst: str = "msvlad-hardest") -> None:
    shutil.rmtree(tree.results / dst)
    shutil.copytree(tree.results / src, tree.results / dst)


def _twin_model(tree: Tree) -> None:  # the other row's folder, and its model file too
    _copy_row(tree)
    shutil.copy(tree.runs / "msvlad" / "model.pt", tree.runs / "msvlad-hardest" / "model.pt")


def _retrained(tree: Tree) -> None:
    _model(tree.world, 99, tree.runs / "msvlad" / "model.pt")


def _foreign_file(tree: Tree) -> None:
    (tree.results / "msvlad" / "test" / "per_query_dba2.csv").write_text("query,setup,AP\n")


def _linked_ranks(tree: Tree) -> None:
    ranks = tree.results / "msvlad" / "test" / "ranks.npy"
    ranks.unlink()
    ranks.symlink_to(tree.results / "msvlad-hardest" / "test" / "ranks.npy")


def _older_manifest(tree: Tree) -> None:
    path = tree.results / "msvlad-ots" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["sha256"]
    path.write_text(json.dumps(manifest))


def _manifest_of_another_command(tree: Tree) -> None:
    path = tree.results / "msvlad-ots" / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "command": "train"}))


RESULTS = {
    "a row's metrics.json missing": (
        lambda t: (t.results / "msvlad-hardest" / "metrics.json").unlink(),
        ["msvlad-hardest/metrics.json", "missing"],
    ),
    "a row's folder missing": (
        lambda t: shutil.rmtree(t.results / "msvlad-ots"),
        ["msvlad-ots", "no results for row msvlad-ots"],
    ),
    "a row's manifest missing": (
        lambda t: (t.results / "msvlad" / "manifest.json").unlink(),
        ["msvlad/manifest.json", "not found"],
    ),
    "metrics.json copied from another row": (
        lambda t: _copy_file(t, "metrics.json"),
        ["msvlad-hardest/metrics.json", "sha256", "copied from another row"],
    ),
    "per-query APs copied from another row": (
        lambda t: _copy_file(t, "test/per_query.csv"),
        ["msvlad-hardest/test/per_query.csv", "sha256"],
    ),
    "another row's folder, manifest and all": (
        _copy_row,
        ["msvlad-hardest/manifest.json", "made by a model", "runs/msvlad-hardest/model.pt"],
    ),
    "another row's folder and the same model file": (
        _twin_model,
        ["msvlad-hardest/manifest.json", "miner.name='difficulty'", "'hardest_negative'"],
    ),
    "the row's model retrained after its evaluation": (
        _retrained,
        ["msvlad/manifest.json", "made by a model", "runs/msvlad/model.pt"],
    ),
    "the row's model file missing": (
        lambda t: (t.runs / "msvlad-ots" / "model.pt").unlink(),
        ["runs/msvlad-ots/model.pt", "not found"],
    ),
    "a file evaluate did not write": (_foreign_file, ["per_query_dba2.csv", "not written by"]),
    "a link among the results": (_linked_ranks, ["msvlad/test/ranks.npy", "symbolic link"]),
    "a manifest without checksums": (_older_manifest, ["msvlad-ots/manifest.json", "sha256"]),
    "a manifest of another command": (
        _manifest_of_another_command,
        ["msvlad-ots/manifest.json", "not a manifest of msvlad evaluate"],
    ),
}


@pytest.mark.parametrize("name", list(RESULTS))
def test_bad_results(tree: Tree, capsys, notebooks, name: str) -> None:
    mutate, named = RESULTS[name]
    mutate(tree)
    before = snapshot(tree.reports), snapshot(tree.results), snapshot(tree.runs)
    code, lines = run_cli(tree.report(), capsys)
    assert_error(code, lines, "report", *named)
    assert notebooks == []  # nothing rendered
    assert (snapshot(tree.reports), snapshot(tree.results), snapshot(tree.runs)) == before


def test_results_made_with_other_parameters(tree: Tree, capsys, notebooks) -> None:
    raw = yaml.safe_load(tree.params.read_text())
    raw["extract"]["scales"] = [1.0, 0.75]
    other = tree.root / "other.yaml"
    other.write_text(yaml.safe_dump(raw))
    code, lines = run_cli(tree.report(params=other), capsys)
    assert_error(code, lines, "report", "msvlad/manifest.json", "extract.scales=[1.0]")
    assert notebooks == []
    # a notebook that reads no results does not need them
    code, lines = run_cli(tree.report("--notebook", "training", params=other), capsys)
    assert code == 0 and [n for n, _ in notebooks] == [["training"]]


def test_queries_left_out_of_one_row(tree: Tree, capsys, notebooks) -> None:
    skip = _params(tree.world, tree.root / "skip.yaml", skip_failed_queries=True)
    broken = tree.root / "broken"
    shutil.copytree(tree.world.data, broken)
    (broken / "test" / "jpg" / "q1.jpg").write_bytes(b"not a jpeg")
    assert tree.evaluate("msvlad", "--data-root", str(broken), params=skip) == 0
    for row in ROWS[1:]:
        assert tree.evaluate(row, params=skip) == 0
    before = snapshot(tree.results)
    code, lines = run_cli(tree.report(params=skip), capsys)
    assert_error(code, lines, "report", "msvlad/test/per_query.csv", "left out", "q1", "subset")
    assert notebooks == [] and snapshot(tree.results) == before


def test_a_row_scored_on_another_ground_truth(tree: Tree, capsys, notebooks) -> None:
    other = tree.root / "other"
    shutil.copytree(tree.world.data, other)
    gnd_path = other / "test" / "gnd_test.pkl"
    gnd = pickle.loads(gnd_path.read_bytes())
    gnd["gnd"][0]["easy"] = []  # q0 has no Easy positive here: its Easy AP is blank
    gnd_path.write_bytes(pickle.dumps(gnd))
    assert tree.evaluate("msvlad", "--data-root", str(other)) == 0
    code, lines = run_cli(tree.report(), capsys)
    assert_error(code, lines, "report", "msvlad/test/per_query", "AP blank for query q0 (easy)")
    assert "msvlad-hardest/test/per_query" in lines[0] and notebooks == []


# ----------------------------------------------------------------------------- run logs


def _append(rel: str, data: bytes):
    def mutate(t: Tree) -> None:
        with (t.runs / rel).open("ab") as fh:
            fh.write(data)

    return mutate


def _rewrite(rel: str, edit):
    def mutate(t: Tree) -> None:
        path = t.runs / rel
        path.write_text(edit(path.read_text()))

    return mutate


def _lines(t: Tree, rel: str) -> int:
    return (t.runs / rel).read_bytes().count(b"\n")


def _set_cell(line: int, column: str, value: str):
    """An edit of a CSV text: `column` of the given line (1: the header) set to `value`."""

    def edit(text: str) -> str:
        rows = text.split("\n")
        cells = rows[line - 1].split(",")
        cells[rows[0].split(",").index(column)] = value
        rows[line - 1] = ",".join(cells)
        return "\n".join(rows)

    return edit


LOG = "msvlad-hardest/train/log.csv"
LOGS = {
    "log.csv missing": (
        lambda t: (t.runs / LOG).unlink(),
        lambda t: [LOG, "not found", "row msvlad-hardest is trained"],
    ),
    "log.csv with a binary tail": (
        _append(LOG, b"\x00\x17\xff\xfe binary"),
        lambda t: [LOG, f"line {_lines(t, LOG) + 1}: binary data"],
    ),
    "log.csv with a cut row": (
        _append(LOG, b"1,2,3\n"),
        lambda t: [LOG, f"line {_lines(t, LOG)}: 3 fields"],
    ),
    "log.csv with a word for a number": (
        _rewrite(LOG, _set_cell(2, "step", "zero")),
        lambda t: [LOG, "line 2: step='zero' is not a number"],
    ),
    "log.csv with an infinite loss": (
        _rewrite(LOG, _set_cell(3, "loss", "inf")),
        lambda t: [LOG, "line 3: loss='inf' is not a number"],
    ),
    "log.csv with its header only": (
        _rewrite(LOG, lambda s: s.split("\n", 1)[0] + "\n"),
        lambda t: [LOG, "no epoch row"],
    ),
    "rounds.csv missing": (
        lambda t: (t.runs / "msvlad" / "train" / "rounds.csv").unlink(),
        lambda t: ["msvlad/train/rounds.csv", "not found"],
    ),
    "triplets.csv without its kind column": (
        _rewrite("msvlad/train/triplets.csv", lambda s: s.replace(",kind,", ",sort,", 1)),
        lambda t: ["msvlad/train/triplets.csv", "line 1: header lacks column(s) ['kind']"],
    ),
    "neighbors.csv with a UTF-16 tail": (
        _append("msvlad/train/neighbors.csv", "1,a,0,b,c,0.5\n".encode("utf-16")),
        lambda t: ["msvlad/train/neighbors.csv", "binary data (a NUL byte)"],
    ),
    "neighbors.csv with a Latin-1 tail": (
        _append("msvlad/train/neighbors.csv", "1,café,0,b,c,0.5\n".encode("latin-1")),
        lambda t: ["msvlad/train/neighbors.csv", "binary data (not UTF-8)"],
    ),
}


@pytest.mark.parametrize("name", list(LOGS))
def test_bad_run_log(tree: Tree, capsys, notebooks, name: str) -> None:
    mutate, named = LOGS[name]
    mutate(tree)
    before = snapshot(tree.reports), snapshot(tree.runs)
    code, lines = run_cli(tree.report(), capsys)
    assert_error(code, lines, "report", *named(tree))
    assert notebooks == [] and (snapshot(tree.reports), snapshot(tree.runs)) == before
    # the notebooks that read no run logs do not need them
    assert run_cli(tree.report("--notebook", "rankings"), capsys)[0] == 0


def test_the_readers_of_the_notebooks_check_the_schema_too(tree: Tree) -> None:
    from msvlad.errors import InputError
    from msvlad.report import runs

    _append(LOG, b"1,2,3\n")(tree)
    with pytest.raises(InputError, match="log.csv: line .*: 3 fields"):
        runs.load_training_logs(tree.runs, load_params(tree.params))
    _rewrite("msvlad/train/triplets.csv", lambda s: s.replace(",kind,", ",sort,", 1))(tree)
    with pytest.raises(InputError, match=r"triplets.csv: line 1: header lacks"):
        runs.miner_stats(tree.runs / "msvlad" / "train")


# ----------------------------------------------------------------------------- notebooks


def test_a_failing_notebook_is_one_line(tree: Tree, capsys, monkeypatch) -> None:
    import papermill

    def fail(src, dest, **kwargs):
        Path(dest).write_text("{}")  # papermill writes the executed notebook, then raises
        raise papermill.PapermillExecutionError(
            cell_index=3,
            exec_count=2,
            source="x",
            ename="KeyError",
            evalue="'msvlad-ots'\nmore lines",
            traceback=["..."],
        )

    monkeypatch.setattr(papermill, "execute_notebook", fail)
    (tree.reports / "notebooks").mkdir()
    (tree.reports / "notebooks" / "training.ipynb").write_text("the earlier one")
    before = snapshot(tree.reports)
    code, lines = run_cli(tree.report("--notebook", "training"), capsys)
    assert_error(code, lines, "report", "training.ipynb: cell 2 failed: KeyError: 'msvlad-ots'")
    assert "training.failed.ipynb" in lines[0] and "more lines" not in lines[0]
    after = snapshot(tree.reports)
    assert after.pop("notebooks/training.failed.ipynb") and after == before


@pytest.mark.slow
def test_a_real_notebook_failure_is_one_line(tree: Tree, capsys) -> None:
    two = _params(tree.world, tree.root / "two.yaml", rows=ROWS[:2])  # no msvlad-ots row
    (tree.reports / "notebooks").mkdir()
    (tree.reports / "notebooks" / "rankings.ipynb").write_text("the earlier one")
    before = snapshot(tree.reports)
    code, lines = run_cli(tree.report("--notebook", "rankings", params=two), capsys)
    assert_error(code, lines, "report", "notebooks/rankings.ipynb: cell", "KeyError", "msvlad-ots")
    failed = tree.reports / "notebooks" / "rankings.failed.ipynb"
    assert "KeyError" in failed.read_text()
    after = snapshot(tree.reports)
    assert after.pop("notebooks/rankings.failed.ipynb") and after == before
