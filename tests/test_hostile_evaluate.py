"""`evaluate` against a hostile user: it never deletes what it did not write, a kill during its
final swap loses neither result set, two writers of one --out are one error, a grown distractor
set is described again, and a full disk is one line naming the file.

Every case runs `msvlad.cli.main` (in process, or in a subprocess where a kill or a second process
is the point) on the tiny world of `badinputs.make_world`, and checks the exit status, the one
`msvlad evaluate: error: <file>: ...` line, and that every earlier output is byte-identical.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from badinputs import REPO, World, make_world, snapshot
from msvlad.cli import main
from msvlad.errors import InputError
from msvlad.storage import (
    TEMP_MARK,
    file_digest,
    lock_beside,
    remove_stale_temps,
    write_bytes,
)
from test_bad_inputs import assert_error, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return make_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def previous(world: World) -> Path:
    """A successful evaluation: what no later run may lose."""
    out = world.root / "previous"
    assert main(_argv(world, out)) == 0
    return out


@pytest.fixture
def case(world: World, previous: Path, tmp_path: Path) -> World:
    """A private copy of the world's data and model, and of the previous results as out/."""
    shutil.copytree(world.data, tmp_path / "data")
    shutil.copy(world.model, tmp_path / "model.pt")
    shutil.copytree(previous, tmp_path / "out")
    return World(tmp_path, tmp_path / "data", world.params, tmp_path / "model.pt")


def _argv(w: World, out: Path, *extra: str) -> list[str]:
    return ["evaluate", *w.args("--checkpoint", str(w.model), "--data-root", str(w.data)),
            "--out", str(out), *extra]  # fmt: skip


