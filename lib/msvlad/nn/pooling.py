"""nn.Module wrappers around `msvlad.nn.functional`: global poolings and (multi-scale) NetVLAD.

Every pooling maps a feature map (B, C, H, W) to an L2-normalised descriptor (B, D) and reports
`out_dim`. VLAD poolings also expose `local_features` (the bag fed to NetVLAD, used for k-means).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from msvlad.config import ConfigError, check_value
from msvlad.nn import functional as LF


class MAC(nn.Module):
    """Max pooling over space (Tolias et al.)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.out_dim = in_channels

    def forward(self, x: Tensor) -> Tensor:
        return LF.l2n(LF.mac(x))


class SPoC(nn.Module):
    """Average pooling over space (Babenko & Lempitsky)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.out_dim = in_channels

    def forward(self, x: Tensor) -> Tensor:
        return LF.l2n(LF.spoc(x))


# cirtorch trains GeM's exponent p at 10x the network's learning rate (and without weight decay)
GEM_P_LR_SCALE = 10.0


class GeM(nn.Module):
    """Generalised-mean pooling with a learnable exponent p (Radenovic et al.).

    p is a trained parameter; `optimizer_groups` gives it cirtorch's learning rate.
    """

    def __init__(self, in_channels: int, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.out_dim = in_channels
        self.p = nn.Parameter(torch.tensor(check_value("model.gem_p", p)))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return LF.l2n(LF.gem(x, self.p, self.eps))

    def extra_repr(self) -> str:
        return f"p={self.p.item():.4f}"


class RMAC(nn.Module):
    """Regional MAC over a 3-level square grid (Tolias et al.)."""

    def __init__(self, in_channels: int, levels: int = 3) -> None:
        super().__init__()
        self.out_dim = in_channels
        self.levels = levels

    def forward(self, x: Tensor) -> Tensor:
        return LF.l2n(LF.rmac(x, self.levels))

    def extra_repr(self) -> str:
        return f"levels={self.levels}"


class NetVLAD(nn.Module):
    """NetVLAD over a bag of local features pooled at several window sizes (the paper's layer).

    pool_sizes=(2, 3) with split=512 is the paper's multi-scale pooled NetVLAD (one shared bag);
    pool_sizes=(1,) with split=None is the plain single-scale NetVLAD of Arandjelovic et al.
    Centroids, assignment weights and biases are three independent trainable tensors. `norm`
    and `bias_init` choose the normalisation and the bias initialisation (`model.vlad_norm`,
    `model.bias_init`; "across_clusters" and "norm" are the authors' released code).
    """

    def __init__(
        self,
        in_channels: int,
        num_clusters: int = 64,
        pool_sizes: Sequence[int] = (2, 3),
        split: int | None = 512,
        alpha: float = 30.0,
        norm: str = "intra",
        bias_init: str = "squared_norm",
    ) -> None:
        super().__init__()
        num_clusters = check_value("model.num_clusters", num_clusters)
        pool_sizes = check_value("model.pool_sizes", pool_sizes)
        split = check_value("model.split", split)
        alpha = check_value("model.alpha", alpha)
        check_value("model.vlad_norm", norm)
        check_value("model.bias_init", bias_init)
        if split is not None and in_channels > split and in_channels % split:
            raise ConfigError(
                f"model.split={split} must divide the backbone's {in_channels} channels"
            )
        self.pool_sizes = tuple(pool_sizes)
        self.split = split
        self.dim = in_channels if split is None or in_channels <= split else split
        self.num_clusters = num_clusters
        self.alpha = alpha
        self.norm = norm
        self.bias_init = bias_init
        self.out_dim = num_clusters * self.dim
        self.centroids = nn.Parameter(torch.randn(num_clusters, self.dim) * 0.1)
        weight, bias = LF.netvlad_params_from_centroids(self.centroids.data, alpha, bias_init)
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)

    def local_features(self, x: Tensor) -> Tensor:
        """The L2-normalised bag (B, N, D) that NetVLAD aggregates."""
        return LF.multiscale_local_features(x, self.pool_sizes, self.split)

    @torch.no_grad()
    def init_from_centroids(self, centroids: Tensor, alpha: float | None = None) -> None:
        """Set centroids (K, D) from k-means and the decoupled weight/bias from them."""
        if tuple(centroids.shape) != tuple(self.centroids.shape):
            raise ValueError(
                f"centroids have shape {tuple(centroids.shape)}, "
                f"expected {tuple(self.centroids.shape)}"
            )
        self.alpha = self.alpha if alpha is None else float(alpha)
        weight, bias = LF.netvlad_params_from_centroids(
            centroids.to(self.centroids), self.alpha, self.bias_init
        )
        self.centroids.copy_(centroids)
        self.weight.copy_(weight)
        self.bias.copy_(bias)

    def forward(self, x: Tensor) -> Tensor:
        """`LF.netvlad` of `local_features(x)`, computed without building the bag."""
        return LF.multiscale_netvlad(
            x, self.centroids, self.weight, self.bias, self.pool_sizes, self.split, norm=self.norm
        )

    def extra_repr(self) -> str:
        return (
            f"K={self.num_clusters}, D={self.dim}, pool_sizes={self.pool_sizes}, split={self.split}"
            f", norm={self.norm}, bias_init={self.bias_init}"
        )


class VLADConcat(NetVLAD):
    """Ablation: one NetVLAD per channel split, concatenated then L2 (the early "multivlad")."""

    def __init__(
        self,
        in_channels: int,
        num_clusters: int = 64,
        pool_sizes: Sequence[int] = (2, 3),
        split: int | None = 512,
        alpha: float = 30.0,
        norm: str = "intra",
        bias_init: str = "squared_norm",
    ) -> None:
        super().__init__(in_channels, num_clusters, pool_sizes, split, alpha, norm, bias_init)
        self.groups = in_channels // self.dim
        self.out_dim = self.groups * num_clusters * self.dim
        c = torch.randn(self.groups, num_clusters, self.dim) * 0.1
        weight, bias = LF.netvlad_params_from_centroids(c, alpha, bias_init)
        self.centroids = nn.Parameter(c)
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)

    def grouped_local_features(self, x: Tensor) -> Tensor:
        """Bag per channel group: (B, G, N, D)."""
        bags = [
            LF.multiscale_local_features(
                x[:, g * self.dim : (g + 1) * self.dim], self.pool_sizes, None
            )
            for g in range(self.groups)
        ]
        return torch.stack(bags, dim=1)

    def local_features(self, x: Tensor) -> Tensor:
        return self.grouped_local_features(x).flatten(1, 2)

    @torch.no_grad()
    def init_from_centroids(self, centroids: Tensor, alpha: float | None = None) -> None:
        """Shared k-means centroids (K, D) copied to every group, or per-group (G, K, D)."""
        if centroids.dim() == 2:
            centroids = centroids.unsqueeze(0).expand(self.groups, -1, -1)
        super().init_from_centroids(centroids.contiguous(), alpha)

    def forward(self, x: Tensor) -> Tensor:
        """`LF.netvlad_grouped` of `grouped_local_features(x)`, without building the bags."""
        return LF.multiscale_netvlad(
            x, self.centroids, self.weight, self.bias, self.pool_sizes, self.dim, norm=self.norm
        )


def optimizer_groups(module: nn.Module, params: Sequence[nn.Parameter]) -> list[dict[str, Any]]:
    """Optimiser groups of `params`: GeM exponents at GEM_P_LR_SCALE x the lr, as cirtorch.

    The group of the exponents carries `lr_scale` (the trainer multiplies the scheduled lr by
    it) and no weight decay; every other parameter stays in one plain group, so a network
    without GeM gets exactly the optimiser it had with the parameter list alone.
    """
    exponents = {id(m.p) for m in module.modules() if isinstance(m, GeM)}
    rest = [p for p in params if id(p) not in exponents]
    scaled = [p for p in params if id(p) in exponents]
    groups: list[dict[str, Any]] = [{"params": rest}] if rest else []
    if scaled:
        groups.append({"params": scaled, "lr_scale": GEM_P_LR_SCALE, "weight_decay": 0.0})
    return groups


@dataclass(frozen=True)
class PoolingOptions:
    """The `model.*` keys a pooling builder may use."""

    num_clusters: int = 64
    pool_sizes: Sequence[int] = (2, 3)
    split: int | None = 512
    alpha: float = 30.0
    gem_p: float = 3.0
    vlad_norm: str = "intra"
    bias_init: str = "squared_norm"


def _msvlad(c: int, o: PoolingOptions) -> nn.Module:
    return NetVLAD(c, o.num_clusters, o.pool_sizes, o.split, o.alpha, o.vlad_norm, o.bias_init)


def _netvlad(c: int, o: PoolingOptions) -> nn.Module:
    return NetVLAD(c, o.num_clusters, (1,), None, o.alpha, o.vlad_norm, o.bias_init)


def _vlad_concat(c: int, o: PoolingOptions) -> nn.Module:
    return VLADConcat(c, o.num_clusters, o.pool_sizes, o.split, o.alpha, o.vlad_norm, o.bias_init)


# model.pooling name -> builder(in_channels, PoolingOptions); the names equal
# config.PoolingName (tests/test_architecture.py), the VLAD ones config.VLAD_POOLINGS.
POOLINGS: dict[str, Callable[[int, PoolingOptions], nn.Module]] = {
    "msvlad": _msvlad,  # the paper: 2x2 + 3x3 stride-1 regions, 512-d chunks, one shared bag
    "netvlad": _netvlad,  # plain single-scale NetVLAD on the raw cells (Arandjelovic et al.)
    "vlad_concat": _vlad_concat,  # one NetVLAD per channel split, concatenated (ablation)
    "gem": lambda c, o: GeM(c, o.gem_p),
    "mac": lambda c, o: MAC(c),
    "spoc": lambda c, o: SPoC(c),
    "rmac": lambda c, o: RMAC(c),
}


def build_pooling(
    name: str,
    in_channels: int,
    *,
    num_clusters: int = 64,
    pool_sizes: Sequence[int] = (2, 3),
    split: int | None = 512,
    alpha: float = 30.0,
    gem_p: float = 3.0,
    vlad_norm: str = "intra",
    bias_init: str = "squared_norm",
) -> nn.Module:
    """Pooling by its params.yaml name (`model.pooling`)."""
    if name not in POOLINGS:
        raise ValueError(f"model.pooling: unknown pooling {name!r}; choose from {sorted(POOLINGS)}")
    options = PoolingOptions(num_clusters, pool_sizes, split, alpha, gem_p, vlad_norm, bias_init)
    return POOLINGS[name](in_channels, options)
