"""The ``gittornado`` command: options -> Application -> HardenedHTTPServer (in each worker process).

The command line itself (its options and what values they take) is :mod:`gittornado.options`.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import shutil
import signal
import socket
import ssl
import sys
import tempfile
from typing import Callable, List, Optional

from tornado.netutil import bind_sockets
from tornado.process import cpu_count
from tornado.web import Application

from . import __version__
from .access import AccessPolicy, ReadOnlyPolicy
from .admission import RepositorySlots
from .backend import GitBackend
from .commands import run_subcommand, start_maintenance
from .connections import ConnectionLimits, raise_descriptor_limit
from .handlers import NotFoundHandler
from .httpserver import HardenedHTTPServer
from .lfs import LfsServer, secret_file
from .observe import Metrics, RequestObserver
from .options import build_parser, check_options
from .options import parse_size as parse_size  # re-exported: gittornado.server.parse_size, as before
from .packcache import PackCache
from .process import GitProcesses
from .pushchecks import PushLimits
from .repos import RepositoryRoot
from .routes import routes_for
from .sizes import CHUNK_SIZE
from .workers import FORWARDED, WorkerPool

log = logging.getLogger("gittornado")


def make_application(backend: GitBackend, prefix: str = "") -> Application:
    """An Application that serves only git, with plain-text 404s elsewhere.

    Requests are logged (and counted, with metrics) by a :class:`RequestObserver`.
    """
    return Application(
        routes_for(backend, prefix),
        default_handler_class=NotFoundHandler,
        log_function=RequestObserver(backend.metrics).log_request,
    )


def load_policy(args: argparse.Namespace) -> AccessPolicy:
    """The access policy the options ask for."""
    if args.accessfile:
        from .inipolicy import IniPolicy
        from .usersfile import AccessFileError

        try:
            return IniPolicy(args.accessfile, realm=args.realm)
        except (OSError, AccessFileError) as error:
            raise SystemExit(f"gittornado: --accessfile: {error}") from None
    return ReadOnlyPolicy()


def listen(args: argparse.Namespace) -> List[socket.socket]:
    """Bind the listening sockets (before any fork, so every worker shares them)."""
    try:
        return bind_sockets(args.port, args.address or None)
    except OSError as error:
        where = f"{args.address or '*'}:{args.port}"
        raise SystemExit(f"gittornado: cannot listen on {where}: {error.strerror}") from None


def tls_context(args: argparse.Namespace) -> Optional[ssl.SSLContext]:
    """The server-side TLS context for ``--certfile``/``--keyfile``, or None for plain HTTP."""
    if not args.certfile:
        if args.keyfile:
            raise SystemExit("gittornado: --keyfile needs --certfile")
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(args.certfile, args.keyfile)
    except (OSError, ssl.SSLError) as error:
        raise SystemExit(f"gittornado: cannot use certificate {args.certfile}: {error}") from None
    return context


def connection_limits(args: argparse.Namespace) -> ConnectionLimits:
    """The caps on connections the options ask for, the others sized from the descriptor limit."""
    for option, value in (
        ("--max-connections", args.max_connections),
        ("--max-connections-per-address", args.max_connections_per_address),
    ):
        if value is not None and value < 1:
            raise SystemExit(f"gittornado: {option} must be 1 or more")
    if args.xheaders and args.max_connections_per_address is not None:
        raise SystemExit(
            "gittornado: --max-connections-per-address does not apply with --xheaders (every connection "
            "comes from the proxy); limit connections per client in the proxy (nginx: limit_conn)"
        )
    return ConnectionLimits.sized(
        git_processes=args.max_git_processes,
        total=args.max_connections,
        per_address=args.max_connections_per_address,
        by_address=not args.xheaders,
    )


def startup_line(
    args: argparse.Namespace, root: str, port: int, tls: bool, processes: int, limits: ConnectionLimits
) -> str:
    """The one line printed on startup; tests and scripts read the URL (and port) from it."""
    host = args.address or "0.0.0.0"
    if ":" in host:
        host = f"[{host}]"
    url = f"{'https' if tls else 'http'}://{host}:{port}{args.prefix}/"
    access = f"access rules from {args.accessfile}" if args.accessfile else "anyone may read, nobody may push"
    notes = [access]
    if processes > 1:
        notes.append(f"{processes} worker processes")
    per_address = f", {limits.per_address} per address" if limits.per_address is not None else ""
    notes.append(f"at most {limits.total} connections{per_address}{' per worker' if processes > 1 else ''}")
    return f"gittornado {__version__} serving {root} at {url} ({'; '.join(notes)})"


async def serve(
    args: argparse.Namespace,
    sockets: List[socket.socket],
    policy: AccessPolicy,
    tls: Optional[ssl.SSLContext],
    limits: ConnectionLimits,
    metrics_dir: Optional[str] = None,
) -> None:
    """Serve on ``sockets`` until SIGTERM or SIGINT, then shut down gracefully.

    ``metrics_dir`` is where the workers of ``--processes`` share their metrics.
    """
    processes = GitProcesses(limit=args.max_git_processes)
    backend = GitBackend(
        lookup=RepositoryRoot(os.path.realpath(args.gitbase), create_on_push=args.create_on_push),
        policy=policy,
        max_body_size=args.max_body_size,
        max_fetch_body_size=args.max_fetch_body_size,
        push_limits=PushLimits(args.max_push_size, args.max_file_size, args.repo_quota),
        pack_slots=pack_slots(args),
        idle_timeout=args.idle_timeout or None,
        body_timeout=args.header_timeout or None,
        processes=processes,
        metrics=Metrics(processes, metrics_dir) if args.metrics else None,
        pack_cache=pack_cache(args),
        lfs=lfs_server(args),
    )
    stop_maintenance = start_maintenance(args, backend, os.path.realpath(args.gitbase))
    tidying = None
    if backend.pack_cache is not None:
        tidying = asyncio.ensure_future(backend.pack_cache.keep_tidy())
        if backend.metrics is not None:
            backend.metrics.watch_pack_cache(backend.pack_cache)
    server = HardenedHTTPServer(
        make_application(backend, args.prefix),
        xheaders=args.xheaders,
        ssl_options=tls,
        idle_connection_timeout=args.header_timeout,
        # Read request bodies in pieces as large as git's read side of a pipe takes.
        chunk_size=CHUNK_SIZE,
        limits=limits,
    )
    server.add_sockets(sockets)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if callable(getattr(policy, "reload", None)):
        loop.add_signal_handler(signal.SIGHUP, policy.reload)  # type: ignore[attr-defined]
    # A forked worker starts with these blocked (see WorkerPool); its handlers are in place now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
    await stop.wait()
    log.info(
        "shutting down: no new connections; waiting up to %gs for %d requests in progress",
        args.shutdown_grace,
        len(backend.requests),
    )
    server.stop()
    deadline = loop.time() + args.shutdown_grace
    # Requests include dumb-protocol downloads, which run no git process.
    while (backend.requests or backend.processes.running) and loop.time() < deadline:
        await asyncio.sleep(0.1)
    # Nothing of a push stuck in a hook may outlive the server: SIGTERM, SIGKILL, reaped.
    await backend.processes.end_all()
    await stop_maintenance()
    if tidying is not None:
        tidying.cancel()
    await asyncio.wait_for(server.close_all_connections(), timeout=5)


def pack_slots(args: argparse.Namespace) -> Optional[RepositorySlots]:
    """The queue of packing fetches per repository.

    By default one per CPU, so a clone storm runs a few pack-objects at full speed instead of all of them
    slowly; none with the pack cache, where identical clones follow one writer for little CPU each and a
    queue would only hold them back.
    """
    limit = args.max_packs_per_repository
    if limit is None:
        limit = 0 if args.pack_cache else cpu_count()
    return RepositorySlots(limit) if limit else None


def pack_cache(args: argparse.Namespace) -> Optional[PackCache]:
    """The pack-objects cache ``--pack-cache`` asks for, or None."""
    if not args.pack_cache:
        return None
    try:
        return PackCache(
            args.pack_cache, args.pack_cache_max_size, args.pack_cache_max_age, args.pack_cache_min_requests
        )
    except OSError as error:
        raise SystemExit(f"gittornado: --pack-cache {args.pack_cache}: {error.strerror}") from None


def lfs_server(args: argparse.Namespace) -> Optional[LfsServer]:
    """Git LFS as the options ask for it, with its secret made if there is none yet.

    Without a secret there is no LFS: with ``--lfs-secret-file`` that stops
    the command; the default place may be unwritable (a read-only
    ``--gitbase``), which only turns LFS off, with a warning.
    """
    path = args.lfs_secret_file or secret_file(os.path.realpath(args.gitbase))
    try:
        return LfsServer.from_secret_file(path, args.lfs_max_object_size)
    except (OSError, ValueError) as error:
        if args.lfs_secret_file:
            raise SystemExit(f"gittornado: --lfs-secret-file: {error}") from None
        log.warning("Git LFS is off: no secret to sign its URLs with (%s); give --lfs-secret-file", error)
        return None


def share_metrics() -> str:
    """A new directory in which the workers of ``--processes`` keep their metrics.

    Every worker then answers a scrape with the totals of all of them
    (prometheus_client's multiprocess mode).  prometheus_client reads
    ``PROMETHEUS_MULTIPROC_DIR`` when it is first imported, which happens in
    the workers, after this.
    """
    path = tempfile.mkdtemp(prefix="gittornado-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path


def forget_metrics(metrics_dir: Optional[str]) -> Optional[Callable[[int], object]]:
    """What the parent does when a worker exits: its gauges stop counting (its counters still do)."""
    if metrics_dir is None:
        return None
    from prometheus_client import multiprocess

    return functools.partial(multiprocess.mark_process_dead, path=metrics_dir)


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point of the ``gittornado`` command.

    Everything that can fail on bad options (the repository root, the access
    file, the certificate, the port) is checked here, once, before any worker
    is forked, so a mistake stops the command instead of a restart loop.
    """
    status = run_subcommand(sys.argv[1:] if argv is None else argv)  # gittornado maintain, backup
    if status is not None:
        raise SystemExit(status)
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
        stream=sys.stderr,
    )
    check_options(args)
    root = os.path.realpath(args.gitbase)
    lfs_server(args)  # the secret is made once, before any worker starts
    if args.pack_cache:
        pack_cache(args)  # a directory that cannot be made stops the command, not each worker
    processes = args.processes or cpu_count()
    policy = load_policy(args)
    tls = tls_context(args)
    raise_descriptor_limit()
    limits = connection_limits(args)
    sockets = listen(args)
    port = sockets[0].getsockname()[1]
    print(startup_line(args, root, port, tls is not None, processes, limits), flush=True)
    metrics_dir = None
    if processes > 1:
        metrics_dir = share_metrics() if args.metrics else None
        worker = None
        try:
            worker = WorkerPool(processes, sockets, forget_metrics(metrics_dir)).run()
        finally:
            if worker is None and metrics_dir is not None:  # the parent, done with its workers
                shutil.rmtree(metrics_dir, ignore_errors=True)
        if worker is None:
            return
    asyncio.run(serve(args, sockets, policy, tls, limits, metrics_dir))


if __name__ == "__main__":
    main()
