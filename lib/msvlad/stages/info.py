"""`info`: the network's layers and descriptor dimensions for a params file."""

from __future__ import annotations

from typing import Any

from msvlad.config import AUTHORS_CODE, Params
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
    w = params.whiten
    white = "none (whiten.dim null)" if w.dim is None else f"{min(w.dim, model.raw_dim)}"
    lines += [
        f"raw dim       {model.raw_dim}",
        f"whitened dim  {white}" + ("" if w.dim is None else f" (PCA-whitening, power {w.power})"),
        f"parameters    {sum(p.numel() for p in model.parameters()):,}",
    ]
    return "\n".join(lines + variant_lines(params))


def option_value(params: Params, dotted: str) -> Any:
    """The value of a "section.key" parameter."""
    section, _, key = dotted.partition(".")
    return getattr(getattr(params, section), key)


def variant_lines(params: Params) -> list[str]:
    """Which variant the params select: each option of `AUTHORS_CODE`, marked where it matches."""
    same = [k for k, v in AUTHORS_CODE.items() if option_value(params, k) == v]
    if len(same) == len(AUTHORS_CODE):
        name = "the authors' released code"
    elif not same:
        name = "msvlad, textbook NetVLAD"
    else:
        name = "mixed"
    lines = [f"variant       {name} ({len(same)} of {len(AUTHORS_CODE)} options as the authors')"]
    for key, theirs in AUTHORS_CODE.items():
        value = option_value(params, key)
        mark = "authors" if value == theirs else f"authors: {theirs}"
        lines.append(f"  {key:<22}{str(value):<18}({mark})")
    return lines
