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
