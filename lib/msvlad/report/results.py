"""Evaluation outputs -> pandas tables: the results table, per-query AP, gains, bootstrap CIs."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from msvlad import paths
from msvlad.config import VLAD_POOLINGS, Params, method_params, params_to_dict
from msvlad.errors import InputError
from msvlad.paths import MANIFEST
from msvlad.report.tables import SETUP_ORDER, SETUP_SHORT, VARIANT_SUFFIX
from msvlad.storage import file_digest, read_json, read_manifest, tree_entries

if TYPE_CHECKING:
    from msvlad.data.testsets import RetrievalDataset

log = logging.getLogger(__name__)


def training_set_label(params: Params, method: str) -> str:
    """What a results row was trained on: the training set, or ImageNet (+ k-means) if untrained."""
    m = params.methods[method]
    if m.miner is not None:
        return params.data.train_set
    if m.pooling in VLAD_POOLINGS:
        return f"ImageNet + k-means on {params.data.train_set}"
    return "ImageNet only"


def check_results(
    results_dir: str | os.PathLike,
    runs_dir: str | os.PathLike,
    params: Params,
    methods: Sequence[str] | None = None,
) -> None:
    """Every row's results present, intact and made by the row's model and parameters.

    For each row (`methods:`), RESULTS/<row> holds only files its manifest.json lists, each with
    the sha256 listed there (a file copied from another row has another), among them metrics.json
    and each test set's per-query CSV, ranking and features; the manifest's checkpoint is
    RUNS/<row>/model.pt (by sha256) and its parameters are the row's (`evaluation_keys`). Then the
    rows must score the same queries (`check_query_sets`). InputError naming the file otherwise.
    """
    results_dir, runs_dir = Path(results_dir), Path(runs_dir)
    keys = list(params.methods) if methods is None else list(methods)
    for key in keys:
        folder = results_dir / key
        hint = f"run `msvlad evaluate --method {key}` (dvc repro evaluate@{key})"
        if not folder.is_dir():
            raise InputError(f"{folder}: no results for row {key}; {hint}")
        manifest = read_manifest(folder, "evaluate")
        _check_files(folder, manifest, params, hint)
        _check_origin(folder, manifest, paths.model_file(key, runs_dir), params, key, hint)
    check_query_sets(results_dir, params, keys)


def _check_files(folder: Path, manifest: Mapping[str, Any], params: Params, hint: str) -> None:
    """The folder holds exactly the files its manifest lists, with their sha256."""
    listed, digests = set(manifest["files"]), manifest.get("sha256")
    if not isinstance(digests, Mapping):
        raise InputError(f"{folder / MANIFEST}: records no sha256 of its files (older); {hint}")
    needed = [paths.METRICS] + [
        f"{ds}/{name}"
        for ds in params.data.test_sets
        for name in (paths.per_query_file(), paths.RANKS, paths.FEATURES)
    ]
    for rel in needed:
        if rel not in listed:
            raise InputError(f"{folder / rel}: not among the results ({MANIFEST}); {hint}")
    for rel, kind in tree_entries(folder):
        if kind == "link":
            raise InputError(f"{folder / rel}: a symbolic link, not a file evaluate wrote; {hint}")
        if kind != "dir" and rel not in listed | {MANIFEST}:
            raise InputError(f"{folder / rel}: not written by msvlad evaluate (not in {MANIFEST})")
    for rel in sorted(listed):
        path = folder / rel
        if not path.is_file():
            raise InputError(f"{path}: missing (listed in {MANIFEST}); {hint}")
        if rel != paths.EVAL_TIMING and file_digest(path) != digests.get(rel):
            raise InputError(
                f"{path}: not the file evaluate wrote here (its sha256 differs from {MANIFEST}'s: "
                f"copied from another row, or edited); {hint}"
            )


def _check_origin(
    folder: Path, manifest: Mapping[str, Any], model: Path, params: Params, key: str, hint: str
) -> None:
    """The manifest's checkpoint is the row's model.pt and its parameters are the row's."""
    path = folder / MANIFEST
    ckpt = manifest.get("checkpoint")
    made_by = ckpt.get("sha256") if isinstance(ckpt, Mapping) else None
    if not model.is_file():
        raise InputError(f"{model}: not found; the results of row {key} are checked against it")
    if made_by != file_digest(model):
        raise InputError(
            f"{path}: made by a model with sha256 {str(made_by)[:12]}, not by {model} "
            f"(sha256 {file_digest(model)[:12]}): another row's or an older model's results; {hint}"
        )
    made = manifest.get("params")
    expected = params_to_dict(method_params(params, key))
    for dotted in evaluation_keys(params):
        old, new = _dotted(made, dotted), _dotted(expected, dotted)
        if _plain(old) != _plain(new):
            raise InputError(
                f"{path}: made with {dotted}={old!r}, but row {key} has {new!r}: another row's "
                f"results or older parameters; {hint}"
            )


