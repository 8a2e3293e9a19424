"""The basic transfer: ``GET``/``PUT <repo>/info/lfs/objects/<oid>``, and the ``verify`` callback.

Both directions stream: a download is read from disk a chunk at a time
(with ``Range``, so an interrupted download resumes), an upload is read
from the socket into a few reused buffers, written to a temporary file while
its SHA-256 and size are counted, and becomes the object only when both
match.  File reads, writes and hashing run on the
:class:`~gittornado.lfs.LfsServer`'s threads, a few buffers ahead of the
network, so memory stays flat and the loop keeps serving.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import re
from typing import Callable, Deque, List, Optional, Tuple

from tornado.iostream import StreamClosedError
from tornado.web import stream_request_body

from ..backend import GitBackend
from ..httpserver import ClaimedBody
from ..permission import Permission
from ..sizes import CHUNK_SIZE
from ..util import Deadline
from .batch import BAD_OID
from .handlers import JsonRequestHandler, LfsError, LfsHandler
from .storage import ObjectUpload, StorageFull, StoredObject, valid_oid

log = logging.getLogger("gittornado")

#: Bytes read from disk at once for a download.
READ_SIZE = 4 * CHUNK_SIZE
#: The size of an upload's buffers: each is filled from the socket, then hashed and written at once.
PIECE_SIZE = 4 * CHUNK_SIZE
#: An upload's buffers: one being filled while the others are hashed and written.
PIECES = 4
#: A download's cache headers: the URL names content that never changes, for this user only.
IMMUTABLE = "private, max-age=31536000, immutable"
#: A byte range; longer numbers than any object's size are no range (``int`` refuses 4,300 digits).
_RANGE = re.compile(r"bytes=([0-9]{0,18})-([0-9]{0,18})")


def requested_range(header: Optional[str], size: int) -> Optional[Tuple[int, int]]:
    """The one byte range ``[start, end)`` a ``Range`` header asks of ``size`` bytes; None for all of them.

    Raises :class:`LfsError` 416 for a range outside the object.  Several
    ranges, or another unit, are answered with the whole object, as RFC 9110
    allows.
    """
    match = _RANGE.fullmatch(header.strip()) if header else None
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.groups()
    if first == "":  # the last N bytes
        start, end = max(size - int(last), 0), size
    else:
        start = int(first)
        end = size if last == "" else min(int(last) + 1, size)
    if start >= size or start >= end:
        raise LfsError(416, f"The object has {size} bytes")
    return start, end


def _check_oid(oid: str) -> None:
    if not valid_oid(oid):
        raise LfsError(422, BAD_OID)


@stream_request_body
class ObjectHandler(LfsHandler):
    """Download (``GET``, ``HEAD``) and upload (``PUT``) one object.

    An upload's body is read in ``prepare`` (see :meth:`_receive`) and goes
    to a temporary file while it is counted and hashed; anything but a
    complete, matching body is thrown away.
    """

    SUPPORTED_METHODS = ("GET", "HEAD", "PUT")

    def initialize(self, backend: GitBackend) -> None:  # type: ignore[override]
        super().initialize(backend)
        self.upload: Optional[ObjectUpload] = None
        self.hash = hashlib.sha256()
        # The last piece's write and hash: each waits for the one before (see _receive).
        self.writing: Optional[asyncio.Future[None]] = None
        self.hashing: Optional[asyncio.Future[None]] = None
        # Ends an upload whose body stalls, as git's transfers end (see _stalled).
        self.idle_deadline = Deadline(backend.idle_timeout, self._stalled)
        self.failed = False

    async def get(self, name: str, oid: str) -> None:
        _check_oid(oid)
        repo, _, _ = await self.open_signed(name, oid, Permission.READ, "GET")
        self.service_label = "lfs:download"
        stored = await asyncio.get_running_loop().run_in_executor(
            self.lfs.executor, self.lfs.stores(repo).open, oid
        )
        if stored is None:
            raise LfsError(404, "Object does not exist")
        try:
            await self._send(stored)
        finally:
            stored.close()

    async def head(self, name: str, oid: str) -> None:
        await self.get(name, oid)

    async def _send(self, stored: StoredObject) -> None:
        size = stored.size
        etag = f'"{self.path_args[1]}"'
        self.set_header("Content-Type", "application/octet-stream")
        self.set_header("Accept-Ranges", "bytes")
        self.set_header("ETag", etag)
        self.set_header("Cache-Control", IMMUTABLE)
        if self.request.headers.get("If-None-Match") == etag:
            self.set_status(304)
            self.finish()
            return
        span = requested_range(self.request.headers.get("Range"), size)
        start, end = span if span is not None else (0, size)
        if span is not None:
            self.set_status(206)
            self.set_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.set_header("Content-Length", str(end - start))
        if self.request.method == "HEAD":
            self.finish()
            return
        executor, loop = self.lfs.executor, asyncio.get_running_loop()
        position = start
        reading: Optional[asyncio.Future[bytes]] = None
        if position < end:  # an empty object has nothing to read
            reading = loop.run_in_executor(executor, stored.read, position, min(READ_SIZE, end - position))
        try:
            while reading is not None:
                data = await reading
                if not data:
                    raise OSError(f"object shorter than its {size} bytes")
                position += len(data)
                reading = None
                if position < end:  # the next chunk is read while this one goes out
                    reading = loop.run_in_executor(
                        executor, stored.read, position, min(READ_SIZE, end - position)
                    )
                self.write(data)
                await self.flush()
        except StreamClosedError:
            return
        except OSError:
            self.request.connection.close()  # type: ignore[union-attr]  # cut: it must not look complete
            raise
        finally:
            if reading is not None:  # the caller closes the object: not while a thread reads it
                await asyncio.wait([reading])
                if not reading.cancelled():
                    reading.exception()  # retrieved: a failed read is not logged as unhandled
        self.finish()

    async def prepare(self) -> None:
        if self.request.method != "PUT":
            return
        name, oid = self.path_args
        _check_oid(oid)
        repo, _, signed = await self.open_signed(name, oid, Permission.WRITE, "PUT")
        self.service_label = "lfs:upload"
        body = ClaimedBody.claim(self.request)
        if body is None:
            raise LfsError(411, "An upload needs its Content-Length (and no chunking)")
        size = body.remaining
        if signed is not None and size != signed.size:
            raise LfsError(400, f"The body must be the object's {signed.size} bytes")
        limit = self.lfs.max_object_size
        if limit is not None and size > limit:
            raise LfsError(413, f"The object is larger than this server's limit of {limit} bytes")
        self.request.connection.set_max_body_size(2**62)  # type: ignore[union-attr]
        store = self.lfs.stores(repo)
        try:
            self.upload = await asyncio.get_running_loop().run_in_executor(
                self.lfs.executor, store.begin, oid, size
            )
        except StorageFull:
            raise LfsError(507, "The server has no room for the object") from None
        try:
            await self._receive(body)
        except StreamClosedError:
            self._discard()  # the client went away, or stalled (see _stalled)

    def _stalled(self) -> None:
        """The body stalled for the backend's ``idle_timeout``."""
        log.info("%s: LFS upload stalled for %ss; closing", self.repository, self.backend.idle_timeout)
        self.request.connection.close()  # type: ignore[union-attr]  # on_connection_close discards it

    def data_received(self, chunk: bytes) -> None:
        """A GET's stray body, dropped (an upload's body is read by :meth:`_receive`)."""

    async def _receive(self, body: ClaimedBody) -> None:
        """Read the body into at most :data:`PIECES` reused buffers, each hashed on one thread and written
        on another.

        One thread hashes a piece while another writes it and the loop reads
        the next: on two cores, hashing and writing one after the other made
        them the slowest step.  Each piece's hash and write wait for the
        previous piece's, so both go in order; a buffer is filled again only
        once both are done with it, so memory stays at :data:`PIECES` buffers
        however large the object.  The answer is :meth:`put`'s, or sent here
        when writing fails.
        """
        assert self.upload is not None
        free: List[memoryview] = []
        busy: Deque[Tuple[memoryview, asyncio.Future[None], asyncio.Future[None]]] = collections.deque()
        try:
            while body.remaining:
                if not free and len(busy) == PIECES:
                    buffer, writing, hashing = busy.popleft()
                    if not await self._settled(writing, hashing):
                        return
                    free.append(buffer)
                # A buffer only when one is needed, and no larger than the rest of the body: small objects
                # and bodies that never come cost little.
                buffer = free.pop() if free else memoryview(bytearray(min(PIECE_SIZE, body.remaining)))
                filled = 0
                while filled < len(buffer) and body.remaining:
                    self.idle_deadline.restart()
                    count = await body.read_into(buffer[filled:])
                    self.bytes_in += count
                    filled += count
                piece = buffer[:filled]
                self.writing = self._after(self.writing, self.upload.write, piece)
                self.hashing = self._after(self.hashing, self.hash.update, piece)
                busy.append((buffer, self.writing, self.hashing))
                await asyncio.sleep(0)  # a body that arrives as fast as it is read must not hold up the loop
        finally:
            self.idle_deadline.stop()
        await self._settled(*(step for step in (self.writing, self.hashing) if step is not None))

    def _after(
        self, previous: Optional[asyncio.Future[None]], work: Callable[..., None], *args: object
    ) -> asyncio.Future[None]:
        """Run ``work(*args)`` on a thread once ``previous`` is done (a failure of it fails this too)."""
        loop = asyncio.get_running_loop()

        async def run() -> None:
            if previous is not None:
                await previous
            await loop.run_in_executor(self.lfs.executor, work, *args)

        return asyncio.ensure_future(run())

    async def _settled(self, *steps: asyncio.Future[None]) -> bool:
        """Wait for ``steps``; False (and the answer sent) if writing failed."""
        try:
            for step in steps:
                await step
            return True
        except StorageFull:
            self._fail(LfsError(507, "The server has no room for the object"))
        return False

    async def put(self, name: str, oid: str) -> None:
        if self.failed or self.upload is None:
            return
        if self.hash.hexdigest() != oid:
            self._fail(LfsError(422, "The body's sha256 is not the oid"))
            return
        upload, self.upload = self.upload, None
        try:
            await asyncio.get_running_loop().run_in_executor(self.lfs.executor, upload.commit)
        except StorageFull:
            raise LfsError(507, "The server has no room for the object") from None
        self.set_no_cache()
        self.finish()

    def _fail(self, error: LfsError) -> None:
        """Throw away what was written and answer ``error`` (Tornado then closes the connection)."""
        self.failed = True
        self._discard()
        self.send_error(error.status_code, exc_info=(type(error), error, None))

    def _discard(self) -> None:
        upload, self.upload = self.upload, None
        if upload is None:
            return
        writing, self.writing = self.writing, None
        if writing is None:
            upload.abort()
        else:  # after the thread has finished with the file
            writing.add_done_callback(lambda done: (done.cancelled() or done.exception(), upload.abort()))

    def on_finish(self) -> None:
        self.idle_deadline.stop()
        self._discard()  # an upload that did not complete leaves nothing behind
        super().on_finish()

    def on_connection_close(self) -> None:
        self._discard()
        super().on_connection_close()


class VerifyHandler(JsonRequestHandler):
    """``POST <repo>/info/lfs/objects/<oid>/verify``: does the server have the object, of that size?"""

    SUPPORTED_METHODS = ("POST",)

    async def post(self, name: str, oid: str) -> None:
        _check_oid(oid)
        repo, _, _ = await self.open_signed(name, oid, Permission.WRITE, "POST")
        self.service_label = "lfs:verify"
        body = self.json_body()
        stored = self.lfs.stores(repo).size(oid)
        if stored is None:
            raise LfsError(404, "Object does not exist")
        if body.get("oid") != oid or body.get("size") != stored:
            raise LfsError(422, f"The object has {stored} bytes")
        self.send_json({"message": "ok"})
