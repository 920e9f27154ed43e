"""The network-claim rows of params.yaml: they load, build with the stated dimensions, freeze the
same blocks on every backbone, and the trained GeM learns its exponent at cirtorch's rate."""

from __future__ import annotations

import re

import pytest
import torch

from msvlad.config import load_params, method_params, with_overrides
from msvlad.nn.model import build_model, save_model
from msvlad.nn.pooling import GEM_P_LR_SCALE
from tinydata import make_retrieval_set, make_train_set

# row -> (backbone, pooling, trained, raw descriptor dim, whitened dim or None)
NEW_ROWS = {
    "netvlad": ("efficientnet_lite0", "netvlad", True, 32 * 320, None),
    "gem": ("efficientnet_lite0", "gem", True, 320, 320),
    "msvlad-nosplit": ("efficientnet_lite0", "msvlad", True, 32 * 320, None),
    "msvlad-2x2": ("efficientnet_lite0", "msvlad", True, 32 * 160, None),
    "lite1-msvlad": ("efficientnet_lite1", "msvlad", True, 32 * 160, None),
    "lite1-msvlad-ots": ("efficientnet_lite1", "msvlad", False, 32 * 160, None),
    "lite1-gem-ots": ("efficientnet_lite1", "gem", False, 320, 320),
    "lite2-msvlad": ("efficientnet_lite2", "msvlad", True, 32 * 176, None),
    "lite2-msvlad-ots": ("efficientnet_lite2", "msvlad", False, 32 * 176, None),
    "lite2-gem-ots": ("efficientnet_lite2", "gem", False, 352, 352),
}


@pytest.fixture(scope="module")
def params(request):
    return load_params(request.config.rootpath / "params.yaml")


@pytest.mark.parametrize("key", sorted(NEW_ROWS))
def test_new_rows_build_with_their_dimensions(params, key, gen):
    backbone, pooling, trained, dim, whitened = NEW_ROWS[key]
    row = method_params(params, key)
    assert (row.model.backbone, row.model.pooling) == (backbone, pooling)
    assert (params.methods[key].miner is not None) == trained and row.whiten.dim == whitened
    if trained:  # the paper row's miner, schedule, data and test-time input
        paper = method_params(params, "msvlad")
        assert (row.miner, row.train, row.data, row.extract) == (
            paper.miner,
            paper.train,
            paper.data,
            paper.extract,
        )
    model = build_model(row.model, pretrained=False).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 96, 128, generator=gen))
    assert out.shape == (1, dim) and model.raw_dim == dim


@pytest.mark.parametrize("key", sorted(NEW_ROWS))
def test_msvlad_info_states_each_new_rows_dimensions(repo_root, key, capsys):
    """`msvlad info --method <row>` (the command a reader runs) prints the row's backbone, its
    raw descriptor dimension and its whitening."""
    from msvlad.cli import main

    backbone, pooling, _, dim, whitened = NEW_ROWS[key]
    assert main(["info", "--params", str(repo_root / "params.yaml"), "--method", key]) == 0
    out = capsys.readouterr().out.splitlines()
    lines = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in out if line[:1] != " ")
    channels = {"efficientnet_lite0": 320, "efficientnet_lite1": 320, "efficientnet_lite2": 352}
    assert lines["backbone"].startswith(f"{backbone} ({channels[backbone]} channels")
    assert lines["pooling"].startswith(f"{pooling}:")
    assert lines["raw dim"] == f"{dim}"
    if whitened is None:
        assert lines["whitened dim"] == "none (whiten.dim null)"
    else:
        assert lines["whitened dim"].startswith(f"{whitened} (PCA-whitening")


def test_mini_profile_rows_give_every_network_claim(params, caplog):
    """params.yaml's rows give every claim of the paper's network, derived from their settings,
    with no claim left out."""
    from msvlad.report.results import paper_claims

    with caplog.at_level("WARNING", logger="msvlad.report.results"):
        claims = paper_claims(params, "msvlad", setups=("hard",))
    assert caplog.text == ""
    lite = [
        (f"efficientnet_lite{v}: trained > {what}", f"lite{v}-msvlad", f"lite{v}-{ref}")
        for v in (1, 2)
        for what, ref in (("its k-means init", "msvlad-ots"), ("off-the-shelf GeM", "gem-ots"))
    ]
    assert [(c.claim, c.method, c.reference) for c in claims] == [
        ("efficientnet_lite0: trained > its k-means init", "msvlad", "msvlad-ots"),
        ("efficientnet_lite0: trained > off-the-shelf GeM", "msvlad", "gem-ots"),
        ("multi-scale NetVLAD > single-scale NetVLAD (both trained)", "msvlad", "netvlad"),
        ("multi-scale NetVLAD > GeM (both trained)", "msvlad", "gem"),
        (
            "split into 160-d chunks: same mAP (within CI) as no split",
            "msvlad",
            "msvlad-nosplit",
        ),
        ("windows 2×2+3×3 > 2×2", "msvlad", "msvlad-2x2"),
        *lite,
        *[
            (f"difficulty miner > {m} miner", "msvlad", f"msvlad-{short}")
            for m, short in (
                ("hardest_negative", "hardest"),
                ("random", "random"),
                ("batch_hard", "batchhard"),
            )
        ],
    ]
    assert {c.kind for c in claims if "split" in c.claim} == {"no_worse"}


@pytest.mark.parametrize(
    "backbone", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
)
def test_frozen_stages_leave_the_last_block_trained_on_every_lite(params, backbone):
    """train.frozen_stages: 7 freezes the stem and six block stages of each Lite: the last stage
    (one MBConv block, the 320/352-channel one) and the pooling are what trains."""
    model = build_model(
        with_overrides(params, model={"backbone": backbone, "split": None}).model, False
    )
    assert model.backbone.num_stages == 8
    trainable = {id(p) for p in model.freeze_stages(params.train.frozen_stages)}
    last = model.backbone.stages[-1]
    expected = {id(p) for p in [*last.parameters(), *model.pooling.parameters()]}
    assert trainable == expected and len(last) == 1


def test_trained_gem_learns_its_exponent_at_ten_times_the_lr(tmp_path, params):
    from msvlad.training.trainer import Trainer

    make_train_set(tmp_path / "data" / "train")
    make_retrieval_set(tmp_path / "data", "val")
    tiny = with_overrides(
        method_params(params, "gem"),
        base={"device": "cpu"},
        data={"root": str(tmp_path / "data"), "train_set": "train", "val_set": "val"},
        model={"pretrained": False, "image_size": 64},
        miner={"delta": 1.0, "pool_size": 24, "images_per_class": 4, "triplets_per_round": 6},
        train={"batch_triplets": 3, "micro_batch": 3, "steps_per_epoch": 2, "epochs": 1},
        extract={"scales": [1.0], "batch_size": 8},
    )
    torch.manual_seed(0)
    init = save_model(build_model(tiny.model), tmp_path / "init.pt")
    trainer = Trainer(tiny, init, tmp_path / "run", device=torch.device("cpu"))
    trainer.run()
    plain, exponent = trainer.optimizer.param_groups
    assert exponent["params"] == [trainer.model.pooling.p] and exponent["weight_decay"] == 0.0
    assert exponent["lr"] == pytest.approx(GEM_P_LR_SCALE * plain["lr"])
    assert trainer.model.pooling.p.item() != pytest.approx(params.model.gem_p, abs=1e-7)
