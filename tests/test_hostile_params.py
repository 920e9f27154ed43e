"""Hostile params through the command line: exit 2, one line naming the file and the key, no output.

Each case writes a params file (or passes `--set`) the way a careless or hostile user would and
runs `msvlad.cli.main` in process on the tiny world of `badinputs`: the status must be 2, stderr
exactly one `msvlad <command>: error: ...` line without a traceback that names the file and the
key, and nothing may be written (the command's output is absent, the world unchanged). Then the
config's ranges are checked against the components that take the same values (miners, pool,
poolings, alpha-QE/DBA, whitening): one statement each, so the two refuse the same values with
the same message. Last, adding a miner setting: a test-local miner with one more key.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from badinputs import World, make_world, snapshot
from msvlad.cli import main
from msvlad.config import (
    RANGES,
    ConfigError,
    MinerConfig,
    Params,
    load_params,
    load_yaml,
    with_overrides,
)
from msvlad.data.testsets import read_rotations
from msvlad.evaluation.search import alpha_dba, alpha_qe
from msvlad.mining.base import TripletMiner, setting
from msvlad.mining.baselines import SemiHardMiner
from msvlad.mining.difficulty import DifficultyMiner
from msvlad.mining.pool import ClassBalancedPool
from msvlad.mining.registry import MINERS, build_miner, miner_from_config
from msvlad.nn import functional as LF
from msvlad.nn.pooling import GeM, NetVLAD

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return make_world(tmp_path_factory.mktemp("world"))


def run_cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    """Exit status and the `msvlad ...` lines of stderr (no traceback allowed)."""
    code = main(argv)
    err = capsys.readouterr().err.replace("\r", "\n")
    assert "Traceback" not in err
    return code, [line for line in err.splitlines() if line.startswith("msvlad ")]


def assert_error(code: int, lines: list[str], command: str, *named: str) -> None:
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"msvlad {command}: error: "), lines[0]
    for name in named:
        assert name in lines[0], (name, lines[0])


def _argv(command: str, w: World, params: Path, out: Path, *extra: str) -> list[str]:
    """A command of the world with its output under `out` (absent before and after a refusal)."""
    tail = {
        "evaluate": ["--checkpoint", str(w.model), "--data-root", str(w.data), "--out", str(out)],
        "train": ["--init", str(w.model), "--out", str(out)],
        "cluster": ["--out", str(out / "init.pt")],
        "whiten": ["--checkpoint", str(w.model), "--out", str(out / "model.pt")],
    }[command]
    return [command, "--params", str(params), *tail, *extra]


def _refused(w: World, tmp_path: Path, capsys, command: str, params: Path, *args: str) -> str:
    """Run a command that must be refused; return its one error line. Nothing may be written."""
    out = tmp_path / "out"
    before = snapshot(w.root)
    code, lines = run_cli(_argv(command, w, params, out, *args), capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"msvlad {command}: error: "), lines[0]
    assert not out.exists()
    assert snapshot(w.root) == before
    return lines[0]


def _raw(w: World) -> dict[str, Any]:
    return yaml.safe_load(w.params.read_text())


def _write(tmp_path: Path, text: str | bytes, name: str = "hostile.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _with_row(w: World, row: str) -> str:
    """The world's params with `row` (YAML text, indented under methods:) as an extra row."""
    text = yaml.safe_dump(_raw(w), sort_keys=False)
    assert "\nmethods:\n" in text
    return text.replace("\nmethods:\n", "\nmethods:\n" + row, 1)


# ----------------------------------------------------------------------------- params files

LAUGHS = "".join(
    f"      l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9) if i else ', '.join(['lol'] * 9)}]\n"
    for i in range(10)
)


def _laughs(w: World) -> str:
    """A 'billion laughs' row: 10 levels of 9 aliases each, 9**10 strings once expanded."""
    return _with_row(w, f"  bomb:\n    label: bomb\n    pooling: msvlad\n    set:\n{LAUGHS}")


DUPLICATE = "  image_size: 64\n  image_size: 999\n"  # the probe's: 999 was used silently

