"""``python -m benchmarks.storm``: clone storms, with and without the pack-objects cache, side by side.

Three targets serve the same history-rich repository: gittornado with
``--pack-cache`` (default settings: a fetch is cached from its second
identical request on), gittornado without it, and ``git http-backend`` behind
nginx + fcgiwrap.  Every workload starts from an empty cache.  Measured:

* one full clone's transfer (its upload-pack request replayed with curl),
  then 8 and 32 identical ones at once: wall time until the last finishes,
  and the server's CPU seconds (its whole process tree, git included, from
  ``/proc``);
* 32 real ``git clone --bare`` at once, each checked with ``git fsck``
  (cache target only);
* a repeated clone once the entry exists (cache target only);
* a tiny fetch (one new commit: the upload-pack request of a client that
  has all but the last commit of a 3-commit repository, replayed with curl),
  as a first request and repeated; and a tiny clone of that repository,
  which always goes through the hook: the hook's start-up cost.

``--quick``
uses a smaller repository and one round (under 2 minutes); the full run uses
the history repository of :mod:`benchmarks.run`, three rounds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from .memory import MemorySampler, process_table
from .repos import REPOS, HistorySpec, build, git_env, pack_bytes
from .run import FULL
from .servers import GittornadoServer, HttpBackendServer, temp_dir
from .workloads import BenchmarkError, check_replay, curl_replay, fetch_request, median, response_size

MIB = 1024 * 1024
QUICK = HistorySpec(commits=2000, files=1000, blob_bytes=4000, tag_every=500)
TINY = HistorySpec(commits=3, files=3, blob_bytes=100, tag_every=0)
CACHED, PLAIN, BACKEND = "gittornado+cache", "gittornado", "http-backend"
TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu(server) -> float:
    """CPU seconds of the server's process tree, reaped children included."""
    tree, _ = server.classify(process_table())
    total = 0
    for pid in tree:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
    return total / TICK


class Storm:
    """``count`` identical requests at once: wall time, server CPU and memory.

    Timed storms replay the upload-pack request of a full clone with curl
    (the server's part of a clone; a git client's own index-pack would
    otherwise share the two cores with the server).  :meth:`clones` runs
    real ``git clone --bare`` and checks each with ``git fsck``.
    """

    def __init__(self, server, repo: Path, scratch: Path, env: Dict[str, str], body: Path, size: int) -> None:
        self.server, self.repo, self.scratch, self.env = server, repo, scratch, env
        self.body, self.size = body, size

    def measure(self, start_all: Callable[[], List[Callable[[], None]]]) -> Dict[str, float]:
        cpu = tree_cpu(self.server)
        with MemorySampler(self.server.classify) as trace:
            start = time.perf_counter()
            for wait in start_all():
                wait()
            wall = time.perf_counter() - start
        cpu = tree_cpu(self.server) - cpu
        memory = {"own_peak": trace.own_peak / MIB, "tree_peak": trace.tree_peak / MIB}
        return {"wall": wall, "cpu": cpu, **memory}

    def replays(self, count: int) -> Dict[str, float]:
        url = f"{self.server.url}/{self.repo.name}/git-upload-pack"

        def start_all() -> List[Callable[[], None]]:
            procs = [curl_replay(url, self.body) for _ in range(count)]
            return [lambda p=p: check_replay(p, self.size) for p in procs]

        return self.measure(start_all)

    def clones(self, count: int) -> Dict[str, float]:
        dests = [self.scratch / f"storm-{n}.git" for n in range(count)]
        url = f"{self.server.url}/{self.repo.name}"

        def finish(proc: subprocess.Popen) -> None:
            err = proc.communicate()[1]
            if proc.returncode:
                raise BenchmarkError(f"clone from {self.server.name} failed: {err.decode(errors='replace')}")

        def start_all() -> List[Callable[[], None]]:
            argv = ["git", "clone", "--bare", "-q", url]
            procs = [subprocess.Popen([*argv, str(d)], env=self.env, stderr=subprocess.PIPE) for d in dests]
            return [lambda p=p: finish(p) for p in procs]

        found = self.measure(start_all)
        for dest in dests:
            subprocess.run(["git", "-C", str(dest), "fsck", "--no-progress"], env=self.env, check=True)
            shutil.rmtree(dest, ignore_errors=True)
        return found


