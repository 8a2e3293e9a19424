"""Maintenance on the server's side: when repositories are maintained, after pushes, and what they weigh.

Every push leaves a pack or loose objects behind, which :func:`maintain`
(:mod:`gittornado.housekeeping`, one run of one repository) packs away.

:class:`MaintenanceScheduler` runs it after pushes, debounced (one run
``delay`` seconds after the last push of a burst), at most one run per
repository and ``jobs`` at once, never in the request path.  Since the
server maintains, pushes run no ``git gc --auto`` of their own
(:func:`without_auto_gc`).  :func:`find_repositories` lists what the
``maintain`` subcommand maintains; :func:`report_disk_usage` measures the
repositories' bytes for the metrics.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING, Dict, Iterator, Optional, Set

# Re-exported for old imports (``from gittornado.maintenance import maintain``): they lived here once.
from .housekeeping import (  # noqa: F401
    BROKEN,
    BUSY,
    DEFAULT_FULL_INTERVAL,
    DEFAULT_GRACE,
    FAILED,
    FULL_STAMP,
    LOCK_NAME,
    OK,
    MaintenanceSettings,
    low_priority,
    maintain,
)
from .repos import _is_git_dir

if TYPE_CHECKING:
    from .observe import Metrics

log = logging.getLogger("gittornado.maintenance")

#: Seconds after a repository's last push before it is maintained.
DEFAULT_DELAY = 60.0


def without_auto_gc(env: Dict[str, str]) -> Dict[str, str]:
    """``env`` plus ``receive.autogc=false`` as git reads it from the environment (``GIT_CONFIG_COUNT``).

    receive-pack otherwise runs ``git gc --auto`` after a push: once 50 packs
    pile up, a full repack at normal priority, detached where the server can
    neither limit nor stop it, on every repository crossing the line at once.
    """
    count = int(env.get("GIT_CONFIG_COUNT", "0") or "0")
    return {
        **env,
        "GIT_CONFIG_COUNT": str(count + 1),
        f"GIT_CONFIG_KEY_{count}": "receive.autogc",
        f"GIT_CONFIG_VALUE_{count}": "false",
    }


def find_repositories(root: str) -> Iterator[str]:
    """Every git directory below ``root``, as the server finds them (not those nested in another).

    Symlinks are not followed, so nothing outside ``root`` and no repository twice.
    """
    for folder, dirs, _ in os.walk(root):
        dirs.sort()
        if folder != root and _is_git_dir(folder):
            yield folder
            dirs.clear()
        elif folder != root and os.path.isdir(os.path.join(folder, ".git")):
            if _is_git_dir(os.path.join(folder, ".git")):
                yield os.path.join(folder, ".git")
            dirs.clear()


def disk_usage(root: str) -> int:
    """Bytes the files below ``root`` take on disk (as ``du`` counts them)."""
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_blocks * 512
            except OSError:
                pass
    return total


class MaintenanceScheduler:
    """Runs :func:`maintain` after pushes: debounced, one run per repository, ``jobs`` at once.

    :meth:`pushed` is all a request does; the run happens ``delay`` seconds
    after a repository's last push, as a separate low-priority process, and
    a push arriving during a run schedules one more.  ``metrics``, when set,
    is told each run's outcome and duration.  One scheduler per process; the
    lock file keeps those of several processes (or hosts) apart: a run that
    finds the repository busy tries again ``delay`` seconds later.
    """

    def __init__(
        self,
        settings: MaintenanceSettings,
        delay: float = DEFAULT_DELAY,
        jobs: int = 1,
        metrics: Optional[Metrics] = None,
    ) -> None:
        self.settings = settings
        self.delay = delay
        self.metrics = metrics
        self._slots = asyncio.Semaphore(jobs)
        self._timers: Dict[str, asyncio.TimerHandle] = {}
        self._running: Dict[str, asyncio.Task] = {}
        self._again: Set[str] = set()
        self._closed = False

    def pushed(self, git_dir: str) -> None:
        """``git_dir`` changed: maintain it ``delay`` seconds from now, unless it changes again first."""
        if self._closed:
            return
        if git_dir in self._running:
            self._again.add(git_dir)
            return
        timer = self._timers.pop(git_dir, None)
        if timer is not None:
            timer.cancel()
        loop = asyncio.get_running_loop()
        self._timers[git_dir] = loop.call_later(self.delay, self._start, git_dir)

    @property
    def pending(self) -> int:
        """Repositories waiting for or in a run."""
        return len(self._timers) + len(self._running)

    async def close(self) -> None:
        """Forget what is scheduled and stop what runs (git's steps are safe to cut off); schedule no more."""
        self._closed = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _start(self, git_dir: str) -> None:
        del self._timers[git_dir]
        self._running[git_dir] = asyncio.ensure_future(self._run(git_dir))

    async def _run(self, git_dir: str) -> None:
        try:
            async with self._slots:
                started = time.monotonic()
                try:
                    result = await maintain(git_dir, self.settings)
                except Exception:  # a bug here must not stop the next push's run
                    log.exception("%s: maintenance failed", git_dir)
                    result = FAILED
                if result == BUSY:
                    self._again.add(git_dir)
                elif self.metrics is not None:
                    self.metrics.maintenance_finished(result, time.monotonic() - started)
        finally:
            del self._running[git_dir]
            if git_dir in self._again:
                self._again.discard(git_dir)
                self.pushed(git_dir)


async def report_disk_usage(root: str, metrics: Metrics, interval: float = 300.0) -> None:
    """Every ``interval`` seconds, measure the repositories' bytes on disk (off the event loop)."""
    loop = asyncio.get_running_loop()
    while True:
        metrics.repositories_disk_bytes.set(await loop.run_in_executor(None, disk_usage, root))
        await asyncio.sleep(interval)