def evaluation_keys(params: Params) -> list[str]:
    """The parameters a row's evaluation depends on (as its dvc.yaml stage): the test sets,
    extract.*, evaluate.*, and every key by which rows differ (pooling, miner, their `set`)."""
    plain = params_to_dict(params)
    keys = ["data.test_sets", "model.pooling", "miner.name"]
    keys += [f"{section}.{k}" for section in ("extract", "evaluate") for k in plain[section]]
    keys += sorted({k for m in params.methods.values() for k in m.set})
    return list(dict.fromkeys(keys))


_MISSING = object()


def _dotted(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, Mapping) or part not in tree:
            return _MISSING
        tree = tree[part]
    return tree


def _plain(value: Any) -> Any:
    """A parameter value as JSON has it (tuples as lists), to compare a manifest's with params."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def check_query_sets(
    results_dir: str | os.PathLike, params: Params, methods: Sequence[str] | None = None
) -> None:
    """Every row scored every query: no query left out, the same queries with a blank AP.

    A blank AP is a query without positives in a setup (the same for every row); a query left
    out (`evaluate.skip_failed_queries`) or blank in one row only would make the tables and the
    paired claims compare a subset of the queries. InputError naming the per-query CSV otherwise.
    """
    results_dir = Path(results_dir)
    keys = list(params.methods) if methods is None else list(methods)
    for ds in params.data.test_sets:
        reference: tuple[Path, pd.DataFrame] | None = None
        for key in keys:
            for variant in ("plain", "raw"):
                path = results_dir / key / ds / paths.per_query_file(variant)
                if not path.is_file():
                    continue
                frame = _per_query_rows(path)
                if reference is None:
                    reference = (path, frame)
                    continue
                _same_queries(path, frame, *reference)


def _per_query_rows(path: Path) -> pd.DataFrame:
    """(setup, query, AP blank) of a per-query CSV, with no query left out."""
    try:
        frame = pd.read_csv(path, dtype={"query": str, "setup": str, "excluded": str})
    except (ValueError, pd.errors.ParserError) as err:
        raise InputError(f"{path}: not a per-query CSV ({' '.join(str(err).split())})") from None
    missing = {"query", "setup", "AP"} - set(frame.columns)
    if missing:
        raise InputError(f"{path}: missing column(s) {sorted(missing)}")
    left_out = frame["excluded"].fillna("") if "excluded" in frame else pd.Series(dtype=str)
    if (left_out != "").any():
        query = frame.loc[left_out != "", "query"].iloc[0]
        n = frame.loc[left_out != "", "query"].nunique()
        raise InputError(
            f"{path}: {n} quer{'y' if n == 1 else 'ies'} left out of the evaluation (e.g. {query}, "
            "evaluate.skip_failed_queries), so the tables and claims would cover a subset of the "
            "queries; make them readable and evaluate again"
        )
    return pd.DataFrame(
        {"setup": frame["setup"], "query": frame["query"], "blank": frame["AP"].isna()}
    )


def _same_queries(path: Path, frame: pd.DataFrame, ref_path: Path, ref: pd.DataFrame) -> None:
    """`frame` (of `path`) lists the queries of `ref` in its order, blank where `ref` is blank."""
    same = len(frame) == len(ref) and all(
        (frame[c].to_numpy() == ref[c].to_numpy()).all() for c in ("setup", "query")
    )
    if not same:
        raise InputError(
            f"{path}: not the queries of {ref_path} (another query list or ground truth)"
        )
    differ = frame["blank"].to_numpy() != ref["blank"].to_numpy()
    if differ.any():
        i = int(np.flatnonzero(differ)[0])
        which, other = (path, ref_path) if frame["blank"].iloc[i] else (ref_path, path)
        raise InputError(
            f"{which}: AP blank for query {frame['query'].iloc[i]} ({frame['setup'].iloc[i]}), "
            f"which {other} scores: the rows would be compared on a subset of the queries"
        )


def load_results(
    results_dir: str | os.PathLike, params: Params, methods: Sequence[str] | None = None
) -> pd.DataFrame:
    """Long table of every method's metrics.json: one row per (method, dataset, variant, setup).

    Columns: method, label, training_set, pooling, miner, dataset, protocol, variant, setup, mAP,
    mP@k for each k found, num_queries, input (the test-time input policy, `input_label`),
    descriptor (its dimension and whether it is PCA-whitened, `descriptor_label`).
    Methods without a metrics.json are skipped with a warning.
    """
    results_dir = Path(results_dir)
    keys = list(params.methods) if methods is None else list(methods)
    unknown = [k for k in keys if k not in params.methods]
    if unknown:
        raise ValueError(f"methods: {unknown} not in params methods {sorted(params.methods)}")
    rows: list[dict[str, Any]] = []
    for key in keys:
        path = results_dir / key / paths.METRICS
        if not path.is_file():
            log.warning("%s: no metrics.json, method %s left out", path, key)
            continue
        m = params.methods[key]
        for dataset, variants in read_json(path).items():
            if not isinstance(variants, Mapping) or "plain" not in variants:
                raise ValueError(
                    f"{path}: {dataset}: expected {{variant: metrics}} with a 'plain' variant"
                )
            for variant, js in variants.items():
                for setup, value in js["mAP"].items():
                    row = {
                        "method": key,
                        "label": m.label,
                        "training_set": training_set_label(params, key),
                        "pooling": m.pooling,
                        "miner": m.miner or "none",
                        "dataset": dataset,
                        "protocol": js.get("protocol", ""),
                        "variant": variant,
                        "setup": setup,
                        "mAP": _num(value),
                        "num_queries": js.get("num_queries"),
                        "input": input_label(js.get("input")),
                        "descriptor": descriptor_label(js),
                    }
                    for k, v in js.get("mP@k", {}).get(setup, {}).items():
                        row[f"mP@{k}"] = _num(v)
                    rows.append(row)
    if not rows:
        raise FileNotFoundError(f"{results_dir}: no metrics.json for any of the methods {keys}")
    frame = pd.DataFrame(rows)
    # datasets in params order (data.test_sets), then others by name; methods keep params order
    ordered = dict.fromkeys([*params.data.test_sets, *sorted(set(frame["dataset"]))])
    frame["_order"] = frame["dataset"].map({ds: i for i, ds in enumerate(ordered)})
    frame["_method"] = frame["method"].map({k: i for i, k in enumerate(keys)})
    frame = frame.sort_values(["_method", "_order"], kind="stable").drop(
        columns=["_order", "_method"]
    )
    return frame.reset_index(drop=True)


def results_table(
    results: pd.DataFrame,
    *,
    variants: Sequence[str] = ("plain", "raw", "qe", "dba"),
    kappa: int | None = 10,
    setups: Sequence[str] | None = None,
    datasets: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Paper-style table: a row per method and variant ("label +QE"), mAP (and mP@k) per dataset.

    The "+raw (unwhitened)" row is the plain row's descriptor before PCA-whitening (same
    extraction), so a baseline is also shown at its strongest.

    Columns are "Method", "Training set", "Descriptor" and "Test input" (when the metrics record
    them: what was ranked, and the test-time size, resize policy and scales), then
    "<dataset> mAP <E|M|H>" (no setup letter for single-setup protocols) and, when `kappa` is set,
    "<dataset> mP@<kappa> <E|M|H>". The index is the run key ("msvlad", "msvlad+qe"). Rows follow
    the order of `results` with each method's +QE / +DBA rows right under it.
    """
    if results.empty:
        raise ValueError("results: empty table")
    datasets = list(dict.fromkeys(results["dataset"])) if datasets is None else list(datasets)
    columns: list[tuple[str, str, str, str]] = []  # (header, dataset, setup, value column)
    for ds in datasets:
        present = set(results.loc[results["dataset"] == ds, "setup"])
        ds_setups = [s for s in (SETUP_ORDER if setups is None else setups) if s in present]
        if not ds_setups and len(present) == 1:  # classic / Holidays: their single setup
            ds_setups = list(present)
        metrics = ["mAP"] + ([f"mP@{kappa}"] if kappa is not None else [])
        for metric in metrics:
            if metric not in results.columns:
                raise ValueError(f"results: no {metric} column (kappas found: {_kappas(results)})")
            for s in ds_setups:
                header = f"{ds} {metric} {SETUP_SHORT.get(s, s)}".rstrip()
                columns.append((header, ds, s, metric))
    lookup = results.set_index(["method", "variant", "dataset", "setup"])
    if not lookup.index.is_unique:
        raise ValueError("results: duplicate (method, variant, dataset, setup) rows")
    rows, index = [], []
    with_descriptor = "descriptor" in results and results["descriptor"].astype(bool).any()
    with_input = "input" in results and results["input"].astype(bool).any()
    for key in dict.fromkeys(results["method"]):
        first = results[results["method"] == key].iloc[0]
        for variant in variants:
            mask = (results["method"] == key) & (results["variant"] == variant)
            if not mask.any():
                continue
            row: dict[str, Any] = {
                "Method": f"{first['label']}{VARIANT_SUFFIX.get(variant, ' +' + variant)}",
                "Training set": first["training_set"],
            }
            if with_descriptor:
                row["Descriptor"] = results.loc[mask, "descriptor"].iloc[0]
            if with_input:
                row["Test input"] = results.loc[mask, "input"].iloc[0]
            for header, ds, s, metric in columns:
                where = (key, variant, ds, s)
                row[header] = lookup.at[where, metric] if where in lookup.index else math.nan
            rows.append(row)
            index.append(key if variant == "plain" else f"{key}+{variant}")
    table = pd.DataFrame(rows, index=pd.Index(index, name="run"))
    return table


