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

import logging
import os
import signal
from typing import Callable, Dict, List, Optional, Union

from tornado.concurrent import Future
from tornado.httputil import HTTPConnection
from tornado.ioloop import IOLoop
from tornado.iostream import StreamClosedError
from tornado.web import HTTPError, RequestHandler

from .process import Busy, GitChild, GitProcesses  # noqa: F401
from .relay import CHUNK_SIZE, OutputRelay

log = logging.getLogger("gittornado")

#: Seconds an aborted read-only git gets to exit by itself, before SIGTERM.
EXIT_GRACE = 1.0
#: The same for receive-pack, which may be finishing a push whose body arrived whole.
WRITER_EXIT_GRACE = 30.0
#: Seconds between SIGTERM and SIGKILL.
KILL_GRACE = 2.0
#: Longest stderr line logged; the rest is cut so a noisy git cannot flood the log.
MAX_LOG_LINE = 1000


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
