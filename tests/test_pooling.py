"""Pooling modules: equal to their functional forms, correct dims, trainable where needed."""

from __future__ import annotations

import math

import pytest
import torch

from msvlad.nn import functional as LF
from msvlad.nn.pooling import (
    GEM_P_LR_SCALE,
    MAC,
    RMAC,
    GeM,
    NetVLAD,
    SPoC,
    VLADConcat,
    build_pooling,
    optimizer_groups,
)


def test_global_poolings_match_functional(gen):
    x = torch.rand(2, 16, 5, 4, generator=gen)
    assert torch.allclose(MAC(16)(x), LF.l2n(LF.mac(x)))
    assert torch.allclose(SPoC(16)(x), LF.l2n(LF.spoc(x)))
    assert torch.allclose(GeM(16, 3.0)(x), LF.l2n(LF.gem(x, 3.0)), atol=1e-6)
    assert torch.allclose(RMAC(16)(x), LF.l2n(LF.rmac(x)))
    assert "p=3.0000" in repr(GeM(16))


def test_gem_p_is_learnable(gen):
    pool = GeM(4)
    pool(torch.rand(1, 4, 3, 3, generator=gen)).sum().backward()
    assert pool.p.grad is not None and pool.p.grad.abs() > 0


def test_msvlad_dims_and_output(gen):
    pool = NetVLAD(1024, num_clusters=8, pool_sizes=(2, 3), split=512)
    x = torch.rand(2, 1024, 5, 5, generator=gen)
    out = pool(x)
    assert out.shape == (2, 8 * 512) and pool.out_dim == 8 * 512
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)
    assert pool.local_features(x).shape == (2, 2 * (16 + 9), 512)
    expected = LF.netvlad(pool.local_features(x), pool.centroids, pool.weight, pool.bias)
    # float32 entries of a unit vector summed in another order: up to 1e-7 apart (the default
    # atol of 1e-8 failed for about one centroid draw in six)
    assert torch.allclose(out, expected, atol=1e-6)


def test_init_from_centroids_sets_decoupled_params(gen):
    pool = NetVLAD(16, num_clusters=4, split=None, alpha=30.0)
    c = torch.randn(4, 16, generator=gen)
    pool.init_from_centroids(c)
    assert torch.allclose(pool.centroids, c)
    assert torch.allclose(pool.weight, 60.0 * c)
    assert torch.allclose(pool.bias, -30.0 * c.pow(2).sum(1))
    with pytest.raises(ValueError, match="expected"):
        pool.init_from_centroids(torch.randn(3, 16))


def test_vlad_concat_groups(gen):
    pool = VLADConcat(1024, num_clusters=4, pool_sizes=(2,), split=512)
    assert pool.out_dim == 2 * 4 * 512
    pool.init_from_centroids(torch.randn(4, 512, generator=gen))
    out = pool(torch.rand(1, 1024, 3, 3, generator=gen))
    assert out.shape == (1, 4096)
    assert torch.allclose(out.norm(), torch.tensor(1.0), atol=1e-5)


def test_build_pooling_names():
    assert isinstance(build_pooling("netvlad", 64, num_clusters=4), NetVLAD)
    assert build_pooling("netvlad", 64, num_clusters=4).pool_sizes == (1,)
    assert build_pooling("msvlad", 1024, num_clusters=4, split=512).out_dim == 2048
    with pytest.raises(ValueError, match="unknown pooling"):
        build_pooling("avg", 8)
    with pytest.raises(ValueError, match="split=300"):
        build_pooling("msvlad", 1024, split=300)


def test_gem_exponent_gradient_hand_computed():
    # one channel with cells 1 and 2: f(p) = m^(1/p), m = (1 + 2^p) / 2; at p = 3, m = 4.5 and
    # df/dp = f * (-ln(m) / p^2 + (2^p ln(2) / 2) / (p m))
    x = torch.tensor([[[[1.0, 2.0]]]], dtype=torch.float64)
    p = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    LF.gem(x, p).sum().backward()
    m = 4.5
    expected = m ** (1 / 3) * (-math.log(m) / 9 + (8 * math.log(2) / 2) / (3 * m))
    assert p.grad.item() == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(0.06317, abs=1e-5)


