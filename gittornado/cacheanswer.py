"""Fetches answered with the pack cache: by the server from an entry, or by upload-pack told how to use it.

With ``--pack-cache``, :class:`~gittornado.smart.ServiceHandler` gathers an
upload-pack request whole before it starts git (up to
:data:`~gittornado.packcache.SCANNED_REQUEST`), and hands it to
:meth:`PackCacheAnswers._answer_with_cache`.  A request seen before in the
same repository state is answered here without git, from the entry the hook
linked to it (:mod:`gittornado.packreply` reads and frames it); identical
requests arriving together wait for the first one's entry; any other request
goes to upload-pack, with or without the hook as
:meth:`~gittornado.packcache.PackCache.use_hook` decides.  If an entry's writer
dies mid-answer, git sends the rest (:meth:`PackCacheAnswers._resume_from_git`).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from typing import Any, Awaitable, Optional, Tuple

from tornado.iostream import StreamClosedError
from tornado.web import HTTPError

from .backend import git_protocol
from .handlers import GitHandler
from .packcache import pkt_lines
from .packreply import FLUSH, PACKFILE, CachedPack, PackFrames, SidebandReader, WriterDied
from .pipe import GitProcessPipe
from .services import Service
from .sizes import CHUNK_SIZE

log = logging.getLogger("gittornado")


class PackCacheAnswers(GitHandler):
    """The part of :class:`~gittornado.smart.ServiceHandler` that answers fetches with the pack cache."""

    # Set by ServiceHandler.prepare(): the service, and (repository, grant, label, argv, config).
    service: Service
    _git_args: Tuple[Any, ...]
    #: The body's piece that goes to git next (ServiceHandler's; the whole request, once gathered).
    held_back: bytes

    async def _start_git(
        self, first_piece: bytes, use_pack_cache: bool = False, cache_request_key: Optional[str] = None
    ) -> GitProcessPipe:
        raise NotImplementedError  # ServiceHandler's

    async def _answer_with_cache(self, request: bytes) -> bool:
        """Answer the whole fetch ``request`` from the pack cache (True), or start upload-pack with the
        cache as :mod:`gittornado.packcache` decides for this request (False: the caller goes on)."""
        repo, config = self._git_args[0], self._git_args[4]
        cache, adverts = self.backend.pack_cache, self.backend.adverts
        assert cache is not None and adverts is not None
        lines = pkt_lines(request)
        request_key = None
        leading = False
        if not repo.namespace:
            protocol = git_protocol(self.request.headers.get("Git-Protocol")) or ""
            state = adverts.state(repo.path, config)
            request_key = cache.request_key(repo.path, state, protocol, lines)
        if request_key is not None:
            if await self._answer_from_cache(cache.directory, request_key, request):
                return True
            waiting = cache.leader(request_key)
            if waiting is not None:  # an identical request is starting git: its entry will do
                await waiting
                if await self._answer_from_cache(cache.directory, request_key, request):
                    return True
            else:
                leading = True
        use_hook = cache.use_hook(repo.path, repo.namespace or "", lines)
        try:
            await self._start_git(request, use_hook, request_key)
        finally:
            if leading:
                assert request_key is not None
                pipe = self.pipe
                running = (lambda: pipe.exit_status is None and not pipe.aborted) if pipe else (lambda: False)
                cache.led(request_key, running)
        self.held_back = request
        return False

    async def _answer_from_cache(self, directory: str, request_key: str, request: bytes) -> bool:
        """Answer from the pack cache without git (:mod:`gittornado.packreply`); False if it cannot.

        Headers go out with the first pack bytes, so until then git can still
        answer instead.  If the entry's writer dies after that, git sends the
        rest (:meth:`_resume_from_git`); if the entry cannot be read, the
        response is cut, so that it cannot look complete.  A client that
        takes nothing for the backend's ``idle_timeout`` is disconnected, as
        in a transfer from git.
        """
        cached = await CachedPack.open(directory, request_key)
        if cached is None:
            return False
        stream = self.request.connection.stream  # type: ignore[union-attr]
        chunked = self.request.version == "HTTP/1.1"
        buffer = PackFrames()
        started = False
        try:
            async for start, end in cached.ranges():
                while start < end:
                    size = min(end - start, buffer.capacity())
                    got = await buffer.read(cached.fd, start, size)
                    if got <= 0:
                        raise OSError(errno.EIO, "the pack cache's entry shrank")
                    if not started:
                        started = True
                        self.service_label = f"{self.service.name}:cached"
                        self.set_no_cache()
                        self.set_header("Content-Type", self.service.result_type)
                        self._transforms = []  # the frames go past the handler, as in send_git_output
                        self.write(PACKFILE)
                        await self.flush()
                    framed = buffer.frame(got, chunked)
                    self.bytes_out += len(framed)
                    await self._sent(stream.write(framed))  # then the buffer is free again
                    start += got
        except WriterDied:
            if not started:
                return False
            await self._resume_from_git(request, cached)
            return True
        except StreamClosedError:
            return True  # the client left (on_connection_close has logged it), or stalled
        except OSError as error:
            log.warning("%s: cannot read the pack cache's entry: %s", self.repository, error)
            if not started:
                return False
            self.request.connection.close()  # type: ignore[union-attr]
            return True
        finally:
            cached.close()
        self._end_pack_answer()
        return True

    async def _sent(self, writing: Awaitable[None]) -> None:
        """Wait for a write to the client; after the backend's ``idle_timeout``, disconnect it instead."""
        timeout = self.backend.idle_timeout
        if not timeout:
            await writing
            return
        future = asyncio.ensure_future(writing)
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
        except asyncio.TimeoutError:
            log.info("%s: client took nothing for %ss; closing", self.repository, timeout)
            future.add_done_callback(lambda done: done.cancelled() or done.exception())
            self.request.connection.close()  # type: ignore[union-attr]
            raise StreamClosedError() from None

    async def _resume_from_git(self, request: bytes, dead: CachedPack) -> None:
        """The entry's writer died after ``dead.sent`` pack bytes went out: git sends the rest.

        A new upload-pack's hook writes the same pack again, byte for byte
        (cached packs are packed single-threaded; see
        :meth:`gittornado.packentry.Fetch.rerun`, which does the same for the
        hook's followers).  Its pack bytes are compared with those already
        sent, and what follows them goes out; if they differ (the repository
        was repacked in between), the response is cut, so that the client
        never takes a pack spliced from two for a whole one.
        """
        log.warning("%s: the pack cache's writer died mid-answer; asking git for the rest", self.repository)
        try:
            pipe = await self._start_git(request, use_pack_cache=True)
            await pipe.write(request)
            await pipe.end_input()
            await pipe.start_output()
        except HTTPError:
            self.request.connection.close()  # type: ignore[union-attr]
            return
        frames = SidebandReader()
        position, ended = 0, False
        space = memoryview(bytearray(CHUNK_SIZE))
        try:
            while not ended:
                try:
                    got = await pipe.output.read_into(space, partial=True)
                except StreamClosedError:
                    break
                pipe.touch()
                for band, data in frames.feed(space[:got]):
                    if band is None:
                        ended = True
                    elif band == 3:  # git's error: the client prints it
                        self.write(b"%04x\x03" % (len(data) + 5) + data)
                    elif band == 1:
                        if position < dead.sent:
                            overlap = min(len(data), dead.sent - position)
                            if os.pread(dead.fd, overlap, position) != data[:overlap]:
                                raise OSError(errno.EIO, "git's new pack differs from the one being sent")
                            position += overlap
                            data = data[overlap:]
                        if data:
                            self.write(b"%04x\x01" % (len(data) + 5) + data)
                            position += len(data)
                await self.flush()
        except (OSError, StreamClosedError) as error:
            log.warning("%s: cannot resume the cached pack: %s", self.repository, error)
            ended = False
        if ended and await pipe.exited() == 0:
            self._end_pack_answer()
        else:
            pipe.abort()
            self.request.connection.close()  # type: ignore[union-attr]

    def _end_pack_answer(self) -> None:
        self.write(FLUSH)
        self.finish_framed_body()
