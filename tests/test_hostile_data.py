"""Hostile data: archives that write outside, pickle bombs, ground truths that change AP silently.

Every case asserts the exception (or the command line's exit 2), that its message is one line
naming the file and the member, query or list at fault, and that nothing outside the dataset root
was written and what was there before is byte for byte unchanged.

- Archives: the CVE-2025-4517 symlink chain (a file written outside the extraction folder despite
  Python 3.11.7's `data` filter), plain symbolic and hard links, fifos, devices, ``..`` and
  absolute members; through `extract_archive`, `prepare_dataset` from an HTTP mirror on 127.0.0.1
  and a ``file://`` mirror, and the command line.
- Pickles: memo-reference and allocation bombs of a few bytes each, loaded in a subprocess with a
  memory cap and a timeout, so that a regression fails instead of hanging or swapping.
- Ground truths: repeats, overlaps, boolean masks, repeated names, names that leave ``jpg/``.
- Rotation lists, distractor listings, training-set files: unreadable text, escaping names.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from badinputs import World, make_world, snapshot
from httpserver import FileServer
from msvlad.cli import main
from msvlad.data.catalog import OXFORD_IMAGES, R1M_ARCHIVE, R1M_LIST
from msvlad.data.download import ArchiveError, extract_archive, url_key
from msvlad.data.official import prepare_dataset
from msvlad.data.safe_pickle import (
    UnsafePickleError,
    check_tree_size,
    load_budget,
    load_pickle,
)
from msvlad.data.testsets import load_dataset, load_distractors, read_rotations, validate_gnd
from msvlad.data.trainsets import build_gldv2_clean, build_sfm120k
from msvlad.errors import InputError
from replicas import (
    paper_mirror,
    pkl_bytes,
    random_jpeg,
    symlink_chain_members,
    tar_bytes,
    tar_member,
    tar_of,
)
from tinydata import make_retrieval_set, make_train_set

REPO = Path(__file__).resolve().parents[1]
ESCAPED = "written-outside.txt"  # the payload every hostile archive tries to write outside


def one_line(err: pytest.ExceptionInfo, *named: str) -> str:
    """The exception's message, checked to be one line naming every string of `named`."""
    msg = str(err.value)
    assert "\n" not in msg, msg
    for name in named:
        assert name in msg, (name, msg)
    return msg


def run_cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    """Exit status and the `msvlad ...` lines of stderr (no traceback allowed)."""
    code = main(argv)
    err = capsys.readouterr().err.replace("\r", "\n")
    assert "Traceback" not in err
    return code, [line for line in err.splitlines() if line.startswith("msvlad ")]


def assert_error(code: int, lines: list[str], command: str, *named: str) -> None:
    """Exit 2 and exactly one `msvlad <command>: error: ...` line naming every string given."""
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"msvlad {command}: error: "), lines[0]
    for name in named:
        assert name in lines[0], (name, lines[0])


# ----------------------------------------------------------------------------- archives


def assert_nothing_escaped(root: Path) -> None:
    """No payload in `root` or any folder above it (where an escaping member would land)."""
    for folder in [root, *root.parents]:
        assert not (folder / ESCAPED).exists(), folder / ESCAPED


def _hostile(kind: str, outside: Path) -> tuple[list, str, str]:
    """(members, refused member, what the message says) of a hostile archive of `kind`.

    A regular image comes first: the refusal must come before anything is written. `outside`
    is the folder absolute names aim at.
    """
    first = (tar_member("jpg/first.jpg"), random_jpeg(0))
    members: dict[str, tuple[list, str, str]] = {
        "symlink chain (CVE-2025-4517)": (
            symlink_chain_members(3, ESCAPED, b"pwned"),
            "member 'a'",
            "is a symbolic link",
        ),
        "symbolic link": (
            [(tar_member("jpg/x.jpg", tarfile.SYMTYPE, f"../../../{ESCAPED}"), None)],
            "member 'jpg/x.jpg'",
            f"is a symbolic link -> '../../../{ESCAPED}'",
        ),
        "hard link": (
            [(tar_member("jpg/y.jpg", tarfile.LNKTYPE, "jpg/first.jpg"), None)],
            "member 'jpg/y.jpg'",
            "is a hard link -> 'jpg/first.jpg'",
        ),
        "fifo": ([(tar_member("jpg/pipe", tarfile.FIFOTYPE), None)], "'jpg/pipe'", "is a fifo"),
        "character device": (
            [(tar_member("jpg/null", tarfile.CHRTYPE), None)],
            "'jpg/null'",
            "is a character device",
        ),
        "block device": (
            [(tar_member("jpg/sda", tarfile.BLKTYPE), None)],
            "'jpg/sda'",
            "is a block device",
        ),
        "'..' member": (
            [(tar_member(f"jpg/../../../{ESCAPED}"), b"pwned")],
            f"'jpg/../../../{ESCAPED}'",
            "has a '..' component",
        ),
        "absolute member": (
            [(tar_member(str(outside / ESCAPED)), b"pwned")],
            repr(str(outside / ESCAPED)),
            "has an absolute path",
        ),
    }
    found, named, says = members[kind]
    return [first, *found], named, says


HOSTILE_KINDS = [
    "symlink chain (CVE-2025-4517)",
    "symbolic link",
    "hard link",
    "fifo",
    "character device",
    "block device",
    "'..' member",
    "absolute member",
]


