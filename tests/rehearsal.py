"""The paper profile rehearsed: `dvc exp run` on params.paper.yaml with only sizes overridden.

A copy of the working tree (tracked and untracked, not ignored files; no dvc.lock) becomes a fresh
git repository in a scratch folder, its params.yaml a copy of params.paper.yaml (what a researcher
does: ``cp params.paper.yaml params.yaml``); replicas of every official download
(`replicas.paper_mirror`) are served from 127.0.0.1 and `dvc exp run` runs every stage of every
results-table row with its code (PYTHONPATH) and a scratch $TORCH_HOME. Nothing outside the
scratch folder is written (the repository's data/, runs/, results/ and reports/ are never touched;
HOME, TMPDIR and DVC's caches point into the scratch folder). After the pipeline, the +1M rows
(which no dvc stage makes) are run by hand as a researcher would: revisitop1m from the mirror, then
`evaluate --distractors revisitop1m` on ROxf/RPar with the paper row's model (`plus_r1m`).

`SIZES` (and `ROW_SIZES` for the rows of the network claims) is the whole difference from the
paper run, besides `inputs()`: what a researcher supplies (the mirror, the Holidays rotation list,
and the pins of the random weight files: ResNet-101's, and each other backbone's in its rows).

    python tests/rehearsal.py [--keep DIR]    # the stages, the results table, the wall time
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from httpserver import FileServer  # noqa: E402
from replicas import Mirror, paper_mirror  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# The sizes a 2-core CPU can run in minutes; the paper's value in each comment. Nothing else
# changes: every stage, dataset, protocol, variant, row, the whitening and the report run as in
# the real run (the replicas hold a few images each, and ResNet-101 stays ResNet-101).
SIZES: dict[str, Any] = {
    "model.image_size": 64,  # 512: a 2x2 conv5 map (3x3 at the 1.5 test scale)
    "methods.msvlad-maxside.set": {"extract.image_size": 128},  # 1024: twice the training size
    # 512: at 64 px the unsplit row has one 2048-d local per image, too few for k-means with K=64
    "methods.msvlad-nosplit.set": {"model.image_size": 96},
    "train.batch_triplets": 2,  # 6
    "train.steps_per_epoch": 1,  # 400
    "train.epochs": 2,  # 241
    "train.warmup_steps": 1,  # 2000
    "train.decay_every": 1,  # 48000: every step decays, so the schedule's decay path runs
    "train.checkpoint_every": 1,  # 8000
    "whiten.num_images": 12,  # 65536 (whiten.dim 2048 is then cut to 11, with a warning)
    "report.bootstrap": 200,  # 10000
    "base.num_workers": 2,  # 8 decoding processes
}


# The rows whose network differs from the paper row's (other poolings, split, windows and
# backbones: the network claims) are as many again as the others; one training epoch and one test
# scale keep the rehearsal's time within reason, while each still runs every stage, test set and
# variant.
ROW_SIZES: dict[str, Any] = {
    "train.epochs": 1,  # 241 (SIZES: 2)
    "extract.scales": [1.0],  # [1.5, 1.0, 0.6667]
}
NETWORK_KEYS = ("backbone", "pooling", "split", "pool_sizes")  # what makes a row's network differ


def network_rows(params_file: Path) -> list[str]:
    """Rows whose network (`NETWORK_KEYS`) differs from the paper row's (`msvlad`)."""
    from msvlad.config import load_params, method_params

    params = load_params(params_file)
    paper = method_params(params, "msvlad").model
    return [
        row
        for row in params.methods
        if any(
            getattr(method_params(params, row).model, k) != getattr(paper, k) for k in NETWORK_KEYS
        )
    ]


def row_backbones(params_file: Path) -> dict[str, str]:
    """Rows whose backbone is not `model.backbone` -> that backbone (its weights need a pin)."""
    from msvlad.config import load_params, method_params

    params = load_params(params_file)
    out = {}
    for row in params.methods:
        backbone = method_params(params, row).model.backbone
        if backbone != params.model.backbone:
            out[row] = backbone
    return out