def _temps(folder: Path, name: str = "out") -> list[str]:
    """The temp files and folders of `name` beside it (lock files included)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}."))


def _boxes(folder: Path, suffix: str, name: str = "out") -> list[Path]:
    return sorted(p for p in folder.glob(f".{name}.*{suffix}") if p.is_dir())


# ----------------------------------------------------------------------------- foreign files


def test_the_parent_of_every_rows_results_is_refused(case: World, capsys) -> None:
    results = case.root / "results"
    for row in ("msvlad", "gem-ots"):
        shutil.copytree(case.out, results / row)
    before = snapshot(results)
    code, lines = run_cli(_argv(case, results), capsys)
    assert_error(code, lines, "evaluate", str(results / "gem-ots"), "not written by msvlad")
    entries = sum(len(dirs) + len(files) for _, dirs, files in os.walk(results))
    assert f"and {entries - 1} more" in lines[0] and "has no manifest.json" in lines[0]
    assert snapshot(results) == before and len(before) == 2 * len(snapshot(case.out))


USERS_FILES = {
    "notes.json beside the results": "notes.json",
    "a drafts folder": "drafts/idea.txt",
    "a file inside a dataset folder": "test/mine.csv",
    "a named like ours but unlisted": "test/metrics_foo.json",
}


@pytest.mark.parametrize("rel", list(USERS_FILES.values()), ids=list(USERS_FILES))
def test_a_users_file_in_out_is_refused_and_kept(case: World, capsys, rel: str) -> None:
    (case.out / rel).parent.mkdir(parents=True, exist_ok=True)
    (case.out / rel).write_text("the user's own")
    before = snapshot(case.out)
    code, lines = run_cli(_argv(case, case.out), capsys)
    assert_error(code, lines, "evaluate", "not written by msvlad evaluate", "manifest.json")
    first = rel.split("/")[0] if rel.startswith("drafts") else rel
    assert f"{case.out / first}:" in lines[0] or f"{case.out / first} " in lines[0]
    assert snapshot(case.out) == before and (case.out / rel).read_text() == "the user's own"
    assert _temps(case.root) == []


def test_an_empty_folder_of_the_user_is_refused(case: World, capsys) -> None:
    (case.out / "test" / "keep").mkdir()
    code, lines = run_cli(_argv(case, case.out), capsys)
    assert_error(code, lines, "evaluate", str(case.out / "test" / "keep"))
    assert (case.out / "test" / "keep").is_dir()


def _link_outside(case: World, where: str) -> Path:
    """A link inside out/ to a user's file or folder outside it; returns the user's folder."""
    mine = case.root / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "sub" / "thesis.tex").write_text("precious")
    (mine / "ranks.npy").write_bytes(b"a user's array")
    link = case.out / where
    if where == "test/ranks.npy":  # a listed name, now a link
        link.unlink()
    target = {
        "elsewhere": mine / "sub",
        "test/ranks.npy": mine / "ranks.npy",
        "dangling": mine / "gone",
    }[where]
    link.symlink_to(target)
    return mine


@pytest.mark.parametrize("where", ["elsewhere", "test/ranks.npy", "dangling"])
def test_a_link_inside_out_is_refused_never_followed(case: World, capsys, where: str) -> None:
    mine = _link_outside(case, where)
    before, theirs = snapshot(case.out), snapshot(mine)
    code, lines = run_cli(_argv(case, case.out), capsys)
    assert_error(code, lines, "evaluate", str(case.out / where), "symbolic link")
    assert snapshot(case.out) == before and snapshot(mine) == theirs
    assert (case.out / where).is_symlink()


def test_out_itself_a_link_is_refused(case: World, capsys) -> None:
    link = case.root / "link"
    link.symlink_to(case.out)
    before = snapshot(case.out)
    code, lines = run_cli(_argv(case, link), capsys)
    assert_error(code, lines, "evaluate", str(link), "symbolic link")
    assert link.is_symlink() and snapshot(case.out) == before


def test_results_without_a_manifest_are_refused(case: World, capsys) -> None:
    (case.out / "manifest.json").unlink()
    before = snapshot(case.out)
    code, lines = run_cli(_argv(case, case.out), capsys)
    assert_error(code, lines, "evaluate", "has no manifest.json", "not written by msvlad")
    assert snapshot(case.out) == before


@pytest.mark.parametrize(
    "text", ['{"command": "train", "files": []}', '{"command": "evaluate"}', "not json {"]
)
def test_a_manifest_not_of_evaluate_is_refused(case: World, capsys, text: str) -> None:
    (case.out / "manifest.json").write_text(text)
    before = snapshot(case.out)
    code, lines = run_cli(_argv(case, case.out), capsys)
    assert_error(code, lines, "evaluate", str(case.out / "manifest.json"))
    assert snapshot(case.out) == before


def test_an_empty_folder_and_own_results_are_replaced(case: World, capsys) -> None:
    empty = case.root / "empty"
    empty.mkdir()
    assert run_cli(_argv(case, empty, "--variants", "plain"), capsys)[0] == 0
    assert run_cli(_argv(case, case.out, "--variants", "plain"), capsys)[0] == 0
    manifest = json.loads((case.out / "manifest.json").read_text())
    assert set(snapshot(case.out)) == {*manifest["files"], "manifest.json"}
    assert all(file_digest(case.out / f) == d for f, d in manifest["sha256"].items())
    assert _temps(case.root) == [] and _temps(case.root, "empty") == []


# ----------------------------------------------------------------------------- a kill in the swap

# Runs `msvlad evaluate` and SIGKILLs itself at one point of the final swap (argv[1]); argv[2] is
# --out. "writing": while the results are written; "complete": the new folder marked complete;
# "aside": the previous results moved aside; "in": the new results renamed in, before the old
# ones are deleted.
KILLER = """
import os, signal, sys
point, out = sys.argv[1], sys.argv[2]
real = os.replace
def replace(src, dst, *args, **kwargs):
    s, d = os.fspath(src), os.fspath(dst)
    if point == "writing" and d.endswith("features.npz"):
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst, *args, **kwargs)
    if point == "complete" and d.endswith(".msvlad-temp.json") and "complete" in open(d).read():
        os.kill(os.getpid(), signal.SIGKILL)
    if (point == "aside" and s == out) or (point == "in" and d == out):
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
from msvlad.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _subprocess_env() -> dict[str, str]:
    path = os.pathsep.join([str(REPO / "lib"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def _killed(case: World, point: str, *extra: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-c", KILLER, point, str(case.out), *_argv(case, case.out, *extra)]
    return subprocess.run(argv, capture_output=True, text=True, env=_subprocess_env())


KILL_POINTS = [
    "aside",
    pytest.param("writing", marks=pytest.mark.slow),
    pytest.param("complete", marks=pytest.mark.slow),
    pytest.param("in", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_kill_in_the_swap_then_a_failing_rerun_loses_nothing(
    case: World, capsys, point: str
) -> None:
    previous = snapshot(case.out)
    done = _killed(case, point, "--variants", "plain")  # the new results: other files
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    (tmp_box,) = _boxes(case.root, ".tmp")
    new = snapshot(case.out if point == "in" else tmp_box / "new")
    if point == "aside":  # the moment of the issue: neither folder is at out/
        assert not case.out.exists()
        (old_box,) = _boxes(case.root, ".old")
        assert snapshot(old_box / "old") == previous
    if point != "writing":
        assert new and new != previous and "manifest.json" in new
    # a rerun that fails (an unreadable query) after its clean-up
    query = case.jpg / "q1.jpg"
    good = query.read_bytes()
    query.write_bytes(good[:120])
    code, lines = run_cli(_argv(case, case.out), capsys)
    assert_error(code, lines, "evaluate", "q1.jpg")
    kept = _boxes(case.root, ".old")
    assert _boxes(case.root, ".tmp") == []
    if point == "writing":  # an unfinished folder is deleted; the previous results stay
        assert snapshot(case.out) == previous and kept == []
    else:  # the finished new results are put in place, the previous ones kept beside
        assert snapshot(case.out) == new
        assert len(kept) == 1 and snapshot(kept[0] / "old") == previous
    # and a good rerun replaces out/ but never deletes the kept folder
    query.write_bytes(good)
    assert run_cli(_argv(case, case.out), capsys)[0] == 0
    assert "test/metrics_qe.json" in snapshot(case.out)
    assert [snapshot(k / "old") for k in _boxes(case.root, ".old")] == (
        [previous] if point != "writing" else []
    )
    assert _boxes(case.root, ".tmp") == []


def test_previous_results_set_aside_alone_are_restored(case: World, capsys) -> None:
    previous = snapshot(case.out)
    assert _killed(case, "aside", "--variants", "plain").returncode == -signal.SIGKILL
    for box in _boxes(case.root, ".tmp"):  # only the set-aside previous results are left
        shutil.rmtree(box)
    assert not case.out.exists()
    code, lines = run_cli(_argv(case, case.out, "--set", "evaluate.kappas=[0]"), capsys)
    assert_error(code, lines, "evaluate", "evaluate.kappas")  # refused before any clean-up
    assert not case.out.exists() and len(_boxes(case.root, ".old")) == 1
    (case.jpg / "q1.jpg").write_bytes(b"not a jpeg")
    code, lines = run_cli(_argv(case, case.out), capsys)
    assert_error(code, lines, "evaluate", "q1.jpg")  # fails after the clean-up, which restored
    assert snapshot(case.out) == previous and _temps(case.root) == []


def test_temp_folders_without_our_marker_are_never_deleted(tmp_path: Path) -> None:
    mine = {
        ".out.notes.tmp": "a user's folder named like a temp",
        ".out.backup.old": "another",
    }
    for name, text in mine.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "file.txt").write_text(text)
    forged = tmp_path / ".out.forged.old"  # a marker for a name that leaves the folder
    (forged / "old").mkdir(parents=True)
    (forged / TEMP_MARK).write_text('{"for": "..", "state": "previous"}')
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "x").write_text("x")
    (tmp_path / ".out.link.tmp").symlink_to(tmp_path / "theirs")
    other = tmp_path / ".other.z.tmp"  # ours, but for another name
    other.mkdir()
    (other / TEMP_MARK).write_text('{"for": "other", "state": "writing"}')
    before = snapshot(tmp_path)
    assert remove_stale_temps(tmp_path, "out") == []
    assert snapshot(tmp_path) == before and (forged / "old").is_dir()
    assert (tmp_path / ".out.link.tmp").is_symlink()
    assert remove_stale_temps(tmp_path, "other") == [other] and not other.exists()


# ----------------------------------------------------------------------------- two writers

# Runs `msvlad evaluate`; once it holds the lock and checked --out it creates argv[1] and waits for
# argv[2] to exist before it goes on.
PAUSER = """
import sys, time
from pathlib import Path
import msvlad.stages.evaluate as stage
ready, go = Path(sys.argv[1]), Path(sys.argv[2])
real = stage._check_out
def check_out(out):
    real(out)
    ready.touch()
    while not go.exists():
        time.sleep(0.05)
stage._check_out = check_out
from msvlad.cli import main
sys.exit(main(sys.argv[3:]))
"""


def test_a_second_writer_is_refused_while_the_lock_is_held(case: World, capsys) -> None:
    before = snapshot(case.out)
    with lock_beside(case.out, "evaluate") as lock:
        code, lines = run_cli(_argv(case, case.out), capsys)
        assert lock == case.root / ".out.lock"
    assert_error(code, lines, "evaluate", str(case.out), "another msvlad evaluate")
    assert snapshot(case.out) == before
    assert _temps(case.root) == []  # the holder removed its lock file
    assert run_cli(_argv(case, case.out, "--variants", "plain"), capsys)[0] == 0


def test_two_concurrent_evaluates_one_is_refused_the_other_complete(case: World, capsys):
    ready, go = case.root / "ready", case.root / "go"
    argv = [sys.executable, "-c", PAUSER, str(ready), str(go), *_argv(case, case.out)]
    first = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=_subprocess_env())
    try:
        while not ready.exists():  # the first writer holds the lock
            assert first.poll() is None, first.stderr.read()[-2000:]
            time.sleep(0.05)
        before = snapshot(case.out)
        code, lines = run_cli(_argv(case, case.out, "--variants", "plain"), capsys)
        assert_error(code, lines, "evaluate", str(case.out), "another msvlad evaluate")
        assert snapshot(case.out) == before
        go.touch()
        _, err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err[-2000:]
    metrics = json.loads((case.out / "metrics.json").read_text())
    manifest = json.loads((case.out / "manifest.json").read_text())
    assert set(metrics) == {"test"} and set(metrics["test"]) == {"plain", "raw", "qe", "dba"}
    assert set(snapshot(case.out)) == {*manifest["files"], "manifest.json"}  # all of it there
    assert all(file_digest(case.out / f) == d for f, d in manifest["sha256"].items())
    assert _temps(case.root) == []


# ----------------------------------------------------------------------------- distractors


def _distractors(w: World, names: list[str]) -> Path:
    """The distractor set `noise` of the database images `names` (s0_0 ...), listed in order."""
    folder = w.data / "noise"
    (folder / "jpg").mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        dest = folder / "jpg" / f"n{i}.jpg"
        if not dest.exists():
            shutil.copy(w.jpg / f"{name}.jpg", dest)
    (folder / "noise.txt").write_text("".join(f"n{i}\n" for i in range(len(names))))
    return folder


@pytest.fixture
def described(monkeypatch) -> list[int]:
    """How many distractors each description of a distractor set read."""
    import msvlad.stages.evaluate as stage

    calls: list[int] = []
    real = stage.describe_multiscale

    def counted(model, items, **kwargs):
        calls.append(len(items))
        return real(model, items, **kwargs)

    monkeypatch.setattr(stage, "describe_multiscale", counted)
    return calls


def _num_db(out: Path) -> int:
    return json.loads((out / "metrics.json").read_text())["test+noise"]["plain"]["num_db"]


def test_a_grown_distractor_set_is_described_again(case: World, capsys, described) -> None:
    db = [f"s{s}_{k}" for s in range(3) for k in range(3)]
    _distractors(case, db[:2])
    out = case.root / "noisy"
    assert run_cli(_argv(case, out, "--distractors", "noise"), capsys)[0] == 0
    assert described == [2] and _num_db(out) == 9 + 2
    assert run_cli(_argv(case, out, "--distractors", "noise"), capsys)[0] == 0
    assert described == [2]  # the same images: the cache is reused
    _distractors(case, db[:7])  # the set grows
    assert run_cli(_argv(case, out, "--distractors", "noise"), capsys)[0] == 0
    assert described == [2, 7] and _num_db(out) == 9 + 7
    import numpy as np

    assert np.load(out / "noise_features.npz")["db"].shape[0] == 7


def test_a_distractor_rewritten_in_place_is_described_again(case: World, capsys, described):
    folder = _distractors(case, ["s0_0", "s1_0", "s2_0"])
    out = case.root / "noisy"
    assert run_cli(_argv(case, out, "--distractors", "noise"), capsys)[0] == 0
    image = folder / "jpg" / "n1.jpg"
    st = image.stat()
    other = (case.jpg / "s1_1.jpg").read_bytes()
    data = (other + bytes(st.st_size))[: st.st_size]  # another photo, cut or padded to the size
    image.write_bytes(data)
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))  # the same size and time
    assert image.stat().st_size == st.st_size and image.stat().st_mtime_ns == st.st_mtime_ns
    assert run_cli(_argv(case, out, "--distractors", "noise"), capsys)[0] == 0
    assert described == [3, 3]


# ----------------------------------------------------------------------------- a full disk


def _full_disk_at(monkeypatch, marker: str) -> None:
    """Writing a temp file whose name holds `marker` fails as on a full disk."""
    real = Path.write_bytes

    def write(self: Path, data: bytes) -> int:
        if marker in self.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write)


