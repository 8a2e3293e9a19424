"""git's lock-file protocol: new content waits in ``<file>.lock``, made exclusively, then replaces the file.

Runs that change the same file take turns (none loses another's change), and
a reader opening the file at any moment reads either the old file or the new
one, never half of either: the new content is written into the lock, synced,
then renamed over the file, and the rename itself is synced.
"""

from __future__ import annotations

import os
import random
import stat
import time
from typing import Optional


class LockError(Exception):
    """The lock could not be taken: another run holds it, or it cannot be created (the message says which)."""


#: Seconds a run waits for another run's lock before giving up (``--wait``).
DEFAULT_LOCK_WAIT = 10.0


class LockFile:
    """git's lock-file protocol for one file: ``path``.lock holds the new content until it replaces ``path``.

    The lock is created with ``O_CREAT | O_EXCL``, so only one run holds it;
    another run retries for ``wait`` seconds, then gives up (:class:`LockError`)
    naming the lock and ``holder``, what takes such locks.
    A lock left by a run that died is reported, never removed here: only a
    person can tell it from a slow run.  Leaving the ``with`` block without
    :meth:`commit` removes the lock and leaves ``path`` as it was.
    """

    def __init__(self, path: str, wait: float = DEFAULT_LOCK_WAIT, holder: str = "process") -> None:
        self.path = path
        self.holder = holder
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
                    raise LockError(self._held_by_another()) from None
                time.sleep(random.uniform(0.01, 0.05))  # out of step with the other waiting runs
            except OSError as error:
                raise LockError(f"cannot create {self.lock}: {error}") from None

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
            f"{self.lock} exists{age}: another {self.holder} is changing {self.path}. "
            f"If none is running, one was interrupted: check {self.path}, then remove {self.lock}"
        )

    def commit(self, text: str) -> None:
        """Write ``text`` into the lock, sync it, and rename it over the file.

        The new file keeps the mode and owner of the one it replaces; a new
        file is readable by its owner only (users.ini holds password hashes).
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
