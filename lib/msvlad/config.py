"""Typed configuration: one frozen dataclass per params.yaml section, validated in one place.

`params.yaml` is the offline mini profile and `params.paper.yaml` the paper profile; both have
exactly the keys declared here. A wrong key or value is a one-line error naming `file: section.key`.
Files users write are read by `load_yaml` (no aliases, no duplicate keys); every numeric key has
its range in `RANGES`, which the components taking the value check too (`check_value`).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import numbers
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from msvlad.errors import InputError

PoolingName = Literal["msvlad", "netvlad", "vlad_concat", "gem", "mac", "spoc", "rmac"]
VLAD_POOLINGS: tuple[str, ...] = ("msvlad", "netvlad", "vlad_concat")  # need k-means init
MinerName = Literal["difficulty", "random", "hardest_negative", "semi_hard", "batch_hard"]
# plain: whitened descriptors; raw: the same multi-scale descriptors before whitening; qe: alpha-QE;
# dba: alpha-DBA (both on the whitened descriptors)
VariantName = Literal["plain", "raw", "qe", "dba"]
VARIANTS: tuple[str, ...] = get_args(VariantName)
VladNorm = Literal["intra", "across_clusters"]
BiasInit = Literal["squared_norm", "norm"]
ResizeFilter = Literal["bilinear", "lanczos"]
KMeansName = Literal["faiss", "sklearn_minibatch"]
PoolClasses = Literal["with_positives", "all"]
PoolDraw = Literal["independent", "rolling"]
PoolPrecision = Literal["auto", "fp32", "fp16"]
LrSchedule = Literal["aligned", "lagged"]
NeighborBackend = Literal["torch", "faiss"]  # the miners' exact top-k (msvlad.mining.neighbors)

# The value of each option in the authors' released code (github.com/fede-vaccaro/NetVlad), which
# produced the paper's numbers; params.paper.yaml follows it, docs/method.md explains each one.
AUTHORS_CODE: dict[str, Any] = {
    "model.vlad_norm": "across_clusters",
    "model.bias_init": "norm",
    "model.resize_filter": "lanczos",
    "cluster.kmeans": "sklearn_minibatch",
    "miner.pool_classes": "all",
    "miner.pool_precision": "fp32",
    "train.amp": False,
    "train.lr_schedule": "lagged",
}


@dataclass(frozen=True)
class BaseConfig:
    """Run-wide settings."""

    profile: Literal["mini", "paper"] = "mini"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_workers: int = 0


@dataclass(frozen=True)
class DataConfig:
    """Where datasets live and which ones each stage uses."""

    root: str = "data/mini"  # datasets in revisitop layout (test/val) and class folders (train)
    assets: str = "data/assets"  # registry-shipped photos for the mini benchmark
    train_set: str = "mini-train"
    val_set: str = "mini-val"
    test_sets: list[str] = field(default_factory=lambda: ["mini-test"])
    mirror: str | None = None  # base URL overriding the official download hosts


@dataclass(frozen=True)
class PrepareConfig:
    """Dataset preparation: the mini benchmark offline, real datasets for the paper profile."""

    mini_image_max_side: int = 384
    mini_train_views: int = 12  # images per mini-train class (real photos first)
    mini_queries_per_scene: int = 8  # every real photo of a scene, then mild synthetic views
    mini_scene_views: list[int] = field(default_factory=lambda: [4, 6, 2])  # easy/hard/junk db
    mini_distractor_views: int = 6  # synthetic views per distractor photo
    gldv2_num_classes: int | None = None  # None: the whole GLDv2-clean
    gldv2_min_images: int = 2
    holidays_rotations: str | None = None  # name->degrees file for holidays_rotated


@dataclass(frozen=True)
class ModelConfig:
    """Backbone, pooling and input policy."""

    backbone: str = "efficientnet_lite0"
    pretrained: bool = True
    weights: Literal["torchvision", "cirtorch", "package"] = "package"
    # null: the weight file must carry the sha256 prefix its official name states; a full sha256:
    # the file under that name must have exactly this digest (not the official file: logged)
    weights_sha256: str | None = None
    pooling: PoolingName = "msvlad"
    pool_sizes: list[int] = field(default_factory=lambda: [2, 3])
    split: int | None = 512
    num_clusters: int = 64
    alpha: float = 30.0
    alpha_rule: Literal["fixed", "v1"] = "fixed"
    gem_p: float = 3.0
    image_size: int = 336
    resize: Literal["square", "max_side"] = "square"
    # The defaults below are the behaviour of models saved before these keys existed.
    vlad_norm: VladNorm = "intra"  # intra: L2 per cluster; across_clusters: per dim over K
    bias_init: BiasInit = "squared_norm"  # NetVLAD bias at init: -alpha |c_k|^2 or -alpha |c_k|
    resize_filter: ResizeFilter = "bilinear"  # PIL filter of every resize (train, mine, test)


@dataclass(frozen=True)
class ClusterConfig:
    """k-means initialisation of the NetVLAD centroids."""

    num_images: int = 320
    batch_size: int = 32
    max_locals: int = 600000  # locals subsampled for k-means
    niter: int = 25  # faiss iterations (sklearn_minibatch uses the authors' fixed arguments)
    kmeans: KMeansName = "faiss"


@dataclass(frozen=True)
class MinerConfig:
    """Triplet miner and its class-balanced pool."""

    name: MinerName = "difficulty"
    margin: float = 0.1
    delta: float = 0.02
    threshold: int = 20
    semi_hard_prob: float = 0.5
    triplets_per_round: int = 256
    pool_size: int = 8000
    images_per_class: int = 15
    backend: NeighborBackend = "torch"
    pool_classes: PoolClasses = "with_positives"  # all: single-image classes serve as negatives
    pool_precision: PoolPrecision = "auto"  # auto: fp16 autocast on CUDA, fp32 on the CPU
    refresh_fraction: float = 1.0  # pool share re-embedded per round (1: the paper's full refresh)
    pool_draw: PoolDraw = "independent"  # rolling: a round replaces refresh_fraction of the classes


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation: Adam, warm-up, step decay, accumulation, checkpoints."""

    lr: float = 1e-5
    lr_start: float = 1e-6
    warmup_steps: int = 2000
    decay_every: int = 48000  # steps between x gamma decays (120 epochs of 400 steps)
    gamma: float = 0.1
    lr_decay: float = 1e-6  # in-period decay 1/(1 + (step mod decay_every) * lr_decay)
    batch_triplets: int = 6
    micro_batch: int = 1  # triplets per forward; gradients accumulate over the batch
    steps_per_epoch: int = 400
    epochs: int = 241
    checkpoint_every: int = 8000
    amp: bool = True  # bf16 autocast of the training steps, only on CUDA
    val_every: int = 1  # epochs between validation mAP
    val_query_scale: float = 0.7  # validation queries at this fraction of model.image_size
    frozen_stages: int = 0  # leading backbone stages kept frozen (0 = the paper's full fine-tuning)
    lr_schedule: LrSchedule = "aligned"  # lagged: the authors' scheduler, stepped after Adam


