"""git processes: slots, spawning off the event loop, pidfd reaping, kill escalation.

Spawning happens on a small thread pool: ``fork``/``exec`` blocks the calling
thread until the child has exec'd, which on a busy host is long enough to
stall every other request if done on the event loop.  Exits are watched with
a pidfd on the loop (a waiting thread where pidfds are missing), so no
process-wide SIGCHLD handler is needed.

Every git runs in a process group of its own, so ending it ends what it
started (hooks, pack-objects, index-pack): :meth:`GitChild.signal` and the
escalation of :meth:`GitChild.end_after` (SIGTERM, then SIGKILL) go to the
whole group.  :meth:`GitProcesses.end_all` does that for every process still
running at shutdown and returns once all are reaped.

This module knows processes, not HTTP: a full table of slots is
:class:`Busy`, a spawn that fails is :class:`SpawnFailed`; the handlers
decide what a client is told.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import logging
import os
import signal
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Dict, List, Optional, Set, Tuple

from tornado.concurrent import Future, future_set_result_unless_cancelled
from tornado.ioloop import IOLoop
from tornado.iostream import PipeIOStream
from tornado.locks import Semaphore
from tornado.util import TimeoutError as WaitTimeout

from .sizes import CHUNK_SIZE, STDOUT_PIPE_SIZE

log = logging.getLogger("gittornado")

#: Kernel buffer of the pipe to git's stdin: one body piece, so what git reads is still in the CPU's
#: cache when it reads it (a 1 MiB pipe made a 1 GiB push about 15% slower, measured).
STDIN_PIPE_SIZE = CHUNK_SIZE
#: Seconds between SIGTERM and SIGKILL.
KILL_GRACE = 2.0


class Busy(Exception):
    """Every git process slot stayed taken for the queue timeout; retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__("every git process slot is taken")
        self.retry_after = retry_after


class SpawnFailed(Exception):
    """git could not be started (missing binary, no memory, a NUL in its environment, ...)."""


class GitProcesses:
    """The git processes one server has running, and the cap on their number.

    Shared by all requests of an application, so shutdown can wait for running
    transfers and then end what is left.  With a ``limit``, a request waits up
    to ``queue_timeout`` seconds for a free slot before it is refused.
    """

    def __init__(self, limit: Optional[int] = None, queue_timeout: float = 60.0) -> None:
        self.running: Set[GitChild] = set()
        self.limit = limit
        self.queue_timeout = queue_timeout
        self._slots = Semaphore(limit) if limit else None
        self._spawner = ThreadPoolExecutor(max_workers=4, thread_name_prefix="gittornado-spawn")

    async def start(self, argv: List[str], env: Dict[str, str], with_stdin: bool) -> GitChild:
        """Take a slot (or raise :class:`Busy`) and start ``argv`` in a process group of its own.

        The slot is given back when the process has exited and been reaped,
        or at once if it never started, whatever went wrong.
        """
        await self._reserve()
        try:
            popen, fds = await self._spawn(argv, env, with_stdin)
        except BaseException as error:
            self._release()
            if isinstance(error, (OSError, ValueError, TypeError)):
                raise SpawnFailed(str(error)) from None
            raise
        child = GitChild(popen, *fds)
        self.running.add(child)
        child.exit.add_done_callback(lambda _: self._exited(child))
        return child

    async def end_all(self) -> None:
        """Shutdown: SIGTERM every running process group, SIGKILL the groups after :data:`KILL_GRACE`
        (a hook that ignores SIGTERM outlives its git otherwise), and return once all are reaped."""
        children = list(self.running)
        for child in children:
            child.signal(signal.SIGTERM)
        exits = [asyncio.wrap_future(child.exit) for child in children]
        if exits:
            await asyncio.wait(exits, timeout=KILL_GRACE)
            for child in children:
                child.signal(signal.SIGKILL)
            await asyncio.wait(exits, timeout=KILL_GRACE)

    async def _spawn(
        self, argv: List[str], env: Dict[str, str], with_stdin: bool
    ) -> Tuple[subprocess.Popen, Tuple[int, int, int]]:
        opened: List[int] = []  # every fd made here, so a failure at any step closes them all
        try:
            stdin_r, stdin_w = _pipe(opened, STDIN_PIPE_SIZE) if with_stdin else (subprocess.DEVNULL, -1)
            stdout_r, stdout_w = _pipe(opened, STDOUT_PIPE_SIZE)
            stderr_r, stderr_w = _pipe(opened)
            start = functools.partial(
                subprocess.Popen,
                argv,
                stdin=stdin_r,
                stdout=stdout_w,
                stderr=stderr_w,
                env=env,
                start_new_session=True,
            )
            popen = await asyncio.get_running_loop().run_in_executor(self._spawner, start)
        except BaseException:
            for fd in opened:
                os.close(fd)
            raise
        for fd in (stdin_r, stdout_w, stderr_w):  # git's ends: it has its own copies now
            if fd >= 0:
                os.close(fd)
        return popen, (stdin_w, stdout_r, stderr_r)

    async def _reserve(self) -> None:
        if self._slots is None:
            return
        try:
            await self._slots.acquire(timeout=timedelta(seconds=self.queue_timeout))
        except WaitTimeout:
            raise Busy(retry_after=max(1, round(self.queue_timeout))) from None

    def _release(self) -> None:
        if self._slots is not None:
            self._slots.release()

    def _exited(self, child: GitChild) -> None:
        self.running.discard(child)
        self._release()


