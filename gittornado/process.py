"""git processes: slots, spawning off the event loop, pidfd reaping, kill escalation."""

from __future__ import annotations

import asyncio
import fcntl
import functools
import os
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any, Dict, List, Optional, Set

from tornado.concurrent import Future, future_set_result_unless_cancelled
from tornado.ioloop import IOLoop
from tornado.iostream import PipeIOStream
from tornado.locks import Semaphore
from tornado.util import TimeoutError as WaitTimeout
from tornado.web import HTTPError

#: Kernel buffer of the pipe from git's stdout (Linux's default is 64 KiB): git keeps
#: writing while the loop is busy with other requests or pauses to let output gather.
STDOUT_PIPE_SIZE = 1024 * 1024
#: Kernel buffer of the pipe to git's stdin: a request body piece fits, and what git reads
#: is still in the CPU's cache (a 1 MiB pipe made a 1 GiB push about 15% slower, measured).
STDIN_PIPE_SIZE = 256 * 1024


class Busy(HTTPError):
    """503: every git process slot stayed taken; ``retry_after`` says when to try again."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(503, reason="Too many git processes running; retry shortly")
        self.retry_after = retry_after


class GitProcesses:
    """The git processes one server has running, and the cap on their number.

    Shared by all requests of an application, so shutdown can wait for running
    transfers and then end what is left.  With a ``limit``, a request waits up
    to ``queue_timeout`` seconds for a free slot before it is refused.
    """

    def __init__(self, limit: Optional[int] = None, queue_timeout: float = 10.0) -> None:
        self.running: Set[Any] = set()
        self.limit = limit
        self.queue_timeout = queue_timeout
        self._slots = Semaphore(limit) if limit else None
        self._spawner = ThreadPoolExecutor(max_workers=4, thread_name_prefix="gittornado-spawn")

    async def spawn(self, argv: List[str], env: Dict[str, str], with_stdin: bool) -> GitChild:
        """Start ``argv`` off the event loop, in its own process group, with piped stdio."""
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
        return GitChild(popen, stdin_w, stdout_r, stderr_r)

    async def reserve(self) -> None:
        """Take a slot for one git process, waiting for one if need be."""
        if self._slots is None:
            return
        try:
            await self._slots.acquire(timeout=timedelta(seconds=self.queue_timeout))
        except WaitTimeout:
            raise Busy(retry_after=max(1, round(self.queue_timeout))) from None

    def release(self) -> None:
        """Give back the slot of a git process that has exited."""
        if self._slots is not None:
            self._slots.release()

    def abort_all(self) -> None:
        """Terminate every running git process (used at the end of shutdown)."""
        for pipe in list(self.running):
            pipe.abort()


def _pipe(opened: List[int], size: Optional[int] = None) -> tuple[int, int]:
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
        loop = IOLoop.current()
        try:
            pidfd = os.pidfd_open(popen.pid)  # type: ignore[attr-defined]
        except (AttributeError, OSError):
            waiter = threading.Thread(target=self._wait_in_thread, args=(loop,), daemon=True)
            waiter.start()
        else:
            loop.add_handler(pidfd, self._on_pidfd, IOLoop.READ)

    def _on_pidfd(self, pidfd: int, events: int) -> None:
        IOLoop.current().remove_handler(pidfd)
        os.close(pidfd)
        future_set_result_unless_cancelled(self.exit, self._popen.wait())

    def _wait_in_thread(self, loop: IOLoop) -> None:
        status = self._popen.wait()
        loop.add_callback(future_set_result_unless_cancelled, self.exit, status)
