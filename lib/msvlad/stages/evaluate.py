"""`evaluate` stage: extract, rank and score every test set; write metrics, features and ranks.

Per dataset (in `out/<dataset>/`, or `out/` itself with `flat`): `features.npz` (q, db float32,
one row per image, plus the image lists), `ranks.npy` (revisitop orientation: column j ranks
query j), `metrics[_raw|_qe|_dba].json` and `per_query[_raw|_qe|_dba].csv`; `out/metrics.json`
gathers every dataset and variant (mAP and mP@k in percent, the input policy, failed images),
`out/summary.json` only the mAPs (E/M/H, plain and +QE) for `dvc metrics show`, and
`out/manifest.json` says what made them (checkpoint checksum, params, variants, code version);
the wall-clock extraction seconds go to `out/timing.json`, which DVC does not hash.

Everything is checked before the first image is read (datasets, variants, the output folder), and
the results are written into a fresh folder that replaces `out` only when all is done: a failed run
leaves the previous results as they were, and a new one never leaves an older model's files behind.
`out` is replaced as a whole, so it may hold only what an earlier evaluate wrote there (the files
its manifest.json lists; no link): anything else is refused, never deleted. One evaluate at a time
writes into an `out` (a lock file beside it), and a kill during the swap loses neither the
previous results nor the new ones (`msvlad.storage.atomic_dir`; the next run finishes the swap).
"""

from __future__ import annotations

