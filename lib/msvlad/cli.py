"""Command line `python -m msvlad <command>`: parses arguments and calls `msvlad.stages.<command>`.

Every command reads params.yaml (or --params), applies `--set section.key=value` overrides and, for
results-table rows, `--method NAME` (see `methods:` in params.yaml). DVC stages call these commands;
the work of each lives in its stage module.

`main` is the one error boundary: an expected failure (`msvlad.errors.InputError`, a file or folder
that cannot be read or written) prints `msvlad <command>: error: <file or parameter>: <what is
wrong>` and exits 2; a stop by SIGTERM/SIGINT exits 143/130; anything else is a bug and keeps its
traceback (exit 1).
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from pathlib import Path
from typing import Any

from msvlad.config import (
    ConfigError,
    ModelConfig,
    Params,
    load_params,
    load_yaml,
    method_params,
)
from msvlad.errors import InputError, Interrupted
from msvlad.runtime import setup_logging, tune_allocator

log = logging.getLogger("msvlad")


# ----------------------------------------------------------------------------- helpers


def parse_sets(values: list[str]) -> dict[str, Any]:
    """`--set section.key=value` strings -> {"section.key": YAML value} for `load_params`."""
    out = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        out[key] = load_yaml(raw, f"--set {key}")
    return out


def _params(args: argparse.Namespace) -> Params:
    params = load_params(args.params, parse_sets(args.set))
    if getattr(args, "method", None):
        params = method_params(params, args.method)
    return params


def _checkpoint_fits(args: argparse.Namespace, params: Params, config: ModelConfig) -> None:
    """A model key given explicitly (--set model.*, the --method row) must equal the checkpoint's.

    The checkpoint fixes the architecture; the test-time input policy is `extract.*`. With a
    --method row every architecture key of the row's params must be the checkpoint's.
    """
    from msvlad.nn.model import ARCHITECTURE_KEYS

    keys = {k.partition(".")[2] for k in parse_sets(args.set) if k.startswith("model.")}
    if getattr(args, "method", None):
        row = params.methods[args.method]
        keys |= set(ARCHITECTURE_KEYS) | {
            k.partition(".")[2] for k in row.set if k.startswith("model.")
        }
    for key in sorted(keys):
        asked, saved = getattr(params.model, key), getattr(config, key)
        if asked != saved:
            raise ConfigError(
                f"model.{key}: {asked!r} asked, but {args.checkpoint} was built with {saved!r} "
                "(a checkpoint fixes the model; set extract.image_size, extract.resize, "
                "extract.scales for the test-time input)"
            )


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
    from msvlad.stages import info

    print(info.run(_params(args)))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """Build the offline mini benchmark (mini) or download and lay out the real datasets (paper)."""
    from msvlad.stages import prepare

    prepare.run(_params(args))
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    """Build the network; k-means NetVLAD centroids (other poolings are saved as they are)."""
    from msvlad.stages import cluster

    cluster.run(_params(args), Path(args.out))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train with the configured miner (resumable); off-the-shelf methods copy the init."""
    from msvlad.stages import train

    params, init, out = _params(args), Path(args.init), Path(args.out)
    whiten = Path(args.whiten) if args.whiten else None
    opts = {"cluster": args.cluster, "whiten": whiten, "restart": args.restart}
    train.run_stage(params, init, out, args.method, max_steps=args.max_steps, **opts)
    return 0