def _gem_reference(x: torch.Tensor, p: torch.Tensor, eps: float) -> tuple[torch.Tensor, ...]:
    """GeM and its gradients in closed form, written apart from LF.gem: with y = max(x, eps),
    m = mean(y^p) and f = m^(1/p): df/dp = f (S / (p m) - ln(m) / p^2), S = mean(y^p ln y);
    df/dx = f^(1-p) y^(p-1) / N where x > eps (0 where clamped)."""
    y = x.clamp(min=eps)
    n = x.shape[-1] * x.shape[-2]
    m = (y**p).mean(dim=(-2, -1))
    f = torch.exp(torch.log(m) / p)
    s = (y**p * torch.log(y)).mean(dim=(-2, -1))
    df_dp = f * (s / (p * m) - torch.log(m) / p**2)
    df_dx = (f ** (1 - p))[..., None, None] * y ** (p - 1) / n * (x > eps)
    return f, df_dp, df_dx


def test_gem_value_and_gradients_match_the_closed_form(gen):
    x = torch.rand(2, 3, 4, 5, generator=gen, dtype=torch.float64) + 0.05
    x[0, 0, 0, 0] = 0.0  # one clamped activation
    p = torch.tensor(2.7, dtype=torch.float64, requires_grad=True)
    x.requires_grad_(True)
    out = LF.gem(x, p, 1e-6)
    weights = torch.rand(out.shape, generator=gen, dtype=torch.float64)
    (out * weights).sum().backward()
    f, df_dp, df_dx = _gem_reference(x.detach(), p.detach(), 1e-6)
    assert torch.allclose(out, f, rtol=1e-12)
    assert p.grad.item() == pytest.approx((weights * df_dp).sum().item(), rel=1e-10)
    assert torch.allclose(x.grad, weights[..., None, None] * df_dx, rtol=1e-10, atol=1e-14)
    assert x.grad[0, 0, 0, 0] == 0.0


def test_gem_module_gradcheck_in_float64(gen):
    """The module's p is a trained parameter: autograd through GeM (L2 included) against finite
    differences, for the activations and for p."""
    pool = GeM(3, p=3.0).double()
    assert isinstance(pool.p, torch.nn.Parameter) and pool.p.requires_grad
    assert [name for name, _ in pool.named_parameters()] == ["p"]
    x = (torch.rand(2, 3, 3, 4, generator=gen, dtype=torch.float64) + 0.1).requires_grad_(True)

    def fn(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return LF.l2n(LF.gem(x, p, pool.eps))

    assert torch.allclose(pool(x), fn(x, pool.p))
    assert torch.autograd.gradcheck(fn, (x, pool.p), eps=1e-6, atol=1e-8)
    pool(x).sum().backward()
    assert pool.p.grad is not None and pool.p.grad.abs().item() > 0


def test_gem_exponent_moves_in_a_tiny_training(gen):
    """Adam on the exponent's group (10x lr) moves p; a first Adam step is lr x sign(grad)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.ReLU(), GeM(4, p=3.0))
    params = list(net.parameters())
    opt = torch.optim.Adam(optimizer_groups(net, params), lr=1e-3)
    for group in opt.param_groups:  # as the trainer sets the scheduled lr
        group["lr"] = 1e-3 * group.get("lr_scale", 1.0)
    x = torch.rand(4, 3, 6, 6, generator=gen)
    target = torch.rand(4, 4, generator=gen)
    before = net[2].p.item()
    loss = (net(x) - target).pow(2).sum()
    loss.backward()
    sign = torch.sign(net[2].p.grad).item()
    opt.step()
    assert net[2].p.item() - before == pytest.approx(-sign * 1e-2, rel=1e-4)  # 10 x 1e-3
    for _ in range(20):
        opt.zero_grad()
        (net(x) - target).pow(2).sum().backward()
        opt.step()
    assert abs(net[2].p.item() - before) > 0.05


def test_optimizer_groups_give_gem_p_ten_times_the_lr(gen):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), GeM(4))
    params = list(net.parameters())
    groups = optimizer_groups(net, params)
    assert len(groups) == 2 and groups[1]["params"] == [net[1].p]
    assert groups[1]["lr_scale"] == GEM_P_LR_SCALE == 10.0 and groups[1]["weight_decay"] == 0.0
    assert groups[0] == {"params": [net[0].weight, net[0].bias]}
    # a frozen exponent (not among the trained parameters) gets no group
    assert optimizer_groups(net, params[:2]) == [{"params": params[:2]}]


def test_optimizer_groups_leave_a_network_without_gem_unchanged(gen):
    """One plain group: Adam takes exactly the steps it takes on the parameter list."""

    def stepped(grouped: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), NetVLAD(8, 4, (2,), None))
        params = list(net.parameters())
        opt = torch.optim.Adam(optimizer_groups(net, params) if grouped else params, lr=1e-2)
        x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
        for _ in range(3):
            net(x).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
        return [p.detach().clone() for p in net.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(stepped(True), stepped(False), strict=True))
