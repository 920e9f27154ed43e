"""The ablation grid: queued commands, the values' override grammar, collecting experiments."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from msvlad.cli import main
from msvlad.config import load_params
from msvlad.report import ablations
from msvlad.report.ablations import GridError
from msvlad.stages import ablate

SETUPS = ("easy", "medium", "hard")

# ----------------------------------------------------------------------------- queueing


@pytest.mark.parametrize(
    ("text", "values"),
    [
        ("0.02,0.04,0.06", [0.02, 0.04, 0.06]),
        ("[2],[3],[2,3]", [[2], [3], [2, 3]]),
        ("null, 80,160", [None, 80, 160]),
        ("5", [5]),
    ],
)
def test_values_are_yaml_items(text, values):
    assert ablate.parse_values("axis", text) == values


@pytest.mark.parametrize("text", ["", "[2", "a: b: c"])
def test_bad_values_name_the_option(text):
    with pytest.raises(GridError, match="--values"):
        ablate.parse_values("miner.delta", text)


def test_queue_commands_target_one_row_and_skip_its_own_value(repo_root):
    params = repo_root / "params.yaml"
    own = load_params(params).miner.delta
    cmds = ablate.queue_commands(params, "miner.delta", [0.02, own, 0.06])
    assert cmds == [
        [
            *("dvc", "exp", "run", "--queue", "-n", f"msvlad-miner-delta-{v}"),
            *("-C", "data/mini", "-S", f"miner.delta={v}", "evaluate@msvlad"),
        ]
        for v in (0.02, 0.06)
    ]
    windows = ablate.queue_commands(params, "model.pool_sizes", [[2], [3], [2, 3]])
    assert [c[5] for c in windows] == ["msvlad-model-pool_sizes-2", "msvlad-model-pool_sizes-3"]
    assert [c[9] for c in windows] == ["model.pool_sizes=[2]", "model.pool_sizes=[3]"]
    split = ablate.queue_commands(params, "model.split", [None, 80])
    assert [c[9] for c in split] == ["model.split=null", "model.split=80"]
    assert split[0][5] == "msvlad-model-split-none"


@pytest.mark.parametrize(
    ("axis", "value", "method", "message"),
    [
        ("miner.nope", 1, "msvlad", "--axis miner.nope: not a section.key"),
        ("data.root", "x", "msvlad", "--axis data.root: not a section.key"),
        ("miner.delta", -1.0, "msvlad", r"--values miner.delta=-1.0: .*must be > 0"),
        ("model.split", 7, "msvlad", "model.split=7 must divide the backbone's 320 channels"),
        ("model.vlad_norm", "intra", "msvlad-alt-norm", "methods.msvlad-alt-norm.set fixes it"),
        ("miner.delta", 0.02, "nosuchrow", "--method nosuchrow: not a row"),
    ],
)
def test_a_point_that_cannot_run_is_refused_before_queueing(
    repo_root, axis, value, method, message
):
    with pytest.raises(GridError, match=message):
        ablate.queue_commands(repo_root / "params.yaml", axis, [value], method)


@pytest.mark.parametrize(
    ("axis", "value"),
    [
        ("miner.delta", 0.02),
        ("model.pool_sizes", [2]),
        ("model.pool_sizes", [2, 3, 4]),
        ("model.split", None),
        ("model.num_clusters", 16),
        ("miner.semi_hard_prob", 0.75),
        ("cluster.kmeans", "sklearn_minibatch"),
        ("train.amp", False),
    ],
)
def test_override_text_reaches_params_yaml_as_the_value(tmp_path, repo_root, axis, value):
    """The -S text, applied as `dvc exp run` applies it, gives back the value in params.yaml."""
    from dvc.utils.hydra import apply_overrides

    params = tmp_path / "params.yaml"
    shutil.copy(repo_root / "params.yaml", params)
    apply_overrides(params, [f"{axis}={ablate.override_text(value)}"])
    section, _, key = axis.partition(".")
    assert getattr(getattr(load_params(params), section), key) == value
    assert yaml.safe_load(params.read_text())[section][key] == value


def test_cli_dry_run_prints_the_queue_and_bad_input_exits_2(repo_root, capsys):
    p = ["--params", str(repo_root / "params.yaml")]
    assert (
        main(["ablate", "queue", *p, "--axis", "miner.delta", "--values", "0.02", "--dry-run"]) == 0
    )
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (
        "dvc exp run --queue -n msvlad-miner-delta-0.02 -C data/mini -S miner.delta=0.02 "
        "evaluate@msvlad"
    )
    assert main(["ablate", "queue", *p, "--axis", "miner.delta", "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == (
        "msvlad ablate: error: ablate queue: --axis and --values are both needed"
    )
    assert main(["ablate", "queue", *p, "--axis", "model.split", "--values", "7", "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == (
        "msvlad ablate: error: --values model.split=7: model.split=7 must divide the "
        "backbone's 320 channels"
    )


# ----------------------------------------------------------------------------- collecting


def _metrics(e: float, m: float, h: float, p10: float) -> str:
    setups = {"easy": e, "medium": m, "hard": h}
    plain = {
        "mAP": setups,
        "mP@k": {s: {"1": 100.0, "5": 90.0, "10": p10 + i} for i, s in enumerate(setups)},
    }
    return json.dumps({"mini-test": {"plain": plain, "raw": plain}})


def _log(*vals: float) -> str:
    rows = "".join(f"{i},{i * 20},1e-4,0.1,10,2,30,{v},1.0\n" for i, v in enumerate(vals))
    return "epoch,step,lr,loss,triplets,rounds,yield,val_map,seconds\n" + rows


def _entry(rev: str, raw: dict, name: str | None = None) -> dict:
    return {"rev": rev, "name": name, "data": {"params": {"params.yaml": {"data": raw}}}}


@pytest.fixture
def grid(repo_root):
    """exp show output and files: the baseline, two delta points (one without results), one
    windows point, one experiment changing two keys, one failed."""
    base = yaml.safe_load((repo_root / "params.yaml").read_text())
    base["miner"]["delta"] = 0.04

    def changed(**keys):
        raw = json.loads(json.dumps(base))
        for dotted, v in keys.items():
            section, key = dotted.split("__")
            raw[section][key] = v
        return raw

    exps = {
        "d02": changed(miner__delta=0.02),
        "d06": changed(miner__delta=0.06),  # its results are not in the cache: left out
        "w2": changed(model__pool_sizes=[2]),
        "two": changed(miner__delta=0.1, model__num_clusters=8),
    }
    show = [
        {"rev": "workspace", "name": None, "data": {}, "experiments": None},
        {
            **_entry("base0", base, "main"),
            "experiments": [
                {"name": n, "revs": [{**_entry(n + "-rev", raw, n), "error": None}]}
                for n, raw in exps.items()
            ]
            + [{"name": "failed", "revs": [{"rev": "f", "data": {}, "error": {"msg": "x"}}]}],
        },
    ]
    runs = {"base0": (70.0, 55.0, 30.0, 50.0), "d02-rev": (71.5, 56.25, 31.0, 52.0)}
    runs |= {"w2-rev": (69.0, 54.0, 28.5, 49.0), "two-rev": (1.0, 1.0, 1.0, 1.0)}
    files = {}
    for rev, nums in runs.items():
        files[(rev, "results/evaluate/msvlad/metrics.json")] = _metrics(*nums)
        files[(rev, "results/evaluate/msvlad/manifest.json")] = json.dumps(
            {"code": {"commit": f"abc123 {rev}"}}
        )
        files[(rev, "runs/msvlad/train/log.csv")] = _log(60.0, nums[1] + 1, math.nan)
    return show, files


def test_collect_makes_one_row_per_point_with_the_baseline_as_default(grid, caplog):
    show, files = grid
    with caplog.at_level("WARNING"):
        table = ablate.collect(show, lambda rev, path: files.get((rev, path)))
    assert list(table.columns) == ablations.COLUMNS
    got = table[["axis", "value", "default", "experiment", "rev"]].values.tolist()
    assert got == [
        ["miner.delta", "0.02", False, "d02", "d02-rev"],
        ["miner.delta", "0.04", True, "main", "base0"],
        ["model.pool_sizes", "[2]", False, "w2", "w2-rev"],
        ["model.pool_sizes", "[2, 3]", True, "main", "base0"],
    ]
    d02 = table.iloc[0]
    assert (d02["E"], d02["M"], d02["H"], d02["mP@10 E"], d02["mP@10 H"]) == (
        71.5,
        56.25,
        31.0,
        52.0,
        54.0,
    )
    assert math.isnan(d02["all"]) and d02["val_mAP"] == 57.25  # the last validation recorded
    assert d02["code"] == "abc123 d02-rev" and d02["dataset"] == "mini-test"
    run = json.loads(d02["params"])
    assert run["miner"]["delta"] == 0.02 and run["model"]["pooling"] == "msvlad"
    assert "methods" not in run and json.loads(table.iloc[2]["params"])["model"]["pool_sizes"] == [
        2
    ]
    assert "two: changes ['miner.delta', 'model.num_clusters'], not one grid axis" in caplog.text


def test_collect_for_given_axes_and_without_a_baseline(grid):
    show, files = grid
    table = ablate.collect(show, lambda r, p: files.get((r, p)), axes=["miner.threshold"])
    assert set(zip(table["axis"], table["default"], strict=True)) == {
        ("miner.delta", False),
        ("model.pool_sizes", False),
        ("miner.threshold", True),
    }
    with pytest.raises(GridError, match="no baseline commit"):
        ablate.collect(show[:1], lambda r, p: None)


def test_table_round_trip_and_missing_file(grid, tmp_path):
    show, files = grid
    table = ablate.collect(show, lambda rev, path: files.get((rev, path)))
    path = ablations.write_table(table, tmp_path / "abl" / "mini.csv")
    back = ablations.load_table(path)
    pd.testing.assert_frame_equal(back, table, check_dtype=False)
    assert back["value"].tolist() == ["0.02", "0.04", "[2]", "[2, 3]"]
    empty = ablations.load_table(tmp_path / "none.csv")
    assert empty.empty and list(empty.columns) == ablations.COLUMNS
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(GridError, match="bad.csv: not an ablation table"):
        ablations.load_table(tmp_path / "bad.csv")


def test_views_mark_the_default_and_draw_one_panel_per_axis(grid):
    show, files = grid
    table = ablate.collect(show, lambda rev, path: files.get((rev, path)))
    view = ablations.points_table(table)
    assert view["value"].tolist() == ["0.02", "0.04 *", "[2]", "[2, 3] *"]
    assert {"E", "M", "H", "mP@10 M"} <= set(view.columns) and "all" not in view.columns
    fig = ablations.plot_axes(table)
    assert len(fig.axes) == 2
    for ax, values in zip(fig.axes, (["0.02", "0.04"], ["[2]", "[2, 3]"]), strict=True):
        assert [t.get_text() for t in ax.get_xticklabels()] == values
        lines = {ln.get_label(): list(np.asarray(ln.get_ydata())) for ln in ax.get_lines()}
        assert {
            "mini-test E",
            "mini-test M",
            "mini-test H",
            "validation mAP (end of training)",
        } <= set(lines)
        default = [ln for ln in ax.get_lines() if ln.get_linestyle() == ":"]
        assert len(default) == 1 and default[0].get_xdata()[0] == 1  # the baseline's value
    assert list(fig.axes[0].get_lines()[1].get_ydata()) == [56.25, 55.0]  # M per delta
    blank = ablations.plot_axes(ablations.load_table(Path("/nonexistent/mini.csv")))
    assert "no ablation grid" in blank.texts[0].get_text()


# ----------------------------------------------------------------------------- end to end


def _stage_commands(repo: Path, method: str) -> list[str]:
    """The row's chain as dvc.yaml runs it (train: k-means, training, whitening; evaluate)."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    return [stages[s]["do"]["cmd"].replace("${key}", method) for s in ("train", "evaluate")]


