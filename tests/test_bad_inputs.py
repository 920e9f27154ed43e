"""A corpus of bad inputs through the command line: exit 2, one line naming the culprit, no harm.

Every case runs `msvlad.cli.main` in process on a tiny world (`badinputs.make_world`) and checks
(1) the exit status, (2) that stderr holds exactly one `msvlad <command>: error: ...` line and no
traceback, (3) that the line names the file or the parameter at fault, and (4) that the output an
earlier successful run left in --out is byte for byte unchanged.
"""

from __future__ import annotations

import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from badinputs import World, make_world, snapshot
from msvlad.cli import main
from msvlad.storage import first_sentence, load_torch, save_torch

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return make_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def previous(world: World) -> Path:
    """A successful evaluation: what every failing run must leave as it was."""
    out = world.root / "previous"
    assert main(["evaluate", *world.args("--checkpoint", str(world.model), "--out", str(out))]) == 0
    return out


@pytest.fixture
def case(world: World, previous: Path, tmp_path: Path) -> World:
    """A private copy of the world's data and model, and of the previous output as out/."""
    shutil.copytree(world.data, tmp_path / "data")
    shutil.copy(world.model, tmp_path / "model.pt")
    shutil.copytree(previous, tmp_path / "out")
    return World(tmp_path, tmp_path / "data", world.params, tmp_path / "model.pt")


def run_cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    """Exit status and the `msvlad ...` lines of stderr (no traceback allowed)."""
    code = main(argv)
    err = capsys.readouterr().err.replace("\r", "\n")
    assert "Traceback" not in err
    return code, [line for line in err.splitlines() if line.startswith("msvlad ")]


def assert_error(code: int, lines: list[str], command: str, *named: str) -> None:
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"msvlad {command}: error: "), lines[0]
    for name in named:
        assert name in lines[0], (name, lines[0])


def _evaluate(w: World, *extra: str) -> list[str]:
    ckpt = ["--checkpoint", str(w.model)] if "--checkpoint" not in extra else []
    return ["evaluate", *w.args(*ckpt, "--data-root", str(w.data), "--out", str(w.out), *extra)]


# ----------------------------------------------------------------------------- parameters

PARAMS = [
    (["--set", "model.num_clusters=-3"], "model.num_clusters"),
    (["--set", "extract.scales=[]"], "extract.scales"),
    (["--set", "model.image_size=0"], "model.image_size"),
    (["--set", "model.image_size=-64"], "model.image_size"),
    (["--set", "extract.image_size=8"], "extract.image_size"),
    (["--set", "extract.scales=[1.0,-0.5]"], "extract.scales"),
    (["--set", "evaluate.kappas=[0]"], "evaluate.kappas"),
    (["--set", "evaluate.max_failed_db=2"], "evaluate.max_failed_db"),
    (["--set", "train.lr=.nan"], "train.lr"),
    (["--set", "miner.semi_hard_prob=1.5"], "miner.semi_hard_prob"),
    (["--set", "miner.pool_size=10", "--set", "miner.images_per_class=8"], "miner.pool_size"),
    (["--set", "model.num_cluster=3"], "model.num_cluster"),
    (["--set", "extract.resize=stretch"], "extract.resize"),
    (["--set", "model.image_size=[1"], "model.image_size"),
    (["--variants", "plain,bogus"], "--variants"),
    (["--set", "model.image_size=128"], "model.image_size"),  # conflicts with the checkpoint
    (["--method", "gem-ots"], "model.pooling"),  # a row of another pooling on this checkpoint
    (["--method", "no-such-row"], "methods.no-such-row"),
]


@pytest.mark.parametrize(("args", "named"), PARAMS, ids=[" ".join(a) for a, _ in PARAMS])
def test_bad_parameter(case: World, capsys, args: list[str], named: str) -> None:
    before = snapshot(case.out)
    code, lines = run_cli(_evaluate(case, *args), capsys)
    assert_error(code, lines, "evaluate", named)
    assert snapshot(case.out) == before


def test_bad_params_file(tmp_path: Path, capsys) -> None:
    (tmp_path / "p.yaml").write_text("model: [unclosed\n")
    code, lines = run_cli(["info", "--params", str(tmp_path / "p.yaml")], capsys)
    assert_error(code, lines, "info", "p.yaml", "not valid YAML")
    code, lines = run_cli(["info", "--params", str(tmp_path / "none.yaml")], capsys)
    assert_error(code, lines, "info", "none.yaml")


# ----------------------------------------------------------------------------- ground truths


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-gnd",))