def test_the_symlink_chain_escapes_the_interpreters_data_filter(tmp_path: Path) -> None:
    """Why tarfile's filter is not relied on: on this Python it lets the chain write outside."""
    archive = tmp_path / "chain.tar"
    archive.write_bytes(tar_of(symlink_chain_members(2, ESCAPED, b"pwned"), gz=False))
    root = tmp_path / "a" / "b" / "root"
    root.parent.mkdir(parents=True)
    if not hasattr(tarfile, "data_filter"):
        pytest.skip("this Python has no tarfile filters")
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(root, filter="data")
    except tarfile.TarError:
        pytest.skip("this Python's data filter refuses the chain (CVE-2025-4517 fixed)")
    assert (tmp_path / "a" / ESCAPED).read_bytes() == b"pwned"  # two levels above the root


@pytest.mark.parametrize("kind", HOSTILE_KINDS)
def test_extract_archive_refuses_before_writing(tmp_path: Path, kind: str) -> None:
    members, named, says = _hostile(kind, tmp_path)
    archive = tmp_path / "hostile.tar.gz"
    archive.write_bytes(tar_of(members))
    before = snapshot(tmp_path)
    dest = tmp_path / "data" / "ds" / "_extract0"
    with pytest.raises(ArchiveError) as err:
        extract_archive(archive, dest)
    assert isinstance(err.value, InputError)
    one_line(err, str(archive), named, says, "refused")
    assert snapshot(tmp_path) == before  # not even the first, valid image
    assert not (tmp_path / "data").exists()
    assert_nothing_escaped(dest)


def test_extract_archive_refuses_files_over_files(tmp_path: Path) -> None:
    data = random_jpeg(1)
    for members, says in (
        ([("a.jpg", data), ("a.jpg", data)], "'a.jpg' is listed twice"),
        ([("a", data), ("a/b.jpg", data)], "'a/b.jpg' lies under the file 'a'"),
        ([("a/b.jpg", data), ("a", data)], "'a' is both a file and a folder"),
    ):
        archive = tmp_path / "twice.tar"
        archive.write_bytes(tar_of([(tar_member(n), d) for n, d in members], gz=False))
        with pytest.raises(ArchiveError) as err:
            extract_archive(archive, tmp_path / "out")
        one_line(err, str(archive), says)
        assert not (tmp_path / "out").exists()


def _roxford_files(archive: bytes) -> dict[str, bytes]:
    """A revisited-Oxford mirror whose image archive is `archive` (the gnd is a valid one)."""
    gnd = {
        "imlist": ["first", "x"],
        "qimlist": ["q"],
        "gnd": [{"easy": [0], "hard": [], "junk": [], "bbx": [0.0, 0.0, 8.0, 8.0]}],
    }
    gnd_url = "http://cmp.felk.cvut.cz/revisitop/data/datasets/roxford5k/gnd_roxford5k.pkl"
    return {"/" + url_key(gnd_url): pkl_bytes(gnd, 2), "/" + url_key(OXFORD_IMAGES[0]): archive}


def _earlier_outputs(data: Path) -> None:
    """What a data root holds before: a hand-laid test set, a training set, a user's note."""
    make_retrieval_set(data, "mytest", num_scenes=2, db_per_scene=2, size=32)
    make_train_set(data / "mytrain", num_classes=2, per_class=2, size=32)
    (data / "notes.txt").write_text("mine\n")


def _assert_only_downloads_added(data: Path, before: dict[str, str]) -> None:
    after = snapshot(data)
    assert {k: v for k, v in after.items() if k in before} == before  # byte-identical
    added = sorted(set(after) - set(before))
    assert all(k.startswith("downloads/") or k == "checksums.json" for k in added), added
    assert not (data / "roxford5k").exists()
    assert sorted(p.name for p in data.iterdir()) == [
        "checksums.json",
        "downloads",
        "mytest",
        "mytrain",
        "notes.txt",
    ]  # no temporary folder left


@pytest.mark.parametrize("kind", HOSTILE_KINDS)
@pytest.mark.parametrize("mirror", ["http", "file"])
def test_prepare_refuses_hostile_mirror_archive(tmp_path: Path, kind: str, mirror: str) -> None:
    members, named, says = _hostile(kind, tmp_path)
    files = _roxford_files(tar_of(members))
    data = tmp_path / "work" / "data"
    _earlier_outputs(data)
    before = snapshot(data)
    archive = data / "downloads" / url_key(OXFORD_IMAGES[0])
    with pytest.raises(ArchiveError) as err:
        if mirror == "http":
            with FileServer(files) as server:
                prepare_dataset("roxford5k", data, mirror=server.base_url)
        else:
            folder = tmp_path / "mirror"
            for path, content in files.items():
                (folder / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
                (folder / path.lstrip("/")).write_bytes(content)
            prepare_dataset("roxford5k", data, mirror=folder.as_uri())
    one_line(err, str(archive), named, says)
    _assert_only_downloads_added(data, before)
    assert_nothing_escaped(data / "roxford5k" / "_extract0" / "jpg")


def test_prepare_refuses_hostile_distractor_archive(tmp_path: Path) -> None:
    """The resumable extraction path (R1M, GLDv2, SfM-120k) creates nothing either."""
    members, named, says = _hostile("symlink chain (CVE-2025-4517)", tmp_path)
    files = {"/" + url_key(R1M_LIST): b"0/a/x.jpg\n"}
    files["/" + url_key(R1M_ARCHIVE.format(i=1))] = tar_of(members)
    data = tmp_path / "data"
    _earlier_outputs(data)
    before = snapshot(data)
    with FileServer(files) as server, pytest.raises(ArchiveError) as err:
        prepare_dataset("revisitop1m", data, mirror=server.base_url, num_archives=1)
    one_line(err, "revisitop1m.1.tar.gz", named, says)
    assert not (data / "revisitop1m").exists()
    after = snapshot(data)
    assert {k: v for k, v in after.items() if k in before} == before
    assert all(
        k.startswith("downloads/") or k == "checksums.json" for k in set(after) - set(before)
    )
    assert_nothing_escaped(data / "revisitop1m" / ".revisitop1m.1.tar.gz.extract" / "x")


def test_prepare_command_exits_2_on_the_symlink_chain(tmp_path: Path, capsys) -> None:
    members, named, _ = _hostile("symlink chain (CVE-2025-4517)", tmp_path)
    data = tmp_path / "data"
    _earlier_outputs(data)
    before = snapshot(data)
    with FileServer(_roxford_files(tar_of(members))) as server:
        code, lines = run_cli(
            [
                "prepare",
                "--params",
                str(REPO / "params.paper.yaml"),
                *("--set", f"data.root={data}", "--set", f"data.mirror={server.base_url}"),
                *("--set", "data.train_set=mytrain", "--set", "data.val_set=mytest"),
                *("--set", "data.test_sets=[roxford5k]"),
            ],
            capsys,
        )
    assert_error(code, lines, "prepare", "oxbuild_images-v1.tgz", named, "symbolic link")
    _assert_only_downloads_added(data, before)
    assert_nothing_escaped(data / "roxford5k" / "_extract0" / "jpg")


# ----------------------------------------------------------------------------- pickle bombs


def _long1(n: int) -> bytes:
    """The LONG1 opcode pushing `n`."""
    b = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(b)]) + b


