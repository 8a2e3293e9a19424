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
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from typing import Dict, List, Optional, Set

from tornado.ioloop import IOLoop
from tornado.iostream import StreamClosedError
from tornado.process import Subprocess
from tornado.web import RequestHandler

log = logging.getLogger("gittornado")

#: Bytes read from git's stdout at a time.
CHUNK_SIZE = 256 * 1024
#: Seconds an aborted read-only git gets to exit by itself, before SIGTERM.
EXIT_GRACE = 1.0
#: The same for receive-pack, which may be finishing a push whose body arrived whole.
WRITER_EXIT_GRACE = 30.0
#: Seconds between SIGTERM and SIGKILL.
KILL_GRACE = 2.0
#: Longest stderr line logged; the rest is cut so a noisy git cannot flood the log.
MAX_LOG_LINE = 1000


class GitProcesses:
    """The git processes one server has running.

    Shared by all requests of an application, so shutdown can wait for running
    transfers and then end what is left.
    """

    def __init__(self) -> None:
        self.running: Set[GitProcessPipe] = set()

    def abort_all(self) -> None:
        """Terminate every running git process (used at the end of shutdown)."""
        for pipe in list(self.running):
            pipe.abort()


class GitProcessPipe:
    """One running git command, bridged to one HTTP response.

    Create it with :meth:`start`, feed the request body with :meth:`write`,
    then :meth:`close_stdin` and :meth:`respond`.  ``context`` names the
    repository and service in log lines.
    """

    def __init__(
        self, proc: Subprocess, context: str, registry: GitProcesses, writes_repository: bool
    ) -> None:
        self._proc = proc
        self._context = context
        self._writes_repository = writes_repository
        self._draining = False
        self._escalation: Optional[object] = None
        self._exit = proc.wait_for_exit(raise_error=False)
        self._stdin_open = proc.stdin is not None
        IOLoop.current().spawn_callback(self._drain_stderr)
        registry.running.add(self)
        self._exit.add_done_callback(lambda _: registry.running.discard(self))

    @classmethod
    def start(
        cls,
        argv: List[str],
        env: Dict[str, str],
        context: str,
        registry: GitProcesses,
        with_stdin: bool,
        writes_repository: bool = False,
    ) -> GitProcessPipe:
        """Spawn ``argv`` in its own process group with piped stdout and stderr.

        ``writes_repository`` says git may change the repository (receive-pack),
        which decides how :meth:`abort` winds it down.
        """
        proc = Subprocess(
            argv,
            stdin=Subprocess.STREAM if with_stdin else subprocess.DEVNULL,
            stdout=Subprocess.STREAM,
            stderr=Subprocess.STREAM,
            env=env,
            start_new_session=True,
        )
        proc.stdout.read_chunk_size = CHUNK_SIZE
        return cls(proc, context, registry, writes_repository)

    @property
    def pid(self) -> int:
        """git's process id (also its process group id)."""
        return self._proc.pid

    async def write(self, data: bytes) -> None:
        """Write request-body bytes to git's stdin, waiting until they are taken.

        If git has stopped reading (it exited, or refused the request), the
        rest of the body is discarded; git's answer still goes to the client.
        """
        if not self._stdin_open or not data:
            return
        try:
            await self._proc.stdin.write(data)
        except StreamClosedError:
            self._stdin_open = False

    def close_stdin(self) -> None:
        """Signal the end of the request body to git."""
        if self._stdin_open:
            self._stdin_open = False
            self._proc.stdin.close()

    async def respond(self, handler: RequestHandler, content_type: str, prefix: bytes = b"") -> None:
        """Stream git's stdout into ``handler``'s response.

        Headers are sent with git's first output.  If git fails before any
        output, the client gets a 500 with a short reason; if it fails after,
        the connection is dropped without the terminating chunk, so the client
        sees a failed transfer instead of a silently truncated success.
        """
        chunk = await self._read()
        if not chunk:
            status = await self._exit
            if status != 0:
                log.warning("%s: git exited with status %s before any output", self._context, status)
                handler.send_error(500, reason="git failed; see the server log")
                return
        handler.set_header("Content-Type", content_type)
        chunk = prefix + chunk
        try:
            while chunk:
                handler.write(chunk)
                await handler.flush()
                chunk = await self._read()
        except StreamClosedError:
            log.info("%s: client went away mid-transfer", self._context)
            self.abort()
            return
        status = await self._exit
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

    async def _read(self) -> bytes:
        try:
            return await self._proc.stdout.read_bytes(CHUNK_SIZE, partial=True)
        except StreamClosedError:
            return b""

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
        self.close_stdin()
        if self._writes_repository:
            # respond() may still be reading; it calls abort() again when its write fails.
            if not self._draining and not self._proc.stdout.reading():
                self._draining = True
                IOLoop.current().spawn_callback(self._discard_stdout)
        else:
            self._proc.stdout.close()
        if self._escalation is None and not self._exit.done():
            grace = WRITER_EXIT_GRACE if self._writes_repository else EXIT_GRACE
            self._escalation = IOLoop.current().call_later(grace, self._escalate, signal.SIGTERM)

    async def _discard_stdout(self) -> None:
        while await self._read():
            pass

    def _escalate(self, signum: int) -> None:
        if self._exit.done():
            return
        log.warning(
            "%s: git still running after the client left; sending %s",
            self._context,
            signal.Signals(signum).name,
        )
        try:
            os.killpg(self._proc.pid, signum)
        except ProcessLookupError:
            return
        if signum == signal.SIGTERM:
            IOLoop.current().call_later(KILL_GRACE, self._escalate, signal.SIGKILL)

    async def wait(self) -> Optional[int]:
        """Wait for git to exit and return its status."""
        return await self._exit
