"""The administrator's subcommands, ``gittornado maintain`` and ``gittornado backup``, and the server's
maintenance options.

``gittornado --port ...`` (no subcommand) serves, as always; :func:`gittornado.server.main` hands
``gittornado <subcommand> ...`` to :data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys
from typing import Awaitable, Callable, Dict, List, Optional

from .backend import GitBackend, server_environment
from .backup import back_up
from .maintenance import (
    BROKEN,
    BUSY,
    DEFAULT_DELAY,
    DEFAULT_FULL_INTERVAL,
    DEFAULT_GRACE,
    FAILED,
    MaintenanceScheduler,
    MaintenanceSettings,
    find_repositories,
    maintain,
    report_disk_usage,
    without_auto_gc,
)
from .repos import resolve_repository
from .util import decimal

log = logging.getLogger("gittornado")

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """Parse ``90``, ``90s``, ``30m``, ``12h``, ``14d`` or ``2w`` into seconds."""
    match = _DURATION.fullmatch(text.strip().lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (examples: 3600, 90m, 14d, 2w)")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


#: The shortest grace accepted: git's prune and gittornado's quarantine removal would otherwise take
#: the objects of a push still in progress (git's documentation warns against ``--expire=now``).
MIN_GRACE = 3600.0


def parse_grace(text: str) -> float:
    """A :func:`parse_duration` of at least :data:`MIN_GRACE`."""
    seconds = parse_duration(text)
    if seconds < MIN_GRACE:
        raise argparse.ArgumentTypeError(f"{text!r} is too short: a push in progress may need its objects")
    return seconds


def positive(text: str) -> int:
    """An integer of 1 or more."""
    number = decimal(text)
    if number is None or number < 1:
        raise argparse.ArgumentTypeError(f"not a number of 1 or more: {text!r}")
    return number


def add_grace_option(parser: argparse.ArgumentParser, option: str) -> None:
    parser.add_argument(
        option,
        type=parse_grace,
        default=DEFAULT_GRACE,
        metavar="DURATION",
        help="keep unreachable objects and abandoned push quarantines this long, e.g. 3d, at least 1h "
        "(default: 2w, git gc's own)",
    )


def add_maintenance_options(parser: argparse.ArgumentParser) -> None:
    """The server's options for maintenance after pushes."""
    parser.add_argument(
        "--no-maintenance",
        action="store_true",
        help="do not maintain repositories after pushes (run `gittornado maintain` from cron instead)",
    )
    parser.add_argument(
        "--maintenance-delay",
        type=parse_duration,
        default=DEFAULT_DELAY,
        metavar="DURATION",
        help="maintain a repository this long after its last push, so a burst of pushes costs one run "
        "(default: 60s)",
    )
    parser.add_argument(
        "--maintenance-jobs",
        type=positive,
        default=1,
        metavar="N",
        help="maintain at most N repositories at once per worker process (default: 1, so one per CPU "
        "with --processes 0)",
    )
    add_grace_option(parser, "--maintenance-grace")
    parser.add_argument(
        "--maintenance-verify",
        action="store_true",
        help="check each repository with git fsck --connectivity-only before maintaining it; damage "
        "is logged and counted as result=broken (default: off)",
    )


def start_maintenance(
    args: argparse.Namespace, backend: GitBackend, root: str
) -> Callable[[], Awaitable[None]]:
    """Give ``backend`` the scheduler the options ask for, and measure ``root``'s size for the metrics.

    With the scheduler, receive-pack's own ``git gc --auto`` is off (see
    :func:`~gittornado.maintenance.without_auto_gc`).

    Returns what stops both at shutdown.
    """
    if not args.no_maintenance:
        # In place: the config and advertisement caches run git with this same environment.
        backend.base_env.update(without_auto_gc(backend.base_env))
        settings = MaintenanceSettings(
            grace=args.maintenance_grace,
            verify=args.maintenance_verify,
            git=backend.git,
            env=backend.base_env,
        )
        backend.maintenance = MaintenanceScheduler(
            settings, args.maintenance_delay, args.maintenance_jobs, backend.metrics
        )
    measuring = None
    if backend.metrics is not None:
        measuring = asyncio.ensure_future(report_disk_usage(root, backend.metrics))

    async def stop() -> None:
        if measuring is not None:
            measuring.cancel()
        if backend.maintenance is not None:
            await backend.maintenance.close()

    return stop