def _unicode(s: str) -> bytes:
    """The BINUNICODE opcode pushing `s`."""
    data = s.encode()
    return b"X" + len(data).to_bytes(4, "little") + data


P2 = b"\x80\x02"
NDARRAY = b"cnumpy\nndarray\n"
DTYPE = b"cnumpy\ndtype\n"
RECONSTRUCT = b"cnumpy.core.multiarray\n_reconstruct\n"
EMPTY_ARRAY = RECONSTRUCT + NDARRAY + b"K\x00\x85C\x01b\x87R"  # _reconstruct(ndarray, (0,), b'b')


def _memo_bomb() -> bytes:
    """A ground truth whose 'easy' list is 1000 x 1000 x 1000 memo references (10^9 indices)."""
    l0 = list(range(1000))
    l1 = [l0] * 1000
    gnd = {"easy": [l1] * 1000, "hard": [], "junk": [], "bbx": [0, 0, 8, 8]}
    return pickle.dumps({"imlist": ["a"], "qimlist": ["q"], "gnd": [gnd]}, protocol=2)


def _object_state(shape: int, objects: int) -> bytes:
    """An object array state of `shape` elements holding a list of `objects` objects."""
    dtype_o = DTYPE + _unicode("O8") + b"\x85R"
    state = b"(K\x01" + _long1(shape) + b"\x85" + dtype_o + b"\x89]" + b"K\x01a" * objects + b"t"
    return P2 + EMPTY_ARRAY + state + b"b."


def _nested(depth: int) -> bytes:
    x: list = []
    for _ in range(depth):
        x = [x]
    return pickle.dumps(x, protocol=2)


def _cycle() -> bytes:
    x: list = []
    x.append(x)
    return pickle.dumps({"gnd": x}, protocol=4)


BOMBS: dict[str, tuple[Callable[[], bytes], str]] = {
    "memo references 1000x1000x1000 (the 6 KB gnd)": (
        _memo_bomb,
        "elements once shared references are expanded",
    ),
    "bytearray(10**13)": (
        lambda: P2 + b"cbuiltins\nbytearray\n" + _long1(10**13) + b"\x85R.",
        "bytearray(10000000000000) would allocate 10000000000000 bytes",
    ),
    "bytes(10**13)": (
        lambda: P2 + b"cbuiltins\nbytes\n" + _long1(10**13) + b"\x85R.",
        "bytes(10000000000000) would allocate",
    ),
    "numpy.ndarray((10**13,))": (
        lambda: P2 + NDARRAY + _long1(10**13) + b"\x85\x85R.",
        "numpy.ndarray of shape (10000000000000,) would allocate 80000000000000 bytes",
    ),
    "numpy.core.multiarray._reconstruct huge shape": (
        lambda: P2 + RECONSTRUCT + NDARRAY + _long1(10**13) + b"\x85C\x01b\x87R.",
        "numpy _reconstruct of shape (10000000000000,) would allocate",
    ),
    "numpy._core.multiarray._reconstruct huge 2-d shape": (
        lambda: (
            P2
            + RECONSTRUCT.replace(b"numpy.core", b"numpy._core")
            + NDARRAY
            + (_long1(10**7) + _long1(10**7) + b"\x86")
            + _unicode("f8")
            + b"\x87R."
        ),
        "numpy _reconstruct of shape (10000000, 10000000) would allocate",
    ),
    "numpy.dtype of 2 GB per element": (
        lambda: P2 + DTYPE + _unicode("V2000000000") + b"\x85R.",
        "numpy.dtype of 2000000000 bytes per element",
    ),
    "numpy.dtype state with a huge element size": (
        lambda: (
            P2
            + DTYPE
            + _unicode("V8")
            + b"\x85R(K\x03"
            + _unicode("|")
            + b"NNN"
            + _long1(10**13)
            + b"K\x01K\x00tb."
        ),
        "numpy.dtype state holds the size 10000000000000",
    ),
    "numpy scalars past the budget together": (
        lambda: (
            P2
            + b"(cnumpy.core.multiarray\nscalar\nq\x01"
            + DTYPE
            + _unicode("V600000")
            + b"\x85Rq\x02"
            + b"\x85R"
            + b"h\x01h\x02\x85R" * 2
            + b"l."
        ),
        "numpy scalar of dtype |V600000 would allocate 600000 bytes",
    ),
    "object array of 10**9 elements": (
        lambda: _object_state(10**9, 1),
        "numpy array of shape (1000000000,) would allocate 8000000000 bytes",
    ),
    "object array state shorter than its shape (numpy reads past it)": (
        lambda: _object_state(3, 1),
        "numpy object array of shape (3,) with 1 objects",
    ),
    "str() of a memo bomb": (
        lambda: P2 + b"cbuiltins\nstr\n" + _memo_bomb()[2:-1] + b"\x85R.",
        "str() of a dict",
    ),
    "_codecs.encode with another codec": (
        lambda: P2 + b"c_codecs\nencode\n" + _unicode("x") + _unicode("zlib") + b"\x86R.",
        "_codecs.encode with encoding 'zlib'",
    ),
    "NEWOBJ": (lambda: P2 + b"cbuiltins\nlist\n)\x81.", "pickle opcode NEWOBJ"),
    "BUILD on a list": (lambda: P2 + b"]}b.", "setting the state of a list"),
    "_reconstruct of a dict": (
        lambda: P2 + RECONSTRUCT + b"cbuiltins\ndict\nK\x00\x85C\x01b\x87R.",
        "not numpy.ndarray",
    ),
    "a list that contains itself": (_cycle, "a list that contains itself"),
    "lists nested 300 deep": (lambda: _nested(300), "nested deeper than 100"),
}

