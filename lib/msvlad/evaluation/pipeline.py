"""Describe a retrieval dataset with a model and score it (shared by evaluation and validation)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from msvlad.config import EvaluateConfig, ExtractConfig, ModelConfig
from msvlad.data.testsets import RetrievalDataset
from msvlad.evaluation.extract import ImageItem, extract_descriptors
from msvlad.evaluation.protocol import RetrievalMetrics, evaluate
from msvlad.evaluation.search import alpha_dba, alpha_qe, search

log = logging.getLogger(__name__)


@dataclass
class DatasetDescriptors:
    """Query and database descriptors of one dataset, (n_q, D) and (n_db, D) float32."""

    q: np.ndarray
    db: np.ndarray
    failed_queries: list[int]
    failed_db: list[int]


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


def extract_dataset(
    model: torch.nn.Module,
    dataset: RetrievalDataset,
    *,
    model_cfg: ModelConfig,
    extract_cfg: ExtractConfig,
    scales: list[float] | None = None,
    whiten: bool = True,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
) -> DatasetDescriptors:
    """Multi-scale descriptors of queries (at query_scale of the db size) and database images."""
    scales = extract_cfg.scales if scales is None else scales
    q_items, db_items = dataset_items(dataset)
    common = dict(
        scales=scales,
        resize=model_cfg.resize,
        resize_filter=model_cfg.resize_filter,
        batch_size=extract_cfg.batch_size,
        device=device,
        num_workers=num_workers,
        whiten=whiten,
    )
    q_size = max(32, round(model_cfg.image_size * extract_cfg.query_scale))
    q, q_fail = extract_descriptors(
        model, q_items, image_size=q_size, progress=f"{dataset.name} queries", **common
    )
    db, db_fail = extract_descriptors(
        model,
        db_items,
        image_size=model_cfg.image_size,
        progress=f"{dataset.name} database",
        **common,
    )
    if extract_cfg.float16:
        q, db = q.astype(np.float16).astype(np.float32), db.astype(np.float16).astype(np.float32)
    return DatasetDescriptors(q, db, q_fail, db_fail)


def score(
    desc: DatasetDescriptors,
    dataset: RetrievalDataset,
    cfg: EvaluateConfig,
    *,
    variant: str = "plain",
) -> tuple[RetrievalMetrics, np.ndarray]:
    """Rank and evaluate; variant 'qe' applies alpha-QE to queries, 'dba' alpha-DBA to the db."""
    q, db = desc.q, desc.db
    if variant == "dba":
        db = alpha_dba(db, k=cfg.dba_k, alpha=cfg.dba_alpha)
    ranks, _ = search(q, db, index=cfg.index)
    if variant == "qe":
        q = alpha_qe(q, db, ranks, k=cfg.qe_k, alpha=cfg.qe_alpha)
        ranks, _ = search(q, db, index=cfg.index)
    metrics = evaluate(ranks, dataset.gnd, dataset.protocol, kappas=tuple(cfg.kappas))
    return metrics, ranks