def load_per_query(
    results_dir: str | os.PathLike, method: str, dataset: str, variant: str = "plain"
) -> pd.DataFrame:
    """Per-query metrics of one run (query_index, query, setup, AP, P@k) in percent."""
    path = Path(results_dir) / method / dataset / paths.per_query_file(variant)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: per-query results not found")
    frame = pd.read_csv(path, keep_default_na=True, dtype={"query": str})
    missing = {"query", "setup", "AP"} - set(frame.columns)
    if missing:
        raise ValueError(f"{path}: missing column(s) {sorted(missing)}")
    frame.insert(0, "query_index", frame.groupby("setup", sort=False).cumcount())
    value_cols = ["AP"] + [c for c in frame.columns if c.startswith("P@")]
    frame[value_cols] = frame[value_cols].astype(float) * 100.0
    return frame


def pick_setup(available: Sequence[str], setup: str) -> str:
    """`setup` if the protocol has it, else its only setup ("all" for classic/Holidays)."""
    available = list(dict.fromkeys(available))
    if setup in available:
        return setup
    if len(available) == 1:
        return available[0]
    raise ValueError(f"setup: {setup!r} is not one of {available}")


def per_query_ap(
    results_dir: str | os.PathLike,
    method: str,
    dataset: str,
    *,
    setup: str = "medium",
    variant: str = "plain",
) -> pd.DataFrame:
    """AP and P@k per query (percent) of one run under one setup, in query order."""
    frame = load_per_query(results_dir, method, dataset, variant)
    s = pick_setup(frame["setup"], setup)
    return frame[frame["setup"] == s].reset_index(drop=True)


