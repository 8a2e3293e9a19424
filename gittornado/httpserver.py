"""HardenedHTTPServer: an HTTPServer whose refusals are complete answers and whose connections are capped.

Four kinds of bad request never reach a handler, and Tornado answers them badly or not at all:
broken framing (400), a request head over ``max_header_size`` (431), ``HTTP/1.2`` to ``HTTP/1.9``,
which Tornado would serve without a length or chunking, and a GET or HEAD with a body, which Tornado
would wait for. :mod:`gittornado.framing` answers the first two in plain text
(:class:`~gittornado.framing.ErrorAnswers` on each connection's stream) and rewrites Tornado's log line
for them (:class:`~gittornado.framing.FramingLogFilter`); :class:`_RequestGate` here answers the third
with 505 and the fourth with 400. A body that stops coming is cut after ``body_timeout`` (by default
the idle timeout), unless its handler times it itself.

The server also stays within its file descriptors (see :mod:`gittornado.connections`): it serves at most
``limits.total`` connections at once and ``limits.per_address`` from one client address; one more is
answered 503 and closed, and accepting pauses for a moment when ``accept()`` finds no descriptor left.

The Tornado behaviours this relies on (1 to 6 are :mod:`gittornado.framing`'s); tests/test_connections.py
and tests/test_hostile.py fail if a Tornado upgrade changes one:

7. ``TCPServer.add_sockets`` keeps each listening socket in ``_sockets`` and the remover of its accept
   handler in ``_handlers`` (both by descriptor), which ``stop()`` calls, and passes accepted sockets to
   ``_handle_connection``, which wraps them (TLS) and calls ``handle_stream``; :meth:`add_sockets` does
   the same with a :class:`~gittornado.connections.PausingAcceptor` (tests/test_connections.py).
8. ``HTTPServer`` calls ``on_close(server_conn)`` once for every connection ``handle_stream`` served, when
   it ends or is detached, with the ``HTTP1ServerConnection`` whose ``stream`` attribute is the stream;
   ``HTTP1Connection.detach()`` inside ``headers_received`` hands the stream over and ends the connection
   (tests/test_connections.py, and the 505 cases of tests/test_hostile.py).
9. An ``HTTP1Connection`` reads a request's body only once ``headers_received`` is done (for a
   ``stream_request_body`` handler: once ``prepare`` is), and then takes its framing (``Content-Length``,
   ``Transfer-Encoding``) and ``Expect`` from the request's headers object, and its timeout from
   ``set_body_timeout``: :class:`ClaimedBody` reads the body in ``prepare`` and leaves in
   ``Content-Length`` only what it did not read, and a handler that streams a push lifts the body timeout
   there (tests/test_stream.py).
"""

from __future__ import annotations

import socket
from asyncio import Future
from collections import Counter
from http import HTTPStatus
from typing import Any, Awaitable, Dict, Iterable, Optional, Tuple, Union, cast

from tornado import httputil
from tornado.http1connection import HTTP1Connection, HTTP1ServerConnection
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream, SSLIOStream

from .connections import MAX_REFUSING, ConnectionLimits, PausingAcceptor, address_key

# Re-exported for old imports (``from gittornado.httpserver import SERVER_NAME``): they lived here once.
from .framing import (  # noqa: F401
    GENERIC_REASON,
    LINGER_SECONDS,
    REASONS,
    SERVER_NAME,
    TORNADO_BARE_400,
    TORNADO_MALFORMED_LOG,
    UNSUPPORTED_VERSION,
    ErrorAnswers,
    FramingLogFilter,
    close_gently,
    framing_reason,
    framing_status,
    install_framing_log_filter,
    plain_answer,
)
from .util import decimal

__all__ = ["HardenedHTTPServer"]

#: Tornado's ``idle_connection_timeout`` when none is given (HTTP1ConnectionParameters: an hour).
DEFAULT_IDLE_TIMEOUT = 3600.0
#: The reason a GET or HEAD with a body gets 400.
GET_WITH_BODY = "a GET or HEAD request has no body"
#: The HTTP versions served; a request line with any other gets 505.
SERVED_VERSIONS = ("HTTP/1.0", "HTTP/1.1")


