"""A stand-in for ``gittornado --accessfile`` while no users.ini policy exists.

Serves ``--gitbase`` with :class:`gittornado.OpenPolicy` (everyone may push),
through the same :func:`gittornado.server.make_application` and
``HTTPServer`` the real command uses, and prints the same kind of startup
line.  :mod:`benchmarks.servers` uses the real command as soon as
``gittornado.access.IniPolicy`` exists.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from gittornado import GitBackend, OpenPolicy, RepositoryRoot, __version__
from gittornado.server import make_application


async def serve(root: str, address: str) -> None:
    """Listen on a free port of ``address`` until SIGTERM or SIGINT."""
    server = HTTPServer(make_application(GitBackend(lookup=RepositoryRoot(root), policy=OpenPolicy())))
    sockets = bind_sockets(0, address)
    server.add_sockets(sockets)
    port = sockets[0].getsockname()[1]
    print(f"gittornado {__version__} serving {root} at http://{address}:{port}/ (bench launcher)", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gitbase", required=True)
    parser.add_argument("--address", default="127.0.0.1")
    args = parser.parse_args()
    # The same log configuration as the gittornado command at its default level.
    logging.basicConfig(
        level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    asyncio.run(serve(os.path.realpath(args.gitbase), args.address))


if __name__ == "__main__":
    main()
