"""`ablate` command: the paper's ablation axes as a DVC experiment grid on one results-table row.

A grid point is one queued experiment, ``dvc exp run --queue -S <key>=<value> evaluate@<row>``:
DVC reproduces only that row's chain (train: k-means, training, whitening; evaluate), so a point
retrains the row alone; ``dvc queue start`` runs the queue. `collect` reads the finished
experiments (`dvc exp show --json`: each one's params, then its metrics.json, manifest.json and
training log at its revision) into the tidy table of `msvlad.report.ablations`, which
`notebooks/ablations.ipynb` draws against each axis with the default marked.

    python -m msvlad ablate queue --axis miner.delta --values 0.02,0.04,0.06
    dvc queue start -j 1                                 # (dvc queue status; dvc queue logs NAME)
    python -m msvlad ablate collect --out results/ablations/mini.csv
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from msvlad.config import (
    ConfigError,
    Params,
    load_params,
    method_params,
    params_from_dict,
    params_to_dict,
    with_overrides,
)
from msvlad.nn.backbones import BACKBONES
from msvlad.nn.pooling import build_pooling
from msvlad.report.ablations import (
    AXES,
    COLUMNS,
    KAPPA,
    SETUP_COLUMNS,
    GridError,
    sort_table,
    value_text,
    write_table,
)

log = logging.getLogger(__name__)

GRID_SECTIONS = ("model", "cluster", "miner", "train", "whiten", "extract", "evaluate")

# ----------------------------------------------------------------------------- queueing


def parse_values(axis: str, text: str) -> list[Any]:
    """`--values` text -> values: YAML items, comma-separated ("0.02,0.04", "[2],[2,3]", "null")."""
    try:
        values = yaml.safe_load(f"[{text}]")
    except yaml.YAMLError:
        raise GridError(f"--values {text!r}: not a comma list of YAML values for {axis}") from None
    if not values:
        raise GridError(f"--values: no value given for {axis}")
    return values


def check_point(params: Params, method: str, axis: str, value: Any) -> Params:
    """The row's params at this grid point; a one-line error naming the key if it cannot be one."""
    section, _, key = axis.partition(".")
    if section not in GRID_SECTIONS or not key or key not in params_to_dict(params)[section]:
        raise GridError(
            f"--axis {axis}: not a section.key of {', '.join(GRID_SECTIONS)}; "
            f"the paper's axes are {', '.join(AXES)}"
        )
    if method not in params.methods:
        raise GridError(f"--method {method}: not a row of methods: ({', '.join(params.methods)})")
    if axis in params.methods[method].set:
        raise GridError(
            f"--axis {axis}: methods.{method}.set fixes it for this row, a grid on it would not "
            "change the row"
        )
    try:
        point = method_params(with_overrides(params, **{section: {key: value}}), method)
    except ConfigError as err:
        raise GridError(f"--values {axis}={value!r}: {err}") from None
    m = point.model
    try:  # the network must build (a split must divide the channels): checked before queueing
        build_pooling(
            m.pooling,
            BACKBONES[m.backbone].out_channels,
            num_clusters=m.num_clusters,
            pool_sizes=m.pool_sizes,
            split=m.split,
        )
    except ValueError as err:
        raise GridError(f"--values {axis}={value!r}: {err}") from None
    return point


def default_value(params: Params, method: str, axis: str) -> Any:
    """The row's own value of `axis` (the baseline's point)."""
    section, _, key = axis.partition(".")
    return getattr(getattr(method_params(params, method), section), key)