import logging
import time
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msvlad.config import VARIANTS, Params, params_to_dict
from msvlad.data.images import ImageItem
from msvlad.data.testsets import RetrievalDataset, load_dataset, load_distractors
from msvlad.errors import InputError
from msvlad.evaluation.extract import describe_multiscale, whiten_descriptors
from msvlad.evaluation.pipeline import (
    DatasetDescriptors,
    InputPolicy,
    check_failures,
    describe_dataset,
    input_policy,
    per_query_frame,
    score,
)
from msvlad.evaluation.protocol import RetrievalMetrics, metrics_summary, metrics_table
from msvlad.evaluation.search import check_expansions
from msvlad.nn.model import RetrievalNet
from msvlad.paths import (
    EVAL_TIMING,
    FEATURES,
    MANIFEST,
    METRICS,
    RANKS,
    SUMMARY,
    distractor_features,
    metrics_file,
    per_query_file,
)
from msvlad.runtime import code_version, init_distributed, resolve_device, seed_everything
from msvlad.storage import (
    atomic_dir,
    check_writable,
    file_digest,
    load_npz,
    lock_beside,
    payload_digest,
    read_manifest,
    remove_stale_temps,
    save_npy,
    save_npz,
    stat_digest,
    tree_entries,
    write_json,
    write_text,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateRequest:
    """What to evaluate: the test sets under a root, the re-ranking variants, the output folder."""

    data_root: Path
    datasets: Sequence[str]
    out: Path
    variants: Sequence[str] | None = None  # None: evaluate.variants of the params
    flat: bool = False  # a single dataset: write its files directly in `out`
    distractors: str | None = None  # e.g. revisitop1m: appended to every database (+1M rows)
    checkpoint: Path | None = None  # the model file, recorded in the manifest


def run(params: Params, model: RetrievalNet, request: EvaluateRequest) -> dict[str, Any]:
    """Evaluate `model` on every dataset of the request; returns the metrics.json content."""
    seed_everything(params.base.seed)
    device = resolve_device(params.base.device)
    dist_info = init_distributed()  # under torchrun every rank extracts a slice of each image list
    if dist_info.world > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    variants = _variants(request.variants or params.evaluate.variants, model)
    policy = input_policy(model.config, params.extract)
    datasets = [load_dataset(request.data_root, name) for name in request.datasets]
    if not datasets:
        raise InputError("data.test_sets: no dataset to evaluate (or pass --dataset)")
    if request.flat and len(datasets) > 1:
        raise InputError("--flat: writes one dataset's files into --out; give one --dataset")
    for dataset in datasets:  # alpha-QE/DBA neighbours fit each database: checked before extracting
        check_expansions(params.evaluate, variants, len(dataset.imlist), str(dataset.root))
    model = model.to(device).eval()
    if not dist_info.main:  # the main rank alone checks, locks and writes the output folder
        _evaluate_all(params, model, request, datasets, variants, policy, request.out, {})
        return {}
    _check_parent(request.out)
    with lock_beside(request.out, "evaluate"):
        _check_out(request.out)
        with atomic_dir(request.out) as tmp:
            timing: dict[str, dict[str, float]] = {}
            summary, tables = _evaluate_all(
                params, model, request, datasets, variants, policy, tmp, timing
            )
            write_json(tmp / EVAL_TIMING, timing)
            result = summary if not request.flat else next(iter(summary.values()))["plain"]
            write_json(tmp / METRICS, result)
            write_json(tmp / SUMMARY, metrics_summary(summary))  # for `dvc metrics show`
            manifest = _manifest(params, model, request, variants, policy, tmp)
            write_json(tmp / MANIFEST, manifest)
    print(metrics_table(tables).to_string(float_format="{:.2f}".format, na_rep="-"))
    log.info("evaluate: %s, variants %s -> %s", ", ".join(summary), ",".join(variants), request.out)
    return result


def _variants(names: Sequence[str], model: RetrievalNet) -> list[str]:
    """The variants to score (a model without whitening has no separate raw variant)."""
    bad = [v for v in names if v not in VARIANTS]
    if bad or not names:
        raise InputError(f"--variants: {bad or names!r} must be a non-empty list from {VARIANTS}")
    if "raw" in names and model.whitening is None:
        log.info("variant raw left out: the model has no whitening (plain is raw)")
        return [v for v in names if v != "raw"]
    return list(dict.fromkeys(names))


def _check_parent(out: Path) -> None:
    """`out` is not a link and its parent is a writable folder (created if needed)."""
    if out.is_symlink():
        raise InputError(
            f"{out}: a symbolic link; evaluate replaces --out as a whole and never follows "
            "links: give the folder itself"
        )
    check_writable(out.parent)


def _check_out(out: Path) -> None:
    """`out` holds nothing this command did not write (under the lock beside it).

    First the temps a killed run left are cleared or put back (the swap it was in is finished),
    then every entry of `out` must be a file its manifest.json lists (or a folder on the way to
    one); a link, anything unlisted or a folder without a manifest is refused.
    """
    remove_stale_temps(out.parent, out.name)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if not out.is_dir():
        return
    entries = tree_entries(out)
    if not entries:
        return
    listed = _listed_files(out, entries)
    allowed_dirs = {parent.as_posix() for f in listed for parent in Path(f).parents}
    foreign = []
    for rel, kind in entries:
        if kind == "link":
            raise InputError(
                f"{out / rel}: a symbolic link inside --out; evaluate replaces the folder as a "
                "whole and neither follows nor deletes links: move it or choose another --out"
            )
        if not ((kind == "file" and rel in listed) or (kind == "dir" and rel in allowed_dirs)):
            foreign.append(rel)  # unlisted, or not a plain file or folder (a pipe, a socket)
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise InputError(
            f"{out / foreign[0]}{more}: not written by msvlad evaluate (not listed in "
            f"{out / MANIFEST}); move it or choose another --out (the results folder is "
            "replaced as a whole)"
        )


def _listed_files(out: Path, entries: list[tuple[str, str]]) -> set[str]:
    """The files the manifest.json of an earlier evaluate in `out` lists (itself included)."""
    if (MANIFEST, "file") not in entries:
        first = next(rel for rel, _ in entries)
        more = f" and {len(entries) - 1} more" if len(entries) > 1 else ""
        raise InputError(
            f"{out / first}{more}: not written by msvlad evaluate ({out} has no {MANIFEST}); "
            "move it or choose another --out (the results folder is replaced as a whole)"
        )
    try:
        files = read_manifest(out, "evaluate")["files"]
    except InputError as err:
        raise InputError(
            f"{err}; {out} is replaced as a whole only when its {MANIFEST} lists what is there: "
            "move the folder or choose another --out"
        ) from None
    return {*files, MANIFEST}


def _evaluate_all(
    params: Params,
    model: RetrievalNet,
    request: EvaluateRequest,
    datasets: list[RetrievalDataset],
    variants: list[str],
    policy: InputPolicy,
    tmp: Path,
    timing: dict[str, dict[str, float]],
) -> tuple[dict[str, Any], dict[str, RetrievalMetrics]]:
    """Extract and score every dataset; writes its files under `tmp` on the main rank and the
    extraction seconds of each dataset into `timing`."""
    device = next(model.parameters()).device
    keep_raw = "raw" in variants
    distractors = (
        _distractors(params, model, request, policy, tmp, keep_raw) if request.distractors else None
    )
    main = init_distributed().main
    summary: dict[str, Any] = {}
    tables: dict[str, RetrievalMetrics] = {}
    for dataset in datasets:
        t0 = time.time()
        desc = describe_dataset(
            model,
            dataset,
            model_cfg=model.config,
            extract_cfg=params.extract,
            policy=policy,
            device=device,
            num_workers=params.base.num_workers,
            trunk_depth=params.train.frozen_stages,
        )
        seconds = time.time() - t0
        queries = check_failures(desc, dataset, params.evaluate)
        if not main:
            continue
        name = dataset.name if distractors is None else f"{dataset.name}+{request.distractors}"
        ddir = tmp if request.flat else tmp / name
        save_npz(
            ddir / FEATURES,
            q=desc.q,
            db=desc.db,
            qimlist=np.array(dataset.qimlist),
            imlist=np.array(dataset.imlist),
        )
        if distractors is not None:  # ranks past the dataset's images: never ok, never junk
            desc.db = np.concatenate([desc.db, distractors["db"]])
            if keep_raw and desc.db_raw is not None:
                desc.db_raw = np.concatenate([desc.db_raw, distractors["db_raw"]])
        timing[name] = {"extract_seconds": round(seconds, 2)}
        context = {"name": name, "policy": policy, "queries": queries}
        summary[name] = _score_variants(params, variants, dataset, desc, context, ddir, tables)
    return summary, tables


def _score_variants(
    params: Params,
    variants: Sequence[str],
    dataset: RetrievalDataset,
    desc: DatasetDescriptors,
    context: dict[str, Any],
    ddir: Path,
    tables: dict[str, RetrievalMetrics],
) -> dict[str, Any]:
    """Rank and score one dataset under every variant; write its per-variant files."""
    name = context["name"]
    per_dataset: dict[str, Any] = {}
    for variant in variants:
        metrics, ranks = score(
            desc, dataset, params.evaluate, variant=variant, queries=context["queries"]
        )
        db = desc.db_raw if variant == "raw" else desc.db
        js = metrics.to_json()
        js.update(
            {
                "dataset": name,
                "protocol": dataset.protocol,
                "variant": variant,
                "num_queries": len(context["queries"]),
                "num_db": int(db.shape[0]),
                "dim": int(db.shape[1]),
                "whitened": variant != "raw" and desc.q_raw is not None,
                "input": context["policy"].to_json(),
                "failed_images": len(desc.failed_queries) + len(desc.failed_db),
                "failed_queries": _named(desc.failed_queries, dataset.qimlist),
                "failed_db": _named(desc.failed_db, dataset.imlist),
            }
        )
        write_json(ddir / metrics_file(variant), js)
        frame = per_query_frame(metrics, dataset, desc.failed_queries)
        write_text(ddir / per_query_file(variant), frame.to_csv(index=False))
        if variant == "plain":
            save_npy(ddir / RANKS, ranks.astype(np.int32))
        per_dataset[variant] = js
        tables[name if variant == "plain" else f"{name}+{variant.upper()}"] = metrics
    return per_dataset


def _named(failed: dict[int, str], names: Sequence[str]) -> list[dict[str, str]]:
    return [{"name": names[i], "error": failed[i]} for i in sorted(failed)]


def _model_digest(model: RetrievalNet) -> str:
    return payload_digest({"config": asdict(model.config), "state": model.state_dict()})


def _distractors(
    params: Params,
    model: RetrievalNet,
    request: EvaluateRequest,
    policy: InputPolicy,
    tmp: Path,
    keep_raw: bool,
) -> dict[str, np.ndarray]:
    """Descriptors of a distractor set (e.g. revisitop1m), cached in OUT/<name>_features.npz.

    The cache is reused only for the same model, input policy and distractor images (their names,
    sizes and change times: `msvlad.storage.stat_digest`), all recorded in its key; the raw
    descriptors are kept only for the raw variant (at 32768-d they are large).
    """
    name = request.distractors
    paths = load_distractors(request.data_root, name)
    images = stat_digest(paths, Path(request.data_root) / name)
    key = np.array(f"{_model_digest(model)} {policy.to_json()} images {images}")
    old = request.out / distractor_features(name)
    wanted = ("db", "db_raw") if keep_raw else ("db",)
    main = init_distributed().main
    if old.is_file() and not old.is_symlink():
        cached = _load_cache(old)
        if (
            str(cached.get("key", "")) == str(key)
            and set(wanted) <= set(cached)
            and all(cached[k].shape[0] == len(paths) for k in wanted)
        ):
            if main:
                save_npz(tmp / old.name, **cached)
            return {k: cached[k].astype(np.float32) for k in wanted}
        log.info("%s: made by another model, input policy or distractor set: described again", old)
    raw, failed = describe_multiscale(
        model,
        [ImageItem(p) for p in paths],
        image_size=policy.image_size,
        scales=policy.scales,
        resize=policy.resize,
        batch_size=params.extract.batch_size,
        device=next(model.parameters()).device,
        num_workers=params.base.num_workers,
        progress=name,
        resize_filter=model.config.resize_filter,
        trunk_depth=params.train.frozen_stages,
    )
    white = whiten_descriptors(model, raw)
    out = {"db": (raw if white is None else white).numpy()}
    if keep_raw:
        out["db_raw"] = raw.numpy()
    for arr in out.values():
        arr[sorted(failed)] = 0.0  # a zero row matches nothing: an unreadable distractor
    if failed:
        log.warning("%s: %d of %d distractors unreadable", name, len(failed), len(paths))
    dtype = np.float16 if params.extract.float16 else np.float32
    if main:
        save_npz(tmp / old.name, key=key, **{k: v.astype(dtype) for k, v in out.items()})
    return {k: v.astype(dtype).astype(np.float32) for k, v in out.items()}


def _load_cache(path: Path) -> dict[str, np.ndarray]:
    """A distractor cache, or {} when it cannot be read (then it is described again)."""
    try:
        return load_npz(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        log.warning("%s: unreadable distractor cache (%s), described again", path, err)
        return {}


def _manifest(
    params: Params,
    model: RetrievalNet,
    request: EvaluateRequest,
    variants: list[str],
    policy: InputPolicy,
    folder: Path,
) -> dict[str, Any]:
    """What made the results in `folder`: model file and checksum, params, variants, code."""
    ckpt = request.checkpoint
    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    return {
        "command": "evaluate",
        "checkpoint": None if ckpt is None else {"path": str(ckpt), "sha256": file_digest(ckpt)},
        "model": asdict(model.config),
        "whitened": model.whitening is not None,
        "input": policy.to_json(),
        "variants": variants,
        "datasets": list(request.datasets),
        "distractors": request.distractors,
        "data_root": str(request.data_root),
        "params": params_to_dict(params),
        "code": code_version(),
        "files": sorted(files),
        # checked by the report; the wall-clock timing.json differs on every run (never hashed)
        "sha256": {f: file_digest(folder / f) for f in sorted(files) if f != EVAL_TIMING},
    }
