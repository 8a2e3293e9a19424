"""Sampling proportional set size (PSS) of a server's process tree while a workload runs.

PSS splits shared pages among the processes that map them, so summing it over
a tree counts every page once: the honest "how much memory does this server
use" number.  The sampler is a thread of the benchmark runner, which is never
one of the measured processes.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Set, Tuple

#: Seconds between samples.
INTERVAL = 0.025

#: pid -> (parent pid, command name as the kernel shows it, at most 15 characters).
ProcessTable = Dict[int, Tuple[int, str]]


def process_table() -> ProcessTable:
    """Every process on the machine, with its parent and command name."""
    table: ProcessTable = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name is in parentheses and may itself contain ") ".
        left, right = stat.index(b"("), stat.rindex(b")")
        fields = stat[right + 2 :].split()
        if fields[0] == b"Z":
            continue
        table[int(entry)] = (int(fields[1]), stat[left + 1 : right].decode(errors="replace"))
    return table


def descendants(roots: Iterable[int], table: ProcessTable) -> Set[int]:
    """``roots`` (those still alive) and everything below them."""
    children: Dict[int, List[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: Set[int] = set()
    todo = [pid for pid in roots if pid in table]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return found


def smaps_rollup(pid: int) -> bytes:
    """The process's memory summary (empty if it has gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            return f.read()
    except OSError:
        return b""


def pss_bytes(rollup: bytes) -> int:
    """PSS in bytes from a :func:`smaps_rollup` text."""
    for line in rollup.splitlines():
        if line.startswith(b"Pss:"):
            return int(line.split()[1]) * 1024
    return 0


#: Given the process table, which pids form the tree, and which of them are the server's own.
Classifier = Callable[[ProcessTable], Tuple[Set[int], Set[int]]]


@dataclass
class MemoryTrace:
    """Samples of one workload run: (seconds since start, own PSS, tree PSS)."""

    samples: List[Tuple[float, int, int]] = field(default_factory=list)

    @property
    def own_peak(self) -> int:
        return max((own for _, own, _ in self.samples), default=0)

    @property
    def tree_peak(self) -> int:
        return max((tree for _, _, tree in self.samples), default=0)


class MemorySampler:
    """Samples a process tree every :data:`INTERVAL` seconds, as a context manager."""

    def __init__(self, classify: Classifier) -> None:
        self._classify = classify
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pss-sampler", daemon=True)
        self.trace = MemoryTrace()

    def __enter__(self) -> MemoryTrace:
        self._start = time.monotonic()
        self._sample()
        self._thread.start()
        return self.trace

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(INTERVAL):
            self._sample()

    def _sample(self) -> None:
        table = process_table()
        tree, own = self._classify(table)
        rollups = {pid: smaps_rollup(pid) for pid in tree}
        # A child caught between vfork() and exec() still shares its parent's
        # memory and reports the very same summary: count that memory once.
        sizes = {
            pid: 0 if rollup and rollups.get(table[pid][0]) == rollup else pss_bytes(rollup)
            for pid, rollup in rollups.items()
        }
        self.trace.samples.append(
            (time.monotonic() - self._start, sum(sizes[p] for p in own), sum(sizes.values()))
        )