@dataclass(frozen=True)
class WhitenConfig:
    """PCA-whitening learned on training-set descriptors after training."""

    num_images: int = 65536
    dim: int | None = 2048  # null: no whitening, the descriptor stays raw (where it would hurt)
    power: float = 0.5
    batch_size: int = 16


@dataclass(frozen=True)
class ExtractConfig:
    """Test-time descriptor extraction."""

    # The test-time input policy, independent of the training input (model.image_size/resize):
    image_size: int | None = None  # base size of the test images; null: the model's training size
    resize: Literal["square", "max_side"] | None = None  # null: the model's training policy
    scales: list[float] = field(default_factory=lambda: [1.5, 1.0, 0.6667])
    query_scale: float = 0.7  # queries are described at this fraction of the database size
    batch_size: int = 16
    float16: bool = False  # store descriptors in float16


# faiss index kinds of msvlad.evaluation.search (exact flat, or an approximate family)
IndexName = Literal["flat", "ivf", "ivfsq8", "hnsw", "ivfpq", "opq", "ivfpq_rerank"]


@dataclass(frozen=True)
class EvaluateConfig:
    """Ranking and metrics."""

    kappas: list[int] = field(default_factory=lambda: [1, 5, 10])
    index: IndexName = "flat"  # exact; R1M-scale databases: see benchmarks/README.md
    qe_k: int = 2
    qe_alpha: float = 3.0
    dba_k: int = 2
    dba_alpha: float = 3.0
    variants: list[VariantName] = field(default_factory=lambda: list(VARIANTS))
    skip_failed_queries: bool = False  # false: an unreadable query is an error naming it
    max_failed_db: float = 0.01  # larger fraction of unreadable database images: an error


