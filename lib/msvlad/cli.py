"""Command line `python -m msvlad <command>`: the only module that reads argv and params files.

Every command reads params.yaml (or --params), applies `--set section.key=value` overrides and, for
results-table rows, `--method NAME` (see `methods:` in params.yaml). DVC stages call these commands.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from msvlad.config import ConfigError, Params, load_params, method_params
from msvlad.runtime import resolve_device, seed_everything, setup_logging

log = logging.getLogger("msvlad")


# ----------------------------------------------------------------------------- helpers


def _parse_sets(values: list[str]) -> dict[str, Any]:
    out = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        out[key] = yaml.safe_load(raw)
    return out


def _params(args: argparse.Namespace) -> Params:
    params = load_params(args.params, _parse_sets(args.set))
    if getattr(args, "method", None):
        params = method_params(params, args.method)
    return params


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--params", default="params.yaml", help="Params file (the mini profile by default)."
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="Override one parameter.",
    )


# ----------------------------------------------------------------------------- commands


def cmd_info(args: argparse.Namespace) -> int:
    """Print the network's layers and descriptor dimensions for the params."""
    from msvlad.functional import bag_size
    from msvlad.model import build_model

    params = _params(args)
    cfg = params.model
    model = build_model(cfg, pretrained=False)
    side = cfg.image_size // model.backbone.stride
    channels, stride, pool = model.backbone.out_channels, model.backbone.stride, model.pooling
    lines = [
        f"backbone      {cfg.backbone} ({channels} channels, stride {stride})",
        f"input         {cfg.image_size} px ({cfg.resize}) -> {side}x{side} feature map",
        f"pooling       {cfg.pooling}: {pool.extra_repr()}",
    ]
    if model.is_vlad:
        n_local = bag_size(channels, side, side, pool.pool_sizes, pool.split)
        lines.append(f"local bag     {n_local} descriptors of {pool.dim}-d")
    white = min(params.whiten.dim, model.raw_dim)
    lines += [
        f"raw dim       {model.raw_dim}",
        f"whitened dim  {white} (PCA-whitening, power {params.whiten.power})",
        f"parameters    {sum(p.numel() for p in model.parameters()):,}",
    ]
    print("\n".join(lines))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """Build the offline mini benchmark (mini) or download and lay out the real datasets (paper)."""
    params = _params(args)
    root = Path(params.data.root)
    if params.base.profile == "mini":
        from msvlad.assets import fetch_assets
        from msvlad.mini import build_mini_benchmark

        fetch_assets(Path(params.data.assets))
        summary = build_mini_benchmark(
            Path(params.data.assets),
            root,
            seed=params.base.seed,
            image_max_side=params.prepare.mini_image_max_side,
            train_views_per_class=params.prepare.mini_train_views,
        )
        log.info("mini benchmark: %s", summary)
        return 0
    from msvlad.datasets import prepare_dataset

    names = [params.data.train_set, params.data.val_set, *params.data.test_sets]
    for name in dict.fromkeys(n for n in names if n):
        options: dict[str, Any] = {}
        if name.startswith("gldv2"):
            options = {
                "num_classes": params.prepare.gldv2_num_classes,
                "min_images_per_class": params.prepare.gldv2_min_images,
                "seed": params.base.seed,
            }
        if name == "holidays_rotated" and params.prepare.holidays_rotations:
            options = {"rotations": params.prepare.holidays_rotations}
        prepare_dataset(name, root, mirror=params.data.mirror, **options)
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    """Build the network; k-means NetVLAD centroids (other poolings are saved as they are)."""
    import numpy as np

    from msvlad.cluster import init_netvlad, kmeans_centroids, sample_local_features
    from msvlad.datasets import load_training_set
    from msvlad.extract import ImageItem
    from msvlad.model import build_model, save_model

    params = _params(args)
    seed_everything(params.base.seed)
    device = resolve_device(params.base.device)
    model = build_model(params.model).to(device)
    out = Path(args.out)
    extra: dict[str, Any] = {}
    if model.is_vlad:
        train_set = load_training_set(Path(params.data.root) / params.data.train_set)
        rng = np.random.default_rng(params.base.seed)
        n = min(params.cluster.num_images, len(train_set.paths))
        pick = np.sort(rng.choice(len(train_set.paths), n, replace=False))
        t0 = time.time()
        local = sample_local_features(
            model,
            [ImageItem(train_set.paths[i]) for i in pick],
            image_size=params.model.image_size,
            max_locals=params.cluster.max_locals,
            batch_size=params.cluster.batch_size,
            seed=params.base.seed,
            device=device,
        )
        centroids = kmeans_centroids(
            local, params.model.num_clusters, niter=params.cluster.niter, seed=params.base.seed
        )
        alpha = init_netvlad(model, local, centroids, params.model.alpha_rule)
        log.info(
            "k-means: %d locals from %d images -> %d centroids, alpha %.2f (%.1fs)",
            len(local),
            n,
            len(centroids),
            alpha,
            time.time() - t0,
        )
        extra = {"alpha": alpha, "num_locals": len(local)}
    save_model(model.cpu(), out, **extra)
    log.info("initial model -> %s", out)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train with the configured miner (resumable); off-the-shelf methods copy the init."""
    params = _params(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.method and params.methods[args.method].miner is None:
        shutil.copyfile(args.init, out / "model.pt")
        log.info("%s is off-the-shelf: no training, %s copied", args.method, args.init)
        for name, header in (
            ("log.csv", "epoch,step,lr,loss,triplets,rounds,yield,val_map,seconds\n"),
        ):
            (out / name).write_text(header)
        return 0
    from msvlad.train import train

    train(params, Path(args.init), out, max_steps=args.max_steps)
    return 0


def cmd_whiten(args: argparse.Namespace) -> int:
    """Learn PCA-whitening on single-scale training-set descriptors and save the whitened model."""
    import numpy as np
    import torch

    from msvlad.datasets import load_training_set
    from msvlad.extract import ImageItem, describe_images
    from msvlad.model import load_model, save_model
    from msvlad.whitening import Whitening

    params = _params(args)
    device = resolve_device(params.base.device)
    model = load_model(args.checkpoint).to(device)
    train_set = load_training_set(Path(params.data.root) / params.data.train_set)
    rng = np.random.default_rng(params.base.seed)
    n = min(params.whiten.num_images, len(train_set.paths))
    pick = np.sort(rng.choice(len(train_set.paths), n, replace=False))
    desc, ok = describe_images(
        model,
        [ImageItem(train_set.paths[i]) for i in pick],
        image_size=params.model.image_size,
        batch_size=params.whiten.batch_size,
        device=device,
        num_workers=params.base.num_workers,
        desc="whiten",
    )
    desc = desc[torch.from_numpy(ok)]
    dim = min(params.whiten.dim, desc.shape[1], len(desc) - 1)
    if dim < params.whiten.dim:
        log.warning(
            "whiten.dim=%d reduced to %d (descriptor dim %d, %d training images)",
            params.whiten.dim,
            dim,
            desc.shape[1],
            len(desc),
        )
    model.whitening = Whitening.fit(desc, dim, params.whiten.power).to(device)
    save_model(model.cpu(), args.out, whiten_images=len(desc))
    log.info(
        "PCA-whitening %d -> %d learned on %d images -> %s", desc.shape[1], dim, len(desc), args.out
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Extract, rank, score; writes metrics.json, features.npz, ranks.npy and per-query CSVs."""
    import numpy as np
    import torch

    from msvlad.datasets import load_dataset
    from msvlad.evaluation import format_table
    from msvlad.model import build_model, load_model
    from msvlad.retrieval import describe_dataset, score
    from msvlad.runtime import init_distributed
    from msvlad.storage import save_npy, save_npz, write_json

    params = _params(args)
    seed_everything(params.base.seed)
    device = resolve_device(params.base.device)
    dist_info = init_distributed()  # under torchrun every rank extracts a slice of each image list
    if dist_info.world > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    if args.checkpoint:
        model = load_model(args.checkpoint)
    else:  # off-the-shelf ImageNet backbone + pooling (NetVLAD needs k-means: use `cluster`)
        model = build_model(
            params.model if not args.backbone else _with_backbone(params, args.backbone).model
        )
    model = model.to(device).eval()
    root = Path(args.data_root or params.data.root)
    names = args.dataset or params.data.test_sets
    out = Path(args.out)
    variants = [v for v in args.variants.split(",") if v]
    summary: dict[str, Any] = {}
    tables = {}
    distractors = (
        _distractor_descriptors(args, model, params, root, out, device)
        if args.distractors
        else None
    )
    for name in names:
        dataset = load_dataset(root, name)
        t0 = time.time()
        desc = describe_dataset(
            model,
            dataset,
            model_cfg=model.config,
            extract_cfg=params.extract,
            device=device,
            num_workers=params.base.num_workers,
        )
        seconds = time.time() - t0
        if not dist_info.main:
            continue
        if distractors is not None:
            name = f"{name}+{args.distractors}"
        ddir = out / name if len(names) > 1 or not args.flat else out
        save_npz(
            ddir / "features.npz",
            q=desc.q,
            db=desc.db,
            qimlist=np.array(dataset.qimlist),
            imlist=np.array(dataset.imlist),
        )
        if (
            distractors is not None
        ):  # ranks past the dataset's images are distractors: never ok, never junk
            desc.db = np.concatenate([desc.db, distractors])
        per_dataset: dict[str, Any] = {}
        for variant in variants:
            metrics, ranks = score(desc, dataset, params.evaluate, variant=variant)
            suffix = "" if variant == "plain" else f"+{variant.upper()}"
            js = metrics.to_json()
            js.update(
                {
                    "dataset": name,
                    "protocol": dataset.protocol,
                    "variant": variant,
                    "num_queries": len(dataset.qimlist),
                    "num_db": int(desc.db.shape[0]),
                    "dim": int(desc.db.shape[1]),
                    "extract_seconds": round(seconds, 2),
                    "failed_images": len(desc.failed_queries) + len(desc.failed_db),
                }
            )
            tag = "" if variant == "plain" else f"_{variant}"
            write_json(ddir / f"metrics{tag}.json", js)
            metrics.write_per_query_csv(ddir / f"per_query{tag}.csv", dataset.qimlist)
            if variant == "plain":
                save_npy(ddir / "ranks.npy", ranks.astype(np.int32))
            per_dataset[variant] = js
            tables[f"{name}{suffix}"] = metrics
        summary[name] = per_dataset
    if dist_info.main:
        write_json(
            out / "metrics.json",
            summary if not args.flat else next(iter(summary.values()))["plain"],
        )
        print(format_table(tables))
    return 0