def override_text(value: Any) -> str:
    """A value in `dvc exp run -S` (hydra) grammar: null, numbers, [lists], quoted strings."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(override_text(v) for v in value) + "]"
    if isinstance(value, str):
        return f"'{value}'"
    return repr(value)


def experiment_name(method: str, axis: str, value: Any) -> str:
    """A git-ref-safe experiment name, e.g. msvlad-miner-delta-0.02, msvlad-model-pool_sizes-2+3."""
    text = "+".join(map(str, value)) if isinstance(value, list) else str(value).lower()
    return re.sub(r"[^A-Za-z0-9_+.-]", "_", f"{method}-{axis.replace('.', '-')}-{text}")


def queue_commands(
    params_file: str | Path, axis: str, values: Sequence[Any], method: str = "msvlad"
) -> list[list[str]]:
    """One `dvc exp run --queue` command per value: only `evaluate@<method>` and its chain.

    The data root (an untracked, uncached output of `prepare`) is copied into each experiment's
    temporary folder (`-C`), so `prepare` is not run again; cached outputs come from DVC's cache.
    The row's own value is left out: the baseline commit is that point (`collect` reads it).
    """
    params = load_params(params_file)
    cmds = []
    for value in values:
        check_point(params, method, axis, value)
        if value == default_value(params, method, axis):
            continue  # the baseline commit is this point
        cmds.append(
            [
                *("dvc", "exp", "run", "--queue"),
                *("-n", experiment_name(method, axis, value)),
                *("-C", params.data.root),
                *("-S", f"{axis}={override_text(value)}"),
                f"evaluate@{method}",
            ]
        )
    return cmds


def queue(
    params_file: str | Path,
    axis: str,
    values: Sequence[Any],
    method: str = "msvlad",
    *,
    dry_run: bool = False,
    existing: Sequence[str] = (),
) -> list[list[str]]:
    """Queue the grid (in the DVC repository holding `params_file`); return the commands.

    Points whose experiment name is in `existing` (finished or queued before) are left out.
    """
    cmds = [
        c for c in queue_commands(params_file, axis, values, method) if c[5] not in set(existing)
    ]
    for cmd in [] if dry_run else cmds:
        run = subprocess.run(
            [sys.executable, "-m", *cmd],
            cwd=Path(params_file).resolve().parent,
            capture_output=True,
            text=True,
        )
        if run.returncode:
            detail = " ".join((run.stderr or run.stdout).split())[-300:]
            raise GridError(f"dvc exp run --queue -n {cmd[5]}: failed ({detail})")
        log.info("queued %s", cmd[5])
    return cmds


# ----------------------------------------------------------------------------- collecting


def exp_show(repo: str | Path) -> list[dict[str, Any]]:
    """`dvc exp show --json` of the repository (the HEAD baseline and its experiments)."""
    run = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "show", "--json"],
        cwd=repo,
        capture_output=True,
        text=True,
    )
    if run.returncode:
        detail = " ".join(run.stderr.split())[-300:]
        raise GridError(f"{repo}: dvc exp show failed ({detail})")
    return json.loads(run.stdout)


def dvc_reader(repo: str | Path) -> Callable[[str, str], str | None]:
    """read(rev, path): a file's text at a revision (git or DVC cache), None when absent."""
    import dvc.api

    def read(rev: str, path: str) -> str | None:
        try:
            return dvc.api.read(path, repo=str(repo), rev=rev)
        except Exception as err:  # missing in git and cache: the point is left out, with why
            log.warning("%s at %s: %s", path, rev[:8], " ".join(str(err).split())[:160])
            return None

    return read