@dataclass(frozen=True)
class ReportConfig:
    """Notebook reports."""

    top_k: int = 8
    num_queries: int = 6
    bootstrap: int = 2000


@dataclass(frozen=True)
class MethodConfig:
    """One row of the results table: a pooling, and a miner when the row is trained."""

    label: str
    pooling: PoolingName
    miner: MinerName | None = None  # None: off-the-shelf (k-means init only, no training)
    set: dict[str, Any] = field(default_factory=dict)  # "section.key": value, for this row only


@dataclass(frozen=True)
class Params:
    """All sections of params.yaml."""

    base: BaseConfig = field(default_factory=BaseConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    miner: MinerConfig = field(default_factory=MinerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    whiten: WhitenConfig = field(default_factory=WhitenConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    methods: dict[str, MethodConfig] = field(default_factory=dict)


class ConfigError(InputError):
    """A params file has a wrong key or value."""


# ----------------------------------------------------------------------------- reading YAML

MAX_YAML_BYTES = 1 << 20  # a params file is a few KB: anything past 1 MiB is not one
MAX_YAML_DEPTH = 32  # nesting levels (params.yaml uses 4: methods.<row>.set.<key>)
MAX_YAML_INT_DIGITS = 40  # longer integer literals are refused (a seed has 10 digits)


class _Refused(yaml.MarkedYAMLError):
    """Valid YAML that files users write never need (an alias, deep nesting, a huge integer)."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader for files users write: no aliases (so no alias-expansion bomb), bounded nesting.

    Params files never need anchors and aliases; a row of `methods:` writes its `set:` out.
    Duplicate keys are refused after composing (`_check_keys`), where the key's path is known.
    """

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        """Refuse an alias before it is resolved, and nesting deeper than MAX_YAML_DEPTH."""
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _Refused(
                None,
                None,
                f"YAML alias *{event.anchor}: anchors and aliases are not allowed (write it out)",
                event.start_mark,
            )
        if self._depth >= MAX_YAML_DEPTH:
            mark = self.peek_event().start_mark
            raise _Refused(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        """An integer literal of at most MAX_YAML_INT_DIGITS characters (not a 4300-digit error)."""
        if len(node.value) > MAX_YAML_INT_DIGITS:
            raise _Refused(
                None,
                None,
                f"an integer of {len(node.value)} characters (at most {MAX_YAML_INT_DIGITS})",
                node.start_mark,
            )
        return super().construct_yaml_int(node)


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)


def load_yaml(text: str, source: str) -> Any:
    """YAML a user wrote (params files, --set values, list files): one ConfigError if it is bad.

    Refused, naming `source`, the line and the key: invalid YAML, a duplicate key at any depth,
    an anchor/alias, nesting deeper than MAX_YAML_DEPTH, an integer of more than
    MAX_YAML_INT_DIGITS digits.
    """
    lines = "\n" in text.strip()
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_keys(loader, node, source if not lines else f"{source}:{{line}}", "")
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{source}:{mark.line + 1}" if mark is not None and lines else source
        if isinstance(err, _Refused):
            raise ConfigError(f"{where}: {err.problem}") from None
        raise ConfigError(f"{where}: not valid YAML ({err.problem or err.context})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML ({err})") from None
    finally:
        loader.dispose()


_MERGE = "tag:yaml.org,2002:merge"


def _check_keys(loader: _StrictLoader, node: yaml.Node, where: str, path: str) -> None:
    """Refuse a key given twice in one mapping, naming its dotted path (and line: `where` holds
    "{line}" for a file)."""
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_keys(loader, item, where, f"{path}[{i}]")
    if not isinstance(node, yaml.MappingNode):
        return
    first: dict[Any, int] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True) if key_node.tag != _MERGE else "<<"
        dotted = f"{path}.{key}" if path else str(key)
        try:
            earlier = first.get(key)
            first.setdefault(key, key_node.start_mark.line)
        except TypeError:  # an unhashable key: construct_mapping names it
            earlier = None
        if earlier is not None:
            at = where.replace("{line}", str(key_node.start_mark.line + 1))
            given = f"first given at line {earlier + 1}" if at != where else "given twice"
            raise ConfigError(f"{at}: {dotted}: duplicate key ({given})")
        _check_keys(loader, value_node, where, dotted)


def _read_text(path: Path) -> str:
    """The file's text: at most MAX_YAML_BYTES, UTF-8 (one ConfigError naming the file)."""
    with path.open("rb") as fh:
        data = fh.read(MAX_YAML_BYTES + 1)
    if len(data) > MAX_YAML_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_YAML_BYTES} bytes; not a params file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})"
        ) from None


