"""Handlers that run git: ``info/refs`` (the advertisement or the dumb ref list) and the RPC POSTs."""

from __future__ import annotations

import asyncio
from typing import Callable, List, Optional

from tornado.web import HTTPError, stream_request_body

from .adverts import Recording
from .backend import GitBackend, git_protocol
from .body import BodyDecoder
from .cacheanswer import PackCacheAnswers
from .handlers import GitHandler, RetryLater, pkt_line
from .packcache import SCANNED_REQUEST
from .permission import Permission
from .pipe import GitProcessPipe
from .process import Busy
from .pushchecks import PushOutcome
from .repos import Repository
from .services import GET_ANY_FILE, SERVICES, UPLOAD_PACK, Service
from .util import Deadline, decimal


def dumb_ref_format(repo: Repository) -> str:
    """``for-each-ref``'s format of the dumb ref list: ids, names (inside the namespace), peeled tags."""
    name = f"%(refname:lstrip={repo.namespace_prefix.count('/')})" if repo.namespace else "%(refname)"
    return f"%(objectname)%09{name}%(if)%(*objectname)%(then)%0a%(*objectname)%09{name}^{{}}%(end)"


class InfoRefsHandler(GitHandler):
    """``GET <repo>/info/refs``: the smart advertisement or the dumb ref list; ``HEAD``: its headers."""

    SUPPORTED_METHODS = ("GET", "HEAD")

    async def get(self, name: str, include_body: bool = True) -> None:
        service_name = self.get_query_argument("service", None)
        self.set_no_cache()
        if service_name is None:
            repo, grant = await self.open_repository(name, Permission.READ)
            await self.require_switch(repo, GET_ANY_FILE)
            content_type = "text/plain; charset=utf-8"
            if not include_body:
                self.set_header("Content-Type", content_type)
                return
            # Generated from the live refs, so no `git update-server-info` is needed.
            args = ["--git-dir", repo.path, "for-each-ref", "--format=" + dumb_ref_format(repo)]
            if repo.namespace:
                args.append(repo.namespace_prefix)
            await self.start_git(repo, grant, "dumb", args)
            await self.send_git_output(content_type)
            return
        service = SERVICES.get(service_name)
        if service is None or not service.advertises:
            raise HTTPError(400, reason="Unknown service")
        repo, grant = await self.open_repository(
            name, service.permission, create=service.permission is Permission.WRITE
        )
        config = await self.require_switch(repo, service.switch)
        protocol = git_protocol(self.request.headers.get("Git-Protocol")) or ""
        if not include_body:
            self.set_header("Content-Type", service.advertisement_type)
            return
        label = f"info/refs:{service.name}"
        # Protocol v2 has no service line; receive-pack has no v2 and answers v0.
        v2 = "version=2" in protocol.split(":")
        prefix = b"" if v2 and service is UPLOAD_PACK else pkt_line(f"# service={service.name}\n") + b"0000"
        adverts = self.backend.adverts
        assert adverts is not None  # set by GitBackend
        state = adverts.state(repo.path, config) if service is UPLOAD_PACK else None
        cached_as = f"{repo.path}\0{repo.namespace or ''}"
        if state is not None:
            answer = adverts.get(cached_as, protocol, state)
            if answer is not None:  # git's own answer, and nothing it is made from has changed
                self.service_label = label
                self.set_header("Content-Type", service.advertisement_type)
                self.finish(prefix + answer)
                return
        args = [*service.command, "--advertise-refs", repo.path]
        await self.start_git(repo, grant, label, args, config, dict(service.defaults))
        recording = Recording() if state is not None else None
        if await self.send_git_output(service.advertisement_type, prefix, recording) and recording:
            adverts.put(cached_as, protocol, state, recording)  # type: ignore[arg-type]

    async def head(self, name: str) -> None:
        await self.get(name, include_body=False)


