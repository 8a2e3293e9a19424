"""One maintenance run of one repository: git's own housekeeping steps, under the repository's lock.

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
A push that lands while the repack runs can make its last step, the
multi-pack bitmap, fail ("doesn't have full closure"): git then keeps every
pack and deletes nothing, so the repack is run once more, and if pushes keep
racing it the run ends as busy and is scheduled again.

Two runs of the same repository are kept apart by
``<git dir>/gittornado-maintenance.lock``, created with ``O_EXCL`` (so it also
works between hosts sharing the repositories); a lock whose process is gone,
or older than :data:`STALE_LOCK`, is taken over, as ``git gc`` does with
``gc.pid``.

When the runs happen is :mod:`gittornado.maintenance`'s business.
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
from typing import Dict, List, Optional

from .util import decimal

log = logging.getLogger("gittornado.maintenance")  # the name it logged under before the split

#: Unreachable objects and abandoned quarantines younger than this are kept (git gc's default, 2 weeks).
DEFAULT_GRACE = 14 * 24 * 3600.0
#: How often the repack is a full one that drops old unreachable objects.
DEFAULT_FULL_INTERVAL = 24 * 3600.0
#: A lock this old belongs to a run that died on another host (git gc: 12 hours for gc.pid).
STALE_LOCK = 12 * 3600.0
LOCK_NAME = "gittornado-maintenance.lock"
#: Its modification time is when the last full repack finished.
FULL_STAMP = "gittornado-maintenance.last-full"
QUARANTINE_PREFIX = "tmp_objdir-incoming-"
#: What git 2.39's repack says when a push lands between its snapshot of the refs and the
#: multi-pack bitmap: the packs it wrote are kept and nothing is deleted, so running it again is safe.
RACED_A_PUSH = "doesn't have full closure"
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
        number = decimal(pid)
        if host != socket.gethostname() or number is None:
            return False
        try:
            os.kill(number, 0)
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
            if problem is not None and RACED_A_PUSH in problem:
                problem = await run_step(argv, settings.env)  # the push has landed by now
                if problem is not None and RACED_A_PUSH in problem:
                    log.info("%s: pushes keep moving refs under the repack; trying again later", git_dir)
                    return BUSY
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