FILES: dict[str, tuple[Callable[[World], str | bytes], str, list[str]]] = {
    # name: (params text from the world, command, what the line must name besides the file)
    "a YAML list": (lambda w: "- base\n- model\n", "evaluate", ["top level", "mapping"]),
    "not UTF-8": (
        lambda w: w.params.read_bytes().replace(b"profile: mini", b"profile: mini\xff"),
        "train",
        ["not UTF-8", "0xff"],
    ),
    "model: 5": (
        lambda w: yaml.safe_dump({**_raw(w), "model": 5}),
        "cluster",
        ["model: expected a mapping"],
    ),
    "a duplicate key": (
        lambda w: w.params.read_text().replace(
            "  image_size: 64\n", "  image_size: 64\n  image_size: 999\n"
        ),
        "evaluate",
        ["model.image_size", "duplicate key"],
    ),
    "a duplicate key in a row's set": (
        lambda w: _with_row(
            w,
            "  dup:\n    label: dup\n    pooling: msvlad\n"
            "    set:\n      miner.delta: 0.1\n      miner.delta: 0.2\n",
        ),
        "train",
        ["methods.dup.set.miner.delta", "duplicate key"],
    ),
    "billion laughs in a row": (_laughs, "evaluate", ["alias *l0", "not allowed"]),
    "deep nesting": (
        lambda w: _with_row(
            w, "  deep:\n    label: " + "[" * 200 + "]" * 200 + "\n    pooling: msvlad\n"
        ),
        "evaluate",
        ["nested deeper than 32"],
    ),
    "a 5000-digit seed": (
        lambda w: w.params.read_text().replace("  seed: 0\n", "  seed: " + "9" * 5000 + "\n"),
        "train",
        ["integer of 5000 characters (at most 40)"],
    ),
    "over 1 MiB": (
        lambda w: w.params.read_text() + "# " + "x" * (1 << 20) + "\n",
        "evaluate",
        ["larger than 1048576 bytes"],
    ),
    "a row with a bad value, not the one run": (
        lambda w: _with_row(
            w, "  zero:\n    label: zero\n    pooling: msvlad\n    set: {miner.delta: 0}\n"
        ),
        "evaluate",
        ["methods.zero.set", "miner.delta: 0.0 must be > 0"],
    ),
    "a seed of 2**32": (
        lambda w: w.params.read_text().replace("  seed: 0\n", "  seed: 4294967296\n"),
        "cluster",
        ["base.seed: 4294967296 must be in [0, 4294967295]"],
    ),
}


@pytest.mark.parametrize("name", list(FILES))
def test_hostile_params_file(world: World, tmp_path: Path, capsys, name: str) -> None:
    make, command, named = FILES[name]
    params = _write(tmp_path, make(world))
    line = _refused(world, tmp_path, capsys, command, params)
    for part in [str(params), *named]:
        assert part in line, (part, line)


def test_the_laughs_are_valid_yaml_a_plain_reader_takes(world: World) -> None:
    """yaml.safe_load takes the bomb (9 shared references per level, 9**10 strings to walk)."""
    row = yaml.safe_load(_laughs(world))["methods"]["bomb"]["set"]
    assert len(row["l9"]) == 9 and row["l9"][0] is row["l9"][8] is row["l8"]
    assert len(_laughs(world).encode()) < len(world.params.read_bytes()) + 4096


def test_duplicate_key_names_its_line(world: World, tmp_path: Path, capsys) -> None:
    text = FILES["a duplicate key"][0](world)
    second = text.splitlines().index("  image_size: 999") + 1
    params = _write(tmp_path, text)
    line = _refused(world, tmp_path, capsys, "evaluate", params)
    assert (
        f"{params}:{second}: model.image_size: duplicate key (first given at line {second - 1})"
        in line
    )


def test_model_5_with_a_set_of_that_section(world: World, tmp_path: Path, capsys) -> None:
    params = _write(tmp_path, yaml.safe_dump({**_raw(world), "model": 5}))
    line = _refused(world, tmp_path, capsys, "evaluate", params, "--set", "model.image_size=64")
    assert f"{params}: model: expected a mapping, got int" in line
    params = _write(tmp_path, "- base\n- model\n")
    line = _refused(world, tmp_path, capsys, "train", params, "--set", "model.image_size=64")
    assert f"{params}: top level: expected a mapping, got list" in line


# ----------------------------------------------------------------------------- --set values

