"""The base of every handler: resolve the repository, ask the policy, run git, answer, end cleanly.

Every handler follows the same path: :meth:`GitRequestMixin.open_repository`
(lookup + access check), the repository's config switch, then a
:class:`~gittornado.pipe.GitProcessPipe` (``smart.py``) or a file from disk
(``dumb.py``).  The handlers, and only they, decide statuses, headers,
finishing and aborting: :meth:`GitHandler.send_git_output` is the one place
where git's output and exit status become an HTTP response.

One invariant holds for every request, enforced in :meth:`GitRequestMixin.on_finish`:
when a handler finishes, its git process is either complete or aborted and
being reaped.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional, Tuple, Union
from weakref import WeakSet

from tornado import httputil
from tornado.concurrent import Future
from tornado.escape import utf8
from tornado.iostream import StreamClosedError
from tornado.web import HTTPError, RequestHandler

from .access import AccessDenied, Grant, check_access
from .backend import GitBackend, git_protocol
from .httpserver import SERVER_NAME
from .permission import Permission
from .pipe import GitProcessPipe
from .process import Busy, SpawnFailed
from .relay import OutputRelay
from .repoconfig import ConfigUnreadable, GitConfig
from .repos import Repository
from .services import Switch
from .util import maybe_await, moved_names

log = logging.getLogger("gittornado")

#: Cache headers for answers that change (refs, HEAD, pack lists, RPC results), as git http-backend sends.
NO_CACHE = {
    "Expires": "Fri, 01 Jan 1980 00:00:00 GMT",
    "Pragma": "no-cache",
    "Cache-Control": "no-cache, max-age=0, must-revalidate",
}
#: Cache headers for content-addressed files (objects and packs), which never change.
FOREVER = {"Cache-Control": "public, max-age=31536000, immutable"}


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

    def set_default_headers(self) -> None:
        """``Server: gittornado``, not Tornado's name and exact release."""
        self.set_header("Server", SERVER_NAME)  # type: ignore[attr-defined]

    async def open_repository(
        self, name: str, permission: Permission, create: bool = False
    ) -> Tuple[Repository, Grant]:
        """Resolve ``name`` and check ``permission`` on it, or raise the right HTTP error.

        With ``create``, a missing repository a logged-in user may push to is
        made, if the lookup can (``RepositoryRoot(create_on_push=True)``).
        """
        repo = await maybe_await(self.backend.lookup, name)
        self.repository = repo.name if repo else name
        grant = await check_access(self.backend.policy, self.request, self.repository, permission)
        self.user = grant.user
        creator = getattr(self.backend.lookup, "create", None) if create and grant.user else None
        if repo is None and creator is not None:
            repo = await creator(name)
            self.repository = repo.name if repo else name
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
        use_pack_cache: bool = False,
        cache_request_key: Optional[str] = None,
    ) -> GitProcessPipe:
        """Spawn ``git <args>`` with the environment git http-backend gives it.

        ``label`` names what runs in log lines, after the repository name.
        ``defaults`` become ``-c key=value`` options unless ``config`` (the
        repository's own) already sets the key.  ``use_pack_cache``: an
        upload-pack's pack comes through the backend's pack cache, if it has
        one; ``cache_request_key`` names the request to the cache, so that
        the next identical one finds the pack without git.
        """
        protocol = git_protocol(self.request.headers.get("Git-Protocol"))
        env = self.backend.git_environment(repo, grant.user, self.request.remote_ip, protocol)
        argv = [self.backend.git]
        for key, value in (defaults or {}).items():
            if config is None or key not in config:
                argv += ["-c", f"{key}={value}"]
        options, more_env = self.backend.service_setup(
            args[0], repo, config, use_pack_cache, cache_request_key
        )
        argv += options
        env.update(more_env)
        argv += args
        self.service_label = label
        context = f"{repo.name} {label}"
        if self.client_gone:  # it left while this request waited (for the policy, a queue): start nothing
            raise HTTPError(400, reason="The client went away")
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
        headers_sent = False
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
            headers_sent = True
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
        except Exception:
            pipe.abort()
            if headers_sent:  # the server failed, not git: cut the response, so it cannot look complete
                self.request.connection.close()  # type: ignore[union-attr]
            raise
        finally:
            relay.close()
        if pipe.aborted:
            return False
        status = await pipe.exited()
        if status != 0:
            log.warning("%s: git exited with status %s mid-transfer", self.repository, status)
        self.finish_framed_body()
        return status == 0

    def finish_framed_body(self) -> None:
        """Finish a response whose body was framed past Tornado (see :meth:`send_git_output`).

        For HTTP/1.0 that body is close-delimited: the connection ends with it, even if the client
        asked for keep-alive.
        """
        self.finish()
        if self.request.version == "HTTP/1.0":
            self.request.connection.close()  # type: ignore[union-attr]


class NotFoundHandler(GitRequestMixin, RequestHandler):
    """Plain-text 404 for every URL outside the git routes."""

    def initialize(self) -> None:  # type: ignore[override]
        pass

    def prepare(self) -> None:
        raise HTTPError(404, reason="Not found")


#: Handlers that moved to :mod:`gittornado.smart`, :mod:`gittornado.dumb` and :mod:`gittornado.status`,
#: still importable from here.
_MOVED = {
    "InfoRefsHandler": "smart",
    "ServiceHandler": "smart",
    "PackListHandler": "dumb",
    "RepositoryFileHandler": "dumb",
    "HealthHandler": "status",
    "MetricsHandler": "status",
}


__getattr__ = moved_names(__name__, _MOVED)
