"""Housekeeping of served repositories: git's own maintenance, run after pushes and on demand.

Every push leaves a pack or loose objects behind; after a few hundred, every
fetch looks through all of them and a clone without a reachability bitmap
spends seconds counting objects.  :func:`maintain` runs, for one repository,
at low CPU and I/O priority (``ionice -c3 nice -n 19`` where present)::

    git pack-refs --all
    git prune --expire=<grace>                  # loose unreachable objects older than the grace
    git repack -d -q --geometric=2 --write-midx --write-bitmap-index
    git commit-graph write --reachable --split --no-progress

First it removes ``objects/tmp_objdir-incoming-*``, the quarantines of pushes
that were cut off (a killed server leaves them), once nothing in them has
changed for the grace period: a push in progress writes into its quarantine,
so one younger than that may be in use.  ``git prune`` would remove them too,
but it judges by the directory's own time, which a push writing into
``pack/`` below does not change; so each kept quarantine's time is first set
to its newest content's.  With ``verify``, ``git fsck`` runs first, and a
repository it finds damaged is reported and left alone.

Once a day (``full_interval``) the repack is a full one instead,
``git repack -d -q --cruft --cruft-expiration=<grace> --write-midx
--write-bitmap-index``: reachable objects go into one pack, unreachable ones
into a cruft pack that remembers their age, and those older than the grace
(a force-pushed-away secret, two weeks later) are dropped.  A geometric
repack alone would keep them forever.

git's own locks keep each step safe against clones and pushes running at the
same time (that is what they are for: ``git gc --auto`` runs inside pushes).
Two runs of the same repository are kept apart by
``<git dir>/gittornado-maintenance.lock``, created with ``O_EXCL`` (so it also
works between hosts sharing the repositories); a lock whose process is gone,
or older than :data:`STALE_LOCK`, is taken over, as ``git gc`` does with
``gc.pid``.

:class:`MaintenanceScheduler` runs this after pushes, debounced (one run
``delay`` seconds after the last push of a burst), at most one run per
repository and ``jobs`` at once, never in the request path.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Set

from .repos import _is_git_dir

if TYPE_CHECKING:
    from .observe import Metrics

log = logging.getLogger("gittornado.maintenance")

#: Unreachable objects and abandoned quarantines younger than this are kept (git gc's default, 2 weeks).
DEFAULT_GRACE = 14 * 24 * 3600.0
#: Seconds after a repository's last push before it is maintained.
DEFAULT_DELAY = 60.0
#: How often the repack is a full one that drops old unreachable objects.
DEFAULT_FULL_INTERVAL = 24 * 3600.0
#: A lock this old belongs to a run that died on another host (git gc: 12 hours for gc.pid).
STALE_LOCK = 12 * 3600.0
LOCK_NAME = "gittornado-maintenance.lock"
#: Its modification time is when the last full repack finished.
FULL_STAMP = "gittornado-maintenance.last-full"
QUARANTINE_PREFIX = "tmp_objdir-incoming-"
#: The last bytes of a failing step's stderr that are logged.
STDERR_TAIL = 4000

# Outcomes of :func:`maintain`.
OK = "ok"
FAILED = "failed"
BUSY = "busy"
BROKEN = "broken"


@dataclass(frozen=True)
class MaintenanceSettings:
    """What a maintenance run does.

    ``grace``: seconds an unreachable object or an abandoned quarantine is
    kept; ``full_interval``: seconds between full repacks (0: every run);
    ``verify``: also check the repository with ``git fsck`` (connectivity only
    unless ``full_fsck``); ``git`` and ``env``: the git binary and its
    environment.
    """

    grace: float = DEFAULT_GRACE
    full_interval: float = DEFAULT_FULL_INTERVAL
    verify: bool = False
    full_fsck: bool = False
    git: str = "git"
    env: Dict[str, str] = field(default_factory=dict)


def low_priority() -> List[str]:
    """The command prefix that runs a program at idle I/O and lowest CPU priority, where available."""
    prefix = []
    if shutil.which("ionice"):
        prefix += ["ionice", "-c3"]
    if shutil.which("nice"):
        prefix += ["nice", "-n", "19"]
    return prefix


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


def git_date(seconds_ago: float) -> str:
    """A moment ``seconds_ago`` in the past, as git's ``--expire`` options read it."""
    return f"{int(seconds_ago)}.seconds.ago"


