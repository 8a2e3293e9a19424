"""Thin RequestHandlers: resolve the repository, ask the policy, hand over to git.

Every handler follows the same path: :meth:`GitRequestMixin.open_repository`
(lookup + access check), the repository's config switch, then either a
:class:`~gittornado.pipe.GitProcessPipe` or a file from disk.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, Union
from weakref import WeakSet

from tornado import httputil
from tornado.concurrent import Future
from tornado.escape import utf8
from tornado.web import HTTPError, RequestHandler, stream_request_body

from .access import AccessDenied, Grant, check_access
from .adverts import Recording
from .backend import GitBackend, git_protocol
from .body import BodyDecoder
from .httpserver import SERVER_NAME
from .permission import Permission
from .pipe import GitProcessPipe
from .repos import GitConfig, Repository, config_bool
from .services import GET_ANY_FILE, SERVICES, UPLOAD_PACK
from .util import maybe_await

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


class GitRequestMixin:
    """What every gittornado handler does: find the repository, check access, report errors."""

    backend: GitBackend
    request: httputil.HTTPServerRequest
    # What the access log reports about this request (see gittornado.observe).
    user: Optional[str] = None
    repository: Optional[str] = None
    service_label: Optional[str] = None
    bytes_in = 0
    bytes_out = 0
    client_gone = False
    completed = False
    #: The backend's requests in progress, this one among them until it finishes.
    in_progress: Optional[WeakSet[RequestHandler]] = None

    def initialize(self, backend: GitBackend) -> None:
        self.backend = backend
        self.in_progress = backend.requests
        self.in_progress.add(self)

    def set_default_headers(self) -> None:
        """``Server: gittornado``, not Tornado's name and exact release."""
        self.set_header("Server", SERVER_NAME)  # type: ignore[attr-defined]

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
        """The client left: end the request now, logged as 499, unless it had already ended.

        (Tornado calls this for streaming handlers even after they finished.)
        A handler still at work when this happens may go on writing and
        finishing; :meth:`write` and :meth:`finish` then do nothing.
        """
        self.client_gone = True
        super().on_connection_close()  # type: ignore[misc]
        if not self.completed:
            handler: RequestHandler = self  # type: ignore[assignment]
            handler.set_status(499, reason="Client Closed Request")
            handler.finish()

    def on_finish(self) -> None:
        self.completed = True
        if self.in_progress is not None:
            self.in_progress.discard(self)
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

    async def require_switch(self, repo: Repository, switch: str) -> GitConfig:
        """Return the repository's config, or 403 when it turns ``switch`` off."""
        config = await self.backend.configs.get(repo)
        if not config_bool(config, switch, True):
            raise HTTPError(403, reason=f"Disabled by {switch} in the repository's config")
        return config

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


class GitHandler(GitRequestMixin, RequestHandler):
    """Base for the handlers that run git."""

    pipe: Optional[GitProcessPipe] = None

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
        argv += args
        self.service_label = label
        pipe = self.pipe = await GitProcessPipe.start(
            argv,
            env,
            f"{repo.name} {label}",
            self.backend.processes,
            self.request.connection,  # type: ignore[arg-type]
            idle_timeout=self.backend.idle_timeout,
            with_stdin=with_stdin,
            writes_repository=writes_repository,
        )
        if self.client_gone:  # it left while we waited for the policy or a process slot
            pipe.abort()
        return pipe

    def on_connection_close(self) -> None:
        if self.pipe is not None:
            self.pipe.abort()
        super().on_connection_close()

    def set_no_cache(self) -> None:
        for name, value in NO_CACHE.items():
            self.set_header(name, value)