def per_query_gains(
    results_dir: str | os.PathLike,
    method_a: str,
    method_b: str,
    dataset: str,
    *,
    setup: str = "medium",
    variant: str = "plain",
) -> pd.DataFrame:
    """Per-query AP of two methods and the gain a - b (percent points), largest gain first.

    Queries without positives (NaN AP) are left out. Columns: query_index, query, AP_a, AP_b, gain.
    """
    a = per_query_ap(results_dir, method_a, dataset, setup=setup, variant=variant)
    b = per_query_ap(results_dir, method_b, dataset, setup=setup, variant=variant)
    if len(a) != len(b) or not (a["query"].to_numpy() == b["query"].to_numpy()).all():
        raise ValueError(
            f"{dataset}: {method_a} and {method_b} were evaluated on different queries"
        )
    out = pd.DataFrame(
        {"query_index": a["query_index"], "query": a["query"], "AP_a": a["AP"], "AP_b": b["AP"]}
    )
    out["gain"] = out["AP_a"] - out["AP_b"]
    out = out.dropna(subset=["gain"])
    out.attrs.update(
        method_a=method_a, method_b=method_b, dataset=dataset, setup=str(a["setup"].iloc[0])
    )
    return out.sort_values(
        ["gain", "query_index"], ascending=[False, True], kind="stable"
    ).reset_index(drop=True)


def pick_queries(per_query: pd.DataFrame, n: int) -> list[int]:
    """`n` query indices spread from the best to the worst AP (NaN queries skipped)."""
    if n < 1:
        raise ValueError(f"n: expected at least 1 query, got {n}")
    ranked = per_query.dropna(subset=["AP"]).sort_values(
        ["AP", "query_index"], ascending=[False, True]
    )
    if ranked.empty:
        raise ValueError("per_query: no query has a finite AP")
    pos = np.unique(np.round(np.linspace(0, len(ranked) - 1, min(n, len(ranked)))).astype(int))
    return [int(i) for i in ranked["query_index"].to_numpy()[pos]]


