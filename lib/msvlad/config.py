"""Typed configuration: one frozen dataclass per params.yaml section, validated in one place.

`params.yaml` is the offline mini profile and `params.paper.yaml` the paper profile; both have
exactly the keys declared here. A wrong key or value is a one-line error naming `file: section.key`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Callable
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
    backend: Literal["torch", "faiss"] = "torch"
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


def load_params(
    path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None
) -> Params:
    """Read and validate a params file; `overrides` maps "section.key" to a value."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        raw.setdefault(section, {})[key] = value
    return params_from_dict(raw, source=str(path))


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
    try:
        return with_overrides(params, **sections)
    except ConfigError as err:
        raise ConfigError(f"methods.{method}.set: {err}") from None


MIN_IMAGE_SIZE = 32  # one cell of a stride-32 backbone; smaller scaled sizes are raised to it


def _ge(low: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= low), f"must be >= {low}"


def _gt(low: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v > low), f"must be > {low}"


def _within(low: float, high: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: low <= v <= high), f"must be in [{low}, {high}]"


# The allowed range of every numeric key, stated once and checked before any work starts. A list
# key must be non-empty and each item is checked; null (where a key allows it) always passes.
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "base.seed": _ge(0),
    "base.num_workers": _ge(0),
    "prepare.mini_image_max_side": _ge(MIN_IMAGE_SIZE),
    "prepare.mini_train_views": _ge(1),
    "prepare.mini_queries_per_scene": _ge(1),
    "prepare.mini_scene_views": _ge(0),
    "prepare.mini_distractor_views": _ge(0),
    "prepare.gldv2_num_classes": _ge(1),
    "prepare.gldv2_min_images": _ge(1),
    "model.pool_sizes": _ge(1),
    "model.split": _ge(1),
    "model.num_clusters": _ge(1),
    "model.alpha": _gt(0),
    "model.gem_p": _gt(0),
    "model.image_size": _ge(MIN_IMAGE_SIZE),
    "cluster.num_images": _ge(1),
    "cluster.batch_size": _ge(1),
    "cluster.max_locals": _ge(1),
    "cluster.niter": _ge(1),
    "miner.margin": _ge(0),
    "miner.delta": _ge(0),
    "miner.threshold": _ge(1),
    "miner.semi_hard_prob": _within(0, 1),
    "miner.triplets_per_round": _ge(1),
    "miner.pool_size": _ge(2),
    "miner.images_per_class": _ge(2),
    "miner.refresh_fraction": _within(0, 1),
    "train.lr": _gt(0),
    "train.lr_start": _gt(0),
    "train.warmup_steps": _ge(0),
    "train.decay_every": _ge(1),
    "train.gamma": _within(0, 1),
    "train.lr_decay": _ge(0),
    "train.batch_triplets": _ge(1),
    "train.micro_batch": _ge(1),
    "train.steps_per_epoch": _ge(1),
    "train.epochs": _ge(0),
    "train.checkpoint_every": _ge(1),
    "train.val_every": _ge(0),
    "train.val_query_scale": _gt(0),
    "train.frozen_stages": _ge(0),
    "whiten.num_images": _ge(2),
    "whiten.dim": _ge(1),
    "whiten.power": _gt(0),
    "whiten.batch_size": _ge(1),
    "extract.image_size": _ge(MIN_IMAGE_SIZE),
    "extract.scales": _gt(0),
    "extract.query_scale": _gt(0),
    "extract.batch_size": _ge(1),
    "evaluate.kappas": _ge(1),
    "evaluate.qe_k": _ge(1),
    "evaluate.qe_alpha": _ge(0),
    "evaluate.dba_k": _ge(1),
    "evaluate.dba_alpha": _ge(0),
    "evaluate.max_failed_db": _within(0, 1),
    "report.top_k": _ge(1),
    "report.num_queries": _ge(1),
    "report.bootstrap": _ge(1),
}


def check_ranges(params: Params, source: str = "params") -> None:
    """Raise ConfigError naming `source: section.key` for the first value outside its range."""
    for dotted, (ok, what) in RANGES.items():
        section, _, key = dotted.partition(".")
        value = getattr(getattr(params, section), key)
        if value is None:
            continue
        if isinstance(value, list):
            if not value:
                raise ConfigError(f"{source}: {dotted}: must not be empty")
            bad = [v for v in value if not ok(v)]
            if bad:
                raise ConfigError(f"{source}: {dotted}: {value!r}: every item {what}")
        elif not ok(value):
            raise ConfigError(f"{source}: {dotted}: {value!r} {what}")
    variants = params.evaluate.variants
    if not variants or len(set(variants)) < len(variants):
        raise ConfigError(f"{source}: evaluate.variants: {variants!r} must be unique, not empty")
    sha = params.model.weights_sha256
    if sha is not None and not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise ConfigError(
            f"{source}: model.weights_sha256: {sha!r} must be null or a full sha256 "
            "(64 lowercase hex digits)"
        )
    m = params.miner
    if m.pool_size // m.images_per_class < 2:
        raise ConfigError(
            f"{source}: miner.pool_size: {m.pool_size} // miner.images_per_class "
            f"{m.images_per_class} must be >= 2 (at least two classes per pool)"
        )


def model_config_from_dict(raw: Any, source: str = "model") -> ModelConfig:
    """A saved model's config, checked like params.yaml's model section (older files lack keys)."""
    config = _build(ModelConfig, raw, source, prefix="model.", require_all=False)
    check_ranges(dataclasses.replace(Params(), model=config), source)
    return config


def with_overrides(params: Params, **sections: dict[str, Any]) -> Params:
    """Copy of params with some keys of some sections replaced (validated)."""
    raw = params_to_dict(params)
    for section, values in sections.items():
        if section not in raw:
            raise ConfigError(f"overrides: {section}: unknown section")
        raw[section].update(values)
    return params_from_dict(raw, source="overrides")


def _build(cls: type, raw: Any, source: str, prefix: str, require_all: bool) -> Any:
    where = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {where}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
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
        raise ConfigError(errors[0] if errors else f"{source}: {key}: must not be null")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: {key}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key}: expected a list, got {value!r}")
        return [_check(args[0], v, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}: expected a mapping, got {value!r}")
        if dataclasses.is_dataclass(args[1]):
            return {
                str(k): _build(args[1], v, source, f"{key}.{k}.", False) for k, v in value.items()
            }
        return {str(k): _check(args[1], v, source, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads 1e-5 as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{source}: {key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{source}: {key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{source}: {key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{source}: {key}: unsupported type {tp}")
