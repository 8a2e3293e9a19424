"""The streaming bridge between one HTTP exchange and one git process.

Data flows one way through it: request body -> git's stdin, git's stdout ->
:attr:`GitProcessPipe.output` (read by the handler's relay), git's stderr ->
the log.  It knows processes and pipes, not HTTP: the handler decides every
status, header and ending, and calls :meth:`GitProcessPipe.end` when the
exchange is over.

The life of one pipe::

    spawned --write()--> feeding --end_input()--> responding --EOF, exit--> reaped
       |                   |                          |
       +------ abort() ----+--------- abort() --------+--> aborted: draining (receive-pack)
                                                           or cut (readers) --> reaped

**git's output is read from the moment it starts.**  ``git upload-pack``
answers ``ACK`` lines while it still reads a request's ``have`` lines; if
nobody read them until the request was complete, git would block on a full
pipe and stop reading, and the exchange would hang.  So while the request
flows, a collector drains git's stdout into a hold (memory up to
:data:`~.sizes.HOLD_IN_MEMORY`, then an unnamed temporary file, gone when
closed), and the response reads the hold first once it may start.

**Ending early.**  :meth:`GitProcessPipe.abort` lets git wind down by itself
first: its stdin is closed, so it sees the end of input.  A git that writes to
the repository (receive-pack) keeps its stdout drained, because that is the
path on which it reports the failure and removes its quarantined objects; a
signal or a broken pipe would leave them behind.  A git that only reads has
its stdout closed, so a clone nobody will receive stops at its next write.
Whatever still runs after a grace period gets SIGTERM, then SIGKILL, across
its process group (:meth:`~.process.GitChild.end_after`).

**Idleness.**  When no byte has moved either way for ``idle_timeout``
seconds, the pipe aborts and calls ``on_idle`` (the handler closes the
connection), so a stalled client cannot hold a git process forever.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from typing import IO, Callable, Optional, Union

from tornado.concurrent import Future
from tornado.ioloop import IOLoop
from tornado.iostream import PipeIOStream, StreamClosedError

from .process import Busy, GitChild, GitProcesses, SpawnFailed  # noqa: F401  (their old home)
from .sizes import HOLD_IN_MEMORY

log = logging.getLogger("gittornado")

#: Seconds an aborted read-only git gets to exit by itself, before SIGTERM.
EXIT_GRACE = 1.0
#: The same for receive-pack, which may be finishing a push whose body arrived whole.
WRITER_EXIT_GRACE = 30.0
#: Longest stderr line logged; the rest is cut so a noisy git cannot flood the log.
MAX_LOG_LINE = 1000
#: Bytes of git's output read at once while it is held or discarded.
_SCRATCH = 64 * 1024


class GitOutput:
    """git's stdout as the response reads it: first what was held while the request flowed, then live.

    :meth:`read_into` has the signature of ``IOStream.read_into(buf, partial=True)``,
    so the relay reads it as it would the pipe itself, and without a copy
    once the hold is empty.
    """

    def __init__(self, stdout: PipeIOStream, hold: bool) -> None:
        self._stdout = stdout
        self._memory = bytearray()
        self._file: Optional[IO[bytes]] = None
        self._eof = False
        self._holding = hold
        self._discarding = False
        self._inflight: Optional[Future[int]] = None
        self._failed: Optional[OSError] = None
        self._collector: Optional[asyncio.Task[None]] = None
        if hold:
            self._collector = asyncio.ensure_future(self._drain())

    @property
    def held_bytes(self) -> int:
        """Bytes held in memory now (the rest is on disk)."""
        return len(self._memory)

    def fileno(self) -> int:
        """git's end of the pipe (the relay asks the kernel about it)."""
        return self._stdout.fileno()

    async def release(self) -> None:
        """The response may start: stop holding, and wait for the collector's last read.

        Call it once git has its whole input: its next write or its exit ends that read.
        Raises the OSError that kept the output from being held (a full disk).
        """
        self._holding = False
        if self._collector is not None:
            await self._collector
            self._collector = None
        if self._failed is not None:
            raise self._failed
        if self._file is not None:
            self._file.seek(0)

    def read_into(self, space: memoryview, partial: bool = True) -> Future[int]:
        """Fill ``space`` with the next output; StreamClosedError once it has all been read."""
        if self._memory:
            length = min(len(space), len(self._memory))
            space[:length] = self._memory[:length]
            del self._memory[:length]
            return _done(length)
        if self._file is not None:
            length = self._file.readinto(space)  # type: ignore[attr-defined]
            if length:
                return _done(length)
            self._close_file()
        if self._eof:
            raise StreamClosedError()
        self._inflight = self._stdout.read_into(space, partial=True)  # type: ignore[assignment]
        return self._inflight  # type: ignore[return-value]

    def discard(self) -> None:
        """Read the rest of the output and drop it (git must not block on a full pipe)."""
        self._discarding = True
        self._memory.clear()
        self._close_file()
        if self._collector is None and not self._eof:
            self._collector = asyncio.ensure_future(self._drain())

    def close(self) -> None:
        """Stop reading: git's next write fails.  Whatever was held is dropped."""
        self._memory.clear()
        self._close_file()
        self._stdout.close()

    async def _drain(self) -> None:
        """Move output into the hold (or drop it) until released, discarded to the end, or closed."""
        if self._inflight is not None:  # the relay's read, still in flight when the exchange was aborted
            try:
                await self._inflight
            except StreamClosedError:
                pass
        scratch = memoryview(bytearray(_SCRATCH))
        try:
            while self._holding or self._discarding:
                length = await self._stdout.read_into(scratch, partial=True)
                if not self._discarding:
                    self._keep(scratch[:length])
        except StreamClosedError:
            self._eof = True
        except OSError as error:  # no room for the hold: drop the rest, so git is not blocked either
            log.error("cannot hold git's early output: %s", error)
            self._failed = error
            self.discard()

    def _keep(self, data: memoryview) -> None:
        if self._file is None and len(self._memory) + len(data) <= HOLD_IN_MEMORY:
            self._memory += data
            return
        if self._file is None:
            self._file = tempfile.TemporaryFile(prefix="gittornado-held-")
        self._file.write(data)

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _done(length: int) -> Future[int]:
    future: Future[int] = Future()
    future.set_result(length)
    return future


