"""`evaluate` stage: extract, rank and score every test set; write metrics, features and ranks.

Per dataset (in `out/<dataset>/`, or `out/` itself with `flat`): `features.npz` (q, db float32,
one row per image, plus the image lists), `ranks.npy` (revisitop orientation: column j ranks
query j), `metrics[_qe|_dba].json` and `per_query[_qe|_dba].csv`; `out/metrics.json` gathers
every dataset and variant (mAP and mP@k in percent), `out/summary.json` only the mAPs (E/M/H,
plain and +QE) for `dvc metrics show`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msvlad.config import Params
from msvlad.data.images import ImageItem
from msvlad.data.testsets import RetrievalDataset, load_dataset, load_distractors
from msvlad.evaluation.extract import extract_descriptors
from msvlad.evaluation.pipeline import DatasetDescriptors, extract_dataset, score
from msvlad.evaluation.protocol import RetrievalMetrics, metrics_summary, metrics_table
from msvlad.nn.model import RetrievalNet
from msvlad.runtime import init_distributed, resolve_device, seed_everything
from msvlad.storage import load_npz, save_npy, save_npz, write_json, write_text

log = logging.getLogger(__name__)

VARIANTS: tuple[str, ...] = ("plain", "qe", "dba")


@dataclass(frozen=True)
class EvaluateRequest:
    """What to evaluate: the test sets under a root, the re-ranking variants, the output folder."""

    data_root: Path
    datasets: Sequence[str]
    out: Path
    variants: Sequence[str] = VARIANTS
    flat: bool = False  # a single dataset: write its files directly in `out`
    distractors: str | None = None  # e.g. revisitop1m: appended to every database (+1M rows)


def run(params: Params, model: RetrievalNet, request: EvaluateRequest) -> dict[str, Any]:
    """Evaluate `model` on every dataset of the request; returns the metrics.json content."""
    seed_everything(params.base.seed)
    device = resolve_device(params.base.device)
    dist_info = init_distributed()  # under torchrun every rank extracts a slice of each image list
    if dist_info.world > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    model = model.to(device).eval()
    out = request.out
    distractors = _distractors(params, model, request, device) if request.distractors else None
    summary: dict[str, Any] = {}
    tables: dict[str, RetrievalMetrics] = {}
    for name in request.datasets:
        dataset = load_dataset(request.data_root, name)
        t0 = time.time()
        desc = extract_dataset(
            model,
            dataset,
            model_cfg=model.config,
            extract_cfg=params.extract,
            device=device,
            num_workers=params.base.num_workers,
        )
        seconds = time.time() - t0
        if not dist_info.main:
            continue
        if distractors is not None:
            name = f"{name}+{request.distractors}"
        ddir = out / name if len(request.datasets) > 1 or not request.flat else out
        save_npz(
            ddir / "features.npz",
            q=desc.q,
            db=desc.db,
            qimlist=np.array(dataset.qimlist),
            imlist=np.array(dataset.imlist),
        )
        if distractors is not None:  # ranks past the dataset's images: never ok, never junk
            desc.db = np.concatenate([desc.db, distractors])
        summary[name] = _score_variants(
            params, request.variants, dataset, desc, name, seconds, ddir, tables
        )
    if dist_info.main:
        result = summary if not request.flat else next(iter(summary.values()))["plain"]
        write_json(out / "metrics.json", result)
        write_json(out / "summary.json", metrics_summary(summary))  # what `dvc metrics show` reads
        print(metrics_table(tables).to_string(float_format="{:.2f}".format, na_rep="-"))
        return result
    return {}


def _score_variants(
    params: Params,
    variants: Sequence[str],
    dataset: RetrievalDataset,
    desc: DatasetDescriptors,
    name: str,
    seconds: float,
    ddir: Path,
    tables: dict[str, RetrievalMetrics],
) -> dict[str, Any]:
    """Rank and score one dataset under every variant; write its per-variant files."""
    per_dataset: dict[str, Any] = {}
    for variant in variants:
        metrics, ranks = score(desc, dataset, params.evaluate, variant=variant)
        js = metrics.to_json()
        js.update(
            {
                "dataset": name,
                "protocol": dataset.protocol,
                "variant": variant,
                "num_queries": len(dataset.qimlist),
                "num_db": int(desc.db.shape[0]),
                "dim": int(desc.db.shape[1]),
                "extract_seconds": round(seconds, 2),
                "failed_images": len(desc.failed_queries) + len(desc.failed_db),
            }
        )
        tag = "" if variant == "plain" else f"_{variant}"
        write_json(ddir / f"metrics{tag}.json", js)
        frame = metrics.per_query_frame(dataset.qimlist)
        write_text(ddir / f"per_query{tag}.csv", frame.to_csv(index=False))
        if variant == "plain":
            save_npy(ddir / "ranks.npy", ranks.astype(np.int32))
        per_dataset[variant] = js
        tables[name if variant == "plain" else f"{name}+{variant.upper()}"] = metrics
    return per_dataset


def _distractors(
    params: Params, model: RetrievalNet, request: EvaluateRequest, device: torch.device
) -> np.ndarray:
    """Descriptors of a distractor set (e.g. revisitop1m), cached in OUT/<name>_features.npz."""
    name = request.distractors
    cache = request.out / f"{name}_features.npz"
    if cache.exists():
        return load_npz(cache)["db"]
    paths = load_distractors(request.data_root, name)
    log.info("describing %d distractors of %s", len(paths), name)
    db, _ = extract_descriptors(
        model,
        [ImageItem(p) for p in paths],
        image_size=params.model.image_size,
        scales=params.extract.scales,
        resize=params.model.resize,
        batch_size=params.extract.batch_size,
        device=device,
        num_workers=params.base.num_workers,
        progress=name,
        resize_filter=model.config.resize_filter,
    )
    save_npz(cache, db=db.astype(np.float16) if params.extract.float16 else db)
    return db.astype(np.float32)
