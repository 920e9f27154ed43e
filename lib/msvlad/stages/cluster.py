"""`cluster` stage: build the network and k-means-initialise its NetVLAD centroids."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msvlad.config import Params, ResizeFilter
from msvlad.data.images import ImageItem, load_batch
from msvlad.data.trainsets import load_training_set
from msvlad.errors import InputError
from msvlad.nn.kmeans import init_netvlad, kmeans_centroids, sample_local_features
from msvlad.nn.model import build_model, save_model
from msvlad.runtime import resolve_device, seed_everything
from msvlad.storage import check_writable, remove_stale_temps

log = logging.getLogger(__name__)


def image_batches(
    paths: Sequence[Path],
    size: int,
    batch_size: int,
    resize_filter: ResizeFilter = "bilinear",
    root: Path | None = None,
) -> Iterator[torch.Tensor]:
    """Square-resized batches of training images; unreadable ones are left out (and logged).

    None of them readable is an `InputError` naming the training set folder `root`.
    """
    loaded = 0
    for start in range(0, len(paths), batch_size):
        items = [ImageItem(p) for p in paths[start : start + batch_size]]
        batch, _ = load_batch(items, size, "square", on_error="skip", resize_filter=resize_filter)
        if batch is not None:
            loaded += len(batch)
            yield batch
    if paths and not loaded:
        where = root if root is not None else Path(paths[0]).parent
        raise InputError(
            f"{where}: none of the {len(paths)} training images sampled for k-means could be "
            f"read (e.g. {paths[0]})"
        )


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
        batches = image_batches(
            [train_set.paths[i] for i in pick],
            params.model.image_size,
            params.cluster.batch_size,
            params.model.resize_filter,
            train_set.root,
        )
        local = sample_local_features(
            model,
            batches,
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
