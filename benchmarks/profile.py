"""Profile gittornado's process with py-spy while one workload runs against it.

``python -m benchmarks.profile clone-transfer`` starts gittornado alone, runs
the workload a few times under ``py-spy record`` (sampling from outside, so
the server runs unmodified), and prints the functions holding the most
samples, by their own time and including callees.  The collapsed stacks are
kept under ``benchmarks/work/profiles/`` for flame graphs.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .repos import WORK, git_env
from .run import FULL, SMOKE, make_workloads
from .servers import GittornadoServer, temp_dir

MIB = 1024 * 1024


def summarize(collapsed: Path, top: int = 25) -> str:
    """Self and inclusive sample counts per function from py-spy's collapsed ("raw") output."""
    own: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        samples = int(count)
        total += samples
        frames = [
            f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0] + ")"
            for f in stack.split(";")[1:]
            if " (" in f
        ]
        if frames:
            own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
    lines = [f"{total} samples"]
    lines.append("self time:")
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top)]
    lines.append("including callees:")
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.profile", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("workload", help="workload key, e.g. clone-transfer, info-refs-32, push-big")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="use the tiny repositories")
    parser.add_argument("--tag", default="", help="suffix for the profile file name")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="gittornado-profile-"))
    home = scratch / "home"
    home.mkdir()
    workloads = {w.key: w for w in make_workloads(SMOKE if args.smoke else FULL, home, scratch, print)}
    workload = workloads[args.workload]
    server = GittornadoServer(WORK / "repos", git_env(home), temp_dir("profile-gittornado-"))
    server.start()
    out = WORK / "profiles" / f"{args.workload}{args.tag}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    assert server.proc is not None
    spy = subprocess.Popen(
        [
            "py-spy",
            "record",
            "--pid",
            str(server.proc.pid),
            "--format",
            "raw",
            "--rate",
            "250",
            "-o",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(1.0)
        for _ in range(args.repeat):
            m = workload.run(server)
            print(
                f"{args.workload}: {m.value:.3f} {workload.unit}, own peak {m.memory.own_peak / MIB:.1f} MiB"
            )
    finally:
        spy.send_signal(2)
        spy.wait(30)
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    print(summarize(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
