"""How git's output reaches the client: the loop every response byte goes through.

Two things make it cheap, and both were measured (``docs/benchmarks.md``):

* **Few, large chunks.**  git writes its output in pieces of a few KiB, and
  waking up for each piece costs the server far more than moving its bytes
  (about 30 microseconds of Python per wake-up: a 280 MiB clone took 0.47 s of
  server CPU in 20 KiB chunks).  While git streams, the relay gives it a
  millisecond to fill the pipe before reading, so chunks come near
  :data:`CHUNK_SIZE` (0.07 s of CPU for the same clone).  The first chunk and
  the end of output are never delayed, so small answers (``info/refs``,
  negotiation) go out at once.  The pause needs a pipe that holds what git
  writes meanwhile (:data:`COALESCE_PIPE_SIZE`); where the kernel gave a
  smaller one, the relay reads as git writes.
* **No copies in Python.**  Output is read into a buffer, framed there in
  place as one HTTP/1.1 chunk (size line before, CRLF after) and handed to
  the connection's stream as a view.  (``RequestHandler.write`` would copy
  each chunk three times on its way.)  An answer starts with one
  :data:`FIRST_READ_SIZE` buffer; one that fills it gets two of
  :data:`CHUNK_SIZE`, so git's next output is read into one while the other
  is being sent.

git keeps working while the client receives: it writes into the pipe's
1 MiB kernel buffer meanwhile.
"""

from __future__ import annotations

import asyncio
import fcntl
import select
from typing import Optional

from tornado.concurrent import Future
from tornado.iostream import IOStream, StreamClosedError

from .pipe import GitOutput
from .sizes import CHUNK_SIZE, STDOUT_PIPE_SIZE

#: The buffer of an answer's first read: most answers (ref advertisements, negotiation) fit, and only
#: an answer that fills it gets two buffers of :data:`CHUNK_SIZE`.
FIRST_READ_SIZE = 64 * 1024
#: How long git gets to write more before a read, while it streams in small pieces.  (The event loop
#: sleeps in whole milliseconds; git writes up to about 800 KB in one, measured.)
COALESCE_DELAY = 0.001
#: The smallest pipe buffer that holds what git writes during such a pause.
COALESCE_PIPE_SIZE = STDOUT_PIPE_SIZE


class OutputRelay:
    """Moves git's output (``source``) to an HTTP connection's ``stream``, one chunk at a time.

    The handler drives it (:meth:`wait_output`, then :meth:`send`) after it
    has sent the response's headers, and finishes the response itself.
    ``chunked`` frames each chunk for HTTP/1.1; without it the bytes go bare,
    as an HTTP/1.0 body that the connection's close delimits.
    """

    def __init__(self, source: GitOutput, stream: IOStream, chunked: bool) -> None:
        self._source = source
        self._stream = stream
        self._chunked = chunked
        self._buffers = [_ChunkBuffer(FIRST_READ_SIZE)]
        self._current = 0
        self._pending: Optional[Future[int]] = None
        self._last_length = 0
        # Pausing is only safe while git can write ahead meanwhile: with a small pipe (the kernel
        # refuses large ones to a user holding many) it would block git and cost throughput.
        try:
            capacity = fcntl.fcntl(source.fileno(), getattr(fcntl, "F_GETPIPE_SZ", 1032))
        except OSError:
            capacity = 0
        self._may_pause = capacity >= COALESCE_PIPE_SIZE
        self._hung_up = select.poll()  # tells whether git has closed its end of the pipe
        self._hung_up.register(source.fileno(), select.POLLHUP)

    async def wait_output(self) -> int:
        """Wait for git's next output; return its length (0: git's output has ended)."""
        pending, self._pending = self._pending, None
        if pending is None:
            await self._coalesce()
            pending = self._read_into(self._buffers[self._current])
        try:
            return await pending
        except StreamClosedError:
            return 0

    def output(self, length: int) -> memoryview:
        """The ``length`` bytes :meth:`wait_output` announced (valid until :meth:`send` returns)."""
        return self._buffers[self._current].space[:length]

    async def send(self, length: int) -> None:
        """Send the ``length`` bytes :meth:`wait_output` announced; StreamClosedError if the client left."""
        buffer = self._buffers[self._current]
        sent = self._stream.write(buffer.frame(length, self._chunked))
        self._last_length = length
        if len(self._buffers) == 1 and length == len(buffer.space):  # a long answer: full-size buffers
            self._buffers = [_ChunkBuffer(CHUNK_SIZE), _ChunkBuffer(CHUNK_SIZE)]
        else:  # the other buffer's send has completed (or, with one buffer, this one's will)
            self._current = (self._current + 1) % len(self._buffers)
        if len(self._buffers) == 2 and length >= CHUNK_SIZE // 2:  # git writes fast: read on meanwhile
            self._pending = self._read_into(self._buffers[self._current])
        await sent

    def close(self) -> None:
        """The relay is done; a read still in flight may fail quietly (the pipe ends it)."""
        if self._pending is not None:
            self._pending.add_done_callback(lambda read: read.cancelled() or read.exception())

    async def _coalesce(self) -> None:
        """Give git a moment to write more, when it sent only a little last time and still writes."""
        if self._may_pause and 0 < self._last_length < CHUNK_SIZE // 2:
            if not self._hung_up.poll(0):  # git has not closed its end: more output is coming
                await asyncio.sleep(COALESCE_DELAY)

    def _read_into(self, buffer: _ChunkBuffer) -> Future[int]:
        try:
            return self._source.read_into(buffer.space, partial=True)  # type: ignore[return-value]
        except StreamClosedError:
            done: Future[int] = Future()
            done.set_result(0)
            return done


class _ChunkBuffer:
    """Room for one read of git's output, with space around it to frame it as an HTTP/1.1 chunk.

    The framed chunk is one contiguous view of this buffer, so it is sent
    without being copied.
    """

    #: "40000\r\n" is the longest size line of a :data:`CHUNK_SIZE` chunk.
    HEAD_ROOM = len(b"%x\r\n" % CHUNK_SIZE)

    def __init__(self, size: int) -> None:
        self._data = bytearray(self.HEAD_ROOM + size + 2)
        self.space = memoryview(self._data)[self.HEAD_ROOM : self.HEAD_ROOM + size]

    def frame(self, length: int, chunked: bool) -> memoryview:
        """The ``length`` bytes read into :attr:`space`: framed as a chunk, or bare (HTTP/1.0)."""
        end = self.HEAD_ROOM + length
        if not chunked:
            return memoryview(self._data)[self.HEAD_ROOM : end]
        size_line = b"%x\r\n" % length
        start = self.HEAD_ROOM - len(size_line)
        self._data[start : self.HEAD_ROOM] = size_line
        self._data[end : end + 2] = b"\r\n"
        return memoryview(self._data)[start : end + 2]