_LOADER = textwrap.dedent(
    """
    import json, resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
    from msvlad.data.safe_pickle import load_pickle
    out = {}
    for path in sys.argv[1:]:
        try:
            load_pickle(path)
            out[path] = ["loaded", ""]
        except BaseException as err:
            out[path] = [type(err).__name__, str(err)]
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def bomb_results(tmp_path_factory) -> dict[str, tuple[Path, str, str]]:
    """Every bomb loaded in one subprocess (2 GiB address space, 120 s): name -> (file, error)."""
    folder = tmp_path_factory.mktemp("bombs")
    paths = {}
    for i, (name, (build, _)) in enumerate(BOMBS.items()):
        paths[name] = folder / f"gnd_bomb{i}.pkl"
        paths[name].write_bytes(build())
    env = {**os.environ, "PYTHONPATH": str(REPO / "lib"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", _LOADER, *map(str, paths.values())],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout)
    return {name: (path, *loaded[str(path)]) for name, path in paths.items()}


@pytest.mark.parametrize("name", list(BOMBS))
def test_pickle_bomb_refused(bomb_results, name: str) -> None:
    path, kind, message = bomb_results[name]
    assert kind == "UnsafePickleError", (kind, message)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    assert BOMBS[name][1] in message, message
    assert "refused" in message
    assert path.stat().st_size < 8000  # each bomb is a few bytes to a few KB


def test_memo_bomb_is_the_issue_size() -> None:
    data = _memo_bomb()
    assert 5000 < len(data) < 8000  # "a 6 KB ground-truth pickle"
    easy = pickle.loads(data)["gnd"][0]["easy"]
    assert len(easy) * len(easy[0]) * len(easy[0][0]) == 10**9  # 7.45 GiB of int64 indices


def test_tree_size_counts_shared_references_as_copies() -> None:
    leaf = list(range(10))
    shared = [leaf, leaf, leaf]  # 1 + 3 * (1 + 10)
    assert check_tree_size(shared, 10**6, "x") == 34
    assert check_tree_size({"a": np.zeros(100), "b": (1, 2)}, 10**6, "x") == 1 + 101 + 4
    arr = np.empty(2, dtype=object)
    arr[0] = arr[1] = shared
    assert check_tree_size(arr, 10**6, "x") == 1 + 2 * 34
    with pytest.raises(UnsafePickleError, match="x: holds more than 60 elements"):
        check_tree_size([shared, shared], 60, "x")


@pytest.mark.slow  # a subprocess that imports torch: ~20 s on 2 loaded cores
def test_memo_bomb_through_evaluate_exits_2(world: World, previous: Path, tmp_path: Path) -> None:
    """The 6 KB gnd through `python -m msvlad evaluate` (a subprocess with a memory cap and a
    timeout: the unguarded loader hangs in dataclasses.asdict): exit 2, earlier output intact."""
    case = _case(world, previous, tmp_path)
    case.gnd.write_bytes(_memo_bomb())
    before = snapshot(case.out)
    env = {**os.environ, "PYTHONPATH": str(REPO / "lib"), "OMP_NUM_THREADS": "1"}
    cap = "import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30));"
    run = "sys.argv = ['msvlad', *sys.argv[1:]]; runpy.run_module('msvlad', run_name='__main__')"
    result = subprocess.run(
        [sys.executable, "-c", cap + run, *_evaluate(case)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("msvlad ")]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert_error(result.returncode, lines, "evaluate", "gnd_test.pkl", "elements")
    assert snapshot(case.out) == before


@pytest.fixture(scope="module")
def replica_gnds() -> dict[str, bytes]:
    """The rehearsal's ground-truth replicas (revisitop and cirtorch formats), by file name."""
    mirror = paper_mirror(weights=False)
    return {path.rsplit("/", 1)[-1]: data for path, data in mirror.files.items() if "gnd_" in path}


def test_replica_ground_truths_still_load(replica_gnds: dict[str, bytes], tmp_path: Path) -> None:
    assert sorted(replica_gnds) == [
        "gnd_oxford5k.pkl",
        "gnd_paris6k.pkl",
        "gnd_roxford5k.pkl",
        "gnd_rparis6k.pkl",
    ]
    for name, data in replica_gnds.items():
        (tmp_path / name).write_bytes(data)
        got = load_pickle(tmp_path / name)
        want = pickle.loads(data)
        assert got["imlist"] == want["imlist"] and got["qimlist"] == want["qimlist"], name
        for g, w in zip(got["gnd"], want["gnd"], strict=True):
            assert g.keys() == w.keys()
            for key in g:
                assert np.array_equal(np.asarray(g[key]), np.asarray(w[key])), (name, key)
        _, _, _, protocol = validate_gnd(got, name)
        assert protocol == ("revisited" if name.startswith("gnd_r") else "classic")


def test_paper_scale_pickles_stay_within_budget(tmp_path: Path) -> None:
    """A revisitop-format gnd of ROxf's size and an SfM-120k-like db load, with headroom."""
    rng = np.random.default_rng(0)
    imlist = [f"oxc1_{i:06d}" for i in range(4993)]
    gnd = []
    for _ in range(70):
        idx = rng.permutation(4993)[:300]
        gnd.append(
            {
                "easy": np.sort(idx[:100]),
                "hard": np.sort(idx[100:200]),
                "junk": np.sort(idx[200:]),
                "bbx": np.array([10.0, 20.0, 300.0, 400.0]),
            }
        )
    cfg = {"imlist": imlist, "qimlist": [f"q{i}" for i in range(70)], "gnd": gnd}
    cids = [hashlib.md5(str(i).encode()).hexdigest() for i in range(20000)]
    db = {"train": {"cids": cids, "cluster": np.arange(20000) // 7, "qidxs": list(range(5000))}}
    for name, obj in (("gnd_big.pkl", cfg), ("db.pkl", db)):
        for protocol in (2, 4, 5):
            data = pickle.dumps(obj, protocol=protocol)
            (tmp_path / name).write_bytes(data)
            loaded = load_pickle(tmp_path / name)
            assert check_tree_size(loaded, load_budget(len(data)), name) < len(data)
    imlist_, _, gnd_, _ = validate_gnd(load_pickle(tmp_path / "gnd_big.pkl"), "gnd_big.pkl")
    assert imlist_ == imlist and np.array_equal(gnd_[69]["junk"], gnd[69]["junk"])


# ----------------------------------------------------------------------------- ground truths


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return make_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def previous(world: World) -> Path:
    """A successful evaluation: what every failing run must leave as it was."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    out = world.root / "previous"
    try:
        argv = ["evaluate", *world.args("--checkpoint", str(world.model), "--out", str(out))]
        assert main(argv) == 0
    finally:
        torch.set_num_threads(old)
    return out


def _case(world: World, previous: Path, tmp_path: Path) -> World:
    """A private copy of the world's data and model, and of the previous output as out/."""
    import shutil

    shutil.copytree(world.data, tmp_path / "data")
    shutil.copy(world.model, tmp_path / "model.pt")
    shutil.copytree(previous, tmp_path / "out")
    return World(tmp_path, tmp_path / "data", world.params, tmp_path / "model.pt")


def _evaluate(w: World) -> list[str]:
    return [
        "evaluate",
        *w.args("--checkpoint", str(w.model), "--data-root", str(w.data), "--out", str(w.out)),
    ]


def _with(cfg: dict, query: int = 0, **lists) -> dict:
    gnd = [dict(g) for g in cfg["gnd"]]
    gnd[query].update(lists)
    return {**cfg, "gnd": gnd}


def _renamed(key: str, i: int, name: str) -> Callable[[dict], dict]:
    def mutate(cfg: dict) -> dict:
        names = list(cfg[key])
        names[i] = name
        return {**cfg, key: names}

    return mutate


# the world's test set: q0..q2; database s{scene}_{k}; query s: easy [3s], hard [3s+1, 3s+2]
GROUND_TRUTHS: dict[str, tuple[Callable[[dict], dict], list[str]]] = {
    "a positive listed three times": (
        lambda c: _with(c, easy=[0, 0, 0]),
        ["query 0 (q0) 'easy'", "index 0 listed 3 times"],
    ),
    "one image both easy and hard": (
        lambda c: _with(c, 1, hard=[3, 4, 5]),
        ["query 1 (q1)", "index 3 (s1_0) is in both 'easy' and 'hard'"],
    ),
    "a positive also listed as junk": (
        lambda c: _with(c, 2, junk=[7]),
        ["query 2 (q2)", "index 7 (s2_1) is in both 'hard' and 'junk'"],
    ),
    "a name twice in imlist": (
        _renamed("imlist", 4, "s0_0"),
        ["imlist[4]", "'s0_0' is listed twice (also at [0])"],
    ),
    "a name twice in qimlist": (
        _renamed("qimlist", 2, "q0"),
        ["qimlist[2]", "'q0' is listed twice"],
    ),
    "easy given as a boolean mask": (
        lambda c: _with(c, easy=np.arange(9) == 0),
        ["query 0 (q0) 'easy'", "a boolean mask of 9 values"],
    ),
    "easy given as a list of booleans": (
        lambda c: _with(c, easy=[True] + [False] * 8),
        ["query 0 (q0) 'easy'", "holds booleans"],
    ),
    "an index out of range": (
        lambda c: _with(c, 1, junk=[9]),
        ["query 1 (q1) 'junk'", "index 9 out of range [0, 9)"],
    ),
    "a negative index": (
        lambda c: _with(c, 1, hard=[-1]),
        ["query 1 (q1) 'hard'", "index -1 out of range"],
    ),
    "a database name that leaves jpg/ with '..'": (
        _renamed("imlist", 0, "../../model"),
        ["imlist[0]", "'../../model' leaves or re-enters its folder"],
    ),
    "a database name that re-enters jpg/": (
        _renamed("imlist", 0, "sub/../s0_0"),
        ["imlist[0]", "leaves or re-enters"],
    ),
    "an absolute database name": (
        _renamed("imlist", 0, "/etc/hostname"),
        ["imlist[0]", "'/etc/hostname' is an absolute path"],
    ),
    "a query name with backslashes": (
        _renamed("qimlist", 1, "..\\..\\q1"),
        ["qimlist[1]", "is not a plain file name"],
    ),
    "a query name with a newline": (
        _renamed("qimlist", 1, "q1\n"),
        ["qimlist[1]", "'q1\\n' is not a plain file name"],
    ),
}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", list(GROUND_TRUTHS))
def test_bad_ground_truth_through_evaluate(
    world: World, previous: Path, tmp_path: Path, capsys, name: str
) -> None:
    case = _case(world, previous, tmp_path)
    mutate, named = GROUND_TRUTHS[name]
    with case.gnd.open("rb") as fh:
        cfg = pickle.load(fh)
    case.gnd.write_bytes(pkl_bytes(mutate(cfg)))
    before = snapshot(case.out)
    code, lines = run_cli(_evaluate(case), capsys)
    assert_error(code, lines, "evaluate", "gnd_test.pkl", *named)
    assert snapshot(case.out) == before


def test_classic_and_holidays_lists_are_checked_too() -> None:
    classic = {
        "imlist": ["a", "b", "c"],
        "qimlist": ["a"],
        "gnd": [{"ok": [1, 2], "junk": [2], "bbx": [0, 0, 5, 5]}],
    }
    with pytest.raises(InputError) as err:
        validate_gnd(classic, "gnd_c.pkl")
    one_line(err, "gnd_c.pkl: query 0 (a): index 2 (c) is in both 'ok' and 'junk'")
    holidays = {
        "imlist": ["100000", "100001", "100002"],
        "qimlist": ["100000"],
        "gnd": [{"ok": [1, 2, 1], "query_db_index": 0}],
    }
    with pytest.raises(InputError) as err:
        validate_gnd(holidays, "gnd_h.pkl")
    one_line(err, "gnd_h.pkl: query 0 (100000) 'ok': index 1 listed 2 times")


def _revisitop_compute_ap(ranks, nres):  # noqa: ANN001, ANN202 - a line-by-line port
    """revisitop python/dataset.py... compute_ap, as published (loop and all)."""
    nimgranks = len(ranks)
    ap = 0
    recall_step = 1.0 / nres
    for j in np.arange(nimgranks):
        rank = ranks[j]
        if rank == 0:
            precision_0 = 1.0
        else:
            precision_0 = float(j) / rank
        precision_1 = float(j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) * recall_step / 2.0
    return ap


def _revisitop_compute_map(ranks, gnd):  # noqa: ANN001, ANN202 - a line-by-line port
    """revisitop python/evaluate.py compute_map (without P@k), as published."""
    map = 0.0  # noqa: A001 - the published name
    nq = len(gnd)
    aps = np.zeros(nq)
    nempty = 0
    for i in np.arange(nq):
        qgnd = np.array(gnd[i]["ok"])
        if qgnd.shape[0] == 0:
            aps[i] = float("nan")
            nempty += 1
            continue
        try:
            qgndj = np.array(gnd[i]["junk"])
        except KeyError:
            qgndj = np.empty(0)
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgnd)]
        junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgndj)]
        k = 0
        ij = 0
        if len(junk):
            ip = 0
            while ip < len(pos):
                while ij < len(junk) and pos[ip] > junk[ij]:
                    k += 1
                    ij += 1
                pos[ip] = pos[ip] - k
                ip += 1
        ap = _revisitop_compute_ap(pos, len(qgnd))
        map = map + ap  # noqa: A001
        aps[i] = ap
    map = map / (nq - nempty)  # noqa: A001
    return map, aps