# ----------------------------------------------------------------------------- params


def load_params(
    path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None
) -> Params:
    """Read and validate a params file and every row of its `methods:`; `overrides` maps
    "section.key" to a value."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    raw = load_yaml(_read_text(path), str(path))
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level: expected a mapping, got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        values = raw.setdefault(section, {})
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: {section}: expected a mapping, got {type(values).__name__}")
        values[key] = value
    params = params_from_dict(raw, source=str(path))
    for method in params.methods:  # every row checked now, not when its stage runs
        try:
            method_params(params, method)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
    return params


def params_from_dict(raw: dict[str, Any], source: str = "params") -> Params:
    """Build Params from a plain dict, rejecting unknown or missing keys and out-of-range values."""
    params = _build(Params, raw, source, prefix="", require_all=True)
    check_ranges(params, source)
    return params


def params_to_dict(params: Params) -> dict[str, Any]:
    """Plain-dict view of the params (for logging and checkpoints)."""
    return dataclasses.asdict(params)


def method_params(params: Params, method: str) -> Params:
    """Params of one results-table method: its pooling and miner replace the configured ones."""
    if method not in params.methods:
        raise ConfigError(f"methods.{method}: unknown method; choose from {sorted(params.methods)}")
    m = params.methods[method]
    sections: dict[str, dict[str, Any]] = {
        "model": {"pooling": m.pooling},
        "miner": {"name": m.miner or params.miner.name},
    }
    for dotted, value in m.set.items():
        section, _, key = dotted.partition(".")
        if not key or section in ("methods",):
            raise ConfigError(f"methods.{method}.set: {dotted!r} is not a section.key")
        sections.setdefault(section, {})[key] = value
    return _with_overrides(params, sections, source=f"methods.{method}.set")


# ----------------------------------------------------------------------------- ranges

MIN_IMAGE_SIZE = 32  # one cell of a stride-32 backbone; smaller scaled sizes are raised to it
MAX_IMAGE_SIZE = 4096  # 16 megapixels: revisitop's images are 1024 px; larger is a typo
MAX_SEED = 2**32 - 1  # numpy.random.seed's limit (runtime.seed_everything seeds numpy)


@dataclass(frozen=True)
class Range:
    """The allowed values of a numeric key: low <= v <= high (low < v when low_open)."""

    low: float
    high: float = math.inf
    low_open: bool = False

    def __contains__(self, value: Any) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        return bool(above and value <= self.high)

    def __str__(self) -> str:
        low = _number(self.low)
        if self.high == math.inf:
            return f"must be {'>' if self.low_open else '>='} {low}"
        return f"must be in {'(' if self.low_open else '['}{low}, {_number(self.high)}]"


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def _ge(low: float, high: float = math.inf) -> Range:
    return Range(low, high)


def _gt(low: float, high: float = math.inf) -> Range:
    return Range(low, high, low_open=True)


def _within(low: float, high: float) -> Range:
    return Range(low, high)


# The allowed range of every numeric key, stated once: `check_ranges` checks params files with it
# before any work starts, and each component that takes a key (the miners, the pool, the poolings,
# alpha-QE/DBA, the whitening) checks its argument with `check_value`, so the two cannot disagree.
# An upper bound marks where a larger value can only be a mistake (or exhausts the machine). A list
# key must be non-empty and each item is checked; null (where a key allows it) always passes.
RANGES: dict[str, Range] = {
    "base.seed": _ge(0, MAX_SEED),
    "base.num_workers": _ge(0, 256),  # decoding processes
    "prepare.mini_image_max_side": _ge(MIN_IMAGE_SIZE, MAX_IMAGE_SIZE),
    "prepare.mini_train_views": _ge(1, 1000),
    "prepare.mini_queries_per_scene": _ge(1, 1000),
    "prepare.mini_scene_views": _ge(0, 1000),
    "prepare.mini_distractor_views": _ge(0, 1000),
    "prepare.gldv2_num_classes": _ge(1, 10**6),  # GLDv2 has 203k landmarks (81k in -clean)
    "prepare.gldv2_min_images": _ge(1, 10**5),
    "model.pool_sizes": _ge(1, MAX_IMAGE_SIZE // 32),  # no larger window fits the largest map
    "model.split": _ge(1, 65536),  # must also divide the backbone's channels (nn.pooling)
    "model.num_clusters": _ge(1, 4096),  # the descriptor has num_clusters x split floats
    "model.alpha": _gt(0),
    "model.gem_p": _gt(0),
    "model.image_size": _ge(MIN_IMAGE_SIZE, MAX_IMAGE_SIZE),
    "cluster.num_images": _ge(1, 10**8),  # at most: the stage takes min(this, training images)
    "cluster.batch_size": _ge(1, 4096),
    "cluster.max_locals": _ge(1, 10**7),  # x split float32 in memory (10^7 x 512: 20 GB)
    "cluster.niter": _ge(1, 10**4),
    "miner.margin": _gt(0),
    "miner.delta": _gt(0),
    "miner.threshold": _ge(1, 10**6),
    "miner.semi_hard_prob": _within(0, 1),
    "miner.triplets_per_round": _ge(1, 10**6),
    "miner.pool_size": _ge(2, 10**6),  # images embedded per round (the paper: 8000)
    "miner.images_per_class": _ge(2, 10**5),
    "miner.refresh_fraction": _within(0, 1),
    "train.lr": _gt(0),
    "train.lr_start": _gt(0),
    "train.warmup_steps": _ge(0, 10**9),
    "train.decay_every": _ge(1, 10**9),
    "train.gamma": _within(0, 1),
    "train.lr_decay": _ge(0),
    "train.batch_triplets": _ge(1, 10**5),
    "train.micro_batch": _ge(1, 10**5),
    "train.steps_per_epoch": _ge(1, 10**7),
    "train.epochs": _ge(0, 10**6),
    "train.checkpoint_every": _ge(1, 10**9),
    "train.val_every": _ge(0, 10**6),
    "train.val_query_scale": _gt(0, 4),
    "train.frozen_stages": _ge(0, 64),  # and below the backbone's stage count (nn.model)
    "whiten.num_images": _ge(2, 10**8),  # at most: the stage takes min(this, training images)
    "whiten.dim": _ge(1, 10**6),  # at most min(descriptor dim, images - 1): the stage reduces it
    "whiten.power": _gt(0),
    "whiten.batch_size": _ge(1, 4096),
    "extract.image_size": _ge(MIN_IMAGE_SIZE, MAX_IMAGE_SIZE),
    "extract.scales": _gt(0, 4),
    "extract.query_scale": _gt(0, 4),
    "extract.batch_size": _ge(1, 4096),
    "evaluate.kappas": _ge(1, 10**6),
    # alpha-QE/DBA neighbours: also at most the database size (DBA: less one), checked per test
    # set before extraction (msvlad.evaluation.search.check_neighbours): an error, not a clamp
    "evaluate.qe_k": _ge(1, 10**4),
    "evaluate.qe_alpha": _ge(0),
    "evaluate.dba_k": _ge(1, 10**4),
    "evaluate.dba_alpha": _ge(0),
    "evaluate.max_failed_db": _within(0, 1),
    "report.top_k": _ge(1, 1000),
    "report.num_queries": _ge(1, 10**5),
    "report.bootstrap": _ge(1, 10**6),
}


def check_ranges(params: Params, source: str = "params") -> None:
    """Raise ConfigError naming `source: section.key` for the first value outside its range."""
    try:
        for dotted in RANGES:
            section, _, key = dotted.partition(".")
            _check_range(dotted, getattr(getattr(params, section), key))
        variants = params.evaluate.variants
        if not variants or len(set(variants)) < len(variants):
            raise ConfigError(f"evaluate.variants: {variants!r} must be unique, not empty")
        sha = params.model.weights_sha256
        if sha is not None and not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise ConfigError(
                f"model.weights_sha256: {sha!r} must be null or a full sha256 "
                "(64 lowercase hex digits)"
            )
        m = params.miner
        check_pool_shape(m.pool_size, m.images_per_class)
        check_pool_draw(m.pool_draw, m.refresh_fraction)
        if params.model.pooling in VLAD_POOLINGS and params.cluster.max_locals < (
            params.model.num_clusters
        ):
            raise ConfigError(
                f"cluster.max_locals: {params.cluster.max_locals} must be >= model.num_clusters "
                f"{params.model.num_clusters} (k-means needs a local per centroid)"
            )
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def check_value(key: str, value: Any) -> Any:
    """`value` checked as params.yaml's `key` ("section.key": its type and RANGES), converted.

    The components that take a key as an argument call this, so their check and the params
    file's are one statement; a ConfigError (a ValueError) names the key.
    """
    section, _, name = key.partition(".")
    tp = _section_types()[section][name]
    if get_origin(tp) is list and isinstance(value, tuple):
        value = list(value)
    value = _check(tp, value, "", key)
    if key in RANGES:
        _check_range(key, value)
    return value


def check_pool_shape(pool_size: int, images_per_class: int) -> None:
    """At least two classes per mining pool (an anchor needs a negative class)."""
    if pool_size // images_per_class < 2:
        raise ConfigError(
            f"miner.pool_size: {pool_size} // miner.images_per_class {images_per_class} must be "
            ">= 2 (at least two classes per pool)"
        )


def check_pool_draw(draw: str, refresh_fraction: float) -> None:
    """Rolling pools replace refresh_fraction of their classes per round: zero would freeze them."""
    if draw == "rolling" and refresh_fraction == 0:
        raise ConfigError(
            "miner.refresh_fraction: 0.0 must be > 0 with miner.pool_draw rolling "
            "(the pool would never change)"
        )


def _check_range(key: str, value: Any) -> None:
    if value is None:
        return
    allowed = RANGES[key]
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"{key}: must not be empty")
        if any(v not in allowed for v in value):
            raise ConfigError(f"{key}: {value!r}: every item {allowed}")
    elif value not in allowed:
        raise ConfigError(f"{key}: {value!r} {allowed}")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """The type hints of a config dataclass (evaluated once: every row of methods: is built)."""
    return typing.get_type_hints(cls)


def _section_types() -> dict[str, dict[str, Any]]:
    """Section -> key -> type hint of every params.yaml section."""
    return {s: _hints(tp) for s, tp in _hints(Params).items() if dataclasses.is_dataclass(tp)}


def model_config_from_dict(raw: Any, source: str = "model") -> ModelConfig:
    """A saved model's config, checked like params.yaml's model section (older files lack keys)."""
    config = _build(ModelConfig, raw, source, prefix="model.", require_all=False)
    check_ranges(dataclasses.replace(Params(), model=config), source)
    return config


def with_overrides(params: Params, **sections: dict[str, Any]) -> Params:
    """Copy of params with some keys of some sections replaced (validated)."""
    return _with_overrides(params, sections, source="overrides")


def _with_overrides(params: Params, sections: dict[str, dict[str, Any]], source: str) -> Params:
    raw = params_to_dict(params)
    for section, values in sections.items():
        if section not in raw:
            raise ConfigError(f"{source}: {section}: unknown section")
        raw[section].update(values)
    return params_from_dict(raw, source=source)


def _build(cls: type, raw: Any, source: str, prefix: str, require_all: bool) -> Any:
    where = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {where}: expected a mapping, got {type(raw).__name__}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{source}: {prefix}{key}: unknown key{hint}")
    values = {}
    for name, f in fields.items():
        if name not in raw:
            has_default = (
                f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            )
            if require_all or not has_default:
                raise ConfigError(f"{source}: {prefix}{name}: missing key")
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            values[name] = _build(tp, raw[name], source, f"{prefix}{name}.", require_all)
        else:
            values[name] = _check(tp, raw[name], source, f"{prefix}{name}")
    return cls(**values)


def _check(tp: Any, value: Any, source: str, key: str) -> Any:
    """`value` as type `tp`, or a ConfigError naming `source: key` (just `key` without source)."""
    at = f"{source}: {key}" if source else key
    origin = get_origin(tp)
    args = get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check(arg, value, source, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{at}: must not be null")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{at}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{at}: expected a list, got {value!r}")
        return [_check(args[0], v, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{at}: expected a mapping, got {value!r}")
        if dataclasses.is_dataclass(args[1]):
            return {
                str(k): _build(args[1], v, source, f"{key}.{k}.", False) for k, v in value.items()
            }
        return {str(k): _check(args[1], v, source, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{at}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ConfigError(f"{at}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML reads 1e-5 as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{at}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(f"{at}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{at}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{at}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{at}: unsupported type {tp}")
