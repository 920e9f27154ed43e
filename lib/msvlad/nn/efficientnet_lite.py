"""EfficientNet-Lite0/1/2 trunks as timm builds them (`tf_efficientnet_lite<v>`, features only),
without importing timm.

Importing timm imports torchvision and, through it, torch._dynamo: about as long as importing
torch itself, paid by every command that builds a network. This module builds the same modules
in the same order, so the same state_dict keys, shapes and order (onto which the package weights
are mapped) and the same random initialisation for a seed; timm's placeholder modules (dropout,
anti-aliasing, squeeze-excite, drop path: identities here) are kept, so a saved state_dict's
module metadata, and with it a saved model file, is byte-identical too. It runs the same
operations in the same order, so outputs and gradients are bit-identical: TF "SAME" padding
computed from the input size for the strided convolutions and the stem (timm's `Conv2dSame`),
static padding otherwise, BatchNorm with eps 1e-3 followed by an in-place ReLU6, residuals only
where the stride is 1 and the width is kept. `tests/test_efficientnet_lite.py` checks all of it
against timm.
"""

from __future__ import annotations

import math

from torch import Tensor, nn
from torch.nn import functional as F

BN_EPS = 1e-3  # timm's BN_EPS_TF_DEFAULT for the tf_ variants
STEM = 32
# per stage: block kind, kernel, stride, expansion (timm's efficientnet_lite arch_def)
STAGES = (
    ("ds", 3, 1, 1),
    ("ir", 3, 2, 6),
    ("ir", 5, 2, 6),
    ("ir", 3, 2, 6),
    ("ir", 5, 1, 6),
    ("ir", 5, 2, 6),
    ("ir", 3, 1, 6),
)
# per variant: the stages' widths and repeats once timm's channel and depth multipliers are applied
VARIANTS: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {
    0: ((16, 24, 40, 80, 112, 192, 320), (1, 2, 2, 3, 3, 4, 1)),
    1: ((16, 24, 40, 80, 112, 192, 320), (1, 3, 3, 4, 4, 5, 1)),
    2: ((16, 24, 48, 88, 120, 208, 352), (1, 3, 3, 4, 4, 5, 1)),
}


class SameConv2d(nn.Conv2d):
    """A convolution with TensorFlow's "SAME" padding, computed from the input size."""

    def __init__(self, in_chs: int, out_chs: int, kernel: int, stride: int, groups: int = 1):
        super().__init__(in_chs, out_chs, kernel, stride, 0, 1, groups, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        ih, iw = x.size()[-2:]
        pad_h = _same_padding(ih, self.kernel_size[0], self.stride[0])
        pad_w = _same_padding(iw, self.kernel_size[1], self.stride[1])
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0)
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, 0), self.dilation, self.groups)


def _same_padding(size: int, kernel: int, stride: int) -> int:
    return max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)


def _conv(in_chs: int, out_chs: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """timm's create_conv2d with padding 'same': static where it can be, else `SameConv2d`."""
    if stride == 1 and (kernel - 1) % 2 == 0:
        return nn.Conv2d(
            in_chs, out_chs, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False
        )
    return SameConv2d(in_chs, out_chs, kernel, stride, groups)


class BatchNormAct(nn.BatchNorm2d):
    """BatchNorm, then an in-place ReLU6 (or nothing): timm's BatchNormAct2d."""

    def __init__(self, channels: int, act: bool = True) -> None:
        super().__init__(channels, eps=BN_EPS)
        self.drop = nn.Identity()
        self.act = nn.ReLU6(inplace=True) if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(x)))


class DepthwiseSeparable(nn.Module):
    """Depthwise conv, BN + ReLU6, pointwise conv, BN (the first stage)."""

    def __init__(self, in_chs: int, out_chs: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.has_skip = stride == 1 and in_chs == out_chs
        self.conv_dw = _conv(in_chs, in_chs, kernel, stride, groups=in_chs)
        self.bn1 = BatchNormAct(in_chs)
        self.aa, self.se = nn.Identity(), nn.Identity()
        self.conv_pw = _conv(in_chs, out_chs, 1)
        self.bn2 = BatchNormAct(out_chs, act=False)
        self.drop_path = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.se(self.aa(self.bn1(self.conv_dw(x))))
        x = self.bn2(self.conv_pw(x))
        return self.drop_path(x) + shortcut if self.has_skip else x


class InvertedResidual(nn.Module):
    """Pointwise expansion, depthwise conv, pointwise projection (MBConv without SE)."""

    def __init__(self, in_chs: int, out_chs: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = in_chs * expand
        self.has_skip = stride == 1 and in_chs == out_chs
        self.conv_pw = _conv(in_chs, mid, 1)
        self.bn1 = BatchNormAct(mid)
        self.conv_dw = _conv(mid, mid, kernel, stride, groups=mid)
        self.bn2 = BatchNormAct(mid)
        self.aa, self.se = nn.Identity(), nn.Identity()
        self.conv_pwl = _conv(mid, out_chs, 1)
        self.bn3 = BatchNormAct(out_chs, act=False)
        self.drop_path = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.se(self.aa(self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))))
        x = self.bn3(self.conv_pwl(x))
        return self.drop_path(x) + shortcut if self.has_skip else x


class EfficientNetLite(nn.Module):
    """The trunk: `conv_stem`, `bn1` and `blocks` (one Sequential per stage), as timm names them."""

    def __init__(self, variant: int) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"EfficientNet-Lite{variant}: variants are {sorted(VARIANTS)}")
        widths, repeats = VARIANTS[variant]
        self.conv_stem = _conv(3, STEM, 3, 2)
        self.bn1 = BatchNormAct(STEM)
        # timm's block builder probes its squeeze-excite layer with an 8-channel instance (two
        # biased 1x1 convs) that it throws away: the same draws keep random models equal to timm's
        nn.Conv2d(8, 8, 1, bias=True), nn.Conv2d(8, 8, 1, bias=True)
        stages, in_chs = [], STEM
        for (kind, kernel, stride, expand), out_chs, n in zip(STAGES, widths, repeats, strict=True):
            blocks: list[nn.Module] = []
            for i in range(n):
                s = stride if i == 0 else 1
                if kind == "ds":
                    blocks.append(DepthwiseSeparable(in_chs, out_chs, kernel, s))
                else:
                    blocks.append(InvertedResidual(in_chs, out_chs, kernel, s, expand))
                in_chs = out_chs
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.out_channels = in_chs
        for module in self.modules():  # timm's _init_weight_goog, in its module order
            _init_goog(module)

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.bn1(self.conv_stem(x)))


def _init_goog(m: nn.Module) -> None:
    """TensorFlow's EfficientNet initialisation (timm's `_init_weight_goog`)."""
    if isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def efficientnet_lite(variant: int) -> EfficientNetLite:
    """EfficientNet-Lite`variant` (0, 1 or 2), randomly initialised as timm does for a seed."""
    return EfficientNetLite(variant)
