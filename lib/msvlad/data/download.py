"""Verified, resumable downloads and safe archive extraction.

- `download_file` streams to ``<dest>.part`` and resumes it with an HTTP ``Range`` request (a
  server that ignores Range restarts the file from zero), checks size and checksums, then renames
  onto `dest`: nothing unverified ever sits under the final name.
- Offline, it fails with one line saying which URL could not be fetched and which file to place
  where; a file already at `dest` is used as is (after verification), so copying the files by hand
  is always a way through.
- Mirrors: ``mirror=`` or ``$MSVLAD_MIRROR`` (``http://...`` or ``file:///...``) replaces the
  official hosts: ``<mirror>/<host>/<path>`` (`mirror_url`). `Fetcher` keeps each file of a data
  root in ``ROOT/downloads/<host>/<path>``, the layout `wget -x` writes and a mirror must have;
  the network weights (`msvlad.nn.backbones`) use the same mirrors.
- Trust on first use: the official hosts publish no checksums for the Oxford/Paris/Holidays/
  SfM-120k/R1M files (only GLDv2 ships md5 files), and we could not fetch them to pre-compute
  hashes. `ChecksumRegistry` therefore records the sha256 of each file the first time it is
  downloaded or found, and every later use is checked against that record. This detects a
  changed or corrupted copy; it cannot prove the first copy was the official one.
- `extract_archive` checks every member before writing any: links (symbolic or hard), devices,
  fifos, absolute names and ``..`` components are refused with one line naming the archive and
  the member (datasets never need them). It then writes the files one by one, never through a
  link, into a temporary folder renamed into place only when complete. The official datasets
  come only as tar archives (no zip).
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import http.client
import logging
import lzma
import os
import re
import shutil
import tarfile
import tempfile
import threading
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from tqdm import tqdm

from msvlad.errors import InputError
from msvlad.storage import read_json, umask, write_json

log = logging.getLogger(__name__)

CHUNK = 1 << 20
USER_AGENT = "msvlad/0.1 (python urllib)"
MIRROR_ENV = "MSVLAD_MIRROR"


class DownloadError(InputError, RuntimeError):
    """A file could not be fetched (offline, refused, HTTP error or interrupted transfer)."""


class ChecksumError(InputError):
    """A file's size or checksum differs from the expected one (one line on the command line)."""


class LocalWriteError(OSError):
    """The local copy could not be written (a full disk...): named, not taken for a bad fetch."""


# ----------------------------------------------------------------------------- checksums


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def verify_file(
    path: Path,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    size: int | None = None,
    name: str | None = None,
) -> str | None:
    """Raise ChecksumError (file, expected, got) on a mismatch; return the sha256 if computed."""
    label = name or str(path)
    if size is not None:
        got_size = path.stat().st_size
        if got_size != size:
            raise ChecksumError(f"{label}: size expected {size} bytes, got {got_size}")
    got_sha = None
    for algorithm, expected in (("sha256", sha256), ("md5", md5)):
        if expected is None:
            continue
        got = file_digest(path, algorithm)
        if algorithm == "sha256":
            got_sha = got
        if got.lower() != expected.strip().lower():
            raise ChecksumError(
                f"{label}: {algorithm} expected {expected.strip().lower()}, got {got}"
            )
    return got_sha


class ChecksumRegistry:
    """JSON file of sha256 per downloaded file (trust on first use; see the module docstring)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def entries(self) -> dict[str, str]:
        """All recorded key -> sha256 pairs."""
        if not self.path.is_file():
            return {}
        data = read_json(self.path)
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise InputError(
                f"{self.path}: expected a JSON object of file key -> sha256 hex string"
            )
        return data

    def get(self, key: str) -> str | None:
        """The recorded sha256 of `key`, or None if never seen."""
        return self.entries().get(key)

    def record(self, key: str, sha256: str) -> None:
        """Record `key`'s sha256 (an existing, different record is an error: use `forget` first)."""
        with self._lock:
            data = self.entries()
            old = data.get(key)
            if old is not None and old != sha256:
                raise ChecksumError(
                    f"{key}: sha256 expected {old} (recorded in {self.path}), got {sha256}"
                )
            if old is None:
                data[key] = sha256
                write_json(self.path, data)

    def forget(self, key: str) -> None:
        """Drop the record of `key` (after a deliberate re-release of a file upstream)."""
        with self._lock:
            data = self.entries()
            if data.pop(key, None) is not None:
                write_json(self.path, data)

    def check(self, key: str, path: Path, digest: str | None = None) -> str:
        """Check `path` (or its sha256 `digest`) against the record of `key`; record it if new."""
        digest = digest or file_digest(path)
        self.record(key, digest)
        return digest


