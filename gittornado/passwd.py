"""The ``gittornado-passwd`` command: a user's password in users.ini (set, delete), and their tokens.

It changes the one line it must and leaves every other byte as it was
(comments, order, spacing, other sections, line endings), checks that the
result still loads, and replaces the file the way git replaces its own files:
``users.ini.lock`` is created exclusively, the new content written into it and
synced, then renamed over the file.  Runs at the same time therefore take
turns (none loses another's change), and a server reloading the file at any
moment reads either the old file or the new one, never half of either.
"""

from __future__ import annotations

import argparse
import getpass
import os
import random
import re
import stat
import sys
import time
from datetime import datetime, timedelta, timezone
from typing import Callable, List, Optional, TextIO, Tuple

from .passwords import (
    BCRYPT_MAX_BYTES,
    DEFAULT_COST,
    TOKEN_PREFIX,
    hash_password,
    hash_scheme,
    new_token,
    token_digest,
)
from .usersfile import (
    AccessFileError,
    IniLine,
    RepositoryRule,
    format_expiry,
    parse_access_file,
    split_ini_lines,
    valid_user_name,
)


class PasswdError(Exception):
    """Why the command changed nothing; printed as the command's error message."""


def set_entry(text: str, section: str, key: str, value: str) -> str:
    """Return users.ini ``text`` with ``key = value`` in ``[section]``.

    An existing line keeps its spacing and inline comment; a new key goes
    after the section's last entry (or its last comment), and a file without
    the section gets it appended.
    """
    lines = split_ini_lines(text)
    raw = text.split("\n")
    ending = "\r" if raw and raw[0].endswith("\r") else ""
    for line in lines:
        if line.section == section and line.key == key:
            start, end = line.value_span
            raw[line.number - 1] = line.text[:start] + value + line.text[end:]
            return "\n".join(raw)
    new_line = f"{key} = {value}{ending}"
    in_section = [line for line in lines if line.section == section and line.text.strip()]
    entries = [line for line in in_section if line.key]
    # After the last entry; in a section without entries, after its header and comments.
    anchor = entries[-1] if entries else in_section[-1] if in_section else None
    if anchor is not None:
        raw.insert(anchor.number, new_line)
        return "\n".join(raw)
    if text and not text.endswith("\n"):
        text += ending + "\n"
    separator = ending + "\n" if text.strip() else ""
    return f"{text}{separator}[{section}]{ending}\n{new_line}\n"


def set_user(text: str, user: str, hashed: str) -> str:
    """Return users.ini ``text`` with ``user``'s hash set to ``hashed`` (see :func:`set_entry`)."""
    return set_entry(text, "users", user, hashed)


def _without(text: str, doomed: Callable[[IniLine], bool]) -> str:
    """``text`` without the lines ``doomed`` picks; every other byte stays."""
    numbers = {line.number for line in split_ini_lines(text) if doomed(line)}
    return "\n".join(raw for number, raw in enumerate(text.split("\n"), start=1) if number not in numbers)


def delete_user(text: str, user: str) -> str:
    """Return ``text`` without ``user``'s [users] line(s) and tokens; PasswdError if there is no such user.

    Rules and group memberships naming the user stay: they grant nothing
    without a password, and they come back into force if the user is re-added.
    Tokens go: a user re-added later should not find old tokens working again.
    """
    if not any(line.section == "users" and line.key == user for line in split_ini_lines(text)):
        raise PasswdError(f"no user {user!r} in [users]")
    return _without(
        text,
        lambda line: (
            (line.section == "users" and line.key == user)
            or (line.section == "tokens" and line.value.split(None, 1)[:1] == [user])
        ),
    )


def revoke_token(text: str, token_id: str) -> str:
    """Return ``text`` without the [tokens] line of ``token_id``; PasswdError if there is none."""
    if not any(line.section == "tokens" and line.key == token_id for line in split_ini_lines(text)):
        raise PasswdError(f"no token {token_id!r} in [tokens]")
    return _without(text, lambda line: line.section == "tokens" and line.key == token_id)


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


#: Seconds a run waits for another run's lock before giving up (``--wait``).
DEFAULT_LOCK_WAIT = 10.0


class LockFile:
    """git's lock-file protocol for one file: ``path``.lock holds the new content until it replaces ``path``.

    The lock is created with ``O_CREAT | O_EXCL``, so only one run holds it;
    another run retries for ``wait`` seconds, then gives up naming the lock.
    A lock left by a run that died is reported, never removed here: only a
    person can tell it from a slow run.  Leaving the ``with`` block without
    :meth:`commit` removes the lock and leaves ``path`` as it was.
    """

    def __init__(self, path: str, wait: float = DEFAULT_LOCK_WAIT) -> None:
        self.path = path
        self.lock = f"{path}.lock"
        self.wait = wait
        self._fd: Optional[int] = None
        self._held = False

    def __enter__(self) -> LockFile:
        deadline = time.monotonic() + self.wait
        while True:
            try:
                self._fd = os.open(self.lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                self._held = True
                return self
            except FileExistsError:
                if time.monotonic() >= deadline:
                    raise PasswdError(self._held_by_another()) from None
                time.sleep(random.uniform(0.01, 0.05))  # out of step with the other waiting runs
            except OSError as error:
                raise PasswdError(f"cannot create {self.lock}: {error}") from None

    def __exit__(self, *exc_info: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._held:
            os.unlink(self.lock)
            self._held = False

    def _held_by_another(self) -> str:
        try:
            age = f" (made {time.time() - os.stat(self.lock).st_mtime:.0f} s ago)"
        except OSError:
            age = ""
        return (
            f"{self.lock} exists{age}: another gittornado-passwd is changing {self.path}. "
            f"If none is running, one was interrupted: check {self.path}, then remove {self.lock}"
        )

    def commit(self, text: str) -> None:
        """Write ``text`` into the lock, sync it, and rename it over the file.

        The new file keeps the mode and owner of the one it replaces; a new
        file is readable by its owner only, as it holds password hashes.
        """
        assert self._fd is not None, "commit() outside the with block"
        fd, self._fd = self._fd, None
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                pass
            else:
                os.fchmod(f.fileno(), stat.S_IMODE(st.st_mode))
                try:
                    os.fchown(f.fileno(), st.st_uid, st.st_gid)
                except PermissionError:
                    pass  # not root: the file is ours already
            os.fsync(f.fileno())
        os.rename(self.lock, self.path)
        self._held = False
        dir_fd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)


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

    def add_token(text: str) -> Tuple[str, str]:
        lines = split_ini_lines(text)
        if not any(line.section == "users" and line.key == args.user for line in lines):
            raise PasswdError(f"no user {args.user!r} in [users]: set a password first")
        if any(line.section == "tokens" and line.key == token_id for line in lines):
            raise PasswdError("the new token's id is taken (a one in 2**48 chance): run the command again")
        line = f"{args.user} {token_digest(token.encode('ascii'))} {expires} {scope}"
        return set_entry(text, "tokens", token_id, line), (
            f"Created token {token_id} for user {args.user} ({scope}), expires {expires}. "
            "It is shown only now: keep it in your CI's secret store; users.ini keeps only its hash"
        )

    message = _edit(args, add_token)
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
    with LockFile(path, args.wait) as lock:
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
