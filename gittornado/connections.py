"""Keeping a server within its file descriptors: connection caps sized from RLIMIT_NOFILE, paused accepting.

Every connection holds a descriptor, and a connection that runs git holds about
:data:`GIT_DESCRIPTORS` more. A server that accepts whatever arrives runs out of descriptors, and then
``accept()`` fails with ``EMFILE`` at once every time the event loop asks, so the loop spins and logs a
traceback per turn while the connections it should serve wait in the backlog. Two things prevent that:

- :class:`ConnectionLimits` caps the connections served at once, in total and per client address, sized
  so that every connection could run git without the process running out of descriptors;
- :class:`PausingAcceptor` stops watching a listening socket for :data:`ACCEPT_PAUSE` seconds when
  ``accept()`` fails for lack of descriptors or memory (the caps are per process; descriptors may still
  run out, e.g. to other files), and logs one line per :data:`PAUSE_LOG_INTERVAL`.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import resource
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from tornado.ioloop import IOLoop

log = logging.getLogger("gittornado")

#: Descriptors a server process needs besides its connections: stdio, the event loop, listening sockets,
#: logs, the access file, Python's own.
RESERVED_DESCRIPTORS = 32
#: Descriptors one git process holds in the server: pipes to its stdin, stdout and stderr, and a pidfd.
GIT_DESCRIPTORS = 4
#: Connections over a cap answered at once (each holds its descriptor while the answer lingers, see
#: framing.close_gently); further ones are closed without an answer.
MAX_REFUSING = 16
#: The smallest default cap per client address: a client may fetch several repositories at once.
MIN_PER_ADDRESS = 8

#: ``accept()`` errors that mean "no resources right now": accepting pauses instead of failing again.
SCARCE = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
#: How long accepting pauses after such an error.
ACCEPT_PAUSE = 0.25
#: While accepting keeps pausing, one log line at most this often.
PAUSE_LOG_INTERVAL = 10.0
#: Connections accepted in one turn of the event loop at most, as Tornado's own accept handler does.
ACCEPT_BATCH = 128


def raise_descriptor_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit, as systemd advises programs that use no ``select()``:
    its default soft limit (1024) is kept low only for those that do, and would cap connections low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError):  # a hard limit above what the kernel allows (nr_open)
            pass


def descriptor_limit() -> int:
    """This process's soft RLIMIT_NOFILE (a large number when unlimited)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


@dataclass(frozen=True)
class ConnectionLimits:
    """How many connections one server process serves at once: ``total``, and ``per_address`` from one
    client address (None: not capped per address)."""

    total: int
    per_address: Optional[int]

    @classmethod
    def sized(
        cls,
        descriptors: Optional[int] = None,
        git_processes: Optional[int] = None,
        total: Optional[int] = None,
        per_address: Optional[int] = None,
        by_address: bool = True,
    ) -> ConnectionLimits:
        """The limits given, the others sized from ``descriptors`` (default: RLIMIT_NOFILE).

        Without a cap on ``git_processes`` every connection may run git, so each is counted as
        ``1 + GIT_DESCRIPTORS``; with one, those descriptors are set apart once and each connection counts
        two (itself and a file it may send). ``by_address=False`` (behind a reverse proxy, where every
        connection comes from the proxy) leaves ``per_address`` uncapped.
        """
        if total is None:
            spare = (descriptors or descriptor_limit()) - RESERVED_DESCRIPTORS - MAX_REFUSING
            if git_processes is None:
                total = spare // (1 + GIT_DESCRIPTORS)
            else:
                total = (spare - GIT_DESCRIPTORS * git_processes) // 2
            total = max(1, total)
        if not by_address:
            return cls(total, None)
        if per_address is None:
            per_address = min(total, max(MIN_PER_ADDRESS, total // 10))
        return cls(total, per_address)


def client_group(address: str) -> str:
    """The name a client address is known by, to the connection caps and the login throttle alike.

    IPv4 addresses count one by one; IPv6 addresses by their /64 network,
    because whoever has one address of a /64 (a home, a cloud instance)
    usually has all 2**64 of them.  An IPv4-mapped IPv6 address counts as the
    IPv4 address; anything that is not an address is used as it is.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone (fe80::1%eth0)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def address_key(address: Any) -> str:
    """What the per-address cap counts by: the peer's address, grouped by :func:`client_group`."""
    host = address[0] if isinstance(address, tuple) and address else ""
    return client_group(str(host))


class PausingAcceptor:
    """Accepts connections on ``sock`` and passes each to ``callback(connection, address)``; when
    ``accept()`` fails for lack of descriptors or memory, stops watching ``sock`` for a while.

    Tornado's ``add_accept_handler`` lets such an error escape, and since the connection is still waiting
    the event loop calls it again at once: a busy loop that logs a traceback per turn.
    """

    def __init__(self, sock: socket.socket, callback: Callable[[socket.socket, Any], None]) -> None:
        self.sock = sock
        self.callback = callback
        self.loop = IOLoop.current()
        self.resume_timer: Optional[object] = None
        self.stopped = False
        self.pauses = 0
        self.logged_at = -PAUSE_LOG_INTERVAL
        self.loop.add_handler(sock, self.accept, IOLoop.READ)

    def accept(self, fd: Any, events: int) -> None:
        """Accept what is waiting (a batch at most, so other work goes on), or pause."""
        for _ in range(ACCEPT_BATCH):
            if self.stopped:
                return
            try:
                connection, address = self.sock.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:
                continue
            except OSError as error:
                if error.errno not in SCARCE:
                    raise
                self.pause(error)
                return
            self.callback(connection, address)

    def pause(self, error: OSError) -> None:
        """Stop watching the socket for :data:`ACCEPT_PAUSE` seconds; say so now and then."""
        self.loop.remove_handler(self.sock)
        self.resume_timer = self.loop.call_later(ACCEPT_PAUSE, self.resume)
        self.pauses += 1
        now = time.monotonic()
        if now - self.logged_at >= PAUSE_LOG_INTERVAL:
            log.warning(
                "cannot accept connections: %s (%s); accepting pauses %gs at a time (%d pauses since the "
                "last such line); lower --max-connections or raise the descriptor limit (ulimit -n, "
                "LimitNOFILE)",
                error.strerror,
                errno.errorcode.get(error.errno or 0, error.errno),
                ACCEPT_PAUSE,
                self.pauses,
            )
            self.logged_at = now
            self.pauses = 0

    def resume(self) -> None:
        """Watch the socket again."""
        self.resume_timer = None
        if not self.stopped:
            self.loop.add_handler(self.sock, self.accept, IOLoop.READ)

    def stop(self) -> None:
        """Accept no more (what ``TCPServer.stop`` calls, as it calls the remover Tornado returns)."""
        if self.stopped:
            return
        self.stopped = True
        if self.resume_timer is not None:
            self.loop.remove_timeout(self.resume_timer)
            self.resume_timer = None
        else:
            self.loop.remove_handler(self.sock)
