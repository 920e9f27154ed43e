"""The paper profile's inputs: everything a long download depends on is checked before it starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from httpserver import FileServer
from msvlad.config import load_params
from msvlad.errors import InputError
from msvlad.stages import prepare
from msvlad.stages.prepare import _datasets_to_prepare
from tinydata import make_retrieval_set


def _paper(tmp_path: Path, repo_root: Path, **sets) -> object:
    return load_params(
        repo_root / "params.paper.yaml", {"data.root": str(tmp_path / "data"), **sets}
    )


def test_missing_rotation_list_stops_before_any_download(tmp_path, repo_root) -> None:
    with FileServer() as server:
        params = _paper(tmp_path, repo_root, **{"data.mirror": server.base_url})
        assert params.prepare.holidays_rotations is None  # the researcher must supply it
        with pytest.raises(InputError, match="prepare.holidays_rotations"):
            prepare.run(params)
        bad = tmp_path / "rot.txt"
        bad.write_text("100001.jpg ninety\n")
        params = _paper(
            tmp_path,
            repo_root,
            **{"data.mirror": server.base_url, "prepare.holidays_rotations": str(bad)},
        )
        with pytest.raises(InputError, match="rot.txt: 100001.jpg: rotation 'ninety'"):
            prepare.run(params)
        assert server.requests == []  # GLDv2 (500 GB) was not started first


def test_unknown_test_set_stops_before_any_download(tmp_path, repo_root) -> None:
    rot = tmp_path / "rot.yaml"
    rot.write_text("100001.jpg: 90\n")
    sets = {"prepare.holidays_rotations": str(rot)}
    with FileServer() as server:
        params = _paper(
            tmp_path,
            repo_root,
            **sets,
            **{"data.mirror": server.base_url, "data.test_sets": ["roxford5k", "myset"]},
        )
        with pytest.raises(InputError, match=r"data.test_sets: 'myset' is no registry dataset"):
            prepare.run(params)
        assert server.requests == []
    make_retrieval_set(tmp_path / "data", "myset")  # laid out by hand: used as it is
    assert _datasets_to_prepare(params, tmp_path / "data") == [
        "gldv2_clean",
        "holidays_rotated",
        "roxford5k",
    ]


def test_the_replicas_are_what_prepare_reads(tmp_path, repo_root) -> None:
    """Every replica of the rehearsal's mirror goes through the registry's own preparation."""
    from msvlad.data.official import prepare_dataset
    from msvlad.data.testsets import load_dataset, load_distractors
    from msvlad.data.trainsets import load_training_set
    from replicas import GLDV2_CLASSES, HOLIDAYS_TURNED, paper_mirror

    mirror = paper_mirror(weights=False)
    rot = tmp_path / "rot.yaml"
    rot.write_text(mirror.rotations)
    root = tmp_path / "data"
    with FileServer(mirror.files) as server:
        params = _paper(
            tmp_path,
            repo_root,
            **{"data.mirror": server.base_url, "prepare.holidays_rotations": str(rot)},
        )
        prepare.run(params)
        prepare_dataset("revisitop1m", root, mirror=server.base_url)
        assert all(status == 200 for _, _, status in server.requests)
    for name, (n_db, n_q) in mirror.sizes.items():
        ds = load_dataset(root, name)
        assert (len(ds.imlist), len(ds.qimlist)) == (n_db, n_q), name
    assert load_dataset(root, "holidays_rotated").rotations == HOLIDAYS_TURNED
    train = load_training_set(root / "gldv2_clean")
    assert len(train) == mirror.train_images
    assert sorted(train.classes) == sorted(k for k, n in GLDV2_CLASSES.items() if n >= 2)
    assert len(load_distractors(root, "revisitop1m")) == mirror.distractors
    # the known-corrupt Paris name (an HTML page) was skipped while laying the images out
    assert "paris_louvre_000136.jpg" in (root / "rparis6k" / "skipped.txt").read_text()


@pytest.mark.parametrize("backbone", ["resnet50", "vgg16"])
def test_other_backbone_rows_load_their_pinned_cirtorch_weights(
    tmp_path, repo_root, monkeypatch, backbone
) -> None:
    """A ResNet-50/VGG16 row of the paper profile fetches cirtorch's file by its official name and
    loads it (a random replica as the rehearsal serves, accepted by a pin, refused without)."""
    import hashlib
    import io

    import torch

    from msvlad.config import method_params, with_overrides
    from msvlad.data.download import url_key
    from msvlad.nn.backbones import BACKBONES
    from msvlad.nn.model import build_model
    from replicas import trunk_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("MSVLAD_MIRROR", raising=False)
    url = BACKBONES[backbone].urls["cirtorch"]
    data = trunk_weights(backbone)
    pin = hashlib.sha256(data).hexdigest()
    state = torch.load(io.BytesIO(data), weights_only=True)
    paper = _paper(tmp_path, repo_root)
    rows = [r for r in paper.methods if method_params(paper, r).model.backbone == backbone]
    assert len(rows) == 3  # trained, its k-means init, off-the-shelf GeM
    with FileServer({"/" + url_key(url): data}) as server:
        for row in rows:
            params = method_params(_paper(tmp_path, repo_root), row)
            assert params.model.backbone == backbone and params.model.weights == "cirtorch"
            with pytest.raises(InputError, match="does not start with"):
                build_model(params.model, mirror=server.base_url)  # the name check holds
            pinned = with_overrides(params, model={"weights_sha256": pin})
            model = build_model(pinned.model, mirror=server.base_url)
            body = model.backbone.body.state_dict()
            assert all(torch.equal(body[k], v) for k, v in state.items()), row
            channels = {"resnet50": 2048, "vgg16": 512}[backbone]
            assert model.backbone.out_channels == channels
            if params.model.pooling == "msvlad":
                assert model.raw_dim == params.model.num_clusters * 512  # split 512: VGG16 whole
