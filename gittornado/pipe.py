"""The streaming bridge between one HTTP exchange and one git process.

Data flows one way through it: request body -> git's stdin, git's stdout ->
response, git's stderr -> the log.  Every write is awaited, so a slow git
slows reading from the client and a slow client slows reading from git; at
most a few chunks are in memory whatever the size of the transfer.

When the exchange ends early (the client vanished, the body was refused),
:meth:`GitProcessPipe.abort` lets git wind down by itself first: its stdin is
closed, so it sees the end of input.  A git that writes to the repository
(receive-pack) keeps its stdout drained, because that is the path on which it
reports the failure and removes its quarantined objects; a signal or a broken
pipe would leave them behind.  A git that only reads has its stdout closed, so
a clone nobody will receive stops at its next write.  Whatever still runs
after a grace period gets SIGTERM, then SIGKILL, sent to its whole process
group (hooks, pack-objects, index-pack).  The process is always reaped.

Spawning git happens on a small thread pool: ``fork``/``exec`` blocks the
calling thread until the child has exec'd, which on a busy host is long enough
to stall every other request if done on the event loop.  Exits are watched
with a pidfd on the loop (a waiting thread where pidfds are missing), so no
process-wide SIGCHLD handler is needed.

Two guards protect a small host: :class:`GitProcesses` caps how many git
processes run at once (a request beyond waits briefly for a slot, then gets
503), and an idle timeout ends an exchange in which no byte has moved either
way for too long, so a stalled client cannot hold a git process forever.
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
from typing import Callable, Dict, List, Optional, Set, Union

from tornado.concurrent import Future, future_set_result_unless_cancelled
from tornado.httputil import HTTPConnection
from tornado.ioloop import IOLoop
from tornado.iostream import PipeIOStream, StreamClosedError
from tornado.locks import Semaphore
from tornado.util import TimeoutError as WaitTimeout
from tornado.web import HTTPError, RequestHandler

from .relay import CHUNK_SIZE, COALESCE_PIPE_SIZE, OutputRelay

log = logging.getLogger("gittornado")

#: Kernel buffer of the pipe from git's stdout (Linux's default is 64 KiB): git keeps
#: writing while the loop is busy with other requests or pauses to let output gather.
STDOUT_PIPE_SIZE = COALESCE_PIPE_SIZE
#: Kernel buffer of the pipe to git's stdin: a request body piece fits, and what git reads
#: is still in the CPU's cache (a 1 MiB pipe made a 1 GiB push about 15% slower, measured).
STDIN_PIPE_SIZE = 256 * 1024
#: Seconds an aborted read-only git gets to exit by itself, before SIGTERM.
EXIT_GRACE = 1.0
#: The same for receive-pack, which may be finishing a push whose body arrived whole.
WRITER_EXIT_GRACE = 30.0
#: Seconds between SIGTERM and SIGKILL.
KILL_GRACE = 2.0
#: Longest stderr line logged; the rest is cut so a noisy git cannot flood the log.
MAX_LOG_LINE = 1000


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
        self.running: Set[GitProcessPipe] = set()
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


class GitProcessPipe:
    """One running git command, bridged to one HTTP response.

    Create it with :meth:`start`, feed the request body with :meth:`write`,
    then :meth:`end_input` and :meth:`respond`.  ``context`` names the
    repository and service in log lines.
    """

    def __init__(
        self,
        proc: GitChild,
        context: str,
        registry: GitProcesses,
        connection: HTTPConnection,
        idle_timeout: Optional[float],
        writes_repository: bool,
    ) -> None:
        self._proc = proc
        self._context = context
        self._connection = connection
        self._idle_timeout = idle_timeout
        self._writes_repository = writes_repository
        self._stdin_open = proc.stdin is not None
        self._draining = False
        self._idle_timer: Optional[object] = None
        self._aborted = False
        self._pending_write: Optional[Future[None]] = None
        self._relay: Optional[OutputRelay] = None
        self._escalation: Optional[object] = None
        self._exit = proc.exit
        self._exit.add_done_callback(lambda _: self._exited(registry))
        registry.running.add(self)
        # Its loop, looked up once: _touch() runs for every piece of every body.
        self._loop = loop = IOLoop.current()
        loop.spawn_callback(self._drain_stderr)
        self._last_activity = loop.time()
        if idle_timeout:
            self._idle_timer = loop.call_later(idle_timeout, self._check_idle)

    @classmethod
    async def start(
        cls,
        argv: List[str],
        env: Dict[str, str],
        context: str,
        registry: GitProcesses,
        connection: HTTPConnection,
        *,
        idle_timeout: Optional[float] = None,
        with_stdin: bool = False,
        writes_repository: bool = False,
    ) -> GitProcessPipe:
        """Spawn ``argv`` in its own process group with piped stdout and stderr.

        Waits for a slot in ``registry`` first (raising :class:`Busy`).
        ``writes_repository`` says git may change the repository (receive-pack),
        which decides how :meth:`abort` winds it down.  ``connection`` is
        closed when no byte has moved either way for ``idle_timeout`` seconds.
        """
        await registry.reserve()
        try:
            proc = await registry.spawn(argv, env, with_stdin)
        except OSError as error:
            registry.release()
            log.error("%s: cannot run git: %s", context, error)
            raise HTTPError(500, reason="Cannot run git; see the server log") from None
        return cls(proc, context, registry, connection, idle_timeout, writes_repository)

    @property
    def exit_status(self) -> Optional[int]:
        """git's exit status once it has exited, else None (the access log reports it)."""
        return self._exit.result() if self._exit.done() else None

    def _exited(self, registry: GitProcesses) -> None:
        registry.running.discard(self)
        registry.release()

    async def write(self, data: Union[bytes, memoryview]) -> None:
        """Write request-body bytes to git's stdin.

        Returns once the previous piece has been taken, so one piece is in
        flight to git while the next is read from the client, and never more.
        If git has stopped reading (it exited, or refused the request), the
        rest of the body is discarded; git's answer still goes to the client.
        """
        self._touch()
        if not self._stdin_open or not data:
            return
        try:
            await self._stdin_taken()
            self._pending_write = self._proc.stdin.write(data)
        except StreamClosedError:
            self._stdin_open = False

    async def _stdin_taken(self) -> None:
        pending, self._pending_write = self._pending_write, None
        if pending is not None:
            await pending

    async def end_input(self) -> None:
        """The request body is complete: let git take the rest, then close its stdin."""
        try:
            await self._stdin_taken()
        except StreamClosedError:
            self._stdin_open = False
        self.close_stdin()

    def close_stdin(self) -> None:
        """Close git's stdin now (what is not yet written is dropped)."""
        if self._stdin_open:
            self._stdin_open = False
            self._proc.stdin.close()

    async def respond(
        self,
        handler: RequestHandler,
        content_type: str,
        prefix: bytes = b"",
        tee: Optional[Callable[[memoryview], None]] = None,
    ) -> bool:
        """Stream git's stdout into ``handler``'s response, through a :class:`~.relay.OutputRelay`.

        Headers are sent with git's first output.  If git fails before any
        output, the client gets a 500 with a short reason; if it fails after,
        the connection is dropped without the terminating chunk, so the client
        sees a failed transfer instead of a silently truncated success.
        ``tee``, if given, is called with each piece of git's output as it
        goes out.  Returns True when all of git's output went out and git
        succeeded.

        The relay writes to the connection's stream past the handler, so the
        handler's output transforms are dropped: they would not see those
        bytes, and git's answers (packs, already compressed, or a few ref
        lines) gain nothing from them.
        """
        stream = handler.request.connection.stream  # type: ignore[attr-defined]
        relay = self._relay = OutputRelay(self._proc.stdout, stream, handler.request.version == "HTTP/1.1")
        try:
            length = await relay.wait_output()
            if not length:
                status = await self._exit
                if status != 0:
                    self._end()
                    log.warning("%s: git exited with status %s before any output", self._context, status)
                    handler.send_error(500, reason="git failed; see the server log")
                    return False
            handler.set_header("Content-Type", content_type)
            handler._transforms = []  # see the docstring
            handler.write(prefix)
            await handler.flush()  # the headers, and the prefix framed by Tornado
            while length and not self._aborted:
                handler.bytes_out += length  # type: ignore[attr-defined]  # for the access log
                if tee is not None:
                    tee(relay.output(length))
                await relay.send(length)
                self._touch()
                length = await relay.wait_output()
        except StreamClosedError:
            log.info("%s: client went away mid-transfer", self._context)
            self.abort()
        finally:
            relay.close()
            self._relay = None
        if self._aborted:
            self._discard_rest(relay)
            return False
        status = await self._exit
        self._end()
        if status != 0:
            log.warning(
                "%s: git exited with status %s mid-transfer; aborting response", self._context, status
            )
            handler.request.connection.close()
        handler.finish()
        if handler.request.version == "HTTP/1.0":
            # The body is close-delimited for HTTP/1.0; end it even if the
            # client asked for keep-alive.
            handler.request.connection.close()
        return status == 0

    def _end(self) -> None:
        """The exchange is over: stop watching it for idleness (the timer would keep it alive)."""
        if self._idle_timer is not None:
            self._loop.remove_timeout(self._idle_timer)
            self._idle_timer = None

    def _touch(self) -> None:
        self._last_activity = self._loop.time()

    def _check_idle(self) -> None:
        """End the exchange once no byte has moved either way for the idle timeout."""
        if self._idle_timer is None or not self._idle_timeout:
            return
        idle = self._loop.time() - self._last_activity
        if idle < self._idle_timeout:
            self._idle_timer = self._loop.call_later(self._idle_timeout - idle, self._check_idle)
            return
        log.warning("%s: no data moved for %.0fs; closing the connection", self._context, idle)
        self.abort()
        self._connection.close()

    async def _drain_stderr(self) -> None:
        """Log git's stderr line by line as it comes, so its pipe never fills."""
        stream = self._proc.stderr
        pending = b""
        try:
            while True:
                pending += await stream.read_bytes(64 * 1024, partial=True)
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self._log_stderr(line)
                if len(pending) > MAX_LOG_LINE:
                    self._log_stderr(pending)
                    pending = b""
        except StreamClosedError:
            if pending:
                self._log_stderr(pending)

    def _log_stderr(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip("\r")[:MAX_LOG_LINE]
        if text.strip():
            log.warning("%s: git: %s", self._context, text)

    def abort(self) -> None:
        """End git early, as gently as leaves the repository clean (see the module docstring).

        Safe to call more than once, and while :meth:`respond` is running.
        """
        self._aborted = True
        self._end()
        self.close_stdin()
        if self._relay is None:  # else respond() is running, and calls this when it stops
            self._discard_rest(None)
        if self._escalation is None and not self._exit.done():
            grace = WRITER_EXIT_GRACE if self._writes_repository else EXIT_GRACE
            self._escalation = self._loop.call_later(grace, self._escalate, signal.SIGTERM)

    def _discard_rest(self, relay: Optional[OutputRelay]) -> None:
        """Drain receive-pack's output so it can finish cleanly; cut a reader's."""
        if not self._writes_repository:
            self._proc.stdout.close()
        elif not self._draining:
            self._draining = True
            self._loop.spawn_callback(self._discard_stdout, relay)

    async def _discard_stdout(self, relay: Optional[OutputRelay]) -> None:
        if relay is not None:
            await relay.settle()
        try:
            while True:
                await self._proc.stdout.read_bytes(CHUNK_SIZE, partial=True)
        except StreamClosedError:
            pass

    def _escalate(self, signum: int) -> None:
        if self._exit.done():
            return
        log.warning(
            "%s: git still running after the exchange ended; sending %s",
            self._context,
            signal.Signals(signum).name,
        )
        try:
            os.killpg(self._proc.pid, signum)
        except ProcessLookupError:
            return
        if signum == signal.SIGTERM:
            self._loop.call_later(KILL_GRACE, self._escalate, signal.SIGKILL)