def test_overlaps_and_repeats_have_no_revisitop_meaning() -> None:
    """Why they are refused rather than given a rule: revisitop's own compute_map (ported line by
    line) scores an image that is both positive and junk above 1, and divides by every repeat."""
    from msvlad.evaluation.protocol import compute_map

    ranks = np.array([[0], [1], [2], [3]])  # the query ranks image 0 first, then 1, 2, 3
    overlap = [{"ok": np.array([0, 1]), "junk": np.array([0])}]  # image 0 positive AND junk
    repeat = [{"ok": np.array([1, 1, 1]), "junk": np.array([], dtype=np.int64)}]
    clean = [{"ok": np.array([1, 3]), "junk": np.array([2])}]
    assert _revisitop_compute_map(ranks, overlap)[0] == pytest.approx(1.25)  # AP > 1
    once = [{"ok": np.array([1]), "junk": np.array([], dtype=np.int64)}]
    assert _revisitop_compute_map(ranks, once)[0] == pytest.approx(0.25)  # image 1 ranks second
    assert _revisitop_compute_map(ranks, repeat)[0] == pytest.approx(0.25 / 3)
    # junk-wins would give AP 1 (image 1 first once 0 is removed), positive-wins AP 1 too
    assert _revisitop_compute_map(ranks, [{"ok": [1], "junk": [0]}])[0] == pytest.approx(1.0)
    assert _revisitop_compute_map(ranks, [{"ok": [0, 1], "junk": []}])[0] == pytest.approx(1.0)
    # msvlad's compute_map is revisitop's to the bit, overlap included
    for gnd in (overlap, repeat, clean):
        assert compute_map(ranks, gnd)[0] == _revisitop_compute_map(ranks, gnd)[0]
    base = {"imlist": ["a", "b", "c", "d"], "qimlist": ["q"]}
    for easy, hard, junk, says in (
        ([0], [1], [0], "index 0 (a) is in both 'easy' and 'junk'"),
        ([1, 1, 1], [], [], "'easy': index 1 listed 3 times"),
    ):
        cfg = {**base, "gnd": [{"easy": easy, "hard": hard, "junk": junk, "bbx": [0, 0, 2, 2]}]}
        with pytest.raises(InputError) as err:
            validate_gnd(cfg, "gnd_x.pkl")
        one_line(err, "gnd_x.pkl: query 0 (q)", says)
    good = {**base, "gnd": [{"easy": [1], "hard": [3], "junk": [2], "bbx": [0, 0, 2, 2]}]}
    validate_gnd(good, "gnd_x.pkl")