def one_commit_request(repo: Path, env: Dict[str, str]) -> bytes:
    """The protocol-v2 fetch of a client that has every commit of ``repo``'s main but the last."""
    argv = ["git", "-C", str(repo), "rev-parse", "main", "main~1"]
    head, parent = subprocess.run(argv, env=env, check=True, capture_output=True, text=True).stdout.split()
    lines = ["command=fetch\n", "object-format=sha1\n", None, "thin-pack\n", "no-progress\n", "ofs-delta\n"]
    lines += [f"want {head}\n", f"have {parent}\n", "done\n"]
    body = b"".join(b"0001" if line is None else b"%04x%s" % (len(line) + 4, line.encode()) for line in lines)
    return body + b"0000"


def tiny_fetch_ms(server, repo: Path, body: Path, times: int, before: Callable[[], None]) -> float:
    """Median milliseconds of one upload-pack request for ``repo`` (curl), ``before`` run untimed."""
    url = f"{server.url}/{repo.name}/git-upload-pack"
    argv = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--data-binary", f"@{body}"]
    argv += ["-H", "Content-Type: application/x-git-upload-pack-request"]
    argv += ["-H", "Git-Protocol: version=2", url]
    samples = []
    for _ in range(times):
        before()
        start = time.perf_counter()
        result = subprocess.run(argv, capture_output=True, text=True)
        samples.append((time.perf_counter() - start) * 1000)
        if result.stdout != "200":
            raise BenchmarkError(f"tiny fetch from {server.name}: HTTP {result.stdout} {result.stderr}")
    return median(samples) or 0.0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.storm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller repository, one round (< 2 minutes)")
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    rounds = 1 if args.quick else 3
    scratch = Path(tempfile.mkdtemp(prefix="gittornado-storm-"))
    home = scratch / "home"
    home.mkdir()
    env = git_env(home)
    repo = build(QUICK if args.quick else FULL.history, home, log)
    tiny = build(TINY, home, log)
    body = scratch / "tiny.request"
    body.write_bytes(one_commit_request(tiny, env))
    tiny_clone = scratch / "tiny-clone.request"
    tiny_clone.write_bytes(fetch_request(tiny, env))
    clone_body = scratch / "clone.request"
    clone_body.write_bytes(fetch_request(repo, env))
    size = response_size(repo, clone_body, env)
    cache_dir = scratch / "pack-cache"
    servers = {
        CACHED: GittornadoServer(REPOS, env, temp_dir("storm-cache-"), ["--pack-cache", str(cache_dir)]),
        PLAIN: GittornadoServer(REPOS, env, temp_dir("storm-plain-")),
        BACKEND: HttpBackendServer(REPOS, env, temp_dir("storm-backend-")),
    }

    def empty_cache() -> None:
        for entry in cache_dir.glob("??"):
            shutil.rmtree(entry, ignore_errors=True)

    results: Dict[str, Dict[str, List[Dict[str, float]]]] = {}
    try:
        for server in servers.values():
            server.start()
            tiny_fetch_ms(server, tiny, body, 2, lambda: None)  # warm up: first requests read config
        log(f"repository {repo.name}: pack {pack_bytes(repo) / MIB:.0f} MiB; {rounds} round(s)")
        for number in range(rounds):
            for name, server in servers.items():
                storm = Storm(server, repo, scratch, env, clone_body, size)
                for label, count in (("one", 1), ("storm-8", 8), ("storm-32", 32)):
                    empty_cache()
                    found = storm.replays(count)
                    results.setdefault(name, {}).setdefault(label, []).append(found)
                    log(f"round {number + 1} {name} {label}: {found['wall']:.2f} s, cpu {found['cpu']:.2f} s")
                if name == CACHED:  # the entry exists now
                    results[name].setdefault("warm", []).append(storm.replays(1))
                    empty_cache()
                    found = storm.clones(32)
                    results[name].setdefault("clones-32", []).append(found)
                    log(f"round {number + 1} {name}: 32 git clones, all pass fsck: {found['wall']:.2f} s")
                tiny_ms = {
                    "tiny-first": tiny_fetch_ms(server, tiny, body, 15, empty_cache),
                    "tiny-again": tiny_fetch_ms(server, tiny, body, 15, lambda: None),
                    "tiny-clone": tiny_fetch_ms(server, tiny, tiny_clone, 15, lambda: None),
                }
                for label, value in tiny_ms.items():
                    results[name].setdefault(label, []).append({"wall": value / 1000})
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    print(report(results, repo, rounds))
    return 0