def steps(git_dir: str, settings: MaintenanceSettings, full: bool) -> List[List[str]]:
    """The git commands of one run, in order."""
    git = [settings.git, "--git-dir", git_dir]
    expire = git_date(settings.grace)
    repack = [*git, "repack", "-d", "-q"]
    if full:
        repack += ["--cruft", f"--cruft-expiration={expire}"]
    else:
        repack += ["--geometric=2"]
    commands = []
    if settings.verify:  # first: a damaged repository is reported, not repacked
        check = [] if settings.full_fsck else ["--connectivity-only"]
        commands.append([*git, "fsck", "--no-progress", "--no-dangling", *check])
    commands += [
        [*git, "pack-refs", "--all"],
        # Before the repack: a geometric repack would pack them, out of prune's reach.
        [*git, "prune", f"--expire={expire}"],
        [*repack, "--write-midx", "--write-bitmap-index"],
        [*git, "commit-graph", "write", "--reachable", "--split", "--no-progress"],
    ]
    return commands


def full_due(git_dir: str, settings: MaintenanceSettings) -> bool:
    """Whether this run's repack should be a full one (see the module docstring)."""
    try:
        last = os.stat(os.path.join(git_dir, FULL_STAMP)).st_mtime
    except OSError:
        return True
    return time.time() - last >= settings.full_interval


def newest_change(path: str) -> float:
    """The latest modification time of ``path`` and everything below it (symlinks not followed)."""
    newest = os.lstat(path).st_mtime
    for folder, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                newest = max(newest, os.lstat(os.path.join(folder, name)).st_mtime)
            except OSError:
                pass  # removed meanwhile: the quarantine is in use or going away
    return newest


def tidy_quarantines(git_dir: str, grace: float) -> List[str]:
    """Remove push quarantines in which nothing changed for ``grace`` seconds; return their names.

    The others get the time of their newest content, so ``git prune`` keeps them as well.
    """
    objects = os.path.join(git_dir, "objects")
    removed = []
    try:
        entries = list(os.scandir(objects))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(QUARANTINE_PREFIX) or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            newest = newest_change(entry.path)
            if time.time() - newest < grace:
                os.utime(entry.path, (newest, newest))
                continue
        except OSError:
            continue  # gone meanwhile: its push finished
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(entry.name)
    return removed


class RepositoryLock:
    """``<git dir>/gittornado-maintenance.lock``: one maintenance run of a repository at a time.

    The file holds ``<host> <pid>``; it is taken over when that process is
    gone (same host) or it is older than :data:`STALE_LOCK` (any host).
    """

    def __init__(self, git_dir: str) -> None:
        self.path = os.path.join(git_dir, LOCK_NAME)
        self.held = False

    def acquire(self) -> bool:
        """Take the lock; False if another run holds it."""
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                if not self._stale():
                    return False
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{socket.gethostname()} {os.getpid()}\n")
            self.held = True
            return True
        return False

    def release(self) -> None:
        """Give the lock back (only if this object holds it)."""
        if self.held:
            self.held = False
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def _stale(self) -> bool:
        try:
            with open(self.path) as f:
                host, _, pid = f.read().strip().partition(" ")
            age = time.time() - os.stat(self.path).st_mtime
        except (OSError, ValueError):
            return False  # being written or just removed: try again next time
        if age >= STALE_LOCK:
            return True
        if host != socket.gethostname() or not pid.isdigit():
            return False
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


async def run_step(argv: List[str], env: Dict[str, str]) -> Optional[str]:
    """Run one command at low priority; None on success, else what went wrong (its stderr's tail).

    Cancelled, it ends the command's whole process group.
    """
    proc = await asyncio.create_subprocess_exec(
        *low_priority(),
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    try:
        _, stderr = await proc.communicate()
    except asyncio.CancelledError:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # what git leaves half-written, the next run's prune removes
        except ProcessLookupError:
            pass
        await proc.wait()
        raise
    if proc.returncode == 0:
        return None
    tail = stderr[-STDERR_TAIL:].decode("utf-8", "replace").strip()
    return f"exit status {proc.returncode}: {tail}"


async def maintain(git_dir: str, settings: MaintenanceSettings) -> str:
    """Maintain one repository now: :data:`OK`, :data:`FAILED`, :data:`BROKEN` (fsck found damage)
    or :data:`BUSY` (another run holds its lock)."""
    lock = RepositoryLock(git_dir)
    if not lock.acquire():
        return BUSY
    try:
        for name in tidy_quarantines(git_dir, settings.grace):
            log.info("%s: removed the abandoned push quarantine objects/%s", git_dir, name)
        full = full_due(git_dir, settings)
        for argv in steps(git_dir, settings, full):
            problem = await run_step(argv, settings.env)
            if problem is not None:
                verifying = argv[3] == "fsck"
                what = "is broken" if verifying else "maintenance failed"
                log.warning("%s: %s at `git %s`: %s", git_dir, what, " ".join(argv[3:]), problem)
                return BROKEN if verifying else FAILED
        if full:
            with open(os.path.join(git_dir, FULL_STAMP), "w"):
                pass
        return OK
    except OSError as error:
        log.warning("%s: maintenance failed: %s", git_dir, error)
        return FAILED
    finally:
        lock.release()


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
