"""`cluster` stage: build the network and k-means-initialise its NetVLAD centroids."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msvlad.config import Params
from msvlad.data.images import ImageItem, load_batch
from msvlad.data.trainsets import load_training_set
from msvlad.errors import InputError
from msvlad.nn.kmeans import init_netvlad, kmeans_centroids, sample_local_features
from msvlad.nn.model import RetrievalNet, build_model, save_model
from msvlad.nn.trunk_cache import TrunkJob, open_job
from msvlad.runtime import resolve_device, seed_everything
from msvlad.storage import check_writable, remove_stale_temps

log = logging.getLogger(__name__)


def run(params: Params, out: Path) -> Path:
    """Write the initial model: pooling as built, NetVLAD centroids from k-means on its bag."""
    check_writable(out.parent)
    remove_stale_temps(out.parent, out.name)  # left by a write a kill interrupted
    seed_everything(params.base.seed)
    device = resolve_device(params.base.device)
    model = build_model(params.model, mirror=params.data.mirror).to(device)
    extra: dict[str, Any] = {}
    if model.is_vlad:
        train_set = load_training_set(Path(params.data.root) / params.data.train_set)
        rng = np.random.default_rng(params.base.seed)
        n = min(params.cluster.num_images, len(train_set.paths))
        pick = np.sort(rng.choice(len(train_set.paths), n, replace=False))
        t0 = time.time()
        items = [ImageItem(train_set.paths[i]) for i in pick]
        depth = params.train.frozen_stages
        job = open_job(
            model,
            depth,
            items,
            size=params.model.image_size,
            resize="square",
            resize_filter=params.model.resize_filter,
            batch_size=params.cluster.batch_size,
            device=device,
            whole=True,  # a freshly built network: every stage has its pretrained weights
        )
        source = model if job is None else _FromTrunk(model, job.depth)
        local = sample_local_features(
            source,  # type: ignore[arg-type]  # local_features of image or trunk batches
            _batches(job, items, params, device, train_set.root),
            max_locals=params.cluster.max_locals,
            seed=params.base.seed,
            device=device,
        )
        centroids = kmeans_centroids(
            local,
            params.model.num_clusters,
            niter=params.cluster.niter,
            seed=params.base.seed,
            method=params.cluster.kmeans,
        )
        alpha = init_netvlad(model, local, centroids, params.model.alpha_rule)
        log.debug(
            "k-means (%s): %d locals from %d images -> %d centroids, alpha %.2f (%.1fs)",
            *(params.cluster.kmeans, len(local), n, len(centroids), alpha, time.time() - t0),
        )
        extra = {"alpha": alpha, "num_locals": len(local)}
    save_model(model.cpu(), out, **extra)
    log.info("cluster: initial %s model -> %s %s", params.model.pooling, out, extra or "")
    return out


class _FromTrunk:
    """The network seen from the output of its first `depth` stages (a frozen-trunk cache job)."""

    def __init__(self, model: RetrievalNet, depth: int) -> None:
        self.model, self.depth = model, depth

    def eval(self) -> _FromTrunk:
        self.model.eval()
        return self

    def local_features(self, trunk: torch.Tensor) -> torch.Tensor:
        """The bag NetVLAD aggregates, from trunk outputs (as `RetrievalNet.local_features`)."""
        return self.model.pooling.local_features(
            self.model.backbone.forward_stages(trunk, self.depth)
        )


def _batches(
    job: TrunkJob | None,
    items: list[ImageItem],
    params: Params,
    device: torch.device,
    root: Path,
) -> Iterator[torch.Tensor]:
    """Image batches (no job), or the job's trunk batches: stored, or computed and then stored.

    Unreadable images are left out of their batch (and logged); a job with one is not stored.
    None of them readable is an `InputError` naming the training set folder `root`.
    """
    if job is not None and job.cached is not None and job.cached.ok.all():
        yield from job.cached.batches
        return
    size, bs, resize_filter = (
        params.model.image_size,
        params.cluster.batch_size,
        params.model.resize_filter,
    )
    ok = np.zeros(len(items), dtype=bool)
    for start in range(0, len(items), bs):
        batch, ok[start : start + bs] = load_batch(
            items[start : start + bs], size, "square", on_error="skip", resize_filter=resize_filter
        )
        if batch is not None:
            yield batch if job is None else job.trunk(batch.to(device))
    if items and not ok.any():
        raise InputError(
            f"{root}: none of the {len(items)} training images sampled for k-means could be "
            f"read (e.g. {items[0].path})"
        )
    if job is not None:
        job.finish(ok, store=job.cached is None and bool(ok.all()))
