"""The CPU allocator setting every command applies: freed memory is reused, not faulted in again."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import msvlad.cli
from msvlad.runtime import ALLOCATOR_ENV

# in a fresh interpreter: minor page faults per call of a conv whose 50 MB output is freed each time
PROBE = """
import json, resource
import torch
from msvlad.runtime import tune_allocator
applied = tune_allocator()
torch.manual_seed(0)
conv = torch.nn.Conv2d(3, 32, 3)
x = torch.rand(8, 3, 224, 224)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
with torch.inference_mode():
    for _ in range(2):  # warm-up: the heap grows to the call's working set
        y = conv(x)
        del y
    before = faults()
    for _ in range(3):
        y = conv(x)
        del y
print(json.dumps({"applied": applied, "faults": (faults() - before) / 3}))
"""

PAGES = 8 * 32 * 222 * 222 * 4 // 4096  # the output's 4 KiB pages (12,321)


def probe(env_value: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != ALLOCATOR_ENV}
    if env_value is not None:
        env[ALLOCATOR_ENV] = env_value
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="glibc's mallopt (Linux) only"
)


@glibc
def test_tuned_allocator_reuses_freed_memory():
    tuned = probe(None)
    assert tuned["applied"] is True
    assert tuned["faults"] < PAGES * 0.05  # the freed output is reused: (almost) no new faults


@glibc
def test_system_setting_leaves_the_default_allocator():
    system = probe("system")
    assert system["applied"] is False
    # glibc's default: a block this large is mmapped and unmapped on free: faulted in every call
    assert system["faults"] >= PAGES * 0.9


def test_every_command_tunes_the_allocator_first(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setattr(msvlad.cli, "tune_allocator", lambda: calls.append(True) or True)
    missing = tmp_path / "absent.yaml"
    code = msvlad.cli.main(["info", "--params", str(missing)])
    assert calls == [True]
    assert code == 2 and "absent.yaml" in capsys.readouterr().err
