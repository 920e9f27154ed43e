"""Typed configuration: one frozen dataclass per params.yaml section, validated in one place.

`params.yaml` is the offline mini profile and `params.paper.yaml` the paper profile; both have
exactly the keys declared here. A wrong key or value is a one-line error naming `file: section.key`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

PoolingName = Literal["msvlad", "netvlad", "vlad_concat", "gem", "mac", "spoc", "rmac"]
VLAD_POOLINGS: tuple[str, ...] = ("msvlad", "netvlad", "vlad_concat")  # need k-means init
MinerName = Literal["difficulty", "random", "hardest_negative", "semi_hard", "batch_hard"]
VladNorm = Literal["intra", "across_clusters"]
BiasInit = Literal["squared_norm", "norm"]
ResizeFilter = Literal["bilinear", "lanczos"]
KMeansName = Literal["faiss", "sklearn_minibatch"]
PoolClasses = Literal["with_positives", "all"]
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
    amp: bool = True  # only on CUDA
    val_every: int = 1  # epochs between validation mAP
    frozen_stages: int = 0  # leading backbone stages kept frozen (0 = the paper's full fine-tuning)
    lr_schedule: LrSchedule = "aligned"  # lagged: the authors' scheduler, stepped after Adam


@dataclass(frozen=True)
class WhitenConfig:
    """PCA-whitening learned on training-set descriptors after training."""

    num_images: int = 65536
    dim: int = 2048
    power: float = 0.5
    batch_size: int = 16


@dataclass(frozen=True)
class ExtractConfig:
    """Test-time descriptor extraction."""

    scales: list[float] = field(default_factory=lambda: [1.5, 1.0, 0.6667])
    query_scale: float = 0.7  # queries are described at this fraction of the database size
    batch_size: int = 16
    float16: bool = False  # store descriptors in float16


@dataclass(frozen=True)
class EvaluateConfig:
    """Ranking and metrics."""

    kappas: list[int] = field(default_factory=lambda: [1, 5, 10])
    index: Literal["flat", "ivf", "hnsw", "ivfpq"] = "flat"
    qe_k: int = 2
    qe_alpha: float = 3.0
    dba_k: int = 2
    dba_alpha: float = 3.0


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


class ConfigError(ValueError):
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
    """Build Params from a plain dict, rejecting unknown or missing keys."""
    return _build(Params, raw, source, prefix="", require_all=True)


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
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{source}: {key}: unsupported type {tp}")