def code_commits(repo: str | Path) -> Callable[[str], str]:
    """code(rev): the last commit that changed lib/ at `rev` (the code that ran a point; a
    point's own commit only adds its params and dvc.lock)."""

    def code(rev: str) -> str:
        run = subprocess.run(
            ["git", "log", "-1", "--format=%H", rev, "--", "lib"],
            cwd=repo,
            capture_output=True,
            text=True,
        )
        return run.stdout.strip()

    return code


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping) and prefix.count(".") < 1:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _revisions(show: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The baseline commit's entry and its finished experiments' entries from exp show."""
    baselines = [b for b in show if b.get("rev") != "workspace"]
    if not baselines:
        raise GridError("dvc exp show: no baseline commit (commit the workspace first)")
    base = baselines[0]
    exps = []
    for exp in base.get("experiments") or []:
        for rev in exp.get("revs") or []:
            if rev.get("data") and not rev.get("error"):
                exps.append({**rev, "name": rev.get("name") or exp.get("name")})
    return base, exps


def _params_of(entry: Mapping[str, Any], params_name: str) -> dict[str, Any] | None:
    return (entry.get("data", {}).get("params", {}).get(params_name) or {}).get("data")


def point_rows(
    method: str,
    axis: str,
    value: Any,
    default: bool,
    experiment: str,
    rev: str,
    raw_params: dict[str, Any],
    read: Callable[[str, str], str | None],
    code: Callable[[str], str] | None = None,
) -> list[dict[str, Any]]:
    """The table rows of one grid point (one per test set), [] when its results are not there.

    `code(rev)` names the code version; by default the commit its evaluation recorded.
    """
    params = method_params(params_from_dict(raw_params, f"{experiment}: params"), method)
    text = read(rev, f"results/evaluate/{method}/metrics.json")
    if text is None:
        return []
    metrics = json.loads(text)
    manifest = json.loads(read(rev, f"results/evaluate/{method}/manifest.json") or "{}")
    version = code(rev) if code else (manifest.get("code") or {}).get("commit") or ""
    val_map = math.nan
    log_csv = read(rev, f"runs/{method}/train/log.csv")
    if log_csv:
        val = pd.read_csv(io.StringIO(log_csv))["val_map"].dropna()
        val_map = float(val.iloc[-1]) if len(val) else math.nan
    run = {k: v for k, v in params_to_dict(params).items() if k in (*GRID_SECTIONS, "base")}
    rows = []
    for dataset, variants in metrics.items():
        plain = variants["plain"]
        row: dict[str, Any] = {
            "axis": axis,
            "value": value_text(value),
            "default": default,
            "method": method,
            "dataset": dataset,
            "val_mAP": val_map,
            "experiment": experiment,
            "rev": rev,
            "code": version,
            "params": json.dumps(run, sort_keys=True),
        }
        for setup, letter in SETUP_COLUMNS.items():
            row[letter] = plain["mAP"].get(setup, math.nan)
            row[f"mP@{KAPPA} {letter}"] = (
                plain.get("mP@k", {}).get(setup, {}).get(str(KAPPA), math.nan)
            )
        rows.append(row)
    return rows


def collect(
    show: list[dict[str, Any]],
    read: Callable[[str, str], str | None],
    method: str = "msvlad",
    params_name: str = "params.yaml",
    axes: Sequence[str] | None = None,
    code: Callable[[str], str] | None = None,
) -> pd.DataFrame:
    """The tidy grid table (`COLUMNS`) from `dvc exp show --json` output and a file reader.

    An experiment is a point of the axis it changes (exactly one params key; others are left out
    with a warning); the baseline commit is the default point of every axis found (or of `axes`).
    """
    base, exps = _revisions(show)
    base_raw = _params_of(base, params_name)
    if base_raw is None:
        raise GridError(f"dvc exp show: the baseline has no {params_name}")
    base_flat = _flat(base_raw)
    points: list[tuple[str, Any, bool, str, str, dict[str, Any]]] = []
    found: list[str] = []
    for exp in exps:
        raw = _params_of(exp, params_name)
        if raw is None:
            continue
        flat = _flat(raw)
        changed = sorted(k for k in set(flat) | set(base_flat) if flat.get(k) != base_flat.get(k))
        if len(changed) != 1 or changed[0].split(".")[0] not in GRID_SECTIONS:
            log.warning("%s: changes %s, not one grid axis: left out", exp["name"], changed)
            continue
        axis = changed[0]
        found.append(axis)
        points.append((axis, flat[axis], False, exp["name"], exp["rev"], raw))
    for axis in dict.fromkeys(axes or found):
        points.append((axis, base_flat[axis], True, base.get("name") or "", base["rev"], base_raw))
    rows = [r for p in points for r in point_rows(method, *p, read, code)]
    table = pd.DataFrame(rows, columns=COLUMNS)
    return sort_table(table)


# ----------------------------------------------------------------------------- the command


def run_queue(
    params_file: str | Path, axis: str, values: str, method: str = "msvlad", dry_run: bool = False
) -> list[list[str]]:
    """`ablate queue`: queue the points of `axis` not queued or done yet; return their commands."""
    parsed = parse_values(axis, values)
    repo = Path(params_file).resolve().parent
    done = (
        [] if dry_run else [e["name"] for b in exp_show(repo) for e in b.get("experiments") or []]
    )
    return queue(params_file, axis, parsed, method, dry_run=dry_run, existing=done)


def run_collect(params_file: str | Path, out: str | Path, method: str = "msvlad") -> pd.DataFrame:
    """`ablate collect`: the finished grid of the repository holding `params_file`, to `out`."""
    repo = Path(params_file).resolve().parent
    table = collect(
        exp_show(repo),
        dvc_reader(repo),
        method,
        Path(params_file).name,
        code=code_commits(repo),
    )
    write_table(table, Path(out))
    return table
