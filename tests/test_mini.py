"""Mini benchmark on a few generated photos: layout, gnd against the provenance, determinism."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from msvlad.config import load_params
from msvlad.mini.assets import PhotoRow, photo_table, scan_photos, write_manifest
from msvlad.mini.builder import (
    Catalogue,
    Group,
    build_mini_benchmark,
    catalogue_from_rows,
    curated_catalogue,
    curated_rotations,
)


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


NAMES = ["a1", "a2", "b1", "b2", "c1", "c2", "d1", "e1", "f1", "f2", "g1", "h1"]


@pytest.fixture
def assets(tmp_path: Path) -> Path:
    root = tmp_path / "assets"
    for i, n in enumerate(NAMES):
        path = root / "photos" / "gen" / f"{n}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        _photo(i, 120 + 8 * i, 90).save(path)
    write_manifest(root, scan_photos(root, {"gen": "generated"}))
    return root


def _g(name: str, *photos: str, levels: tuple[str, ...] = (), rois: tuple = ()) -> Group:
    return Group(name, tuple(f"gen/{p}.png" for p in photos), levels, rois)


CAT = Catalogue(
    test=(
        _g("sa", "a1", "a2", levels=("hard",)),
        _g("sb", "b1", "b2", rois=((0.25, 0.5, 0.75, 1.0), None)),
    ),
    val=(_g("sc", "c1", "c2"),),
    train=(_g("td", "d1"), _g("te", "e1"), _g("tf", "f1", "f2")),
    test_distractors=(_g("xg", "g1"),),
    val_distractors=(_g("xh", "h1"),),
)
KW = dict(
    catalogue=CAT,
    rotations={},
    image_max_side=64,
    source_max_side=128,
    views_per_scene=(2, 2, 1),
    distractor_views=2,
    train_views_per_class=4,
    queries_per_scene=3,
)


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _expected_gnd(records: list[dict], imlist: list[str], query: str) -> dict[str, list[int]]:
    """The documented rules, from the provenance records: same photo junk, real pairs by level."""
    by_file = {Path(r["file"]).stem: r for r in records}
    q = by_file[query]
    levels = {g.photos[i]: lv for g in CAT.test for i, lv in enumerate(("easy", *g.levels))}
    out: dict[str, list[int]] = {"easy": [], "hard": [], "junk": []}
    for k, name in enumerate(imlist):
        r = by_file[name]
        if r["group"] != q["group"]:
            continue
        if r["level"] == "real":
            same = r["photo"] == q["photo"]
            hard = "hard" in (levels.get(r["photo"]), levels.get(q["photo"]))
            out["junk" if same else "hard" if hard else "easy"].append(k)
        else:
            out[r["level"]].append(k)
    return out


def test_layout_and_gnd_follow_the_protocol(assets: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = build_mini_benchmark(assets, out, **KW)
    man = json.loads((out / "manifest.json").read_text())
    for ds, n_scenes in (("mini-test", 2), ("mini-val", 1)):
        gnd = _load_gnd(out / ds / f"gnd_{ds}.pkl")
        imlist, qimlist = gnd["imlist"], gnd["qimlist"]
        assert len(qimlist) == 3 * n_scenes == len(gnd["gnd"])  # 2 real + 1 synthetic per scene
        assert not set(qimlist) & set(imlist) and len(set(imlist)) == len(imlist)
        jpgs = {p.stem for p in (out / ds / "jpg").glob("*.jpg")}
        assert jpgs == set(imlist) | set(qimlist)
        for q, g in zip(qimlist, gnd["gnd"], strict=True):
            assert set(g) == {"easy", "hard", "junk", "bbx"}
            exp = _expected_gnd(man["images"][ds], imlist, q)
            assert {k: g[k] for k in ("easy", "hard", "junk")} == exp
            w, h = Image.open(out / ds / "jpg" / f"{q}.jpg").size
            x1, y1, x2, y2 = g["bbx"]
            assert all(isinstance(v, float) for v in g["bbx"])
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
        counts = summary["counts"][ds]
        assert (counts["queries"], counts["db"]) == (len(qimlist), len(imlist))
        assert counts["real_queries"] == 2 * n_scenes
    gnd = _load_gnd(out / "mini-test" / "gnd_mini-test.pkl")
    # Scene "sa", query from photo a1: a2 hard, a1 itself junk, synthetic 2 easy / 2 hard / 1 junk.
    g0 = gnd["gnd"][gnd["qimlist"].index("sa_q0")]
    assert (len(g0["easy"]), len(g0["hard"]), len(g0["junk"])) == (2, 3, 2)
    g1 = gnd["gnd"][gnd["qimlist"].index("sb_q0")]  # sb: b1 and b2 are an easy pair
    assert (len(g1["easy"]), len(g1["hard"]), len(g1["junk"])) == (3, 2, 2)
    # A curated roi is the real query's bbx: b1 is 136 x 90, written at 64 x 42.
    w, h = Image.open(out / "mini-test" / "jpg" / "sb_q0.jpg").size
    assert g1["bbx"] == pytest.approx([0.25 * w, 0.5 * h, 0.75 * w, 1.0 * h], abs=0.02)
    # db: per scene 2 real + 5 synthetic; the test distractor g1 with its 2 views (not h1).
    assert len(gnd["imlist"]) == 2 * 7 + 3
    test_photos = {r["photo"] for r in man["images"]["mini-test"]}
    assert "gen/g1.png" in test_photos and "gen/h1.png" not in test_photos
    for p in out.rglob("*.jpg"):
        assert max(Image.open(p).size) <= 64
    assert len(summary["fingerprint"]) == 64 and summary["sources"] == {"gen": "generated"}


def test_train_classes_disjoint_from_eval_photos(assets: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    build_mini_benchmark(assets, out, **KW)
    classes = sorted(p.name for p in (out / "mini-train").iterdir())
    assert classes == ["td", "te", "tf"]
    assert all(len(list((out / "mini-train" / c).glob("*.jpg"))) == 4 for c in classes)
    man = json.loads((out / "manifest.json").read_text())
    train_photos = {r["photo"] for r in man["images"]["mini-train"]}
    eval_photos = {r["photo"] for ds in ("mini-test", "mini-val") for r in man["images"][ds]}
    assert not train_photos & eval_photos
    tf = [r for r in man["images"]["mini-train"] if r["group"] == "tf"]
    assert [r["level"] for r in tf] == ["real", "real", "easy", "hard"]  # real photos first
    synth = [r for r in man["images"]["mini-train"] if r["level"] != "real"]
    assert synth and all(isinstance(r["seed"], int) and "quad" in r["params"] for r in synth)


def test_rebuild_is_byte_identical_and_seed_matters(assets: Path, tmp_path: Path) -> None:
    out1, out2, out3 = tmp_path / "o1", tmp_path / "o2", tmp_path / "o3"
    s1 = build_mini_benchmark(assets, out1, seed=3, **KW)
    s2 = build_mini_benchmark(assets, out2, seed=3, **KW)
    first = _files(out1)
    assert first == _files(out2) and s1["fingerprint"] == s2["fingerprint"]
    build_mini_benchmark(assets, out1, seed=3, **KW)  # rebuild in place: swapped, no leftovers
    assert _files(out1) == first
    s3 = build_mini_benchmark(assets, out3, seed=4, **KW)
    assert _files(out3) != first and s3["fingerprint"] != s1["fingerprint"]


def test_rotation_turns_the_photo_clockwise(assets: Path, tmp_path: Path) -> None:
    cat = Catalogue(test=CAT.test, val=(), train=(_g("td", "d1"),))
    kw = {**KW, "catalogue": cat, "train_views_per_class": 1, "image_max_side": 256}
    build_mini_benchmark(assets, tmp_path / "plain", **kw)
    build_mini_benchmark(assets, tmp_path / "rot", **{**kw, "rotations": {"gen/d1.png": 90}})
    plain = np.asarray(Image.open(tmp_path / "plain/mini-train/td/00.jpg"), np.float32)
    turned = np.asarray(Image.open(tmp_path / "rot/mini-train/td/00.jpg"), np.float32)
    assert turned.shape == (plain.shape[1], plain.shape[0], 3)
    assert np.abs(np.rot90(plain, k=-1) - turned).mean() < 3  # clockwise = numpy's k = -1


def test_missing_photo_stops_the_build(assets: Path, tmp_path: Path) -> None:
    (assets / "photos" / "gen" / "a2.png").unlink()
    write_manifest(assets, scan_photos(assets))
    with pytest.raises(ValueError, match=r"not in the assets manifest.*gen/a2.png"):
        build_mini_benchmark(assets, tmp_path / "out", **KW)
    assert not (tmp_path / "out").exists()


def test_catalogue_rules() -> None:
    with pytest.raises(ValueError, match="gen/a1.png"):
        Catalogue(test=(_g("s", "a1", "a2"),), val=(), train=(_g("t", "a1"),))
    with pytest.raises(ValueError, match="levels"):
        _g("s", "a1", "a2", levels=("medium",))
    with pytest.raises(ValueError, match="unique"):
        Catalogue(test=(_g("s", "a1", "a2"),), val=(), train=(_g("s", "b1"),))
    g = _g("s", "a1", "a2", "b1", levels=("easy", "hard"))
    assert [g.pair_level(0, 1), g.pair_level(1, 0), g.pair_level(0, 2), g.pair_level(1, 2)] == [
        "easy",
        "easy",
        "hard",
        "hard",
    ]


def test_single_photo_scene_is_rejected(assets: Path, tmp_path: Path) -> None:
    cat = Catalogue(test=(_g("s", "a1"),), val=(), train=CAT.train)
    with pytest.raises(ValueError, match="two or more real photos"):
        build_mini_benchmark(assets, tmp_path / "o", **{**KW, "catalogue": cat})


def test_catalogue_from_rows() -> None:
    sha = "0" * 64
    rows = [
        PhotoRow("gen/a1.png", "a1.png", sha, 0, "test", "sa", "", "0.1 0.2 0.9 0.8", ""),
        PhotoRow("gen/a2.png", "a2.png", sha, 0, "test", "sa", "hard", "", ""),
        PhotoRow("gen/d1.png", "d1.png", sha, 90, "train", "td", "", "", ""),
        PhotoRow("gen/g1.png", "g1.png", sha, 0, "distractor-val", "xg", "", "", ""),
    ]
    cat = catalogue_from_rows(rows)
    (sa,) = cat.test
    assert sa.photos == ("gen/a1.png", "gen/a2.png") and sa.levels == ("hard",)
    assert sa.rois == ((0.1, 0.2, 0.9, 0.8), None)
    assert [g.name for g in cat.train] == ["td"] and cat.val_distractors[0].name == "xg"
    assert cat.test_distractors == () and cat.val == ()


def test_curated_catalogue_sizes_and_disjoint_scenes(repo_root: Path) -> None:
    per_scene = load_params(repo_root / "params.yaml").prepare.mini_queries_per_scene
    cat = curated_catalogue()
    assert len(cat.test) >= 15 and len(cat.val) >= 8 and len(cat.train) >= 80
    assert len(cat.test_distractors) >= 15 and len(cat.val_distractors) >= 10
    names = [{g.name for g in part} for part in cat.parts()]
    assert sum(len(n) for n in names) == len(set().union(*names))
    assert sum(max(len(g.photos), per_scene) for g in cat.test) >= 60  # queries
    assert sum(max(len(g.photos), per_scene) for g in cat.val) >= 40
    assert set(cat.photos()) == {r.photo for r in photo_table()}
    assert set(curated_rotations().values()) <= {90, 180, 270}


def test_any_worker_count_writes_the_same_bytes(assets: Path, tmp_path: Path) -> None:
    one = build_mini_benchmark(assets, tmp_path / "w1", workers=1, **KW)
    three = build_mini_benchmark(assets, tmp_path / "w3", workers=3, **KW)
    assert _files(tmp_path / "w1") == _files(tmp_path / "w3")
    assert one == three
    assert set(one["photos"]) == set(CAT.photos())  # every photo opened, by some worker


def test_the_manifest_records_a_source_by_its_pin_not_by_how_it_was_fetched(
    assets: Path, tmp_path: Path
) -> None:
    """Assets fetched now (archive and its sha256 known) or kept from an older fetch that did not
    record them give the same benchmark files."""
    manifest = json.loads((assets / "manifest.json").read_text())
    pinned = {"requirement": "gen==1.0", "licence": "CC0"}
    fetched = {**pinned, "archive": "gen-1.0.tar.gz", "archive_sha256": "ab" * 32}
    kept = {**pinned, "archive": "", "archive_sha256": ""}
    outs = []
    for i, record in enumerate((fetched, kept)):
        (assets / "manifest.json").write_text(json.dumps({**manifest, "sources": {"gen": record}}))
        outs.append(tmp_path / f"o{i}")
        summary = build_mini_benchmark(assets, outs[-1], **KW)
        assert summary["sources"] == {"gen": pinned}
    assert _files(outs[0]) == _files(outs[1])