# ----------------------------------------------------------------------------- rotation lists

ROTATIONS = {
    "invalid JSON": (b'{"100001": 90,', "not valid JSON"),
    "not UTF-8": (b'{"100001": 90, "\xff\xfe": 180}', "not UTF-8 text (byte 16)"),
    "a JSON list": (b'[["100001", 90]]', "expected a JSON object"),
    "a name given twice": (b'{"100001": 90, "100001.jpg": 180}', "100001.jpg: image listed twice"),
    "a name with a folder": (b'{"../100001": 90}', "'../100001' holds a '/'"),
    "infinite degrees": (b'{"100001": 1e999}', "rotation inf is not a number"),
    "degrees not a multiple of 90": (b'{"100001": 45}', "not a multiple of 90"),
}


@pytest.mark.parametrize("name", list(ROTATIONS))
def test_bad_rotations_json_in_a_dataset(tmp_path: Path, name: str) -> None:
    content, says = ROTATIONS[name]
    root = make_retrieval_set(tmp_path, "hol")
    (root / "rotations.json").write_bytes(content)
    before = snapshot(tmp_path)
    with pytest.raises(InputError) as err:
        load_dataset(tmp_path, "hol")
    one_line(err, str(root / "rotations.json"), says)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "suffix,content,says",
    [
        (".json", b"{nope", "not valid JSON"),
        (".json", b"\xff\xfe{}", "not UTF-8 text"),
        (".yaml", b"100001.jpg: [90\n", "not valid YAML"),
        (".yaml", b"100001.jpg: 90\n100001.jpg: 180\n", "100001.jpg: duplicate key"),
        (".txt", b"100001.jpg 90\n\xff 180\n", "not UTF-8 text"),
    ],
)
def test_bad_holidays_rotations_through_prepare(
    tmp_path: Path, capsys, suffix: str, content: bytes, says: str
) -> None:
    """prepare.holidays_rotations is read before any download: one line naming it, exit 2."""
    rot = tmp_path / f"rot{suffix}"
    rot.write_bytes(content)
    data = tmp_path / "data"
    with FileServer() as server:
        code, lines = run_cli(
            [
                "prepare",
                "--params",
                str(REPO / "params.paper.yaml"),
                *("--set", f"data.root={data}", "--set", f"data.mirror={server.base_url}"),
                *("--set", f"prepare.holidays_rotations={rot}"),
            ],
            capsys,
        )
        assert server.requests == []
    assert_error(code, lines, "prepare", str(rot), says)
    with pytest.raises(InputError):
        read_rotations(rot)


