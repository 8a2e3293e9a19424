"""The ``gittornado-passwd`` command: a user's password in users.ini (set, delete), and their tokens.

It changes the one line it must and leaves every other byte as it was
(comments, order, spacing, other sections, line endings), checks that the
result still loads, and replaces the file the way git replaces its own files:
``users.ini.lock`` is created exclusively, the new content written into it and
synced, then renamed over the file.  Runs at the same time therefore take
turns (none loses another's change), and a server reloading the file at any
moment reads either the old file or the new one, never half of either.
The edits are :mod:`gittornado.usersedit`'s, the lock :mod:`gittornado.lockfile`'s.
"""

from __future__ import annotations

import argparse
import getpass
import os
import re
import sys
from datetime import datetime, timedelta, timezone
from typing import Callable, List, Optional, TextIO, Tuple

from .lockfile import DEFAULT_LOCK_WAIT, LockError, LockFile
from .passwords import (
    BCRYPT_MAX_BYTES,
    DEFAULT_COST,
    TOKEN_PREFIX,
    hash_password,
    hash_scheme,
    new_token,
    token_digest,
)

# set_entry and set_user are re-exported for old imports (``from gittornado.passwd import set_user``),
# as are PasswdError, LockFile and DEFAULT_LOCK_WAIT, which this module uses: they all lived here once.
from .usersedit import (  # noqa: F401
    PasswdError,
    add_token,
    delete_user,
    revoke_token,
    set_entry,
    set_user,
)
from .usersfile import (
    AccessFileError,
    RepositoryRule,
    format_expiry,
    parse_access_file,
    split_ini_lines,
    valid_user_name,
)

_DURATION = re.compile(r"(\d+)([hdw])")
_UNITS = {"h": timedelta(hours=1), "d": timedelta(days=1), "w": timedelta(weeks=1)}


def parse_expiry(text: str, now: Optional[datetime] = None) -> datetime:
    """When a token made ``now`` expires: ``90d``, ``12h``, ``2w`` from now, or a UTC date ``2027-03-01``."""
    now = now or datetime.now(timezone.utc)
    match = _DURATION.fullmatch(text.strip().lower())
    try:
        if match:
            when = now + int(match.group(1)) * _UNITS[match.group(2)]
        else:
            when = datetime.strptime(text.strip(), "%Y-%m-%d").replace(tzinfo=timezone.utc)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(
            f"not an expiry: {text!r} (examples: 90d, 12h, 2w, 2027-03-01)"
        ) from None
    if when <= now:
        raise argparse.ArgumentTypeError(f"{text!r} is not in the future")
    return when.replace(microsecond=0)


def read_password(stdin: TextIO) -> str:
    """The new password: asked twice on a terminal, else one line of ``stdin`` (for scripts)."""
    if stdin.isatty():
        password = getpass.getpass("New password: ")
        if getpass.getpass("Re-type new password: ") != password:
            raise PasswdError("the passwords do not match")
    else:
        line = stdin.readline()
        if not line:
            raise PasswdError("no password on standard input")
        password = line.rstrip("\n").rstrip("\r")
    if not password:
        raise PasswdError("the password is empty")
    if len(password.encode("utf-8")) > BCRYPT_MAX_BYTES:
        raise PasswdError(f"the password is longer than bcrypt's {BCRYPT_MAX_BYTES} bytes")
    if password.startswith(TOKEN_PREFIX):
        raise PasswdError(f"a password may not start with {TOKEN_PREFIX!r}, which marks tokens")
    return password


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gittornado-passwd",
        description="Set a user's password (bcrypt) in a gittornado users.ini, or delete the user;\n"
        "create, list and revoke the user's tokens (passwords for CI and scripts, scoped and expiring).\n"
        "The password is asked twice on a terminal, or read as one line from standard input.",
        epilog="Every other line, comment and section of FILE stays as it was.\n"
        "A running gittornado picks the change up within seconds.\n\n"
        "examples:\n"
        "  gittornado-passwd users.ini alice\n"
        "  gittornado-passwd --new-token --scope 'team/*' --right rw --expires 90d users.ini alice\n"
        "  gittornado-passwd --list-tokens users.ini alice\n"
        "  gittornado-passwd --revoke-token 3f9a1c2b7d4e users.ini",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("file", metavar="FILE", help="the users.ini to edit (created if missing)")
    parser.add_argument("user", metavar="USER", nargs="?", help="the user name")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("-D", "--delete", action="store_true", help="delete USER and USER's tokens instead")
    action.add_argument(
        "--new-token",
        action="store_true",
        help="create a token for USER (for CI and scripts: the HTTP password, with USER's name) and print "
        "it once on standard output; users.ini keeps only its SHA-256",
    )
    action.add_argument(
        "--list-tokens", action="store_true", help="list the tokens of USER (of everyone without USER)"
    )
    action.add_argument("--revoke-token", metavar="ID", help="delete token ID (as --list-tokens shows it)")
    token = parser.add_argument_group("--new-token options")
    token.add_argument(
        "--scope",
        action="append",
        metavar="PATTERN",
        help="a repository the token may be used for, as in [access] (team/*, proj.git); repeat for more",
    )
    token.add_argument(
        "--right", choices=("r", "rw"), default="r", help="read only, or read and push (default: r)"
    )
    token.add_argument(
        "--expires",
        type=parse_expiry,
        default="90d",
        metavar="WHEN",
        help="90d, 12h, 2w from now, or a date 2027-03-01 (UTC) (default: 90d)",
    )
    parser.add_argument(
        "-C",
        "--cost",
        type=int,
        default=DEFAULT_COST,
        choices=range(4, 32),
        metavar="COST",
        help=f"bcrypt cost, 4 to 31 (default: {DEFAULT_COST}); each step doubles the time",
    )
    parser.add_argument(
        "--wait",
        type=float,
        default=DEFAULT_LOCK_WAIT,
        metavar="SECONDS",
        help=f"how long to wait while another run changes FILE (default: {DEFAULT_LOCK_WAIT:g})",
    )
    return parser


