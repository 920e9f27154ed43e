"""Training runs under hostile inputs: nothing replaced by another row's output, nothing trusted
unverified, and every failure one line (exit 2) that leaves the earlier outputs as they were.

The cases run `msvlad.cli.main` in process on the tiny world of `badinputs.make_world`, with a
finished run of the paper row in the runs/<row>/train layout (`msvlad.training.rundir`):
off-the-shelf rows (`miner: null`) against trained runs, model.pt against the final checkpoint,
twin copies and resumes against damaged files, initial models of another network, and the
one-line errors of divergence, a missing GPU, unreadable training sets and foreign files.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from badinputs import World, make_world, snapshot
from msvlad.cli import main
from msvlad.config import load_params
from msvlad.nn.model import build_model, save_model
from msvlad.storage import DIGEST_KEY, file_digest, load_torch, read_json, save_torch
from msvlad.training.logs import LOG_FIELDS
from test_bad_inputs import assert_error, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

REPO = Path(__file__).resolve().parents[1]
TRAINED = "msvlad"  # the paper row, trained 4 steps in the tiny world
WIDE = "msvlad-wide"  # the same training with another test-time policy: a twin of TRAINED


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    w = make_world(tmp_path_factory.mktemp("hostile"))
    raw = yaml.safe_load(w.params.read_text())
    raw["methods"][WIDE] = {
        "label": "same training, another test-time policy",
        "pooling": "msvlad",
        "miner": "difficulty",
        "set": {"extract.scales": [1.0, 0.5]},
    }
    w.params.write_text(yaml.safe_dump(raw))
    return w


def _train_argv(w: World, runs: Path, method: str, *extra: str, init: Path | None = None):
    """The command DVC runs for a row (`dvc.yaml`), in the runs/<row>/train layout."""
    init = init or runs / method / "init.pt"
    if not init.exists():
        init.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(w.model, init)
    out = runs / method / "train"
    return ["train", *w.args("--method", method, "--init", str(init), "--out", str(out), *extra)]


@pytest.fixture(scope="module")
def runs(world: World, tmp_path_factory) -> Path:
    """runs/msvlad/train: a finished run (4 steps, checkpoints at 2 and 4)."""
    runs = tmp_path_factory.mktemp("runs")
    assert main(_train_argv(world, runs, TRAINED)) == 0
    return runs


@pytest.fixture
def rows(runs: Path, tmp_path: Path) -> Path:
    """A private copy of the finished runs."""
    shutil.copytree(runs, tmp_path / "runs")
    return tmp_path / "runs"


@pytest.fixture(scope="module")
def gem_init(world: World) -> Path:
    """The gem-ots row's initial model, as `msvlad cluster --method gem-ots` writes it."""
    out = world.root / "gem-init.pt"
    assert main(["cluster", *world.args("--method", "gem-ots", "--out", str(out))]) == 0
    return out


def _without_lock(snap: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in snap.items() if k != ".lock"}


def _the_only_previous(run: Path) -> Path:
    (moved,) = (run.parent / f"{run.name}.previous").iterdir()
    return moved


# ----------------------------------------------------------------------------- off-the-shelf rows


def test_off_the_shelf_row_into_a_trained_run_is_refused(world, rows, gem_init, capsys):
    run = rows / TRAINED / "train"
    before = snapshot(run)
    argv = _train_argv(world, rows, "gem-ots", init=gem_init)
    argv[argv.index("--out") + 1] = str(run)
    code, lines = run_cli(argv, capsys)
    assert_error(code, lines, "train", str(run), "miner: 'difficulty' (trained) -> null")
    assert "init: sha256" in lines[0] and "--restart" in lines[0]
    assert snapshot(run) == before
    assert not (rows / TRAINED / "train.previous").exists()


