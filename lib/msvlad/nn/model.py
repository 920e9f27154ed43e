"""The retrieval network: backbone -> pooling -> (optional) PCA-whitening, built from ModelConfig.

Pipeline of `forward`: images in [0, 1] -> backbone normalisation and conv trunk -> feature map
(B, C, H, W) -> pooling (multi-scale bag + NetVLAD for the paper's model) -> L2 descriptor (B, D).
Whitening (`RetrievalNet.whiten`) is applied by `msvlad.evaluation.extract.describe_and_whiten`
after multi-scale aggregation, never inside `forward` (training and mining use the raw
descriptor, as the paper does).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from msvlad.config import VLAD_POOLINGS, ConfigError, ModelConfig, model_config_from_dict
from msvlad.errors import CheckpointError
from msvlad.nn.backbones import Backbone, build_backbone
from msvlad.nn.pooling import build_pooling
from msvlad.nn.whitening import Whitening
from msvlad.storage import first_sentence, load_torch, save_torch


class RetrievalNet(nn.Module):
    """Backbone + pooling (+ whitening); BatchNorm statistics stay frozen while fine-tuning."""

    def __init__(self, backbone: Backbone, pooling: nn.Module, config: ModelConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.whitening: Whitening | None = None
        self.config = config

    @property
    def raw_dim(self) -> int:
        return int(self.pooling.out_dim)

    @property
    def out_dim(self) -> int:
        return self.whitening.out_dim if self.whitening is not None else self.raw_dim

    @property
    def is_vlad(self) -> bool:
        return self.config.pooling in VLAD_POOLINGS

    def train(self, mode: bool = True) -> RetrievalNet:
        """Train mode for gradients, but BN layers keep their ImageNet running statistics."""
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def forward(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) in [0, 1] -> raw L2-normalised descriptors (B, raw_dim)."""
        return self.pooling(self.backbone(images))

    def forward_from(self, x: Tensor, start: int) -> Tensor:
        """Descriptors from the output of backbone stage `start` (a cached frozen trunk) onwards."""
        return self.pooling(self.backbone.forward_stages(x, start))

    def freeze_stages(self, n: int) -> list[nn.Parameter]:
        """Freeze the first n backbone stages; returns the parameters left trainable."""
        if not 0 <= n < self.backbone.num_stages:
            raise ConfigError(
                f"train.frozen_stages: {n} must be in [0, {self.backbone.num_stages - 1}]"
            )
        for stage in self.backbone.stages[:n]:
            stage.requires_grad_(False)
        return [p for p in self.parameters() if p.requires_grad]

    def local_features(self, images: Tensor) -> Tensor:
        """The bag NetVLAD aggregates, (B, N, D) (for k-means initialisation)."""
        if not self.is_vlad:
            raise ValueError(f"pooling {self.config.pooling!r} has no local features")
        return self.pooling.local_features(self.backbone(images))

    def whiten(self, desc: Tensor) -> Tensor:
        """Apply the learned whitening if any (descriptors (N, raw_dim) -> (N, out_dim))."""
        return desc if self.whitening is None else self.whitening(desc)


def build_model(
    config: ModelConfig, pretrained: bool | None = None, *, mirror: str | None = None
) -> RetrievalNet:
    """Network from its config; `pretrained` overrides config.pretrained (for untrained nets).

    `mirror` (`data.mirror`) replaces the official host of downloaded weights.
    """
    use_pretrained = config.pretrained if pretrained is None else pretrained
    backbone = build_backbone(
        config.backbone,
        use_pretrained,
        config.weights,
        sha256=config.weights_sha256,
        mirror=mirror,
    )
    pooling = build_pooling(
        config.pooling,
        backbone.out_channels,
        num_clusters=config.num_clusters,
        pool_sizes=config.pool_sizes,
        split=config.split,
        alpha=config.alpha,
        gem_p=config.gem_p,
        vlad_norm=config.vlad_norm,
        bias_init=config.bias_init,
    )
    return RetrievalNet(backbone, pooling, config)


def save_model(model: RetrievalNet, path: str | Path, **extra: Any) -> Path:
    """Save weights (+ whitening) and the model config atomically."""
    state = {
        "config": dataclasses.asdict(model.config),
        "state_dict": model.state_dict(),
        **extra,
    }
    return save_torch(path, state)


def load_model(
    path: str | Path, map_location: str | torch.device = "cpu", expect: ModelConfig | None = None
) -> RetrievalNet:
    """Rebuild a saved network (weights_only=True load, checksum required; no backbone download).

    `expect`: the params' model; a file holding another network (`ARCHITECTURE_KEYS`) is refused.
    """
    ckpt = load_torch(path, map_location, require_digest=True)
    if not isinstance(ckpt, dict) or "config" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not a msvlad model file (no config and state_dict)")
    if not isinstance(ckpt["config"], dict) or not isinstance(ckpt["state_dict"], dict):
        kinds = ", ".join(f"{k}: {type(ckpt[k]).__name__}" for k in ("config", "state_dict"))
        raise CheckpointError(f"{path}: not a msvlad model file ({kinds}; both must be dicts)")
    config = model_config_from_dict(ckpt["config"], source=f"{path}: config")
    diff = architecture_diff(config, expect) if expect is not None else []
    if diff:
        raise CheckpointError(
            f"{path}: another network than the params ({'; '.join(diff)}); rebuild it for these "
            "params (`msvlad cluster`), or set these model keys to the file's"
        )
    state = ckpt["state_dict"]
    try:
        model = build_model(config, pretrained=False)
        if "whitening.mean" in state:
            d_in, d_out = state["whitening.projection"].shape
            model.whitening = Whitening(
                torch.zeros(d_in), torch.zeros(d_in, d_out), torch.zeros(d_out)
            )
        model.load_state_dict(state)
    except (KeyError, ValueError, RuntimeError, AttributeError, TypeError) as err:
        detail = first_sentence(err) or type(err).__name__
        raise CheckpointError(f"{path}: its weights do not fit its config ({detail})") from None
    return model


# The model keys that make the network (its layers, shapes and forward), as build_model reads them;
# the input keys (image_size, resize, resize_filter) are the training input, read from the params,
# and where the backbone's ImageNet weights came from is fixed by the file's weights themselves.
ARCHITECTURE_KEYS = (
    "backbone",
    "pooling",
    "pool_sizes",
    "split",
    "num_clusters",
    "alpha",
    "gem_p",
    "vlad_norm",
    "bias_init",
)


def architecture_diff(saved: ModelConfig, asked: ModelConfig) -> list[str]:
    """`model.<key>: <saved> in the file, <asked> in the params` for each architecture key that
    differs (a model file is only trained, whitened or evaluated as the network it holds)."""
    return [
        f"model.{key}: {getattr(saved, key)!r} in the file, {getattr(asked, key)!r} in the params"
        for key in ARCHITECTURE_KEYS
        if getattr(saved, key) != getattr(asked, key)
    ]