def run(args: argparse.Namespace, stdin: TextIO, stdout: TextIO = sys.stdout) -> str:
    """Do what ``args`` ask; return the message to print.  Raises PasswdError.

    What is the command's output (a new token, a token list) goes to ``stdout``.
    """
    if args.list_tokens:
        return list_tokens(args, stdout)
    if args.revoke_token is not None:
        if args.user is not None:
            raise PasswdError("--revoke-token takes the token's ID, not a user")
        return _edit(
            args, lambda text: (revoke_token(text, args.revoke_token), f"Revoked token {args.revoke_token}")
        )
    if args.user is None:
        raise PasswdError("which user? (gittornado-passwd FILE USER)")
    if not valid_user_name(args.user):
        raise PasswdError(
            f"{args.user!r} is not a valid user name (no spaces or = : ; # [ ] , and not * or @...)"
        )
    if args.new_token:
        return _new_token(args, stdout)
    if args.delete:
        return _edit(args, lambda text: (delete_user(text, args.user), f"Deleted user {args.user}"))
    # Hashed before the lock is taken: bcrypt is slow, the lock is held only to edit.
    hashed = hash_password(read_password(stdin), args.cost)

    def set_password(text: str) -> Tuple[str, str]:
        exists = any(line.section == "users" and line.key == args.user for line in split_ini_lines(text))
        message = f"{'Updated' if exists else 'Added'} password for user {args.user}"
        return set_user(text, args.user, hashed), message

    return _edit(args, set_password, missing_ok=True)


def _new_token(args: argparse.Namespace, stdout: TextIO) -> str:
    """Add a token line for ``args.user``, print the token once, return what was made."""
    if not args.scope:
        raise PasswdError("--new-token needs at least one --scope PATTERN (--scope '*' for every repository)")
    try:
        rules = [RepositoryRule.parse(f"{pattern}={args.right}") for pattern in args.scope]
    except ValueError as error:
        raise PasswdError(f"--scope: {error}") from None
    if any("," in rule.pattern for rule in rules):
        raise PasswdError("--scope: a pattern cannot contain a comma")
    scope = ", ".join(f"{rule.pattern}={args.right}" for rule in rules)
    expires = format_expiry(args.expires)
    token_id, token = new_token()

    def add(text: str) -> Tuple[str, str]:
        line = f"{args.user} {token_digest(token.encode('ascii'))} {expires} {scope}"
        return add_token(text, token_id, args.user, line), (
            f"Created token {token_id} for user {args.user} ({scope}), expires {expires}. "
            "It is shown only now: keep it in your CI's secret store; users.ini keeps only its hash"
        )

    message = _edit(args, add)
    print(token, file=stdout, flush=True)  # only once the file holds it
    return message


def list_tokens(args: argparse.Namespace, stdout: TextIO) -> str:
    """Print id, user, expiry and scope of the tokens (of ``args.user``), never a token or hash."""
    text = _read(os.path.realpath(args.file), args.file, missing_ok=False)
    try:
        rules = parse_access_file(text.lstrip("\ufeff"), args.file, hash_scheme)
    except AccessFileError as error:
        raise PasswdError(str(error)) from None
    now = datetime.now(timezone.utc)
    tokens = [token for token in rules.tokens.values() if args.user in (None, token.user)]
    for token in sorted(tokens, key=lambda token: (token.user, token.expires)):
        state = "EXPIRED" if token.expired(now) else "expires"
        print(f"{token.id}  {token.user}  {state} {format_expiry(token.expires)}  {token.scope}", file=stdout)
    return f"{len(tokens)} token{'' if len(tokens) == 1 else 's'}"


def _edit(
    args: argparse.Namespace, change: Callable[[str], Tuple[str, str]], missing_ok: bool = False
) -> str:
    """Apply ``change`` (text -> new text, message) to FILE under its lock, if the result loads."""
    # Edit the file a symlink points to, not replace the link.
    path = os.path.realpath(args.file)
    try:
        with LockFile(path, args.wait, holder="gittornado-passwd") as lock:
            text = _read(path, args.file, missing_ok=missing_ok)
            # A byte-order mark some editors write is kept, outside the lines being edited.
            bom = "\ufeff" if text.startswith("\ufeff") else ""
            text, message = change(text[len(bom) :])
            try:
                parse_access_file(text, args.file, hash_scheme)
            except AccessFileError as error:
                raise PasswdError(f"not changed, the file would not load: {error}") from None
            try:
                lock.commit(bom + text)
            except OSError as error:
                raise PasswdError(f"{args.file}: {error}") from None
    except LockError as error:  # taken by another run, or not creatable
        raise PasswdError(str(error)) from None
    return message


def _read(path: str, name: str, missing_ok: bool) -> str:
    """The file's text; empty for a missing file when ``missing_ok`` (it is being created)."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except FileNotFoundError:
        if missing_ok:
            return ""
        raise PasswdError(f"{name}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise PasswdError(f"{name}: {error}") from None


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point of the ``gittornado-passwd`` command."""
    args = build_parser().parse_args(argv)
    try:
        message = run(args, sys.stdin)
    except PasswdError as error:
        raise SystemExit(f"gittornado-passwd: {error}") from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    print(message, file=sys.stderr)


if __name__ == "__main__":
    main()