def test_off_the_shelf_restart_moves_the_trained_run_aside(world, rows, gem_init, capsys):
    run = rows / TRAINED / "train"
    before = _without_lock(snapshot(run))
    argv = _train_argv(world, rows, "gem-ots", "--restart=if-changed", init=gem_init)
    argv[argv.index("--out") + 1] = str(run)
    code, _ = run_cli(argv, capsys)
    assert code == 0
    first = _the_only_previous(run)
    assert snapshot(first) == before  # every file of the trained run, byte for byte
    assert (run / "model.pt").read_bytes() == gem_init.read_bytes()
    assert (run / "log.csv").read_text().strip() == ",".join(LOG_FIELDS)
    record = read_json(run / "run.json")
    assert record["trained"] is False and record["init"] == file_digest(gem_init)
    assert sorted(p.name for p in run.iterdir() if p.name != ".lock") == [
        "log.csv",
        "model.pt",
        "run.json",
    ]
    # --restart (always) sets the copy aside in turn; the trained run stays where it was put
    code, _ = run_cli([*argv[:-1], "--restart"], capsys)
    assert code == 0 and len(list((rows / TRAINED / "train.previous").iterdir())) == 2
    assert snapshot(first) == before


def test_switching_to_off_the_shelf_and_back_restores_the_trained_run(world, rows, capsys, caplog):
    """msvlad-ots shares the paper row's init: only the kind of run differs."""
    run = rows / TRAINED / "train"
    trained = _without_lock(snapshot(run))
    init = rows / TRAINED / "init.pt"
    ots = _train_argv(world, rows, "msvlad-ots", "--restart=if-changed", init=init)
    ots[ots.index("--out") + 1] = str(run)
    code, _ = run_cli(ots, capsys)
    assert code == 0 and (run / "model.pt").read_bytes() == init.read_bytes()
    copy = _without_lock(snapshot(run))
    # back to the trained row without --restart: refused, the copy untouched
    code, lines = run_cli(_train_argv(world, rows, TRAINED), capsys)
    assert_error(code, lines, "train", str(run), "miner: null (off-the-shelf, not trained)")
    assert _without_lock(snapshot(run)) == copy
    # with --restart=if-changed the copy is set aside and the finished run comes back
    with caplog.at_level(logging.INFO, "msvlad.training.rundir"):
        code, _ = run_cli(_train_argv(world, rows, TRAINED, "--restart=if-changed"), capsys)
    assert code == 0
    assert "train.previous" in caplog.text and "copied from there" in caplog.text
    restored = _without_lock(snapshot(run))
    assert {k: v for k, v in restored.items() if k != "run.json"} == {
        k: v for k, v in trained.items() if k != "run.json"
    }
    assert restored["model.pt"] != file_digest(init)
    previous = sorted((rows / TRAINED / "train.previous").iterdir())
    assert [_without_lock(snapshot(p)) for p in previous] == [trained, copy]


def test_miner_null_in_the_params_then_reverted(world, rows, tmp_path, capsys):
    """What `dvc repro -s train@msvlad` runs after `miner: null` is set in the row, then after
    params.yaml is reverted: the trained model ends in place, never the k-means init."""
    run, init = rows / TRAINED / "train", rows / TRAINED / "init.pt"
    trained = (run / "model.pt").read_bytes()
    raw = yaml.safe_load(world.params.read_text())
    raw["methods"][TRAINED]["miner"] = None
    null = tmp_path / "params-null.yaml"
    null.write_text(yaml.safe_dump(raw))
    argv = _train_argv(world, rows, TRAINED, "--restart=if-changed")
    argv[argv.index("--params") + 1] = str(null)
    assert run_cli(argv, capsys)[0] == 0
    assert (run / "model.pt").read_bytes() == init.read_bytes()  # the row is off-the-shelf now
    assert run_cli(_train_argv(world, rows, TRAINED, "--restart=if-changed"), capsys)[0] == 0
    assert (run / "model.pt").read_bytes() == trained != init.read_bytes()
    state = load_torch(run / "checkpoint.pt")
    assert state["step"] == 4 and load_torch(run / "model.pt")["step"] == 4
    # the next `dvc repro` finds the run finished: nothing rewritten
    before = snapshot(run)
    assert run_cli(_train_argv(world, rows, TRAINED, "--restart=if-changed"), capsys)[0] == 0
    assert snapshot(run) == before


