"""What housekeeping buys: full-clone replies after many pushes, with and without gittornado's maintenance.

Two measurements, each the median time of plain ``git upload-pack`` answering
the request a fresh ``git clone`` sends (:func:`benchmarks.workloads.replay`
on :class:`~benchmarks.workloads.PlainUploadPack`: no HTTP, so only the
repository's shape counts):

1. A history-rich repository after 300 small pushes (``receive.unpackLimit=1``:
   each push keeps its pack, as every push of 100 objects or more does): as
   the pushes left it, after :func:`gittornado.maintenance.maintain` (the
   geometric repack that runs after pushes, and the daily full one), and a
   freshly repacked copy (``git repack -a -d --write-bitmap-index``).  The
   goal: the maintained reply within 1.2x of the fresh one.
2. The history-rich repository as a first push leaves it (one pack, no
   bitmap, no commit-graph), before and after maintenance.

Run ``python -m benchmarks.housekeeping`` (``--quick``: a smaller repository,
under 3 minutes).  Repositories are built once and cached under
``benchmarks/work/`` (see :mod:`benchmarks.repos`).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from gittornado.maintenance import FULL_STAMP, MaintenanceSettings, maintain

from .repos import WORK, HistorySpec, build, git_env
from .workloads import PlainUploadPack, fetch_request, replay, response_size

QUICK = HistorySpec(commits=6000, files=3000, blob_bytes=3000, tag_every=500)
FULL = HistorySpec(commits=10000, files=5000, blob_bytes=4000)
PUSHES = 300
GOAL = 1.2


def run(env: Dict[str, str], *argv: str, cwd: Optional[Path] = None) -> None:
    subprocess.run(["git", *argv], env=env, cwd=cwd, check=True, capture_output=True)


def copy(source: Path, name: str) -> Path:
    target = WORK / "housekeeping" / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target, symlinks=True)
    return target


def clone_reply(repo: Path, env: Dict[str, str], repetitions: int) -> float:
    """Median seconds plain upload-pack takes to answer a full clone of ``repo``."""
    request = repo.parent / f"{repo.name}.request"
    request.write_bytes(fetch_request(repo, env))
    expected = response_size(repo, request, env)  # also warms the page cache
    target = PlainUploadPack(env)
    return statistics.median(replay(target, repo, request, expected).value for _ in range(repetitions))


def maintained(repo: Path, env: Dict[str, str], full: bool) -> float:
    """Maintain ``repo`` as the server would; return how long it took.  ``full``: the daily full repack."""
    if not full:
        (repo / FULL_STAMP).touch()  # the last full run was recent: this is the run after pushes
    started = time.perf_counter()
    result = asyncio.run(maintain(str(repo), MaintenanceSettings(env=env)))
    if result != "ok":
        raise RuntimeError(f"maintenance of {repo} ended {result}")
    return time.perf_counter() - started


def push_many(base: Path, env: Dict[str, str], count: int) -> Path:
    """A copy of ``base`` after ``count`` small pushes, each keeping its own pack."""
    repo = copy(base, "pushed.git")
    run(env, "config", "receive.unpackLimit", "1", cwd=repo)
    run(env, "config", "receive.autogc", "false", cwd=repo)  # nothing tidies up: what pushes alone leave
    work = WORK / "housekeeping" / "work"
    shutil.rmtree(work, ignore_errors=True)
    run(env, "clone", "-q", str(repo), str(work))
    for number in range(count):
        (work / "pushed.txt").write_text(f"push {number}\n")
        run(env, "add", "pushed.txt", cwd=work)
        run(env, "commit", "-q", "-m", f"push {number}", cwd=work)
        run(env, "push", "-q", "origin", "HEAD:main", cwd=work)
    shutil.rmtree(work)
    return repo


def packs(repo: Path) -> int:
    return len(list((repo / "objects" / "pack").glob("*.pack")))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.housekeeping", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="a smaller repository, under 3 minutes")
    args = parser.parse_args(argv)
    spec = QUICK if args.quick else FULL
    repetitions = 5 if args.quick else 7
    home = WORK / "home"
    home.mkdir(parents=True, exist_ok=True)
    env = git_env(home)
    base = build(spec, home)

    print(f"1. {spec.name} after {PUSHES} small pushes (full-clone reply, median of {repetitions})")
    pushed = push_many(base, env, PUSHES)
    geometric, full, fresh = (
        copy(pushed, "geometric.git"),
        copy(pushed, "full.git"),
        copy(pushed, "fresh.git"),
    )
    times = {
        "geometric": maintained(geometric, env, full=False),
        "full": maintained(full, env, full=True),
    }
    started = time.perf_counter()
    run(env, "repack", "-a", "-d", "-q", "--write-bitmap-index", cwd=fresh)
    times["fresh"] = time.perf_counter() - started
    shapes = {"pushed": pushed, "geometric": geometric, "full": full, "fresh": fresh}
    replies = {name: clone_reply(repo, env, repetitions) for name, repo in shapes.items()}
    for name, repo in shapes.items():
        ratio = replies[name] / replies["fresh"]
        took = f", housekeeping took {times[name]:.1f} s" if name in times else ", no housekeeping"
        print(f"   {name:10} {replies[name]:7.3f} s  {ratio:5.2f}x fresh  ({packs(repo)} packs{took})")
    worst = max(replies["geometric"], replies["full"]) / replies["fresh"]
    verdict = "met" if worst <= GOAL else "MISSED"
    print(f"   goal: maintained within {GOAL}x of fresh: {verdict} ({worst:.2f}x)")

    print(f"2. {spec.name} as a first push leaves it (one pack, no bitmap), full-clone reply")
    before = copy(base, "before.git")
    for leftover in [
        *(before / "objects" / "pack").glob("*.bitmap"),
        before / "objects" / "info" / "commit-graph",
    ]:
        leftover.unlink(missing_ok=True)
    shutil.rmtree(before / "objects" / "info" / "commit-graphs", ignore_errors=True)
    after = copy(before, "after.git")
    took = maintained(after, env, full=True)
    reply_before, reply_after = clone_reply(before, env, repetitions), clone_reply(after, env, repetitions)
    print(f"   before maintenance {reply_before:7.3f} s")
    speedup = reply_before / reply_after
    print(
        f"   after maintenance  {reply_after:7.3f} s  ({speedup:.1f}x faster; maintenance took {took:.1f} s)"
    )
    shutil.rmtree(WORK / "housekeeping")
    return 0 if worst <= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
