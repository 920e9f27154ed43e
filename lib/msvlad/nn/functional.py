"""Pure tensor math of the network: normalisation, pooling baselines, multi-scale bags, NetVLAD.

Every function here is stateless; the modules in `msvlad.nn.pooling` and `msvlad.nn.whitening`
wrap them.
Shapes: feature maps (B, C, H, W); bags of local descriptors (B, N, D); global descriptors (B, D).
References: NetVLAD (Arandjelovic et al., CVPR 2016); GeM / R-MAC as in cnnimageretrieval-pytorch;
multi-scale pooled bags as in Vaccaro et al., MVA 2022 (see docs in README).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from msvlad.config import BiasInit, VladNorm, check_value

# ----------------------------------------------------------------------------- normalisation


def l2n(x: Tensor, dim: int = -1, eps: float = 1e-6) -> Tensor:
    """L2-normalise along `dim`; eps keeps all-zero vectors finite."""
    return x / (x.norm(p=2, dim=dim, keepdim=True) + eps)


# --------------------------------------------------------------------- global pooling baselines


def mac(x: Tensor) -> Tensor:
    """MAC: spatial max of each channel, (B, C, H, W) -> (B, C)."""
    return x.amax(dim=(-2, -1))


def spoc(x: Tensor) -> Tensor:
    """SPoC: spatial mean of each channel, (B, C, H, W) -> (B, C)."""
    return x.mean(dim=(-2, -1))


def gem(x: Tensor, p: Tensor | float = 3.0, eps: float = 1e-6) -> Tensor:
    """GeM: generalised mean (mean of x^p)^(1/p) per channel, activations clamped at eps."""
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def rmac_regions(
    height: int, width: int, levels: int = 3, overlap: float = 0.4
) -> list[tuple[int, int, int]]:
    """R-MAC square regions (top, left, side) on an H x W map (grid of Tolias et al. / cirtorch)."""
    side = min(height, width)
    steps = torch.arange(2, 8, dtype=torch.float64)  # candidate region counts on the long side
    b = (max(height, width) - side) / (steps - 1)
    extra = int(torch.argmin(torch.abs((side**2 - side * b) / side**2 - overlap)).item()) + 1
    extra_w = extra if height < width else 0
    extra_h = extra if height > width else 0
    regions: list[tuple[int, int, int]] = []
    for level in range(1, levels + 1):
        wl = math.floor(2 * side / (level + 1))
        if wl == 0:
            continue
        wl2 = math.floor(wl / 2 - 1)
        starts = []
        for n_extra, extent in ((extra_h, height), (extra_w, width)):
            count = level + n_extra
            step = 0.0 if count == 1 else (extent - wl) / (count - 1)
            starts.append([int(math.floor(wl2 + i * step) - wl2) for i in range(count)])
        regions.extend((top, left, wl) for top in starts[0] for left in starts[1])
    return regions


def rmac(x: Tensor, levels: int = 3, eps: float = 1e-6) -> Tensor:
    """R-MAC: sum of L2-normalised MACs of the whole map and of the regional grid, (B, C)."""
    height, width = x.shape[-2:]
    v = l2n(mac(x), eps=eps)
    for top, left, side in rmac_regions(height, width, levels):
        v = v + l2n(mac(x[..., top : top + side, left : left + side]), eps=eps)
    return v


# --------------------------------------------------------------------- multi-scale local bags


def multiscale_local_features(
    fmap: Tensor, pool_sizes: Sequence[int] = (2, 3), split: int | None = 512, eps: float = 1e-6
) -> Tensor:
    """Bag of L2-normalised local descriptors from max-pooled regions at several scales.

    Each window size s max-pools the map at stride 1 (s=1 keeps the raw cells); every C-dim local
    feature is cut into C/split consecutive chunks (no cut when C <= split or split is None), and
    the chunks of all scales form one bag: (B, C, H, W) -> (B, N, min(C, split)).
    """
    b, c, h, w = fmap.shape
    if split is not None and c > split and c % split:
        raise ValueError(f"split={split} must divide the {c} backbone channels")
    dim = c if split is None or c <= split else split
    bags = []
    for s in pool_sizes:
        if s > h or s > w:
            continue  # map too small for this window: no region at this scale
        pooled = fmap if s == 1 else F.max_pool2d(fmap, kernel_size=s, stride=1)
        local = pooled.flatten(2).transpose(1, 2)  # (B, H'W', C)
        bags.append(local.reshape(b, -1, dim))  # (B, H'W' * C/dim, dim)
    if not bags:  # a tiny or extremely elongated image: fall back to the largest window that fits
        s = min(h, w)
        pooled = F.max_pool2d(fmap, kernel_size=s, stride=1)
        bags.append(pooled.flatten(2).transpose(1, 2).reshape(b, -1, dim))
    return l2n(torch.cat(bags, dim=1), eps=eps)


def bag_size(
    channels: int, height: int, width: int, pool_sizes: Sequence[int], split: int | None
) -> int:
    """Number of local descriptors `multiscale_local_features` yields for one map."""
    chunks = 1 if split is None or channels <= split else channels // split
    sizes = [s for s in pool_sizes if s <= min(height, width)] or [min(height, width)]
    return chunks * sum((height - s + 1) * (width - s + 1) for s in sizes)


# ----------------------------------------------------------------------------- NetVLAD


VLAD_NORMS: tuple[str, ...] = get_args(VladNorm)  # params.yaml's model.vlad_norm
BIAS_INITS: tuple[str, ...] = get_args(BiasInit)  # params.yaml's model.bias_init


def vlad_normalize(vlad: Tensor, norm: str = "intra", eps: float = 1e-6) -> Tensor:
    """Normalise and flatten residuals (B, ..., K, D) into the final L2 descriptor (B, ...*K*D).

    intra: L2 of each cluster's D-vector, flatten cluster-major, L2 (Arandjelovic et al.).
    across_clusters: L2 of each feature dimension over the K clusters, flatten dimension-major
    (index d*K + k), L2, with torch's max(norm, 1e-12) guard: the layer of the authors' released
    code, which builds V as (B, D, K) and normalises its last axis.
    """
    if norm == "intra":
        return l2n(l2n(vlad, dim=-1, eps=eps).flatten(1), eps=eps)
    if norm == "across_clusters":
        per_dim = F.normalize(vlad, p=2.0, dim=-2, eps=1e-12).transpose(-1, -2)  # (..., D, K)
        return F.normalize(per_dim.flatten(1), p=2.0, dim=1, eps=1e-12)
    raise ValueError(f"model.vlad_norm: {norm!r} is not one of {list(VLAD_NORMS)}")


def netvlad(
    local: Tensor,
    centroids: Tensor,
    weight: Tensor,
    bias: Tensor,
    eps: float = 1e-6,
    norm: str = "intra",
) -> Tensor:
    """NetVLAD of a bag: soft-assign, aggregate residuals densely, normalise, flatten, L2.

    local (B, N, D), centroids and weight (K, D), bias (K,) -> (B, K*D).
    V_k = sum_i a_k(x_i) (x_i - c_k) = (sum_i a_k x_i) - (sum_i a_k) c_k, with no per-cluster loop;
    `norm` chooses the normalisation (`vlad_normalize`).
    """
    assign = torch.softmax(local @ weight.t() + bias, dim=-1)  # (B, N, K)
    vlad = assign.transpose(1, 2) @ local  # (B, K, D)
    vlad = vlad - assign.sum(dim=1).unsqueeze(-1) * centroids  # (B, K, D)
    return vlad_normalize(vlad, norm, eps)


def netvlad_grouped(
    local: Tensor,
    centroids: Tensor,
    weight: Tensor,
    bias: Tensor,
    eps: float = 1e-6,
    norm: str = "intra",
) -> Tensor:
    """One NetVLAD per channel group, concatenated then L2 (the per-split ablation).

    local (B, G, N, D), centroids and weight (G, K, D), bias (G, K) -> (B, G*K*D).
    """
    assign = torch.softmax(torch.einsum("bgnd,gkd->bgnk", local, weight) + bias[:, None, :], dim=-1)
    vlad = torch.einsum("bgnk,bgnd->bgkd", assign, local)
    vlad = vlad - assign.sum(dim=2).unsqueeze(-1) * centroids  # (B, G, K, D)
    return vlad_normalize(vlad, norm, eps)


def pooled_maps(fmap: Tensor, pool_sizes: Sequence[int]) -> list[Tensor]:
    """The stride-1 max-pooled maps of `multiscale_local_features`, one per window that fits.

    An s x s window is the union of the four (s-1) x (s-1) windows at offsets (0|1, 0|1), so the
    s-map is the 2 x 2 stride-1 max-pool of the (s-1)-map: the maps are built by chaining 2 x 2
    pools (4 comparisons per output instead of s^2), with exactly the same values. Gradients match
    too, except where a window holds several equal maxima (there the gradient may go to another
    of them: post-ReLU zeros, whose gradient the ReLU drops anyway). With no window fitting, the
    largest that does (min(H, W)), as `multiscale_local_features` does.
    """
    h, w = fmap.shape[-2:]
    sizes = [s for s in pool_sizes if s <= h and s <= w] or [min(h, w)]
    maps, current, size = {}, fmap, 1
    for s in sorted(set(sizes)):
        while size < s:
            current, size = F.max_pool2d(current, kernel_size=2, stride=1), size + 1
        maps[s] = current
    return [maps[s] for s in sizes]


def multiscale_netvlad(
    fmap: Tensor,
    centroids: Tensor,
    weight: Tensor,
    bias: Tensor,
    pool_sizes: Sequence[int] = (2, 3),
    split: int | None = 512,
    eps: float = 1e-6,
    norm: str = "intra",
) -> Tensor:
    """NetVLAD of the multi-scale bag of a feature map, with the bag's normalisation folded in.

    Equals `netvlad(multiscale_local_features(fmap, pool_sizes, split), ...)` up to float
    summation order; with per-group parameters (centroids and weight (G, K, D), bias (G, K)) it
    equals `netvlad_grouped` of the per-group bags. The pooled maps come from chained 2 x 2
    max-pools (`pooled_maps`); each one's locals (B, H'W' * C/D, D) are a view of it for a
    channels-last map (the backbones' layout), and the scales are joined by one copy in the map's
    dtype (one kernel, where aggregating each scale apart would launch each kernel below once per
    scale: on a GPU at small batches the launches cost more than the copy). The L2 normalisation
    of a local x is folded into its logits w.x / |x| and aggregation weights a / |x|, so neither a
    normalised bag nor (under autocast) its cast copy is made: the two matmuls read the bag as it
    is, in the autocast dtype. fmap (B, C, H, W) -> (B, K*D) (grouped: (B, G*K*D)).
    """
    b, c = fmap.shape[:2]
    if split is not None and c > split and c % split:
        raise ValueError(f"split={split} must divide the {c} backbone channels")
    dim = c if split is None or c <= split else split
    locals_ = [m.permute(0, 2, 3, 1).reshape(b, -1, dim) for m in pooled_maps(fmap, pool_sizes)]
    x = locals_[0] if len(locals_) == 1 else torch.cat(locals_, dim=1)  # (B, N, D)
    inv = torch.linalg.vector_norm(x, dim=-1, keepdim=True).add(eps).reciprocal()  # (B, N, 1)
    if weight.dim() == 3:  # one NetVLAD per chunk
        x, inv = x.view(b, -1, c // dim, dim), inv.view(b, -1, c // dim, 1)  # (B, P, G, D)
        logits = torch.addcmul(bias, torch.einsum("bpgd,gkd->bpgk", x, weight), inv)
        assign = torch.softmax(logits, dim=-1)  # (B, P, G, K)
        vlad = torch.einsum("bpgk,bpgd->bgkd", assign * inv, x)  # (B, G, K, D)
    else:
        assign = torch.softmax(torch.addcmul(bias, torch.matmul(x, weight.t()), inv), dim=-1)
        vlad = torch.matmul((assign * inv).transpose(1, 2), x)  # (B, K, D)
    residuals = torch.addcmul(vlad, assign.sum(dim=1).unsqueeze(-1), centroids, value=-1.0)
    return vlad_normalize(residuals, norm, eps)


def netvlad_params_from_centroids(
    centroids: Tensor, alpha: float, bias_init: str = "squared_norm"
) -> tuple[Tensor, Tensor]:
    """Decoupled NetVLAD init from k-means centroids: weight = 2*alpha*c, bias from |c|.

    squared_norm: bias = -alpha*|c|^2, the NetVLAD paper's (soft-assignment = -alpha*|x - c|^2 up
    to a per-x constant); norm: bias = -alpha*|c|, the authors' released code.
    """
    if bias_init == "squared_norm":
        bias = -alpha * centroids.pow(2).sum(dim=-1)
    elif bias_init == "norm":
        bias = -alpha * torch.linalg.vector_norm(centroids, dim=-1)
    else:
        raise ValueError(f"model.bias_init: {bias_init!r} is not one of {list(BIAS_INITS)}")
    return 2.0 * alpha * centroids, bias


def netvlad_alpha_v1(descriptors: Tensor, centroids: Tensor, ratio: float = 100.0) -> float:
    """Original NetVLAD alpha: -ln(1/ratio) / mean gap between the two best centroid dot products.

    Makes the best/second-best soft-assignment ratio about `ratio` on average (Arandjelovic et al.),
    with descriptors and centroids L2-normalised.
    """
    dots = l2n(descriptors) @ l2n(centroids).t()
    top2 = dots.topk(2, dim=1).values
    gap = (top2[:, 0] - top2[:, 1]).mean().item()
    if gap <= 0:
        raise ValueError("centroids are degenerate: the two best dot products coincide on average")
    return math.log(ratio) / gap


# ----------------------------------------------------------------------------- whitening


def pca_whiten(x: Tensor, mean: Tensor, projection: Tensor, eps: float = 1e-6) -> Tensor:
    """Apply learned PCA-whitening (x - mean) @ P, then L2: (N, D) -> (N, d)."""
    return l2n((x - mean) @ projection, eps=eps)


def fit_pca_whitening(
    x: Tensor, dim: int | None = None, power: float = 0.5, eps: float = 1e-9
) -> tuple[Tensor, Tensor, Tensor]:
    """Learn PCA-whitening from (N, D): mean (D,), projection (D, d), eigenvalues (d,).

    projection = U[:, :d] / eigenvalue^power: power 0.5 whitens the training set exactly.
    """
    power = check_value("whiten.power", power)
    x = x.double()
    n, d_in = x.shape
    dim = min(d_in, n - 1) if dim is None else check_value("whiten.dim", dim)
    if not 0 < dim <= min(d_in, n - 1):
        raise ValueError(f"whitening dim {dim} must be in [1, min(D={d_in}, N-1={n - 1})]")
    mean = x.mean(dim=0)
    xc = x - mean
    if n - 1 < d_in:  # dual trick: eigenvectors of the small Gram matrix
        evals, evecs = torch.linalg.eigh(xc @ xc.t() / (n - 1))
        order = evals.argsort(descending=True)[:dim]
        evals = evals[order]
        evecs = xc.t() @ evecs[:, order] / torch.sqrt((n - 1) * evals.clamp(min=eps))
    else:
        evals, evecs = torch.linalg.eigh(xc.t() @ xc / (n - 1))
        order = evals.argsort(descending=True)[:dim]
        evals, evecs = evals[order], evecs[:, order]
    evals = evals.clamp(min=eps)
    projection = evecs / evals.pow(power)
    return mean.float(), projection.float(), evals.float()