def test_a_full_disk_names_the_file_and_leaves_no_temp(case: World, capsys, monkeypatch) -> None:
    before = snapshot(case.out)
    _full_disk_at(monkeypatch, ".ranks.npy.")
    code, lines = run_cli(_argv(case, case.out), capsys)
    assert_error(code, lines, "evaluate", "ranks.npy: cannot write: No space left on device")
    assert snapshot(case.out) == before and _temps(case.root) == []


def test_a_failed_swap_puts_the_previous_results_back(case: World, capsys, monkeypatch) -> None:
    import msvlad.storage as storage

    before = snapshot(case.out)
    real = os.replace

    def replace(src, dst):
        if os.fspath(dst) == str(case.out) and os.fspath(src).endswith("new"):
            raise OSError(errno.EIO, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(storage.os, "replace", replace)
    code, lines = run_cli(_argv(case, case.out, "--variants", "plain"), capsys)
    assert_error(code, lines, "evaluate", f"{case.out}: cannot write: Input/output error")
    assert snapshot(case.out) == before and _temps(case.root) == []


def test_write_bytes_on_a_full_disk(tmp_path: Path, monkeypatch) -> None:
    write_bytes(tmp_path / "f.bin", b"earlier")
    _full_disk_at(monkeypatch, ".f.bin.")
    with pytest.raises(InputError, match=r"f\.bin: cannot write: No space left on device"):
        write_bytes(tmp_path / "f.bin", b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]
    assert (tmp_path / "f.bin").read_bytes() == b"earlier"
    import msvlad.storage as storage

    def no_inode(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.tempfile, "mkstemp", no_inode)
    with pytest.raises(InputError, match=r"g\.bin: cannot write: No space left on device"):
        write_bytes(tmp_path / "g.bin", b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]
