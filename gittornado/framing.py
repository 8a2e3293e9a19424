"""Complete plain-text answers where Tornado's HTTP/1 layer would answer a bad request badly, or not at all.

Three kinds of bad request never reach a handler: Tornado's HTTP/1 layer answers them itself, or lets
them through, badly for a server that promises "a short plain-text reason" for every bad request:

- malformed framing, request line or header lines (``HTTPInputError``): Tornado writes the bare bytes
  ``HTTP/1.1 400 Bad Request\\r\\n\\r\\n`` (no reason, no length) and closes;
- a request line and headers longer than ``max_header_size``: the IOStream closes itself and the client
  gets no answer at all, often a reset;
- a request that says ``HTTP/1.2`` to ``HTTP/1.9``: Tornado serves it, and its response has neither a
  length nor chunking on a connection that may stay open. Those get 505, as other versions do, from
  the request gate of :mod:`gittornado.httpserver` (with :meth:`ErrorAnswers.answer`).

Tornado has no hook for the first two, so :class:`ErrorAnswers` shadows three public methods of
each connection's IOStream with instance attributes (the IOStream classes stay untouched, TLS streams
alike):

- ``read_until_regex``: a request head is being read; until its response starts, ``write`` is watched;
- ``write``: only from a head read until the first write of that request's response, so response
  bodies never pass through code of ours; Tornado's bare 400 is replaced by a complete answer;
- ``close``: once per connection; when a read overran its limit and no response has started, answers
  431 if the request's head read is still pending (the head is too big), else 400 (a chunk-size line).

Answers name the problem in our own words, never quoting the request, and name the server without a
version (``Server: gittornado``). A connection we answered is half-closed and drained for up to
:data:`LINGER_SECONDS` (:func:`close_gently`), so that a client still sending receives the answer
instead of a reset.

:class:`~gittornado.httpserver.HardenedHTTPServer` puts an :class:`ErrorAnswers` on each connection it
serves, and installs the :class:`FramingLogFilter`.

The Tornado behaviours this relies on (7 and 8 are :mod:`gittornado.httpserver`'s); tests/test_hostile.py
fails if a Tornado upgrade changes one:

1. ``HTTP1Connection`` reads each request head, and nothing else, with ``stream.read_until_regex(...,
   max_bytes=max_header_size)``, and writes nothing before it has read the head but an interim
   ``HTTP/1.1 1xx`` (100-continue).
2. On ``HTTPInputError`` it makes exactly one ``stream.write(b"HTTP/1.1 400 Bad Request\\r\\n\\r\\n")``
   call inside its ``except`` block (so ``sys.exc_info()`` is that error there), then closes the stream.
3. A ``read_until``/``read_until_regex`` beyond ``max_bytes`` (the head, or a chunk-size line) makes
   the IOStream call ``self.close(exc_info=error)`` with the ``UnsatisfiableReadError`` itself.
4. ``IOStream`` and ``HTTP1Connection`` look ``write``, ``close`` and ``read_until_regex`` up on the
   stream at every call, so an instance attribute takes effect; ``read_until_regex`` returns a Future;
   ``stream.socket`` is the connection's socket (an ``SSLSocket`` over TLS).
5. The beginnings of Tornado's ``HTTPInputError`` messages (:data:`REASONS`); a message not listed gets
   the generic reason, so a changed text costs precision, not the answer.
6. It logs each ``HTTPInputError`` on ``tornado.general`` as :data:`TORNADO_MALFORMED_LOG` with the
   arguments (connection context, error); :class:`FramingLogFilter` rewrites that line.
"""

from __future__ import annotations

import logging
import socket
import sys
from asyncio import Future
from http import HTTPStatus
from typing import Any, Callable, Optional, Union, cast

from tornado.ioloop import IOLoop
from tornado.iostream import IOStream, UnsatisfiableReadError

#: The ``Server`` header of every response: the name alone, no version for a scanner to match.
SERVER_NAME = "gittornado"

#: How long a connection we answered and close may go on sending what we drop (see close_gently).
LINGER_SECONDS = 2.0