# ----------------------------------------------------------------------------- other listings


def test_bad_distractor_listing(tmp_path: Path) -> None:
    root = tmp_path / "r1m"
    (root / "jpg" / "0").mkdir(parents=True)
    (root / "jpg" / "0" / "a.jpg").write_bytes(random_jpeg(0))
    for content, says in (
        (b"0/a.jpg\n\xff\n", "not UTF-8 text (byte 8)"),
        (b"0/a.jpg\n../../outside.jpg\n", "r1m.txt:2: '../../outside.jpg' leaves"),
        (b"0/a.jpg\n/etc/hostname\n", "r1m.txt:2: '/etc/hostname' is an absolute path"),
        (b"0/a.jpg\n0/a.jpg\n", "r1m.txt:2: '0/a.jpg' is listed twice (also line 1)"),
    ):
        (root / "r1m.txt").write_bytes(content)
        with pytest.raises(InputError) as err:
            load_distractors(tmp_path, "r1m")
        one_line(err, str(root / "r1m.txt"), says)


def test_bad_gldv2_csv(tmp_path: Path) -> None:
    images = tmp_path / "images"
    for i in ("abc0", "abc1"):
        (images / "a" / "b" / "c").mkdir(parents=True, exist_ok=True)
        (images / "a" / "b" / "c" / f"{i}.jpg").write_bytes(random_jpeg(0))
    csv = tmp_path / "train_clean.csv"
    out = tmp_path / "data" / "gldv2_clean"
    for content, says in (
        (b"landmark_id,images\n1,abc0 abc1\n\xff,abc0\n", "not UTF-8 text"),
        (b"landmark_id,images\n../../escape,abc0 abc1\n", ":2: landmark_id: '../../escape'"),
        (b"landmark_id,images\n1,abc0 abc1\n2,abc1\n", ":3: image abc1 is listed twice"),
    ):
        csv.write_bytes(content)
        with pytest.raises(InputError) as err:
            build_gldv2_clean(csv, images, out, min_images_per_class=1)
        one_line(err, str(csv), says)
        assert not (tmp_path / "data").exists() and not (tmp_path / "escape").exists()