def test_off_the_shelf_copy_is_kept_checked_and_tied_to_its_init(world, rows, capsys, caplog):
    init = rows / "msvlad-ots" / "init.pt"
    argv = _train_argv(world, rows, "msvlad-ots")
    run = rows / "msvlad-ots" / "train"
    assert run_cli(argv, capsys)[0] == 0
    before = snapshot(run)
    assert run_cli(argv, capsys)[0] == 0 and snapshot(run) == before  # nothing rewritten
    # a damaged copy is copied again from the init
    (run / "model.pt").write_bytes(init.read_bytes()[:100_000])
    with caplog.at_level(logging.WARNING, "msvlad.training.rundir"):
        assert run_cli(argv, capsys)[0] == 0
    assert "copied again" in caplog.text and snapshot(run) == before
    # another init (a new k-means) is another run
    model = build_model(load_params(world.params).model)
    save_model(model, init)
    code, lines = run_cli(argv, capsys)
    assert_error(code, lines, "train", str(run), "init: sha256", "--restart")
    assert snapshot(run) == before


def test_off_the_shelf_folder_of_an_older_msvlad_is_kept(world, rows, capsys):
    """Before run.json, an off-the-shelf folder held model.pt (= init) and a log.csv header."""
    from msvlad.training.logs import LOG_FIELDS, write_header

    run, init = rows / "msvlad-ots" / "train", rows / "msvlad-ots" / "init.pt"
    init.parent.mkdir(parents=True)
    shutil.copy(world.model, init)
    run.mkdir()
    shutil.copy(init, run / "model.pt")
    write_header(run / "log.csv", LOG_FIELDS)
    before = snapshot(run)
    assert run_cli(_train_argv(world, rows, "msvlad-ots"), capsys)[0] == 0
    assert _without_lock(snapshot(run)) == before  # recognised: no run.json added
    argv = _train_argv(world, rows, TRAINED, init=init)
    argv[argv.index("--out") + 1] = str(run)
    code, lines = run_cli(argv, capsys)
    assert_error(code, lines, "train", str(run), "miner: null (off-the-shelf, not trained)")
    assert _without_lock(snapshot(run)) == before


# ----------------------------------------------------------------------------- model.pt


class _Killed(BaseException):
    """Stands for SIGKILL in process (no handler of the command line catches it)."""


def test_model_follows_the_final_checkpoint_after_a_kill(world, rows, monkeypatch, capsys, caplog):
    """A finished run extended (epochs 2 -> 3) and killed right after its final checkpoint."""
    import msvlad.training.trainer as trainer

    run = rows / TRAINED / "train"
    old = load_torch(run / "model.pt")
    assert old["step"] == 4

    def die_at(name: str) -> None:
        if name == "finish":
            raise _Killed

    monkeypatch.setattr(trainer, "fault_point", die_at)
    longer = _train_argv(world, rows, TRAINED, "--set", "train.epochs=3")
    with pytest.raises(_Killed):
        main(longer)
    monkeypatch.undo()
    assert load_torch(run / "checkpoint.pt")["step"] == 6
    assert load_torch(run / "model.pt")["step"] == 4  # what the kill left
    with caplog.at_level(logging.INFO, "msvlad.training.trainer"):
        assert run_cli(longer, capsys)[0] == 0
    assert "steps 6 -> 6" in caplog.text and "model of step 4, not of step 6" in caplog.text
    _assert_model_of_checkpoint(run, 6)
    new = load_torch(run / "model.pt")["state_dict"]
    assert any(not torch.equal(old["state_dict"][k], new[k]) for k in new)


def _assert_model_of_checkpoint(run: Path, step: int) -> None:
    model, state = load_torch(run / "model.pt"), load_torch(run / "checkpoint.pt")
    assert model["step"] == state["step"] == step
    assert model["state_dict"].keys() == state["model"].keys()
    assert all(torch.equal(model["state_dict"][k], state["model"][k]) for k in state["model"])