def _tiny_repo(scratch: Path, repo_root: Path) -> Path:
    """A git + DVC copy of the tree on tiny data (two rows), the paper row's chain reproduced."""
    from rehearsal import environment, make_workspace
    from tinydata import make_retrieval_set, make_train_set

    ws = make_workspace(scratch / "repo", repo_root)
    data = ws / "data" / "mini"  # an ignored folder, as data.root is
    make_train_set(data / "train", num_classes=6, per_class=5)
    make_retrieval_set(data, "val", num_scenes=3)
    make_retrieval_set(data, "test", num_scenes=4, seed=7)
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw["base"]["device"] = "cpu"
    raw["data"].update(train_set="train", val_set="val", test_sets=["test"])
    raw["model"].update(image_size=64, num_clusters=4)
    raw["cluster"].update(num_images=20, max_locals=2000)
    raw["miner"].update(pool_size=24, images_per_class=4, triplets_per_round=6, delta=0.5)
    raw["train"].update(steps_per_epoch=2, epochs=2, checkpoint_every=2, warmup_steps=1)
    raw["whiten"].update(num_images=30, dim=8)
    raw["extract"].update(scales=[1.0], image_size=None, resize=None)
    raw["methods"] = {k: raw["methods"][k] for k in ("msvlad", "msvlad-ots")}
    (ws / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = environment(ws)
    for cmd in (
        "dvc commit -f -q prepare",  # the tiny data stands for prepare's output
        "dvc repro -q evaluate@msvlad evaluate@msvlad-ots",
        "git add -A",
        "git commit -q -m baseline",
    ):
        subprocess.run(cmd.split(), cwd=ws, env=env, check=True, capture_output=True)
    return ws


def _wait_for(ws: Path, env: dict[str, str], name: str, polls: int = 360) -> str:
    """The final status of a queued experiment (`dvc queue status`, polled every 5 s)."""
    for _ in range(polls):
        status = subprocess.run(
            [sys.executable, "-m", "dvc", "queue", "status"],
            cwd=ws,
            env=env,
            capture_output=True,
            text=True,
        ).stdout
        line = next((ln.split() for ln in status.splitlines() if f" {name} " in ln), [])
        if line and line[-1] in ("Success", "Failed"):
            return line[-1]
        time.sleep(5)
    return "still running"


@pytest.mark.slow  # about 2 min on 2 cores: a tiny DVC repository, one queued experiment
def test_a_queued_point_reruns_only_its_row_and_is_collected(tmp_path, repo_root):
    from rehearsal import environment

    ws = _tiny_repo(tmp_path, repo_root)
    env = environment(ws)
    msvlad = [sys.executable, "-m", "msvlad"]
    run = subprocess.run(
        [*msvlad, "ablate", "queue", "--axis", "miner.delta", "--values", "0.3,0.5"],
        cwd=ws,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    name = "msvlad-miner-delta-0.3"
    assert run.stdout.splitlines()[0].startswith(f"dvc exp run --queue -n {name} ")
    assert len(run.stdout.splitlines()) == 2  # 0.5 is the baseline's own value: not queued
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "queue", "start", "-j", "1"], cwd=ws, env=env, check=True)
    assert _wait_for(ws, env, name) == "Success"
    logs = subprocess.run(
        [*dvc, "queue", "logs", name], cwd=ws, env=env, capture_output=True, text=True
    ).stdout
    ran = re.findall(r"Running stage '([^']+)'", logs)
    assert ran == ["train@msvlad", "evaluate@msvlad"], logs[-3000:]
    assert "Stage 'prepare' didn't change" in logs  # the data root copied in (-C), not rebuilt
    # a second queue call finds the point done and queues nothing
    again = subprocess.run(
        [*msvlad, "ablate", "queue", "--axis", "miner.delta", "--values", "0.3"],
        cwd=ws,
        env=env,
        capture_output=True,
        text=True,
    )
    assert again.stdout.startswith("every point is queued or done already"), again.stderr
    out = ws / "results" / "ablations" / "mini.csv"
    run = subprocess.run(
        [*msvlad, "ablate", "collect", "--out", str(out)], cwd=ws, env=env, capture_output=True
    )
    assert run.returncode == 0, run.stderr
    table = ablations.load_table(out)
    assert table[["axis", "value", "default"]].values.tolist() == [
        ["miner.delta", "0.3", False],
        ["miner.delta", "0.5", True],
    ]
    # the baseline's point is the workspace's own result (read back from DVC's cache)
    plain = json.loads((ws / "results/evaluate/msvlad/metrics.json").read_text())["test"]["plain"]
    base = table[table["default"]].iloc[0]
    assert [base["E"], base["M"], base["H"]] == [plain["mAP"][s] for s in SETUPS]
    point = table[~table["default"]].iloc[0]
    assert json.loads(point["params"])["miner"]["delta"] == 0.3
    # the code: the last commit that changed lib/, at the baseline and at the point alike
    lib = subprocess.run(
        ["git", "log", "-1", "--format=%H", "--", "lib"], cwd=ws, capture_output=True, text=True
    ).stdout.strip()
    assert point["code"] == base["code"] == lib and point["rev"] != base["rev"]
    assert not math.isnan(point["val_mAP"])