def cmd_whiten(args: argparse.Namespace) -> int:
    """Learn PCA-whitening on single-scale training-set descriptors and save the whitened model."""
    from msvlad.stages import whiten

    params = _params(args)
    fits = lambda config: _checkpoint_fits(args, params, config)  # noqa: E731
    whiten.run_checkpoint(params, Path(args.checkpoint), Path(args.out), fits)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Extract, rank, score; writes metrics.json, features.npz, ranks.npy and per-query CSVs."""
    from msvlad.nn.model import build_model, load_model
    from msvlad.stages import evaluate

    params = _params(args)
    if args.checkpoint:
        model = load_model(args.checkpoint)
        _checkpoint_fits(args, params, model.config)
    else:  # off-the-shelf ImageNet backbone + pooling (NetVLAD needs k-means: use `cluster`)
        model = build_model(
            params.model if not args.backbone else _with_backbone(params, args.backbone).model,
            mirror=params.data.mirror,
        )
    request = evaluate.EvaluateRequest(
        data_root=Path(args.data_root or params.data.root),
        datasets=args.dataset or params.data.test_sets,
        out=Path(args.out),
        variants=[v for v in args.variants.split(",") if v] if args.variants else None,
        flat=args.flat,
        distractors=args.distractors,
        checkpoint=Path(args.checkpoint) if args.checkpoint else None,
    )
    evaluate.run(params, model, request)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Execute the report notebooks with papermill; HTML, figures and tables go under --out."""
    from msvlad.stages import report

    _params(args)  # validate params before spending minutes in notebooks
    results = Path(args.results) if args.results else None
    runs = Path(args.runs) if args.runs else None
    report.run(Path(args.params), Path(args.out), args.notebook, results, runs)
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    """Queue one axis of the ablation grid on one row, or collect the finished grid into a table."""
    from msvlad.stages import ablate

    if args.action == "collect":
        table = ablate.run_collect(args.params, args.out, args.method)
        print(f"{len(table)} rows ({table['axis'].nunique()} axes) -> {args.out}")
        return 0
    if not args.axis or not args.values:
        raise ConfigError("ablate queue: --axis and --values are both needed")
    cmds = ablate.run_queue(args.params, args.axis, args.values, args.method, args.dry_run)
    print("\n".join(" ".join(c) for c in cmds) or "every point is queued or done already")
    print("then: dvc queue start -j 1" if cmds else "")
    return 0


def _with_backbone(params: Params, backbone: str) -> Params:
    from msvlad.config import with_overrides

    weights = "package" if backbone.startswith("efficientnet") else params.model.weights
    return with_overrides(params, model={"backbone": backbone, "weights": weights})


# ----------------------------------------------------------------------------- parser


def _add_info(sub: argparse._SubParsersAction) -> None:
    """The `info` command."""
    p = sub.add_parser("info", help="Print descriptor dimensions of the configured network.")
    _common(p)
    p.add_argument("--method", help="A key of `methods:` in params.yaml.")
    p.set_defaults(func=cmd_info)


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    """The `prepare` command."""
    p = sub.add_parser("prepare", help="Build the mini benchmark or download real datasets.")
    _common(p)
    p.set_defaults(func=cmd_prepare)


def _add_cluster(sub: argparse._SubParsersAction) -> None:
    """The `cluster` command."""
    p = sub.add_parser("cluster", help="k-means NetVLAD initialisation; writes the initial model.")
    _common(p)
    p.add_argument("--method", help="A key of `methods:` in params.yaml.")
    p.add_argument("--out", required=True, help="Output model file (e.g. runs/msvlad/init.pt).")
    p.set_defaults(func=cmd_cluster)


def _add_train(sub: argparse._SubParsersAction) -> None:
    """The `train` command."""
    p = sub.add_parser("train", help="Train with triplet mining (resumable).")
    _common(p)
    p.add_argument("--method", help="A key of `methods:` in params.yaml.")
    p.add_argument("--init", required=True, help="Initial model from `cluster`.")
    p.add_argument(
        "--cluster",
        action="store_true",
        help="First write --init by k-means, as `cluster --out INIT` does.",
    )
    p.add_argument(
        "--whiten",
        metavar="MODEL",
        help="Then learn the whitening into MODEL, as `whiten --checkpoint OUT/model.pt` does.",
    )
    p.add_argument(
        "--out", required=True, help="Run folder: checkpoint.pt, model.pt, log.csv, triplets.csv."
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="Stop after this many more steps (resume later).",
    )
    p.add_argument(
        "--restart",
        nargs="?",
        const="always",
        choices=["always", "if-changed"],
        help="Move the run already in --out to <out>.previous/<time>/ and start over "
        "(if-changed: only when its parameters differ; without --restart such a run is an error).",
    )
    p.set_defaults(func=cmd_train)


