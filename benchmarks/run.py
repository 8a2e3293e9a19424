"""``python -m benchmarks.run``: gittornado vs git http-backend + nginx + fcgiwrap, side by side.

Builds (or reuses) the seeded repositories, starts both servers, then runs
every workload round by round, interleaved (gittornado, http-backend, plain
upload-pack, gittornado, ...) so drift of a shared machine hits all of them
alike.  Prints a table of medians and ratios, checks the targets of issue 5,
and writes ``results.md``, ``results.json`` and the push-memory chart to
``--out``.

``--smoke`` runs the same code on tiny repositories for one round: what the
test suite runs so the benchmark never rots; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import tornado

from .repos import REPOS, WORK, BlobSpec, HistorySpec, build, git_env, pack_bytes
from .servers import GittornadoServer, HttpBackendServer, temp_dir
from .workloads import (
    Measurement,
    PlainUploadPack,
    Target,
    fetch_request,
    git_clone,
    git_push,
    haves_request,
    info_refs_rps,
    latency_under_clones,
    median,
    replay,
    response_size,
)

MIB = 1024 * 1024
SERVERS = ("gittornado", "http-backend")
ALL_TARGETS = ("gittornado", "http-backend", "upload-pack")


@dataclass(frozen=True)
class Profile:
    """Sizes and repetitions of one benchmark run."""

    history: HistorySpec
    small_blob: BlobSpec
    big_blob: BlobSpec
    rounds: int
    rps_seconds: int


FULL = Profile(
    history=HistorySpec(commits=30000, files=20000, blob_bytes=6000),
    small_blob=BlobSpec(size=10 * 1000 * 1000),
    big_blob=BlobSpec(size=1024 * MIB),
    rounds=3,
    rps_seconds=5,
)
SMOKE = Profile(
    history=HistorySpec(commits=200, files=100, blob_bytes=2000, tag_every=50),
    small_blob=BlobSpec(size=1000 * 1000),
    big_blob=BlobSpec(size=8 * MIB),
    rounds=1,
    rps_seconds=1,
)


@dataclass
class Workload:
    """One row of the table: a name, its unit, and how to run it on a target."""

    key: str
    label: str
    unit: str  # "s" (lower is better), "req/s" or "ms" (p99)
    targets: Tuple[str, ...]
    run: Callable[[Target], Measurement]
    results: Dict[str, List[Measurement]] = field(default_factory=dict)

    def value(self, target: str) -> Optional[float]:
        return median([m.value for m in self.results.get(target, [])])

    def own_peak(self, target: str) -> int:
        return max((m.memory.own_peak for m in self.results.get(target, [])), default=0)

    def tree_peak(self, target: str) -> int:
        return max((m.memory.tree_peak for m in self.results.get(target, [])), default=0)


def size_label(size: int) -> str:
    if size >= 1024**3 and size % 1024**3 == 0:
        return f"{size // 1024**3} GiB"
    if size % MIB == 0:
        return f"{size // MIB} MiB"
    return f"{size / 1e6:g} MB"


def versions() -> Dict[str, str]:
    """What ran: versions of everything in the data path, and the CPU."""

    def first_line(argv: List[str]) -> str:
        try:
            result = subprocess.run(argv, capture_output=True, text=True)
            return (result.stdout or result.stderr).strip().splitlines()[0]
        except (OSError, IndexError):
            return "unknown"

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            names = re.findall(r"^model name\s*:\s*(.*)$", f.read(), re.MULTILINE)
        cpu = f"{names[0]} x {len(names)}" if names else cpu
    except OSError:
        pass
    fcgiwrap = first_line(["dpkg-query", "-W", "-f=${Version}", "fcgiwrap"])
    return {
        "git": first_line(["git", "--version"]),
        "python": platform.python_version(),
        "tornado": tornado.version,
        "nginx": first_line(["nginx", "-v"]),
        "fcgiwrap": f"fcgiwrap {fcgiwrap}",
        "curl": first_line(["curl", "--version"]).split(" (")[0],
        "wrk": first_line(["wrk", "--version"]).split(" [")[0],
        "kernel": platform.release(),
        "cpu": cpu,
        "memory": f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 1024**3:.0f} GiB",
    }


def check_tools() -> None:
    missing = [tool for tool in ("git", "curl", "wrk", "nginx", "fcgiwrap") if not shutil.which(tool)]
    if missing:
        raise SystemExit(f"benchmarks: missing programs: {', '.join(missing)} (see .ci/run)")


#: Common ``have`` lines in the negotiation workloads (a client sends up to 16,384 per round; several
#: rounds' worth arrive together when the client's http.postBuffer is large).
HAVES = 40000


def make_workloads(
    profile: Profile,
    home: Path,
    scratch: Path,
    log: Callable[[str], None],
    small_pipes: Optional[Target] = None,
) -> List[Workload]:
    """Build the repositories and the request bodies, and describe every workload.

    ``small_pipes`` is a gittornado whose git pipes are the kernel's default 64 KiB, which stands in
    for gittornado in the rows that say so.
    """
    env = git_env(home)
    history = build(profile.history, home, log)
    small = build(profile.small_blob, home, log)
    big = build(profile.big_blob, home, log)
    requests: Dict[Path, Tuple[Path, int]] = {}
    for repo in (history, small, big):
        body = scratch / f"{repo.name}.request"
        body.write_bytes(fetch_request(repo, env))
        requests[repo] = (body, response_size(repo, body, env))
    log(
        f"repositories: {history.name} (pack {pack_bytes(history) / MIB:.0f} MiB), "
        f"{small.name}, {big.name} (pack {pack_bytes(big) / MIB:.0f} MiB)"
    )
    plain = PlainUploadPack(env)
    small_size, big_size = size_label(profile.small_blob.size), size_label(profile.big_blob.size)
    commits = f"{profile.history.commits} commits"
    counter = iter(range(1_000_000))

    def on(target: Target) -> Target:
        return plain if target.name == "upload-pack" else target

    def clone_transfer(repo: Path, parallel: int = 1) -> Callable[[Target], Measurement]:
        body, size = requests[repo]
        return lambda t: replay(on(t), repo, body, size, parallel)

    def push(source: Path) -> Callable[[Target], Measurement]:
        return lambda t: git_push(t, source, REPOS, f"{t.name}-{next(counter)}", env)

    hist_body, hist_size = requests[history]
    haves_body = scratch / "haves.request"
    haves_body.write_bytes(haves_request(history, env, HAVES))
    haves_size = response_size(history, haves_body, env, protocol="")

    def negotiation(pipes: Optional[Target]) -> Callable[[Target], Measurement]:
        def run(t: Target) -> Measurement:
            server = pipes if pipes is not None and t.name == "gittornado" else on(t)
            return replay(server, history, haves_body, haves_size, protocol="")

        return run

    return [
        # Small before big: the memory target compares them, and a server that
        # grew during the big one must not make the small one look alike.
        Workload("clone-small", f"{small_size} clone transfer", "s", ALL_TARGETS, clone_transfer(small)),
        Workload("clone-big", f"{big_size} clone transfer", "s", ALL_TARGETS, clone_transfer(big)),
        Workload("push-small", f"{small_size} push (git push)", "s", SERVERS, push(small)),
        Workload("push-big", f"{big_size} push (git push)", "s", SERVERS, push(big)),
        Workload(
            "clone-transfer",
            f"full-clone transfer ({commits}, {hist_size / MIB:.0f} MiB)",
            "s",
            ALL_TARGETS,
            clone_transfer(history),
        ),
        Workload(
            "git-clone",
            f"git clone --bare ({commits})",
            "s",
            SERVERS,
            lambda t: git_clone(t, history, scratch / "clone.git", env),
        ),
        Workload(
            "info-refs-1",
            "info/refs, 1 connection",
            "req/s",
            SERVERS,
            lambda t: info_refs_rps(t, history, 1, profile.rps_seconds),
        ),
        Workload(
            "info-refs-32",
            "info/refs, 32 concurrent",
            "req/s",
            SERVERS,
            lambda t: info_refs_rps(t, history, 32, profile.rps_seconds),
        ),
        Workload(
            "parallel-16",
            f"16 parallel clone transfers ({commits})",
            "s",
            ALL_TARGETS,
            clone_transfer(history, parallel=16),
        ),
        Workload(
            "haves-40k",
            f"v0 fetch round with {HAVES:,} common haves",
            "s",
            ALL_TARGETS,
            negotiation(None),
        ),
        Workload(
            "haves-40k-64k",
            f"v0 fetch round with {HAVES:,} common haves, 64 KiB pipes",
            "s",
            ALL_TARGETS,
            negotiation(small_pipes),
        ),
        Workload(
            "latency-8",
            "info/refs p99 while 8 clones stream",
            "ms",
            SERVERS,
            lambda t: latency_under_clones(t, history, hist_body, hist_size, 8),
        ),
    ]


@dataclass
class Check:
    """One target of issue 5 and whether this run met it."""

    target: str
    observed: str
    met: Optional[bool]


def ratio(workload: Workload, against: str) -> Optional[float]:
    mine, theirs = workload.value("gittornado"), workload.value(against)
    if mine is None or theirs is None or theirs == 0:
        return None
    return mine / theirs


def checks(workloads: Dict[str, Workload]) -> List[Check]:
    """Evaluate every target of issue 5 against the medians of this run."""
    found: List[Check] = []

    def at_most(label: str, value: Optional[float], limit: float, unit: str = "x") -> None:
        shown = "n/a" if value is None else f"{value:.2f}{unit}"
        found.append(Check(label, shown, None if value is None else value <= limit))

    at_most(
        "full-clone transfer <= 1.05x http-backend", ratio(workloads["clone-transfer"], "http-backend"), 1.05
    )
    at_most(
        "full-clone transfer <= 1.10x plain upload-pack",
        ratio(workloads["clone-transfer"], "upload-pack"),
        1.10,
    )
    at_most("big push <= 1.05x http-backend", ratio(workloads["push-big"], "http-backend"), 1.05)
    at_most("big clone <= 1.05x http-backend", ratio(workloads["clone-big"], "http-backend"), 1.05)
    for key in ("info-refs-1", "info-refs-32"):
        value = ratio(workloads[key], "http-backend")
        shown = "n/a" if value is None else f"{value:.2f}x"
        found.append(
            Check(f"{workloads[key].label} >= 1.5x req/s", shown, None if value is None else value >= 1.5)
        )
    peak = max(w.own_peak("gittornado") for w in workloads.values())
    at_most("server memory peak <= 40 MiB (all workloads)", peak / MIB, 40, " MiB")
    for small, big in (("clone-small", "clone-big"), ("push-small", "push-big")):
        delta = abs(workloads[big].own_peak("gittornado") - workloads[small].own_peak("gittornado")) / MIB
        at_most(
            f"peak memory {workloads[small].label} vs {workloads[big].label} within 5 MiB", delta, 5, " MiB"
        )
    at_most(
        "info/refs p99 while 8 clones stream <= 50 ms", workloads["latency-8"].value("gittornado"), 50, " ms"
    )
    for key in ("haves-40k", "haves-40k-64k"):
        label = workloads[key].label
        at_most(f"{label} <= 1.5x plain upload-pack", ratio(workloads[key], "upload-pack"), 1.5)
        at_most(f"{label} <= 1.0x http-backend", ratio(workloads[key], "http-backend"), 1.0)
    return found


def fmt(value: Optional[float], unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "ms":
        return f"{value:.1f} ms"
    return f"{value:,.0f} req/s"


def table(workloads: List[Workload], info: Dict[str, str], found: List[Check], rounds: int) -> str:
    """The results as markdown: medians and ratios, memory peaks, targets, versions."""
    lines = [
        f"Medians of {rounds} interleaved round(s). Ratios are gittornado / other: "
        "below 1 is faster for times, above 1 is better for req/s.",
        "",
        "| workload | gittornado | http-backend + nginx | plain upload-pack "
        "| vs http-backend | vs upload-pack |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for w in workloads:
        cells = [fmt(w.value(t), w.unit) for t in ALL_TARGETS]
        ratios = [ratio(w, other) for other in ("http-backend", "upload-pack")]
        shown = ["-" if r is None else f"{r:.2f}x" for r in ratios]
        lines.append(f"| {w.label} | " + " | ".join(cells + shown) + " |")
    lines += [
        "",
        "Peak proportional set size (PSS, MiB) over all rounds: *own* is the server's own processes "
        "(gittornado's Python process; nginx + fcgiwrap + git http-backend), *tree* adds git's processes.",
        "",
        "| workload | gittornado own | gittornado tree | http-backend own | http-backend tree "
        "| upload-pack tree |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for w in workloads:
        cells = [
            w.own_peak("gittornado"),
            w.tree_peak("gittornado"),
            w.own_peak("http-backend"),
            w.tree_peak("http-backend"),
            w.tree_peak("upload-pack"),
        ]
        has = [
            "gittornado" in w.results,
            "gittornado" in w.results,
            "http-backend" in w.results,
            "http-backend" in w.results,
            "upload-pack" in w.results,
        ]
        lines.append(
            f"| {w.label} | " + " | ".join(f"{c / MIB:.1f}" if h else "-" for c, h in zip(cells, has)) + " |"
        )
    lines += ["", "| target (issue 5) | observed | met |", "|---|---:|:---:|"]
    for c in found:
        lines.append(f"| {c.target} | {c.observed} | {'-' if c.met is None else 'yes' if c.met else 'NO'} |")
    lines += ["", "| component | version |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in info.items()]
    return "\n".join(lines) + "\n"


def chart(workload: Workload, path: Path) -> bool:
    """Server memory over time during the last round of the big push (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    styles = {"gittornado": "tab:blue", "http-backend": "tab:orange"}
    for name in SERVERS:
        runs = workload.results.get(name)
        if not runs:
            continue
        samples = runs[-1].memory.samples
        times = [s[0] for s in samples]
        ax.plot(times, [s[1] / MIB for s in samples], color=styles[name], label=f"{name}: own processes")
        ax.plot(
            times,
            [s[2] / MIB for s in samples],
            color=styles[name],
            linestyle="--",
            label=f"{name}: with git",
        )
    ax.set_xlabel("seconds since the push started")
    ax.set_ylabel("PSS (MiB)")
    ax.set_yscale("log")
    ax.set_title(f"Server memory during the {workload.label}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny repositories, one round (for CI)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per workload (default: 3, smoke: 1)")
    parser.add_argument("--only", nargs="+", metavar="KEY", help="run only these workloads (by key)")
    parser.add_argument(
        "--out", type=Path, default=None, help="where results go (default: benchmarks/work/results/<time>)"
    )
    args = parser.parse_args(argv)
    check_tools()
    profile = SMOKE if args.smoke else FULL
    rounds = args.rounds or profile.rounds
    out = args.out or WORK / "results" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    scratch = Path(tempfile.mkdtemp(prefix="gittornado-bench-"))
    home = scratch / "home"
    home.mkdir()
    env = git_env(home)
    servers = [
        GittornadoServer(REPOS, env, temp_dir("bench-gittornado-")),
        HttpBackendServer(REPOS, env, temp_dir("bench-http-backend-")),
    ]
    small_pipes = GittornadoServer(REPOS, env, temp_dir("bench-gittornado-64k-"), small_pipes=True)
    try:
        workloads = make_workloads(profile, home, scratch, log, small_pipes)
        if args.only:
            unknown = set(args.only) - {w.key for w in workloads}
            if unknown:
                raise SystemExit(f"unknown workloads: {', '.join(sorted(unknown))}")
            workloads = [w for w in workloads if w.key in args.only]
        for server in [*servers, small_pipes]:
            server.start()
            log(f"{server.name}: {server.command} at {server.url}")
        targets: Dict[str, Target] = {s.name: s for s in servers}
        targets["upload-pack"] = PlainUploadPack(env)
        for workload in workloads:
            for number in range(rounds):
                for name in workload.targets:
                    measurement = workload.run(targets[name])
                    workload.results.setdefault(name, []).append(measurement)
                    log(
                        f"{workload.key} round {number + 1}/{rounds} {name}: "
                        f"{fmt(measurement.value, workload.unit)}, own peak "
                        f"{measurement.memory.own_peak / MIB:.1f} MiB, tree peak "
                        f"{measurement.memory.tree_peak / MIB:.1f} MiB"
                    )
    finally:
        for server in [*servers, small_pipes]:
            server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(REPOS / "push", ignore_errors=True)

    by_key = {w.key: w for w in workloads}
    info = versions()
    info["gittornado server"] = servers[0].command
    info["http-backend server"] = servers[1].command
    found = checks(by_key) if not args.only else []
    text = table(workloads, info, found, rounds)
    print(text)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(
        json.dumps(
            {
                "profile": "smoke" if args.smoke else "full",
                "rounds": rounds,
                "versions": info,
                "workloads": {
                    w.key: {
                        "label": w.label,
                        "unit": w.unit,
                        "runs": {
                            name: [
                                {"value": m.value, "extra": m.extra, "memory": m.memory.samples} for m in runs
                            ]
                            for name, runs in w.results.items()
                        },
                    }
                    for w in workloads
                },
                "checks": [c.__dict__ for c in found],
            },
            indent=1,
        )
    )
    if "push-big" in by_key and chart(by_key["push-big"], out / "push-memory.png"):
        log(f"chart: {out / 'push-memory.png'}")
    log(f"results: {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
