"""Thin RequestHandlers: resolve the repository, ask the policy, hand over to git.

Every handler follows the same path: :meth:`GitRequestMixin.open_repository`
(lookup + access check), the repository's config switch, then a
:class:`~gittornado.pipe.GitProcessPipe` (here) or a file from disk
(``dumb.py``).  The handlers, and only they, decide statuses, headers,
finishing and aborting: :meth:`GitHandler.send_git_output` is the one place
where git's output and exit status become an HTTP response.

One invariant holds for every request, enforced in :meth:`GitRequestMixin.on_finish`:
when a handler finishes, its git process is either complete or aborted and
being reaped.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Dict, List, Optional, Tuple, Union
from weakref import WeakSet

from tornado import httputil
from tornado.concurrent import Future
from tornado.escape import utf8
from tornado.iostream import StreamClosedError
from tornado.web import HTTPError, RequestHandler, stream_request_body

from .access import AccessDenied, Grant, check_access
from .adverts import Recording
from .backend import GitBackend, git_protocol
from .body import BodyDecoder
from .permission import Permission
from .pipe import GitProcessPipe
from .process import Busy, SpawnFailed
from .relay import OutputRelay
from .repos import ConfigUnreadable, GitConfig, Repository
from .services import GET_ANY_FILE, SERVICES, UPLOAD_PACK, Service, Switch
from .util import maybe_await

log = logging.getLogger("gittornado")

#: Cache headers for answers that change (refs, HEAD, pack lists, RPC results), as git http-backend sends.
NO_CACHE = {
    "Expires": "Fri, 01 Jan 1980 00:00:00 GMT",
    "Pragma": "no-cache",
    "Cache-Control": "no-cache, max-age=0, must-revalidate",
}
#: Cache headers for content-addressed files (objects and packs), which never change.
FOREVER = {"Cache-Control": "public, max-age=31536000, immutable"}

_FOR_EACH_REF_FORMAT = (
    "%(objectname)%09%(refname)%(if)%(*objectname)%(then)%0a%(*objectname)%09%(refname)^{}%(end)"
)


def pkt_line(text: str) -> bytes:
    """Encode one pkt-line (four hex digits of length, then the payload)."""
    data = text.encode()
    return b"%04x" % (len(data) + 4) + data


class RetryLater(HTTPError):
    """503 with a ``Retry-After`` of ``retry_after`` seconds."""

    def __init__(self, reason: str, retry_after: int) -> None:
        super().__init__(503, reason=reason)
        self.retry_after = retry_after


class GitRequestMixin:
    """What every gittornado handler does: find the repository, check access, report errors, end cleanly."""

    backend: GitBackend
    request: httputil.HTTPServerRequest
    # What the access log reports about this request (see gittornado.observe).
    user: Optional[str] = None
    repository: Optional[str] = None
    service_label: Optional[str] = None
    bytes_in = 0
    bytes_out = 0
    #: The git process of this request, if one was started.
    pipe: Optional[GitProcessPipe] = None
    client_gone = False
    completed = False
    #: The backend's requests in progress, this one among them until it finishes.
    in_progress: Optional[WeakSet[RequestHandler]] = None

    def initialize(self, backend: GitBackend) -> None:
        self.backend = backend
        self.in_progress = backend.requests
        self.in_progress.add(self)

    async def open_repository(self, name: str, permission: Permission) -> Tuple[Repository, Grant]:
        """Resolve ``name`` and check ``permission`` on it, or raise the right HTTP error."""
        repo = await maybe_await(self.backend.lookup, name)
        self.repository = repo.name if repo else name
        grant = await check_access(self.backend.policy, self.request, self.repository, permission)
        self.user = grant.user
        if repo is None:
            raise HTTPError(404, reason="Repository not found")
        return repo, grant

    def on_connection_close(self) -> None:
        """The client left: abort git, and end the request, logged as 499, without a byte more to send.

        (Tornado calls this for streaming handlers even after they finished,
        and, on some versions, while the connection is still writable: that is
        why nothing is written here.)  A handler still at work may go on;
        :meth:`write` and :meth:`finish` then do nothing.
        """
        self.client_gone = True
        if self.pipe is not None:
            self.pipe.abort()
        super().on_connection_close()  # type: ignore[misc]
        if not self.completed:
            handler: RequestHandler = self  # type: ignore[assignment]
            handler.set_status(499, reason="Client Closed Request")
            handler.application.log_request(handler)
            self.on_finish()

    def on_finish(self) -> None:
        if self.completed:
            return
        self.completed = True
        if self.pipe is not None:  # the invariant of the module docstring
            self.pipe.end()
        if self.in_progress is not None:
            self.in_progress.discard(self)  # type: ignore[arg-type]
        super().on_finish()  # type: ignore[misc]

    def write(self, chunk: Union[str, bytes, dict]) -> None:  # type: ignore[override]
        """Count response bytes for the access log."""
        if self.client_gone and self.completed:
            return
        if isinstance(chunk, (bytes, str)):
            self.bytes_out += len(utf8(chunk))
        super().write(chunk)  # type: ignore[misc]

    def finish(self, chunk: Union[str, bytes, dict, None] = None) -> Future[None]:  # type: ignore[override]
        if self.client_gone and self.completed:
            done: Future[None] = Future()
            done.set_result(None)
            return done
        return super().finish(chunk)  # type: ignore[misc]

    async def require_switch(self, repo: Repository, switch: Switch) -> GitConfig:
        """Return the repository's config, or 403 when ``switch`` is off for this request.

        As in ``git http-backend``: the repository's config decides, else the
        switch's default, which may depend on whether the request has a user
        (call after :meth:`open_repository`).
        """
        assert self.backend.configs is not None  # set by GitBackend
        try:
            config = await self.backend.configs.get(repo)
        except ConfigUnreadable:
            raise HTTPError(500, reason="The repository's config cannot be read") from None
        reason = switch.refusal(config, self.user, repo.name)
        if reason is not None:
            raise HTTPError(403, reason=reason)
        return config

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        """A client that left is no server error."""
        if isinstance(value, StreamClosedError) and self.client_gone:
            log.debug("client went away: %s", value)
            return
        super().log_exception(typ, value, tb)  # type: ignore[misc]

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """A short plain-text reason, never a traceback."""
        handler: RequestHandler = self  # type: ignore[assignment]
        error = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(error, AccessDenied) and error.challenge:
            handler.set_header("WWW-Authenticate", error.challenge)
        retry_after = getattr(error, "retry_after", None)
        if retry_after is not None:
            handler.set_header("Retry-After", str(retry_after))
        if status_code == 405:
            handler.set_header("Allow", ", ".join(handler.SUPPORTED_METHODS))
        handler.set_header("Content-Type", "text/plain; charset=utf-8")
        for name, value in NO_CACHE.items():
            handler.set_header(name, value)
        handler.finish(f"{status_code} {handler._reason}\n")

    def set_no_cache(self) -> None:
        """The headers of an answer that must never be cached."""
        handler: RequestHandler = self  # type: ignore[assignment]
        for name, value in NO_CACHE.items():
            handler.set_header(name, value)


class GitHandler(GitRequestMixin, RequestHandler):
    """Base for the handlers that run git."""

    async def start_git(
        self,
        repo: Repository,
        grant: Grant,
        label: str,
        args: List[str],
        config: Optional[GitConfig] = None,
        defaults: Optional[Dict[str, str]] = None,
        with_stdin: bool = False,
        writes_repository: bool = False,
    ) -> GitProcessPipe:
        """Spawn ``git <args>`` with the environment git http-backend gives it.

        ``label`` names what runs in log lines, after the repository name.
        ``defaults`` become ``-c key=value`` options unless ``config`` (the
        repository's own) already sets the key.
        """
        protocol = git_protocol(self.request.headers.get("Git-Protocol"))
        env = self.backend.git_environment(repo, grant.user, self.request.remote_ip, protocol)
        argv = [self.backend.git]
        for key, value in (defaults or {}).items():
            if config is None or key not in config:
                argv += ["-c", f"{key}={value}"]
        if self.backend.pack_cache is not None and args[:1] == ["upload-pack"]:
            options, cache_env = self.backend.pack_cache.upload_pack_setup()
            argv += options
            env.update(cache_env)
        argv += args
        self.service_label = label
        context = f"{repo.name} {label}"
        try:
            child = await self.backend.processes.start(argv, env, with_stdin)
        except Busy as busy:
            raise RetryLater("Too many git processes running; retry shortly", busy.retry_after) from None
        except SpawnFailed as error:
            log.error("%s: cannot run git: %s", context, error)
            raise HTTPError(500, reason="Cannot run git; see the server log") from None
        self.pipe = GitProcessPipe(
            child,
            context,
            writes_repository=writes_repository,
            idle_timeout=self.backend.idle_timeout,
            on_idle=self.request.connection.close,  # type: ignore[union-attr]
        )
        if self.client_gone:  # it left while we waited for a process slot
            self.pipe.abort()
        return self.pipe

    async def send_git_output(
        self,
        content_type: str,
        prefix: bytes = b"",
        tee: Optional[Callable[[memoryview], None]] = None,
        failure_status: int = 500,
    ) -> bool:
        """Answer with git's output, from its first byte to its exit.

        Headers go out with git's first output.  If git fails before any
        output, the client gets ``failure_status`` with a short reason.  If
        it fails after, the response still ends normally: git's protocol is
        self-delimiting (flush packets, the pack's checksum), so the client
        cannot take it for complete, and it prints git's own words (an ``ERR``
        packet, a sideband message) instead of a transfer error.  ``tee``, if
        given, sees each piece of output as it goes out.  Returns True when
        all of git's output went out and git succeeded.
        """
        pipe = self.pipe
        assert pipe is not None
        try:
            await pipe.start_output()
        except OSError:
            raise RetryLater("No room to hold git's answer; retry shortly", 10) from None
        stream = self.request.connection.stream  # type: ignore[union-attr]
        relay = OutputRelay(pipe.output, stream, self.request.version == "HTTP/1.1")
        try:
            length = await relay.wait_output()
            if not length and not pipe.aborted:
                status = await pipe.exited()
                if status != 0:
                    log.warning("%s: git exited with status %s before any output", self.repository, status)
                    reason = "git refused the request" if failure_status < 500 else "git failed"
                    raise HTTPError(failure_status, reason=f"{reason}; details are in the server log")
            if pipe.aborted:
                return False
            self.set_header("Content-Type", content_type)
            # The relay writes past the handler, so output transforms would not see those bytes (and git's
            # answers, packs and ref lines, gain nothing from them); tests/test_stream.py pins this.
            self._transforms = []
            self.write(prefix)
            await self.flush()  # the headers, and the prefix framed by Tornado
            while length:
                self.bytes_out += length
                if tee is not None:
                    tee(relay.output(length))
                await relay.send(length)
                pipe.touch()
                length = await relay.wait_output()
        except StreamClosedError:
            log.info("%s: client went away mid-transfer", self.repository)
            pipe.abort()
            return False
        finally:
            relay.close()
        if pipe.aborted:
            return False
        status = await pipe.exited()
        if status != 0:
            log.warning("%s: git exited with status %s mid-transfer", self.repository, status)
        self.finish()
        if self.request.version == "HTTP/1.0":
            # The body is close-delimited for HTTP/1.0; end it even if the client asked for keep-alive.
            self.request.connection.close()  # type: ignore[union-attr]
        return status == 0


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
            args = ["--git-dir", repo.path, "for-each-ref", "--format=" + _FOR_EACH_REF_FORMAT]
            await self.start_git(repo, grant, "dumb", args)
            await self.send_git_output(content_type)
            return
        service = SERVICES.get(service_name)
        if service is None or not service.advertises:
            raise HTTPError(400, reason="Unknown service")
        repo, grant = await self.open_repository(name, service.permission)
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
        if state is not None:
            answer = adverts.get(repo.path, protocol, state)
            if answer is not None:  # git's own answer, and nothing it is made from has changed
                self.service_label = label
                self.set_header("Content-Type", service.advertisement_type)
                self.finish(prefix + answer)
                return
        args = [*service.command, "--advertise-refs", repo.path]
        await self.start_git(repo, grant, label, args, config, dict(service.defaults))
        recording = Recording() if state is not None else None
        if await self.send_git_output(service.advertisement_type, prefix, recording) and recording:
            adverts.put(repo.path, protocol, state, recording)  # type: ignore[arg-type]

    async def head(self, name: str) -> None:
        await self.get(name, include_body=False)


@stream_request_body
class ServiceHandler(GitHandler):
    """``POST <repo>/git-<service>``: stream the request into git and its answer back.

    git starts with the body's first byte, not with the headers: a request
    whose body never comes costs no process, and gets 408 after the
    backend's ``body_timeout``.
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
        self._body_timer: Optional[object] = None

    async def prepare(self) -> None:
        name, service_name = self.path_args
        service = SERVICES[service_name]
        repo, grant = await self.open_repository(name, service.permission)
        config = await self.require_switch(repo, service.switch)
        content_type = self.request.headers.get("Content-Type", "")
        if content_type.split(";")[0].strip() != service.request_type:
            raise HTTPError(415, reason=f"Expected Content-Type {service.request_type}")
        git_protocol(self.request.headers.get("Git-Protocol"))  # refused now, not once the body flows
        writes = service.permission is Permission.WRITE
        limit = self.backend.max_body_size if writes else self.backend.max_fetch_body_size
        length = self.request.headers.get("Content-Length")
        if limit is not None and length is not None and length.isdigit() and int(length) > limit:
            raise HTTPError(413, reason="Request body too large")
        # Tornado's own cap (100 MB by default) would cut pushes; the decoder enforces ours.
        self.request.connection.set_max_body_size(2**62)  # type: ignore[union-attr]
        self.decoder = BodyDecoder(self.request.headers.get("Content-Encoding"), limit)
        self.service: Service = service
        self._git_args = (repo, grant, service.name, [*service.command, repo.path], config)
        timeout = self.backend.body_timeout
        if timeout:
            self._body_timer = asyncio.get_running_loop().call_later(timeout, self._body_did_not_start)

    async def data_received(self, chunk: bytes) -> None:
        self._cancel_body_timer()
        self.bytes_in += len(chunk)
        if self.decoder is None or self.refused or self.ignoring_input:
            return
        try:
            for piece in self.decoder.decode(chunk):
                pipe = self.pipe or await self._start_git()
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
        self._cancel_body_timer()
        if self.refused or self.decoder is None:
            return
        if not self.ignoring_input:
            try:
                self.decoder.finish()
            except HTTPError as error:
                self._refuse(error)
                return
        if self.pipe is None:
            raise HTTPError(400, reason="Empty request body")
        await self.pipe.write(self.held_back)
        self.held_back = b""
        await self.pipe.end_input()
        self.set_no_cache()
        await self.send_git_output(self.service.result_type, failure_status=400)

    def on_finish(self) -> None:
        self._cancel_body_timer()
        super().on_finish()

    async def _start_git(self) -> GitProcessPipe:
        repo, grant, label, args, config = self._git_args
        return await self.start_git(
            repo,
            grant,
            label,
            args,
            config,
            dict(self.service.defaults),
            with_stdin=True,
            writes_repository=self.service.permission is Permission.WRITE,
        )

    def _body_did_not_start(self) -> None:
        self._body_timer = None
        if self.pipe is None and not self.completed:
            self._refuse(HTTPError(408, reason="The request body did not start in time"))

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()  # type: ignore[attr-defined]
            self._body_timer = None

    def _refuse(self, error: HTTPError) -> None:
        """Stop git before it acts on a body that will not arrive whole, and say why.

        Tornado closes the connection after this answer, since the body was not read to its end.
        """
        self.refused = True
        if self.pipe is not None:
            self.pipe.abort()
        self.send_error(error.status_code, reason=error.reason, exc_info=(type(error), error, None))


class NotFoundHandler(GitRequestMixin, RequestHandler):
    """Plain-text 404 for every URL outside the git routes."""

    def initialize(self) -> None:  # type: ignore[override]
        pass

    def prepare(self) -> None:
        raise HTTPError(404, reason="Not found")


#: Handlers that moved to :mod:`gittornado.dumb` and :mod:`gittornado.status`, still importable from here.
_MOVED = {
    "PackListHandler": "dumb",
    "RepositoryFileHandler": "dumb",
    "HealthHandler": "status",
    "MetricsHandler": "status",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(f"gittornado.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
