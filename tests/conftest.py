"""Shared fixtures: seeded generators, the repo root, the device under test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture
def device() -> torch.device:
    return torch.device(os.environ.get("TORCH_DEVICE", "cpu"))


@pytest.fixture
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session", autouse=True)
def _msvlad_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Frozen-trunk caches of the tests (and their subprocesses) go to a scratch folder."""
    os.environ["MSVLAD_CACHE"] = str(tmp_path_factory.mktemp("msvlad-cache"))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: compared runs (in process and in a subprocess) reduce
    alike, and tiny tensors do not stall in OpenMP spinning on a loaded machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