@pytest.mark.slow
def test_model_follows_the_final_checkpoint_after_a_real_kill(world, rows):
    run = rows / TRAINED / "train"
    argv = _train_argv(world, rows, TRAINED, "--set", "train.epochs=3")
    env = {**os.environ, "MSVLAD_FAULT": "finish", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "lib"), env.get("PYTHONPATH", "")])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    cmd = [sys.executable, "-m", "msvlad", *argv]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert load_torch(run / "checkpoint.pt")["step"] == 6
    assert load_torch(run / "model.pt")["step"] == 4
    env.pop("MSVLAD_FAULT")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "steps 6 -> 6" in proc.stderr, proc.stderr[-2000:]
    _assert_model_of_checkpoint(run, 6)


def test_damaged_model_of_a_finished_run_is_written_again(world, rows, capsys, caplog):
    run = rows / TRAINED / "train"
    before = snapshot(run)
    (run / "model.pt").write_bytes((run / "model.pt").read_bytes()[:100_000])
    with caplog.at_level(logging.WARNING, "msvlad.training.trainer"):
        assert run_cli(_train_argv(world, rows, TRAINED), capsys)[0] == 0
    assert "model.pt" in caplog.text and "written again from checkpoint.pt" in caplog.text
    warning = next(r.getMessage() for r in caplog.records if "written again" in r.getMessage())
    assert warning.count("model.pt") == 1 and "truncated" in warning  # named once, reason kept
    assert snapshot(run) == before  # the same bytes as the model the run wrote


# ----------------------------------------------------------------------------- checksums


def _truncate_100k(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100_000])


def _strip_digest_and_zero(path: Path) -> None:
    """The digest key removed (the file re-saved by plain torch.save), then 64 KiB zeroed."""
    state = load_torch(path)
    del state[DIGEST_KEY]
    torch.save(state, path)
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 65536] = bytes(65536)
    path.write_bytes(bytes(data))