def _distractor_descriptors(
    args: argparse.Namespace, model: Any, params: Params, root: Path, out: Path, device: Any
) -> Any:
    """Descriptors of a distractor set (e.g. revisitop1m), cached in OUT/<name>_features.npz."""
    import numpy as np

    from msvlad.datasets import load_distractors
    from msvlad.extract import ImageItem, extract_descriptors
    from msvlad.storage import load_npz, save_npz

    cache = out / f"{args.distractors}_features.npz"
    if cache.exists():
        return load_npz(cache)["db"]
    paths = load_distractors(root, args.distractors)
    log.info("describing %d distractors of %s", len(paths), args.distractors)
    db, _ = extract_descriptors(
        model,
        [ImageItem(p) for p in paths],
        image_size=params.model.image_size,
        scales=params.extract.scales,
        resize=params.model.resize,
        batch_size=params.extract.batch_size,
        device=device,
        num_workers=params.base.num_workers,
        desc=args.distractors,
    )
    save_npz(cache, db=db.astype(np.float16) if params.extract.float16 else db)
    return db.astype(np.float32)


def cmd_report(args: argparse.Namespace) -> int:
    """Execute the report notebooks with papermill; HTML, figures and tables go under --out."""
    from msvlad.report import NOTEBOOKS, run_reports

    _params(args)  # validate params before spending minutes in notebooks
    names = args.notebook or list(NOTEBOOKS)
    extra = {"params_file": str(Path(args.params).resolve())}
    if args.results:
        extra["results_dir"] = str(Path(args.results).resolve())
    if args.runs:
        extra["runs_dir"] = str(Path(args.runs).resolve())
    for path in run_reports(names, Path(args.out), **extra):
        log.info("report -> %s (+ .html)", path)
    return 0


