"""Frozen-trunk cache: keyed by content, verified on read, shared by jobs, bit-identical, capped."""

from __future__ import annotations

import io
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from msvlad.config import ModelConfig
from msvlad.data.images import ImageItem, load_batch
from msvlad.data.testsets import load_dataset
from msvlad.evaluation.extract import describe_images, describe_multiscale
from msvlad.evaluation.pipeline import dataset_items
from msvlad.nn import trunk_cache as tc
from msvlad.nn.model import build_model
from msvlad.nn.trunk_cache import (
    FrozenTrunkCache,
    TrunkStore,
    job_key,
    open_job,
    trunk_store_dir,
)
from tinydata import make_retrieval_set, make_train_set

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: equal float sums across runs

CPU = torch.device("cpu")
LOGGER = "msvlad.nn.trunk_cache"


@pytest.fixture
def store_env(tmp_path, monkeypatch):
    """A fresh store under tmp_path (the process memo emptied too)."""
    monkeypatch.setenv("MSVLAD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MSVLAD_CACHE_MAX_GB", raising=False)
    monkeypatch.setattr(tc, "_MEMO", {})
    return tmp_path / "cache" / "trunk"


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model(ModelConfig(pretrained=False, num_clusters=4, image_size=32)).eval()


@pytest.fixture
def items(tmp_path):
    """Queries (cropped) and database images of a tiny revisitop set, with different sizes."""
    make_retrieval_set(tmp_path / "data", "test", num_scenes=3, db_per_scene=3, size=64, seed=3)
    q, db = dataset_items(load_dataset(tmp_path / "data", "test"))
    for i, item in enumerate(db[:4]):  # other aspect ratios: several max_side buckets
        from PIL import Image

        with Image.open(item.path) as im:
            im.resize((64 + 16 * i, 48)).save(item.path, quality=95)
    return q + db


def _describe(model, items, depth, size=48, resize="max_side", batch_size=4, **kw):
    desc, ok = describe_images(
        model,
        items,
        image_size=size,
        resize=resize,
        batch_size=batch_size,
        trunk_depth=depth,
        **kw,
    )
    return desc, ok


def _forget(monkeypatch):
    """Drop what this process remembers: the next read comes from the files."""
    monkeypatch.setattr(tc, "_MEMO", {})


def _files(store: Path) -> list[Path]:
    return sorted(store.glob("msvlad-trunk-*.bin"))


def _key(model, items, depth=3, **over):
    args = dict(
        size=48,
        resize="max_side",
        resize_filter="bilinear",
        batch_size=4,
        device=CPU,
        autocast=False,
    )
    args.update(over)
    return job_key(model, depth, items, **args)


# ------------------------------------------------------------------------ equal to the uncached


@pytest.mark.parametrize("resize", ["max_side", "square"])
def test_cached_descriptors_equal_uncached_bit_for_bit(
    store_env, model, items, monkeypatch, resize
):
    direct, ok = _describe(model, items, 0, resize=resize)
    assert ok.all() and not _files(store_env)  # depth 0: no cache
    first, _ = _describe(model, items, 3, resize=resize)  # computed, stored
    assert len(_files(store_env)) == 1
    _forget(monkeypatch)
    for name in ("load_resized", "_ImageSet"):  # a hit reads no image ...
        monkeypatch.setattr(f"msvlad.evaluation.extract.{name}", _must_not_run)
    monkeypatch.setattr(model.backbone, "trunk", _must_not_run)  # ... and runs no frozen stage
    again, ok2 = _describe(model, items, 3, resize=resize)
    assert torch.equal(first, direct) and torch.equal(again, direct)
    assert ok2.all()


def _must_not_run(*args, **kwargs):
    raise AssertionError("the cached path must not load images or run the frozen stages")


