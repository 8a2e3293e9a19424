"""``python -m benchmarks.pagecache``: how steadily this machine writes a gigabyte into the page cache.

Every upload row (Git LFS, pushes) stands on it: a server can be no faster
than the kernel copying the body into new page-cache pages.  No server here:
one process writes 1 GiB to a new file from four reused 1 MiB buffers, as an
LFS upload does, after ``sync``, round after round.  Where the rounds differ
by seconds, so will any server's, and only the best of several rounds in
turns says anything about the server.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List

from .servers import temp_dir

MIB = 2**20


def write_gigabyte(path: str, buffers: List[bytearray]) -> float:
    """Seconds to write 1 GiB to a new file at ``path`` from ``buffers`` in turn (the file is removed)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        start = time.perf_counter()
        for i in range(1024):
            os.write(descriptor, buffers[i % len(buffers)])
        return time.perf_counter() - start
    finally:
        os.close(descriptor)
        os.unlink(path)


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="gigabytes written, one after the other")
    args = parser.parse_args(argv)
    work = temp_dir("gittornado-pagecache-")
    buffers = [bytearray(os.urandom(MIB)) for _ in range(4)]
    times = []
    for _ in range(args.rounds):
        os.sync()
        times.append(write_gigabyte(str(work / "gigabyte"), buffers))
    work.rmdir()
    print("1 GiB into the page cache, seconds per round:", ", ".join(f"{t:.2f}" for t in times))
    print(f"best {min(times):.2f} s, worst {max(times):.2f} s ({max(times) / min(times):.1f}x the best)")


if __name__ == "__main__":
    sys.exit(main())
