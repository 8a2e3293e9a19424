"""Answering a fetch from the pack cache without git: upload-pack's answer, rebuilt around a cached pack.

With ``--pack-cache``, the pack of a fetch comes from the cache through
git's own hook (:mod:`gittornado.packcache`), but upload-pack and the hook
still start for every fetch and every byte passes through both: on a repeated
clone that costs more than reading the pack.  The server can do without them
when it has seen the very same request in the very same repository state
before (:meth:`~gittornado.packcache.PackCache.request_key`): the hook then
linked that request to its entry, and upload-pack's whole answer to such a
request is ``packfile``, the pack in sideband-1 pkt-lines and a flush.

:class:`CachedPack` reads an entry, complete (its CRC-32 checked first, on a
thread) or still being written (following the writer as :mod:`gittornado.packentry`
does); :class:`PackFrames` frames it, pkt-lines and HTTP/1.1 chunk around
data read straight into place (``preadv``), so no byte is copied in Python.
"""

from __future__ import annotations

import asyncio
import errno
import os
from typing import AsyncIterator, List, Optional, Tuple

from .packfiles import (
    TRAILER,
    Entry,
    count,
    pack_length,
    read_link,
    unlink_if_same,
    verified_length,
    writer_alive,
)

#: The pkt-lines of upload-pack's answer around the pack.
PACKFILE = b"000dpackfile\n"
FLUSH = b"0000"
#: Pack bytes in one sideband pkt-line: git's largest packet (65520) less its length and band.
PAYLOAD = 65520 - 4 - 1
#: pkt-lines per read, about 512 KiB: an answer's only buffer (each read waits for the last send).
LINES_PER_READ = 8
#: How often a follower that has caught up with a live writer looks again, at first and at most.
FOLLOW_POLL = 0.005
MAX_FOLLOW_POLL = 0.05


class WriterDied(Exception):
    """The entry being followed will never be complete; ``sent`` of its bytes were handed out."""

    def __init__(self, sent: int) -> None:
        super().__init__(f"the pack cache's writer died after {sent} bytes")
        self.sent = sent


class CachedPack:
    """An entry of the pack cache to be sent: complete, or growing behind a live writer.

    :meth:`open` finds it; :meth:`ranges` yields the byte ranges of the pack
    as they may be sent; :meth:`close` ends it, counting a hit if all was sent.
    """

    def __init__(self, directory: str, fd: int, complete: Optional[int]) -> None:
        self.directory = directory
        self.fd = fd
        self.complete = complete
        self.sent = 0

    @classmethod
    async def open(cls, directory: str, request_key: str) -> Optional[CachedPack]:
        """The entry linked to ``request_key``, or None: there is none, or it is corrupt (then removed)."""
        pack_key = read_link(directory, request_key)
        if pack_key is None:
            return None
        entry = Entry(directory, pack_key)
        # Complete, else growing, else complete after all: its writer may have just renamed it.
        for name in (entry.complete, entry.growing, entry.complete):
            try:
                fd = os.open(name, os.O_RDONLY)
            except OSError:
                continue
            if name == entry.growing:
                if writer_alive(fd):
                    return cls(directory, fd, None)
                os.close(fd)  # finished (and renamed: the next look finds it) or dead
                continue
            try:
                length = await asyncio.get_running_loop().run_in_executor(None, verified_length, fd)
            except OSError:
                length = None
            if length is not None:
                return cls(directory, fd, length)
            unlink_if_same(name, fd)  # truncated or altered: never sent
            os.close(fd)
            count(directory, errors=1)
            return None
        return None

    async def ranges(self) -> AsyncIterator[Tuple[int, int]]:
        """``(start, end)`` of the pack bytes that may go out next, until all have; WriterDied if it died.

        While the writer writes, the last :data:`TRAILER`-size bytes are held
        back, as they may be the trailer.
        """
        if self.complete is not None:
            yield 0, self.complete
            self.sent = self.complete
            return
        poll = FOLLOW_POLL
        while True:
            ready = os.fstat(self.fd).st_size - TRAILER.size
            if ready > self.sent:
                yield self.sent, ready
                self.sent = ready
                poll = FOLLOW_POLL
            elif writer_alive(self.fd):
                await asyncio.sleep(poll)
                poll = min(2 * poll, MAX_FOLLOW_POLL)  # pack-objects may count objects for seconds first
            else:
                break
        length = pack_length(self.fd)
        if length is None:
            raise WriterDied(self.sent)
        if length > self.sent:
            yield self.sent, length
        self.sent = length
        self.complete = length

    def close(self) -> None:
        """Done with the entry; a hit is counted if the whole pack went out."""
        if self.complete is not None and self.sent == self.complete:
            count(self.directory, hits=1, served_bytes=self.complete)
        os.close(self.fd)