def bootstrap_table(
    results_dir: str | os.PathLike,
    reference: str,
    params: Params,
    *,
    methods: Sequence[str] | None = None,
    datasets: Sequence[str] | None = None,
    setup: str = "medium",
    variant: str = "plain",
    n_boot: int = 2000,
    seed: int = 0,
    ci: float = 0.95,
) -> pd.DataFrame:
    """Paired bootstrap CI of the mAP difference (percent points) of every method vs `reference`.

    One row per (method, dataset), indexed by method key; methods whose per-query results are
    missing are skipped with a warning. The reference's per-query results must exist.
    """

    results_dir = Path(results_dir)
    if reference not in params.methods:
        raise ValueError(f"reference: {reference!r} not in params methods {sorted(params.methods)}")
    keys = [k for k in (params.methods if methods is None else methods) if k != reference]
    datasets = list(params.data.test_sets) if datasets is None else list(datasets)
    rows, index = [], []
    for ds in datasets:
        ref = per_query_ap(results_dir, reference, ds, setup=setup, variant=variant)
        for key in keys:
            try:
                other = per_query_ap(results_dir, key, ds, setup=setup, variant=variant)
            except FileNotFoundError as err:
                log.warning("bootstrap: %s left out (%s)", key, err)
                continue
            names = (params.methods[key].label, params.methods[reference].label, ds)
            rows.append(_paired_row(other, ref, names, n_boot=n_boot, seed=seed, ci=ci))
            index.append(key)
    if not rows:
        raise FileNotFoundError(f"{results_dir}: no per-query results to compare with {reference}")
    return pd.DataFrame(rows, index=pd.Index(index, name="run"))


def query_ground_truth(
    dataset: RetrievalDataset, query_index: int, setup: str = "medium"
) -> tuple[str, np.ndarray, np.ndarray]:
    """(setup used, positive db indices, junk db indices) of one query under the dataset's protocol.

    From `msvlad.evaluation.protocol.ground_truth`, the one place positives and junk are made:
    revisited sets build Easy/Medium/Hard as revisitop does; classic sets use ok/junk; Holidays
    marks the query's own database copy as junk.
    """
    from msvlad.evaluation.protocol import ground_truth

    gnd = dataset.gnd["gnd"] if isinstance(dataset.gnd, Mapping) else dataset.gnd
    if not 0 <= query_index < len(gnd):
        raise IndexError(f"query_index: {query_index} out of range for {len(gnd)} queries")
    setups = ground_truth([gnd[query_index]], dataset.protocol)
    s = pick_setup(list(setups), setup)
    truth = setups[s][0]
    return s, np.asarray(truth["ok"], dtype=np.int64), np.asarray(truth["junk"], dtype=np.int64)


def query_ap(
    dataset: RetrievalDataset, ranks: np.ndarray, query_index: int, setup: str = "medium"
) -> float:
    """AP (percent) of one query from its ranking column, by `msvlad.evaluation.protocol`."""
    from msvlad.evaluation.protocol import compute_map

    _, ok, junk = query_ground_truth(dataset, query_index, setup)
    if ok.size == 0:
        return math.nan
    _, aps, _, _ = compute_map(ranks[:, [query_index]], [{"ok": ok, "junk": junk}], kappas=(1,))
    return float(aps[0]) * 100.0


def query_precision(
    dataset: RetrievalDataset, ranks: np.ndarray, query_index: int, k: int, setup: str = "medium"
) -> float:
    """P@k (percent) of one query by the revisitop rule (junk skipped, k capped at last hit)."""
    from msvlad.evaluation.protocol import compute_map

    _, ok, junk = query_ground_truth(dataset, query_index, setup)
    if ok.size == 0:
        return math.nan
    _, _, _, prs = compute_map(ranks[:, [query_index]], [{"ok": ok, "junk": junk}], kappas=(k,))
    return float(prs[0, 0]) * 100.0


def load_ranks(results_dir: str | os.PathLike, method: str, dataset: str) -> np.ndarray:
    """The (n_db, n_q) ranking a method produced on a dataset (ranks.npy, no pickles)."""
    path = Path(results_dir) / method / dataset / paths.RANKS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: ranking not found")
    ranks = np.load(path, allow_pickle=False)
    if ranks.ndim != 2 or ranks.dtype.kind not in "iu":
        raise ValueError(
            f"{path}: expected an integer (n_db, n_queries) array, got {ranks.dtype} {ranks.shape}"
        )
    return ranks


def descriptor_label(metrics: Mapping[str, Any]) -> str:
    """ "128-d PCA-w" or "5120-d raw": what a results row ranked with ("" for older metrics)."""
    if "dim" not in metrics or "whitened" not in metrics:
        return ""
    return f"{metrics['dim']}-d {'PCA-w' if metrics['whitened'] else 'raw'}"


def input_label(policy: Mapping[str, Any] | None) -> str:
    """The test-time input of a results row, e.g. "1024 max_side x{1.41, 1, 0.71}, queries x1"."""
    if not policy:
        return ""
    scales = ", ".join(f"{s:.3g}" for s in policy["scales"])
    return (
        f"{policy['image_size']} {policy['resize']} x{{{scales}}}, "
        f"queries x{policy['query_scale']:.3g}"
    )


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