SETS: dict[str, tuple[str, list[str], list[str]]] = {
    # name: (command, --set arguments, what the line must name)
    "seed >= 2**32": ("train", ["base.seed=4294967296"], ["base.seed", "4294967295"]),
    "num_clusters 10**9": ("cluster", ["model.num_clusters=1000000000"], ["model.num_clusters"]),
    "image_size 10**6": ("cluster", ["model.image_size=1000000"], ["model.image_size"]),
    "miner.delta=0": ("train", ["miner.delta=0"], ["miner.delta: 0.0 must be > 0"]),
    "miner.margin=0": ("train", ["miner.margin=0"], ["miner.margin: 0.0 must be > 0"]),
    "threshold 10**9": ("train", ["miner.threshold=1000000000"], ["miner.threshold"]),
    "pool_size 10**9": ("train", ["miner.pool_size=1000000000"], ["miner.pool_size"]),
    "rolling pool frozen": (
        "train",
        ["miner.pool_draw=rolling", "miner.refresh_fraction=0"],
        ["miner.refresh_fraction", "miner.pool_draw rolling"],
    ),
    "fewer locals than centroids": (
        "cluster",
        ["cluster.max_locals=3"],
        ["cluster.max_locals: 3 must be >= model.num_clusters 4"],
    ),
    "pool window 10**6": ("cluster", ["model.pool_sizes=[2, 1000000]"], ["model.pool_sizes"]),
    "scale 100": ("evaluate", ["extract.scales=[100.0]"], ["extract.scales"]),
    "batch 10**9": ("whiten", ["whiten.batch_size=1000000000"], ["whiten.batch_size"]),
    "qe_k 10**9": ("evaluate", ["evaluate.qe_k=1000000000"], ["evaluate.qe_k"]),
    "workers 10**6": ("evaluate", ["base.num_workers=1000000"], ["base.num_workers"]),
    "epochs 10**9": ("train", ["train.epochs=1000000000"], ["train.epochs"]),
    "an alias": ("evaluate", ["extract.scales=[&s 1.0, *s]"], ["--set extract.scales", "alias"]),
    "a duplicate key": (
        "train",
        ["methods.x={label: a, label: b}"],
        ["--set methods.x: label: duplicate key (given twice)"],
    ),
}


@pytest.mark.parametrize("name", list(SETS))
def test_hostile_set(world: World, tmp_path: Path, capsys, name: str) -> None:
    command, sets, named = SETS[name]
    args = [a for s in sets for a in ("--set", s)]
    line = _refused(world, tmp_path, capsys, command, world.params, *args)
    if not any(n.startswith("--set") for n in named):
        named = [str(world.params), *named]
    for part in named:
        assert part in line, (part, line)


# ----------------------------------------------------------------------------- evaluate time


@pytest.mark.parametrize(
    ("key", "value", "most"), [("qe_k", 10, 9), ("dba_k", 9, 8), ("dba_k", 100, 8)]
)
def test_neighbours_beyond_the_database(
    world: World, tmp_path: Path, capsys, key: str, value: int, most: int
) -> None:
    """The test set has 9 database images: alpha-QE takes at most 9, alpha-DBA 8 (self left out)."""
    line = _refused(
        world, tmp_path, capsys, "evaluate", world.params, "--set", f"evaluate.{key}={value}"
    )
    assert f"evaluate.{key}: {value} neighbours, but the 9 database images" in line
    assert f"{world.data / 'test'} give at most {most}" in line


