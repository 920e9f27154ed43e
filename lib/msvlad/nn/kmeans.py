"""NetVLAD centroid initialisation: k-means on the local bag of sampled training images.

Two implementations (`cluster.kmeans`): faiss k-means, and scikit-learn's MiniBatchKMeans with the
arguments of the authors' released code, which called it with every argument at the defaults of
scikit-learn 0.21.3; later releases changed two of them (batch_size 100 -> 1024, n_init 3 ->
"auto"), so they are written out here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import faiss
import numpy as np
import torch
from tqdm import tqdm

from msvlad.config import KMeansName
from msvlad.nn import functional as LF
from msvlad.nn.model import RetrievalNet

log = logging.getLogger(__name__)

# MiniBatchKMeans(n_clusters=K, random_state=seed) as scikit-learn 0.21.3 resolved its defaults.
AUTHORS_MINIBATCH_KMEANS: dict[str, object] = {
    "init": "k-means++",
    "max_iter": 100,
    "batch_size": 100,
    "n_init": 3,
    "tol": 0.0,
    "max_no_improvement": 10,
    "init_size": None,  # 3 * batch_size
    "reassignment_ratio": 0.01,
    "compute_labels": True,
}


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
    local: np.ndarray,
    num_clusters: int,
    *,
    niter: int = 25,
    seed: int = 0,
    method: KMeansName = "faiss",
) -> np.ndarray:
    """k-means centroids (K, D) float32 of the local descriptors (not re-normalised)."""
    if len(local) < num_clusters:
        raise ValueError(
            f"model.num_clusters={num_clusters} exceeds the {len(local)} local descriptors sampled"
        )
    if method == "sklearn_minibatch":
        from sklearn.cluster import MiniBatchKMeans

        mbk = MiniBatchKMeans(num_clusters, random_state=seed, **AUTHORS_MINIBATCH_KMEANS)
        return mbk.fit(local).cluster_centers_.astype(np.float32)
    if method != "faiss":
        raise ValueError(f"cluster.kmeans: {method!r} is not one of ['faiss', 'sklearn_minibatch']")
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