def _pipe(opened: List[int], size: Optional[int] = None) -> Tuple[int, int]:
    """A pipe (both ends close-on-exec, appended to ``opened``), with a buffer of ``size``
    bytes where the kernel allows."""
    read_end, write_end = os.pipe()
    opened += (read_end, write_end)
    if size is not None:
        try:
            fcntl.fcntl(read_end, getattr(fcntl, "F_SETPIPE_SZ", 1031), size)
        except OSError:
            pass  # a smaller pipe only costs speed
    return read_end, write_end


class GitChild:
    """A started git process: its pipes as Tornado streams, and a future of its exit status."""

    def __init__(self, popen: subprocess.Popen, stdin_fd: int, stdout_fd: int, stderr_fd: int) -> None:
        self.pid = popen.pid  # also the process group id (a new session)
        self.stdin = PipeIOStream(stdin_fd) if stdin_fd >= 0 else None
        self.stdout = PipeIOStream(stdout_fd)
        self.stderr = PipeIOStream(stderr_fd)
        self.exit: Future[int] = Future()
        self._popen = popen
        self._escalation: Optional[object] = None
        self._loop = loop = IOLoop.current()
        try:
            pidfd = os.pidfd_open(popen.pid)  # type: ignore[attr-defined]
        except (AttributeError, OSError):
            waiter = threading.Thread(target=self._wait_in_thread, args=(loop,), daemon=True)
            waiter.start()
        else:
            loop.add_handler(pidfd, self._on_pidfd, IOLoop.READ)

    def signal(self, signum: signal.Signals) -> None:
        """Send ``signum`` to the process's whole group (quietly, if it is gone)."""
        try:
            os.killpg(self.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def end_after(self, grace: float, context: str) -> None:
        """Unless it exits within ``grace`` seconds, SIGTERM its group, then SIGKILL it."""
        if self._escalation is None and not self.exit.done():
            self._escalation = self._loop.call_later(grace, self._escalate, signal.SIGTERM, context)

    def _escalate(self, signum: signal.Signals, context: str) -> None:
        # SIGKILL goes out even if git has exited: a hook that ignored SIGTERM may still run in its group.
        if signum == signal.SIGTERM:
            if self.exit.done():
                return
            log.warning("%s: git still running after the exchange ended; sending SIGTERM", context)
            self._escalation = self._loop.call_later(KILL_GRACE, self._escalate, signal.SIGKILL, context)
        self.signal(signum)

    def _on_pidfd(self, pidfd: int, events: int) -> None:
        self._loop.remove_handler(pidfd)
        os.close(pidfd)
        self._reaped(self._popen.wait())

    def _wait_in_thread(self, loop: IOLoop) -> None:
        status = self._popen.wait()
        loop.add_callback(self._reaped, status)

    def _reaped(self, status: int) -> None:
        future_set_result_unless_cancelled(self.exit, status)
