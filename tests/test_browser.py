"""The explorers in a real browser (JupyterLab + headless Chromium), and the README's workflow
(open, run and save the notebooks) leaving `git status` and `dvc status` clean."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fixtures_runs import DATASET, make_run_tree
from jupyterlab_browser import (
    RANKINGS_READY,
    ROOT,
    TRIPLETS_READY,
    choose,
    chromium_page,
    jupyterlab,
    missing_browser,
    run_all,
    save,
    wait_text,
    write_notebook,
)
from msvlad.data.testsets import load_dataset

pytestmark = [
    pytest.mark.slow,
    pytest.mark.browser,
    pytest.mark.skipif(missing_browser() is not None, reason=f"browser test: {missing_browser()}"),
]


def _shown(ranks: np.ndarray, q: int, junk: set[int], k: int) -> list[tuple[str, int]]:
    """A list as the summary shows it: ('#r', index) or ('junk', index), junk not counted."""
    out, rank = [], 0
    for i in ranks[:, q].tolist():
        if i in junk:
            if rank < k:
                out.append(("junk", i))
            continue
        rank += 1
        if rank > k:
            break
        out.append((f"#{rank}", i))
    return out


def test_rankings_explorer_in_jupyterlab_follows_menus_and_clicks(tmp_path: Path) -> None:
    tree = make_run_tree(tmp_path / "tree")
    lab = tmp_path / "lab"
    lab.mkdir()
    write_notebook(
        "rankings",
        lab,
        {
            "params_file": str(tree.params_file),
            "results_dir": str(tree.results_dir),
            "reports_dir": str(tmp_path / "reports"),
            "top_k": 5,
        },  # `interactive` keeps its default: widgets
    )
    ranks = np.load(tree.results_dir / "msvlad" / DATASET / "ranks.npy")
    dataset = load_dataset(tree.data_root, DATASET)
    t0 = time.monotonic()
    with jupyterlab(lab) as url, chromium_page() as page:
        summary = page.locator(".msvlad-rankings-summary")
        run_all(page, url, "rankings.ipynb", RANKINGS_READY)
        menu = page.locator(".msvlad-query select")
        first = menu.evaluate("s => s.options[s.selectedIndex].text").replace("\u00a0", " ")
        assert summary.inner_text().startswith(f"query {first.split(' · ')[0]}")
        # pick another query from the menu: the page must show that query's ranked list
        label = menu.evaluate("s => s.options[s.selectedIndex === 0 ? 1 : 0].text")
        name = label.replace("\u00a0", " ").split(" · ")[0]  # the menu shows nbsp
        menu.select_option(label=label)
        q = dataset.qimlist.index(name)
        wait_text(page, ".msvlad-rankings-summary", f"query {name}")
        text = summary.inner_text()
        junk = {int(i) for i in dataset.gnd[q]["junk"]}
        shown = _shown(ranks, q, junk, 5)
        positions = [text.index(f"{tag}\u00a0{dataset.imlist[i]}") for tag, i in shown]
        assert positions == sorted(positions)  # every shown image, in rank order
        # the tiles: one per shown result; a click makes that image the query
        tiles = page.locator(".msvlad-tiles").first.locator(".msvlad-tile")
        assert tiles.count() == len(shown)
        tiles.first.locator(".msvlad-tile-button").click()
        wait_text(page, ".msvlad-rankings-summary", f"clicked image {dataset.imlist[shown[0][1]]}")
        assert "own photo" in page.locator(".msvlad-rankings").inner_text()
        page.locator(".msvlad-control-back").click()
        wait_text(page, ".msvlad-rankings-summary", f"query {name}")
        # another descriptor: +DBA rankings, no error line
        choose(page, "variant", "+DBA")
        wait_text(page, ".msvlad-rankings-summary", "+DBA")
        assert page.locator(".msvlad-error").inner_text().strip() == ""
        assert page.locator("img.msvlad-map").count() == 1  # the map beside the query
    print(f"browser test: {time.monotonic() - t0:.1f} s")


def _venv_path() -> str:
    """PATH with this interpreter's bin first: dvc.yaml's `python -m msvlad` must find the venv."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def _run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": _venv_path()}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{cmd}: {done.stdout}{done.stderr}"
    return done.stdout


def _project_tree(root: Path) -> Path:
    """A checkout as a user has it after `dvc repro`: code, notebooks, the Jupyter config,
    results; committed to git, the report stage locked by DVC on the notebooks."""
    make_run_tree(root)  # data/, results/evaluate/, runs/, params.yaml at the root
    shutil.copytree(ROOT / "lib", root / "lib", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("notebooks", ".jupyter"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns(".ipynb_*"))
    for name in (".gitignore", ".dvcignore"):
        shutil.copyfile(ROOT / name, root / name)
    (root / "dvc.yaml").write_text(
        "stages:\n  report:\n    cmd: python -c \"print('report')\"\n    deps:\n      - notebooks\n"
    )
    dvc = [sys.executable, "-m", "dvc"]
    _run(["git", "init", "-q"], root)
    _run([*dvc, "init", "-q"], root)
    _run([*dvc, "config", "core.analytics", "false"], root)
    _run([*dvc, "repro", "-q"], root)
    _run(["git", "add", "-A"], root)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tree"], root)
    return root


def test_readme_workflow_leaves_git_and_dvc_clean(tmp_path: Path) -> None:
    root = _project_tree(tmp_path / "checkout")
    dvc = [sys.executable, "-m", "dvc"]
    assert "up to date" in _run([*dvc, "status"], root)
    stored = {n: (root / "notebooks" / f"{n}.ipynb").read_bytes() for n in ("rankings", "triplets")}
    # README: JUPYTER_CONFIG_PATH=$PWD/.jupyter .venv/bin/jupyter lab notebooks/
    env = {"PYTHONPATH": str(root / "lib"), "PATH": _venv_path()}  # the checkout's own msvlad
    with (
        jupyterlab(root, serve="notebooks/", config=root / ".jupyter", env=env) as url,
        chromium_page() as page,
    ):
        for name, ready in (("rankings", RANKINGS_READY), ("triplets", TRIPLETS_READY)):
            run_all(page, url, f"{name}.ipynb", ready)
            assert page.locator(".jp-OutputArea-output").count() > 3  # outputs in the page
            save(page)
    assert (root / "notebooks" / ".ipynb_checkpoints").is_dir()  # JupyterLab did write there
    for name, data in stored.items():
        assert (root / "notebooks" / f"{name}.ipynb").read_bytes() == data, name
    assert _run(["git", "status", "--porcelain"], root) == ""
    assert "up to date" in _run([*dvc, "status"], root)
    assert not (root / "reports").exists()  # Run All in JupyterLab writes no report figures