# ----------------------------------------------------------------------------- download


def part_path(dest: Path) -> Path:
    """Where a download of `dest` is staged until verified: ``<dest>.part``."""
    return dest.with_suffix(dest.suffix + ".part")


def _offline_error(url: str, dest: Path, err: BaseException) -> DownloadError:
    reason = getattr(err, "reason", None) or err
    if isinstance(err, urllib.error.HTTPError):
        reason = f"HTTP {err.code} {err.reason}"
    reason = " ".join(str(reason).split()) or type(err).__name__
    return DownloadError(
        f"cannot fetch {url} ({reason}); "
        f"to proceed offline, place that file at {dest} and run again"
    )


def _content_range_start(value: str | None) -> int | None:
    match = re.match(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)", value or "")
    return int(match.group(1)) if match else None


def _fetch(url: str, part: Path, *, timeout: float, desc: str, expected_size: int | None) -> None:
    """One transfer attempt into `part`, resuming from its current length when possible."""
    offset = part.stat().st_size if part.is_file() else 0
    if expected_size is not None and offset == expected_size:
        return  # the previous attempt finished; verification decides
    if expected_size is not None and offset > expected_size:
        part.unlink()
        offset = 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code != 416 or not offset:
            raise
        # nothing left past `offset`: complete if the server's length equals it, else start over
        total = re.match(r"\s*bytes\s+\*/(\d+)", err.headers.get("Content-Range", "") or "")
        if total and int(total.group(1)) == offset:
            log.info("%s: all %d bytes already received; verifying", url, offset)
            return
        part.unlink()
        return _fetch(url, part, timeout=timeout, desc=desc, expected_size=expected_size)
    with response:
        status = getattr(response, "status", None)
        start = (
            _content_range_start(response.headers.get("Content-Range")) if status == 206 else None
        )
        if offset and start == offset:
            mode = "ab"
            log.info("%s: resuming at byte %d", url, offset)
        else:
            if offset:
                log.info("%s: server ignored the Range request; restarting from zero", url)
            mode, offset = "wb", 0
        length = response.headers.get("Content-Length")
        remaining = int(length) if length is not None and length.isdigit() else None
        total = offset + remaining if remaining is not None else expected_size
        received = 0
        try:
            out = open(part, mode)
        except OSError as err:
            raise LocalWriteError(err.errno, err.strerror, str(part)) from None
        with (
            out,
            tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, desc=desc, leave=False
            ) as bar,
        ):
            while True:
                block = response.read(CHUNK)
                if not block:
                    break
                try:
                    out.write(block)
                except OSError as err:
                    raise LocalWriteError(err.errno, err.strerror, str(part)) from None
                received += len(block)
                bar.update(len(block))
        if remaining is not None and received < remaining:
            raise http.client.IncompleteRead(b"", remaining - received)


