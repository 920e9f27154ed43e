"""Describe a retrieval dataset with a model and score it (shared by evaluation and validation).

The test-time input policy (`InputPolicy`: base size, resize policy, scales, query scale) comes from
the `extract` section and falls back to the model's training size and policy; it never changes the
network. One extraction gives the raw multi-scale descriptors and, for a whitened model, their
whitened copy, so the `raw` variant costs no second pass. Unreadable images are never scored
silently: a failed query is an error (or, with `evaluate.skip_failed_queries`, left out and named),
failed database images are named and ranked last, and too many of them are an error.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch

from msvlad.config import MIN_IMAGE_SIZE, EvaluateConfig, ExtractConfig, ModelConfig, Params
from msvlad.data.testsets import RetrievalDataset
from msvlad.errors import InputError
from msvlad.evaluation.extract import ImageItem, describe_multiscale, whiten_descriptors
from msvlad.evaluation.protocol import RetrievalMetrics, evaluate
from msvlad.evaluation.search import alpha_dba, alpha_qe, search

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputPolicy:
    """How test images are fed to the network: base size, resize policy, scales, query scale."""

    image_size: int
    resize: str
    scales: tuple[float, ...]
    query_scale: float

    @property
    def query_size(self) -> int:
        """Base size of the (cropped) queries."""
        return max(MIN_IMAGE_SIZE, round(self.image_size * self.query_scale))

    def to_json(self) -> dict:
        """The policy as metrics.json and the manifest record it."""
        return {**asdict(self), "scales": list(self.scales)}


def input_policy(model_cfg: ModelConfig, extract_cfg: ExtractConfig) -> InputPolicy:
    """The test-time policy: `extract.*`, with null size/resize taken from the model's training."""
    return InputPolicy(
        image_size=extract_cfg.image_size or model_cfg.image_size,
        resize=extract_cfg.resize or model_cfg.resize,
        scales=tuple(extract_cfg.scales),
        query_scale=extract_cfg.query_scale,
    )


@dataclass
class DatasetDescriptors:
    """Query and database descriptors of one dataset, (n_q, D) and (n_db, D) float32.

    `q`/`db` are whitened when the model has a whitening, `q_raw`/`db_raw` the same descriptors
    before it (None for a model without whitening, whose `q`/`db` are raw). Failed images have zero
    rows and are listed index -> error.
    """

    q: np.ndarray
    db: np.ndarray
    failed_queries: dict[int, str]
    failed_db: dict[int, str]
    q_raw: np.ndarray | None = None
    db_raw: np.ndarray | None = None


def dataset_items(dataset: RetrievalDataset) -> tuple[list[ImageItem], list[ImageItem]]:
    """Query items (cropped to bbx, rotated if listed) and database items of a dataset."""
    rot = dataset.rotations
    queries = [
        ImageItem(dataset.query_path(i), dataset.query_bbx(i), rot.get(dataset.qimlist[i], 0))
        for i in range(len(dataset.qimlist))
    ]
    db = [
        ImageItem(dataset.image_path(i), None, rot.get(dataset.imlist[i], 0))
        for i in range(len(dataset.imlist))
    ]
    return queries, db


def describe_dataset(
    model: torch.nn.Module,
    dataset: RetrievalDataset,
    *,
    model_cfg: ModelConfig,
    extract_cfg: ExtractConfig,
    policy: InputPolicy | None = None,
    whiten: bool = True,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    trunk_depth: int = 0,
) -> DatasetDescriptors:
    """Multi-scale descriptors of queries (at query_scale of the db size) and database images.

    `trunk_depth` (`train.frozen_stages`): leading backbone stages read from the frozen-trunk
    cache, shared by every model with the same weights there (bit-identical descriptors).
    """
    policy = policy or input_policy(model_cfg, extract_cfg)
    q_items, db_items = dataset_items(dataset)
    common = dict(
        scales=policy.scales,
        resize=policy.resize,
        resize_filter=model_cfg.resize_filter,
        batch_size=extract_cfg.batch_size,
        device=device,
        num_workers=num_workers,
        trunk_depth=trunk_depth,
    )
    q_raw, q_fail = describe_multiscale(
        model,
        q_items,
        image_size=policy.query_size,
        progress=f"{dataset.name} queries",
        **common,
    )
    db_raw, db_fail = describe_multiscale(
        model,
        db_items,
        image_size=policy.image_size,
        progress=f"{dataset.name} database",
        **common,
    )
    q_white = whiten_descriptors(model, q_raw) if whiten else None
    db_white = whiten_descriptors(model, db_raw) if whiten else None
    f16 = extract_cfg.float16
    q_r, db_r = _finish(q_raw, q_fail, f16), _finish(db_raw, db_fail, f16)
    if q_white is None or db_white is None:
        return DatasetDescriptors(q_r, db_r, q_fail, db_fail)
    q_w, db_w = _finish(q_white, q_fail, f16), _finish(db_white, db_fail, f16)
    return DatasetDescriptors(q_w, db_w, q_fail, db_fail, q_r, db_r)


def _finish(desc: torch.Tensor, failed: dict[int, str], float16: bool) -> np.ndarray:
    """float32 array with zero rows for failed images (rounded through float16 if asked)."""
    out = desc.numpy().astype(np.float32)
    out[sorted(failed)] = 0.0
    return out.astype(np.float16).astype(np.float32) if float16 else out