def maintain_parser() -> argparse.ArgumentParser:
    """The command line of ``gittornado maintain``."""
    parser = argparse.ArgumentParser(
        prog="gittornado maintain",
        description="Run the maintenance gittornado runs after pushes (repack with a multi-pack index and "
        "bitmaps, commit-graph, packed refs, pruning) on some or all repositories, now.",
    )
    parser.add_argument("repositories", nargs="*", metavar="REPO", help="repository names below --gitbase")
    parser.add_argument("--all", action="store_true", help="every repository below --gitbase")
    parser.add_argument("--gitbase", default=".", help="directory holding the repositories (default: .)")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="check each repository with git fsck --connectivity-only first; a broken one is reported "
        "(and not repacked), and the exit status is 1",
    )
    parser.add_argument("--full-fsck", action="store_true", help="with --verify, run a full git fsck")
    parser.add_argument(
        "--full",
        action="store_true",
        help="repack fully now, dropping expired unreachable objects "
        f"(default: once every {DEFAULT_FULL_INTERVAL / 3600:g} hours)",
    )
    add_grace_option(parser, "--grace")
    return parser


def maintain_command(argv: List[str]) -> int:
    """``gittornado maintain``: exit status 0 when every repository is fine, 1 otherwise."""
    parser = maintain_parser()
    args = parser.parse_args(argv)
    root = os.path.realpath(args.gitbase)
    if not os.path.isdir(root):
        parser.error(f"--gitbase {args.gitbase}: not a directory")
    if args.all == bool(args.repositories):
        parser.error("name repositories, or --all")
    git_dirs = list(find_repositories(root)) if args.all else []
    for name in args.repositories:
        found = resolve_repository(root, name)
        if found is None:
            parser.error(f"{name}: no such repository below {root}")
        git_dirs.append(found.path)
    settings = MaintenanceSettings(
        grace=args.grace,
        full_interval=0 if args.full else DEFAULT_FULL_INTERVAL,
        verify=args.verify,
        full_fsck=args.full_fsck,
        env=server_environment(),
    )
    status = 0
    for git_dir in git_dirs:
        name = os.path.relpath(git_dir, root)
        result = asyncio.run(maintain(git_dir, settings))
        if result == BROKEN:
            log.error("%s: broken (git fsck failed; see above)", name)
        elif result == FAILED:
            log.error("%s: maintenance failed (see above)", name)
        elif result == BUSY:
            log.info("%s: skipped, maintained by another process right now", name)
        else:
            log.info("%s: maintained", name)
        if result in (BROKEN, FAILED):
            status = 1
    return status


def backup_command(argv: List[str]) -> int:
    """``gittornado backup DEST``: exit status 0 when every repository was backed up, 1 otherwise."""
    parser = argparse.ArgumentParser(
        prog="gittornado backup",
        description="Write a consistent copy of every repository (a git bundle of all refs, the config, "
        "hooks and LFS objects) into DEST, while the server keeps serving.",
    )
    parser.add_argument("destination", metavar="DEST", help="directory to write the backup into")
    parser.add_argument("--gitbase", default=".", help="directory holding the repositories (default: .)")
    args = parser.parse_args(argv)
    root = os.path.realpath(args.gitbase)
    if not os.path.isdir(root):
        parser.error(f"--gitbase {args.gitbase}: not a directory")
    failed = back_up(root, os.path.abspath(args.destination), server_environment())
    return 1 if failed else 0


#: ``gittornado <name> ...`` runs ``SUBCOMMANDS[name](rest of the arguments)``, which returns the exit status.
SUBCOMMANDS: Dict[str, Callable[[List[str]], int]] = {
    "maintain": maintain_command,
    "backup": backup_command,
}


def run_subcommand(argv: List[str]) -> Optional[int]:
    """Run the subcommand ``argv`` names and return its exit status, or None if it names none."""
    if not argv or argv[0] not in SUBCOMMANDS:
        return None
    logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return SUBCOMMANDS[argv[0]](argv[1:])
