"""Assets cache: manifest round trip, best-effort sources, idempotent second call."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from msvlad.mini.assets import (
    PHOTO_FILES,
    Manifest,
    fetch_assets,
    read_manifest,
    scan_photos,
    write_manifest,
)


def _write_png(path: Path, seed: int, size: tuple[int, int] = (24, 16)) -> None:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _fake_skimage_dir(root: Path) -> Path:
    """A folder laid out like skimage/data with tiny stand-ins for every curated file."""
    for i, member in enumerate(sorted(PHOTO_FILES["skimage"].values())):
        path = root / member
        if path.suffix == ".jpg":
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (20, 10), (i, 0, 0)).save(path, format="JPEG")
        else:
            _write_png(path, i)
    return root


def test_manifest_round_trip(tmp_path: Path) -> None:
    _write_png(tmp_path / "photos" / "a" / "x.png", 0, (30, 20))
    _write_png(tmp_path / "photos" / "b" / "y.png", 1)
    (tmp_path / "photos" / "b" / "notes.txt").write_text("not a photo")
    m = scan_photos(tmp_path, {"a": "pkg-1.0"})
    assert [p.photo_id for p in m.photos] == ["a/x.png", "b/y.png"]
    x = m.by_id()["a/x.png"]
    data = (tmp_path / "photos" / "a" / "x.png").read_bytes()
    assert (x.width, x.height, x.size_bytes) == (30, 20, len(data))
    assert x.sha256 == hashlib.sha256(data).hexdigest() and x.path == "photos/a/x.png"
    write_manifest(tmp_path, m)
    assert read_manifest(tmp_path) == m
    assert Manifest.from_dict(m.to_dict()) == m


def test_unavailable_source_is_skipped_with_warning(tmp_path: Path, caplog) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with caplog.at_level(logging.WARNING, logger="msvlad.mini.assets"):
        m = fetch_assets(tmp_path / "assets", sources=("skimage",), skimage_dir=empty)
    assert m.photos == () and m.sources == {"skimage": "unavailable"}
    assert any("skimage unavailable" in r.getMessage() for r in caplog.records)
    assert read_manifest(tmp_path / "assets") == m


def test_failing_pip_and_apt_are_skipped(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="msvlad.mini.assets"):
        m = fetch_assets(
            tmp_path,
            sources=("vismatch", "darknet"),
            pip_command=("false",),
            apt_command=("no-such-apt-get",),
        )
    assert m.sources == {"vismatch": "unavailable", "darknet": "unavailable"}
    assert len([r for r in caplog.records if "unavailable" in r.getMessage()]) == 2


def test_local_source_copied_and_second_call_does_nothing(tmp_path: Path) -> None:
    src = _fake_skimage_dir(tmp_path / "skdata")
    assets = tmp_path / "assets"
    m = fetch_assets(assets, sources=("skimage",), skimage_dir=src)
    assert {p.name for p in m.photos} == set(PHOTO_FILES["skimage"])
    for p in m.photos:
        assert (assets / p.path).read_bytes() == (src / PHOTO_FILES["skimage"][p.name]).read_bytes()
    before = {f: f.stat().st_mtime_ns for f in assets.rglob("*") if f.is_file()}
    # Second call: the source folder is gone, yet nothing is fetched or rewritten.
    m2 = fetch_assets(assets, sources=("skimage",), skimage_dir=tmp_path / "gone")
    after = {f: f.stat().st_mtime_ns for f in assets.rglob("*") if f.is_file()}
    assert m2 == m and before == after


def test_unknown_source_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sources"):
        fetch_assets(tmp_path, sources=("flickr",))


def test_curated_names_are_unique_photos() -> None:
    for source, files in PHOTO_FILES.items():
        assert files, source
        assert all(n.lower().endswith((".jpg", ".png")) for n in files)
        assert len(set(files.values())) == len(files)


@pytest.mark.slow
def test_real_fetch_from_registries(tmp_path: Path) -> None:
    """Downloads the PyPI wheels (and Debian packages where apt-get works); skips when offline."""
    m = fetch_assets(tmp_path, sources=("skimage", "vismatch", "patchnetvlad", "darknet"))
    if m.sources.get("vismatch") == "unavailable":
        pytest.skip("PyPI not reachable")
    ids = set(m.by_id())
    assert {
        "vismatch/montmartre_close.jpg",
        "patchnetvlad/tokyo_query.jpg",
        "skimage/motorcycle_left.png",
    } <= ids
    for p in m.photos:
        assert (tmp_path / p.path).stat().st_size == p.size_bytes and p.width > 0
