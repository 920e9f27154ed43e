"""JupyterLab in headless Chromium: the browser test and the README screenshots use this.

`jupyterlab(root)` starts the project's JupyterLab (this interpreter's `jupyter lab`, so the
venv's `python3` kernel, with the project's `.jupyter` config) on a free local port with a random
token, its own state kept outside `root`; `chromium_page()` opens Debian's Chromium headless
through playwright (no downloaded browser); `run_all(page, ...)` opens a notebook and runs every
cell; `save(page)` saves it as Ctrl+S does; `write_notebook(...)` copies a notebook with its
parameters set, as papermill would. Screenshots of both explorers for the README:

    python tests/jupyterlab_browser.py --out docs/img \\
        --params-file params.yaml --results-dir results/evaluate --runs-dir runs
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium_path() -> str | None:
    """Debian's Chromium (`apt-get install -y chromium`), if installed."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def missing_browser() -> str | None:
    """Why the browser test cannot run here (None when it can)."""
    if chromium_path() is None:
        return "chromium not installed (apt-get install -y chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright not installed (pip install -e '.[dev]')"
    return None


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def jupyterlab(
    root: Path,
    timeout: float = 90.0,
    *,
    serve: str | None = None,
    config: Path = ROOT / ".jupyter",
    env: dict[str, str] | None = None,
) -> Iterator[str]:
    """JupyterLab started in `root`; yields the base URL with its token as a query (`?token=`).

    `serve` is the README's positional folder (`jupyter lab notebooks/`: that folder is served);
    None serves `root`. `config` is put on JUPYTER_CONFIG_PATH as the README's command does.
    """
    root = Path(root)
    token, port = secrets.token_hex(16), free_port()
    state = Path(tempfile.mkdtemp(prefix="msvlad-lab-"))  # never inside the served tree
    env = {
        **os.environ,
        **(env or {}),
        "JUPYTER_CONFIG_DIR": str(state / "config"),
        "JUPYTER_CONFIG_PATH": str(config),
        "JUPYTER_RUNTIME_DIR": str(state / "runtime"),
        "JUPYTER_DATA_DIR": str(state / "data"),  # no user kernelspecs: the venv's python3
    }
    cmd = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        f"--port={port}",
        "--port-retries=0",
        "--ip=127.0.0.1",
        f"--IdentityProvider.token={token}",
        serve if serve is not None else f"--ServerApp.root_dir={root}",
        "--LabApp.expose_app_in_browser=True",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        f"--LabApp.workspaces_dir={state / 'workspaces'}",
        f"--LabApp.user_settings_dir={state / 'settings'}",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # root (containers, CI) is refused without it
    settings = state / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True, exist_ok=True)  # no news / update toasts over the page
    (settings / "notification.jupyterlab-settings").write_text(
        '{"fetchNews": "false", "checkForUpdates": false, "doNotDisturbMode": true}'
    )
    log = (state / "server.log").open("w")
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"jupyter lab exited: {(state / 'server.log').read_text()[-2000:]}"
                )
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"jupyter lab not answering on {base} after {timeout:.0f} s")
            time.sleep(0.5)
        yield f"{base}?token={token}"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(state, ignore_errors=True)


