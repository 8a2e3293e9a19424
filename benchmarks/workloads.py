"""The workloads: each one request pattern, run against one target and measured.

A *target* is one of the servers of :mod:`benchmarks.servers`, or
:class:`PlainUploadPack`, the same upload-pack request answered by ``git
upload-pack --stateless-rpc`` writing to ``/dev/null``: no HTTP at all, the
limit no server can beat.

Clients are separate processes (curl, git, wrk) so the benchmark runner's
own Python never sits in the data path; the runner only starts them, times
them and samples memory.
"""

from __future__ import annotations

import http.client
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Protocol, Set, Tuple

from .memory import MemorySampler, MemoryTrace, ProcessTable, descendants


class Target(Protocol):
    """What a workload needs from a server."""

    name: str
    url: str

    def classify(self, table: ProcessTable) -> Tuple[Set[int], Set[int]]: ...


@dataclass
class Measurement:
    """One run of one workload on one target."""

    value: float
    memory: MemoryTrace = field(default_factory=MemoryTrace)
    extra: Dict[str, float] = field(default_factory=dict)


class BenchmarkError(RuntimeError):
    """A workload did not do what it should (wrong status, short transfer, failed git)."""


def pkt(text: str) -> bytes:
    """One pkt-line."""
    data = text.encode()
    return b"%04x" % (len(data) + 4) + data