def _kappas(results: pd.DataFrame) -> list[str]:
    return [c for c in results.columns if c.startswith("mP@")]


# ----------------------------------------------------------------------------- the paper's claims

ClaimKind = Literal["better", "no_worse"]
SETTINGS_SAME = ("base", "data", "prepare", "extract", "evaluate")  # data and test-time input
SETTINGS_TRAINING = ("miner", "train")  # compared only between trained rows
BACKBONE_KEYS = ("model.backbone", "model.pretrained", "model.weights", "model.weights_sha256")
POOLING_NAMES: dict[str, str] = {
    "msvlad": "multi-scale NetVLAD",
    "netvlad": "single-scale NetVLAD",
    "vlad_concat": "per-split NetVLADs concatenated",
    "gem": "GeM",
    "mac": "MAC",
    "spoc": "SPoC",
    "rmac": "R-MAC",
}
# The network claims' controls: a trained row that differs from the paper row in this one model
# setting (its whitening aside) and has this value there (None: any value other than the paper's).
NETWORK_CONTROLS: tuple[tuple[str, Any], ...] = (
    ("model.pooling", "netvlad"),
    ("model.pooling", "gem"),
    ("model.split", None),
    ("model.pool_sizes", None),
)


@dataclass(frozen=True)
class Claim:
    """One claim as a paired comparison: `method` against `reference` on `setup`.

    kind "better": holds when the whole 95 % CI of the mAP difference lies above 0, does not hold
    when it lies below 0, a tie otherwise. "no_worse" (the same mAP at a smaller descriptor, the
    split's claim): holds when the CI does not lie wholly below 0 (0 within it, or above) and the
    method's raw descriptor is smaller than the reference's; does not hold otherwise.
    """

    claim: str
    method: str
    reference: str
    setup: str
    kind: ClaimKind = "better"


def row_settings(params: Params, key: str) -> dict[str, Any]:
    """Every effective `section.key` setting of a results row (its pooling, miner and `set`)."""
    effective = params_to_dict(method_params(params, key))
    return {
        f"{section}.{k}": v
        for section, values in effective.items()
        if section not in ("methods", "report")
        for k, v in values.items()
    }


def row_difference(params: Params, a: str, b: str) -> dict[str, tuple[Any, Any]]:
    """Settings where rows a and b differ, {key: (a's, b's)}; training ones only if both train."""
    trained = params.methods[a].miner is not None and params.methods[b].miner is not None
    sa, sb = row_settings(params, a), row_settings(params, b)
    return {
        k: (sa[k], sb[k])
        for k in sa
        if sa[k] != sb[k] and (trained or k.split(".")[0] not in SETTINGS_TRAINING)
    }


def verdict(kind: ClaimKind, ci_low: float, ci_high: float, smaller: bool = False) -> str:
    """ "holds", "tie" or "does not hold" for a claim's CI of the mAP difference (see `Claim`);
    `smaller`: the method's raw descriptor is smaller than the reference's (what "no_worse" needs).
    """
    if ci_high < 0:
        return "does not hold"
    if kind == "no_worse":
        return "holds" if smaller else "does not hold"
    return "holds" if ci_low > 0 else "tie"


def paper_claims(
    params: Params, method: str = "msvlad", setups: Sequence[str] = ("medium", "hard")
) -> list[Claim]:
    """The paper's claims about `method` (its trained row), each on every one of `setups`.

    Derived from the rows' settings, not their names: per backbone (the paper row's first), the
    trained paper network against its k-means initialisation and against off-the-shelf GeM on
    that backbone; the network controls (`NETWORK_CONTROLS`: single-scale NetVLAD and GeM trained
    alike, no channel split, fewer windows); the miner against every other miner (`miner_rows`).
    A claim whose rows are absent is left out with a warning.
    """
    if method not in params.methods or params.methods[method].miner is None:
        raise ValueError(f"methods: {method!r} is not a trained row of the results table")
    pairs: list[tuple[str, str, str, ClaimKind]] = []
    for backbone, trained in _backbone_rows(params, method).items():
        for ref, what, missing in (
            (_init_row(params, trained), "its k-means init", "untrained row of its network"),
            (
                _offtheshelf_gem(params, trained),
                "off-the-shelf GeM",
                "untrained GeM row on its backbone",
            ),
        ):
            claim = f"{backbone}: trained > {what}"
            if ref is None:
                log.warning("claims: %s has no %s; '%s' is left out", trained, missing, claim)
            else:
                pairs.append((claim, trained, ref, "better"))
        if trained == method:
            pairs += _control_claims(params, method)
    ours = params.methods[method].miner
    for key in miner_rows(params, method)[1:]:
        claim = f"{ours} miner > {params.methods[key].miner} miner"
        pairs.append((claim, method, key, "better"))
    return [Claim(c, m, r, s, kind) for c, m, r, kind in pairs for s in setups]