def check_failures(
    desc: DatasetDescriptors, dataset: RetrievalDataset, cfg: EvaluateConfig
) -> list[int]:
    """Apply the failure rules; returns the indices of the queries to score."""
    if desc.failed_queries:
        first = desc.failed_queries[min(desc.failed_queries)]
        if not cfg.skip_failed_queries:
            raise InputError(
                f"{first} (query {min(desc.failed_queries)} of {dataset.name}; "
                f"{len(desc.failed_queries)} failed; evaluate.skip_failed_queries=true leaves "
                "them out)"
            )
        if len(desc.failed_queries) == len(dataset.qimlist):
            raise InputError(f"{dataset.root}: every query is unreadable, e.g. {first}")
        log.warning(
            "%s: %d of %d queries unreadable, left out of the metrics (e.g. %s)",
            *(dataset.name, len(desc.failed_queries), len(dataset.qimlist), first),
        )
    n_db = len(dataset.imlist)
    if desc.failed_db:
        first = desc.failed_db[min(desc.failed_db)]
        if len(desc.failed_db) == n_db or len(desc.failed_db) > cfg.max_failed_db * n_db:
            raise InputError(
                f"{dataset.root}: {len(desc.failed_db)} of {n_db} database images unreadable "
                f"(evaluate.max_failed_db = {cfg.max_failed_db}), e.g. {first}"
            )
        log.warning(
            "%s: %d of %d database images unreadable, ranked last (e.g. %s)",
            *(dataset.name, len(desc.failed_db), n_db, first),
        )
    return [i for i in range(len(dataset.qimlist)) if i not in desc.failed_queries]


def _demote(ranks: np.ndarray, failed: list[int]) -> np.ndarray:
    """Move failed database images to the bottom of every ranking column (order kept)."""
    if not failed:
        return ranks
    order = np.argsort(np.isin(ranks, failed), axis=0, kind="stable")
    return np.take_along_axis(ranks, order, axis=0)


def score(
    desc: DatasetDescriptors,
    dataset: RetrievalDataset,
    cfg: EvaluateConfig,
    *,
    variant: str = "plain",
    queries: list[int] | None = None,
) -> tuple[RetrievalMetrics, np.ndarray]:
    """Rank and evaluate `queries` (default all); variant 'raw' uses the unwhitened descriptors,
    'qe' applies alpha-QE to queries, 'dba' alpha-DBA to the db. Ranks cover every query."""
    q, db = (desc.q_raw, desc.db_raw) if variant == "raw" else (desc.q, desc.db)
    if q is None or db is None:
        raise InputError(f"evaluate.variants: 'raw' needs a whitened model ({dataset.name})")
    failed = sorted(desc.failed_db)
    if variant == "dba":
        db = alpha_dba(db, k=cfg.dba_k, alpha=cfg.dba_alpha)
    ranks = _demote(search(q, db, index=cfg.index)[0], failed)
    if variant == "qe":
        q = alpha_qe(q, db, ranks, k=cfg.qe_k, alpha=cfg.qe_alpha)
        ranks = _demote(search(q, db, index=cfg.index)[0], failed)
    keep = list(range(len(dataset.qimlist))) if queries is None else queries
    gnd = [dataset.gnd[i] for i in keep]
    metrics = evaluate(ranks[:, keep], gnd, dataset.protocol, kappas=tuple(cfg.kappas))
    return metrics, ranks


def per_query_frame(
    metrics: RetrievalMetrics, dataset: RetrievalDataset, failed_queries: dict[int, str]
) -> pd.DataFrame:
    """Per-query AP/P@k for every query (setup-major); left-out queries have NaN and `excluded`."""
    keep = [i for i in range(len(dataset.qimlist)) if i not in failed_queries]
    frame = metrics.per_query_frame([dataset.qimlist[i] for i in keep])
    frame["excluded"] = ""
    if not failed_queries:
        return frame
    parts = []
    for setup, part in frame.groupby("setup", sort=False):
        full = pd.DataFrame({"query": dataset.qimlist, "setup": setup})
        full = full.merge(part, on=["query", "setup"], how="left")
        for i, err in failed_queries.items():
            full.loc[i, "excluded"] = err
        parts.append(full)
    return pd.concat(parts, ignore_index=True).fillna({"excluded": ""})


@torch.no_grad()
def validation_map(
    model: torch.nn.Module, dataset: RetrievalDataset, params: Params, device: torch.device
) -> float:
    """Validation mAP (Medium for revisited sets): raw descriptors, one scale, training input.

    Only training keys decide it (model.image_size/resize, train.val_query_scale; float32
    descriptors, exact search, strict failure rules), so rows that differ in their test-time
    policy (`extract.*`, `evaluate.*`) train and validate the same run; extract.batch_size only
    sets the speed. The frozen stages' output of the validation images comes from the frozen-trunk
    cache, so an epoch's validation runs only the trained stages.
    """
    policy = InputPolicy(
        params.model.image_size, params.model.resize, (1.0,), params.train.val_query_scale
    )
    desc = describe_dataset(
        model,
        dataset,
        model_cfg=params.model,
        extract_cfg=ExtractConfig(batch_size=params.extract.batch_size),
        policy=policy,
        whiten=False,
        device=device,
        num_workers=params.base.num_workers,
        trunk_depth=params.train.frozen_stages,
    )
    rules = EvaluateConfig()
    queries = check_failures(desc, dataset, rules)
    metrics, _ = score(desc, dataset, rules, queries=queries)
    js = metrics.to_json()["mAP"]
    return float(js.get("medium", js.get("all", float("nan"))))