def _gnd(w: World) -> dict:
    with w.gnd.open("rb") as fh:
        return pickle.load(fh)


def _write_gnd(w: World, cfg: object) -> None:
    with w.gnd.open("wb") as fh:
        pickle.dump(cfg, fh)


GROUND_TRUTHS: dict[str, tuple[Callable[[dict], object], str]] = {
    "gnd is an integer": (lambda c: {**c, "gnd": 5}, "gnd"),
    "imlist is a string": (lambda c: {**c, "imlist": "s0_0"}, "imlist"),
    "qimlist holds a number": (lambda c: {**c, "qimlist": [1, 2, 3]}, "qimlist[0]"),
    "empty database": (lambda c: {**c, "imlist": []}, "imlist"),
    "entry not a dict": (lambda c: {**c, "gnd": [1, 2, 3]}, "query 0"),
    "index out of range": (
        lambda c: {**c, "gnd": [{**g, "easy": [999]} for g in c["gnd"]]},
        "index 999 out of range",
    ),
    "float index": (lambda c: {**c, "gnd": [{**g, "hard": [0.5]} for g in c["gnd"]]}, "hard"),
    "not a dict at all": (lambda c: ["imlist"], "expected a dict"),
    "a malicious pickle": (lambda c: {**c, "gnd": _Evil()}, "refused to unpickle"),
}


@pytest.mark.parametrize("name", list(GROUND_TRUTHS))
def test_bad_ground_truth(case: World, capsys, monkeypatch, name: str) -> None:
    monkeypatch.chdir(case.root)
    mutate, named = GROUND_TRUTHS[name]
    _write_gnd(case, mutate(_gnd(case)))
    before = snapshot(case.out)
    code, lines = run_cli(_evaluate(case), capsys)
    assert_error(code, lines, "evaluate", "gnd_test.pkl", named)
    assert snapshot(case.out) == before
    assert not (case.root / "pwned-by-gnd").exists()


