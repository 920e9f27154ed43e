"""Datasets: restricted unpickling, revisitop-layout loading and validation, class-folder training
sets, and end-to-end `prepare_dataset` of every registry entry against tiny replicas served from
127.0.0.1."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from httpserver import FileServer, closed_port_url
from msvlad.data.catalog import (
    DATASETS,
    GLDV2_CLEAN_CSV,
    GLDV2_MD5,
    GLDV2_TAR,
    HOLIDAYS_IMAGES,
    OXFORD_IMAGES,
    PARIS_IMAGES,
    R1M_ARCHIVE,
    R1M_LIST,
    SFM120K_DB,
    SFM120K_IMAGES,
)
from msvlad.data.download import DownloadError, mirror_url, url_key
from msvlad.data.images import load_image
from msvlad.data.official import BUILDERS, prepare_dataset
from msvlad.data.safe_pickle import UnsafePickleError, load_pickle
from msvlad.data.testsets import load_dataset, load_distractors, read_rotations
from msvlad.data.trainsets import build_gldv2_clean, build_sfm120k, load_training_set
from replicas import pkl_bytes, random_jpeg, tar_bytes

# ----------------------------------------------------------------------------- replica builders


def _write_dataset(root: Path, name: str, cfg: dict, images: list[str] | None = None) -> Path:
    (root / name / "jpg").mkdir(parents=True)
    for i, n in enumerate(images if images is not None else [*cfg["imlist"], *cfg["qimlist"]]):
        (root / name / "jpg" / f"{n}.jpg").write_bytes(random_jpeg(i))
    (root / name / f"gnd_{name}.pkl").write_bytes(pkl_bytes(cfg))
    return root / name


def _revisited_cfg() -> dict:
    return {
        "imlist": [f"db{i}" for i in range(5)],
        "qimlist": ["q0", "q1"],
        "gnd": [
            {
                "easy": np.array([0, 1]),
                "hard": np.array([2]),
                "junk": np.array([], dtype=np.int64),
                "bbx": np.array([1.0, 2.0, 10.0, 9.0]),
            },
            {"easy": [3], "hard": [], "junk": [4], "bbx": [0, 0, 8, 8]},
        ],
    }


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ----------------------------------------------------------------------------- safe pickle


def test_safe_pickle_refuses_code_execution(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = marker  # type: ignore[attr-defined]
    p = tmp_path / "gnd_evil.pkl"
    p.write_bytes(pickle.dumps({"imlist": [], "gnd": [evil]}))
    with pytest.raises(UnsafePickleError) as err:
        load_pickle(p)
    msg = str(err.value)
    assert str(p) in msg and "system" in msg
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        b"cbuiltins\neval\n(S'1+1'\ntR.",
        b"csubprocess\nPopen\n(S'true'\ntR.",
        b"cnumpy\nload\n(S'x'\ntR.",
    ],
)
def test_safe_pickle_refuses_other_globals(tmp_path: Path, payload: bytes) -> None:
    p = tmp_path / "x.pkl"
    p.write_bytes(payload)
    with pytest.raises(UnsafePickleError, match="refused"):
        load_pickle(p)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_safe_pickle_roundtrips_plain_data_and_numpy(tmp_path: Path, protocol: int) -> None:
    obj = {
        "imlist": ["a", "b"],
        "n": 3,
        "x": 1.5,
        "t": (1, 2),
        "s": {1, 2},
        "b": b"\x00\xff",
        "arr": np.arange(6, dtype=np.int64).reshape(2, 3),
        "f": np.array([0.5, 1.5], np.float32),
        "scalar": np.float64(2.5),
        "nested": [{"easy": np.array([1, 2])}],
    }
    p = tmp_path / "ok.pkl"
    p.write_bytes(pickle.dumps(obj, protocol=protocol))
    out = load_pickle(p)
    assert out["imlist"] == ["a", "b"] and out["s"] == {1, 2} and out["b"] == b"\x00\xff"
    assert np.array_equal(out["arr"], obj["arr"]) and out["arr"].dtype == np.int64
    assert out["f"].dtype == np.float32 and out["scalar"] == 2.5
    assert np.array_equal(out["nested"][0]["easy"], [1, 2])


def test_safe_pickle_reads_numpy1_module_names(tmp_path: Path) -> None:
    data = pickle.dumps({"easy": np.array([4, 5], np.int64)}, protocol=2)
    assert b"numpy._core.multiarray" in data
    p = tmp_path / "old.pkl"
    # as numpy 1.x writes
    p.write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert load_pickle(p)["easy"].tolist() == [4, 5]


def test_safe_pickle_missing_and_garbage(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.pkl"):
        load_pickle(tmp_path / "nope.pkl")
    (tmp_path / "g.pkl").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="g.pkl"):
        load_pickle(tmp_path / "g.pkl")


# ----------------------------------------------------------------------------- load_dataset


def test_load_revisited_dataset(tmp_path: Path) -> None:
    _write_dataset(tmp_path, "myset", _revisited_cfg())
    ds = load_dataset(tmp_path, "myset")
    assert ds.protocol == "revisited" and len(ds) == 5 and ds.num_queries == 2
    assert ds.image_path(2) == tmp_path / "myset" / "jpg" / "db2.jpg"
    assert ds.query_path(1) == tmp_path / "myset" / "jpg" / "q1.jpg"
    assert ds.query_bbx(0) == (1.0, 2.0, 10.0, 9.0)
    assert ds.gnd[1]["junk"].dtype == np.int64 and ds.gnd[1]["hard"].size == 0
    assert load_image(ds.query_path(0), ds.query_bbx(0)).size == (9, 7)
    assert ds.rotations == {}


def test_load_classic_and_holidays_protocols(tmp_path: Path) -> None:
    classic = {
        "imlist": ["a", "b", "c"],
        "qimlist": ["a"],
        "gnd": [{"ok": [1], "junk": [0], "bbx": [0, 0, 5, 5]}],
    }
    _write_dataset(tmp_path, "old", classic, images=["a", "b", "c"])
    assert load_dataset(tmp_path, "old").protocol == "classic"
    hol = {
        "imlist": ["100000", "100001", "100100"],
        "qimlist": ["100000", "100100"],
        "gnd": [{"ok": [1], "query_db_index": 0}, {"ok": [], "query_db_index": 2}],
    }
    _write_dataset(tmp_path, "hol", hol, images=hol["imlist"])
    ds = load_dataset(tmp_path, "hol")
    assert ds.protocol == "holidays" and ds.query_bbx(0) is None and len(ds) == 3


@pytest.mark.parametrize(
    "mutate,match",
    [
        (
            lambda c: c["gnd"][1].update(junk=[5]),
            r"query 1 \(q1\) 'junk': index 5 out of range \[0, 5\)",
        ),
        (lambda c: c["gnd"][0].update(easy=[-1]), r"query 0 \(q0\) 'easy': index -1"),
        (
            lambda c: c["gnd"][1].update(bbx=[0, 0, 8]),
            r"query 1 \(q1\): bbx must be 4 finite numbers",
        ),
        (lambda c: c["gnd"][0].pop("bbx"), r"query 0 \(q0\): missing 'bbx'"),
        (
            lambda c: c["gnd"][0].update(easy=[0.5]),
            r"query 0 \(q0\) 'easy': indices must be integers",
        ),
        (lambda c: c["gnd"].pop(), r"1 gnd entries for 2 queries"),
        (lambda c: c.pop("qimlist"), r"missing key\(s\) \['qimlist'\]"),
        (lambda c: c["gnd"][1].pop("easy"), r"query 1: gnd keys .* match no protocol"),
    ],
)
def test_gnd_validation_errors_name_file_and_query(tmp_path: Path, mutate, match: str) -> None:
    cfg = _revisited_cfg()
    mutate(cfg)
    _write_dataset(tmp_path, "bad", cfg, images=["db0", "q0", "q1"])
    with pytest.raises(ValueError, match=match) as err:
        load_dataset(tmp_path, "bad")
    assert "gnd_bad.pkl" in str(err.value)


def test_missing_dataset_messages(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="prepare_dataset\\('roxford5k'"):
        load_dataset(tmp_path, "roxford5k")
    with pytest.raises(FileNotFoundError, match="gnd_custom.pkl"):
        load_dataset(tmp_path, "custom")
    (tmp_path / "custom").mkdir()
    with pytest.raises(FileNotFoundError, match="ground truth not found"):
        load_dataset(tmp_path, "custom")
    _write_dataset(tmp_path, "noimg", _revisited_cfg(), images=[])
    with pytest.raises(FileNotFoundError, match="none of the 7 images"):
        load_dataset(tmp_path, "noimg")


def test_malicious_gnd_refused_by_load_dataset(tmp_path: Path) -> None:
    (tmp_path / "evil" / "jpg").mkdir(parents=True)
    (tmp_path / "evil" / "gnd_evil.pkl").write_bytes(b"cos\nsystem\n(S'true'\ntR.")
    with pytest.raises(UnsafePickleError, match="os.system"):
        load_dataset(tmp_path, "evil")


def test_read_rotations_formats(tmp_path: Path) -> None:
    (tmp_path / "r.txt").write_text("# name degrees\n100001.jpg 90\n100100 -90\n100200.jpg 0\n")
    assert read_rotations(tmp_path / "r.txt") == {"100001": 90, "100100": 270}
    (tmp_path / "r.yaml").write_text("100001.jpg: 180\n")
    assert read_rotations(tmp_path / "r.yaml") == {"100001": 180}
    (tmp_path / "r.json").write_text('{"100001": 45}')
    with pytest.raises(ValueError, match="multiple of 90"):
        read_rotations(tmp_path / "r.json")


# ----------------------------------------------------------------------------- training sets


def test_load_training_set_sorted_and_errors(tmp_path: Path) -> None:
    root = tmp_path / "train"
    for cls, names in {"b": ["2.jpg", "1.jpg"], "a": ["x.png"], "c": []}.items():
        (root / cls).mkdir(parents=True)
        for n in names:
            (root / cls / n).write_bytes(b"x")
    (root / "manifest.json").write_text("{}")
    ts = load_training_set(root)
    assert ts.classes == ["a", "b"] and ts.num_classes == 2 and len(ts) == 3
    assert [p.name for p in ts.paths] == ["x.png", "1.jpg", "2.jpg"]
    assert ts.labels.dtype == np.int64 and ts.labels.tolist() == [0, 1, 1]
    with pytest.raises(FileNotFoundError, match="gldv2_clean"):
        load_training_set(tmp_path / "gldv2_clean")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        load_training_set(tmp_path / "empty")


def _gldv2_tree(tmp_path: Path) -> tuple[Path, Path]:
    csv = tmp_path / "train_clean.csv"
    rows = {f"{k}": [f"{k:03d}{j:013x}" for j in range(k % 4 + 1)] for k in range(1, 13)}
    csv.write_text(
        "landmark_id,images\n" + "".join(f"{k},{' '.join(v)}\n" for k, v in rows.items())
    )
    images = tmp_path / "images"
    for ids in rows.values():
        for i in ids:
            p = images / i[0] / i[1] / i[2] / f"{i}.jpg"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(i.encode())
    return csv, images


def test_build_gldv2_clean_subset_is_seeded_and_linked(tmp_path: Path) -> None:
    csv, images = _gldv2_tree(tmp_path)
    out = build_gldv2_clean(
        csv, images, tmp_path / "a", num_classes=4, min_images_per_class=2, seed=3
    )
    ts = load_training_set(out)
    eligible = {str(k) for k in range(1, 13) if k % 4 + 1 >= 2}
    assert ts.num_classes == 4 and set(ts.classes) <= eligible
    for p, label in zip(ts.paths, ts.labels, strict=True):
        assert p.read_bytes().decode() == p.stem and p.stem.startswith(
            f"{int(ts.classes[label]):03d}"
        )
        src = images / p.stem[0] / p.stem[1] / p.stem[2] / p.name
        assert os.path.samefile(p, src) and p.stat().st_nlink == 2  # a hard link, not a copy
    again = build_gldv2_clean(
        csv, images, tmp_path / "b", num_classes=4, min_images_per_class=2, seed=3
    )
    assert load_training_set(again).classes == ts.classes
    other = build_gldv2_clean(
        csv, images, tmp_path / "c", num_classes=4, min_images_per_class=2, seed=4
    )
    assert load_training_set(other).classes != ts.classes
    full = load_training_set(build_gldv2_clean(csv, images, tmp_path / "d", min_images_per_class=1))
    assert full.num_classes == 12 and len(full) == sum(k % 4 + 1 for k in range(1, 13))


def test_build_sfm120k_clusters(tmp_path: Path) -> None:
    cids = [f"{i:02d}abcdef{i:04x}" for i in range(7)]
    ims = tmp_path / "ims"
    for c in cids[:6]:  # the last image is missing on disk
        p = ims / c[-2:] / c[-4:-2] / c[-6:-4] / c
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(c.encode())
    db = {
        "train": {"cids": cids, "cluster": [5, 5, 12, 12, 12, 7, 7], "qidxs": [0], "pidxs": [1]},
        "val": {"cids": [], "cluster": [], "qidxs": [], "pidxs": []},
    }
    (tmp_path / "db.pkl").write_bytes(pkl_bytes(db))
    ts = load_training_set(build_sfm120k(tmp_path / "db.pkl", ims, tmp_path / "out"))
    assert ts.classes == ["05", "12"]  # cluster 7 keeps 1 image on disk < 2
    assert ts.labels.tolist() == [0, 0, 1, 1, 1]
    assert sorted(p.stem for p in ts.paths) == sorted(cids[:5])


# ----------------------------------------------------------------------------- replicas + prepare

OX_DB = ["all_souls_000001", "all_souls_000002", "bodleian_000001", "radcliffe_000003"]
OX_Q = ["all_souls_000013", "bodleian_000007"]
PA_DB = ["paris_louvre_000001", "paris_louvre_000002", "paris_triomphe_000001"]
PA_Q = ["paris_triomphe_000005"]
HOL = ["100000", "100001", "100100", "100101", "100102", "100200"]
GLD = {
    "1": ["0a1b2c3d4e5f6a7b", "0a1f00000000000a"],
    "2": ["1b2c3d4e5f6a7b8c"],
    "3": ["2c3d4e5f6a7b8c9d", "3d4e5f6a7b8c9d0e", "2c00000000000001"],
}
SFM_CIDS = ["aa0000000001", "bb0000000002", "cc0000000003", "dd0000000004"]


def _replica_files() -> dict[str, bytes]:
    """Served files keyed by mirror path ('/<host>/<path>') for every registry dataset."""
    f: dict[str, bytes] = {}

    def put(url: str, data: bytes) -> None:
        f["/" + url_key(url)] = data

    rev_ox = {
        "imlist": OX_DB,
        "qimlist": OX_Q,
        "gnd": [
            {
                "easy": np.array([0, 1]),
                "hard": np.array([3]),
                "junk": np.array([2]),
                "bbx": np.array([1.0, 1, 12, 10]),
            },
            {
                "easy": np.array([2]),
                "hard": np.array([], np.int64),
                "junk": np.array([], np.int64),
                "bbx": np.array([0.0, 0, 8, 8]),
            },
        ],
    }
    put(
        "http://cmp.felk.cvut.cz/revisitop/data/datasets/roxford5k/gnd_roxford5k.pkl",
        pkl_bytes(rev_ox, 2),
    )
    put(
        "http://cmp.felk.cvut.cz/cnnimageretrieval/data/test/oxford5k/gnd_oxford5k.pkl",
        pkl_bytes(
            {
                "imlist": OX_DB + OX_Q,
                "qimlist": OX_Q,
                "gnd": [
                    {"ok": [0, 1], "junk": [4], "bbx": [1, 1, 12, 10]},
                    {"ok": [2], "junk": [5], "bbx": [0, 0, 8, 8]},
                ],
            }
        ),
    )
    put(
        OXFORD_IMAGES[0],
        tar_bytes({f"{n}.jpg": random_jpeg(i) for i, n in enumerate(OX_DB + OX_Q)}),
    )

    rev_pa = {
        "imlist": PA_DB,
        "qimlist": PA_Q,
        "gnd": [{"easy": [2], "hard": [], "junk": [0], "bbx": [2, 2, 10, 10]}],
    }
    put(
        "http://cmp.felk.cvut.cz/revisitop/data/datasets/rparis6k/gnd_rparis6k.pkl",
        pkl_bytes(rev_pa),
    )
    put(
        "http://cmp.felk.cvut.cz/cnnimageretrieval/data/test/paris6k/gnd_paris6k.pkl",
        pkl_bytes(
            {
                "imlist": PA_DB + PA_Q,
                "qimlist": PA_Q,
                "gnd": [{"ok": [2], "junk": [3], "bbx": [2, 2, 10, 10]}],
            }
        ),
    )
    html = b"<html><head><title>302 Found</title></head></html>"
    put(
        PARIS_IMAGES[0],
        tar_bytes(
            {
                "paris/louvre/paris_louvre_000001.jpg": random_jpeg(10),
                "paris/louvre/paris_louvre_000002.jpg": random_jpeg(11),
                "paris/louvre/paris_louvre_000136.jpg": html,
                "paris/general/paris_general_000099.jpg": html,
            }
        ),
    )
    put(
        PARIS_IMAGES[1],
        tar_bytes(
            {
                "paris/triomphe/paris_triomphe_000001.jpg": random_jpeg(12),
                "paris/triomphe/paris_triomphe_000005.jpg": random_jpeg(13),
            }
        ),
    )

    put(
        HOLIDAYS_IMAGES[0],
        tar_bytes({f"jpg/{n}.jpg": random_jpeg(20 + i) for i, n in enumerate(HOL[:3])}),
    )
    put(
        HOLIDAYS_IMAGES[1],
        tar_bytes({f"jpg/{n}.jpg": random_jpeg(30 + i) for i, n in enumerate(HOL[3:])}),
    )

    r1m = [f"{a}/{b}/{a}{b}{k}.jpg" for a in "01" for b in "ab" for k in range(2)]
    put(R1M_LIST, "".join(n + "\n" for n in r1m).encode())
    put(R1M_ARCHIVE.format(i=1), tar_bytes({n: random_jpeg(40 + i) for i, n in enumerate(r1m[:4])}))
    put(R1M_ARCHIVE.format(i=2), tar_bytes({n: random_jpeg(50 + i) for i, n in enumerate(r1m[4:])}))

    put(
        GLDV2_CLEAN_CSV,
        ("landmark_id,images\n" + "".join(f"{k},{' '.join(v)}\n" for k, v in GLD.items())).encode(),
    )
    ids = sorted(i for v in GLD.values() for i in v)
    for t, chunk in enumerate((ids[:3], ids[3:])):
        tar = tar_bytes(
            {f"{i[0]}/{i[1]}/{i[2]}/{i}.jpg": random_jpeg(60 + int(i[:4], 16) % 50) for i in chunk},
            gz=False,
        )
        put(GLDV2_TAR.format(i=t), tar)
        put(GLDV2_MD5.format(i=t), f"{hashlib.md5(tar).hexdigest()}  images_{t:03d}.tar\n".encode())

    put(
        SFM120K_IMAGES,
        tar_bytes(
            {
                f"ims/{c[-2:]}/{c[-4:-2]}/{c[-6:-4]}/{c}": random_jpeg(70 + k)
                for k, c in enumerate(SFM_CIDS)
            }
        ),
    )
    put(
        SFM120K_DB,
        pkl_bytes(
            {
                "train": {"cids": SFM_CIDS[:3], "cluster": [0, 0, 1], "qidxs": [0], "pidxs": [1]},
                "val": {"cids": SFM_CIDS[3:], "cluster": [2], "qidxs": [], "pidxs": []},
            }
        ),
    )
    return f


@pytest.fixture(scope="module")
def mirror():
    with FileServer(_replica_files()) as server:
        yield server


def test_mirror_url_layout() -> None:
    url = OXFORD_IMAGES[0]
    assert url_key(url) == "www.robots.ox.ac.uk/~vgg/data/oxbuildings/oxbuild_images-v1.tgz"
    assert mirror_url(url, None) == url
    assert mirror_url(url, "file:///m/") == "file:///m/" + url_key(url)


def test_prepare_revisited_oxford(mirror: FileServer, tmp_path: Path) -> None:
    path = prepare_dataset("roxford5k", tmp_path, mirror=mirror.base_url)
    assert path == tmp_path / "roxford5k"
    ds = load_dataset(tmp_path, "roxford5k")
    assert ds.protocol == "revisited" and ds.imlist == OX_DB and ds.qimlist == OX_Q
    assert ds.query_bbx(0) == (1.0, 1.0, 12.0, 10.0)
    assert np.array_equal(
        np.asarray(load_image(ds.image_path(0))), np.asarray(Image.open(io.BytesIO(random_jpeg(0))))
    )
    checks = json.loads((tmp_path / "checksums.json").read_text())
    assert (
        checks[url_key(OXFORD_IMAGES[0])]
        == hashlib.sha256(mirror.files["/" + url_key(OXFORD_IMAGES[0])]).hexdigest()
    )
    assert (tmp_path / "downloads" / url_key(OXFORD_IMAGES[0])).is_file()
    n = len(mirror.requests)
    prepare_dataset("roxford5k", tmp_path, mirror=mirror.base_url)  # already prepared: no traffic
    assert len(mirror.requests) == n


def test_prepare_paris_skips_corrupt_images(mirror: FileServer, tmp_path: Path, caplog) -> None:
    with caplog.at_level("WARNING", logger="msvlad.data.datasets"):
        prepare_dataset("rparis6k", tmp_path, mirror=mirror.base_url)
    assert "paris_louvre_000136.jpg" in caplog.text and "skipped 2 corrupt" in caplog.text
    jpgs = sorted(p.stem for p in (tmp_path / "rparis6k" / "jpg").iterdir())
    assert jpgs == sorted(PA_DB + PA_Q)  # flattened from the per-landmark folders
    ds = load_dataset(tmp_path, "rparis6k")
    assert ds.protocol == "revisited" and ds.imlist == PA_DB and ds.num_queries == 1
    assert (tmp_path / "rparis6k" / "skipped.txt").read_text().split() == [
        "paris_general_000099.jpg",
        "paris_louvre_000136.jpg",
    ]


def test_prepare_classic_oxford_and_paris(mirror: FileServer, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MSVLAD_MIRROR", mirror.base_url)  # the env var replaces the official hosts
    prepare_dataset("oxford5k", tmp_path)
    prepare_dataset("paris6k", tmp_path)
    ox, pa = load_dataset(tmp_path, "oxford5k"), load_dataset(tmp_path, "paris6k")
    assert ox.protocol == pa.protocol == "classic"
    assert ox.qimlist[0] in ox.imlist and len(ox) == 6 and len(pa) == 4


def test_prepare_holidays_and_rotated(mirror: FileServer, tmp_path: Path) -> None:
    prepare_dataset("holidays", tmp_path, mirror=mirror.base_url)
    ds = load_dataset(tmp_path, "holidays")
    assert ds.protocol == "holidays" and ds.imlist == HOL
    assert ds.qimlist == ["100000", "100100", "100200"]  # xxxx00 are the queries, and in the db
    assert ds.gnd[1]["ok"].tolist() == [3, 4] and ds.gnd[1]["query_db_index"] == 2
    assert ds.name == "holidays" and ds.rotations == {}
    with pytest.raises(ValueError, match="rotation list"):
        prepare_dataset("holidays_rotated", tmp_path, mirror=mirror.base_url)
    rot = tmp_path / "holidays-rotate.txt"
    rot.write_text("100101.jpg 90\n100200.jpg 270\n")
    n = len(mirror.requests)
    prepare_dataset("holidays_rotated", tmp_path, mirror=mirror.base_url, rotations=str(rot))
    assert len(mirror.requests) == n  # images reused from the prepared holidays folder
    r = load_dataset(tmp_path, "holidays_rotated")
    assert r.name == "holidays_rotated" and r.rotations == {"100101": 90, "100200": 270}
    assert r.imlist == ds.imlist and os.path.samefile(r.image_path(0), ds.image_path(0))
    bad = tmp_path / "bad.txt"
    bad.write_text("999999.jpg 90\n")
    with pytest.raises(ValueError, match="999999"):
        prepare_dataset("holidays_rotated", tmp_path, mirror=mirror.base_url, rotations=str(bad))


def test_prepare_revisitop1m(mirror: FileServer, tmp_path: Path) -> None:
    prepare_dataset("revisitop1m", tmp_path, mirror=mirror.base_url, num_archives=1)
    assert len(load_distractors(tmp_path)) == 4
    prepare_dataset(
        "revisitop1m", tmp_path, mirror=mirror.base_url, num_archives=2, keep_archives=False
    )
    paths = load_distractors(tmp_path)
    assert len(paths) == 8 and all(load_image(p).size == (16, 12) for p in paths)
    assert not (tmp_path / "downloads" / url_key(R1M_ARCHIVE.format(i=2))).exists()


def test_prepare_gldv2_clean(mirror: FileServer, tmp_path: Path) -> None:
    prepare_dataset(
        "gldv2_clean", tmp_path, mirror=mirror.base_url, tars=2, min_images_per_class=2, seed=0
    )
    ts = load_training_set(tmp_path / "gldv2_clean")
    assert ts.classes == ["1", "3"] and len(ts) == 5
    assert sorted(p.stem for p in ts.paths) == sorted(GLD["1"] + GLD["3"])
    assert all(load_image(p).mode == "RGB" for p in ts.paths)
    # a different subset re-lays the folder from the extracted tars without downloading again
    n = len(mirror.requests)
    prepare_dataset(
        "gldv2_clean",
        tmp_path,
        mirror=mirror.base_url,
        tars=2,
        num_classes=1,
        min_images_per_class=1,
        seed=0,
    )
    assert len(mirror.requests) == n
    assert load_training_set(tmp_path / "gldv2_clean").num_classes == 1


def test_prepare_gldv2_md5_mismatch(mirror: FileServer, tmp_path: Path) -> None:
    key = "/" + url_key(GLDV2_MD5.format(i=0))
    good = mirror.files[key]
    mirror.files[key] = b"0" * 32 + b"  images_000.tar\n"
    try:
        with pytest.raises(ValueError, match="md5 expected 0000"):
            prepare_dataset("gldv2_clean", tmp_path, mirror=mirror.base_url, tars=1)
    finally:
        mirror.files[key] = good
    assert not (tmp_path / "downloads" / url_key(GLDV2_TAR.format(i=0))).exists()


def test_prepare_sfm120k(mirror: FileServer, tmp_path: Path) -> None:
    prepare_dataset("sfm120k", tmp_path, mirror=mirror.base_url)
    ts = load_training_set(tmp_path / "sfm120k")
    assert ts.classes == ["0"] and sorted(p.stem for p in ts.paths) == SFM_CIDS[:2]


def test_prepare_offline_names_the_file_to_place(tmp_path: Path) -> None:
    base = closed_port_url("").rstrip("/")
    with pytest.raises(DownloadError) as err:
        prepare_dataset("roxford5k", tmp_path, mirror=base, timeout=5)
    msg = str(err.value)
    assert "\n" not in msg and "gnd_roxford5k.pkl" in msg
    assert str(tmp_path / "downloads" / "cmp.felk.cvut.cz/revisitop/data/datasets/roxford5k") in msg
    assert not (tmp_path / "roxford5k").exists()


def test_prepare_uses_hand_placed_files_offline(mirror: FileServer, tmp_path: Path) -> None:
    # copy the served files where the offline message says, then prepare with no server at all
    for path, data in mirror.files.items():
        if "oxbuild" in path or "roxford5k" in path:
            dest = tmp_path / "downloads" / path.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
    prepare_dataset("roxford5k", tmp_path, mirror=closed_port_url("").rstrip("/"))
    assert load_dataset(tmp_path, "roxford5k").num_queries == 2


def test_registry_covers_every_dataset() -> None:
    assert set(DATASETS) == {
        "roxford5k",
        "rparis6k",
        "oxford5k",
        "paris6k",
        "holidays",
        "holidays_rotated",
        "revisitop1m",
        "gldv2_clean",
        "sfm120k",
    }
    # the catalog states what each dataset is, the builders how it is laid out: one each
    assert list(BUILDERS) == list(DATASETS)
    for spec in DATASETS.values():
        assert spec.urls and all(u.startswith(("http://", "https://", "ftp://")) for u in spec.urls)
        assert (spec.protocol is None) == (spec.kind != "test")
    with pytest.raises(ValueError, match="registry names"):
        prepare_dataset("imagenet", Path("/nonexistent"))


def test_prepare_from_file_mirror(mirror: FileServer, tmp_path: Path) -> None:
    # a mirror may be a plain folder in the <host>/<path> layout (what `wget -x` writes)
    folder = tmp_path / "mirror"
    for path, data in mirror.files.items():
        if "inrialpes" in path:
            (folder / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
            (folder / path.lstrip("/")).write_bytes(data)
    prepare_dataset("holidays", tmp_path / "data", mirror=folder.as_uri())
    assert load_dataset(tmp_path / "data", "holidays").imlist == HOL