def inputs(
    mirror_url: str,
    rotations: Path,
    weights_sha256: str,
    row_pins: dict[str, str] | None = None,
) -> dict[str, Any]:
    """What a researcher supplies: the mirror, the Holidays rotation list, the weights' pins.

    `row_pins`: row -> the pin of its own backbone's weights (rows of another backbone).
    """
    return {
        "data.mirror": mirror_url,
        "prepare.holidays_rotations": str(rotations),
        "model.weights_sha256": weights_sha256,
        **{
            f"methods.{row}.set": {"model.weights_sha256": pin}
            for row, pin in (row_pins or {}).items()
        },
    }


def merge_sets(*overrides: dict[str, Any]) -> dict[str, Any]:
    """Overrides merged left to right; the `methods.<row>.set` mappings of each are joined."""
    out: dict[str, Any] = {}
    for group in overrides:
        for key, value in group.items():
            if key.endswith(".set") and key in out:
                out[key] = {**out[key], **value}
            else:
                out[key] = value
    return out


def set_params(overrides: dict[str, Any]) -> list[str]:
    """`dvc exp run -S` arguments (hydra override grammar) for "section.key" -> value."""
    args = []
    for key, value in overrides.items():
        if isinstance(value, dict):  # merged into the mapping (keys may hold dots); `++`: new
            text = "{" + ", ".join(f"{k}: {_value(v)}" for k, v in value.items()) + "}"
            key = f"++{key}"  # keys are added, and so is a `set` the row lacks
        else:
            text = _value(value)
        args += ["-S", f"{key}={text}"]
    return args


def _value(value: Any) -> str:
    """One value in the override grammar."""
    if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value):
        return f"'{value}'"  # a digest must stay a string
    return str(value)