def download_file(
    url: str,
    dest: str | os.PathLike,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    size: int | None = None,
    desc: str | None = None,
    timeout: float = 30.0,
    retries: int = 3,
    registry: ChecksumRegistry | None = None,
    key: str | None = None,
) -> Path:
    """Download `url` to `dest`: resumable, verified, renamed atomically; skipped if present.

    Args:
        sha256, md5, size: expected values; a mismatch deletes the partial file and raises
            ChecksumError.
        retries: how many times an interrupted transfer is resumed before DownloadError (the
            ``.part`` file is kept, so running again resumes too).
        registry, key: trust-on-first-use record; `key` defaults to the file name.
    """
    dest = Path(dest)
    key = key or dest.name
    if sha256 is None and registry is not None:
        sha256 = registry.get(key)
    if dest.is_file():
        digest = verify_file(dest, sha256=sha256, md5=md5, size=size, name=str(dest))
        if registry is not None:
            registry.check(key, dest, digest)
        log.debug("%s: present and verified", dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(dest)
    label = desc or dest.name
    attempt = 0
    while True:
        try:
            _fetch(url, part, timeout=timeout, desc=label, expected_size=size)
            break
        except LocalWriteError:
            raise
        except urllib.error.HTTPError as err:
            raise _offline_error(url, dest, err) from None
        except (http.client.IncompleteRead, ConnectionError, TimeoutError) as err:
            have = part.stat().st_size if part.is_file() else 0
            if attempt < retries and have > 0:
                attempt += 1
                log.warning(
                    "%s: transfer interrupted at byte %d (%s); resuming (%d/%d)",
                    url,
                    have,
                    type(err).__name__,
                    attempt,
                    retries,
                )
                continue
            if have > 0:
                raise DownloadError(
                    f"transfer of {url} interrupted after {have} bytes ({type(err).__name__}); "
                    f"run again to resume {part}, or place the complete file at {dest}"
                ) from None
            raise _offline_error(url, dest, err) from None
        except (urllib.error.URLError, OSError, ValueError) as err:
            raise _offline_error(url, dest, err) from None
    try:
        digest = verify_file(part, sha256=sha256, md5=md5, size=size, name=str(dest))
        if registry is not None:
            registry.check(key, part, digest)
    except ChecksumError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    log.info("downloaded %s -> %s", url, dest)
    return dest


# ----------------------------------------------------------------------------- mirrors


def resolve_mirror(mirror: str | None = None) -> str | None:
    """The mirror to use: the argument, else $MSVLAD_MIRROR, else None (official hosts)."""
    return mirror or os.environ.get(MIRROR_ENV) or None


def url_key(url: str) -> str:
    """``host/path`` of an official URL: its place in a mirror, downloads/ and checksums.json."""
    parts = urlsplit(url)
    return f"{parts.hostname}{parts.path}"


def mirror_url(url: str, mirror: str | None) -> str:
    """The official `url`, or ``<mirror>/<host>/<path>`` when a mirror is given."""
    return url if not mirror else f"{mirror.rstrip('/')}/{url_key(url)}"


@dataclass(frozen=True)
class Fetcher:
    """Downloads official files (or mirror copies) to ROOT/downloads/<host>/<path>, verified."""

    data_root: Path
    mirror: str | None = None
    timeout: float = 30.0

    @property
    def registry(self) -> ChecksumRegistry:
        """Trust-on-first-use sha256 record, ROOT/checksums.json."""
        return ChecksumRegistry(self.data_root / "checksums.json")

    def local_path(self, url: str) -> Path:
        """Where the file of `url` is kept (and where to place it by hand offline)."""
        return self.data_root / "downloads" / url_key(url)

    def fetch(self, url: str, *, md5: str | None = None, sha256: str | None = None) -> Path:
        """Download `url` (or reuse the verified local copy) and return its path."""
        return download_file(
            mirror_url(url, self.mirror),
            self.local_path(url),
            md5=md5,
            sha256=sha256,
            desc=PurePosixPath(url).name,
            timeout=self.timeout,
            registry=self.registry,
            key=url_key(url),
        )


# ----------------------------------------------------------------------------- archives


class ArchiveError(InputError):
    """An archive is unreadable, or holds a member a dataset never needs (refused, one line)."""


_SPECIAL_MEMBERS = {
    tarfile.SYMTYPE: "a symbolic link",
    tarfile.LNKTYPE: "a hard link",
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a fifo",
}
# what a damaged archive raises while its members are read (besides OSError from the disk)
_READ_ERRORS: tuple[type[BaseException], ...] = (
    tarfile.TarError,
    EOFError,
    zlib.error,
    gzip.BadGzipFile,
    lzma.LZMAError,
)


def _shown(name: str) -> str:
    """A member name for a one-line message: its repr (newlines escaped), long middles cut."""
    return repr(name if len(name) <= 100 else f"{name[:60]}...{name[-30:]}")


def member_parts(archive: Path, member: tarfile.TarInfo) -> tuple[str, ...]:
    """The path components of a file or folder member, or ArchiveError naming it.

    Datasets hold only regular files and folders: links of either kind, devices, fifos and other
    special members are refused, and so are absolute names and ``..`` components. Without links
    no member can be written through another, so the components are all that places a member.
    """
    name = member.name
    kind = _SPECIAL_MEMBERS.get(member.type)
    if kind is None and not (member.isreg() or member.isdir()):
        kind = f"a special member (tar type {member.type!r})"
    if kind is not None:
        link = f" -> {_shown(member.linkname)}" if member.issym() or member.islnk() else ""
        raise ArchiveError(
            f"{archive}: member {_shown(name)} is {kind}{link} (refused: a dataset archive "
            "holds only files and folders)"
        )
    if "\x00" in name or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise ArchiveError(f"{archive}: member {_shown(name)} has an absolute path (refused)")
    if ".." in re.split(r"[/\\]", name):
        raise ArchiveError(f"{archive}: member {_shown(name)} has a '..' component (refused)")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if not parts and member.isreg():
        raise ArchiveError(f"{archive}: member {_shown(name)} is a file without a name (refused)")
    return parts


def scan_archive(archive: Path, tar: tarfile.TarFile) -> list[tuple[tarfile.TarInfo, tuple]]:
    """Every member with its path components, all checked before anything is extracted.

    Besides `member_parts`, refuses a file listed twice and a member under a file's name.
    """
    try:
        members = tar.getmembers()
    except _READ_ERRORS as err:
        raise ArchiveError(f"{archive}: not a readable tar archive ({err})") from None
    files: set[tuple[str, ...]] = set()
    folders: set[tuple[str, ...]] = set()
    out = []
    for m in members:
        parts = member_parts(archive, m)
        above = next((parts[:i] for i in range(1, len(parts)) if parts[:i] in files), None)
        if above is not None:
            raise ArchiveError(
                f"{archive}: member {_shown(m.name)} lies under the file "
                f"{_shown('/'.join(above))} (refused)"
            )
        if m.isreg() and parts in files:
            raise ArchiveError(f"{archive}: member {_shown(m.name)} is listed twice (refused)")
        if (m.isreg() and parts in folders) or (m.isdir() and parts in files):
            raise ArchiveError(
                f"{archive}: member {_shown(m.name)} is both a file and a folder (refused)"
            )
        folders.update(parts[:i] for i in range(1, len(parts)))
        (files if m.isreg() else folders).add(parts)
        out.append((m, parts))
    return out


def _extract_file(archive: Path, tar: tarfile.TarFile, m: tarfile.TarInfo, target: Path) -> None:
    """Write one regular member to `target`, a new file (never through a link)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        src = tar.extractfile(m)
    except _READ_ERRORS as err:
        raise ArchiveError(f"{archive}: member {_shown(m.name)} is unreadable ({err})") from None
    assert src is not None  # a regular member
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    with src, os.fdopen(os.open(target, flags, 0o666), "wb") as out:
        while True:
            try:
                block = src.read(CHUNK)
            except _READ_ERRORS as err:
                raise ArchiveError(
                    f"{archive}: member {_shown(m.name)} is unreadable ({err})"
                ) from None
            if not block:
                break
            try:
                out.write(block)
            except OSError as err:  # a full disk: name the file being written
                raise OSError(err.errno, err.strerror, str(target)) from None
    try:
        os.utime(target, (m.mtime, m.mtime))
    except (OverflowError, ValueError, OSError):
        pass  # an out-of-range time stamp in the header: the file keeps its write time


def extract_archive(archive: str | os.PathLike, dest_dir: str | os.PathLike) -> Path:
    """Extract a .tar/.tgz/.tar.gz into `dest_dir` (which must not exist) safely and atomically.

    Every member is checked first (`scan_archive`): a refused one stops the extraction before any
    file is written. Members are then written one by one as new regular files and folders (no
    link is ever created, none is followed) into a temporary folder beside `dest_dir`, renamed
    onto it when complete; a failure removes the temporary folder. The interpreter's tarfile
    filters are not relied on (Python 3.11.7's `data` filter lets a symlink chain longer than
    PATH_MAX write outside the folder, CVE-2025-4517).
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    if dest_dir.exists():
        raise FileExistsError(
            errno.EEXIST,
            f"already exists; remove it to extract {archive.name} again",
            str(dest_dir),
        )
    try:
        tar = tarfile.open(archive, "r:*")
    except _READ_ERRORS as err:
        raise ArchiveError(f"{archive}: not a readable tar archive ({err})") from None
    with tar:
        members = scan_archive(archive, tar)
        dest_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(
            tempfile.mkdtemp(prefix=f".{dest_dir.name}.", suffix=".tmp", dir=dest_dir.parent)
        )
        try:
            for m, parts in tqdm(
                members, desc=f"extract {archive.name}", unit=" files", leave=False
            ):
                target = tmp.joinpath(*parts)
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                else:
                    _extract_file(archive, tar, m, target)
            os.chmod(tmp, 0o777 & ~umask())
            os.replace(tmp, dest_dir)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return dest_dir
