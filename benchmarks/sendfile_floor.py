"""``python -m benchmarks.sendfile_floor``: the least that sending a clone's bytes costs a server here.

The clone-storm target asks 32 identical clones to cost the server at most
twice the CPU of one.  With the pack cache, every clone after the first only
sends bytes; this measures the least that can cost: nginx serving the history
repository's pack as a static file with zero-copy ``sendfile`` (no framing,
no chunking, no Python), to one curl and to 31 at once, and the server's CPU
seconds (its processes, from ``/proc``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .lfs import Nginx
from .repos import build
from .run import FULL
from .servers import temp_dir

TICK = os.sysconf("SC_CLK_TCK")


def nginx_cpu(nginx: Nginx) -> float:
    """CPU seconds of nginx's master and workers."""
    master = str(nginx.proc.pid)
    workers = subprocess.run(["pgrep", "-P", master], capture_output=True, text=True).stdout.split()
    total = 0
    for pid in [master, *workers]:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += sum(int(value) for value in fields[11:15])
    return total / TICK


def main() -> int:
    work = temp_dir("gittornado-sendfile-floor-")
    try:
        home = work / "home"
        home.mkdir()
        repo = build(FULL.history, home)
        pack = max((repo / "objects" / "pack").glob("*.pack"), key=lambda path: path.stat().st_size)
        root = work / "root"
        root.mkdir()
        shutil.copy(pack, root / "pack")
        (work / "nginx").mkdir()
        nginx = Nginx(root, work / "nginx")
        url = f"{nginx.url}/pack"
        try:
            subprocess.run(["curl", "-s", "-o", "/dev/null", url], check=True)  # warm the page cache
            print(f"nginx sendfile of {repo.name}'s pack ({pack.stat().st_size >> 20} MiB):")
            for count in (1, 31):
                cpu, start = nginx_cpu(nginx), time.perf_counter()
                curls = [subprocess.Popen(["curl", "-s", "-o", "/dev/null", url]) for _ in range(count)]
                if any(curl.wait() for curl in curls):
                    raise RuntimeError("a download failed")
                wall, spent = time.perf_counter() - start, nginx_cpu(nginx) - cpu
                each = spent / count
                print(f"  {count:2d} at once: {wall:.2f} s, server CPU {spent:.2f} s ({each:.3f} s each)")
        finally:
            nginx.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