def miner_rows(params: Params, method: str = "msvlad") -> list[str]:
    """`method` and the trained rows that differ from it by their miner only (the miner study)."""
    if method not in params.methods:
        raise ValueError(f"methods: {method!r} is not a row of the results table")
    ours = params.methods[method]
    return [method] + [
        k
        for k, m in params.methods.items()
        if k != method and m.miner is not None and m.pooling == ours.pooling and m.set == ours.set
    ]


def _backbone_rows(params: Params, method: str) -> dict[str, str]:
    """{backbone: its trained paper network}: `method` first, then the trained row on every
    other backbone with `method`'s pooling and miner (the one closest to `method` in settings)."""
    mine = row_settings(params, method)
    out = {mine["model.backbone"]: method}
    for key, m in params.methods.items():
        if m.miner != params.methods[method].miner or m.pooling != params.methods[method].pooling:
            continue
        backbone = row_settings(params, key)["model.backbone"]
        best = out.get(backbone)
        if best is None or (
            best != method
            and len(row_difference(params, key, method)) < len(row_difference(params, best, method))
        ):
            out[backbone] = key
    return out


def _closest(params: Params, to: str, candidates: Sequence[str]) -> str | None:
    """The candidate row with the fewest settings different from `to` (params order on ties)."""
    if not candidates:
        return None
    return min(candidates, key=lambda k: len(row_difference(params, to, k)))


def _init_row(params: Params, trained: str) -> str | None:
    """The untrained row of `trained`'s network: same pooling, model and k-means settings."""
    pooling = params.methods[trained].pooling
    return _closest(
        params,
        trained,
        [
            k
            for k, m in params.methods.items()
            if m.miner is None
            and m.pooling == pooling
            and not any(
                s.startswith(("model.", "cluster.")) for s in row_difference(params, trained, k)
            )
        ],
    )


def _offtheshelf_gem(params: Params, trained: str) -> str | None:
    """The untrained GeM row on `trained`'s backbone (same weights)."""
    return _closest(
        params,
        trained,
        [
            k
            for k, m in params.methods.items()
            if m.miner is None
            and m.pooling == "gem"
            and not set(BACKBONE_KEYS) & set(row_difference(params, trained, k))
        ],
    )


def _control_claims(params: Params, method: str) -> list[tuple[str, str, str, ClaimKind]]:
    """Claims against the trained rows that differ from `method` in one network setting only
    (`NETWORK_CONTROLS`; whitening may differ, data, test-time input and training may not)."""
    found: dict[tuple[str, Any], list[str]] = {c: [] for c in NETWORK_CONTROLS}
    mine = row_settings(params, method)
    for key, m in params.methods.items():
        if key == method or m.miner is None:
            continue
        diff = row_difference(params, method, key)
        changed = [k for k in diff if not k.startswith("whiten.")]
        if len(changed) != 1:
            continue
        setting, theirs = changed[0], diff[changed[0]][1]
        for control in found:
            if control[0] == setting and control[1] in (None, theirs):
                found[control].append(key)
    claims: list[tuple[str, str, str, ClaimKind]] = []
    for (setting, wanted), keys in found.items():
        if not keys:
            log.warning(
                "claims: no trained row differs from %s only by %s%s; that claim is left out",
                *(method, setting, "" if wanted is None else f" = {wanted}"),
            )
        for key in keys:
            text, kind = _control_text(setting, mine[setting], row_settings(params, key)[setting])
            claims.append((text, method, key, kind))
    return claims


def _control_text(setting: str, ours: Any, theirs: Any) -> tuple[str, ClaimKind]:
    """The claim a network control tests, in words, and its kind."""
    if setting == "model.pooling":
        return f"{POOLING_NAMES[ours]} > {POOLING_NAMES[theirs]} (both trained)", "better"
    if setting == "model.pool_sizes":
        return f"windows {_windows(ours)} > {_windows(theirs)}", "better"
    if theirs is None:  # model.split
        return f"split into {ours}-d chunks: same mAP (within CI) as no split", "no_worse"
    return f"split into {ours}-d chunks: same mAP (within CI) as {theirs}-d chunks", "no_worse"


def _windows(sizes: Sequence[int]) -> str:
    return "+".join(f"{s}×{s}" for s in sizes)


