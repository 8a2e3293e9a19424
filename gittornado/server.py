"""The ``gittornado`` command: options -> Application -> HTTPServer.

argparse (not tornado.options) so that ``gittornado --port 8080`` works as
people type it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import sys
from typing import List, Optional

from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application

from . import __version__
from .access import AccessPolicy, ReadOnlyPolicy
from .handlers import GitBackend, NotFoundHandler
from .repos import RepositoryRoot
from .routes import routes_for

log = logging.getLogger("gittornado")

_SIZE = re.compile(r"(\d+)([KMG]?)B?", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Parse ``500M``-style sizes (K, M, G: powers of 1024) into bytes."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 1048576, 500M, 2G)")
    number, unit = match.groups()
    return int(number) * 1024 ** " KMG".index(unit.upper() or " ")


def make_application(backend: GitBackend, prefix: str = "") -> Application:
    """An Application that serves only git, with plain-text 404s elsewhere."""
    return Application(routes_for(backend, prefix), default_handler_class=NotFoundHandler)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gittornado",
        description="Serve a directory of git repositories over HTTP (smart and dumb protocols).",
        epilog="Without --accessfile anyone may clone and fetch, and nobody may push.",
    )
    parser.add_argument(
        "--port", type=int, default=8080, help="TCP port to listen on (default: 8080; 0 picks a free one)"
    )
    parser.add_argument("--address", default="", help="address to listen on (default: all interfaces)")
    parser.add_argument(
        "--gitbase", default=".", help="directory holding the repositories (default: the current one)"
    )
    parser.add_argument(
        "--accessfile", help="users.ini with users, password hashes and per-repository rights"
    )
    parser.add_argument(
        "--realm", default="gittornado", help="HTTP Basic realm shown to clients (default: gittornado)"
    )
    parser.add_argument(
        "--max-body-size",
        type=parse_size,
        default=None,
        metavar="SIZE",
        help="largest request body, e.g. 500M or 2G (default: unlimited)",
    )
    parser.add_argument(
        "--shutdown-grace",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT, how long running transfers may take to finish (default: 30)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (default: info, which logs one line per request)",
    )
    parser.add_argument("--version", action="version", version=f"gittornado {__version__}")
    return parser


def load_policy(args: argparse.Namespace) -> AccessPolicy:
    """The access policy the options ask for."""
    if args.accessfile:
        from .access import IniPolicy

        return IniPolicy(args.accessfile, realm=args.realm)
    return ReadOnlyPolicy()


async def serve(args: argparse.Namespace) -> None:
    """Run the server until SIGTERM or SIGINT, then shut down gracefully."""
    root = os.path.realpath(args.gitbase)
    if not os.path.isdir(root):
        raise SystemExit(f"gittornado: --gitbase {args.gitbase}: not a directory")
    backend = GitBackend(
        lookup=RepositoryRoot(root), policy=load_policy(args), max_body_size=args.max_body_size
    )
    server = HTTPServer(make_application(backend))
    try:
        sockets = bind_sockets(args.port, args.address or None)
    except OSError as error:
        where = f"{args.address or '*'}:{args.port}"
        raise SystemExit(f"gittornado: cannot listen on {where}: {error.strerror}") from None
    server.add_sockets(sockets)
    port = sockets[0].getsockname()[1]
    host = args.address or "0.0.0.0"
    access = f"access rules from {args.accessfile}" if args.accessfile else "anyone may read, nobody may push"
    print(f"gittornado {__version__} serving {root} at http://{host}:{port}/ ({access})", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info(
        "shutting down: no new connections; waiting up to %gs for %d running transfers",
        args.shutdown_grace,
        len(backend.processes.running),
    )
    server.stop()
    deadline = loop.time() + args.shutdown_grace
    while backend.processes.running and loop.time() < deadline:
        await asyncio.sleep(0.1)
    backend.processes.abort_all()
    await asyncio.wait_for(server.close_all_connections(), timeout=5)


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point of the ``gittornado`` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
