"""The options where the authors' released code differs from msvlad's defaults (docs/method.md).

The tests write the behaviour of the authors' code (github.com/fede-vaccaro/NetVlad) as
independent references and check that the option selecting it reproduces it exactly; `pytest -k
authors` runs this module.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from msvlad.config import AUTHORS_CODE, load_params, with_overrides
from msvlad.data.images import ImageItem, load_resized
from msvlad.mining.pool import ClassBalancedPool, at_pool_precision, pool_autocast_fp16
from msvlad.nn import functional as LF
from msvlad.nn.kmeans import kmeans_centroids
from msvlad.nn.model import build_model, load_model, save_model
from msvlad.nn.pooling import NetVLAD, VLADConcat
from msvlad.stages.info import option_value, variant_lines
from msvlad.storage import save_torch
from msvlad.training.schedule import lr_at
from tinydata import make_retrieval_set, make_train_set

# ----------------------------------------------------------------------------- references


def _authors_layer(x, c_dk, w_dk, b_k):
    """Their NetVLAD forward: V as (B, D, K), normalise over K, flatten D-major, global L2.

    Parameters in their layout: centroids and assignment weights (D, K), bias (K,).
    """
    a = torch.softmax(x @ w_dk + b_k, dim=2)  # (B, N, K)
    mass = a.sum(dim=1)  # (B, K)
    u = (a.transpose(1, 2) @ x).permute(0, 2, 1)  # (B, D, K)
    v = u - mass.unsqueeze(1) * c_dk  # (B, D, K)
    v = v / v.norm(p=2, dim=2, keepdim=True).clamp_min(1e-12)
    flat = v.reshape(v.shape[0], -1)  # index d * K + k
    return flat / flat.norm(p=2, dim=1, keepdim=True).clamp_min(1e-12)


def _authors_multiplier(t, lr, lr_start, warmup, period, gamma, decay):
    """Their LambdaLR multiplier: linear ramp from lr_start/lr, cuts by gamma, in-period decay."""
    m = lr_start / lr
    if t < warmup:
        g = 1.0 * t / warmup + m * (1.0 - t / warmup)
    else:
        g = 1.0 * gamma ** int(np.floor(t / period))
    return g * 1 / (1 + (t % period) * decay)


def _random_vlad_inputs(gen, b=3, n=13, d=6, k=5, dtype=torch.float32):
    x = LF.l2n(torch.randn(b, n, d, generator=gen, dtype=dtype))  # the caller's L2 of each local
    c = torch.randn(k, d, generator=gen, dtype=dtype)
    w = torch.randn(k, d, generator=gen, dtype=dtype)
    bias = torch.randn(k, generator=gen, dtype=dtype)
    return x, c, w, bias


# ----------------------------------------------------------------------------- 1. normalisation


@pytest.mark.parametrize("shape", [(3, 13, 6, 5), (2, 40, 16, 8), (1, 7, 4, 64)])
def test_vlad_norm_across_clusters_is_the_authors_layer(gen, shape):
    b, n, d, k = shape
    x, c, w, bias = _random_vlad_inputs(gen, b, n, d, k)
    ours = LF.netvlad(x, c, w, bias, norm="across_clusters")
    theirs = _authors_layer(x, c.t(), w.t(), bias)
    assert ours.shape == (b, d * k)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    textbook = LF.netvlad(x, c, w, bias, norm="intra")
    assert (textbook - theirs).abs().max() > 1e-3  # the option changes the descriptor


def test_netvlad_module_with_authors_norm_equals_their_layer(gen):
    pool = NetVLAD(32, num_clusters=4, pool_sizes=(2, 3), split=16, norm="across_clusters")
    fmap = torch.rand(2, 32, 5, 4, generator=gen)
    bag = pool.local_features(fmap)
    expected = _authors_layer(bag, pool.centroids.t(), pool.weight.t(), pool.bias)
    on_bag = LF.netvlad(bag, pool.centroids, pool.weight, pool.bias, norm="across_clusters")
    torch.testing.assert_close(on_bag, expected, rtol=0, atol=0)  # operation for operation
    # the module's fused path (bag never built) differs only in float summation order
    torch.testing.assert_close(pool(fmap), expected, rtol=1e-5, atol=1e-7)
    assert "norm=across_clusters" in repr(pool)


def test_grouped_vlad_across_clusters_is_per_group_authors_layer(gen):
    local = LF.l2n(torch.randn(2, 3, 9, 4, generator=gen))  # (B, G, N, D)
    c, w = torch.randn(3, 5, 4, generator=gen), torch.randn(3, 5, 4, generator=gen)
    bias = torch.randn(3, 5, generator=gen)
    out = LF.netvlad_grouped(local, c, w, bias, norm="across_clusters")
    parts = [_authors_layer(local[:, g], c[g].t(), w[g].t(), bias[g]) for g in range(3)]
    # every group has D unit rows, so the groups share one scale before the final L2
    torch.testing.assert_close(out, LF.l2n(torch.cat(parts, dim=1)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("norm", ["across_clusters", "intra"])
def test_gradcheck_netvlad_norms_double(gen, norm):
    x, c, w, bias = _random_vlad_inputs(gen, 1, 5, 3, 4, dtype=torch.float64)
    args = tuple(t.requires_grad_(True) for t in (x, c, w, bias))
    assert torch.autograd.gradcheck(lambda *a: LF.netvlad(*a, norm=norm), args)


def test_gradcheck_grouped_across_clusters_double(gen):
    local = LF.l2n(torch.randn(1, 2, 4, 3, generator=gen, dtype=torch.float64))
    c, w = (torch.randn(2, 3, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    bias = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    args = tuple(t.requires_grad_(True) for t in (local, c, w, bias))
    assert torch.autograd.gradcheck(lambda *a: LF.netvlad_grouped(*a, norm="across_clusters"), args)


def test_unknown_vlad_options_are_one_line_errors():
    x = torch.ones(1, 2, 3)
    with pytest.raises(ValueError, match="model.vlad_norm: 'per_dim' is not one of"):
        LF.vlad_normalize(x, "per_dim")
    with pytest.raises(ValueError, match="model.bias_init: 'zero' is not one of"):
        LF.netvlad_params_from_centroids(torch.ones(2, 3), 1.0, "zero")
    with pytest.raises(ValueError, match="model.vlad_norm"):
        NetVLAD(8, 2, split=None, norm="per_dim")


# ----------------------------------------------------------------------------- 2. bias init


def test_bias_init_norm_is_the_authors_init(gen):
    c = torch.rand(6, 5, generator=gen) * 0.3  # k-means means of unit vectors: |c| < 1
    w, b = LF.netvlad_params_from_centroids(c, 30.0, "norm")
    c64 = c.double().numpy()
    torch.testing.assert_close(w, 60.0 * c, rtol=0, atol=0)
    expected = -30.0 * np.sqrt((c64**2).sum(axis=1))
    np.testing.assert_allclose(b.double().numpy(), expected, rtol=1e-6)
    # logits at init: 2a x.c - a|c| (theirs), versus 2a x.c - a|c|^2 (NetVLAD's paper)
    x = LF.l2n(torch.randn(4, 5, generator=gen))
    logits = x @ w.t() + b
    ref = 60.0 * x.double().numpy() @ c64.T - 30.0 * np.sqrt((c64**2).sum(axis=1))
    np.testing.assert_allclose(logits.double().numpy(), ref, rtol=1e-5, atol=1e-5)
    _, b_sq = LF.netvlad_params_from_centroids(c, 30.0, "squared_norm")
    assert (b - b_sq).abs().min() > 0.1  # the two inits differ for every cluster


def test_module_init_from_centroids_uses_bias_init(gen):
    c = torch.randn(4, 16, generator=gen)
    for bias_init, expected in (
        ("norm", -30.0 * c.norm(dim=1)),
        ("squared_norm", -30.0 * c.pow(2).sum(1)),
    ):
        pool = NetVLAD(16, num_clusters=4, split=None, bias_init=bias_init)
        pool.init_from_centroids(c)
        torch.testing.assert_close(pool.bias.data, expected)
        torch.testing.assert_close(pool.weight.data, 60.0 * c)
    grouped = VLADConcat(32, num_clusters=4, pool_sizes=(2,), split=16, bias_init="norm")
    grouped.init_from_centroids(c)
    torch.testing.assert_close(grouped.bias.data, (-30.0 * c.norm(dim=1)).expand(2, 4))


def test_saved_model_keeps_its_variant_and_old_files_load_as_before(tmp_path, gen, repo_root):
    params = load_params(repo_root / "params.yaml")
    cfg = dataclasses.replace(
        params.model, pretrained=False, num_clusters=4, vlad_norm="across_clusters"
    )
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    x = torch.rand(1, 3, 32, 32, generator=gen)
    path = save_model(model, tmp_path / "m.pt")
    again = load_model(path).eval()
    assert again.pooling.norm == "across_clusters"
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
    # a file saved before the variant keys existed rebuilds the textbook layer
    state = torch.load(path, weights_only=True)
    config = {k: v for k, v in state["config"].items()}
    for key in ("vlad_norm", "bias_init", "resize_filter"):
        del config[key]
    save_torch(tmp_path / "old.pt", {"config": config, "state_dict": state["state_dict"]})
    old = load_model(tmp_path / "old.pt")
    assert (old.pooling.norm, old.pooling.bias_init) == ("intra", "squared_norm")
    assert old.config.resize_filter == "bilinear"


# ----------------------------------------------------------------------------- 3. pool classes


def _labels_with_singletons() -> np.ndarray:
    # 12 classes of 1..12 images: class 0 is a singleton, so are classes 20 and 21
    labels = np.concatenate([np.repeat(np.arange(12), np.arange(1, 13)), [20, 21]])
    return np.random.default_rng(3).permutation(labels)


def test_pool_classes_all_draws_every_class_folder_as_the_authors():
    labels = _labels_with_singletons()
    counts = {c: int((labels == c).sum()) for c in np.unique(labels)}
    pool, ipc = ClassBalancedPool(labels, 30, 5, seed=0, classes="all"), 5
    assert pool.classes_per_pool == 30 // 5 and pool.classes.size == 14
    seen: set[int] = set()
    for r in range(60):
        idx = pool.sample(r)
        assert len(np.unique(idx)) == len(idx) <= 30
        drawn, per_class = np.unique(labels[idx], return_counts=True)
        assert len(drawn) == 30 // ipc  # M // I classes, as the authors' round
        assert all(n == min(ipc, counts[c]) for c, n in zip(drawn, per_class, strict=True))
        seen |= set(drawn.tolist())
    assert {0, 20, 21} <= seen  # single-image classes enter pools (as negatives)
    textbook = ClassBalancedPool(labels, 30, 5, seed=0)
    drawn = set().union(*(set(labels[textbook.sample(r)].tolist()) for r in range(60)))
    assert drawn.isdisjoint({0, 20, 21})
    with pytest.raises(ValueError, match="miner.pool_classes: 'some'"):
        ClassBalancedPool(labels, 30, 5, seed=0, classes="some")


@pytest.mark.parametrize("profile", ["params.yaml", "params.paper.yaml"])
def test_per_class_cap_equals_the_authors_for_the_profiles(repo_root, profile):
    # the authors keep min(M // (M // I), n) images per class; we keep min(I, n)
    m = load_params(repo_root / profile).miner
    assert m.pool_size // (m.pool_size // m.images_per_class) == m.images_per_class


# ----------------------------------------------------------------------------- 4. precision


def test_pool_precision_rounding_and_autocast(gen):
    desc = LF.l2n(torch.randn(50, 64, generator=gen))
    assert at_pool_precision(desc, "fp32") is desc and at_pool_precision(desc, "auto") is desc
    half = at_pool_precision(desc, "fp16")
    torch.testing.assert_close(half, LF.l2n(desc.half().float()), rtol=0, atol=0)
    assert not torch.equal(half, desc) and (half - desc).abs().max() < 1e-3
    assert not pool_autocast_fp16("fp32")  # the authors: fp32 everywhere
    assert pool_autocast_fp16("auto") and pool_autocast_fp16("fp16")
    with pytest.raises(ValueError, match="miner.pool_precision: 'bf16'"):
        at_pool_precision(desc, "bf16")


@pytest.fixture
def tiny(tmp_path, repo_root):
    make_train_set(tmp_path / "data" / "train")
    make_retrieval_set(tmp_path / "data", "val")
    params = with_overrides(
        load_params(repo_root / "params.yaml"),
        base={"device": "cpu"},
        data={"root": str(tmp_path / "data"), "train_set": "train", "val_set": "val"},
        model={"pretrained": False, "num_clusters": 4, "image_size": 32},
        miner={"pool_size": 24, "images_per_class": 4, "delta": 1.0, "triplets_per_round": 6},
        train={"frozen_stages": 0},
        extract={"scales": [1.0], "batch_size": 8},
    )
    torch.manual_seed(0)
    init = save_model(build_model(params.model), tmp_path / "init.pt")
    return params, init, tmp_path


def test_trainer_pool_precision_authors_fp32_and_fp16(tiny):
    from msvlad.evaluation.extract import describe_images
    from msvlad.training.trainer import Trainer

    params, init, tmp = tiny
    pool_idx = np.arange(0, 10)  # two classes of five
    out = {}
    for precision in ("fp32", "fp16"):
        p = with_overrides(params, miner={"pool_precision": precision})
        trainer = Trainer(p, init, tmp / precision, device=torch.device("cpu"))
        out[precision] = trainer.inputs.describe(pool_idx)
        labels = torch.from_numpy(trainer.train_set.labels[pool_idx])
        assert len(trainer.miner.mine(out[precision], labels)) >= 1
    items = [ImageItem(trainer.train_set.paths[i]) for i in pool_idx]
    plain, _ = describe_images(load_model(init), items, image_size=32, batch_size=8)
    torch.testing.assert_close(out["fp32"], plain, rtol=0, atol=0)  # untouched fp32
    torch.testing.assert_close(out["fp16"], LF.l2n(plain.half().float()), rtol=0, atol=0)


# ----------------------------------------------------------------------------- 5. resize filter


@pytest.mark.parametrize("policy_size", [64, 37])
def test_resize_filter_lanczos_is_the_authors_transform(tmp_path, policy_size):
    from torchvision import transforms

    rng = np.random.default_rng(0)
    path = tmp_path / "img.png"  # lossless, so both sides read the same pixels
    Image.fromarray(rng.integers(0, 256, (90, 131, 3), dtype=np.uint8)).save(path)
    # their transform: Resize((S, S), ANTIALIAS = LANCZOS) then ToTensor, on the RGB PIL image
    theirs = transforms.Compose(
        [
            transforms.Resize(
                (policy_size, policy_size), interpolation=transforms.InterpolationMode.LANCZOS
            ),
            transforms.ToTensor(),
        ]
    )(Image.open(path).convert("RGB"))
    ours = load_resized(ImageItem(path), policy_size, "square", "lanczos")
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    bilinear = load_resized(ImageItem(path), policy_size, "square", "bilinear")
    assert (bilinear - theirs).abs().max() > 0.05
    with pytest.raises(ValueError, match="model.resize_filter: 'nearest'"):
        load_resized(ImageItem(path), policy_size, "square", "nearest")


# ----------------------------------------------------------------------------- 6. k-means


def test_kmeans_sklearn_minibatch_uses_the_authors_arguments(gen):
    from sklearn.cluster import MiniBatchKMeans

    centres = LF.l2n(torch.randn(8, 16, generator=gen)).numpy()
    rng = np.random.default_rng(0)
    local = centres[rng.integers(0, 8, 3000)] + 0.3 * rng.standard_normal((3000, 16))
    local = (local / np.linalg.norm(local, axis=1, keepdims=True)).astype(np.float32)
    ours = kmeans_centroids(local, 8, seed=424242, method="sklearn_minibatch")
    # MiniBatchKMeans(n_clusters=8, random_state=424242) under scikit-learn 0.21.3's defaults
    theirs = MiniBatchKMeans(
        n_clusters=8,
        init="k-means++",
        max_iter=100,
        batch_size=100,
        compute_labels=True,
        random_state=424242,
        tol=0.0,
        max_no_improvement=10,
        init_size=None,
        n_init=3,
        reassignment_ratio=0.01,
    ).fit(local)
    assert ours.dtype == np.float32 and ours.shape == (8, 16)
    np.testing.assert_array_equal(ours, theirs.cluster_centers_.astype(np.float32))
    assert np.linalg.norm(ours, axis=1).max() < 1.0  # means of unit vectors, not re-normalised
    modern = MiniBatchKMeans(n_clusters=8, random_state=424242).fit(local).cluster_centers_
    assert not np.allclose(ours, modern)  # today's defaults would not be their k-means
    faiss_c = kmeans_centroids(local, 8, seed=0, method="faiss")
    assert faiss_c.shape == (8, 16)
    with pytest.raises(ValueError, match="cluster.kmeans: 'lloyd'"):
        kmeans_centroids(local, 8, method="lloyd")


# ----------------------------------------------------------------------------- 8. schedule


@pytest.mark.filterwarnings("ignore:The epoch parameter")
def test_lr_schedule_lagged_is_the_authors_scheduler_stepped_after_adam(repo_root):
    paper = load_params(repo_root / "params.paper.yaml").train
    cfg = dataclasses.replace(
        paper, lr=2e-3, lr_start=3e-4, warmup_steps=7, decay_every=11, gamma=0.5, lr_decay=0.01
    )
    assert cfg.lr_schedule == "lagged"
    p = torch.nn.Parameter(torch.zeros(1))
    adam = torch.optim.Adam([p], lr=cfg.lr)
    f = lambda t: _authors_multiplier(  # noqa: E731
        t, cfg.lr, cfg.lr_start, cfg.warmup_steps, cfg.decay_every, cfg.gamma, cfg.lr_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(adam, lr_lambda=[f])
    used = []
    for t in range(40):  # their loop: forward/backward, adam.step(), then step(epoch=t)
        used.append(adam.param_groups[0]["lr"])
        p.grad = torch.ones(1)
        adam.step()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scheduler.step(epoch=t)
    assert [lr_at(t, cfg) for t in range(40)] == used


def test_lr_schedule_lagged_worked_values_and_bound(repo_root):
    cfg = dataclasses.replace(load_params(repo_root / "params.paper.yaml").train, lr_decay=2e-6)
    worked = {  # the authors' README values: L=1e-5, W=2000, m=0.1, P=48000, delta=2e-6
        0: 1.0e-06,
        1: 1.0e-06,
        2: 1.0044979910040182e-06,
        1999: 9.951234865477554e-06,
        2000: 9.955697122902636e-06,
        2001: 9.960159362549801e-06,
        47999: 9.124120890952157e-06,
        48000: 9.124104241066135e-06,
        48001: 1.0e-06,
        96001: 1.0e-07,
    }
    for t, rate in worked.items():
        assert lr_at(t, cfg) == pytest.approx(rate, rel=1e-14)
    aligned = dataclasses.replace(cfg, lr_schedule="aligned")
    steps = np.arange(0, 100_000)
    ratio = np.array([lr_at(int(t), cfg) / lr_at(int(t), aligned) for t in steps])
    far = steps[np.abs(ratio - 1) > 0.0045]
    assert far.tolist() == [48000, 96000]  # one old-rate step at each decay, else <= 0.45 %


# ----------------------------------------------------------------------------- profiles, info


def test_paper_profile_follows_the_authors_code_and_mini_keeps_msvlad(repo_root):
    paper = load_params(repo_root / "params.paper.yaml")
    mini = load_params(repo_root / "params.yaml")
    for key, theirs in AUTHORS_CODE.items():
        assert option_value(paper, key) == theirs, key
        assert option_value(mini, key) != theirs, key
    # the "every option" ablation row of each profile switches exactly to the other profile
    for own, other in ((mini, paper), (paper, mini)):
        row = own.methods["msvlad-alt-variant"].set
        assert row == {k: option_value(other, k) for k in AUTHORS_CODE}


def test_info_names_the_variant(repo_root):
    paper = "\n".join(variant_lines(load_params(repo_root / "params.paper.yaml")))
    assert "variant       the authors' released code (8 of 8 options as the authors')" in paper
    assert "model.vlad_norm       across_clusters   (authors)" in paper
    mini = "\n".join(variant_lines(load_params(repo_root / "params.yaml")))
    assert "variant       msvlad, textbook NetVLAD (0 of 8 options" in mini
    assert "(authors: across_clusters)" in mini
    mixed = with_overrides(load_params(repo_root / "params.yaml"), model={"bias_init": "norm"})
    assert "variant       mixed (1 of 8 options" in "\n".join(variant_lines(mixed))