#: What Tornado writes when it catches an ``HTTPInputError`` (behaviour 2 above).
TORNADO_BARE_400 = b"HTTP/1.1 400 Bad Request\r\n\r\n"

#: What Tornado logs, at INFO on ``tornado.general``, when it catches an ``HTTPInputError`` (behaviour 6).
TORNADO_MALFORMED_LOG = "Malformed HTTP message from %s: %s"

#: What a request with an HTTP version other than 1.0 and 1.1 is answered (with 505).
UNSUPPORTED_VERSION = "unsupported HTTP version (HTTP/1.0 and HTTP/1.1 are served)"

#: How Tornado's ``HTTPInputError`` messages begin -> the reason we send. Some messages go on to quote
#: the request (a header value may be a password), so only the beginning is matched and never sent.
REASONS = (
    ("invalid chunk size", "invalid chunk size in the chunked body"),
    ("improperly terminated chunk", "a chunk of the chunked body is not followed by CRLF"),
    ("chunked body too large", "the chunk sizes add up to more than the body size limit"),
    ("Content-Length too long", "Content-Length is over the body size limit"),
    ("Only integer Content-Length", "Content-Length is not a number"),
    ("Multiple unequal Content-Lengths", "conflicting Content-Length headers"),
    ("Message with both Transfer-Encoding and Content-Length", "both Transfer-Encoding and Content-Length"),
    ("Unsupported Transfer-Encoding", "unsupported Transfer-Encoding (only chunked is accepted)"),
    ("Malformed HTTP request line", "malformed request line"),
    ("Unexpected HTTP version", UNSUPPORTED_VERSION),
    ("Invalid header", "malformed header line"),
    ("no colon in header line", "malformed header line"),
    ("header line cannot start with whitespace", "malformed header line (folded lines are not accepted)"),
    ("Missing Host header", "missing or invalid Host header"),
    ("Invalid Host header", "missing or invalid Host header"),
    ("Multiple host headers", "missing or invalid Host header"),
)
GENERIC_REASON = (
    "malformed HTTP framing (request line, headers, Content-Length, Transfer-Encoding or chunk sizes)"
)


def framing_reason(error: Optional[BaseException]) -> str:
    """Our words for the ``HTTPInputError`` Tornado is handling; the generic reason for any other."""
    message = str(error) if error is not None else ""
    return next((reason for start, reason in REASONS if message.startswith(start)), GENERIC_REASON)


def framing_status(reason: str) -> int:
    """The status for a request Tornado refused for ``reason``: 505 for its HTTP version, else 400."""
    return HTTPStatus.HTTP_VERSION_NOT_SUPPORTED if reason == UNSUPPORTED_VERSION else HTTPStatus.BAD_REQUEST


class FramingLogFilter(logging.Filter):
    """Tornado's log line for a malformed request, with our words for what was wrong in place of its message.

    Tornado's message may quote the request: an invalid header value is quoted whole, so an
    ``Authorization`` header with a stray control character would put a password in the log, which
    gittornado promises never happens. The client address stays, so the line still says who sent it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if (
            record.msg == TORNADO_MALFORMED_LOG
            and isinstance(args, tuple)
            and len(args) == 2
            and isinstance(args[1], BaseException)
        ):
            record.args = (args[0], framing_reason(args[1]))
        return True


def install_framing_log_filter() -> None:
    """Put a :class:`FramingLogFilter` on Tornado's ``tornado.general`` logger, unless one is there."""
    logger = logging.getLogger("tornado.general")
    if not any(isinstance(existing, FramingLogFilter) for existing in logger.filters):
        logger.addFilter(FramingLogFilter())