class ClaimedBody:
    """A request body of known length that the handler reads itself, from the socket into its own buffers.

    For long uploads the handler hashes and writes (LFS objects). Tornado hands a body to
    ``data_received`` as new ``bytes``: a buffer allocated and zeroed for each socket read, copied into
    the stream's buffer and copied out again. For a gigabyte that was a fifth of the server's CPU, on a
    path where the CPU is the limit, and memory that follows the socket, not the handler.
    :meth:`read_into` takes the body with ``IOStream.read_into``: the socket's bytes land in the
    caller's buffer, which the caller reuses.

    Claim the body in a ``stream_request_body`` handler's ``prepare`` and read it there, to its end or
    until answering: Tornado then reads what is left of the body, and nothing more (behaviour 9), so a
    request answered early is framed as before and a pipelined request after it is read as a request.
    """

    def __init__(self, request: httputil.HTTPServerRequest, length: int) -> None:
        self.headers = request.headers
        self.stream: IOStream = cast(HTTP1Connection, request.connection).stream
        #: The body's bytes not read yet.
        self.remaining = length

    @classmethod
    def claim(cls, request: httputil.HTTPServerRequest) -> Optional[ClaimedBody]:
        """The request's body if it is framed by ``Content-Length`` alone; else None (Tornado reads it)."""
        length = decimal(request.headers.get("Content-Length", ""))
        if "Transfer-Encoding" in request.headers or length is None:
            return None
        return cls(request, length)

    async def read_into(self, buffer: memoryview) -> int:
        """Read at most ``len(buffer)`` bytes of the body into ``buffer``, at least one; 0 at its end.

        A client waiting for ``100 Continue`` is sent it first, as Tornado would have once ``prepare``
        was done. Raises ``StreamClosedError`` when the client goes away.
        """
        if not self.remaining:
            return 0
        if self.headers.get("Expect", "").lower() == "100-continue":
            del self.headers["Expect"]  # answered: Tornado must not send a second one
            self.stream.write(b"HTTP/1.1 100 (Continue)\r\n\r\n")
        count = await self.stream.read_into(buffer[: self.remaining], partial=True)
        self.remaining -= count
        self.headers["Content-Length"] = str(self.remaining)
        return count


class _RequestGate(httputil.HTTPMessageDelegate):
    """Answers 505 to a request whose HTTP version is not served, and 400 to a GET or HEAD with a body;
    passes every other on to ``delegate``.

    Tornado serves ``HTTP/1.2`` to ``HTTP/1.9`` as if they were HTTP/1.0, with a response that has neither
    a length nor chunking on a connection the client may keep open: the client cannot tell where it ends.
    A body on a GET means nothing (RFC 9110, 9.3.1: a server may refuse it, as a smuggling risk), git
    never sends one, and Tornado reads it whole before a handler sees the request: one that never comes
    would hold the connection until the body timeout.
    """

    def __init__(
        self, delegate: httputil.HTTPMessageDelegate, connection: HTTP1Connection, answers: ErrorAnswers
    ) -> None:
        self.delegate = delegate
        self.connection = connection
        self.answers = answers
        self.passed = False

    def headers_received(
        self,
        start_line: Union[httputil.RequestStartLine, httputil.ResponseStartLine],
        headers: httputil.HTTPHeaders,
    ) -> Optional[Awaitable[None]]:
        if start_line.version not in SERVED_VERSIONS:
            return self.refuse(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, UNSUPPORTED_VERSION)
        method = cast(httputil.RequestStartLine, start_line).method
        if method in ("GET", "HEAD") and (
            headers.get("Content-Length", "0") != "0" or "Transfer-Encoding" in headers
        ):
            return self.refuse(HTTPStatus.BAD_REQUEST, GET_WITH_BODY)
        self.passed = True
        return self.delegate.headers_received(start_line, headers)

    def refuse(self, status: HTTPStatus, reason: str) -> None:
        """Answer in plain text and close: Tornado reads and writes nothing more on this connection."""
        stream = self.connection.detach()
        self.answers.answer(status, reason)
        stream.close()  # gently, since answered (see ErrorAnswers.close_with_answer)

    def data_received(self, chunk: bytes) -> Optional[Awaitable[None]]:
        return self.delegate.data_received(chunk)

    def finish(self) -> None:
        self.delegate.finish()

    def on_connection_close(self) -> None:
        if self.passed:
            self.delegate.on_connection_close()


