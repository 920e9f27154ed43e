"""The official datasets: download, verify, extract and lay out each one (`prepare_dataset`).

What each dataset is and where it comes from is `msvlad.data.catalog.DATASETS`; here is how each
is built (`BUILDERS`), into the layouts the catalog describes. Downloads go through
`msvlad.data.download.Fetcher` (mirrors, ``ROOT/downloads/<host>/<path>``). Every downloaded
file's sha256 is recorded in ``ROOT/checksums.json`` on first use and checked on every later use;
GLDv2 tars are also checked against Google's md5 files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path, PurePath, PurePosixPath
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from msvlad.data.catalog import (
    CIRTORCH_GND,
    DATASETS,
    GLDV2_CLEAN_CSV,
    GLDV2_MD5,
    GLDV2_NUM_TARS,
    GLDV2_TAR,
    GND_PICKLE_PROTOCOL,
    HOLIDAYS_IMAGES,
    JPG,
    OXFORD_IMAGES,
    PARIS_IMAGES,
    R1M_ARCHIVE,
    R1M_LIST,
    R1M_NUM_ARCHIVES,
    REVISITOP_GND,
    ROTATIONS,
    SFM120K_DB,
    SFM120K_IMAGES,
    DatasetSpec,
    Protocol,
    gnd_name,
)
from msvlad.data.download import Fetcher, extract_archive, resolve_mirror
from msvlad.data.safe_pickle import load_pickle
from msvlad.data.testsets import _stem, load_dataset, read_rotations, validate_gnd
from msvlad.data.trainsets import (
    _link,
    build_gldv2_clean,
    build_sfm120k,
    load_training_set,
    read_manifest,
    write_manifest,
)
from msvlad.errors import InputError
from msvlad.storage import atomic_dir

log = logging.getLogger(__name__)


# Images of the original Paris6k archives that hold an HTML error page instead of a JPEG
# (https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/corrupt.txt).
PARIS_CORRUPT: frozenset[str] = frozenset(
    f"paris_{n}"
    for n in (
        "louvre_000136",
        "louvre_000146",
        "moulinrouge_000422",
        "museedorsay_001059",
        "notredame_000188",
        "pantheon_000284",
        "pantheon_000960",
        "pantheon_000974",
        "pompidou_000195",
        "pompidou_000196",
        "pompidou_000201",
        "pompidou_000467",
        "pompidou_000640",
        "sacrecoeur_000299",
        "sacrecoeur_000330",
        "sacrecoeur_000353",
        "triomphe_000662",
        "triomphe_000833",
        "triomphe_000863",
        "triomphe_000867",
    )
)


def _is_jpeg(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(3) == b"\xff\xd8\xff"


def _flatten_images(src: Path, jpg: Path, known_corrupt: frozenset[str]) -> list[str]:
    """Move every image under `src` into `jpg/` (flat); skip known-corrupt or non-JPEG files."""
    skipped: list[str] = []
    for f in sorted(
        p for p in src.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg") and p.is_file()
    ):
        if _stem(f.name) in known_corrupt or not _is_jpeg(f):
            skipped.append(f.name)
            continue
        target = jpg / f.name
        if target.exists():
            raise InputError(f"{f}: two archive members share the name {f.name}")
        os.replace(f, target)
    return skipped


def _build_revisitop(
    data_root: Path,
    name: str,
    fetcher: Fetcher,
    gnd_url: str,
    image_urls: Sequence[str],
    protocol: Protocol,
    known_corrupt: frozenset[str] = frozenset(),
) -> Path:
    gnd_path = fetcher.fetch(gnd_url)
    imlist, qimlist, _, _ = validate_gnd(load_pickle(gnd_path), str(gnd_path), protocol)
    archives = [fetcher.fetch(u) for u in image_urls]
    out = data_root / name
    with atomic_dir(out) as tmp:
        jpg = tmp / JPG
        jpg.mkdir()
        skipped: list[str] = []
        for i, archive in enumerate(archives):
            extracted = extract_archive(archive, tmp / f"_extract{i}")
            skipped += _flatten_images(extracted, jpg, known_corrupt)
            shutil.rmtree(extracted)
        shutil.copyfile(gnd_path, tmp / gnd_name(name))
        if skipped:
            log.warning(
                "%s: skipped %d corrupt image(s) (not JPEG data): %s%s",
                name,
                len(skipped),
                ", ".join(skipped[:5]),
                " ..." if len(skipped) > 5 else "",
            )
            (tmp / "skipped.txt").write_text("".join(f"{s}\n" for s in skipped))
        names = dict.fromkeys([*imlist, *qimlist])
        absent = [n for n in names if not (jpg / f"{n}.jpg").is_file()]
        skipped_stems = {_stem(s) for s in skipped}
        lost = [n for n in absent if n not in skipped_stems]
        if lost:
            raise InputError(
                f"{gnd_path}: {len(lost)} listed image(s) are in none of the archives "
                f"{[a.name for a in archives]}, e.g. {lost[0]}"
            )
        if absent:
            log.warning(
                "%s: %d image(s) listed in the gnd were corrupt and skipped, e.g. %s",
                name,
                len(absent),
                absent[0],
            )
        write_manifest(
            tmp,
            {
                "name": name,
                "protocol": protocol,
                "images": sum(1 for _ in jpg.iterdir()),
                "db": len(imlist),
                "queries": len(qimlist),
                "skipped": skipped,
                "sources": [gnd_url, *image_urls],
            },
        )
    log.info("%s: %d db images, %d queries -> %s", name, len(imlist), len(qimlist), out)
    return out


def _prepare_roxford5k(data_root: Path, fetcher: Fetcher, **options: Any) -> Path:
    _no_options("roxford5k", options)
    return _build_revisitop(
        data_root,
        "roxford5k",
        fetcher,
        REVISITOP_GND.format(ds="roxford5k"),
        OXFORD_IMAGES,
        "revisited",
    )


def _prepare_rparis6k(data_root: Path, fetcher: Fetcher, **options: Any) -> Path:
    _no_options("rparis6k", options)
    return _build_revisitop(
        data_root,
        "rparis6k",
        fetcher,
        REVISITOP_GND.format(ds="rparis6k"),
        PARIS_IMAGES,
        "revisited",
        PARIS_CORRUPT,
    )


def _prepare_oxford5k(data_root: Path, fetcher: Fetcher, **options: Any) -> Path:
    _no_options("oxford5k", options)
    return _build_revisitop(
        data_root, "oxford5k", fetcher, CIRTORCH_GND.format(ds="oxford5k"), OXFORD_IMAGES, "classic"
    )


def _prepare_paris6k(data_root: Path, fetcher: Fetcher, **options: Any) -> Path:
    _no_options("paris6k", options)
    return _build_revisitop(
        data_root,
        "paris6k",
        fetcher,
        CIRTORCH_GND.format(ds="paris6k"),
        PARIS_IMAGES,
        "classic",
        PARIS_CORRUPT,
    )


def holidays_gnd(imlist: Sequence[str]) -> tuple[list[str], list[dict]]:
    """Holidays queries and gnd from file names: 6 digits, group = first 4, query = xxxx00."""
    groups: dict[str, list[int]] = {}
    queries: dict[str, int] = {}
    for idx, name in enumerate(imlist):
        stem = PurePath(str(name)).stem
        if len(stem) != 6 or not stem.isdigit():
            raise InputError(f"imlist[{idx}]: {name!r} is not a 6-digit Holidays image name")
        group = stem[:4]
        if stem[4:] == "00":
            if group in queries:
                raise InputError(f"imlist[{idx}]: {name!r} repeats the query of group {group}")
            queries[group] = idx
        groups.setdefault(group, []).append(idx)
    no_query = sorted(set(groups) - set(queries))
    if no_query:
        raise InputError(f"imlist: group(s) {no_query[:5]} have no query image (xxxx00)")
    qimlist: list[str] = []
    gnd: list[dict] = []
    for group, q_idx in sorted(queries.items(), key=lambda item: item[1]):
        ok = np.asarray([j for j in groups[group] if j != q_idx], dtype=np.int64)
        qimlist.append(str(imlist[q_idx]))
        gnd.append({"ok": ok, "query_db_index": int(q_idx)})
    return qimlist, gnd


def holidays_ground_truth(imlist: Sequence[str]) -> dict[str, Any]:
    """Holidays gnd dict from file names (6 digits; first 4 = group; xxxx00 = the group's query)."""
    qimlist, gnd = holidays_gnd(imlist)
    return {
        "imlist": list(imlist),
        "qimlist": qimlist,
        "gnd": [
            {"ok": [int(j) for j in g["ok"]], "query_db_index": int(g["query_db_index"])}
            for g in gnd
        ],
    }


def _write_gnd(path: Path, cfg: Mapping[str, Any]) -> None:
    import pickle

    with open(path, "wb") as f:
        pickle.dump(dict(cfg), f, protocol=GND_PICKLE_PROTOCOL)


def _prepare_holidays(data_root: Path, fetcher: Fetcher, **options: Any) -> Path:
    _no_options("holidays", options)
    archives = [fetcher.fetch(u) for u in HOLIDAYS_IMAGES]
    out = data_root / "holidays"
    with atomic_dir(out) as tmp:
        jpg = tmp / JPG
        jpg.mkdir()
        skipped: list[str] = []
        for i, archive in enumerate(archives):
            extracted = extract_archive(archive, tmp / f"_extract{i}")
            skipped += _flatten_images(extracted, jpg, frozenset())
            shutil.rmtree(extracted)
        if skipped:
            log.warning(
                "holidays: skipped %d corrupt image(s): %s", len(skipped), ", ".join(skipped[:5])
            )
        imlist = sorted(_stem(p.name) for p in jpg.iterdir())
        try:
            cfg = holidays_ground_truth(imlist)
        except InputError as err:  # the names come from the archives: say which
            raise InputError(f"{' + '.join(map(str, archives))}: {err}") from None
        _write_gnd(tmp / gnd_name("holidays"), cfg)
        write_manifest(
            tmp,
            {
                "name": "holidays",
                "protocol": "holidays",
                "db": len(imlist),
                "queries": len(cfg["qimlist"]),
                "skipped": skipped,
                "sources": list(HOLIDAYS_IMAGES),
            },
        )
    log.info("holidays: %d images, %d queries -> %s", len(imlist), len(cfg["qimlist"]), out)
    return out


def _prepare_holidays_rotated(
    data_root: Path, fetcher: Fetcher, *, rotations: str | os.PathLike | None = None, **options: Any
) -> Path:
    _no_options("holidays_rotated", options)
    if rotations is None:
        raise InputError(
            "holidays_rotated needs a rotation list (image name -> clockwise degrees): pass "
            "rotations=FILE (params.yaml prepare.holidays_rotations)"
        )
    table = read_rotations(rotations)
    try:
        src = load_dataset(data_root, "holidays")
    except FileNotFoundError:
        prepare_dataset("holidays", data_root, mirror=fetcher.mirror, timeout=fetcher.timeout)
        src = load_dataset(data_root, "holidays")
    unknown = sorted(set(table) - set(src.imlist))
    if unknown:
        raise InputError(
            f"{rotations}: {len(unknown)} name(s) are not Holidays images, e.g. {unknown[0]!r}"
        )
    out = data_root / "holidays_rotated"
    with atomic_dir(out) as tmp:
        (tmp / JPG).mkdir()
        for n in src.imlist:
            _link(src._path(n), tmp / JPG / src._path(n).name)
        _write_gnd(tmp / gnd_name("holidays_rotated"), holidays_ground_truth(src.imlist))
        (tmp / ROTATIONS).write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
        write_manifest(
            tmp,
            {
                "name": "holidays_rotated",
                "protocol": "holidays",
                "db": len(src.imlist),
                "queries": src.num_queries,
                "rotated_images": len(table),
                "rotations_file": str(rotations),
            },
        )
    log.info("holidays_rotated: %d of %d images rotated -> %s", len(table), len(src.imlist), out)
    return out


def _merge_tree(src: Path, dst: Path) -> int:
    """Move every file under `src` to the same relative place under `dst`; returns the count."""
    n = 0
    for f in src.rglob("*"):
        if f.is_file() or f.is_symlink():
            target = dst / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(f, target)
            n += 1
    return n


def _extract_into(archive: Path, target: Path, done_file: Path) -> None:
    """Extract `archive` into `target` once (listed in `done_file`, so a rerun resumes).

    Nothing is written for an archive `extract_archive` refuses: not even `target`.
    """
    if archive.name in _done(done_file):
        return
    tmp = target.parent / f".{archive.name}.extract"
    shutil.rmtree(tmp, ignore_errors=True)  # left over from an interrupted run
    try:
        extract_archive(archive, tmp)
        target.mkdir(parents=True, exist_ok=True)
        _merge_tree(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    with open(done_file, "a") as f:
        f.write(archive.name + "\n")


def _prepare_revisitop1m(
    data_root: Path,
    fetcher: Fetcher,
    *,
    num_archives: int = R1M_NUM_ARCHIVES,
    keep_archives: bool = True,
    **options: Any,
) -> Path:
    _no_options("revisitop1m", options)
    if not 1 <= num_archives <= R1M_NUM_ARCHIVES:
        raise InputError(f"num_archives must be in [1, {R1M_NUM_ARCHIVES}], got {num_archives}")
    out = data_root / "revisitop1m"
    listing = fetcher.fetch(R1M_LIST)
    for i in tqdm(range(1, num_archives + 1), desc="revisitop1m archives", leave=False):
        url = R1M_ARCHIVE.format(i=i)
        if PurePosixPath(url).name in _done(out / ".extracted"):
            continue
        archive = fetcher.fetch(url)
        _extract_into(archive, out / JPG, out / ".extracted")
        if not keep_archives:
            archive.unlink()
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(listing, out / "revisitop1m.txt")
    write_manifest(
        out, {"name": "revisitop1m", "archives": num_archives, "sources": [R1M_LIST, R1M_ARCHIVE]}
    )
    return out


def _done(done_file: Path) -> set[str]:
    """Archive names listed in `done_file` (a damaged line only makes its archive extract again)."""
    if not done_file.is_file():
        return set()
    return set(done_file.read_text(encoding="utf-8", errors="replace").split())


def _parse_md5_file(path: Path, filename: str) -> str:
    """The md5 of `filename` from an md5sum-style file (``<md5>  <name>`` lines)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text (byte {err.start}); expected md5 lines") from None
    lines = [ln.split() for ln in text.splitlines() if ln.strip()]
    for parts in lines:
        if len(parts) >= 2 and PurePosixPath(parts[-1].lstrip("*")).name == filename:
            return parts[0].lower()
    if len(lines) == 1 and re.fullmatch(r"[0-9a-fA-F]{32}", lines[0][0]):
        return lines[0][0].lower()
    raise InputError(f"{path}: no md5 for {filename}")


def _tar_indices(tars: int | Sequence[int] | None) -> list[int]:
    if tars is None:
        return list(range(GLDV2_NUM_TARS))
    idx = list(range(tars)) if isinstance(tars, int) else [int(t) for t in tars]
    bad = [t for t in idx if not 0 <= t < GLDV2_NUM_TARS]
    if bad or not idx:
        raise InputError(f"tars must select indices in [0, {GLDV2_NUM_TARS}), got {tars!r}")
    return idx


def _prepare_gldv2_clean(
    data_root: Path,
    fetcher: Fetcher,
    *,
    num_classes: int | None = None,
    min_images_per_class: int = 2,
    seed: int = 0,
    tars: int | Sequence[int] | None = None,
    keep_archives: bool = True,
    **options: Any,
) -> Path:
    _no_options("gldv2_clean", options)
    csv_path = fetcher.fetch(GLDV2_CLEAN_CSV)
    raw = data_root / "raw" / "gldv2_train"
    for i in tqdm(_tar_indices(tars), desc="gldv2 tars", leave=False):
        tar_url = GLDV2_TAR.format(i=i)
        if PurePosixPath(tar_url).name in _done(raw / ".extracted"):
            continue
        md5 = _parse_md5_file(fetcher.fetch(GLDV2_MD5.format(i=i)), PurePosixPath(tar_url).name)
        archive = fetcher.fetch(tar_url, md5=md5)
        _extract_into(archive, raw / "images", raw / ".extracted")
        if not keep_archives:
            archive.unlink()
    return build_gldv2_clean(
        csv_path,
        raw / "images",
        data_root / "gldv2_clean",
        num_classes=num_classes,
        min_images_per_class=min_images_per_class,
        seed=seed,
    )


def _prepare_sfm120k(
    data_root: Path,
    fetcher: Fetcher,
    *,
    split: Literal["train", "val"] = "train",
    min_images_per_class: int = 2,
    keep_archives: bool = True,
    **options: Any,
) -> Path:
    _no_options("sfm120k", options)
    db = fetcher.fetch(SFM120K_DB)
    raw = data_root / "raw" / "sfm120k"
    if "ims.tar.gz" not in _done(raw / ".extracted"):
        archive = fetcher.fetch(SFM120K_IMAGES)
        _extract_into(archive, raw / "extracted", raw / ".extracted")
        if not keep_archives:
            archive.unlink()
    ims = raw / "extracted"
    if (ims / "ims").is_dir():  # the archive may or may not hold a top-level ims/ folder
        ims = ims / "ims"
    return build_sfm120k(
        db, ims, data_root / "sfm120k", split=split, min_images_per_class=min_images_per_class
    )


def _no_options(name: str, options: Mapping[str, Any]) -> None:
    if options:
        raise TypeError(f"prepare_dataset({name!r}): unexpected option(s) {sorted(options)}")


BUILDERS: dict[str, Callable[..., Path]] = {
    "roxford5k": _prepare_roxford5k,
    "rparis6k": _prepare_rparis6k,
    "oxford5k": _prepare_oxford5k,
    "paris6k": _prepare_paris6k,
    "holidays": _prepare_holidays,
    "holidays_rotated": _prepare_holidays_rotated,
    "revisitop1m": _prepare_revisitop1m,
    "gldv2_clean": _prepare_gldv2_clean,
    "sfm120k": _prepare_sfm120k,
}
"""How each dataset of `msvlad.data.catalog.DATASETS` is built: (data_root, fetcher, **options)."""


def _loads(spec: DatasetSpec, data_root: Path) -> bool:
    """Whether DATA_ROOT/NAME already loads as a dataset of its kind."""
    try:
        if spec.kind == "test":
            load_dataset(data_root, spec.name)
        else:
            load_training_set(data_root / spec.name)
    except (OSError, ValueError):
        return False
    return True


def _options_key(options: Mapping[str, Any]) -> dict[str, Any]:
    """Options as recorded in the manifest; a rotation list is recorded by its content hash."""
    out = {}
    for k, v in sorted(options.items()):
        if k == "keep_archives":
            continue
        if k == "rotations" and v is not None:
            v = hashlib.sha256(Path(v).read_bytes()).hexdigest()
        out[k] = list(v) if isinstance(v, tuple) else v
    return json.loads(json.dumps(out, default=str))


def prepare_dataset(
    name: str,
    data_root: str | os.PathLike,
    *,
    mirror: str | None = None,
    timeout: float = 30.0,
    force: bool = False,
    **options: Any,
) -> Path:
    """Download, verify, extract and lay out a registry dataset as DATA_ROOT/NAME; returns it.

    Skips the work when DATA_ROOT/NAME was prepared with the same options (unless `force`).
    Options: gldv2_clean (num_classes, min_images_per_class, seed, tars, keep_archives), sfm120k
    (split, min_images_per_class, keep_archives), holidays_rotated (rotations), revisitop1m
    (num_archives, keep_archives).
    """
    if name not in DATASETS:
        raise InputError(f"unknown dataset {name!r}; registry names: {', '.join(sorted(DATASETS))}")
    data_root = Path(data_root)
    data_root.mkdir(parents=True, exist_ok=True)
    out = data_root / name
    key = _options_key(options)
    spec = DATASETS[name]
    manifest = read_manifest(out)
    if not force and spec.kind != "distractors":  # distractors resume archive by archive instead
        if manifest is not None and manifest.get("prepare_options") == key:
            log.info("%s: already prepared in %s", name, out)
            return out
        if manifest is None and out.is_dir() and _loads(spec, data_root):
            log.info(
                "%s: using the dataset already laid out in %s (not built by prepare)", name, out
            )
            return out
    fetcher = Fetcher(data_root, resolve_mirror(mirror), timeout)
    path = BUILDERS[name](data_root, fetcher, **options)
    info = read_manifest(path) or {}
    info["prepare_options"] = key
    write_manifest(path, info)
    return path
