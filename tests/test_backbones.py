"""Backbones: cut points, strides, weight loading, and the offline EfficientNet-Lite0 weights."""

from __future__ import annotations

import hashlib
import io
import os

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from skimage import data
from torchvision.models._meta import _IMAGENET_CATEGORIES as CATEGORIES

from httpserver import FileServer
from msvlad.config import ConfigError, ModelConfig, model_config_from_dict
from msvlad.data.download import url_key, verify_file
from msvlad.errors import InputError
from msvlad.nn import backbones
from msvlad.nn.backbones import (
    BACKBONES,
    _load_trunk,
    build_backbone,
    build_classifier,
    fetch_weights,
    package_weights_path,
    weights_cache_dir,
)
from msvlad.nn.model import build_model


@pytest.mark.parametrize(
    ("name", "channels", "stride"),
    [
        ("resnet50", 2048, 32),
        ("vgg16", 512, 16),
        ("efficientnet_lite0", 320, 32),
        ("efficientnet_lite1", 320, 32),
        ("efficientnet_lite2", 352, 32),  # width x1.1
    ],
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


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_efficientnet_lite_classifies_real_photos_offline(name):
    net = build_classifier(name)
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


PACKAGED = sorted(name for name, spec in BACKBONES.items() if spec.package is not None)


def test_package_backbones_are_pinned_with_their_weight_files(repo_root):
    import tomllib

    deps = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]["dependencies"]
    assert PACKAGED == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    for name in PACKAGED:
        spec = BACKBONES[name]
        assert f"{spec.package}==0.1.0" in deps
        path = package_weights_path(name, spec.package)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert digest == spec.package_sha256 and path.name.split("-")[-1][:-4] == digest[:8]


def test_package_weights_with_another_sha256_are_refused(tmp_path, monkeypatch):
    fake = tmp_path / "efficientnet-lite1-77cc7160.pth"
    fake.write_bytes(_state_bytes({"w": torch.zeros(2)}))
    monkeypatch.setattr(backbones, "package_weights_path", lambda name, package: fake)
    with pytest.raises(InputError, match=r"efficientnet-lite1-77cc7160\.pth: sha256 .* pinned"):
        build_backbone("efficientnet_lite1", pretrained=True)


# ----------------------------------------------------------------------------- weight files


def _state_bytes(state: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("MSVLAD_MIRROR", raising=False)
    return tmp_path / "torch"


def test_weights_come_through_the_mirror_and_the_name_check_holds(torch_home, caplog):
    url = BACKBONES["resnet101"].urls["cirtorch"]  # its name states the sha256 prefix 10a101d
    data = _state_bytes({"w": torch.arange(6.0)})
    digest = hashlib.sha256(data).hexdigest()
    assert not digest.startswith("10a101d")
    dest = weights_cache_dir() / url.rsplit("/", 1)[-1]
    with FileServer({"/" + url_key(url): data}) as server:
        with pytest.raises(InputError, match="does not start with 10a101d") as err:
            fetch_weights(url, mirror=server.base_url)
        assert "model.weights_sha256" in str(err.value) and not dest.exists()
        with pytest.raises(InputError, match="pinned by model.weights_sha256"):
            fetch_weights(url, mirror=server.base_url, sha256="0" * 64)
        assert not dest.exists()
        with caplog.at_level("WARNING", logger="msvlad.nn.backbones"):
            path = fetch_weights(url, mirror=server.base_url, sha256=digest)
        assert path == dest and path.read_bytes() == data
        assert "not the official file" in caplog.text
        assert [r[0] for r in server.requests] == ["/" + url_key(url)] * 3
        # a file whose digest matches its name's prefix needs no pin (torchvision's convention)
        named = f"http://example.org/models/tiny-{digest[:8]}.pth"
        server.add("/" + url_key(named), data)
        os.environ["MSVLAD_MIRROR"] = server.base_url  # the environment names the mirror
        try:
            assert fetch_weights(named).read_bytes() == data
        finally:
            del os.environ["MSVLAD_MIRROR"]


def test_pinned_weights_reach_the_model(torch_home):
    src = BACKBONES["resnet50"].build()
    torch.nn.init.normal_(src[0].weight, generator=torch.Generator().manual_seed(3))
    data = _state_bytes(src.state_dict())
    url = BACKBONES["resnet50"].urls["cirtorch"]
    config = ModelConfig(
        backbone="resnet50",
        weights="cirtorch",
        pooling="gem",
        weights_sha256=hashlib.sha256(data).hexdigest(),
    )
    with FileServer({"/" + url_key(url): data}) as server:
        model = build_model(config, mirror=server.base_url)
    assert torch.equal(model.backbone.body[0].weight, src[0].weight)


@pytest.mark.parametrize("value", ["10a101d", "G" * 64, "A" * 64])
def test_weights_pin_must_be_a_full_sha256(value):
    with pytest.raises(ConfigError, match="model.weights_sha256"):
        model_config_from_dict({"weights_sha256": value})
    assert model_config_from_dict({"weights_sha256": "a" * 64}).weights_sha256 == "a" * 64


def test_checksum_mismatch_is_a_one_line_input_error(tmp_path):
    (tmp_path / "f.bin").write_bytes(b"x")
    with pytest.raises(InputError, match="f.bin: sha256 expected"):
        verify_file(tmp_path / "f.bin", sha256="0" * 64)
