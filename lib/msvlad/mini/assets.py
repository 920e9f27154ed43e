"""Real photographs that ship inside registry packages, copied into a local assets cache.

Sources (each best-effort; an unavailable one is skipped with a warning):
  skimage       `skimage/data` of the installed scikit-image (used directly)
  vismatch      PyPI wheel `vismatch==1.4.0`, `assets/example_pairs/` (pip download, no install)
  patchnetvlad  PyPI wheel `patchnetvlad==0.1.8`, `example_images/` (pip download, no install)
  opencv-doc    Debian, `/usr/share/doc/opencv-doc/examples/data/` (apt-get download + dpkg-deb)
  darknet       Debian, `/usr/share/darknet/data/` (apt-get download + dpkg-deb)

Only the curated real photographs in `PHOTO_FILES` are taken (no drawings, charts, renders).
Photos land unchanged in `<assets>/photos/<source>/<name>`; `<assets>/manifest.json` lists every
photo with its sha256 and size, and is a pure function of the files present, so it is
deterministic given the sources.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image

from msvlad.storage import read_json, write_json

log = logging.getLogger(__name__)

DEFAULT_SOURCES = ("skimage", "vismatch", "patchnetvlad", "opencv-doc", "darknet")
MANIFEST_NAME = "manifest.json"
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")

# PyPI wheels: exact pins, since the files inside are what the benchmark is built from.
WHEELS = {"vismatch": "vismatch==1.4.0", "patchnetvlad": "patchnetvlad==0.1.8"}
# Debian packages: the package name and the folder inside it that holds the photos.
DEBS = {
    "opencv-doc": ("opencv-doc", "usr/share/doc/opencv-doc/examples/data"),
    "darknet": ("darknet", "usr/share/darknet/data"),
}

# Curated real photographs per source: flat name -> path inside the package (or skimage/data).
# Excluded on purpose: drawings, logos, charts and scans (HappyFish, logos, pic*, page, horse,
# digits, notes, cards), paintings (starry_night, scream, fresco fsm, example_test), renders
# (Blender_Suzanne, blox, WindowsLogo, the sphereglue barbershop panoramas) and ground-truth maps
# (aloeGT). Real photos of text or shapes (skimage text, sudoku, pca_test1) are kept, for use as
# train classes only.
PHOTO_FILES: dict[str, dict[str, str]] = {
    "skimage": {
        n: n
        for n in (
            "astronaut.png",
            "camera.png",
            "cell.png",
            "chelsea.png",
            "clock_motion.png",
            "coffee.png",
            "coins.png",
            "brick.png",
            "grass.png",
            "gravel.png",
            "hubble_deep_field.jpg",
            "ihc.png",
            "moon.png",
            "motorcycle_left.png",
            "motorcycle_right.png",
            "retina.jpg",
            "rocket.jpg",
            "text.png",
        )
    },
    "vismatch": {
        p.rsplit("/", 1)[1]: f"vismatch/assets/example_pairs/{p}"
        for p in (
            "outdoor/montmartre_close.jpg",
            "outdoor/montmartre_far.jpg",
            "indoor/gcs_close.jpg",
            "indoor/gcs_far.jpg",
            "false_positive/chartres.jpg",
            "false_positive/notre_dame.jpg",
            "sat2iss/photo_from_iss.jpg",
            "sat2iss/satellite_img.jpg",
            "thermal/thermal.jpg",
            "thermal/visible.jpg",
            "fresco/sist_chapel.jpg",
        )
    },
    "patchnetvlad": {
        n: f"patchnetvlad/example_images/{n}" for n in ("tokyo_query.jpg", "tokyo_db.png")
    },
    "opencv-doc": {
        n: f"{DEBS['opencv-doc'][1]}/{n}"
        for n in (
            # two-view scenes
            "graf1.png",
            "graf3.png",
            "leuvenA.jpg",
            "leuvenB.jpg",
            "aero1.jpg",
            "aero3.jpg",
            "box.png",
            "box_in_scene.png",
            "basketball1.png",
            "basketball2.png",
            "rubberwhale1.png",
            "rubberwhale2.png",
            "aloeL.jpg",
            "aloeR.jpg",
            "left.jpg",
            "right.jpg",
            "ela_original.jpg",
            "ela_modified.jpg",
            # three stereo pairs of the calibration-chessboard sequence (one scene)
            "left01.jpg",
            "right01.jpg",
            "left05.jpg",
            "right05.jpg",
            "left09.jpg",
            "right09.jpg",
            # single photos
            "apple.jpg",
            "baboon.jpg",
            "board.jpg",
            "building.jpg",
            "butterfly.jpg",
            "chicky_512.png",
            "fruits.jpg",
            "home.jpg",
            "licenseplate_motion.jpg",
            "messi5.jpg",
            "orange.jpg",
            "smarties.png",
            "squirrel_cls.jpg",
            "stuff.jpg",
            "sudoku.png",
            "pca_test1.jpg",
        )
    },
    "darknet": {
        n: f"{DEBS['darknet'][1]}/{n}"
        for n in ("dog.jpg", "eagle.jpg", "giraffe.jpg", "horses.jpg", "kite.jpg", "person.jpg")
    },
}


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

    @property
    def photo_id(self) -> str:
        """Stable id `<source>/<name>` used by the benchmark catalogue."""
        return f"{self.source}/{self.name}"


@dataclass(frozen=True)
class Manifest:
    """Every cached photo plus which package version each source came from."""

    photos: tuple[PhotoRecord, ...]
    # source -> package/version, or "unavailable"
    sources: dict[str, str] = field(default_factory=dict)

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
    path = Path(assets_dir) / MANIFEST_NAME
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


def scan_photos(assets_dir: Path, sources: dict[str, str] | None = None) -> Manifest:
    """Build the manifest from the files under `<assets>/photos/` (sorted, so deterministic)."""
    root = Path(assets_dir) / "photos"
    records = []
    for path in sorted(root.glob("*/*")) if root.is_dir() else []:
        if not path.is_file() or path.suffix.lower() not in PHOTO_SUFFIXES:
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
            )
        )
    return Manifest(tuple(records), dict(sources or {}))


def write_manifest(assets_dir: Path, manifest: Manifest) -> Path:
    """Write `<assets>/manifest.json` atomically, only if its content changed."""
    path = Path(assets_dir) / MANIFEST_NAME
    text = json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n"
    if path.is_file() and path.read_text() == text:
        return path
    return write_json(path, manifest.to_dict())


def fetch_assets(
    assets_dir: Path,
    *,
    sources: Sequence[str] = DEFAULT_SOURCES,
    skimage_dir: Path | None = None,
    pip_command: Sequence[str] | None = None,
    apt_command: Sequence[str] = ("apt-get",),
) -> Manifest:
    """Copy the curated registry photos into `assets_dir`, write its manifest; skip what is there.

    Args:
        assets_dir: cache folder (`data/assets/` by default in the pipeline).
        sources: which sources to try, any of `DEFAULT_SOURCES`.
        skimage_dir: folder holding scikit-image's sample files (default: the installed
        `skimage/data`).
        pip_command: how to call pip (default `python -m pip` of this interpreter).
        apt_command: how to call apt-get.
    """
    unknown = sorted(set(sources) - set(PHOTO_FILES))
    if unknown:
        raise ValueError(f"sources: unknown {unknown}; choose from {list(DEFAULT_SOURCES)}")
    assets_dir = Path(assets_dir)
    assets_dir.mkdir(parents=True, exist_ok=True)
    old = _read_sources(assets_dir)
    status: dict[str, str] = {}
    fetchers: dict[str, Callable[[Path, dict[str, str]], str]] = {
        "skimage": lambda dest, files: _fetch_skimage(dest, files, skimage_dir),
        "vismatch": lambda dest, files: _fetch_wheel(dest, files, WHEELS["vismatch"], pip_command),
        "patchnetvlad": lambda dest, files: _fetch_wheel(
            dest, files, WHEELS["patchnetvlad"], pip_command
        ),
        "opencv-doc": lambda dest, files: _fetch_deb(dest, files, "opencv-doc", apt_command),
        "darknet": lambda dest, files: _fetch_deb(dest, files, "darknet", apt_command),
    }
    for source in sorted(set(sources), key=list(DEFAULT_SOURCES).index):
        dest = assets_dir / "photos" / source
        files = PHOTO_FILES[source]
        if all((dest / n).is_file() for n in files):
            status[source] = (
                old.get(source) if old.get(source, "unavailable") != "unavailable" else "cached"
            )
            continue
        try:
            status[source] = fetchers[source](dest, files)
        except (
            OSError,
            RuntimeError,
            subprocess.SubprocessError,
            zipfile.BadZipFile,
            tarfile.TarError,
        ) as err:
            log.warning("assets source %s unavailable, skipped: %s", source, err)
            status[source] = "unavailable"
    manifest = scan_photos(assets_dir, {**old, **status})
    write_manifest(assets_dir, manifest)
    n_by = {s: sum(p.source == s for p in manifest.photos) for s in status}
    log.info("assets in %s: %d photos %s", assets_dir, len(manifest.photos), n_by)
    return manifest


# ------------------------------------------------------------------------- per-source fetchers


def _read_sources(assets_dir: Path) -> dict[str, str]:
    path = assets_dir / MANIFEST_NAME
    if not path.is_file():
        return {}
    try:
        return dict(read_json(path).get("sources", {}))
    except (ValueError, AttributeError):
        return {}


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


def _fetch_skimage(dest: Path, files: dict[str, str], skimage_dir: Path | None) -> str:
    if skimage_dir is None:
        import skimage

        skimage_dir = Path(skimage.__file__).parent / "data"
        version = f"scikit-image {skimage.__version__}"
    else:
        version = f"folder {Path(skimage_dir).name}"
    missing = [m for m in files.values() if not (Path(skimage_dir) / m).is_file()]
    if missing:
        raise FileNotFoundError(f"{skimage_dir}: missing {missing}")
    for name, member in sorted(files.items()):
        _install(dest, name, (Path(skimage_dir) / member).read_bytes())
    return version


def _run(cmd: Sequence[str], cwd: Path) -> subprocess.CompletedProcess:
    log.info("running %s", " ".join(cmd))
    return subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=900)


def _fetch_wheel(
    dest: Path, files: dict[str, str], requirement: str, pip_command: Sequence[str] | None
) -> str:
    pip = list(pip_command) if pip_command is not None else [sys.executable, "-m", "pip"]
    with tempfile.TemporaryDirectory(prefix=".wheels-", dir=dest.parent.parent.resolve()) as tmp:
        res = _run(
            pip + ["download", "--no-deps", "--only-binary=:all:", "-d", tmp, requirement],
            Path(tmp),
        )
        wheels = sorted(Path(tmp).glob("*.whl"))
        if res.returncode != 0 or len(wheels) != 1:
            raise RuntimeError(f"pip download {requirement} failed: {_tail(res)}")
        with zipfile.ZipFile(wheels[0]) as zf:
            names = set(zf.namelist())
            missing = [m for m in files.values() if m not in names]
            if missing:
                raise RuntimeError(f"{wheels[0].name}: missing {missing}")
            for name, member in sorted(files.items()):
                _install(dest, name, zf.read(member))
        return wheels[0].name


def _fetch_deb(dest: Path, files: dict[str, str], package: str, apt_command: Sequence[str]) -> str:
    if shutil.which(apt_command[0]) is None or shutil.which("dpkg-deb") is None:
        raise RuntimeError(f"{apt_command[0]} or dpkg-deb not found")
    with tempfile.TemporaryDirectory(prefix=".debs-", dir=dest.parent.parent) as tmp:
        res = _run(list(apt_command) + ["download", package], Path(tmp))
        if res.returncode != 0 and _lists_missing(res) and os.geteuid() == 0:
            log.info("apt lists missing; running apt-get update")
            upd = _run(list(apt_command) + ["update"], Path(tmp))
            if upd.returncode != 0:
                raise RuntimeError(f"apt-get update failed: {_tail(upd)}")
            res = _run(list(apt_command) + ["download", package], Path(tmp))
        debs = sorted(Path(tmp).glob(f"{package}_*.deb"))
        if res.returncode != 0 or len(debs) != 1:
            raise RuntimeError(f"apt-get download {package} failed: {_tail(res)}")
        wanted = {f"./{m}": n for n, m in files.items()}
        got: dict[str, bytes] = {}
        proc = subprocess.Popen(
            ["dpkg-deb", "--fsys-tarfile", str(debs[0])], stdout=subprocess.PIPE
        )
        try:
            with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
                for member in tar:
                    if member.name in wanted and member.isfile():
                        got[wanted[member.name]] = tar.extractfile(member).read()
        finally:
            proc.stdout.close()
            proc.wait()
        missing = sorted(set(files) - set(got))
        if missing:
            raise RuntimeError(f"{debs[0].name}: missing {missing}")
        for name in sorted(got):
            _install(dest, name, got[name])
        return debs[0].name.removesuffix(".deb")


def _lists_missing(res: subprocess.CompletedProcess) -> bool:
    text = (res.stderr or "") + (res.stdout or "")
    lists = Path("/var/lib/apt/lists")
    no_lists = not any(lists.glob("*_Packages*")) if lists.is_dir() else True
    return no_lists or "Unable to locate package" in text or "has no installation candidate" in text


def _tail(res: subprocess.CompletedProcess) -> str:
    text = ((res.stderr or "") + (res.stdout or "")).strip().splitlines()
    return " | ".join(text[-2:]) if text else f"exit {res.returncode}"