def claims_table(
    results_dir: str | os.PathLike,
    params: Params,
    claims: Sequence[Claim],
    *,
    dataset: str | None = None,
    reference_variants: Sequence[str] = ("plain", "raw"),
    n_boot: int = 2000,
    seed: int = 0,
    ci: float = 0.95,
) -> pd.DataFrame:
    """Paired bootstrap of each claim on `dataset` (default the first test set), one row each.

    The method is scored as the results table scores it (plain); the reference by the best of its
    `reference_variants` on that setup (the strongest form of the baseline, e.g. GeM whitened or
    raw). Columns: Claim, Method, Reference, Dataset, Setup, Descriptor and Descriptor ref (what
    each ranked, from metrics.json), mAP, mAP ref, Δ mAP, CI low, CI high, p, Queries, Verdict.
    A "no_worse" claim's text gains both rows' raw descriptor dimensions, which its verdict
    compares (`verdict`).
    """

    dataset = dataset or params.data.test_sets[0]
    results_dir = Path(results_dir)
    rows = []
    for c in claims:
        ours = per_query_ap(results_dir, c.method, dataset, setup=c.setup)
        refs = []
        for variant in reference_variants:
            try:
                refs.append(
                    (
                        variant,
                        per_query_ap(
                            results_dir, c.reference, dataset, setup=c.setup, variant=variant
                        ),
                    )
                )
            except FileNotFoundError:
                continue
        if not refs:
            raise FileNotFoundError(f"{results_dir}/{c.reference}/{dataset}: no per-query results")
        variant, ref = max(refs, key=lambda r: float(np.nanmean(r[1]["AP"])))
        label = params.methods[c.reference].label + VARIANT_SUFFIX.get(variant, "")
        names = (params.methods[c.method].label, label, dataset)
        row = _paired_row(ours, ref, names, n_boot=n_boot, seed=seed, ci=ci)
        described = {
            "Descriptor": _descriptor(results_dir, c.method, dataset, "plain"),
            "Descriptor ref": _descriptor(results_dir, c.reference, dataset, variant),
        }
        text, smaller = c.claim, False
        if c.kind == "no_worse":
            dims = [_raw_dim(results_dir, k, dataset) for k in (c.method, c.reference)]
            if None in dims:
                text += " (raw dimensions unknown)"
            else:
                text += f", at {dims[0]}-d against {dims[1]}-d raw"
                smaller = dims[0] < dims[1]
        rows.append(
            {
                "Claim": text,
                **{k: row.pop(k) for k in ("Method", "Reference", "Dataset", "Setup")},
                **described,
                **row,
                "Verdict": verdict(c.kind, row["CI low"], row["CI high"], smaller),
            }
        )
    return pd.DataFrame(rows)


def _descriptor(results_dir: Path, method: str, dataset: str, variant: str) -> str:
    """`descriptor_label` of one run's variant ("" when its metrics.json does not say)."""
    return descriptor_label(_variant_metrics(results_dir, method, dataset).get(variant, {}))


def _raw_dim(results_dir: Path, method: str, dataset: str) -> int | None:
    """The dimension of a run's descriptor before whitening (its `raw` variant, or its plain one
    when that is not whitened); None when its metrics.json does not say."""
    variants = _variant_metrics(results_dir, method, dataset)
    for name, whitened in (("raw", None), ("plain", False)):
        entry = variants.get(name, {})
        if "dim" in entry and (whitened is None or entry.get("whitened") is whitened):
            return int(entry["dim"])
    return None


def _variant_metrics(results_dir: Path, method: str, dataset: str) -> dict[str, Any]:
    """{variant: metrics} of one run on a dataset, from its metrics.json ({} when absent)."""
    path = results_dir / method / paths.METRICS
    if not path.is_file():
        return {}
    return read_json(path).get(dataset, {})


def _paired_row(
    ours: pd.DataFrame, ref: pd.DataFrame, names: tuple[str, str, str], **bootstrap: Any
) -> dict[str, Any]:
    """One table row: the paired bootstrap of per-query AP `ours` - `ref` (method, ref, dataset)."""
    from msvlad.evaluation.stats import paired_bootstrap

    method, reference, dataset = names
    if not (ours["query"].to_numpy() == ref["query"].to_numpy()).all():
        raise ValueError(f"{dataset}: {method} and {reference} were evaluated on different queries")
    res = paired_bootstrap(ours["AP"].to_numpy() / 100.0, ref["AP"].to_numpy() / 100.0, **bootstrap)
    return {
        "Method": method,
        "Reference": reference,
        "Dataset": dataset,
        "Setup": str(ours["setup"].iloc[0]),
        "mAP": float(np.nanmean(ours["AP"])),
        "mAP ref": float(np.nanmean(ref["AP"])),
        "Δ mAP": res.diff,
        "CI low": res.ci_low,
        "CI high": res.ci_high,
        "p": res.p_value,
        "Queries": res.n_queries,
    }
