"""Backbones: cut points, strides, weight loading, and the offline EfficientNet-Lite0 weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from skimage import data
from torchvision.models._meta import _IMAGENET_CATEGORIES as CATEGORIES

from msvlad.nn.backbones import BACKBONES, _load_trunk, build_backbone, build_classifier


@pytest.mark.parametrize(
    ("name", "channels", "stride"),
    [("resnet50", 2048, 32), ("vgg16", 512, 16), ("efficientnet_lite0", 320, 32)],
)
def test_untrained_cut_points(name, channels, stride, gen):
    net = build_backbone(name, pretrained=False).eval()
    with torch.no_grad():
        out = net(torch.rand(1, 3, 64, 96, generator=gen))
    assert out.shape == (1, channels, 64 // stride, 96 // stride)
    assert net.out_channels == channels == BACKBONES[name].out_channels


def test_resnet101_registered():
    assert BACKBONES["resnet101"].out_channels == 2048
    assert (
        "cirtorch" in BACKBONES["resnet101"].urls and "torchvision" in BACKBONES["resnet101"].urls
    )


def test_torchvision_resnet_weights_map_onto_trunk(gen):
    ref = torchvision.models.resnet50(weights=None).eval()
    body = BACKBONES["resnet50"].build().eval()
    _load_trunk(body, ref.state_dict(), "resnet50", "torchvision")
    x = torch.rand(1, 3, 64, 64, generator=gen)
    with torch.no_grad():
        trunk = torch.nn.Sequential(*list(ref.children())[:-2])
        assert torch.allclose(body(x), trunk(x))


def test_unknown_backbone_and_weights():
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("alexnet")
    with pytest.raises(ValueError, match="model.weights"):
        build_backbone("resnet50", pretrained=True, weights="imagenet21k")


def _classify(net, img: np.ndarray) -> list[str]:
    im = Image.fromarray(img).convert("RGB").resize((224, 224), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float()[None] / 255.0
    x = (x - 0.498) / 0.502
    with torch.no_grad():
        top = net(x).softmax(-1)[0].topk(5).indices.tolist()
    return [CATEGORIES[i] for i in top]


def test_efficientnet_lite0_classifies_real_photos_offline():
    net = build_classifier("efficientnet_lite0")
    assert _classify(net, data.coffee())[0] == "espresso"
    assert _classify(net, data.chelsea())[0] in {"tabby", "tiger cat", "Egyptian cat"}


def test_efficientnet_lite0_backbone_uses_package_weights(gen):
    trained = build_backbone("efficientnet_lite0", pretrained=True)
    untrained = build_backbone("efficientnet_lite0", pretrained=False)
    k = "conv_stem.weight"
    assert not torch.equal(trained.body.state_dict()[k], untrained.body.state_dict()[k])
    assert torch.equal(
        trained.body.state_dict()[k], build_classifier("efficientnet_lite0").state_dict()[k]
    )