class GitProcessPipe:
    """One running git command, bridged to one HTTP exchange.

    Feed the request body with :meth:`write`, then :meth:`end_input`; read
    :attr:`output` once :meth:`start_output` returns; :meth:`end` when the
    exchange is over.  ``context`` names the repository and service in log
    lines; ``writes_repository`` says git may change the repository
    (receive-pack), which decides how :meth:`abort` winds it down.
    """

    def __init__(
        self,
        child: GitChild,
        context: str,
        *,
        writes_repository: bool = False,
        idle_timeout: Optional[float] = None,
        on_idle: Optional[Callable[[], None]] = None,
    ) -> None:
        self._child = child
        self._context = context
        self._writes_repository = writes_repository
        self._idle_timeout = idle_timeout
        self._on_idle = on_idle
        self._stdin_open = child.stdin is not None
        self._pending_write: Optional[Future[None]] = None
        self._aborted = False
        self._ended = False
        self.output = GitOutput(child.stdout, hold=child.stdin is not None)
        # Its loop, looked up once: touch() runs for every piece of every body.
        self._loop = loop = IOLoop.current()
        loop.spawn_callback(self._drain_stderr)
        self._last_activity = loop.time()
        self._idle_timer: Optional[object] = None
        if idle_timeout:
            self._idle_timer = loop.call_later(idle_timeout, self._check_idle)

    @property
    def exit_status(self) -> Optional[int]:
        """git's exit status once it has exited, else None (the access log reports it)."""
        return self._child.exit.result() if self._child.exit.done() else None

    @property
    def accepting_input(self) -> bool:
        """Whether git still reads its stdin (it stops when it exits or has refused the request)."""
        return self._stdin_open

    @property
    def aborted(self) -> bool:
        """Whether the exchange was ended early."""
        return self._aborted

    async def exited(self) -> int:
        """Wait for git to exit; its exit status."""
        return await self._child.exit

    async def write(self, data: Union[bytes, memoryview]) -> None:
        """Write request-body bytes to git's stdin.

        Returns once the previous piece has been taken, so one piece is in
        flight to git while the next is read from the client, and never more.
        If git has stopped reading, the data is dropped (:attr:`accepting_input`
        says so); git's answer still goes to the client.
        """
        self.touch()
        if not self._stdin_open or not data:
            return
        stdin = self._child.stdin
        assert stdin is not None
        try:
            await self._stdin_taken()
            self._pending_write = stdin.write(data)
        except StreamClosedError:
            self._stdin_open = False

    async def end_input(self) -> None:
        """The request body is complete: let git take the rest, close its stdin, and stop holding output."""
        try:
            await self._stdin_taken()
        except StreamClosedError:
            pass
        self._close_stdin()

    async def start_output(self) -> None:
        """The response may start: wait until :attr:`output` can be read from its beginning."""
        await self.output.release()

    def touch(self) -> None:
        """Bytes moved: the exchange is not idle."""
        self._last_activity = self._loop.time()

    def abort(self) -> None:
        """End git early, as gently as leaves the repository clean (see the module docstring).

        Safe to call more than once, at any point.
        """
        if self._aborted:
            return
        self._aborted = True
        self._stop_idle_timer()
        self._close_stdin()
        if self._writes_repository:
            self.output.discard()
        else:
            self.output.close()
        self._child.end_after(WRITER_EXIT_GRACE if self._writes_repository else EXIT_GRACE, self._context)

    def end(self) -> None:
        """The exchange is over: whatever git still does is aborted; timers and held output go."""
        if self._ended:
            return
        self._ended = True
        self._stop_idle_timer()
        if not self._child.exit.done() or not self._child.stdout.closed():
            self.abort()
        else:
            self.output.close()

    async def _stdin_taken(self) -> None:
        pending, self._pending_write = self._pending_write, None
        if pending is not None:
            await pending

    def _close_stdin(self) -> None:
        if self._stdin_open:
            self._stdin_open = False
            stdin = self._child.stdin
            assert stdin is not None
            stdin.close()

    def _stop_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._loop.remove_timeout(self._idle_timer)
            self._idle_timer = None

    def _check_idle(self) -> None:
        """End the exchange once no byte has moved either way for the idle timeout."""
        if self._idle_timer is None or not self._idle_timeout:
            return
        idle = self._loop.time() - self._last_activity
        if idle < self._idle_timeout:
            self._idle_timer = self._loop.call_later(self._idle_timeout - idle, self._check_idle)
            return
        self._idle_timer = None
        log.warning("%s: no data moved for %.0fs; closing the connection", self._context, idle)
        self.abort()
        if self._on_idle is not None:
            self._on_idle()

    async def _drain_stderr(self) -> None:
        """Log git's stderr line by line as it comes, so its pipe never fills."""
        stream = self._child.stderr
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