def test_multiscale_descriptors_equal_uncached(store_env, model, items):
    args = dict(image_size=48, scales=(1.0, 0.7071), resize="max_side", batch_size=4)
    direct, fail = describe_multiscale(model, items, **args)
    cold, _ = describe_multiscale(model, items, trunk_depth=4, **args)
    warm, _ = describe_multiscale(model, items, trunk_depth=4, **args)
    assert not fail and len(_files(store_env)) == 2  # one entry per scale
    assert torch.equal(cold, direct) and torch.equal(warm, direct)


def test_a_shared_backbone_caches_its_whole_trunk_on_the_frozen_entry(
    store_env, model, items, monkeypatch
):
    direct, _ = _describe(model, items, 0)
    _describe(model, items, 3)  # a trained row: the frozen 3 stages
    (frozen,) = _files(store_env)
    # the cluster stage describes other images with the whole (pretrained) network
    job = open_job(model, 3, items[:4], whole=True, **_job_args())
    assert (job.depth, job.base) == (model.backbone.num_stages, 3) and job.cached is None
    batch, ok = load_batch(items[:4], 48, "square")
    with torch.no_grad():
        job.trunk(batch)
    job.finish(ok)
    assert len(_files(store_env)) == 3  # its whole and frozen entries
    calls = []
    real = model.backbone.forward_stages
    monkeypatch.setattr(
        model.backbone, "forward_stages", lambda x, a, b=None: calls.append((a, b)) or real(x, a, b)
    )
    monkeypatch.setattr("msvlad.evaluation.extract.load_resized", _must_not_run)
    whole, _ = _describe(model, items, 3)  # now known as shared: carried on from the frozen entry
    assert torch.equal(whole, direct)
    assert (3, model.backbone.num_stages) in calls  # the stages above the frozen entry, once
    assert len(_files(store_env)) == 4 and frozen in _files(store_env)
    calls.clear()
    _forget(monkeypatch)
    again, _ = _describe(model, items, 3)
    assert torch.equal(again, direct) and (3, model.backbone.num_stages) not in calls


def _job_args(**over):
    args = dict(size=48, resize="square", resize_filter="bilinear", batch_size=4, device=CPU)
    return {**args, **over}


def test_a_job_with_an_unreadable_image_is_not_stored(store_env, model, items):
    broken = items[:]
    Path(broken[5].path).write_text("not an image")
    desc, ok = _describe(model, broken, 3)
    assert not ok[5] and ok.sum() == len(items) - 1 and not _files(store_env)
    assert torch.equal(desc, _describe(model, broken, 0)[0])


# ----------------------------------------------------------------------------- what makes a key


def test_a_changed_image_with_the_same_size_and_mtime_misses(store_env, model, items):
    from PIL import Image

    _describe(model, items, 3)
    path = Path(items[-1].path)
    st = path.stat()
    # another picture of exactly the same length, the old mtime put back: a stale cache would hit
    with Image.open(items[0].path) as im:
        other = im.convert("RGB").resize((64, 64))
    for quality in range(95, 5, -5):
        buf = io.BytesIO()
        other.save(buf, format="JPEG", quality=quality)
        if buf.tell() <= st.st_size:
            break
    path.write_bytes(buf.getvalue() + b"\0" * (st.st_size - buf.tell()))  # after EOI: ignored
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    cached, ok = _describe(model, items, 3)
    assert ok.all() and torch.equal(cached, _describe(model, items, 0)[0])
    assert len(_files(store_env)) == 2  # a new entry: the old one was not used