@contextlib.contextmanager
def chromium_page(width: int = 1600, height: int = 1400) -> Iterator[Any]:
    """A playwright page in headless Chromium (the system binary, never a downloaded one)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            yield page
        finally:
            browser.close()


def write_notebook(name: str, dest_dir: Path, parameters: dict[str, Any]) -> Path:
    """notebooks/<name>.ipynb copied to dest_dir with `parameters` injected (papermill's cell)."""
    import nbformat
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    nb = load_notebook_node(str(ROOT / "notebooks" / f"{name}.ipynb"))
    nb = parameterize_notebook(nb, parameters)
    dest = Path(dest_dir) / f"{name}.ipynb"
    nbformat.write(nb, dest)
    return dest


def run_all(page: Any, url: str, notebook: str, ready: str, timeout: float = 240.0) -> None:
    """Open `notebook` (relative to the server root), run every cell, wait for `ready` to show."""
    base, query = url.split("?", 1)
    workspace = Path(notebook).stem  # a workspace of its own: nothing else reopens with it
    page.goto(f"{base}/lab/workspaces/{workspace}/tree/{notebook}?{query}", timeout=timeout * 1000)
    page.wait_for_function(
        "(path) => window.jupyterapp && window.jupyterapp.shell.currentWidget"
        " && window.jupyterapp.shell.currentWidget.context"
        " && window.jupyterapp.shell.currentWidget.context.path === path",
        arg=notebook,
        timeout=timeout * 1000,
    )
    page.evaluate(
        """async () => {
            const app = window.jupyterapp;
            const panel = app.shell.currentWidget;
            await panel.context.ready;
            await panel.sessionContext.ready;
            app.shell.collapseLeft();
            await app.commands.execute('notebook:run-all-cells');
        }"""
    )
    page.wait_for_selector(ready, state="visible", timeout=timeout * 1000)


def save(page: Any, timeout: float = 60.0) -> None:
    """Save the open notebook (File > Save) and wait until JupyterLab has written it."""
    page.evaluate(
        """async () => {
            const app = window.jupyterapp;
            await app.commands.execute('docmanager:save');
        }"""
    )
    page.wait_for_function(
        "() => !window.jupyterapp.shell.currentWidget.context.model.dirty",
        timeout=timeout * 1000,
    )


RANKINGS_READY = ".msvlad-rankings-summary .msvlad-ranked"
TRIPLETS_READY = ".msvlad-triplet-summary .msvlad-triplet"


def choose(page: Any, control: str, label: str) -> None:
    """Pick `label` in an explorer menu (its widget carries the class msvlad-control-<name>)."""
    page.locator(f".msvlad-control-{control} select").select_option(label=label)


def wait_text(page: Any, selector: str, text: str, timeout: float = 60.0) -> None:
    """Wait until the element's text contains `text` (a redraw finished)."""
    page.wait_for_function(
        "([sel, want]) => (document.querySelector(sel) || {innerText: ''})"
        ".innerText.includes(want)",
        arg=[selector, text],
        timeout=timeout * 1000,
    )


def screenshots(out: Path, parameters: dict[str, Any], workdir: Path) -> list[Path]:
    """README screenshots: the rankings explorer's first view, the same explorer after a failure
    filter, +QE and a click on a result (click-to-query, map by status), the triplet explorer."""
    out.mkdir(parents=True, exist_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    shots = []
    with jupyterlab(workdir) as url, chromium_page(height=2400) as page:
        write_notebook("rankings", workdir, parameters)
        run_all(page, url, "rankings.ipynb", RANKINGS_READY)
        page.wait_for_timeout(2000)  # images paint after the summary
        shots.append(out / "rankings_explorer.png")
        page.locator(".msvlad-rankings").screenshot(path=str(shots[-1]))
        choose(page, "failure", "junk or a negative above the first positive")
        choose(page, "variant", "+QE")
        wait_text(page, ".msvlad-rankings-summary", "+QE")
        choose(page, "colour", "status")
        page.locator(".msvlad-tiles").first.locator(".msvlad-tile-button").nth(1).click()
        wait_text(page, ".msvlad-rankings-summary", "clicked image")
        page.wait_for_timeout(2000)
        shots.append(out / "rankings_click.png")
        page.locator(".msvlad-rankings").screenshot(path=str(shots[-1]))
        write_notebook("triplets", workdir, parameters)
        run_all(page, url, "triplets.ipynb", TRIPLETS_READY)
        page.wait_for_timeout(2000)
        shots.append(out / "triplets_explorer.png")
        page.locator(".msvlad-triplets").screenshot(path=str(shots[-1]))
    return shots


def main() -> None:
    """Command line: README screenshots of both explorers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--params-file", default="params.yaml")
    parser.add_argument("--results-dir", default="results/evaluate")
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/msvlad-screenshots"))
    args = parser.parse_args()
    reason = missing_browser()
    if reason:
        sys.exit(f"cannot take screenshots: {reason}")
    parameters = {
        "params_file": str(Path(args.params_file).resolve()),
        "results_dir": str(Path(args.results_dir).resolve()),
        "runs_dir": str(Path(args.runs_dir).resolve()),
        "reports_dir": str(args.workdir / "reports"),
    }
    for path in screenshots(args.out, parameters, args.workdir):
        print(path)


if __name__ == "__main__":
    main()