class HardenedHTTPServer(HTTPServer):
    """An ``HTTPServer`` whose own refusals are complete plain-text answers, and that stays within its
    file descriptors.

    Broken framing (chunk sizes, ``Content-Length``, ``Transfer-Encoding``), a malformed request line or
    header line get ``400``, a request head over ``max_header_size`` gets ``431`` and an HTTP version other
    than 1.0 and 1.1 gets ``505``, each with ``Content-Type: text/plain``, ``Content-Length``,
    ``Connection: close`` and a one-line reason, instead of Tornado's bare 400, a silent close or an
    unframed response. Tornado's log line for such a request names the problem in the same words, never
    quoting the request (:class:`FramingLogFilter`).

    ``limits`` caps the connections served at once (default: sized from RLIMIT_NOFILE, see
    :meth:`ConnectionLimits.sized <gittornado.connections.ConnectionLimits.sized>`; not per address with
    ``xheaders``, where every connection comes from the proxy). A connection over a cap is answered
    ``503`` and closed; accepting pauses when descriptors run out. Takes the other arguments of
    ``HTTPServer``.
    """

    def initialize(self, *args: Any, limits: Optional[ConnectionLimits] = None, **kwargs: Any) -> None:
        """Set up as ``HTTPServer`` does, and install :class:`FramingLogFilter` (once per process): the
        filter must be in place before the first request, and every server is initialized before that.

        ``body_timeout`` defaults to ``idle_connection_timeout``: Tornado's default is none, and a request
        whose body never comes then holds its connection for good. A handler that streams long bodies and
        times them itself lifts it with ``request.connection.set_body_timeout(None)`` in ``prepare``.
        """
        kwargs.setdefault("body_timeout", kwargs.get("idle_connection_timeout", DEFAULT_IDLE_TIMEOUT))
        super().initialize(*args, **kwargs)
        install_framing_log_filter()
        self.limits = limits or ConnectionLimits.sized(by_address=not self.xheaders)
        #: The connections being served: stream -> (its per-address key, its hooks).
        self.served: Dict[IOStream, Tuple[str, ErrorAnswers]] = {}
        self.per_address: Counter[str] = Counter()
        #: Connections over a cap whose answer is still going out (each holds a descriptor).
        self.refusing = 0

    def add_sockets(self, sockets: Iterable[socket.socket]) -> None:
        """Accept on ``sockets`` as ``TCPServer`` does (behaviour 7), but with accepting that pauses
        when descriptors run out instead of failing again at once."""
        for sock in sockets:
            self._sockets[sock.fileno()] = sock
            self._handlers[sock.fileno()] = PausingAcceptor(sock, self._handle_connection).stop

    def handle_stream(self, stream: IOStream, address: tuple) -> None:
        """Refuse the connection if it is over a cap; else put :class:`~gittornado.framing.ErrorAnswers`
        on its stream, then serve it as Tornado does."""
        key = address_key(address)
        if len(self.served) >= self.limits.total:
            self.refuse(stream, f"too many connections (at most {self.limits.total}); try again later")
            return
        if self.limits.per_address is not None and self.per_address[key] >= self.limits.per_address:
            self.refuse(
                stream,
                f"too many connections from your address (at most {self.limits.per_address}); "
                "try again later",
            )
            return
        self.served[stream] = (key, ErrorAnswers(stream))
        self.per_address[key] += 1
        super().handle_stream(stream, address)

    def on_close(self, server_conn: object) -> None:
        """A connection ended (behaviour 8): it no longer counts against the caps."""
        super().on_close(server_conn)
        key, _ = self.served.pop(cast(HTTP1ServerConnection, server_conn).stream)
        self.per_address[key] -= 1
        if not self.per_address[key]:
            del self.per_address[key]

    def start_request(
        self, server_conn: object, request_conn: httputil.HTTPConnection
    ) -> httputil.HTTPMessageDelegate:
        """Tornado's delegate for the request, behind a :class:`_RequestGate`."""
        delegate = super().start_request(server_conn, request_conn)
        _, answers = self.served[cast(HTTP1ServerConnection, server_conn).stream]
        return _RequestGate(delegate, cast(HTTP1Connection, request_conn), answers)

    def refuse(self, stream: IOStream, reason: str) -> None:
        """Answer a connection over a cap with 503 and close it, or close it at once when
        :data:`~gittornado.connections.MAX_REFUSING` answers are already going out."""
        if self.refusing >= MAX_REFUSING:
            stream.close()
            return
        self.refusing += 1
        answer = plain_answer(HTTPStatus.SERVICE_UNAVAILABLE, reason)
        if isinstance(stream, SSLIOStream):  # the answer goes out after the TLS handshake, if it ends soon
            loop = IOLoop.current()
            timeout = loop.call_later(LINGER_SECONDS, stream.close)

            def written(future: Future[None]) -> None:
                future.exception()  # a closed stream is an outcome here, not an error to log
                loop.remove_timeout(timeout)
                stream.close()
                self.refusing -= 1

            stream.write(answer).add_done_callback(written)
            return
        sock = stream.socket  # a fresh connection's send buffer holds the answer whole
        try:
            sock.send(answer)
        except OSError:
            pass
        close_gently(sock, self.refused)

    def refused(self) -> None:
        """A refused connection is closed."""
        self.refusing -= 1