def _add_whiten(sub: argparse._SubParsersAction) -> None:
    """The `whiten` command."""
    p = sub.add_parser("whiten", help="Learn PCA-whitening on training descriptors.")
    _common(p)
    p.add_argument("--method", help="A key of `methods:` in params.yaml.")
    p.add_argument("--checkpoint", required=True, help="Trained model file.")
    p.add_argument("--out", required=True, help="Output whitened model file.")
    p.set_defaults(func=cmd_whiten)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    """The `evaluate` command."""
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
        default=None,
        help="Comma list of plain, raw (unwhitened), qe (alpha-QE), dba (alpha-DBA); "
        "default evaluate.variants.",
    )
    p.add_argument(
        "--flat", action="store_true", help="Single dataset: write files directly in --out."
    )
    p.add_argument(
        "--distractors",
        help="Append a distractor set to every database (e.g. revisitop1m: the +1M rows).",
    )
    p.set_defaults(func=cmd_evaluate)


def _add_report(sub: argparse._SubParsersAction) -> None:
    """The `report` command."""
    p = sub.add_parser("report", help="Run the report notebooks (papermill) and export HTML.")
    _common(p)
    p.add_argument("--notebook", action="append", help="Notebook name (repeatable; default all).")
    p.add_argument(
        "--out", default="reports", help="Output folder (notebooks/, figures/, tables/)."
    )
    p.add_argument("--results", help="Evaluation results folder (default results/evaluate).")
    p.add_argument("--runs", help="Training runs folder (default runs).")
    p.set_defaults(func=cmd_report)


def _add_ablate(sub: argparse._SubParsersAction) -> None:
    """The `ablate` command."""
    p = sub.add_parser("ablate", help="Ablation grid: queue DVC experiments, collect results.")
    p.add_argument("--params", default="params.yaml", help="Params file of the DVC repository.")
    p.add_argument("action", choices=["queue", "collect"], help="queue one axis, or collect")
    p.add_argument("--method", default="msvlad", help="The row the grid varies (one chain).")
    p.add_argument("--axis", help="queue: the section.key to vary (e.g. miner.delta).")
    p.add_argument("--values", help="queue: comma list of YAML values (0.02,0.04 or [2],[2,3]).")
    p.add_argument("--dry-run", action="store_true", help="queue: print the commands only.")
    p.add_argument(
        "--out", default="results/ablations/mini.csv", help="collect: the table (CSV) to write."
    )
    p.set_defaults(func=cmd_ablate)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used for `--help` in the README)."""
    parser = argparse.ArgumentParser(prog="msvlad", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_info,
        _add_prepare,
        _add_cluster,
        _add_train,
        _add_whiten,
        _add_evaluate,
        _add_report,
        _add_ablate,
    ):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: bad input is one line on stderr and exit 2; a signal stop exits 128 + signal."""
    args = build_parser().parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    tune_allocator()
    try:
        return args.func(args)
    except Interrupted as err:
        _say(args.command, f"stopped: {err}")
        return 128 + err.signum
    except KeyboardInterrupt:
        _say(args.command, "interrupted")
        return 130
    except InputError as err:
        _fail(args.command, str(err))
        return 2
    except OSError as err:
        message = _os_error(err)
        if message is None:
            raise
        _fail(args.command, message)
        return 2


def _os_error(err: OSError) -> str | None:
    """One line for a file system failure the user can fix; None for anything else (a bug)."""
    if err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror}"
    expected = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
    if isinstance(err, expected) or err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return str(err)
    return None


def _fail(command: str, message: str) -> None:
    log.debug("traceback of the error below", exc_info=True)
    _say(command, f"error: {message}")


def _say(command: str, message: str) -> None:
    print(f"msvlad {command}: {' '.join(message.split())}", file=sys.stderr)
