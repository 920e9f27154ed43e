"""The paper profile rehearsed end to end by `dvc exp run` (tests/rehearsal.py): every stage of
every results-table row, on replicas of every official download served from 127.0.0.1."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import yaml

from rehearsal import R1M_OUT, REPO, SIZES, environment, rehearse


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


def _traces() -> dict[str, bool]:
    """What the rehearsal would leave outside its scratch folder: its data root, its +1M results,
    its random weight file in the real torch cache (the tree is shared: others write runs/ and
    results/, so their git status is no test of this)."""
    import torch

    from replicas import Mirror

    weights = Path(torch.hub.get_dir()) / "checkpoints" / Mirror().weights_url.rsplit("/", 1)[-1]
    return {str(p): p.exists() for p in (REPO / "data" / "paper", REPO / R1M_OUT, weights)}


@pytest.mark.slow
@pytest.mark.rehearsal  # 9 min on 2 idle cores (longer when shared): outside the CI command
def test_rehearsal_runs_the_paper_profile_end_to_end(tmp_path):
    before = _traces()
    result = rehearse(tmp_path)
    assert result.returncode == 0, result.output[-6000:]
    ws = result.workspace
    paper = yaml.safe_load((REPO / "params.paper.yaml").read_text())
    used = result.params()

    # only the sizes and the researcher's inputs differ from the paper profile
    changed = {k for k, v in _leaves(paper).items() if _leaves(used).get(k, object()) != v}
    inputs = {"data.mirror", "prepare.holidays_rotations", "model.weights_sha256"}
    sized = {k for k in SIZES if not k.endswith(".set")} | {"methods.msvlad-maxside.set"}
    assert changed <= inputs | sized, changed - inputs - sized
    assert used["model"]["backbone"] == "resnet101" and used["model"]["weights"] == "cirtorch"
    assert _dotted(used, "model.weights_sha256") == result.mirror.weights_sha256

    # every stage of every row ran, and every download came from the local mirror
    methods = list(paper["methods"])
    expected = {"prepare", "report"} | {
        f"{s}@{m}" for s in ("cluster", "train", "whiten", "evaluate") for m in methods
    }
    assert set(result.stages) == expected
    assert result.requests and all(status == 200 for _, _, status in result.requests)
    served = {path for path, _, _ in result.requests}
    assert "/" + result.mirror.weights_url.split("://", 1)[1] in served

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
    for nb in ("results", "rankings", "triplets", "training"):
        assert (ws / "reports" / "notebooks" / f"{nb}.html").is_file(), nb
        assert (ws / "reports" / "notebooks" / f"{nb}.ipynb").is_file(), nb

    # nothing outside the scratch folder was written: every cache points into it, and no trace
    # of the run is in the repository or the real torch cache
    env = environment(ws)
    for key in ("HOME", "TMPDIR", "TORCH_HOME", "DVC_SITE_CACHE_DIR", "MSVLAD_CACHE"):
        assert Path(env[key]).is_relative_to(tmp_path), key
    assert _traces() == before