def fetch_request(repo: Path, env: Dict[str, str]) -> bytes:
    """The protocol-v2 fetch a fresh ``git clone`` sends: want every ref tip, have nothing."""
    tips = subprocess.run(
        ["git", "-C", str(repo), "for-each-ref", "--format=%(objectname)"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    body = pkt("command=fetch\n") + pkt("object-format=sha1\n") + b"0001"
    body += pkt("thin-pack\n") + pkt("no-progress\n") + pkt("ofs-delta\n")
    for tip in dict.fromkeys(tips):
        body += pkt(f"want {tip}\n")
    return body + pkt("done\n") + b"0000"


def haves_request(repo: Path, env: Dict[str, str], haves: int) -> bytes:
    """A protocol-v0 negotiation round with ``haves`` common ``have`` lines (commits repeat if too few).

    upload-pack answers ``ACK <oid> common`` for each while it is still
    reading the rest: a server must read git's output while it feeds its input.
    """
    commits = subprocess.run(
        ["git", "-C", str(repo), "rev-list", "--all"], env=env, check=True, capture_output=True, text=True
    ).stdout.split()
    head = commits[0]
    body = pkt(f"want {head} multi_ack_detailed side-band-64k thin-pack ofs-delta no-progress\n") + b"0000"
    body += b"".join(pkt(f"have {commits[i % len(commits)]}\n") for i in range(haves))
    return body + b"0000"


class PlainUploadPack:
    """``git upload-pack --stateless-rpc`` on the request, output to /dev/null (no server)."""

    name = "upload-pack"
    url = ""

    def __init__(self, env: Dict[str, str]) -> None:
        self.env = env
        self._pids: List[int] = []

    def classify(self, table: ProcessTable) -> Tuple[Set[int], Set[int]]:
        """No server of its own; the tree is git's processes."""
        return descendants(self._pids, table), set()

    def run(
        self, repo: Path, request: Path, stdout: int = subprocess.DEVNULL, protocol: str = "version=2"
    ) -> subprocess.Popen[bytes]:
        env = {**self.env, "GIT_PROTOCOL": protocol} if protocol else self.env
        with open(request, "rb") as body:
            proc = subprocess.Popen(
                ["git", "upload-pack", "--stateless-rpc", str(repo)], stdin=body, stdout=stdout, env=env
            )
        self._pids[:] = [proc.pid]
        return proc


def response_size(repo: Path, request: Path, env: Dict[str, str], protocol: str = "version=2") -> int:
    """Bytes plain upload-pack answers ``request`` with (also warms the page cache)."""
    proc = PlainUploadPack(env).run(repo, request, stdout=subprocess.PIPE, protocol=protocol)
    assert proc.stdout is not None
    size = 0
    while True:
        piece = proc.stdout.read(1 << 20)
        if not piece:
            break
        size += len(piece)
    if proc.wait() != 0:
        raise BenchmarkError(f"git upload-pack failed on {repo}")
    return size


def curl_replay(url: str, request: Path, protocol: str = "version=2") -> subprocess.Popen[str]:
    """POST ``request`` to ``url`` as a git client would, discarding the answer."""
    return subprocess.Popen(
        [
            "curl",
            "--silent",
            "--show-error",
            "--output",
            "/dev/null",
            "--write-out",
            "%{http_code} %{size_download}",
            "--header",
            "Content-Type: application/x-git-upload-pack-request",
            "--header",
            "Accept: application/x-git-upload-pack-result",
            "--header",
            f"Git-Protocol: {protocol}" if protocol else "X-Git-Protocol: none",
            "--data-binary",
            f"@{request}",
            url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def check_replay(proc: subprocess.Popen[str], expected: int) -> None:
    """The replay got a 200 and (within 1%) as many bytes as plain upload-pack sends."""
    out, err = proc.communicate()
    status, _, size = out.partition(" ")
    if proc.returncode != 0 or status != "200" or abs(int(size or 0) - expected) > expected // 100 + 64:
        raise BenchmarkError(
            f"replay failed: curl {proc.returncode} HTTP {status} {size} bytes "
            f"(expected {expected}): {err.strip()}"
        )


def timed(target: Target, action: Callable[[], Dict[str, float]]) -> Measurement:
    """Run ``action`` under the memory sampler; the value is its wall time in seconds."""
    with MemorySampler(target.classify) as trace:
        start = time.perf_counter()
        extra = action()
        elapsed = time.perf_counter() - start
    return Measurement(elapsed, trace, extra)


def replay(
    target: Target, repo: Path, request: Path, expected: int, parallel: int = 1, protocol: str = "version=2"
) -> Measurement:
    """Replay one upload-pack request (``parallel`` at once) and time until every answer is in."""
    if isinstance(target, PlainUploadPack):

        def action() -> Dict[str, float]:
            procs = [target.run(repo, request, protocol=protocol) for _ in range(parallel)]
            if any(p.wait() != 0 for p in procs):
                raise BenchmarkError("git upload-pack failed")
            return {}

    else:
        url = f"{target.url}/{repo.name}/git-upload-pack"

        def action() -> Dict[str, float]:
            procs = [curl_replay(url, request, protocol) for _ in range(parallel)]
            for proc in procs:
                check_replay(proc, expected)
            return {}

    measurement = timed(target, action)
    measurement.extra["mb_per_s"] = expected * parallel / measurement.value / 1e6
    return measurement


def git_clone(target: Target, repo: Path, dest: Path, env: Dict[str, str]) -> Measurement:
    """End-to-end ``git clone --bare`` (no checkout: the server's part, not the disk's)."""
    shutil.rmtree(dest, ignore_errors=True)

    def action() -> Dict[str, float]:
        result = subprocess.run(
            ["git", "clone", "--bare", "--quiet", f"{target.url}/{repo.name}", str(dest)],
            env=env,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise BenchmarkError(f"git clone from {target.name} failed: {result.stderr.strip()}")
        return {}

    try:
        return timed(target, action)
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def git_push(target: Target, source: Path, root: Path, name: str, env: Dict[str, str]) -> Measurement:
    """``git push`` of ``source``'s main into a new empty repository ``root/push/<name>.git``.

    The time includes the client's pack-objects and the server's index-pack,
    as a user would see it.
    """
    dest = root / "push" / f"{name}.git"
    shutil.rmtree(dest, ignore_errors=True)
    subprocess.run(["git", "init", "-q", "--bare", str(dest)], env=env, check=True)
    # Keep the pushed pack as it comes (index-pack) instead of exploding a
    # few-object pack into loose objects (unpack-objects recompresses 1 GiB),
    # so the transfer, not git's loose-object writing, dominates; the same for both servers.
    subprocess.run(["git", "-C", str(dest), "config", "receive.unpackLimit", "1"], env=env, check=True)

    def action() -> Dict[str, float]:
        result = subprocess.run(
            ["git", "-C", str(source), "push", "--quiet", f"{target.url}/push/{name}.git", "main:main"],
            env=env,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise BenchmarkError(f"git push to {target.name} failed: {result.stderr.strip()}")
        return {}

    try:
        measurement = timed(target, action)
        pushed = subprocess.run(
            ["git", "-C", str(dest), "rev-parse", "main"], env=env, capture_output=True, text=True
        ).stdout.strip()
        wanted = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "main"], env=env, capture_output=True, text=True
        ).stdout.strip()
        if pushed != wanted:
            raise BenchmarkError(f"push to {target.name} did not land ({pushed!r} != {wanted!r})")
        return measurement
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def info_refs_url(target: Target, repo: Path) -> str:
    return f"{target.url}/{repo.name}/info/refs?service=git-upload-pack"


def info_refs_rps(target: Target, repo: Path, connections: int, seconds: int) -> Measurement:
    """Requests per second of ``info/refs`` with ``connections`` keep-alive connections (wrk)."""
    threads = min(connections, 2)
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s"]
    argv.append(info_refs_url(target, repo))
    holder: Dict[str, str] = {}

    def action() -> Dict[str, float]:
        result = subprocess.run(argv, capture_output=True, text=True)
        holder["out"] = result.stdout
        if result.returncode != 0:
            raise BenchmarkError(f"wrk failed: {result.stdout.strip()} {result.stderr.strip()}")
        return {}

    measurement = timed(target, action)
    out = holder["out"]
    match = re.search(r"Requests/sec:\s*([\d.]+)", out)
    bad = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
    errors = re.search(r"Socket errors:.*", out)
    if not match or bad or (errors and connections == 1):
        raise BenchmarkError(f"wrk against {target.name} reported errors:\n{out}")
    measurement.value = float(match.group(1))
    return measurement


def _get(conn: http.client.HTTPConnection, path: str) -> float:
    start = time.perf_counter()
    conn.request("GET", path)
    response = conn.getresponse()
    response.read()
    elapsed = time.perf_counter() - start
    if response.status != 200:
        raise BenchmarkError(f"info/refs answered {response.status}")
    return elapsed


def latency_under_clones(
    target: Target, repo: Path, request: Path, expected: int, clones: int, pause: float = 0.01
) -> Measurement:
    """p99 of sequential ``info/refs`` requests while ``clones`` replayed clones stream.

    The value is the 99th percentile in milliseconds; ``extra`` has the median
    and the number of requests timed.
    """
    host, port = target.url.split("//", 1)[1].split(":")
    path = info_refs_url(target, repo).split(str(port), 1)[1]
    url = f"{target.url}/{repo.name}/git-upload-pack"
    samples: List[float] = []

    def action() -> Dict[str, float]:
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            _get(conn, path)  # connect outside the timed requests
            procs = [curl_replay(url, request) for _ in range(clones)]
            while any(p.poll() is None for p in procs) or not samples:
                samples.append(_get(conn, path))
                time.sleep(pause)
            for proc in procs:
                check_replay(proc, expected)
        finally:
            conn.close()
        return {}

    measurement = timed(target, action)
    ordered = sorted(samples)
    measurement.value = percentile(ordered, 0.99) * 1000
    measurement.extra.update(median_ms=percentile(ordered, 0.5) * 1000, requests=len(ordered))
    return measurement


def percentile(ordered: List[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not ordered:
        return 0.0
    rank = max(0, min(len(ordered) - 1, int(-(-fraction * len(ordered) // 1)) - 1))
    return ordered[rank]


def median(values: List[float]) -> Optional[float]:
    """Median, or None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