def test_bad_sfm120k_db(tmp_path: Path) -> None:
    ims = tmp_path / "ims"
    out = tmp_path / "data" / "sfm120k"
    for cids, says in (
        (["aa0000000001", "../../../../escape"], "cids[1]: '../../../../escape' holds a '/'"),
        (["aa0000000001", 7], "cids[1]: expected an image id string, got int"),
        (["aa0000000001", "aa0000000001"], "cids[1]: 'aa0000000001' is listed twice"),
    ):
        (tmp_path / "db.pkl").write_bytes(pkl_bytes({"train": {"cids": cids, "cluster": [0, 0]}}))
        with pytest.raises(InputError) as err:
            build_sfm120k(tmp_path / "db.pkl", ims, out)
        one_line(err, str(tmp_path / "db.pkl"), says)
        assert not (tmp_path / "data").exists() and not (tmp_path / "escape").exists()


def test_bad_md5_and_checksum_files(tmp_path: Path) -> None:
    from msvlad.data.download import ChecksumRegistry
    from msvlad.data.official import _parse_md5_file

    md5 = tmp_path / "md5.images_000.txt"
    md5.write_bytes(b"\xff\xfe  images_000.tar\n")
    with pytest.raises(InputError) as err:
        _parse_md5_file(md5, "images_000.tar")
    one_line(err, str(md5), "not UTF-8 text")
    sums = tmp_path / "checksums.json"
    sums.write_text('["not", "an", "object"]')
    with pytest.raises(InputError) as err:
        ChecksumRegistry(sums).get("x")
    one_line(err, str(sums), "expected a JSON object")


def test_archive_with_tar_bytes_replicas_still_extracts(tmp_path: Path) -> None:
    """The replicas' archives (files in folders) extract as before, file for file."""
    members = {"paris/louvre/a.jpg": random_jpeg(1), "paris/b.jpg": random_jpeg(2), "c.jpg": b"c"}
    archive = tmp_path / "ok.tgz"
    archive.write_bytes(tar_bytes(members))
    with tarfile.open(archive) as tar:
        mtime = tar.getmember("c.jpg").mtime
    out = extract_archive(archive, tmp_path / "out")
    got = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert got == members
    assert (out / "c.jpg").stat().st_mtime == mtime
    info = tar_member("d.jpg")
    info.mtime = 10**20  # a time stamp no file system holds: the file is extracted all the same
    archive.write_bytes(tar_of([(info, b"d")], gz=False))
    assert (extract_archive(archive, tmp_path / "out2") / "d.jpg").read_bytes() == b"d"


# ----------------------------------------------------------------------------- full disks


def test_full_disk_during_download_names_the_file(tmp_path: Path) -> None:
    """A write that fails (here /dev/full: ENOSPC) names the file, not a failed fetch."""
    import errno

    from msvlad.cli import _os_error
    from msvlad.data.download import download_file, part_path

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    dest = tmp_path / "file.bin"
    part_path(dest).symlink_to("/dev/full")
    with FileServer({"/f.bin": b"x" * 5000}) as server, pytest.raises(OSError) as err:
        download_file(server.url("/f.bin"), dest)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(part_path(dest))
    assert _os_error(err.value) == f"{part_path(dest)}: No space left on device"
    assert not dest.exists()


def test_full_disk_during_extraction_names_the_file(tmp_path: Path, monkeypatch) -> None:
    import errno

    from msvlad.data import download

    class Full(io.RawIOBase):
        def __init__(self, fd: int, mode: str) -> None:
            os.close(fd)

        def writable(self) -> bool:
            return True

        def write(self, data) -> int:  # noqa: ANN001 - io signature
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(download.os, "fdopen", Full)
    archive = tmp_path / "a.tar"
    archive.write_bytes(tar_bytes({"jpg/a.jpg": random_jpeg(0)}, gz=False))
    with pytest.raises(OSError) as err:
        extract_archive(archive, tmp_path / "out")
    assert err.value.errno == errno.ENOSPC
    assert err.value.filename.endswith(os.path.join("jpg", "a.jpg"))
    assert not (tmp_path / "out").exists() and sorted(os.listdir(tmp_path)) == ["a.tar"]


def test_holidays_archive_with_a_foreign_name_names_the_archives(tmp_path: Path) -> None:
    from msvlad.data.catalog import HOLIDAYS_IMAGES

    files = {
        "/" + url_key(HOLIDAYS_IMAGES[0]): tar_bytes({"jpg/100000.jpg": random_jpeg(0)}),
        "/" + url_key(HOLIDAYS_IMAGES[1]): tar_bytes({"jpg/holiday.jpg": random_jpeg(1)}),
    }
    with FileServer(files) as server, pytest.raises(InputError) as err:
        prepare_dataset("holidays", tmp_path / "data", mirror=server.base_url)
    one_line(err, "jpg1.tar.gz + ", "jpg2.tar.gz: ", "'holiday' is not a 6-digit Holidays image")
    assert not (tmp_path / "data" / "holidays").exists()
