"""`info`: the network's layers and descriptor dimensions for a params file."""

from __future__ import annotations

from msvlad.config import Params
from msvlad.nn.functional import bag_size
from msvlad.nn.model import build_model


def run(params: Params) -> str:
    """The description `python -m msvlad info` prints."""
    cfg = params.model
    model = build_model(cfg, pretrained=False)
    side = cfg.image_size // model.backbone.stride
    channels, stride, pool = model.backbone.out_channels, model.backbone.stride, model.pooling
    lines = [
        f"backbone      {cfg.backbone} ({channels} channels, stride {stride})",
        f"input         {cfg.image_size} px ({cfg.resize}) -> {side}x{side} feature map",
        f"pooling       {cfg.pooling}: {pool.extra_repr()}",
    ]
    if model.is_vlad:
        n_local = bag_size(channels, side, side, pool.pool_sizes, pool.split)
        lines.append(f"local bag     {n_local} descriptors of {pool.dim}-d")
    white = min(params.whiten.dim, model.raw_dim)
    lines += [
        f"raw dim       {model.raw_dim}",
        f"whitened dim  {white} (PCA-whitening, power {params.whiten.power})",
        f"parameters    {sum(p.numel() for p in model.parameters()):,}",
    ]
    return "\n".join(lines)