def _with_backbone(params: Params, backbone: str) -> Params:
    from msvlad.config import with_overrides

    weights = "package" if backbone.startswith("efficientnet") else params.model.weights
    return with_overrides(params, model={"backbone": backbone, "weights": weights})


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used for `--help` in the README)."""
    parser = argparse.ArgumentParser(prog="msvlad", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="Print descriptor dimensions of the configured network.")
    _common(p)
    p.add_argument("--method", help="A key of `methods:` in params.yaml.")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("prepare", help="Build the mini benchmark or download real datasets.")
    _common(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("cluster", help="k-means NetVLAD initialisation; writes the initial model.")
    _common(p)
    p.add_argument("--method", help="A key of `methods:` in params.yaml.")
    p.add_argument("--out", required=True, help="Output model file (e.g. runs/msvlad/init.pt).")
    p.set_defaults(func=cmd_cluster)

    p = sub.add_parser("train", help="Train with triplet mining (resumable).")
    _common(p)
    p.add_argument("--method", help="A key of `methods:` in params.yaml.")
    p.add_argument("--init", required=True, help="Initial model from `cluster`.")
    p.add_argument(
        "--out", required=True, help="Run folder: checkpoint.pt, model.pt, log.csv, triplets.csv."
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="Stop after this many more steps (resume later).",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("whiten", help="Learn PCA-whitening on training descriptors.")
    _common(p)
    p.add_argument("--method", help="A key of `methods:` in params.yaml.")
    p.add_argument("--checkpoint", required=True, help="Trained model file.")
    p.add_argument("--out", required=True, help="Output whitened model file.")
    p.set_defaults(func=cmd_whiten)

    p = sub.add_parser("evaluate", help="Extract, rank and score retrieval test sets.")
    _common(p)
    p.add_argument("--method", help="A key of `methods:` in params.yaml.")
    p.add_argument(
        "--data-root", help="Folder holding datasets in revisitop layout (default data.root)."
    )
    p.add_argument(
        "--dataset",
        action="append",
        help="Dataset name under the root (repeatable; default data.test_sets).",
    )
    p.add_argument("--out", required=True, help="Output folder.")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--checkpoint", help="Model file (trained, whitened).")
    g.add_argument(
        "--backbone", help="Off-the-shelf ImageNet backbone with the configured pooling."
    )
    p.add_argument(
        "--variants",
        default="plain,qe,dba",
        help="Comma list of plain, qe (alpha-QE), dba (alpha-DBA).",
    )
    p.add_argument(
        "--flat", action="store_true", help="Single dataset: write files directly in --out."
    )
    p.add_argument(
        "--distractors",
        help="Append a distractor set to every database (e.g. revisitop1m: the +1M rows).",
    )
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("report", help="Run the report notebooks (papermill) and export HTML.")
    _common(p)
    p.add_argument("--notebook", action="append", help="Notebook name (repeatable; default all).")
    p.add_argument(
        "--out", default="reports", help="Output folder (notebooks/, figures/, tables/)."
    )
    p.add_argument("--results", help="Evaluation results folder (default results/evaluate).")
    p.add_argument("--runs", help="Training runs folder (default runs).")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; errors from bad input are one line on stderr and exit status 2."""
    args = build_parser().parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"msvlad {args.command}: error: {err}", file=sys.stderr)
        return 2
