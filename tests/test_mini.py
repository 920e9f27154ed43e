"""Mini benchmark on a few generated photos: layout, gnd validity, disjointness, determinism."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from msvlad.mini.assets import scan_photos, write_manifest
from msvlad.mini.builder import CURATED, Catalogue, Group, build_mini_benchmark


class _PlainUnpickler(pickle.Unpickler):
    """Only builtin containers and scalars: what downstream readers accept."""

    def find_class(self, module: str, name: str):  # noqa: ANN201
        raise pickle.UnpicklingError(f"{module}.{name}")


def _load_gnd(path: Path) -> dict:
    with open(path, "rb") as f:
        return _PlainUnpickler(f).load()


def _photo(seed: int, w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    f = rng.uniform(0.02, 0.2, 3)
    arr = np.stack(
        [127 + 120 * np.sin(f[i] * x + (i + 1) * f[(i + 1) % 3] * y) for i in range(3)], -1
    )
    return Image.fromarray(arr.astype(np.uint8))


NAMES = ["a1", "a2", "b1", "c1", "c2", "d1", "e1", "f1", "f2", "g1", "h1"]


@pytest.fixture
def assets(tmp_path: Path) -> Path:
    root = tmp_path / "assets"
    for i, n in enumerate(NAMES):
        path = root / "photos" / "gen" / f"{n}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        _photo(i, 120 + 8 * i, 90).save(path)
    write_manifest(root, scan_photos(root, {"gen": "generated"}))
    return root


def _g(name: str, *photos: str, levels: tuple[str, ...] = ()) -> Group:
    return Group(name, tuple(f"gen/{p}.png" for p in photos), levels)


CAT = Catalogue(
    test=(_g("sa", "a1", "a2", levels=("hard",)), _g("sb", "b1")),
    val=(_g("sc", "c1", "c2"),),
    train=(_g("td", "d1"), _g("te", "e1"), _g("tf", "f1", "f2")),
    distractors=(_g("xg", "g1"), _g("xh", "h1")),
)
KW = dict(
    catalogue=CAT,
    image_max_side=64,
    source_max_side=128,
    views_per_scene=(2, 2, 1),
    distractor_views=2,
    train_views_per_class=4,
    queries_per_scene=2,
)


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_layout_and_gnd_well_formed(assets: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = build_mini_benchmark(assets, out, **KW)
    for ds, n_scenes in (("mini-test", 2), ("mini-val", 1)):
        gnd = _load_gnd(out / ds / f"gnd_{ds}.pkl")
        imlist, qimlist = gnd["imlist"], gnd["qimlist"]
        assert len(qimlist) == 2 * n_scenes == len(gnd["gnd"])
        assert not set(qimlist) & set(imlist) and len(set(imlist)) == len(imlist)
        jpgs = {p.stem for p in (out / ds / "jpg").glob("*.jpg")}
        assert jpgs == set(imlist) | set(qimlist)
        for q, g in zip(qimlist, gnd["gnd"], strict=True):
            assert set(g) == {"easy", "hard", "junk", "bbx"}
            idx = g["easy"] + g["hard"] + g["junk"]
            assert all(isinstance(i, int) and 0 <= i < len(imlist) for i in idx)
            assert len(set(idx)) == len(idx)  # the three sets are disjoint
            assert len(g["easy"]) + len(g["hard"]) >= 1
            w, h = Image.open(out / ds / "jpg" / f"{q}.jpg").size
            x1, y1, x2, y2 = g["bbx"]
            assert all(isinstance(v, float) for v in g["bbx"])
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
        counts = summary["counts"][ds]
        assert (counts["queries"], counts["db"]) == (len(qimlist), len(imlist))
    # Scene "sa": 1 real other view (hard) + 2 easy + 2 hard + 1 junk synthetic views.
    gnd = _load_gnd(out / "mini-test" / "gnd_mini-test.pkl")
    g0 = gnd["gnd"][gnd["qimlist"].index("sa_q0")]
    assert (len(g0["easy"]), len(g0["hard"]), len(g0["junk"])) == (2, 3, 1)
    # db size: scenes (6 + 5) + distractors 2 * (1 + 2).
    assert len(gnd["imlist"]) == 6 + 5 + 6
    for p in out.rglob("*.jpg"):
        assert max(Image.open(p).size) <= 64


def test_train_classes_disjoint_from_eval_scenes(assets: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    build_mini_benchmark(assets, out, **KW)
    classes = sorted(p.name for p in (out / "mini-train").iterdir())
    assert classes == ["td", "te", "tf"]
    assert all(len(list((out / "mini-train" / c).glob("*.jpg"))) == 4 for c in classes)
    import json

    man = json.loads((out / "manifest.json").read_text())
    train_photos = {r["photo"] for r in man["images"]["mini-train"]}
    eval_photos = {r["photo"] for ds in ("mini-test", "mini-val") for r in man["images"][ds]}
    assert not train_photos & eval_photos
    scene_photos = {r["photo"] for r in man["images"]["mini-test"] if r["group"] in ("sa", "sb")}
    assert scene_photos == {"gen/a1.png", "gen/a2.png", "gen/b1.png"}
    synth = [r for r in man["images"]["mini-train"] if r["level"] != "real"]
    assert synth and all(isinstance(r["seed"], int) and "quad" in r["params"] for r in synth)


def test_rebuild_is_byte_identical_and_seed_matters(assets: Path, tmp_path: Path) -> None:
    out1, out2, out3 = tmp_path / "o1", tmp_path / "o2", tmp_path / "o3"
    build_mini_benchmark(assets, out1, seed=3, **KW)
    build_mini_benchmark(assets, out2, seed=3, **KW)
    first = _files(out1)
    assert first == _files(out2)
    build_mini_benchmark(assets, out1, seed=3, **KW)  # rebuild in place: swapped, no leftovers
    assert _files(out1) == first
    build_mini_benchmark(assets, out3, seed=4, **KW)
    assert _files(out3) != first


def test_missing_photos_and_scene_limit(assets: Path, tmp_path: Path) -> None:
    (assets / "photos" / "gen" / "a2.png").unlink()
    (assets / "photos" / "gen" / "b1.png").unlink()
    write_manifest(assets, scan_photos(assets))
    summary = build_mini_benchmark(assets, tmp_path / "out", **{**KW, "queries_per_scene": 1})
    assert summary["counts"]["mini-test"]["scenes"] == ["sa"]
    gnd = _load_gnd(tmp_path / "out" / "mini-test" / "gnd_mini-test.pkl")
    assert len(gnd["gnd"][0]["hard"]) == 2  # no real other view left, only synthetic hard views
    summary = build_mini_benchmark(assets, tmp_path / "o2", n_test_scenes=1, **KW)
    assert summary["counts"]["mini-test"]["queries"] == 2


def test_catalogue_rejects_overlap_and_bad_levels() -> None:
    with pytest.raises(ValueError, match="gen/a1.png"):
        Catalogue(test=(_g("s", "a1"),), val=(), train=(_g("t", "a1"),), distractors=())
    with pytest.raises(ValueError, match="levels"):
        _g("s", "a1", "a2", levels=("medium",))


def test_curated_catalogue_is_disjoint_and_big_enough() -> None:
    assert len(CURATED.train) >= 40 and len(CURATED.test) >= 8 and len(CURATED.val) >= 3
    test_names = {g.name for g in CURATED.test}
    assert not test_names & {g.name for g in CURATED.train}


def test_no_scene_available_fails_with_dir_name(assets: Path, tmp_path: Path) -> None:
    cat = Catalogue(test=(_g("s", "zz"),), val=(), train=CAT.train, distractors=())
    with pytest.raises(ValueError, match="no test scene"):
        build_mini_benchmark(assets, tmp_path / "o", **{**KW, "catalogue": cat})