def plain_answer(status: int, reason: str) -> bytes:
    """A complete response that ends the connection, with a one-line plain-text body."""
    phrase = HTTPStatus(status).phrase
    body = f"{status} {phrase}: {reason}\n".encode()
    head = (
        f"HTTP/1.1 {status} {phrase}\r\nServer: {SERVER_NAME}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class ErrorAnswers:
    """The hooks on one connection's stream; they remove themselves when the stream closes."""

    def __init__(self, stream: IOStream) -> None:
        self.stream = stream
        # The stream's own methods, bound before the instance attributes shadow them.
        self.write = stream.write
        self.close = stream.close
        self.read_until_regex = stream.read_until_regex
        #: The current request's head read; None while it starts (it may fail before it returns).
        self.head: Optional[Future[bytes]] = None
        #: The ``max_bytes`` of that read: Tornado's ``max_header_size``.
        self.head_limit: Optional[int] = None
        #: True from a head read until the first write of its response.
        self.before_response = False
        #: True once one of our answers went out: the connection is then closed gently.
        self.answered = False
        stream.read_until_regex = self.read_head  # type: ignore[method-assign]
        stream.close = self.close_with_answer  # type: ignore[method-assign]

    def read_head(self, regex: bytes, max_bytes: Optional[int] = None) -> Future[bytes]:
        """A request begins: watch writes until its response starts."""
        self.before_response = True
        self.head_limit = max_bytes
        self.stream.write = self.first_write  # type: ignore[method-assign]
        self.head = None
        # Declared an Awaitable, but a Future (tornado.http1connection relies on that too).
        self.head = cast("Future[bytes]", self.read_until_regex(regex, max_bytes))
        return self.head

    def first_write(self, data: Union[bytes, memoryview]) -> Future[None]:
        """Let the response through and stop watching, or replace Tornado's bare 400."""
        if data[:10] == b"HTTP/1.1 1":  # an interim 100 (Continue): the response is still to come
            return self.write(data)
        if data == TORNADO_BARE_400:  # written inside Tornado's except block: exc_info is its error
            reason = framing_reason(sys.exc_info()[1])
            return self.answer(framing_status(reason), reason)
        self.stop_watching_writes()
        return self.write(data)

    def close_with_answer(self, exc_info: Any = False) -> None:
        """Answer a read that overran its limit if no response has started, then close."""
        if isinstance(exc_info, UnsatisfiableReadError) and self.before_response and not self.stream.closed():
            if self.head is None or not self.head.done():
                self.answer(431, f"request line and headers exceed {self.head_limit} bytes")
            else:
                self.answer(400, "chunk-size line too long in the chunked body")
        # Gone with the stream: no reference cycle keeps a closed stream's buffers alive.
        for name in ("read_until_regex", "close", "write"):
            vars(self.stream).pop(name, None)
        socket_copy = None
        if self.answered and not self.stream.closed():
            own = self.stream.socket
            try:  # a second descriptor keeps the connection open after the stream closes its own
                socket_copy = socket.fromfd(own.fileno(), own.family, own.type)
            except OSError:
                pass
        self.close(exc_info=exc_info)
        if socket_copy is not None:
            close_gently(socket_copy)

    def answer(self, status: int, reason: str) -> Future[None]:
        """Send our plain-text answer in place of Tornado's."""
        self.stop_watching_writes()
        self.answered = True
        return self.write(plain_answer(status, reason))

    def stop_watching_writes(self) -> None:
        """Writes go straight to the stream's own ``write`` again."""
        self.before_response = False
        vars(self.stream).pop("write", None)


def close_gently(sock: socket.socket, on_closed: Optional[Callable[[], None]] = None) -> None:
    """Half-close ``sock``, drop what the client still sends, close it at its EOF or after a while;
    then call ``on_closed``.

    Closing a socket with unread input makes the kernel reset the connection, and a reset can destroy
    an answer the client has not read yet; a client we refuse is often still sending its request.
    """
    loop = IOLoop.current()

    def drop(fd: Any, events: int) -> None:
        try:
            if sock.recv(65536):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        close()

    def close() -> None:
        if sock.fileno() != -1:
            loop.remove_handler(sock)
            loop.remove_timeout(timeout)
            sock.close()
            if on_closed is not None:
                on_closed()

    try:
        sock.setblocking(False)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        sock.close()
        if on_closed is not None:
            on_closed()
        return
    loop.add_handler(sock, drop, IOLoop.READ)
    timeout = loop.call_later(LINGER_SECONDS, close)
