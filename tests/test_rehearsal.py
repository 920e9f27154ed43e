"""The paper profile rehearsed end to end by `dvc exp run` (tests/rehearsal.py): every stage of
every results-table row, on replicas of every official download served from 127.0.0.1."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from msvlad.nn.backbones import BACKBONES
from msvlad.report.notebooks import NOTEBOOKS
from rehearsal import (
    R1M_OUT,
    REPO,
    ROW_SIZES,
    SIZES,
    environment,
    network_rows,
    rehearse,
    row_backbones,
)


def _dotted(tree: dict, key: str) -> object:
    for part in key.split("."):
        tree = tree[part]
    return tree


def _leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and k != "set":
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _backbone(params: dict, row: str) -> str:
    return params["methods"][row].get("set", {}).get("model.backbone", params["model"]["backbone"])


def _traces() -> dict[str, bool]:
    """What the rehearsal would leave outside its scratch folder: its data root, its +1M results,
    its random weight files in the real torch cache (the tree is shared: others write runs/ and
    results/, so their git status is no test of this)."""
    from replicas import Mirror

    cache = Path(torch.hub.get_dir()) / "checkpoints"
    weights = [cache / Mirror().weights_url.rsplit("/", 1)[-1]] + [
        cache / BACKBONES[b].urls["cirtorch"].rsplit("/", 1)[-1] for b in ("resnet50", "vgg16")
    ]
    return {str(p): p.exists() for p in (REPO / "data" / "paper", REPO / R1M_OUT, *weights)}


@pytest.mark.slow
@pytest.mark.rehearsal  # 9 min on 2 idle cores (longer when shared): outside the CI command
def test_rehearsal_runs_the_paper_profile_end_to_end(tmp_path):
    before = _traces()
    result = rehearse(tmp_path)
    assert result.returncode == 0, result.output[-6000:]
    ws = result.workspace
    paper = yaml.safe_load((REPO / "params.paper.yaml").read_text())
    used = result.params()

    # only the sizes and the researcher's inputs differ from the paper profile; a row's own
    # overrides (sizes, its backbone's pin) are added to its `set`, which keeps every paper key
    changed = {k for k, v in _leaves(paper).items() if _leaves(used).get(k, object()) != v}
    inputs = {"data.mirror", "prepare.holidays_rotations", "model.weights_sha256"}
    sized = {k for k in SIZES if not k.endswith(".set")}
    shrunk, pinned = (
        network_rows(REPO / "params.paper.yaml"),
        row_backbones(REPO / "params.paper.yaml"),
    )
    rows = {"msvlad-maxside", *shrunk, *pinned}
    assert changed <= inputs | sized | {f"methods.{r}.set" for r in rows}, changed - inputs - sized
    for row in rows:
        own = {**paper["methods"][row].get("set", {})}
        own |= SIZES.get(f"methods.{row}.set", {}) | (ROW_SIZES if row in shrunk else {})
        if row in pinned:
            own["model.weights_sha256"] = result.mirror.trunks[pinned[row]]
        assert used["methods"][row]["set"] == own, row
    assert used["model"]["backbone"] == "resnet101" and used["model"]["weights"] == "cirtorch"
    assert _dotted(used, "model.weights_sha256") == result.mirror.weights_sha256
    # the rows of the network claims: ResNet-50 and VGG16 rows, trained controls
    assert set(pinned.values()) == {"resnet50", "vgg16"}
    assert {"netvlad", "gem", "msvlad-nosplit", "msvlad-2x2"} <= set(shrunk)

    # every stage of every row ran, and every download came from the local mirror
    methods = list(paper["methods"])
    # a row's train stage runs its k-means, training and whitening
    expected = {"prepare", "report"} | {f"{s}@{m}" for s in ("train", "evaluate") for m in methods}
    assert set(result.stages) == expected
    assert result.requests and all(status == 200 for _, _, status in result.requests)
    served = {path for path, _, _ in result.requests}
    assert "/" + result.mirror.weights_url.split("://", 1)[1] in served
    for backbone in ("resnet50", "vgg16"):  # each other backbone's official file, pinned per row
        assert "/" + BACKBONES[backbone].urls["cirtorch"].split("://", 1)[1] in served, backbone

    # the row that differs only in its test-time policy shares the paper row's training run
    assert "the same training as the finished run runs/msvlad/train, copied" in result.output
    trained = [(ws / "runs" / m / "train" / "model.pt").read_bytes() for m in methods[:2]]
    assert methods[:2] == ["msvlad", "msvlad-maxside"] and trained[0] == trained[1]

    # the results table holds every paper test set for every row, and a number in each cell
    tests = paper["data"]["test_sets"]
    with open(ws / "reports" / "tables" / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for ds in tests:
        assert any(col.startswith(f"{ds} mAP") for col in rows[0]), (ds, list(rows[0]))
    labels = {r["Method"] for r in rows}
    assert {m["label"] for m in paper["methods"].values()} <= labels
    for r in rows:
        for col, value in r.items():
            if " mAP" in col:
                assert 0.0 <= float(value) <= 100.0, (r["Method"], col, value)
    for m in methods:
        metrics = ws / "results" / "evaluate" / m / "metrics.json"
        assert metrics.is_file(), m
    # each row's network is the one its label states: backbone, pooling and raw dimension
    k = paper["model"]["num_clusters"]
    raw_dims = {
        "msvlad": k * 512,  # ResNet-101: 2048 channels in 4 chunks of 512
        "netvlad": k * 2048,  # single-scale cells, whole 2048-d
        "msvlad-nosplit": k * 2048,
        "msvlad-2x2": k * 512,
        "gem": 2048,
        "r50-msvlad": k * 512,
        "r50-gem-ots": 2048,
        "vgg16-msvlad": k * 512,  # 512 channels: one chunk per local
        "vgg16-gem-ots": 512,
    }
    for m, dim in raw_dims.items():
        js = json.loads((ws / "results" / "evaluate" / m / "metrics.json").read_text())
        assert js[tests[0]]["raw"]["dim"] == dim, (m, js[tests[0]]["raw"]["dim"])
        manifest = json.loads((ws / "results" / "evaluate" / m / "manifest.json").read_text())
        model = torch.load(ws / "runs" / m / "model.pt", map_location="cpu", weights_only=True)
        assert model["config"]["backbone"] == _backbone(used, m), m
        assert manifest["checkpoint"]["sha256"], m
    # the trained GeM learns its exponent (cirtorch's learnable p); off-the-shelf GeM keeps 3
    p_trained = torch.load(ws / "runs" / "gem" / "train" / "model.pt", weights_only=True)
    p_ots = torch.load(ws / "runs" / "gem-ots" / "train" / "model.pt", weights_only=True)
    assert float(p_ots["state_dict"]["pooling.p"]) == paper["model"]["gem_p"]
    assert float(p_trained["state_dict"]["pooling.p"]) != paper["model"]["gem_p"]
    # the trained rows of the claims ran their mining rounds, like the paper row
    for m in ("netvlad", "gem", "msvlad-nosplit", "msvlad-2x2", "r50-msvlad", "vgg16-msvlad"):
        rounds = (ws / "runs" / m / "train" / "rounds.csv").read_text().splitlines()
        assert len(rounds) >= 2, m
    for ds, (n_db, n_q) in result.mirror.sizes.items():
        feats = ws / "results" / "evaluate" / "msvlad" / ds / "features.npz"
        with np.load(feats) as z:
            assert z["db"].shape[0] == n_db and z["q"].shape[0] == n_q, ds

    # the +1M rows: the distractors come from the mirror and rank past the dataset's images
    assert result.r1m is not None and result.r1m.returncode == 0, result.r1m.stdout[-4000:]
    with np.load(ws / R1M_OUT / "revisitop1m_features.npz") as z:
        assert z["db"].shape[0] == result.mirror.distractors
    for ds in ("roxford5k", "rparis6k"):
        n_db, n_q = result.mirror.sizes[ds]
        ranks = np.load(ws / R1M_OUT / f"{ds}+revisitop1m" / "ranks.npy")
        assert ranks.shape == (n_db + result.mirror.distractors, n_q), ds

    # figures and executed notebooks, as a real run writes them
    assert list((ws / "reports" / "figures").rglob("*.png"))
    for nb in NOTEBOOKS:
        assert (ws / "reports" / "notebooks" / f"{nb}.html").is_file(), nb
        assert (ws / "reports" / "notebooks" / f"{nb}.ipynb").is_file(), nb

    # nothing outside the scratch folder was written: every cache points into it, and no trace
    # of the run is in the repository or the real torch cache
    env = environment(ws)
    for key in ("HOME", "TMPDIR", "TORCH_HOME", "DVC_SITE_CACHE_DIR", "MSVLAD_CACHE"):
        assert Path(env[key]).is_relative_to(tmp_path), key
    assert _traces() == before


def test_rehearsal_overrides_keep_each_rows_own_settings(tmp_path):
    """The -S arguments, applied as `dvc exp run` applies them, add the sizes and pins to each
    row's `set` and keep the row's own keys (the ResNet-50/VGG16 rows stay on their backbone)."""
    from dvc.utils.hydra import apply_overrides

    from msvlad.config import load_params, method_params
    from rehearsal import inputs, merge_sets, set_params

    paper = REPO / "params.paper.yaml"
    backbones = row_backbones(paper)
    assert backbones == {
        f"{prefix}-{row}": name
        for prefix, name in (("r50", "resnet50"), ("vgg16", "vgg16"))
        for row in ("msvlad", "msvlad-ots", "gem-ots")
    }
    shrunk = network_rows(paper)
    assert "msvlad" not in shrunk and "msvlad-hardest" not in shrunk and "msvlad-ots" not in shrunk
    assert {"netvlad", "gem", "msvlad-nosplit", "msvlad-2x2", *backbones} <= set(shrunk)
    pins = {row: f"{i:064x}" for i, row in enumerate(backbones, start=1)}
    overrides = merge_sets(
        inputs("http://127.0.0.1:1", tmp_path / "rot.yaml", "f" * 64, pins),
        SIZES,
        {f"methods.{row}.set": ROW_SIZES for row in shrunk},
    )
    params = tmp_path / "params.yaml"
    params.write_text(paper.read_text())
    apply_overrides(params, [a for a in set_params(overrides) if a != "-S"])
    used, original = load_params(params), load_params(paper)
    for row in used.methods:
        run, own = method_params(used, row), method_params(original, row)
        assert run.model.backbone == own.model.backbone == backbones.get(row, "resnet101"), row
        assert run.model.weights_sha256 == pins.get(row, "f" * 64), row
        assert run.train.epochs == (1 if row in shrunk else 2), row
        assert run.extract.scales == ([1.0] if row in shrunk else own.extract.scales), row
        assert (run.model.pooling, run.model.split) == (own.model.pooling, own.model.split), row
    assert method_params(used, "msvlad-nosplit").model.split is None
    assert method_params(used, "msvlad-nosplit").model.image_size == 96
    assert method_params(used, "msvlad-2x2").model.pool_sizes == [2]
    assert method_params(used, "netvlad").whiten.num_images == 16384
    maxside = method_params(used, "msvlad-maxside").extract
    assert (maxside.image_size, maxside.resize) == (128, "max_side")
