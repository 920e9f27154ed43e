"""The rankings explorer in a real browser: JupyterLab + headless Chromium, a query changed."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from fixtures_runs import DATASET, make_run_tree
from jupyterlab_browser import chromium_page, jupyterlab, missing_browser, run_all, write_notebook
from msvlad.data.testsets import load_dataset

pytestmark = [
    pytest.mark.slow,
    pytest.mark.browser,
    pytest.mark.skipif(missing_browser() is not None, reason=f"browser test: {missing_browser()}"),
]


def test_rankings_notebook_in_jupyterlab_follows_the_query_menu(tmp_path: Path) -> None:
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
        },  # `interactive` stays None: the kernel finds out it runs under JupyterLab
    )
    ranks = np.load(tree.results_dir / "msvlad" / DATASET / "ranks.npy")
    dataset = load_dataset(tree.data_root, DATASET)
    t0 = time.monotonic()
    with jupyterlab(lab) as url, chromium_page() as page:
        summary = page.locator(".msvlad-rankings-summary")
        run_all(page, url, "rankings.ipynb", ".msvlad-rankings-summary .msvlad-ranked")
        menu = page.locator(".msvlad-query select")
        first = menu.evaluate("s => s.options[s.selectedIndex].text").replace("\u00a0", " ")
        assert summary.inner_text().startswith(f"query {first.split(' · ')[0]}")
        # pick another query from the menu: the page must show that query's ranked list
        label = menu.evaluate("s => s.options[s.selectedIndex === 0 ? 1 : 0].text")
        name = label.replace("\u00a0", " ").split(" · ")[0]  # the menu shows nbsp
        menu.select_option(label=label)
        q = dataset.qimlist.index(name)
        expected = [f"#{j + 1}\u00a0{dataset.imlist[i]}" for j, i in enumerate(ranks[:5, q])]
        page.wait_for_function(
            "([sel, want]) => document.querySelector(sel).innerText.startsWith(want)",
            arg=[".msvlad-rankings-summary", f"query {name}"],
            timeout=60_000,
        )
        text = summary.inner_text()
        positions = [text.index(e) for e in expected]  # every top-5 image, in rank order
        assert positions == sorted(positions)
        assert page.locator(".msvlad-rankings img").count() == 1
    print(f"browser test: {time.monotonic() - t0:.1f} s")