@pytest.mark.parametrize(
    "change",
    ["weights", "depth", "size", "resize", "filter", "batch", "crop", "threads", "unrelated"],
)
def test_what_the_key_depends_on(model, items, change):
    base = _key(model, items)
    if change == "weights":  # a frozen stage's weight
        with torch.no_grad():
            next(iter(model.backbone.stages[0].parameters())).add_(1e-3)
        assert _key(model, items).digest != base.digest
    elif change == "depth":
        assert _key(model, items, depth=2).digest != base.digest
    elif change == "size":  # another size or scale
        assert _key(model, items, size=34).digest != base.digest
    elif change == "resize":
        assert _key(model, items, resize="square").digest != base.digest
    elif change == "filter":
        assert _key(model, items, resize_filter="lanczos").digest != base.digest
    elif change == "batch":  # other batches: other float sums
        assert _key(model, items, batch_size=3).digest != base.digest
    elif change == "crop":
        moved = [ImageItem(items[0].path, (1.0, 1.0, 20.0, 20.0)), *items[1:]]
        assert _key(model, moved).digest != base.digest
    elif change == "threads":
        old = torch.get_num_threads()
        torch.set_num_threads(old + 1)
        try:
            assert _key(model, items).digest != base.digest
        finally:
            torch.set_num_threads(old)
    else:  # a stage above the key's depth is not part of it (it is trained)
        with torch.no_grad():
            next(iter(model.backbone.stages[5].parameters())).add_(1.0)
        assert _key(model, items).digest == base.digest


# -------------------------------------------------------------------------- damage and mismatch


def _one_warning(caplog) -> str:
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(lines) == 1, lines
    assert "\n" not in lines[0]
    return lines[0]


