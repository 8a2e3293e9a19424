"""Where LFS objects live: the :class:`ObjectStore` interface, and files in the repository.

:class:`RepositoryObjectStore` keeps objects content-addressed inside each
repository's git directory, laid out as git-lfs itself lays them out
(``lfs/objects/ab/cd/<oid>``), so a backup or a move of the repository
carries them.  An upload is written to a temporary file in ``lfs/tmp`` and
renamed into place only when it is complete and verified: a partial or wrong
object is never visible, and two uploads of one object both rename the same
content into place.

The handlers see only the interface: an object is read with
:meth:`StoredObject.read` at any position and written with
:meth:`ObjectUpload.write`, never through a file descriptor, so a store that
keeps objects elsewhere (an S3-compatible bucket) needs no change to them.
All of these methods may block (they touch files); the handlers call them
off the event loop.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
from abc import ABC, abstractmethod
from typing import Callable, Optional

from ..repos import Repository

#: An LFS object id as the API names it: SHA-256, lower-case hex.
OID = re.compile(r"[0-9a-f]{64}")

#: errnos that mean the storage is full, not that the server is broken: answered 507.
FULL = frozenset((errno.ENOSPC, errno.EDQUOT, errno.EFBIG))


def valid_oid(oid: object) -> bool:
    """Whether ``oid`` is a SHA-256 object id (64 lower-case hex digits), safe to use in a path."""
    return isinstance(oid, str) and OID.fullmatch(oid) is not None


class StorageFull(Exception):
    """The object could not be stored for lack of space (or quota); nothing of it was kept."""


class StoredObject(ABC):
    """One stored object, opened for reading."""

    #: The object's size in bytes.
    size: int

    @abstractmethod
    def read(self, position: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``position`` (fewer only at the end); a download with ``Range``
        starts anywhere."""

    @abstractmethod
    def close(self) -> None:
        """Done reading."""


class ObjectUpload(ABC):
    """One object being written; invisible until :meth:`commit`."""

    @abstractmethod
    def write(self, data: memoryview) -> None:
        """Append ``data``; :class:`StorageFull` when there is no room.

        ``data`` is a view of a buffer the caller fills again once this returns: a store that keeps
        bytes beyond the call (to send them in parts) copies them.
        """

    @abstractmethod
    def commit(self) -> None:
        """Make the object visible under its oid, atomically (the caller has checked size and hash)."""

    @abstractmethod
    def abort(self) -> None:
        """Forget everything written; safe to call twice, or after :meth:`commit`."""


class ObjectStore(ABC):
    """The LFS objects of one repository."""

    @abstractmethod
    def size(self, oid: str) -> Optional[int]:
        """The stored object's size, or None when it is not stored."""

    def exists(self, oid: str) -> bool:
        """Whether the object is stored."""
        return self.size(oid) is not None

    @abstractmethod
    def open(self, oid: str) -> Optional[StoredObject]:
        """The stored object, opened for reading; None when it is not stored."""

    @abstractmethod
    def begin(self, oid: str, size: int) -> ObjectUpload:
        """Start writing object ``oid`` of ``size`` bytes; :class:`StorageFull` when there is no room."""


class RepositoryObjectStore(ObjectStore):
    """Objects as files under ``<git dir>/lfs``, as git-lfs keeps them in a clone."""

    def __init__(self, git_dir: str) -> None:
        self.objects = os.path.join(git_dir, "lfs", "objects")
        self.incoming = os.path.join(git_dir, "lfs", "tmp")

    @classmethod
    def for_repository(cls, repository: Repository) -> RepositoryObjectStore:
        """The default store factory of :class:`~gittornado.lfs.LfsServer`."""
        return cls(repository.path)

    def path(self, oid: str) -> str:
        """Where object ``oid`` lives; only a valid oid (:func:`valid_oid`), a plain name, is taken."""
        if not valid_oid(oid):
            raise ValueError("not an LFS object id")
        return os.path.join(self.objects, oid[0:2], oid[2:4], oid)

    def size(self, oid: str) -> Optional[int]:
        try:
            return os.stat(self.path(oid)).st_size
        except FileNotFoundError:
            return None

    def open(self, oid: str) -> Optional[StoredObject]:
        try:
            fd = os.open(self.path(oid), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            return _StoredFile(fd)
        except BaseException:
            os.close(fd)
            raise

    def begin(self, oid: str, size: int) -> ObjectUpload:
        final = self.path(oid)
        try:
            os.makedirs(self.incoming, exist_ok=True)
            name = os.path.join(self.incoming, f"{oid}-{secrets.token_hex(8)}")
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as error:
            if error.errno in FULL:
                raise StorageFull(str(error)) from None
            raise
        return _FileUpload(fd, name, final)


def _linux_sync_file_range() -> Optional[Callable[[int, int, int, int], int]]:
    """libc's ``sync_file_range`` (Python's ``os`` has no wrapper), or None where there is none."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    return function  # type: ignore[no-any-return]


_sync_file_range = _linux_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # start writeback, do not wait


def _write_behind(fd: int, offset: int, length: int) -> None:
    """Start writing ``length`` bytes at ``offset`` out to disk now, without waiting for it.

    Without it the kernel writes an upload out only when the commit's
    ``fsync`` asks: a gigabyte then costs a quarter of a second after the last
    byte arrived; with it, a few milliseconds.
    """
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


class _StoredFile(StoredObject):
    """An object's file, read with ``pread``: no file position shared between reads."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self.size = os.fstat(fd).st_size

    def read(self, position: int, length: int) -> bytes:
        return os.pread(self._fd, length, position)

    def close(self) -> None:
        os.close(self._fd)


class _FileUpload(ObjectUpload):
    """A temporary file in ``lfs/tmp``, renamed to its content's name on commit."""

    def __init__(self, fd: int, temporary: str, final: str) -> None:
        self._fd: Optional[int] = fd
        self._temporary = temporary
        self._final = final
        self._written = 0

    def write(self, data: memoryview) -> None:
        assert self._fd is not None
        try:
            written = 0
            while written < len(data):
                written += os.write(self._fd, data[written:])
            _write_behind(self._fd, self._written, len(data))
            self._written += len(data)
        except OSError as error:
            self.abort()
            if error.errno in FULL:
                raise StorageFull(str(error)) from None
            raise

    def commit(self) -> None:
        assert self._fd is not None
        try:
            # As git does for its own objects: the data is on disk before the name is.
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            os.makedirs(os.path.dirname(self._final), exist_ok=True)
            os.replace(self._temporary, self._final)  # the same content, if another upload won
        except OSError as error:
            self.abort()
            if error.errno in FULL:
                raise StorageFull(str(error)) from None
            raise

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        try:
            os.unlink(self._temporary)
        except FileNotFoundError:
            pass
