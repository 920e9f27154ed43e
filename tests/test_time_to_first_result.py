"""The time-to-first-result script: stage times from stamped DVC output; a clone, repro, check."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from benchmarks import time_to_first_result as ttfr


def _stamped(*events: tuple[float, str]) -> list[tuple[float, str]]:
    return list(events)


def test_stage_times_come_from_the_stamped_dvc_output():
    lines = _stamped(
        (1.0, "Running stage 'prepare':\n"),
        (2.0, "> python -m msvlad prepare\n"),
        (11.0, "Updating lock file 'dvc.lock'\n"),
        (12.5, "Running stage 'cluster@a':\n"),
        (15.5, "Updating lock file 'dvc.lock'\n"),
        (16.0, "Stage 'cluster@b' didn't change, skipping\n"),
        (16.5, "Stage 'cluster@d' is cached - skipping run, checking out outputs\n"),
        (17.0, "Running stage 'cluster@c':\n"),
        (19.0, "Updating lock file 'dvc.lock'\n"),
        (19.5, "Running stage 'report':\n"),
    )
    repro = ttfr.parse_stamped(lines, start=0.0, end=25.0)
    assert [(s.name, s.seconds) for s in repro.stages] == [
        ("prepare", 10.0),
        ("cluster@a", 3.0),
        ("cluster@c", 2.0),
        ("report", 5.5),  # still running when the output ended: up to the end
    ]
    assert repro.skipped == ["cluster@b"] and repro.restored == ["cluster@d"]
    assert repro.between == pytest.approx(1.0 + 1.5 + 1.5 + 0.5)  # everything not in a stage
    assert repro.wall == 25.0
    rows = {r["stage"]: r for r in ttfr.by_kind(repro)}
    assert list(rows) == ["prepare", "cluster", "report", ttfr.BETWEEN]
    assert rows["cluster"] == {
        "stage": "cluster",
        "count": 2,
        "total_s": 5.0,
        "mean_s": 2.5,
        "min_s": 2.0,
        "max_s": 3.0,
    }
    total = sum(r["total_s"] for r in rows.values())
    assert total == pytest.approx(repro.wall)  # every second is in one row
    text = ttfr.table(list(rows.values()), repro.wall)
    assert "| cluster | 2 | 5 s | 2.5 s (2.0-3.0) |" in text and "**25 s**" in text


def _tiny_dvc_repo(root: Path) -> Path:
    """A git + DVC repository with two stages and its dvc.lock committed."""
    repo = root / "repo"
    repo.mkdir()
    py = sys.executable
    (repo / "dvc.yaml").write_text(
        "stages:\n"
        "  make:\n"
        f"    cmd: {py} -c \"open('a.txt','w').write('a')\"\n"
        "    outs:\n"
        "      - a.txt\n"
        "  copy:\n"
        "    foreach: [x, y]\n"
        "    do:\n"
        f"      cmd: {py} -c \"open('b_${{item}}.txt','w')"
        f".write(open('a.txt').read() + '${{item}}')\"\n"
        "      deps:\n"
        "        - a.txt\n"
        "      outs:\n"
        "        - b_${item}.txt\n"
    )
    env_bin = Path(sys.prefix) / "bin"

    def run(*cmd: str) -> None:
        subprocess.run(cmd, cwd=repo, check=True, capture_output=True)

    run("git", "init", "-q")
    run("git", "config", "user.email", "t@example.org")
    run("git", "config", "user.name", "t")
    run(str(env_bin / "dvc"), "init", "-q")
    run(str(env_bin / "dvc"), "repro")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "pipeline")
    return repo


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_a_fresh_clone_is_timed_checked_and_repro_again_is_a_no_op(tmp_path, capsys):
    repo = _tiny_dvc_repo(tmp_path)
    out = tmp_path / "ttfr.json"
    code = ttfr.main(["--repo", str(repo), "--workdir", str(tmp_path / "w"), "--json", str(out)])
    assert code == 0
    import json

    record = json.loads(out.read_text())
    names = sorted(s["name"] for s in record["repro"]["stages"])
    assert names == ["copy@x", "copy@y", "make"]
    assert record["clean"] and record["second_repro"]["stages_run"] == []
    kinds = {r["stage"]: r["count"] for r in record["repro"]["by_kind"]}
    assert kinds == {"make": 1, "copy": 2, ttfr.BETWEEN: 3}
    printed = capsys.readouterr().out
    assert "git status and dvc status clean: True" in printed
    assert "stages run: none" in printed
    assert not (tmp_path / "w").exists()  # not kept without --keep
