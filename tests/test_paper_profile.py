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