@stream_request_body
class ServiceHandler(PackCacheAnswers):
    """``POST <repo>/git-<service>``: stream the request into git and its answer back.

    git starts with the body's first byte, not with the headers: a request
    whose body never comes costs no process, and gets 408 after the
    backend's ``body_timeout``.  With a pack cache, upload-pack starts once
    the request is whole (or :data:`~gittornado.packcache.SCANNED_REQUEST`
    long), since the request decides whether it uses the cache.
    """

    SUPPORTED_METHODS = ("POST",)

    def initialize(self, backend: GitBackend) -> None:  # type: ignore[override]
        super().initialize(backend)
        self.decoder: Optional[BodyDecoder] = None
        # The body's latest piece, kept from git until the next one or the end of the request.
        self.held_back = b""
        # git stopped reading its input: the rest of the body is not even decoded.
        self.ignoring_input = False
        self.refused = False
        # With a pack cache, the start of an upload-pack request, gathered before git starts (see post()).
        self.gathering: Optional[List[bytes]] = None
        self.gathered = 0
        # Answers 408 if the body (or, while a fetch request is gathered, its next piece) does not come.
        self.body_deadline = Deadline(backend.body_timeout, self._body_did_not_start)
        self._release_slot: Optional[Callable[[], None]] = None

    async def prepare(self) -> None:
        name, service_name = self.path_args
        service = SERVICES[service_name]
        repo, grant = await self.open_repository(
            name, service.permission, create=service.permission is Permission.WRITE
        )
        config = await self.require_switch(repo, service.switch)
        content_type = self.request.headers.get("Content-Type", "")
        if content_type.split(";")[0].strip() != service.request_type:
            raise HTTPError(415, reason=f"Expected Content-Type {service.request_type}")
        git_protocol(self.request.headers.get("Git-Protocol"))  # refused now, not once the body flows
        writes = service.permission is Permission.WRITE
        limit = self.backend.max_body_size if writes else self.backend.max_fetch_body_size
        length = decimal(self.request.headers.get("Content-Length", ""))
        if limit is not None and length is not None and length > limit:
            raise HTTPError(413, reason="Request body too large")
        # Tornado's own cap (100 MB by default) would cut pushes; the decoder enforces ours. Its time limit
        # for a whole body too: a push may take hours; body_deadline and the idle timeout time it here.
        self.request.connection.set_max_body_size(2**62)  # type: ignore[union-attr]
        self.request.connection.set_body_timeout(None)  # type: ignore[union-attr]
        self.decoder = BodyDecoder(self.request.headers.get("Content-Encoding"), limit)
        self.service: Service = service
        self._git_args = (repo, grant, service.name, [*service.command, repo.path], config)
        if service is UPLOAD_PACK and self.backend.pack_cache is not None:
            self.gathering = []
        self.body_deadline.restart()

    async def data_received(self, chunk: bytes) -> None:
        self.body_deadline.stop()
        self.bytes_in += len(chunk)
        if self.decoder is None or self.refused or self.ignoring_input:
            return
        try:
            for piece in self.decoder.decode(chunk):
                if self.gathering is not None:
                    self.gathering.append(piece)
                    self.gathered += len(piece)
                    if self.gathered <= SCANNED_REQUEST:
                        self.body_deadline.restart()  # no git yet to time out: a stalled body ends here
                        continue
                    piece, self.gathering = b"".join(self.gathering), None  # too long to look at: the hook
                pipe = self.pipe or await self._start_git(piece, use_pack_cache=True)
                if not pipe.accepting_input:  # git exited or refused: inflating the rest is work for nothing
                    self.ignoring_input = True
                    return
                # git acts once its payload is complete (receive-pack updates refs when
                # the pack's last byte is in), which can be before the HTTP body is.
                # Holding the latest piece back until post() means a request cut short
                # always reaches git incomplete, so it changes nothing.  (A whole piece,
                # not just its last byte: a one-byte write per piece would wake git for it.)
                await pipe.write(self.held_back)
                self.held_back = piece
                await asyncio.sleep(0)  # one piece at a time: a gzip bomb cannot hold the loop
        except HTTPError as error:
            self._refuse(error)

    async def post(self, name: str, service_name: str) -> None:
        self.body_deadline.stop()
        if self.refused or self.decoder is None:
            return
        if not self.ignoring_input:
            try:
                self.decoder.finish()
            except HTTPError as error:
                self._refuse(error)
                return
        if self.gathering:  # the whole fetch request, held back from git until now
            request, self.gathering = b"".join(self.gathering), None
            if await self._answer_with_cache(request):
                return
        if self.pipe is None:
            raise HTTPError(400, reason="Empty request body")
        await self.pipe.write(self.held_back)
        self.held_back = b""
        await self.pipe.end_input()
        self.set_no_cache()
        writes = self.service.permission is Permission.WRITE
        outcome = PushOutcome() if writes else None
        landed = await self.send_git_output(self.service.result_type, tee=outcome, failure_status=400)
        if outcome is not None and outcome.reason is not None and self.backend.metrics is not None:
            self.backend.metrics.push_refused(outcome.reason)
        if landed and writes and self.backend.maintenance is not None:
            self.backend.maintenance.pushed(self._git_args[0].path)

    def on_finish(self) -> None:
        self.body_deadline.stop()
        if self._release_slot is not None:
            self._release_slot()
        super().on_finish()

    async def _start_git(
        self, first_piece: bytes, use_pack_cache: bool = False, cache_request_key: Optional[str] = None
    ) -> GitProcessPipe:
        """Start git on the body's first piece; a fetch that will pack waits for a slot of its repository."""
        repo, grant, label, args, config = self._git_args
        slots = self.backend.pack_slots
        # A protocol v2 ls-refs packs nothing: it is not queued behind clones.
        if slots is not None and self.service is UPLOAD_PACK and first_piece[4:19] != b"command=ls-refs":
            try:
                self._release_slot = await slots.acquire(repo.path)
            except Busy as busy:
                reason = "Too many fetches of this repository at once; retry shortly"
                raise RetryLater(reason, busy.retry_after) from None
            if self.completed:  # the client left while it waited: on_finish has run, give the slot back here
                self._release_slot()
        return await self.start_git(
            repo,
            grant,
            label,
            args,
            config,
            dict(self.service.defaults),
            with_stdin=True,
            writes_repository=self.service.permission is Permission.WRITE,
            use_pack_cache=use_pack_cache,
            cache_request_key=cache_request_key,
        )

    def _body_did_not_start(self) -> None:
        if self.pipe is None and not self.completed:
            self._refuse(HTTPError(408, reason="The request body did not come in time"))

    def _refuse(self, error: HTTPError) -> None:
        """Stop git before it acts on a body that will not arrive whole, and say why.

        Tornado closes the connection after this answer, since the body was not read to its end.
        """
        self.refused = True
        if self.pipe is not None:
            self.pipe.abort()
        self.send_error(error.status_code, reason=error.reason, exc_info=(type(error), error, None))