class InfoRefsHandler(GitHandler):
    """``GET <repo>/info/refs``: the smart advertisement, or the dumb ref list."""

    SUPPORTED_METHODS = ("GET",)

    async def get(self, name: str) -> None:
        service_name = self.get_query_argument("service", None)
        self.set_no_cache()
        if service_name is None:
            repo, grant = await self.open_repository(name, Permission.READ)
            await self.require_switch(repo, GET_ANY_FILE)
            # Generated from the live refs, so no `git update-server-info` is needed.
            args = ["--git-dir", repo.path, "for-each-ref", "--format=" + _FOR_EACH_REF_FORMAT]
            pipe = await self.start_git(repo, grant, "dumb", args)
            await pipe.respond(self, "text/plain; charset=utf-8")
            return
        service = SERVICES.get(service_name)
        if service is None or not service.advertises:
            raise HTTPError(400, reason="Unknown service")
        repo, grant = await self.open_repository(name, service.permission)
        config = await self.require_switch(repo, service.switch)
        label = f"info/refs:{service.name}"
        protocol = self.request.headers.get("Git-Protocol", "")
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
        pipe = await self.start_git(repo, grant, label, args, config, dict(service.defaults))
        if state is None:
            await pipe.respond(self, service.advertisement_type, prefix)
            return
        recording = Recording()
        if await pipe.respond(self, service.advertisement_type, prefix, recording):
            adverts.put(repo.path, protocol, state, recording)


@stream_request_body
class ServiceHandler(GitHandler):
    """``POST <repo>/git-<service>``: stream the request into git and its answer back."""

    SUPPORTED_METHODS = ("POST",)

    def initialize(self, backend: GitBackend) -> None:  # type: ignore[override]
        super().initialize(backend)
        self.decoder: Optional[BodyDecoder] = None
        # The body's latest piece, kept from git until the next one or the end of the request.
        self.held_back = b""

    async def prepare(self) -> None:
        name, service_name = self.path_args
        service = SERVICES[service_name]
        repo, grant = await self.open_repository(name, service.permission)
        config = await self.require_switch(repo, service.switch)
        content_type = self.request.headers.get("Content-Type", "")
        if content_type.split(";")[0].strip() != service.request_type:
            raise HTTPError(415, reason=f"Expected Content-Type {service.request_type}")
        limit = self.backend.max_body_size
        length = self.request.headers.get("Content-Length")
        if limit is not None and length is not None and length.isdigit() and int(length) > limit:
            raise HTTPError(413, reason="Request body too large")
        # Tornado's own cap (100 MB by default) would cut pushes; the decoder enforces ours.
        self.request.connection.set_max_body_size(2**62)
        self.decoder = BodyDecoder(self.request.headers.get("Content-Encoding"), limit)
        self.service = service
        args = [*service.command, repo.path]
        await self.start_git(
            repo,
            grant,
            service.name,
            args,
            config,
            dict(service.defaults),
            with_stdin=True,
            writes_repository=service.permission is Permission.WRITE,
        )

    async def data_received(self, chunk: bytes) -> None:
        self.bytes_in += len(chunk)
        if self.pipe is None or self.decoder is None:
            return
        try:
            for piece in self.decoder.decode(chunk):
                # git acts once its payload is complete (receive-pack updates refs when
                # the pack's last byte is in), which can be before the HTTP body is.
                # Holding the latest piece back until post() means a request cut short
                # always reaches git incomplete, so it changes nothing.  (A whole piece,
                # not just its last byte: a one-byte write per piece would wake git for it.)
                await self.pipe.write(self.held_back)
                self.held_back = piece
        except HTTPError as error:
            self._refuse(error)

    async def post(self, name: str, service_name: str) -> None:
        if self.pipe is None or self.decoder is None:
            return
        try:
            self.decoder.finish()
        except HTTPError as error:
            self._refuse(error)
            return
        await self.pipe.write(self.held_back)
        await self.pipe.end_input()
        await self.pipe.respond(self, self.service.result_type)

    def _refuse(self, error: HTTPError) -> None:
        """Stop git before it acts on a body that will not arrive whole, and say why."""
        if self.pipe is not None:
            self.pipe.abort()
            self.pipe = None
        self.send_error(error.status_code, reason=error.reason)


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