def test_neighbours_of_a_variant_not_asked_for_are_not_checked(
    world: World, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    argv = _argv("evaluate", world, world.params, out, "--set", "evaluate.qe_k=10")
    assert main([*argv, "--variants", "plain,dba"]) == 0
    assert (out / "metrics.json").is_file()


# ----------------------------------------------------------------------------- the YAML reader


def test_committed_params_read_alike_strict_and_safe() -> None:
    """params.yaml and params.paper.yaml use no alias and no duplicate: the strict reader gives
    what yaml.safe_load gives (and DVC, which reads them with its own parser)."""
    for name in ("params.yaml", "params.paper.yaml"):
        text = (REPO / name).read_text()
        assert load_yaml(text, name) == yaml.safe_load(text)
        load_params(REPO / name)


def test_rotation_list_in_yaml_is_read_strictly(tmp_path: Path) -> None:
    rot = _write(tmp_path, "a.jpg: 90\nb.jpg: &r 180\nc.jpg: *r\n", "rot.yaml")
    with pytest.raises(ConfigError, match=r"rot.yaml:3: YAML alias \*r: anchors and aliases"):
        read_rotations(rot)
    rot = _write(tmp_path, "a.jpg: 90\na.jpg: 180\n", "rot.yaml")
    with pytest.raises(ConfigError, match=r"rot.yaml:2: a.jpg: duplicate key"):
        read_rotations(rot)
    assert read_rotations(_write(tmp_path, "a.jpg: 90\nb.jpg: 180\n", "rot.yaml")) == {
        "a": 90,
        "b": 180,
    }


# ----------------------------------------------------------------------------- one statement


def _outside(key: str) -> list[Any]:
    """Values just outside RANGES[key], from the range itself, and one of a wrong type."""
    r = RANGES[key]
    section, _, name = key.partition(".")
    default = getattr(getattr(Params(), section), name)
    integer = isinstance(default[0] if isinstance(default, list) else default, int)
    step = 1 if integer else 0.5
    values = [r.low if r.low_open else r.low - step]
    if math.isfinite(r.high):
        values.append(r.high + step)
    return [*values, 2.5 if integer else "many"]


_DB = LF.l2n(torch.randn(12, 8, generator=torch.Generator().manual_seed(0))).numpy()
_LABELS = np.repeat(np.arange(6), 4)

# key -> the component taking it, called with one value
COMPONENTS: dict[str, Callable[[Any], Any]] = {
    "miner.margin": lambda v: SemiHardMiner(margin=v),
    "miner.triplets_per_round": lambda v: build_miner("random", triplets_per_round=v),
    "miner.delta": lambda v: DifficultyMiner(delta=v),
    "miner.threshold": lambda v: DifficultyMiner(threshold=v),
    "miner.semi_hard_prob": lambda v: DifficultyMiner(semi_hard_prob=v),
    "miner.pool_size": lambda v: ClassBalancedPool(_LABELS, v, 2, 0),
    "miner.images_per_class": lambda v: ClassBalancedPool(_LABELS, 8, v, 0),
    "miner.refresh_fraction": lambda v: ClassBalancedPool(_LABELS, 8, 2, 0, turnover=v),
    "base.seed": lambda v: ClassBalancedPool(_LABELS, 8, 2, v),
    "model.num_clusters": lambda v: NetVLAD(64, num_clusters=v, split=None),
    "model.pool_sizes": lambda v: NetVLAD(64, 4, pool_sizes=[v], split=None),
    "model.split": lambda v: NetVLAD(64, 4, split=v),
    "model.alpha": lambda v: NetVLAD(64, 4, split=None, alpha=v),
    "model.gem_p": lambda v: GeM(64, p=v),
    "evaluate.qe_k": lambda v: alpha_qe(_DB[:2], _DB, np.zeros((12, 2), np.int64), k=v),
    "evaluate.qe_alpha": lambda v: alpha_qe(_DB[:2], _DB, np.zeros((12, 2), np.int64), alpha=v),
    "evaluate.dba_k": lambda v: alpha_dba(_DB, k=v),
    "evaluate.dba_alpha": lambda v: alpha_dba(_DB, alpha=v),
    "whiten.dim": lambda v: LF.fit_pca_whitening(torch.randn(20, 8), dim=v),
    "whiten.power": lambda v: LF.fit_pca_whitening(torch.randn(20, 8), dim=4, power=v),
}
CASES = [(key, value) for key in COMPONENTS for value in _outside(key)]


@pytest.mark.parametrize(("key", "value"), CASES, ids=[f"{k}={v}" for k, v in CASES])
def test_config_and_component_refuse_alike(key: str, value: Any) -> None:
    section, _, name = key.partition(".")
    with pytest.raises(ConfigError) as from_config:
        with_overrides(Params(), **{section: {name: [value] if name == "pool_sizes" else value}})
    with pytest.raises(ConfigError) as from_component:
        COMPONENTS[key](value)
    assert str(from_config.value) == f"overrides: {from_component.value}"
    assert str(from_component.value).startswith(f"{key}")


ENDS = [
    ("miner.threshold", 1),
    ("miner.threshold", 10**6),
    ("miner.semi_hard_prob", 0.0),
    ("miner.semi_hard_prob", 1.0),
    ("miner.triplets_per_round", 10**6),
    ("miner.refresh_fraction", 0.0),
    ("base.seed", 2**32 - 1),
    ("model.pool_sizes", 128),
    ("model.num_clusters", 1),
    ("model.gem_p", 1e-6),
    ("evaluate.qe_alpha", 0.0),
    ("evaluate.qe_k", 1),
    ("whiten.power", 1e-6),
]


@pytest.mark.parametrize(("key", "value"), ENDS, ids=[f"{k}={v}" for k, v in ENDS])
def test_config_and_component_take_the_ends(key: str, value: Any) -> None:
    """The closed ends of a range are accepted by the params file and by the component."""
    section, _, name = key.partition(".")
    with_overrides(Params(), **{section: {name: [value] if name == "pool_sizes" else value}})
    COMPONENTS[key](value)


def _numeric_keys() -> dict[str, type]:
    """Every "section.key" of params.yaml whose value is a number (or a list of numbers)."""
    out = {}
    for section, cls in typing.get_type_hints(Params).items():
        if not dataclasses.is_dataclass(cls):
            continue
        for name, tp in typing.get_type_hints(cls).items():
            args = set(typing.get_args(tp)) - {type(None)} or {tp}
            if typing.get_origin(tp) is list:
                args = set(typing.get_args(tp))
            numeric = args & {int, float}
            if numeric:
                out[f"{section}.{name}"] = numeric.pop()
    return out


def test_every_numeric_key_has_a_range_and_every_integer_a_ceiling() -> None:
    keys = _numeric_keys()
    assert {"base.seed", "model.num_clusters", "evaluate.qe_k", "extract.scales"} <= set(keys)
    assert set(keys) == set(RANGES)
    unbounded = [k for k, tp in keys.items() if tp is int and not math.isfinite(RANGES[k].high)]
    assert not unbounded
    assert RANGES["base.seed"].high == 2**32 - 1  # numpy.random.seed's limit
    for key in keys:  # the defaults lie inside every range
        section, _, name = key.partition(".")
        value = getattr(getattr(Params(), section), name)
        for v in value if isinstance(value, list) else [value]:
            assert v is None or v in RANGES[key], key


def test_every_checked_component_key_has_a_range() -> None:
    assert set(COMPONENTS) <= set(RANGES)
    miner_keys = {k for k in RANGES if k.startswith("miner.")}
    taken = {f"miner.{k}" for cls in MINERS.values() for k in cls.settings()}
    # every numeric miner key a miner takes is checked above through a miner
    assert taken & miner_keys <= set(COMPONENTS)


# ----------------------------------------------------------------------------- miners from config


@pytest.mark.parametrize("name", sorted(MINERS))
def test_miner_from_config_is_the_explicit_miner(name: str) -> None:
    """`from_config` gives the miner the trainer built key by key before, mining the same."""
    config = dataclasses.replace(
        MinerConfig(), name=name, margin=0.2, delta=0.3, threshold=7, triplets_per_round=9
    )
    built = miner_from_config(config, seed=5)
    explicit = build_miner(
        name,
        margin=0.2,
        delta=0.3,
        threshold=7,
        semi_hard_prob=0.5,
        triplets_per_round=9,
        seed=5,
        backend="torch",
    )
    assert type(built) is MINERS[name] and repr(built) == repr(explicit)
    x = LF.l2n(torch.randn(40, 8, generator=torch.Generator().manual_seed(1)))
    labels = torch.arange(40) % 8
    a, b = built.mine(x, labels), explicit.mine(x, labels)
    assert len(a) > 0 and torch.equal(torch.stack(a.as_tuple()), torch.stack(b.as_tuple()))


def test_each_miner_takes_only_its_own_keys() -> None:
    assert MINERS["difficulty"].settings() == (
        "margin",
        "triplets_per_round",
        "backend",
        "delta",
        "threshold",
        "semi_hard_prob",
    )
    for name in ("random", "hardest_negative", "semi_hard", "batch_hard"):
        assert MINERS[name].settings() == ("margin", "triplets_per_round", "backend")
        with pytest.raises(TypeError, match="delta"):
            MINERS[name](delta=0.1)
    for cls in MINERS.values():  # a setting's default is the params key's default
        miner = cls()
        for key in cls.settings():
            assert getattr(miner, key) == getattr(MinerConfig(), key)


class WindowedSemiHard(SemiHardMiner):
    """A test-local miner with one more setting: semi-hard, the negative ranked within
    `threshold` of the positive (the key the difficulty miner uses for its rank gap)."""

    name = "windowed_semi_hard"

    def __init__(self, *, threshold: int = MinerConfig.threshold, **common: Any) -> None:
        super().__init__(**common)
        self.threshold: int = setting("threshold", threshold)


def test_a_new_miner_setting_is_one_keyword() -> None:
    """A miner's knob: a keyword of its constructor read with `setting`. from_config passes it,
    the params file's range refuses what the miner refuses, and nothing else changes."""
    assert WindowedSemiHard.settings() == ("margin", "triplets_per_round", "backend", "threshold")
    config = dataclasses.replace(MinerConfig(), threshold=7, delta=0.3)
    miner = WindowedSemiHard.from_config(config, seed=1)
    assert isinstance(miner, TripletMiner) and miner.threshold == 7 and not hasattr(miner, "delta")
    assert "threshold=7" in repr(miner)
    for bad in (0, 10**7, 2.5):
        with pytest.raises(ConfigError) as from_config:
            with_overrides(Params(), miner={"threshold": bad})
        with pytest.raises(ConfigError) as from_miner:
            WindowedSemiHard.from_config(dataclasses.replace(MinerConfig(), threshold=bad), 1)
        assert str(from_config.value) == f"overrides: {from_miner.value}"
