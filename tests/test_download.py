"""Downloads against a local HTTP server: resume, checksums, offline errors; safe tar extraction."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from httpserver import FileServer, closed_port_url
from msvlad.data.download import (
    ChecksumError,
    ChecksumRegistry,
    DownloadError,
    download_file,
    extract_archive,
    part_path,
)

DATA = bytes(range(256)) * 40  # 10,240 bytes
SHA = hashlib.sha256(DATA).hexdigest()
MD5 = hashlib.md5(DATA).hexdigest()


@pytest.fixture
def server():
    with FileServer({"/data/file.bin": DATA}) as s:
        yield s


def test_download_verifies_and_skips_existing(server: FileServer, tmp_path: Path) -> None:
    dest = tmp_path / "sub" / "file.bin"
    out = download_file(server.url("/data/file.bin"), dest, sha256=SHA, md5=MD5, size=len(DATA))
    assert out == dest and dest.read_bytes() == DATA
    assert not part_path(dest).exists()
    n = len(server.requests)
    download_file(server.url("/data/file.bin"), dest, sha256=SHA)  # verified copy: no request
    assert len(server.requests) == n


@pytest.mark.parametrize("kind", ["sha256", "md5", "size"])
def test_checksum_mismatch_leaves_nothing(server: FileServer, tmp_path: Path, kind: str) -> None:
    dest = tmp_path / "file.bin"
    wrong = {
        "sha256": {"sha256": "0" * 64},
        "md5": {"md5": "f" * 32},
        "size": {"size": len(DATA) + 1},
    }[kind]
    with pytest.raises(ChecksumError) as err:
        download_file(server.url("/data/file.bin"), dest, **wrong)
    msg = str(err.value)
    assert "file.bin" in msg and "expected" in msg and "got" in msg and "\n" not in msg
    if kind == "sha256":
        assert "0" * 64 in msg and SHA in msg
    assert not dest.exists() and not part_path(dest).exists()


def test_existing_file_with_wrong_checksum_is_an_error(server: FileServer, tmp_path: Path) -> None:
    dest = tmp_path / "file.bin"
    dest.write_bytes(b"not the data")
    with pytest.raises(ChecksumError, match="sha256 expected"):
        download_file(server.url("/data/file.bin"), dest, sha256=SHA)


def test_interrupted_transfer_resumes_with_range(server: FileServer, tmp_path: Path) -> None:
    dest = tmp_path / "file.bin"
    server.cut_after["/data/file.bin"] = 3000
    with pytest.raises(DownloadError, match="run again to resume") as err:
        download_file(server.url("/data/file.bin"), dest, sha256=SHA, retries=0)
    assert "\n" not in str(err.value)
    assert not dest.exists()
    assert part_path(dest).read_bytes() == DATA[:3000]
    download_file(server.url("/data/file.bin"), dest, sha256=SHA)
    assert dest.read_bytes() == DATA and not part_path(dest).exists()
    assert server.requests[-1] == ("/data/file.bin", "bytes=3000-", 206)


def test_interrupted_transfer_retried_within_one_call(server: FileServer, tmp_path: Path) -> None:
    dest = tmp_path / "file.bin"
    server.cut_after["/data/file.bin"] = 5000
    download_file(server.url("/data/file.bin"), dest, sha256=SHA, retries=2)
    assert dest.read_bytes() == DATA
    assert [r[1] for r in server.requests] == [None, "bytes=5000-"]


def test_server_ignoring_range_restarts(server: FileServer, tmp_path: Path) -> None:
    dest = tmp_path / "file.bin"
    part_path(dest).write_bytes(b"stale garbage that is not a prefix")
    server.ignore_range.add("/data/file.bin")
    download_file(server.url("/data/file.bin"), dest, sha256=SHA)
    assert dest.read_bytes() == DATA
    assert server.requests[-1][1] is not None and server.requests[-1][2] == 200


def test_complete_part_is_verified_without_refetch(server: FileServer, tmp_path: Path) -> None:
    dest = tmp_path / "file.bin"
    part_path(dest).write_bytes(DATA)
    download_file(server.url("/data/file.bin"), dest, sha256=SHA)
    assert dest.read_bytes() == DATA
    assert server.requests[-1][2] == 416


def test_offline_error_is_one_clear_line(tmp_path: Path) -> None:
    url = closed_port_url("/gnd_roxford5k.pkl")
    dest = tmp_path / "downloads" / "gnd_roxford5k.pkl"
    with pytest.raises(DownloadError) as err:
        download_file(url, dest, timeout=5)
    msg = str(err.value)
    assert "\n" not in msg
    assert url in msg and str(dest) in msg and "place" in msg
    assert not dest.exists() and not part_path(dest).exists()


def test_http_404_names_url_and_destination(server: FileServer, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="HTTP 404") as err:
        download_file(server.url("/missing.bin"), tmp_path / "missing.bin")
    assert str(tmp_path / "missing.bin") in str(err.value)


def test_registry_trust_on_first_use(server: FileServer, tmp_path: Path) -> None:
    reg = ChecksumRegistry(tmp_path / "checksums.json")
    dest = tmp_path / "a" / "file.bin"
    download_file(server.url("/data/file.bin"), dest, registry=reg, key="host/data/file.bin")
    assert json.loads((tmp_path / "checksums.json").read_text()) == {"host/data/file.bin": SHA}
    # upstream changes the file: a fresh download no longer matches the record
    server.add("/data/file.bin", DATA[::-1])
    dest2 = tmp_path / "b" / "file.bin"
    with pytest.raises(ChecksumError, match=SHA):
        download_file(server.url("/data/file.bin"), dest2, registry=reg, key="host/data/file.bin")
    assert not dest2.exists() and not part_path(dest2).exists()
    # a local copy that was altered after the first use is caught too
    dest.write_bytes(b"tampered")
    with pytest.raises(ChecksumError):
        download_file(server.url("/data/file.bin"), dest, registry=reg, key="host/data/file.bin")
    reg.forget("host/data/file.bin")
    assert reg.get("host/data/file.bin") is None


# ----------------------------------------------------------------------------- archives


def _tar(
    path: Path, members: list[tuple[str, bytes | None, str | None]], mode: str = "w:gz"
) -> Path:
    """Write a tar: (name, data, None) files, (name, None, target) links, (name, None, None) dirs"""
    with tarfile.open(path, mode) as tar:
        for name, data, link in members:
            info = tarfile.TarInfo(name)
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link
                tar.addfile(info)
            elif data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("mode,suffix", [("w:gz", ".tgz"), ("w:gz", ".tar.gz"), ("w", ".tar")])
def test_extract_archive(tmp_path: Path, mode: str, suffix: str) -> None:
    arc = _tar(
        tmp_path / f"a{suffix}",
        [
            ("d", None, None),
            ("d/x.jpg", b"xx", None),
            ("top.txt", b"t", None),
        ],
        mode,
    )
    out = extract_archive(arc, tmp_path / "out")
    assert (out / "d" / "x.jpg").read_bytes() == b"xx"
    assert (out / "top.txt").read_bytes() == b"t"
    with pytest.raises(FileExistsError):
        extract_archive(arc, tmp_path / "out")


@pytest.mark.parametrize(
    "member",
    [
        ("../evil.txt", b"pwned", None),
        ("ok/../../evil.txt", b"pwned", None),
        ("/tmp/evil.txt", b"pwned", None),
        ("link", None, "../../evil.txt"),
        ("abs_link", None, "/etc/passwd"),
    ],
)
def test_extract_archive_refuses_path_traversal(tmp_path: Path, member: tuple) -> None:
    arc = _tar(tmp_path / "bad.tgz", [("fine.jpg", b"ok", None), member])
    dest = tmp_path / "deep" / "out"
    with pytest.raises(ValueError, match="refused") as err:
        extract_archive(arc, dest)
    assert "bad.tgz" in str(err.value)
    assert not dest.exists()
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "deep" / "evil.txt").exists()
    assert not (tmp_path / "deep").exists()  # members are checked before anything is created


def test_extract_archive_rejects_non_archive(tmp_path: Path) -> None:
    bad = tmp_path / "x.tgz"
    bad.write_bytes(b"<html>302 Found</html>")
    with pytest.raises(ValueError, match="x.tgz"):
        extract_archive(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
