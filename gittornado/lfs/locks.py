"""LFS file locks, kept on disk in each repository: one file per locked path.

A lock is the file ``<git dir>/lfs/locks/<sha256 of the path>``, holding the
lock as JSON; its id is that hash.  It is written in full to a temporary file
and then linked to its name, which fails when the name exists: taking a lock
is atomic, between the ``--processes`` workers of one server and between
hosts on shared storage, and a reader never sees half a lock.  Nothing is
held in memory, so locks survive restarts.

:func:`locked_paths` is the read side a pre-receive check uses.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Dict, List, Optional

#: Longest path that may be locked (git itself has no limit; 4096 is PATH_MAX).
MAX_PATH_LENGTH = 4096
#: The most of a lock file read: its path in JSON's escapes takes up to 12 bytes a character (emoji).
MAX_LOCK_FILE = 12 * MAX_PATH_LENGTH + 2**16
#: Tries to take a path's lock file while it keeps being removed under us (or cannot be read).
LINK_TRIES = 100


@dataclass(frozen=True)
class Lock:
    """One lock, in the fields the locking API sends (``owner`` is the user's name)."""

    id: str
    path: str
    locked_at: str
    owner: str

    def as_api(self) -> Dict[str, object]:
        """The lock as the API's JSON shows it."""
        return {"id": self.id, "path": self.path, "locked_at": self.locked_at, "owner": {"name": self.owner}}


class LockExists(Exception):
    """The path is locked already; :attr:`lock` is the lock that holds it."""

    def __init__(self, lock: Lock) -> None:
        super().__init__(lock.path)
        self.lock = lock


def valid_lock_path(path: object) -> bool:
    """Whether ``path`` may be locked: a non-empty string, without NUL, of sane length."""
    return isinstance(path, str) and 0 < len(path) <= MAX_PATH_LENGTH and "\0" not in path


def lock_id(path: str) -> str:
    """The id (and file name) of the lock on ``path``."""
    return hashlib.sha256(path.encode(errors="surrogatepass")).hexdigest()


class LockStore:
    """The locks of the repository whose git directory is ``git_dir``."""

    def __init__(self, git_dir: str) -> None:
        self.directory = os.path.join(git_dir, "lfs", "locks")

    def _file(self, id: str) -> Optional[str]:
        if len(id) != 64 or any(c not in "0123456789abcdef" for c in id):
            return None  # no id of ours, so no file name to build from it
        return os.path.join(self.directory, id)

    def get(self, id: str) -> Optional[Lock]:
        """The lock with ``id``, or None."""
        name = self._file(id)
        return _read(name) if name else None

    def all(self) -> List[Lock]:
        """Every lock, ordered by path."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        locks = (_read(os.path.join(self.directory, name)) for name in names if len(name) == 64)
        return sorted((lock for lock in locks if lock is not None), key=lambda lock: lock.path)

    def create(self, path: str, owner: str) -> Lock:
        """Lock ``path`` for ``owner``; :class:`LockExists` if someone holds it already."""
        id = lock_id(path)
        now = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
        lock = Lock(id=id, path=path, locked_at=now, owner=owner)
        os.makedirs(self.directory, exist_ok=True)
        final = os.path.join(self.directory, id)
        temporary = f"{final}.{secrets.token_hex(8)}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, json.dumps(asdict(lock)).encode())
            os.fsync(fd)
            os.close(fd)
            for _ in range(LINK_TRIES):
                try:
                    os.link(temporary, final)
                    return lock
                except FileExistsError:
                    existing = _read(final)
                    if existing is not None:
                        raise LockExists(existing) from None
                    # unlocked between our link and our read: try again
            raise OSError(f"the lock file {final} exists but cannot be read")
        finally:
            os.unlink(temporary)

    def delete(self, lock: Lock) -> bool:
        """Remove ``lock``, if it is still the one on its path; whether it was removed.

        The lock file is renamed away first (atomic), then checked: one that
        was replaced meanwhile by someone else's lock is put back.
        """
        final = os.path.join(self.directory, lock.id)
        taken = f"{final}.{secrets.token_hex(8)}.unlock"
        try:
            os.rename(final, taken)
        except FileNotFoundError:
            return False
        try:
            if _read(taken) == lock:
                return True
            try:
                os.link(taken, final)
            except FileExistsError:
                pass
            return False
        finally:
            os.unlink(taken)


def _read(name: str) -> Optional[Lock]:
    try:
        with open(name, "rb") as f:
            fields = json.loads(f.read(MAX_LOCK_FILE))
        return Lock(**fields)
    except (OSError, ValueError, TypeError):
        return None


def has_locks(repository_path: str) -> bool:
    """Whether the repository whose git directory is ``repository_path`` has any lock (one directory read)."""
    try:
        with os.scandir(os.path.join(repository_path, "lfs", "locks")) as entries:
            return any(len(entry.name) == 64 for entry in entries)
    except OSError:
        return False


def locked_paths(repository_path: str) -> Dict[str, str]:
    """Every locked path of the repository whose git directory is ``repository_path``, with its owner.

    For a pre-receive check that refuses pushes changing files locked by
    someone else.
    """
    return {lock.path: lock.owner for lock in LockStore(repository_path).all()}