def _damage_truncated(file: Path, store: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _damage_flipped(file: Path, store: Path) -> None:
    data = bytearray(file.read_bytes())
    data[-100] ^= 0xFF
    file.write_bytes(bytes(data))


def _damage_garbage(file: Path, store: Path) -> None:
    file.write_bytes(b"garbage")


def _damage_empty(file: Path, store: Path) -> None:
    file.write_bytes(b"")


def _damage_header(file: Path, store: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(tc.MAGIC) + 9] ^= 0xFF  # inside the JSON header
    file.write_bytes(bytes(data))


DAMAGE = {
    "truncated": (_damage_truncated, "truncated"),
    "flipped payload byte": (_damage_flipped, "checksum mismatch"),
    "not a cache file": (_damage_garbage, "wrong header"),
    "empty": (_damage_empty, "wrong header"),
    "damaged header": (_damage_header, "header"),
}


@pytest.mark.parametrize("name", list(DAMAGE))
def test_a_damaged_entry_is_recomputed_with_one_warning(
    store_env, model, items, monkeypatch, caplog, name
):
    direct, _ = _describe(model, items, 0)
    _describe(model, items, 3)
    (file,) = _files(store_env)
    good = file.read_bytes()
    damage, says = DAMAGE[name]
    damage(file, store_env)
    _forget(monkeypatch)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        again, _ = _describe(model, items, 3)
    line = _one_warning(caplog)
    assert str(file) in line and says in line and "recomputed" in line
    assert torch.equal(again, direct)
    assert file.read_bytes() == good  # written again, whole


@pytest.mark.parametrize("other", ["resize filter", "frozen depth"])
def test_an_entry_of_another_key_is_never_used(store_env, model, items, monkeypatch, caplog, other):
    over = {"resize_filter": "lanczos"} if other == "resize filter" else {}
    depth = 2 if other == "frozen depth" else 3
    _describe(model, items, depth, **over)  # a valid entry of another key ...
    (foreign,) = _files(store_env)
    wanted = TrunkStore(store_env, 2**30).path(_key(model, items))
    shutil.copyfile(foreign, wanted)  # ... copied under this key's name
    _forget(monkeypatch)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        got, _ = _describe(model, items, 3)
    line = _one_warning(caplog)
    assert str(wanted) in line and "another key" in line
    assert torch.equal(got, _describe(model, items, 0)[0])
    _forget(monkeypatch)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _describe(model, items, 3)  # rewritten with its own key: a clean hit
    assert not [r for r in caplog.records if r.name == LOGGER]


def test_training_cache_of_another_depth_is_recomputed_not_an_error(
    store_env, model, tmp_path, caplog
):
    make_train_set(tmp_path / "train", num_classes=2, per_class=3, size=48)
    paths = sorted((tmp_path / "train").rglob("*.jpg"))
    store = TrunkStore.default()
    two = FrozenTrunkCache(model, 2, paths, image_size=32, batch_size=4, device=CPU, store=store)
    three_key = job_key(
        model,
        3,
        [ImageItem(p) for p in paths],
        size=32,
        resize="square",
        resize_filter="bilinear",
        batch_size=4,
        device=CPU,
    )
    (file,) = _files(store_env)
    shutil.copyfile(file, store.path(three_key))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        three = FrozenTrunkCache(
            model, 3, paths, image_size=32, batch_size=4, device=CPU, store=store
        )
    assert "another key" in _one_warning(caplog)
    direct = FrozenTrunkCache(model, 3, paths, image_size=32, batch_size=4, device=CPU)
    assert torch.equal(three.features, direct.features)
    assert three.features.shape != two.features.shape


# ------------------------------------------------------------------------------ training's cache


def test_training_cache_returns_exactly_what_was_computed(store_env, model, tmp_path, monkeypatch):
    make_train_set(tmp_path / "train", num_classes=2, per_class=3, size=48)
    paths = sorted((tmp_path / "train").rglob("*.jpg"))
    paths[1].write_text("not an image")  # an unreadable image is remembered as such
    store = TrunkStore.default()

    def cache():
        return FrozenTrunkCache(
            model, 3, paths, image_size=32, batch_size=4, device=CPU, store=store
        )

    built = cache()
    assert len(_files(store_env)) == 1
    assert built.ok.tolist() == [i != 1 for i in range(len(paths))]
    monkeypatch.setattr(model.backbone, "trunk", _must_not_run)
    again = cache()
    assert torch.equal(again.features, built.features) and np.array_equal(again.ok, built.ok)
    monkeypatch.undo()
    direct = FrozenTrunkCache(model, 3, paths, image_size=32, batch_size=4, device=CPU)
    assert torch.equal(direct.features, built.features)
    idx = np.array([0, 2, 3])
    assert torch.equal(again.describe(idx), direct.describe(idx))


def test_training_and_whitening_share_one_entry(store_env, model, tmp_path, monkeypatch):
    """The training images at the training size in batches of the same size: one job."""
    make_train_set(tmp_path / "train", num_classes=2, per_class=3, size=48)
    paths = sorted((tmp_path / "train").rglob("*.jpg"))
    FrozenTrunkCache(
        model, 3, paths, image_size=32, batch_size=4, device=CPU, store=TrunkStore.default()
    )
    _forget(monkeypatch)
    items = [ImageItem(p) for p in paths]
    monkeypatch.setattr("msvlad.evaluation.extract.load_resized", _must_not_run)
    got, _ = describe_images(model, items, image_size=32, batch_size=4, trunk_depth=3)
    monkeypatch.undo()
    assert len(_files(store_env)) == 1
    assert torch.equal(got, describe_images(model, items, image_size=32, batch_size=4)[0])


# ------------------------------------------------------------------------------------ the store


def _entry(store: TrunkStore, model, items, size: int) -> Path:
    key = _key(model, items, size=size)
    batches = [torch.randn(2, 8, 4, 4)]
    path = store.put(key, batches, np.ones(len(items), dtype=bool))
    assert path is not None
    return path


def test_eviction_keeps_the_cap_oldest_first_and_never_a_foreign_file(tmp_path, model, items):
    root = tmp_path / "trunk"
    root.mkdir()
    outside = tmp_path / "precious.bin"
    outside.write_bytes(b"keep me")
    fake = root / f"msvlad-trunk-{'0' * 16}-{'0' * 40}.bin"  # a cache name, not our header
    fake.write_bytes(b"not written by the store" * 1000)
    (root / "notes.txt").write_text("mine")
    (root / f"msvlad-trunk-{'1' * 16}-{'1' * 40}.bin").symlink_to(outside)
    one = TrunkStore(root, 2**30)
    paths = []
    for i in range(4):
        paths.append(_entry(one, model, items, 40 + i))
        os.utime(paths[-1], (1000 + i, 1000 + i))  # oldest first
    size = paths[0].stat().st_size
    capped = TrunkStore(root, 2 * size + size // 2)  # room for two entries
    newest = _entry(capped, model, items, 60)
    kept = set(capped.entries())
    assert kept == {paths[3], newest}  # the two oldest went, the newest written stays
    assert sum(p.stat().st_size for p in kept) <= capped.max_bytes
    assert fake.read_bytes() == b"not written by the store" * 1000
    assert (root / "notes.txt").read_text() == "mine" and outside.read_bytes() == b"keep me"
    stale = root / f".{paths[3].name}.abc.tmp"  # a write a kill interrupted, long ago
    stale.write_bytes(b"x")
    os.utime(stale, (1, 1))
    foreign_tmp = root / ".notes.txt.abc.tmp"
    foreign_tmp.write_bytes(b"x")
    os.utime(foreign_tmp, (1, 1))
    capped.evict()
    assert not stale.exists() and foreign_tmp.exists()


def test_a_read_marks_an_entry_recently_used(tmp_path, model, items):
    store = TrunkStore(tmp_path / "trunk", 2**30)
    old = _entry(store, model, items, 40)
    new = _entry(store, model, items, 41)
    os.utime(old, (1000, 1000))
    os.utime(new, (2000, 2000))
    assert store.get(_key(model, items, size=40)) is not None  # used now: evicted last
    size = old.stat().st_size
    TrunkStore(store.root, size + size // 2).evict()
    assert old.exists() and not new.exists()


def test_a_zero_cap_turns_the_store_off(store_env, model, items, monkeypatch):
    monkeypatch.setenv("MSVLAD_CACHE_MAX_GB", "0")
    assert TrunkStore.default() is None
    assert open_job(model, 3, items, **_job_args()) is None
    _describe(model, items, 3)
    assert not store_env.exists()


def test_a_job_larger_than_the_cap_is_not_stored(tmp_path, model, items):
    store = TrunkStore(tmp_path / "trunk", 100)
    assert store.put(_key(model, items), [torch.randn(2, 8, 4, 4)], np.ones(len(items))) is None
    assert not list((tmp_path / "trunk").glob("*"))


def test_store_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MSVLAD_CACHE", str(tmp_path / "c"))
    assert trunk_store_dir() == tmp_path / "c" / "trunk"
    monkeypatch.delenv("MSVLAD_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert trunk_store_dir() == tmp_path / "x" / "msvlad" / "trunk"


def test_training_cache_misses_a_training_image_replaced_in_place(store_env, model, tmp_path):
    """The same size and mtime, other pixels: the old entry is not used (it was, by path+mtime)."""
    make_train_set(tmp_path / "train", num_classes=2, per_class=3, size=48)
    paths = sorted((tmp_path / "train").rglob("*.jpg"))
    store = TrunkStore.default()

    def cache():
        return FrozenTrunkCache(
            model, 3, paths, image_size=32, batch_size=4, device=CPU, store=store
        )

    before = cache()
    st = paths[0].stat()
    from PIL import Image

    with Image.open(paths[-1]) as im:  # another picture, re-encoded to exactly the old length
        for quality in range(95, 5, -5):
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=quality)
            if buf.tell() <= st.st_size:
                break
    paths[0].write_bytes(buf.getvalue() + b"\0" * (st.st_size - buf.tell()))
    os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns))
    after = cache()
    direct = FrozenTrunkCache(model, 3, paths, image_size=32, batch_size=4, device=CPU)
    assert torch.equal(after.features, direct.features)
    assert not torch.equal(after.features[0], before.features[0])
    assert len(_files(store_env)) == 2