def make_workspace(dest: Path, repo: Path = REPO) -> Path:
    """A fresh git repository at `dest` holding the working tree, params.yaml = paper profile."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for rel in filter(None, listed):
        src = repo / rel
        if rel == "dvc.lock" or not src.is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
    shutil.copyfile(dest / "params.paper.yaml", dest / "params.yaml")
    for cmd in (
        ["init", "-q"],
        ["config", "user.name", "rehearsal"],  # `dvc exp run` commits the experiment
        ["config", "user.email", "rehearsal@localhost"],
        ["add", "-A"],
        ["commit", "-q", "-m", "workspace"],
    ):
        subprocess.run(["git", *cmd], cwd=dest, check=True)
    return dest


@dataclass
class Rehearsal:
    """A finished `dvc exp run`: where, what it printed, which stages ran, how long it took."""

    workspace: Path
    returncode: int
    output: str
    stages: list[str]
    seconds: float
    mirror: Mirror
    requests: list[tuple[str, str | None, int]]
    r1m: subprocess.CompletedProcess | None  # the +1M evaluation after the pipeline

    def params(self) -> dict[str, Any]:
        """The params.yaml the run used (the paper profile plus the overrides)."""
        return yaml.safe_load((self.workspace / "params.yaml").read_text())


def environment(workspace: Path) -> dict[str, str]:
    """The run's environment: the workspace's code, no inherited mirror, every cache in scratch.

    HOME, TMPDIR, DVC's site cache (else /var/tmp/dvc) and msvlad's own cache point into the
    scratch folder, so dvc, git, matplotlib, Jupyter, torch and msvlad write nothing outside it.
    """
    scratch = workspace.parent
    env = {k: v for k, v in os.environ.items() if k not in ("MSVLAD_MIRROR", "PYTHONPATH")}
    env["PYTHONPATH"] = str(workspace / "lib")
    env["TORCH_HOME"] = str(scratch / "torch")
    for key, sub in (
        ("HOME", "home"),
        ("TMPDIR", "tmp"),
        ("DVC_SITE_CACHE_DIR", "dvc-site"),
        ("DVC_GLOBAL_CONFIG_DIR", "dvc-global"),
        ("DVC_SYSTEM_CONFIG_DIR", "dvc-system"),
        ("MSVLAD_CACHE", "msvlad-cache"),  # the frozen-trunk cache between runs
    ):
        (scratch / sub).mkdir(parents=True, exist_ok=True)
        env[key] = str(scratch / sub)
    for key in [k for k in env if k.startswith(("XDG_", "MPLCONFIGDIR", "IPYTHONDIR", "JUPYTER_"))]:
        del env[key]  # derived from HOME instead
    env["DVC_NO_ANALYTICS"] = "1"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MPLBACKEND"] = "Agg"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def rehearse(scratch: Path, timeout: float = 14400) -> Rehearsal:
    """Build the workspace under `scratch`, serve the replicas and run `dvc exp run` there."""
    workspace = make_workspace(scratch / "repo")
    params_file = workspace / "params.yaml"
    backbones = row_backbones(params_file)
    mirror = paper_mirror(backbones=("resnet101", *sorted(set(backbones.values()))))
    rotations = scratch / "holidays-rotate.yaml"
    rotations.write_text(mirror.rotations)
    pins = {row: mirror.trunks[b] for row, b in backbones.items()}
    with FileServer(mirror.files) as server:
        overrides = merge_sets(
            inputs(server.base_url, rotations, mirror.weights_sha256, pins),
            SIZES,
            {f"methods.{row}.set": ROW_SIZES for row in network_rows(params_file)},
        )
        cmd = [
            "nice",
            "-n",
            "10",
            sys.executable,
            "-m",
            "dvc",
            "exp",
            "run",
            "-n",
            "rehearsal",
            *set_params(overrides),
        ]
        t0 = time.time()
        proc = subprocess.run(
            cmd,
            cwd=workspace,
            env=environment(workspace),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
        seconds = time.time() - t0
        r1m = plus_r1m(workspace, server.base_url) if proc.returncode == 0 else None
        requests = list(server.requests)
    stages = re.findall(r"Running stage '([^']+)'", proc.stdout)
    return Rehearsal(
        workspace, proc.returncode, proc.stdout, stages, seconds, mirror, requests, r1m
    )


R1M_OUT = "results/evaluate-r1m/msvlad"  # the +1M rows of the paper's row


def plus_r1m(workspace: Path, mirror_url: str) -> subprocess.CompletedProcess:
    """The +1M rows, which no dvc stage makes: download revisitop1m, evaluate ROxf/RPar with it."""
    fetch = (
        "from msvlad.data.official import prepare_dataset; "
        f"prepare_dataset('revisitop1m', 'data/paper', mirror={mirror_url!r})"
    )
    evaluate = [
        *("-m", "msvlad", "evaluate", "--method", "msvlad"),
        *("--checkpoint", "runs/msvlad/model.pt", "--distractors", "revisitop1m"),
        *("--dataset", "roxford5k", "--dataset", "rparis6k", "--out", R1M_OUT),
    ]
    script = (
        f"{sys.executable} -c {shlex.quote(fetch)} && {shlex.join([sys.executable, *evaluate])}"
    )
    return subprocess.run(
        ["nice", "-n", "10", "sh", "-c", script],
        cwd=workspace,
        env=environment(workspace),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def main() -> int:
    """Run the rehearsal; print the stages, the results table and the wall time."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="Scratch folder to keep (default: temporary)")
    args = parser.parse_args()
    scratch = args.keep or Path(tempfile.mkdtemp(prefix="msvlad-rehearsal-"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        result = rehearse(scratch)
        print(result.output[-4000:] if result.returncode else "")
        print(f"stages ({len(result.stages)}): {', '.join(result.stages)}")
        table = result.workspace / "reports" / "tables" / "results.md"
        if table.is_file():
            print(table.read_text())
        print(f"dvc exp run: exit {result.returncode}, {result.seconds:.0f} s wall")
        if result.r1m is not None:
            print(result.r1m.stdout[-4000:] if result.r1m.returncode else "")
            summary = result.workspace / R1M_OUT / "summary.json"
            if summary.is_file():
                print(f"+1M ({R1M_OUT}/summary.json): {summary.read_text()}")
            print(f"+1M evaluation: exit {result.r1m.returncode}")
        return result.returncode or (result.r1m.returncode if result.r1m else 0)
    finally:
        if args.keep is None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