@pytest.mark.slow  # two trainings of the paper row on the mini benchmark: minutes
@pytest.mark.parametrize(("axis", "value"), [("miner.delta", 0.02), ("model.pool_sizes", [2])])
def test_shipped_grid_points_are_reproduced(tmp_path, repo_root, axis, value):
    """Two points of results/ablations/mini.csv re-created with the row's stage commands (same
    seed, CPU, one thread): the same numbers, to the two decimals metrics.json keeps."""
    from dvc.utils.hydra import apply_overrides

    params = load_params(repo_root / "params.yaml")
    table = ablations.load_table(ablations.table_path(repo_root / "results" / "ablations", params))
    shipped = table[(table["axis"] == axis) & (table["value"] == ablations.value_text(value))]
    assert len(shipped) == 1, (axis, value)
    data = repo_root / params.data.root
    if not all((data / d).is_dir() for d in (params.data.train_set, *params.data.test_sets)):
        pytest.skip(f"{data}: the mini benchmark is not prepared (dvc repro prepare)")
    (tmp_path / "data").symlink_to(repo_root / "data")
    shutil.copy(repo_root / "params.yaml", tmp_path / "params.yaml")
    apply_overrides(tmp_path / "params.yaml", [f"{axis}={ablate.override_text(value)}"])
    env = {**os.environ, "PYTHONPATH": str(repo_root / "lib"), "OMP_NUM_THREADS": "1"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    for cmd in _stage_commands(repo_root, "msvlad"):
        subprocess.run(shlex.split(cmd), cwd=tmp_path, env=env, check=True, capture_output=True)
    raw = yaml.safe_load((tmp_path / "params.yaml").read_text())

    def read(rev: str, path: str) -> str:  # the files this run wrote
        return (tmp_path / path).read_text()

    again = ablate.point_rows("msvlad", axis, value, False, "again", "", raw, read)
    expected = shipped.iloc[0]
    assert json.loads(again[0]["params"]) == json.loads(expected["params"])  # the same run
    for col in ("E", "M", "H", "mP@10 E", "mP@10 M", "mP@10 H", "val_mAP"):
        assert again[0][col] == expected[col], col