def report(results: Dict[str, Dict[str, List[Dict[str, float]]]], repo: Path, rounds: int) -> str:
    """A markdown table of medians, and the targets of the clone-storm issue."""

    def value(target: str, label: str, key: str = "wall") -> Optional[float]:
        return median([m[key] for m in results.get(target, {}).get(label, [])])

    lines = [
        f"Clone storms of {repo.name} (pack {pack_bytes(repo) / MIB:.0f} MiB), medians of {rounds} round(s).",
        "",
        "| workload | " + " | ".join(results) + " |",
        "|---|" + "---:|" * len(results),
    ]
    rows = [
        ("one clone, wall s", "one", "wall", 1),
        ("8 at once, wall s", "storm-8", "wall", 1),
        ("32 at once, wall s", "storm-32", "wall", 1),
        ("one clone, server CPU s", "one", "cpu", 1),
        ("32 at once, server CPU s", "storm-32", "cpu", 1),
        ("one clone, server own PSS peak MiB", "one", "own_peak", 1),
        ("32 at once, server own PSS peak MiB", "storm-32", "own_peak", 1),
        ("32 at once, tree PSS peak MiB", "storm-32", "tree_peak", 1),
        ("repeated clone (entry exists), wall s", "warm", "wall", 1),
        ("32 real git clones at once + fsck ok, wall s", "clones-32", "wall", 1),
        ("tiny fetch (one new commit), first request, ms", "tiny-first", "wall", 1000),
        ("tiny fetch (one new commit), repeated, ms", "tiny-again", "wall", 1000),
        ("tiny clone (3 commits), repeated, ms", "tiny-clone", "wall", 1000),
    ]
    for text, label, key, scale in rows:
        cells = []
        for target in results:
            found = value(target, label, key)
            cells.append("-" if found is None else f"{found * scale:.2f}")
        lines.append(f"| {text} | " + " | ".join(cells) + " |")

    def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
        return None if a is None or not b else a / b

    checks = [
        ("8 at once <= 1.5x one clone (cache)", ratio(value(CACHED, "storm-8"), value(CACHED, "one")), 1.5),
        (
            "32 at once: server CPU <= 2x one clone's (cache)",
            ratio(value(CACHED, "storm-32", "cpu"), value(CACHED, "one", "cpu")),
            2.0,
        ),
        ("repeated clone <= 0.3x a cold one", ratio(value(CACHED, "warm"), value(CACHED, "one")), 0.3),
    ]
    tiny_delta = {
        label: (value(CACHED, label) or 0) * 1000 - (value(PLAIN, label) or 0) * 1000
        for label in ("tiny-first", "tiny-again", "tiny-clone")
    }
    lines += ["", "| target | observed | met |", "|---|---:|:---:|"]
    for text, observed, limit in checks:
        shown = "n/a" if observed is None else f"{observed:.2f}x"
        met = "-" if observed is None else "yes" if observed <= limit else "NO"
        lines.append(f"| {text} | {shown} | {met} |")
    for label, delta in tiny_delta.items():
        lines.append(
            f"| {label}, cache on minus off <= 5 ms | {delta:+.1f} ms | {'yes' if delta <= 5 else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