class PackFrames:
    """Room for one read of pack bytes, laid out as sideband pkt-lines inside one HTTP/1.1 chunk.

    The pack bytes are read straight into the gaps between the pkt-line
    headers, and the framed chunk is one contiguous view, so nothing is
    copied in Python.
    """

    HEAD_ROOM = len(b"%x\r\n" % (LINES_PER_READ * (PAYLOAD + 5)))

    def __init__(self) -> None:
        self._data = bytearray(self.HEAD_ROOM + LINES_PER_READ * (PAYLOAD + 5) + 2)
        whole = memoryview(self._data)
        self._lines = [
            whole[self.HEAD_ROOM + n * (PAYLOAD + 5) + 5 : self.HEAD_ROOM + (n + 1) * (PAYLOAD + 5)]
            for n in range(LINES_PER_READ)
        ]

    @staticmethod
    def capacity() -> int:
        """Pack bytes one read takes at most."""
        return LINES_PER_READ * PAYLOAD

    async def read(self, fd: int, start: int, length: int) -> int:
        """Read ``length`` (at most :meth:`capacity`) pack bytes at ``start`` into place; how many came.

        On a thread: the event loop never waits for the disk, and the copies
        of several answers run beside it (read in the loop, even from the page
        cache, eight repeated clones at once took a third longer).
        """
        views: List[memoryview] = []
        left = length
        for line in self._lines:
            if left <= 0:
                break
            views.append(line[: min(left, PAYLOAD)])
            left -= PAYLOAD
        return await asyncio.get_running_loop().run_in_executor(None, os.preadv, fd, views, start)

    def frame(self, length: int, chunked: bool) -> memoryview:
        """The ``length`` bytes read, as pkt-lines, framed as one chunk (or bare, for HTTP/1.0)."""
        position = self.HEAD_ROOM
        left = length
        while left > 0:
            size = min(left, PAYLOAD)
            self._data[position : position + 5] = b"%04x\x01" % (size + 5)
            position += size + 5
            left -= size
        start, end = self.HEAD_ROOM, position
        if chunked:
            size_line = b"%x\r\n" % (end - start)
            start -= len(size_line)
            self._data[start : self.HEAD_ROOM] = size_line
            self._data[end : end + 2] = b"\r\n"
            end += 2
        return memoryview(self._data)[start:end]


class SidebandReader:
    """Splits upload-pack's answer, fed in pieces, into ``(band, data)``; ``(None, b"")`` at its final flush.

    Other pkt-lines (``packfile``, delimiters) are skipped.
    """

    def __init__(self) -> None:
        self._pending = bytearray()

    def feed(self, piece: memoryview) -> List[Tuple[Optional[int], bytes]]:
        """The whole pkt-lines that ``piece`` completes."""
        self._pending += piece
        found: List[Tuple[Optional[int], bytes]] = []
        data, position = self._pending, 0
        while position + 4 <= len(data):
            try:
                length = int(data[position : position + 4], 16)
            except ValueError:
                raise OSError(errno.EPROTO, "upload-pack's answer is not pkt-lines") from None
            if length < 4:
                position += 4
                if length == 0:
                    found.append((None, b""))
                continue
            if position + length > len(data):
                break
            if length > 5 and data[position + 4] in (1, 2, 3):
                found.append((data[position + 4], bytes(data[position + 5 : position + length])))
            position += length
        del self._pending[:position]
        return found