DAMAGES = {
    "truncated to 100 KB": _truncate_100k,
    "no digest, 64 KiB zeroed": _strip_digest_and_zero,
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_twin_is_not_copied(world, runs, rows, capsys, caplog, damage):
    twin = rows / TRAINED / "train"
    DAMAGES[damage](twin / "model.pt")
    before = snapshot(twin)
    with caplog.at_level(logging.INFO, "msvlad.training.rundir"):
        assert run_cli(_train_argv(world, rows, WIDE), capsys)[0] == 0
    assert f"{twin}: not copied" in caplog.text and "copied from there" not in caplog.text
    assert snapshot(twin) == before  # the damaged twin is left as it is
    # the row trained itself: the weights of the undamaged run
    ours = load_torch(rows / WIDE / "train" / "model.pt")["state_dict"]
    paper = load_torch(runs / TRAINED / "train" / "model.pt")["state_dict"]
    assert ours.keys() == paper.keys() and all(torch.equal(ours[k], paper[k]) for k in ours)


def test_a_twin_whose_checkpoint_has_no_digest_is_not_copied(world, rows, capsys, caplog):
    twin = rows / TRAINED / "train"
    state = load_torch(twin / "checkpoint.pt")
    del state[DIGEST_KEY]
    torch.save(state, twin / "checkpoint.pt")
    with caplog.at_level(logging.INFO, "msvlad.training.rundir"):
        argv = _train_argv(world, rows, WIDE, "--max-steps", "0")
        assert run_cli(argv, capsys)[0] == 0
    assert "no sha256 checksum" in caplog.text and "copied from there" not in caplog.text
    assert not (rows / WIDE / "train" / "model.pt").exists()  # trained itself: at step 0
    assert load_torch(rows / WIDE / "train" / "checkpoint.pt")["step"] == 0


@pytest.fixture(scope="module")
def evaluated(world: World) -> Path:
    """An evaluation output every refused command must leave as it was."""
    out = world.root / "evaluated"
    assert main(["evaluate", *world.args("--checkpoint", str(world.model), "--out", str(out))]) == 0
    return out


def _refused_everywhere(world, model: Path, evaluated: Path, tmp_path, capsys, *named) -> None:
    """evaluate, whiten and train --init of `model`: each one line naming it, nothing written."""
    before = snapshot(evaluated)
    argv = ["evaluate", *world.args("--checkpoint", str(model), "--out", str(evaluated))]
    assert_error(*run_cli(argv, capsys), "evaluate", str(model), *named)
    assert snapshot(evaluated) == before
    out = tmp_path / "whitened.pt"
    argv = ["whiten", *world.args("--checkpoint", str(model), "--out", str(out))]
    assert_error(*run_cli(argv, capsys), "whiten", str(model), *named)
    assert not out.exists()
    run = tmp_path / "run"
    argv = ["train", *world.args("--init", str(model), "--out", str(run))]
    assert_error(*run_cli(argv, capsys), "train", str(model), *named)
    assert not [p.name for p in run.iterdir() if p.name != ".lock"]


def test_model_file_without_its_digest_is_refused(world, evaluated, tmp_path, capsys):
    model = tmp_path / "model.pt"
    shutil.copy(world.model, model)
    _strip_digest_and_zero(model)
    _refused_everywhere(world, model, evaluated, tmp_path, capsys, "no sha256 checksum")


def test_checkpoint_without_its_digest_is_not_resumed(world, rows, capsys):
    run = rows / TRAINED / "train"
    state = load_torch(run / "checkpoint.pt")
    del state[DIGEST_KEY]
    torch.save(state, run / "checkpoint.pt")
    before = snapshot(run)
    code, lines = run_cli(_train_argv(world, rows, TRAINED, "--set", "train.epochs=3"), capsys)
    assert_error(code, lines, "train", "checkpoint.pt", "no sha256 checksum")
    assert snapshot(run) == before


# ----------------------------------------------------------------------------- initial models


@pytest.fixture(scope="module")
def lite1(world: World) -> Path:
    """An EfficientNet-Lite1 model while the params say Lite0 (everything else the same)."""
    params = load_params(world.params)
    import dataclasses

    config = dataclasses.replace(params.model, backbone="efficientnet_lite1")
    return save_model(build_model(config), world.root / "lite1.pt")


BACKBONE_DIFF = (
    "model.backbone: 'efficientnet_lite1' in the file, 'efficientnet_lite0' in the params"
)


def test_init_of_another_network_is_refused(world, lite1, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", *world.args("--init", str(lite1), "--out", str(run))]
    assert_error(*run_cli(argv, capsys), "train", str(lite1), BACKBONE_DIFF)
    assert not [p.name for p in run.iterdir() if p.name != ".lock"]  # no run.json recording Lite0
    argv = ["train", *world.args("--method", "msvlad-ots", "--init", str(lite1), "--out", str(run))]
    assert_error(*run_cli(argv, capsys), "train", str(lite1), BACKBONE_DIFF)
    assert not [p.name for p in run.iterdir() if p.name != ".lock"]


def test_method_row_of_another_network_is_refused_by_whiten_and_evaluate(
    world, lite1, evaluated, tmp_path, capsys
):
    before = snapshot(evaluated)
    argv = ["evaluate", *world.args("--method", TRAINED, "--checkpoint", str(lite1))]
    code, lines = run_cli([*argv, "--out", str(evaluated)], capsys)
    assert_error(code, lines, "evaluate", "model.backbone", str(lite1), "efficientnet_lite1")
    assert snapshot(evaluated) == before
    out = tmp_path / "w.pt"
    argv = [
        "whiten",
        *world.args("--method", TRAINED, "--checkpoint", str(lite1), "--out", str(out)),
    ]
    assert_error(*run_cli(argv, capsys), "whiten", "model.backbone", str(lite1))
    assert not out.exists()


# ----------------------------------------------------------------------------- one-line errors


DIVERGENCES = {
    # name: (--set overrides, the step named, the cause named)
    "huge rate, pool": (["train.lr=1e12", "train.lr_start=1e12"], 1, "pool descriptors of round 1"),
    "rate beyond float32": (["train.lr=1e38", "train.lr_start=1e38"], 1, "overflows float32"),
    # step 1 at 1e-6, step 2 at 1e12: the epoch's validation is the first to see it
    "huge rate, validation": (
        ["train.lr=2e12", "train.lr_start=1e-6", "train.warmup_steps=2"],
        2,
        "the validation descriptors are NaN or inf",
    ),
}


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_divergence_before_a_checkpoint(world, tmp_path, capsys, name):
    sets, step, cause = DIVERGENCES[name]
    run = tmp_path / "run"
    rates = [a for s in sets for a in ("--set", s)]
    argv = ["train", *world.args("--init", str(world.model), "--out", str(run), *rates)]
    code, lines = run_cli(argv, capsys)
    assert_error(code, lines, "train", str(run), f"training diverged at step {step} (", cause)
    assert "no checkpoint was written yet" in lines[0] and "train.lr" in lines[0]
    assert not (run / "model.pt").exists() and not (run / "checkpoint.pt").exists()


@pytest.fixture(scope="module")
def half_run(world: World) -> Path:
    """A run stopped at its step-2 checkpoint."""
    run = world.root / "half"
    argv = ["train", *world.args("--init", str(world.model), "--out", str(run), "--max-steps", "2")]
    assert main(argv) == 0
    return run


def test_divergence_keeps_the_last_good_checkpoint(world, half_run, tmp_path, monkeypatch, capsys):
    import msvlad.training.trainer as trainer

    run = tmp_path / "run"
    shutil.copytree(half_run, run)
    kept = (run / "checkpoint.pt").read_bytes()
    real = trainer.triplet_loss
    steps = []

    def nan_at_step_3(*args, **kwargs):
        steps.append(None)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(steps) == 1 else loss  # the first step of the resume

    monkeypatch.setattr(trainer, "triplet_loss", nan_at_step_3)
    argv = ["train", *world.args("--init", str(world.model), "--out", str(run))]
    code, lines = run_cli(argv, capsys)
    assert_error(code, lines, "train", str(run), "training diverged at step 3 (its loss became NaN")
    assert "checkpoint.pt keeps step 2" in lines[0]
    assert (run / "checkpoint.pt").read_bytes() == kept and not (run / "model.pt").exists()
    monkeypatch.undo()
    assert run_cli(argv, capsys)[0] == 0  # the kept checkpoint resumes
    _assert_model_of_checkpoint(run, 4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without CUDA")
def test_cuda_asked_on_a_cpu_only_host(world, tmp_path, capsys):
    cuda = ["--set", "base.device=cuda"]
    run, init = tmp_path / "run", tmp_path / "init.pt"
    argv = ["train", *world.args("--init", str(world.model), "--out", str(run), *cuda)]
    assert_error(*run_cli(argv, capsys), "train", "base.device", "no CUDA device")
    assert not (run / "run.json").exists()
    argv = ["cluster", *world.args("--out", str(init), *cuda)]
    assert_error(*run_cli(argv, capsys), "cluster", "base.device", "no CUDA device")
    assert not init.exists()


@pytest.fixture
def unreadable(world: World, tmp_path: Path) -> World:
    """The world with every training image replaced by bytes that are no image."""
    shutil.copytree(world.data, tmp_path / "data")
    for path in (tmp_path / "data" / "train").rglob("*.jpg"):
        path.write_bytes(b"not a jpeg at all")
    raw = yaml.safe_load(world.params.read_text())
    raw["data"]["root"] = str(tmp_path / "data")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    return World(tmp_path, tmp_path / "data", tmp_path / "params.yaml", world.model)


@pytest.mark.parametrize("frozen", [0, 2])  # 2: through the frozen-trunk cache
def test_every_training_image_unreadable_in_train(unreadable, capsys, frozen):
    w, run = unreadable, unreadable.root / "run"
    argv = ["train", *w.args("--init", str(w.model), "--out", str(run))]
    code, lines = run_cli([*argv, "--set", f"train.frozen_stages={frozen}"], capsys)
    assert_error(code, lines, "train", str(w.data / "train"), "could not be read")
    assert not (run / "checkpoint.pt").exists() and not (run / "model.pt").exists()


def test_every_training_image_unreadable_in_cluster(unreadable, capsys):
    out = unreadable.root / "init.pt"
    code, lines = run_cli(["cluster", *unreadable.args("--out", str(out))], capsys)
    assert_error(code, lines, "cluster", str(unreadable.data / "train"), "could be read")
    assert not out.exists()


def test_state_dict_that_is_a_list(world, evaluated, tmp_path, capsys):
    state = load_torch(world.model)
    model = tmp_path / "listed.pt"
    save_torch(model, {"config": state["config"], "state_dict": list(state["state_dict"].values())})
    _refused_everywhere(world, model, evaluated, tmp_path, capsys, "state_dict: list")


@pytest.fixture(scope="module")
def frozen_run(world: World) -> Path:
    """A run of another frozen depth (train.frozen_stages=1) stopped at its step-2 checkpoint."""
    run = world.root / "frozen1"
    extra = ("--max-steps", "2", "--set", "train.frozen_stages=1")
    assert main(["train", *world.args("--init", str(world.model), "--out", str(run), *extra)]) == 0
    return run


def test_checkpoint_of_another_frozen_depth(world, half_run, frozen_run, tmp_path, capsys):
    """A foreign checkpoint whose recorded parameters were made to match: its optimiser state
    is of another set of trainable weights."""
    run = tmp_path / "run"
    shutil.copytree(half_run, run)
    foreign = load_torch(frozen_run / "checkpoint.pt")
    foreign["params"] = load_torch(half_run / "checkpoint.pt")["params"]
    save_torch(run / "checkpoint.pt", foreign)  # a valid checksum: intact, but not this run's
    before = snapshot(run)
    argv = ["train", *world.args("--init", str(world.model), "--out", str(run))]
    code, lines = run_cli(argv, capsys)
    assert_error(code, lines, "train", str(run / "checkpoint.pt"), "does not fit this run")
    assert snapshot(run) == before


def test_a_model_file_as_checkpoint(world, half_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(half_run, run)
    shutil.copy(world.model, run / "checkpoint.pt")
    before = snapshot(run)
    argv = ["train", *world.args("--init", str(world.model), "--out", str(run))]
    code, lines = run_cli(argv, capsys)
    assert_error(
        code, lines, "train", "checkpoint.pt", "not a msvlad training checkpoint (no 'step')"
    )
    assert snapshot(run) == before


# ----------------------------------------------------------------------------- dvc


DVC_YAML = """\
stages:
  train:
    cmd: python -m msvlad train --method msvlad --init init.pt --out train --restart=if-changed
    deps: [init.pt]
    params: [methods.msvlad, train, miner]
    outs:
      - train:
          persist: true
"""


@pytest.mark.slow
def test_dvc_repro_with_miner_null_then_reverted(world, tmp_path):
    """`dvc repro -s` of a row after `miner: null` is set in params.yaml, then reverted."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(world.model, project / "init.pt")
    params = world.params.read_text()
    (project / "params.yaml").write_text(params)
    (project / "dvc.yaml").write_text(DVC_YAML)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "lib"), env.get("PYTHONPATH", "")])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    dvc = shutil.which("dvc", path=str(Path(sys.executable).parent)) or "dvc"

    def run(*args: str) -> str:
        proc = subprocess.run(
            [dvc, *args], cwd=project, env=env, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return proc.stdout

    run("init", "--no-scm", "-q")
    run("repro", "-s", "train")
    trained = (project / "train" / "model.pt").read_bytes()
    raw = yaml.safe_load(params)
    raw["methods"]["msvlad"]["miner"] = None
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    run("repro", "-s", "train")
    assert (project / "train" / "model.pt").read_bytes() == (project / "init.pt").read_bytes()
    (project / "params.yaml").write_text(params)
    run("repro", "-s", "train")
    assert (project / "train" / "model.pt").read_bytes() == trained
    assert "Data and pipelines are up to date" in run("status")
