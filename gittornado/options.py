"""The ``gittornado`` command's options: its command line, and the values each option may take.

argparse (not tornado.options) so that ``gittornado --port 8080`` works as
people type it.  :func:`build_parser` reads the command line;
:func:`check_options` refuses what argparse's types cannot (a range, a
directory, a missing package) before anything starts.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re

from tornado.process import cpu_count

from . import __version__
from .backend import MAX_FETCH_BODY_SIZE
from .commands import add_maintenance_options
from .packcache import DEFAULT_MAX_AGE, DEFAULT_MAX_BYTES

#: The default cap on git processes: packing is CPU-bound, but most of a transfer's time is the network's.
GIT_PROCESSES_PER_CPU = 8

_SIZE = re.compile(r"(\d+)([KMG]?)B?", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Parse ``500M``-style sizes (K, M, G: powers of 1024) into bytes."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 1048576, 500M, 2G)")
    number, unit = match.groups()
    return int(number) * 1024 ** " KMG".index(unit.upper() or " ")


def url_prefix(text: str) -> str:
    """Normalize a ``--prefix``: ``git``, ``/git`` and ``/git/`` all mean ``/git``; ``/`` means none."""
    parts = [part for part in text.split("/") if part]
    if any(part in (".", "..") for part in parts) or any(c in text for c in "?#%\\"):
        raise argparse.ArgumentTypeError(f"not a URL path: {text!r} (example: /git)")
    return "".join("/" + part for part in parts)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``gittornado``."""
    parser = argparse.ArgumentParser(
        prog="gittornado",
        description="Serve a directory of git repositories over HTTP (smart and dumb protocols).",
        epilog="Without --accessfile anyone may clone and fetch, and nobody may push. "
        "Also: gittornado maintain --help, gittornado backup --help.",
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
        "--create-on-push",
        action="store_true",
        help="a push to a repository that does not exist creates it (bare), if the user's rules grant rw "
        "on its name (default: off, 404)",
    )
    parser.add_argument(
        "--realm", default="gittornado", help="HTTP Basic realm shown to clients (default: gittornado)"
    )
    parser.add_argument(
        "--max-body-size",
        type=parse_size,
        default=None,
        metavar="SIZE",
        help="largest push request body, e.g. 500M or 2G (default: unlimited)",
    )
    parser.add_argument(
        "--max-push-size",
        type=parse_size,
        default=None,
        metavar="SIZE",
        help="refuse a push whose pack is larger (git's receive.maxInputSize; default: unlimited)",
    )
    parser.add_argument(
        "--max-file-size",
        type=parse_size,
        default=None,
        metavar="SIZE",
        help="refuse a push that adds a file larger than this (default: unlimited)",
    )
    parser.add_argument(
        "--repo-quota",
        type=parse_size,
        default=None,
        metavar="SIZE",
        help="refuse a push after which a repository's objects would take more disk (default: unlimited)",
    )
    parser.add_argument(
        "--max-fetch-body-size",
        type=parse_size,
        default=MAX_FETCH_BODY_SIZE,
        metavar="SIZE",
        help="largest fetch (upload-pack) request body after gzip decoding; negotiation needs a few MiB "
        f"(default: {MAX_FETCH_BODY_SIZE // 2**20}M)",
    )
    parser.add_argument(
        "--shutdown-grace",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT, how long running transfers may take to finish (default: 30)",
    )
    parser.add_argument(
        "--prefix",
        type=url_prefix,
        default="",
        metavar="PATH",
        help="serve the repositories under this URL path, e.g. /git (default: at the root)",
    )
    parser.add_argument(
        "--xheaders",
        action="store_true",
        help="take the client address and scheme from X-Real-IP, X-Forwarded-For and "
        "X-Forwarded-Proto; only behind a reverse proxy that sets them (default: off)",
    )
    parser.add_argument("--certfile", help="serve HTTPS with this PEM certificate (chain)")
    parser.add_argument(
        "--keyfile", help="the certificate's PEM private key (default: read it from --certfile)"
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help="worker processes sharing the socket; 0 means one per CPU (default: 1)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="end a transfer in which no byte moved either way for this long (default: 300; 0: never)",
    )
    parser.add_argument(
        "--header-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="close a connection whose request headers take longer than this, "
        "including idle keep-alive connections, and answer 408 to a request whose body has not "
        "started this long after its headers (default: 60)",
    )
    parser.add_argument(
        "--max-git-processes",
        type=int,
        default=GIT_PROCESSES_PER_CPU * cpu_count(),
        metavar="N",
        help="run at most N git processes at once (per worker process); requests beyond wait "
        f"up to 60 seconds, then get 503 with Retry-After (default: {GIT_PROCESSES_PER_CPU} per CPU, "
        "here %(default)s)",
    )
    parser.add_argument(
        "--max-packs-per-repository",
        type=int,
        default=None,
        metavar="N",
        help="run at most N packing fetches (clones) of one repository at once; more wait in arrival "
        "order up to 60 seconds, then get 503 with Retry-After; 0: no limit (default: one per CPU, "
        f"here {cpu_count()}; no limit with --pack-cache, whose followers cost little)",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=None,
        metavar="N",
        help="serve at most N connections at once (per worker process); one more is answered 503 and "
        "closed (default: sized from the descriptor limit, ulimit -Hn, so that each could run git)",
    )
    parser.add_argument(
        "--max-connections-per-address",
        type=int,
        default=None,
        metavar="N",
        help="serve at most N connections at once from one client address (IPv6: one /64), per worker "
        "process (default: a tenth of --max-connections, at least 8); not with --xheaders, where every "
        "connection comes from the proxy: limit clients in the proxy",
    )
    parser.add_argument(
        "--metrics",
        action="store_true",
        help="serve Prometheus metrics at <prefix>/metrics, without authentication and without "
        "repository names (needs prometheus_client); <prefix>/healthz is always served",
    )
    parser.add_argument(
        "--pack-cache",
        metavar="DIR",
        help="share the packs of identical fetches (CI clone storms) through this directory, which "
        "several processes and hosts may share (default: off)",
    )
    parser.add_argument(
        "--pack-cache-max-size",
        type=parse_size,
        default=DEFAULT_MAX_BYTES,
        metavar="SIZE",
        help="evict the oldest entries beyond this total, e.g. 20G (default: 5G)",
    )
    parser.add_argument(
        "--pack-cache-max-age",
        type=float,
        default=DEFAULT_MAX_AGE,
        metavar="SECONDS",
        help="evict entries older than this (default: 600)",
    )
    parser.add_argument(
        "--pack-cache-min-requests",
        type=int,
        default=2,
        metavar="N",
        help="cache a fetch that has haves from its Nth identical request on, a clone from its first "
        "(default: 2, which halves disk writes)",
    )
    add_maintenance_options(parser)
    parser.add_argument(
        "--lfs-max-object-size",
        type=parse_size,
        default=None,
        metavar="SIZE",
        help="largest Git LFS object that may be uploaded, e.g. 5G (default: unlimited)",
    )
    parser.add_argument(
        "--lfs-secret-file",
        metavar="FILE",
        help="the key that signs Git LFS transfer URLs, made on first start; share it between hosts "
        "(default: <gitbase>/.gittornado/lfs-secret)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (default: info, which logs one line per request)",
    )
    parser.add_argument("--version", action="version", version=f"gittornado {__version__}")
    return parser


def check_options(args: argparse.Namespace) -> None:
    """Stop the command (SystemExit) on values its options may not take."""
    if not os.path.isdir(os.path.realpath(args.gitbase)):
        raise SystemExit(f"gittornado: --gitbase {args.gitbase}: not a directory")
    if args.max_packs_per_repository is not None and args.max_packs_per_repository < 0:
        raise SystemExit("gittornado: --max-packs-per-repository must be 0 (no limit) or more")
    if args.max_git_processes < 1:
        raise SystemExit("gittornado: --max-git-processes must be 1 or more")
    if args.pack_cache_min_requests < 1:
        raise SystemExit("gittornado: --pack-cache-min-requests must be 1 or more")
    if args.processes < 0:
        raise SystemExit("gittornado: --processes must be 0 (one per CPU) or more")
    if args.metrics and importlib.util.find_spec("prometheus_client") is None:
        raise SystemExit("gittornado: --metrics needs prometheus_client: pip install 'gittornado[metrics]'")
