"""The pack-objects cache, the server's side: how upload-pack runs the hook, eviction, statistics.

Identical fetches of an unchanged repository share one pack on disk.  A CI
fleet that starts 30 jobs at once makes 30 identical clones; without a cache
each runs its own ``git pack-objects``.  With ``--pack-cache DIR``,
gittornado runs upload-pack with ``-c uploadpack.packObjectsHook=<hook>``
(:meth:`PackCache.upload_pack_setup`; git honours that key only from the
command line or system/global config, never from a repository's), so git runs
the hook (:mod:`gittornado.packhook`) instead of pack-objects, with the same
arguments and standard input, and the hook answers through
:func:`gittornado.packentry.serve`.  The directory's files are described in
:mod:`gittornado.packfiles`.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import subprocess
import sys
import time
from typing import Dict, List, Mapping, Optional, Tuple

from .packfiles import STALE_WRITE, HookSettings, read_counters, writer_alive
from .packfiles import TRAILER as TRAILER  # re-exported: tests read entries with it

#: Defaults of ``--pack-cache-max-size`` and ``--pack-cache-max-age``.
DEFAULT_MAX_BYTES = 5 * 1024**3
DEFAULT_MAX_AGE = 600.0


class PackCache:
    """The server's side of the cache: how upload-pack runs the hook, eviction, statistics.

    ``directory`` holds the entries (created if missing; may be shared by
    several processes and hosts).  Entries older than ``max_age`` seconds
    go, then the oldest until all take at most ``max_bytes``; a key is cached
    from its ``min_requests``-th request on.  :meth:`tidy` does this and
    counts what is on disk; :meth:`keep_tidy` runs it every few seconds.
    """

    def __init__(
        self,
        directory: str,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_age: float = DEFAULT_MAX_AGE,
        min_requests: int = 2,
        git: str = "git",
        env: Optional[Mapping[str, str]] = None,
    ) -> None:
        self.directory = os.path.realpath(directory)
        os.makedirs(os.path.join(self.directory, "stats"), exist_ok=True)
        self.max_bytes = max_bytes
        self.max_age = max_age
        # Another git may write other packs for the same input.
        version = subprocess.run([git, "--version"], capture_output=True, text=True, env=env).stdout.strip()
        self.settings = HookSettings(self.directory, min_requests, max_bytes, version)
        hook = os.path.join(os.path.dirname(os.path.abspath(__file__)), "packhook.py")
        # -I -S: no site packages and not the gittornado package (Tornado): see packhook.
        self.hook = f"{shlex.quote(sys.executable)} -I -S {shlex.quote(hook)}"
        #: Entries and bytes on disk at the last :meth:`tidy`.
        self.entries = 0
        self.disk_bytes = 0

    def upload_pack_setup(self) -> Tuple[List[str], Dict[str, str]]:
        """The ``-c`` options and environment variables that make upload-pack use the cache."""
        return ["-c", f"uploadpack.packObjectsHook={self.hook}"], self.settings.environment()

    def statistics(self) -> Dict[str, int]:
        """Hits, misses, bytes served from and written to the cache, errors, entries and bytes on disk."""
        return {**read_counters(self.directory), "entries": self.entries, "disk_bytes": self.disk_bytes}

    def tidy(self) -> None:
        """Evict old and excess entries, remove dead writers' files and old marks, count the rest."""
        now = time.time()
        entries: List[Tuple[float, int, str]] = []
        others = 0
        for folder in _scan(self.directory):
            if len(folder.name) != 2 or not folder.is_dir(follow_symlinks=False):
                continue
            for item in _scan(folder.path):
                try:
                    st = item.stat(follow_symlinks=False)
                except OSError:
                    continue
                age = now - st.st_mtime
                if item.name.endswith(".pack") and age <= self.max_age:
                    entries.append((st.st_mtime, st.st_size, item.path))
                elif item.name.endswith((".part", ".tmp")) and (age < STALE_WRITE or _locked(item.path)):
                    others += st.st_size
                elif not item.name.endswith(".seen") or age > self.max_age:
                    _remove(item.path)
        entries.sort()
        total = sum(size for _, size, _ in entries)
        while entries and total > self.max_bytes:
            _, size, path = entries.pop(0)
            _remove(path)
            total -= size
        self.entries, self.disk_bytes = len(entries), total + others

    async def keep_tidy(self, interval: float = 10.0) -> None:
        """Run :meth:`tidy` in a thread every ``interval`` seconds, until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            await loop.run_in_executor(None, self.tidy)
            await asyncio.sleep(interval)


def _scan(path: str) -> List[os.DirEntry]:
    try:
        with os.scandir(path) as items:
            return list(items)
    except OSError:
        return []


def _locked(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        return writer_alive(fd)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