def test_truncated_and_missing_ground_truth(case: World, capsys) -> None:
    data = case.gnd.read_bytes()
    case.gnd.write_bytes(data[: len(data) // 2])
    code, lines = run_cli(_evaluate(case), capsys)
    assert_error(code, lines, "evaluate", "gnd_test.pkl", "not a readable pickle")
    case.gnd.unlink()
    code, lines = run_cli(_evaluate(case), capsys)
    assert_error(code, lines, "evaluate", "gnd_test.pkl", "not found")


# ----------------------------------------------------------------------------- images


def _corrupt_query(w: World) -> list[str]:
    path = w.jpg / "q1.jpg"
    path.write_bytes(path.read_bytes()[:120])
    return []


def _box_outside(w: World) -> list[str]:
    cfg = _gnd(w)
    cfg["gnd"][1]["bbx"] = [500.0, 500.0, 600.0, 640.0]
    _write_gnd(w, cfg)
    return []


def _missing_query(w: World) -> list[str]:
    (w.jpg / "q1.jpg").unlink()
    return []


def _all_db_missing(w: World) -> list[str]:
    for name in _gnd(w)["imlist"]:
        (w.jpg / f"{name}.jpg").unlink()
    return []


def _db_mostly_corrupt(w: World) -> list[str]:
    for name in _gnd(w)["imlist"][:2]:
        (w.jpg / f"{name}.jpg").write_bytes(b"not a jpeg")
    return ["--set", "evaluate.max_failed_db=0.1"]


def _bomb(w: World) -> list[str]:
    return ["--set", "extract.resize=max_side"]


IMAGES: dict[str, tuple[Callable[[World], list[str]], list[str]]] = {
    "unreadable query": (_corrupt_query, ["q1.jpg", "cannot decode"]),
    "missing query": (_missing_query, ["q1.jpg", "not found"]),
    "query box outside the image": (_box_outside, ["q1.jpg", "bbx"]),
    "every database image missing": (_all_db_missing, ["jpg", "database images"]),
    "too many unreadable database images": (_db_mostly_corrupt, ["2 of 9", "max_failed_db"]),
    "decompression bomb with max_side": (_bomb, ["q0.jpg", "decode"]),
}


@pytest.mark.parametrize("name", list(IMAGES))
def test_bad_image(case: World, capsys, monkeypatch, name: str) -> None:
    from PIL import Image

    mutate, named = IMAGES[name]
    extra = mutate(case)
    if name.startswith("decompression"):  # every image is a "bomb" above this many pixels
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 4)
    before = snapshot(case.out)
    code, lines = run_cli(_evaluate(case, *extra), capsys)
    assert_error(code, lines, "evaluate", *named)
    assert snapshot(case.out) == before


def test_unreadable_query_left_out_on_request(case: World, capsys) -> None:
    import json

    _corrupt_query(case)
    (case.jpg / "s2_1.jpg").write_bytes(b"not a jpeg")  # one of 9 database images
    args = ["--set", "evaluate.skip_failed_queries=true", "--set", "evaluate.max_failed_db=0.2"]
    code, _ = run_cli(_evaluate(case, *args), capsys)
    assert code == 0
    plain = json.loads((case.out / "metrics.json").read_text())["test"]["plain"]
    assert [q["name"] for q in plain["failed_queries"]] == ["q1"]
    assert [d["name"] for d in plain["failed_db"]] == ["s2_1"] and plain["num_queries"] == 2
    import numpy as np
    import pandas as pd

    frame = pd.read_csv(case.out / "test" / "per_query.csv", keep_default_na=False)
    q1 = frame[frame["query"] == "q1"]
    assert len(q1) == 3 and (q1["AP"] == "").all() and q1["excluded"].str.contains("q1.jpg").all()
    assert (frame[frame["query"] != "q1"]["excluded"] == "").all()
    ranks = np.load(case.out / "test" / "ranks.npy")
    assert (ranks[-1] == 7).all()  # the unreadable database image (s2_1 = index 7) ranks last


# ----------------------------------------------------------------------------- checkpoints


def _zero_64k(w: World) -> None:
    data = bytearray(w.model.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 65536] = bytes(65536)
    w.model.write_bytes(bytes(data))


def _truncate(w: World) -> None:
    w.model.write_bytes(w.model.read_bytes()[:5000])


def _config_no_longer_fits(w: World) -> None:
    state = load_torch(w.model)
    state["config"]["num_clusters"] = 6  # the weights were made for 4
    save_torch(w.model, state)  # a valid checksum: the file is intact, its content inconsistent


def _bad_config_value(w: World) -> None:
    state = load_torch(w.model)
    state["config"]["num_clusters"] = -1
    save_torch(w.model, state)


def _malicious(w: World) -> None:
    torch.save({"config": {}, "state_dict": {}, "x": _Evil()}, w.model)


def _not_a_model(w: World) -> None:
    shutil.copy(w.jpg / "q0.jpg", w.model)


def _plain_tensor(w: World) -> None:
    torch.save(torch.zeros(3), w.model)


CHECKPOINTS: dict[str, tuple[Callable[[World], None], str]] = {
    "64 KiB zeroed inside": (_zero_64k, ""),
    "truncated": (_truncate, "damaged, truncated or not a torch file"),
    "config no longer fits its weights": (_config_no_longer_fits, "size mismatch for"),
    "config value out of range": (_bad_config_value, "model.num_clusters"),
    "malicious pickle": (_malicious, "refused by torch.load(weights_only=True)"),
    "an image, not a checkpoint": (_not_a_model, "cannot load checkpoint"),
    "a tensor, not a model": (_plain_tensor, "not a msvlad model"),
}


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_bad_checkpoint(case: World, capsys, monkeypatch, name: str) -> None:
    monkeypatch.chdir(case.root)
    mutate, named = CHECKPOINTS[name]
    mutate(case)
    before = snapshot(case.out)
    code, lines = run_cli(_evaluate(case), capsys)
    assert_error(code, lines, "evaluate", "model.pt", named)
    assert lines[-1].count("model.pt") == 1  # the file named once
    assert len(lines[-1]) < 400 and not lines[-1].endswith(" )")  # a library's text cut readably
    assert snapshot(case.out) == before
    assert not (case.root / "pwned-by-gnd").exists()
    code, lines = run_cli(
        ["whiten", *case.args("--checkpoint", str(case.model), "--out", str(case.root / "w.pt"))],
        capsys,
    )
    assert_error(code, lines, "whiten", "model.pt", named)
    assert not (case.root / "w.pt").exists()


def test_first_sentence_keeps_a_readable_reason() -> None:
    long = "Weights only load failed. In PyTorch 2.6, we changed the default value of weights_only."
    assert first_sentence(RuntimeError(long)) == "Weights only load failed."
    shape = "size mismatch for a: shape torch.Size([4, 160]) from checkpoint. size mismatch for b"
    assert first_sentence(RuntimeError(shape)).endswith("torch.Size([4, 160]) from checkpoint.")
    cut = first_sentence(ValueError("word " * 100), limit=23)
    assert cut == "word word word word…"  # cut on a word, marked
    assert first_sentence(OSError(22, "Invalid argument")) == "[Errno 22] Invalid argument"


def test_corrupt_checkpoint_is_named_by_its_checksum(case: World, capsys) -> None:
    _zero_64k(case)
    code, lines = run_cli(_evaluate(case), capsys)
    assert_error(code, lines, "evaluate", "model.pt", "checksum mismatch")


# ----------------------------------------------------------------------------- folders


def test_output_folder_not_writable(case: World, capsys, monkeypatch) -> None:
    import msvlad.storage

    calls = []

    def refuse(*args, **kwargs):  # what the OS answers in a read-only folder
        calls.append(kwargs.get("dir"))
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(msvlad.storage.tempfile, "mkstemp", refuse)
    out = case.root / "ro" / "out"
    code, lines = run_cli(_evaluate(case, "--out", str(out)), capsys)
    assert_error(code, lines, "evaluate", str(out.parent), "Permission denied")
    assert calls and not out.exists()
    monkeypatch.undo()
    if os.geteuid() != 0:  # the real thing (root may write anywhere)
        (case.root / "ro").chmod(0o500)
        try:
            code, lines = run_cli(_evaluate(case, "--out", str(out)), capsys)
            assert_error(code, lines, "evaluate", str(out.parent))
        finally:
            (case.root / "ro").chmod(0o700)


def test_output_inside_a_file(case: World, capsys) -> None:
    (case.root / "afile").write_text("x")
    code, lines = run_cli(_evaluate(case, "--out", str(case.root / "afile" / "out")), capsys)
    assert_error(code, lines, "evaluate", "afile")


def test_output_folder_with_a_users_file(case: World, capsys) -> None:
    (case.out / "notes.txt").write_text("mine")
    before = snapshot(case.out)
    code, lines = run_cli(_evaluate(case), capsys)
    assert_error(code, lines, "evaluate", "notes.txt", "not written by msvlad evaluate")
    assert snapshot(case.out) == before


def test_dataset_not_found(case: World, capsys) -> None:
    code, lines = run_cli(_evaluate(case, "--dataset", "nope"), capsys)
    assert_error(code, lines, "evaluate", "nope")


# ----------------------------------------------------------------------------- training runs


@pytest.fixture(scope="module")
def trained(world: World) -> Path:
    """A run folder with a checkpoint after 2 steps, and its initial model."""
    run = world.root / "run"
    init = world.root / "init.pt"
    shutil.copy(world.model, init)
    argv = ["train", *world.args("--init", str(init), "--out", str(run), "--max-steps", "2")]
    assert main(argv) == 0
    return run


def _train(w: World, run: Path, *extra: str) -> list[str]:
    return ["train", *w.args("--init", str(w.root / "init.pt"), "--out", str(run), *extra)]


def test_rerun_with_other_parameters_changes_nothing(world: World, trained: Path, capsys) -> None:
    before = snapshot(trained)
    assert {"checkpoint.pt", "run.json", "log.csv", "rounds.csv"} <= set(before)
    code, lines = run_cli(_train(world, trained, "--set", "miner.delta=0.5"), capsys)
    assert_error(code, lines, "train", "checkpoint.pt", "miner.delta: 1.0 -> 0.5", "--restart")
    assert snapshot(trained) == before


def test_restart_moves_the_old_run_aside_whole(world: World, trained: Path, capsys, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = snapshot(run)
    argv = _train(world, run, "--set", "miner.delta=0.5", "--restart", "--max-steps", "0")
    code, _ = run_cli(argv, capsys)
    assert code == 0
    (moved,) = (tmp_path / "run.previous").iterdir()
    assert snapshot(moved) == {k: v for k, v in before.items() if k != ".lock"}
    assert (run / "checkpoint.pt").is_file()
    # a second restart gets a new folder; the first is never reused or changed
    code, _ = run_cli(_train(world, run, "--restart", "--max-steps", "0"), capsys)
    assert code == 0 and len(list((tmp_path / "run.previous").iterdir())) == 2
    assert snapshot(moved) == {k: v for k, v in before.items() if k != ".lock"}


def test_restart_if_changed_resumes_an_identical_run(world: World, trained: Path, capsys, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = snapshot(run)
    code, _ = run_cli(_train(world, run, "--restart=if-changed", "--max-steps", "0"), capsys)
    assert code == 0 and not (tmp_path / "run.previous").exists()
    assert snapshot(run) == before  # nothing to do: nothing rewritten


def test_a_new_mirror_or_test_set_list_resumes_the_run(
    world: World, trained: Path, capsys, tmp_path
):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = snapshot(run)
    moved = ["--set", "data.mirror=http://127.0.0.1:9", "--set", "data.test_sets=[elsewhere]"]
    argv = _train(world, run, *moved, "--restart=if-changed", "--max-steps", "0")
    code, _ = run_cli(argv, capsys)
    assert code == 0 and not (tmp_path / "run.previous").exists()  # resumed, not set aside
    after = snapshot(run)
    assert {k: after[k] for k in before if k != "run.json"} == {
        k: v for k, v in before.items() if k != "run.json"
    }


def test_logs_without_a_run_record(world: World, capsys, tmp_path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.csv").write_text("epoch,step\n0,0\n")
    code, lines = run_cli(_train(world, run), capsys)
    assert_error(code, lines, "train", str(run), "--restart")
    assert (run / "log.csv").read_text() == "epoch,step\n0,0\n"


def test_corrupt_checkpoint_in_a_run_folder(world: World, trained: Path, capsys, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    data = bytearray((run / "checkpoint.pt").read_bytes())
    data[len(data) // 2 : len(data) // 2 + 65536] = bytes(65536)
    (run / "checkpoint.pt").write_bytes(bytes(data))
    before = snapshot(run)
    code, lines = run_cli(_train(world, run), capsys)
    assert_error(code, lines, "train", "checkpoint.pt", "checksum mismatch")
    assert snapshot(run) == before
    code, _ = run_cli(_train(world, run, "--restart", "--max-steps", "0"), capsys)
    assert code == 0  # --restart sets the corrupt run aside without reading it
    (moved,) = (tmp_path / "run.previous").iterdir()
    assert snapshot(moved) == {k: v for k, v in before.items() if k != ".lock"}


def test_second_trainer_in_the_same_folder(world: World, trained: Path, capsys) -> None:
    from msvlad.training.rundir import locked

    before = snapshot(trained)
    with locked(trained):
        code, lines = run_cli(_train(world, trained), capsys)
    assert_error(code, lines, "train", str(trained), "another msvlad train")
    assert snapshot(trained) == before


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--set", "train.frozen_stages=50"], "train.frozen_stages"),
        (["--set", "data.train_set=nope"], "nope"),
        (["--set", "data.train_set=val"], "val"),  # one class: no negatives
    ],
)
def test_bad_training_input(world: World, capsys, tmp_path, args, named) -> None:
    code, lines = run_cli(_train(world, tmp_path / "run", *args), capsys)
    assert_error(code, lines, "train", named)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_missing_initial_model(world: World, capsys, tmp_path) -> None:
    argv = ["train", *world.args("--init", str(tmp_path / "none.pt"), "--out", str(tmp_path))]
    code, lines = run_cli(argv, capsys)
    assert_error(code, lines, "train", "none.pt")


# ----------------------------------------------------------------------------- other commands


def test_prepare_offline_is_one_line(tmp_path: Path, capsys, repo_root: Path) -> None:
    argv = [
        "prepare",
        "--params",
        str(repo_root / "params.paper.yaml"),
        "--set",
        f"data.root={tmp_path / 'data'}",
        "--set",
        "data.mirror=http://127.0.0.1:9",  # nothing listens: refused at once
    ]
    # without the rotation list the up-front check names it before any download is tried
    code, lines = run_cli(argv, capsys)
    assert_error(code, lines, "prepare", "prepare.holidays_rotations")
    assert not (tmp_path / "data" / "gldv2_clean").exists()
    # with every input supplied, the first download (GLDv2's list) fails in one line
    rotations = tmp_path / "rotations.yaml"
    rotations.write_text("100001.jpg: 90\n")
    argv += ["--set", f"prepare.holidays_rotations={rotations}"]
    code, lines = run_cli(argv, capsys)
    assert_error(code, lines, "prepare", "train_clean.csv", "cannot fetch")


def test_a_bug_keeps_its_traceback(world: World, monkeypatch) -> None:
    import msvlad.stages.info

    def broken(params):
        raise RuntimeError("a bug")

    monkeypatch.setattr(msvlad.stages.info, "run", broken)
    with pytest.raises(RuntimeError, match="a bug"):  # not turned into a one-line exit 2
        main(["info", *world.args()])
    monkeypatch.setattr(msvlad.stages.info, "run", lambda p: (_ for _ in ()).throw(ValueError()))
    with pytest.raises(ValueError):  # a plain ValueError is a bug too, not an input error
        main(["info", *world.args()])
