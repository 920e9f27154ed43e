"""NetVLAD centroid initialisation: faiss k-means on the local bag of sampled training images."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import faiss
import numpy as np
import torch
from tqdm import tqdm

from msvlad.nn import functional as LF
from msvlad.nn.model import RetrievalNet

log = logging.getLogger(__name__)


@torch.no_grad()
def sample_local_features(
    model: RetrievalNet,
    batches: Iterable[torch.Tensor],
    *,
    max_locals: int,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Local descriptors (M, D) exactly as fed to NetVLAD (pooled, split, L2), subsampled.

    `batches` yields image batches (B, 3, H, W) in [0, 1] at the training resolution.
    """
    model.eval()
    chunks = []
    for batch in tqdm(batches, desc="cluster: locals", leave=False):
        local = model.local_features(batch.to(device))  # (B, N, D)
        chunks.append(local.reshape(-1, local.shape[-1]).float().cpu())
    if not chunks:
        raise ValueError("cluster: none of the sampled training images could be read")
    locals_ = torch.cat(chunks).numpy()
    if len(locals_) > max_locals:
        rng = np.random.default_rng(seed)
        locals_ = locals_[np.sort(rng.choice(len(locals_), max_locals, replace=False))]
    return np.ascontiguousarray(locals_, dtype=np.float32)


def kmeans_centroids(
    local: np.ndarray, num_clusters: int, *, niter: int = 25, seed: int = 0
) -> np.ndarray:
    """faiss k-means centroids (K, D) of the local descriptors."""
    if len(local) < num_clusters:
        raise ValueError(
            f"model.num_clusters={num_clusters} exceeds the {len(local)} local descriptors sampled"
        )
    km = faiss.Kmeans(
        local.shape[1], num_clusters, niter=niter, seed=seed, verbose=False, spherical=False
    )
    km.train(local)
    return km.centroids.astype(np.float32)


def init_netvlad(
    model: RetrievalNet, local: np.ndarray, centroids: np.ndarray, alpha_rule: str
) -> float:
    """Initialise the model's NetVLAD from centroids; returns the alpha used."""
    c = torch.from_numpy(centroids)
    alpha = model.pooling.alpha
    if alpha_rule == "v1":
        alpha = LF.netvlad_alpha_v1(torch.from_numpy(local), c)
    model.pooling.init_from_centroids(c.to(next(model.parameters()).device), alpha)
    return float(alpha)
