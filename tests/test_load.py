"""Load: 200 real git clients at once against the real ``gittornado`` command.

A spawned server (not the in-process one) so that its memory and its child
processes can be measured from outside while the burst runs, and so that the
200 clients compete with a server that has the machine to itself, as in
production.  The burst is bounded: 200 commands, started together, with an
overall deadline.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Dict, List, Tuple

import deploy_helpers
import pytest
from conftest import GitClient, GitResult, make_repo, wait_until

#: Clients of each kind in the burst (4 kinds, 200 in all).
PER_KIND = 50
#: Seconds the whole burst may take before the test fails.
DEADLINE = 90.0
MIB = 1024 * 1024


def _children_by_parent() -> Dict[int, List[int]]:
    tree: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != b"Z":
                tree.setdefault(int(fields[1]), []).append(int(entry))
    return tree


def descendants(pid: int) -> List[int]:
    """Live processes below ``pid`` (git, pack-objects, index-pack, hooks...)."""
    tree, found, todo = _children_by_parent(), [], [pid]
    while todo:
        children = tree.get(todo.pop(), [])
        found += children
        todo += children
    return found


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class ServerSampler:
    """Samples a server's RSS and its number of child processes from a thread."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_rss = self.start_rss = rss(pid)
        self.peak_children = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, rss(self.pid))
            self.peak_children = max(self.peak_children, len(descendants(self.pid)))
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> ServerSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def branches_for_pushers(git: GitClient, work: Path, base: str, count: int) -> List[str]:
    """``count`` distinct commits on ``base``, each with its own file, made by one fast-import."""
    stream = []
    for n in range(count):
        content = f"pushed by client {n}\n" * 50
        stream.append(
            f"blob\nmark :{2 * n + 1}\ndata {len(content)}\n{content}\n"
            f"commit refs/heads/push-{n}\nmark :{2 * n + 2}\n"
            f"committer Load <load@example.com> {1700000000 + n} +0000\ndata 7\nload {n:02d}\n"
            f"from {base}\nM 644 :{2 * n + 1} load-{n}.txt\n\n"
        )
    subprocess.run(
        ["git", "fast-import", "--quiet"],
        cwd=work,
        env=git.env,
        input="".join(stream).encode(),
        check=True,
        capture_output=True,
    )
    return [git.sync("rev-parse", f"refs/heads/push-{n}", cwd=work).strip() for n in range(count)]


@pytest.mark.gen_test(timeout=DEADLINE + 60)
async def test_200_concurrent_clients(
    services: deploy_helpers.Services, git: GitClient, gitbase: Path, tmp_path: Path
):
    repo = make_repo(git, gitbase, "load.git")
    server = services.gittornado(gitbase, "--log-level", "warning")  # anyone may push
    url = f"{server.url}/load.git"

    # Fetchers start one commit behind, so each fetch transfers something.
    fetchers = tmp_path / "fetchers"
    git.sync("clone", "-q", str(repo), str(fetchers / "f0"))
    git.sync("remote", "set-url", "origin", url, cwd=fetchers / "f0")
    for n in range(1, PER_KIND):
        subprocess.run(["cp", "-a", str(fetchers / "f0"), str(fetchers / f"f{n}")], check=True)
    work = tmp_path / "pushers"
    git.sync("clone", "-q", str(repo), str(work))
    base = git.sync("rev-parse", "HEAD", cwd=work).strip()
    git.sync("commit", "-q", "--allow-empty", "-m", "new on the server", cwd=work)
    git.sync("push", "-q", "origin", "HEAD:main", cwd=work)
    main = git.sync("rev-parse", "HEAD", cwd=work).strip()
    pushed = branches_for_pushers(git, work, base, PER_KIND)

    commands: List[Tuple[str, Tuple[str, ...], Path]] = []
    for n in range(PER_KIND):
        commands.append(("ls-remote", ("ls-remote", url), tmp_path))
        commands.append(("clone", ("clone", "-q", url, str(tmp_path / "clones" / f"c{n}")), tmp_path))
        commands.append(("fetch", ("fetch", "-q", "origin"), fetchers / f"f{n}"))
        commands.append(("push", ("push", "-q", url, f"refs/heads/push-{n}:refs/heads/load-{n}"), work))

    async def run(kind: str, args: Tuple[str, ...], cwd: Path) -> Tuple[str, float, GitResult]:
        started = time.monotonic()
        result = await git.run(*args, cwd=cwd, check=False)
        return kind, time.monotonic() - started, result

    started = time.monotonic()
    with ServerSampler(server.proc.pid) as sampler:
        results = await asyncio.wait_for(
            asyncio.gather(*(run(kind, args, cwd) for kind, args, cwd in commands)), DEADLINE
        )
        elapsed = time.monotonic() - started
    assert await wait_until(lambda: not descendants(server.proc.pid), timeout=15), "git left running"
    end_rss = rss(server.proc.pid)

    durations = sorted(seconds for _, seconds, _ in results)
    report = (
        f"{len(results)} clients in {elapsed:.1f} s (slowest {durations[-1]:.1f} s, "
        f"median {durations[len(durations) // 2]:.2f} s); server RSS {sampler.start_rss / MIB:.0f} MiB "
        f"before, peak {sampler.peak_rss / MIB:.0f} MiB, {end_rss / MIB:.0f} MiB after; "
        f"peak {sampler.peak_children} child processes over {sampler.samples} samples"
    )
    print(report)
    failures = [(kind, r.returncode, r.stderr[-300:]) for kind, _, r in results if r.returncode != 0]
    assert failures == [], f"{len(failures)} failed: {failures[:5]}\n{report}"
    # Each request in flight runs at most two git processes (upload-pack and
    # pack-objects, or receive-pack and index-pack/unpack-objects).
    assert sampler.peak_children <= 2 * len(commands), report
    assert sampler.peak_rss - sampler.start_rss < 150 * MIB, report
    assert end_rss - sampler.start_rss < 50 * MIB, report

    for n in range(PER_KIND):
        assert git.sync("rev-parse", f"refs/heads/load-{n}", cwd=repo).strip() == pushed[n]
        assert git.sync("rev-parse", "origin/main", cwd=fetchers / f"f{n}").strip() == main
        assert git.sync("rev-parse", "HEAD", cwd=tmp_path / "clones" / f"c{n}").strip() == main
    assert git.sync("fsck", "--no-progress", cwd=repo) == ""
    log = server.log()
    assert "Traceback" not in log and " ERROR " not in log, log[-2000:]
