"""The benchmark of issue 5, on tiny repositories for one round, so it never rots.

Only that it runs and produces every row with sane numbers is checked here;
the targets are checked by the full run (``python -m benchmarks.run``), never
by timed unit tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from conftest import require_program

ROOT = Path(__file__).resolve().parent.parent
TOOLS = {"git": "git", "curl": "curl", "wrk": "wrk", "nginx": "nginx", "fcgiwrap": "fcgiwrap"}
WORKLOADS = {
    "clone-small": ("gittornado", "http-backend", "upload-pack"),
    "clone-big": ("gittornado", "http-backend", "upload-pack"),
    "push-small": ("gittornado", "http-backend"),
    "push-big": ("gittornado", "http-backend"),
    "clone-transfer": ("gittornado", "http-backend", "upload-pack"),
    "git-clone": ("gittornado", "http-backend"),
    "info-refs-1": ("gittornado", "http-backend"),
    "info-refs-32": ("gittornado", "http-backend"),
    "parallel-16": ("gittornado", "http-backend", "upload-pack"),
    "haves-40k": ("gittornado", "http-backend", "upload-pack"),
    "haves-40k-64k": ("gittornado", "http-backend", "upload-pack"),
    "latency-8": ("gittornado", "http-backend"),
}


def fcgiwrap_processes() -> set[int]:
    """The fcgiwrap processes running now."""
    return {
        int(pid)
        for pid in subprocess.run(["pgrep", "-x", "fcgiwrap"], capture_output=True, text=True).stdout.split()
    }


def test_smoke_run_produces_every_row(tmp_path: Path) -> None:
    for program, package in TOOLS.items():
        require_program(program, package)
    before = fcgiwrap_processes()
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    # http-backend's fcgiwrap and its preforked children all end (killed ones take a moment to be reaped).
    deadline = time.monotonic() + 10
    while not fcgiwrap_processes() <= before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert fcgiwrap_processes() <= before
    data = json.loads((tmp_path / "results.json").read_text())
    table = (tmp_path / "results.md").read_text()
    assert set(data["workloads"]) == set(WORKLOADS)
    for key, targets in WORKLOADS.items():
        workload = data["workloads"][key]
        assert workload["label"] in table
        assert set(workload["runs"]) == set(targets), key
        for target, runs in workload["runs"].items():
            assert len(runs) == 1, (key, target)
            assert runs[0]["value"] > 0, (key, target)
            if target != "upload-pack":
                # The server's own memory was sampled, and is plausible (1 MiB .. 1 GiB).
                own = max(sample[1] for sample in runs[0]["memory"])
                assert 2**20 < own < 2**30, (key, target, own)
    checks = {c["target"] for c in data["checks"]}
    assert len(checks) == 14 and all(c["met"] is not None for c in data["checks"])
    for name in ("git", "python", "tornado", "cpu"):
        assert data["versions"][name] in table
