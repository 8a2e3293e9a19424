"""The ``gittornado-passwd`` command: set or delete a user's password in users.ini.

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
import stat
import sys
import time
from typing import List, Optional, TextIO

from .passwords import BCRYPT_MAX_BYTES, DEFAULT_COST, hash_password, hash_scheme
from .usersfile import AccessFileError, parse_access_file, split_ini_lines, valid_user_name


class PasswdError(Exception):
    """Why the command changed nothing; printed as the command's error message."""


def set_user(text: str, user: str, hashed: str) -> str:
    """Return users.ini ``text`` with ``user``'s hash set to ``hashed``.

    An existing [users] line keeps its spacing and inline comment; a new user
    goes after the last user in [users] (or its last comment), and a file
    without [users] gets the section appended.
    """
    lines = split_ini_lines(text)
    raw = text.split("\n")
    ending = "\r" if raw and raw[0].endswith("\r") else ""
    for line in lines:
        if line.section == "users" and line.key == user:
            start, end = line.value_span
            raw[line.number - 1] = line.text[:start] + hashed + line.text[end:]
            return "\n".join(raw)
    new_line = f"{user} = {hashed}{ending}"
    in_users = [line for line in lines if line.section == "users" and line.text.strip()]
    entries = [line for line in in_users if line.key]
    # After the last user; in a section without users, after its header and comments.
    anchor = entries[-1] if entries else in_users[-1] if in_users else None
    if anchor is not None:
        raw.insert(anchor.number, new_line)
        return "\n".join(raw)
    if text and not text.endswith("\n"):
        text += ending + "\n"
    separator = ending + "\n" if text.strip() else ""
    return f"{text}{separator}[users]{ending}\n{new_line}\n"


def delete_user(text: str, user: str) -> str:
    """Return ``text`` without ``user``'s [users] line(s); PasswdError if there is none.

    Rules and group memberships naming the user stay: they grant nothing
    without a password, and they come back into force if the user is re-added.
    """
    doomed = {line.number for line in split_ini_lines(text) if line.section == "users" and line.key == user}
    if not doomed:
        raise PasswdError(f"no user {user!r} in [users]")
    return "\n".join(raw for number, raw in enumerate(text.split("\n"), start=1) if number not in doomed)


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
        description="Set a user's password (bcrypt) in a gittornado users.ini, or delete the user. "
        "The password is asked twice on a terminal, or read as one line from standard input.",
        epilog="Every other line, comment and section of FILE stays as it was. "
        "A running gittornado picks the change up within seconds.",
    )
    parser.add_argument("file", metavar="FILE", help="the users.ini to edit (created if missing)")
    parser.add_argument("user", metavar="USER", help="the user name")
    parser.add_argument("-D", "--delete", action="store_true", help="delete USER instead")
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


def run(args: argparse.Namespace, stdin: TextIO) -> str:
    """Do what ``args`` ask; return the message to print.  Raises PasswdError."""
    if not valid_user_name(args.user):
        raise PasswdError(
            f"{args.user!r} is not a valid user name (no spaces or = : ; # [ ] , and not * or @...)"
        )
    # Hashed before the lock is taken: bcrypt is slow, the lock is held only to edit.
    hashed = None if args.delete else hash_password(read_password(stdin), args.cost)
    # Edit the file a symlink points to, not replace the link.
    path = os.path.realpath(args.file)
    with LockFile(path, args.wait) as lock:
        text = _read(path, args.file, missing_ok=hashed is not None)
        # A byte-order mark some editors write is kept, outside the lines being edited.
        bom = "\ufeff" if text.startswith("\ufeff") else ""
        text = text[len(bom) :]
        if hashed is None:
            text, message = delete_user(text, args.user), f"Deleted user {args.user}"
        else:
            exists = any(line.section == "users" and line.key == args.user for line in split_ini_lines(text))
            text = set_user(text, args.user, hashed)
            message = f"{'Updated' if exists else 'Added'} password for user {args.user}"
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
