"""The pack cache's files, shared by the hook and the server: settings, keys, entries, counters.

Files in the cache directory, by key (see :func:`cache_key`), under
``<first two hex digits>/``:

* ``<key>.pack``: a complete entry, the pack followed by a :data:`TRAILER`
  (magic, length, CRC-32), published by an atomic rename;
* ``<key>.part``: an entry being written, a second name of the writer's
  temporary file ``<key>.<pid>-<random>.tmp``, on which the writer holds an
  exclusive ``flock``.  Requests arriving meanwhile follow it as it grows.  A
  follower that finds the lock released without a trailer knows the writer
  died and runs pack-objects itself (see :meth:`gittornado.packentry.Fetch.rerun`);
* ``<request key>.seen``: one byte per sighting of one fetch request, kept
  by the server (:meth:`gittornado.packcache.PackCache.use_hook`), which
  runs the hook only for clones and for fetches seen ``min_requests`` times;
* ``<request key>.link``: the key of the entry that answers one fetch
  request in one repository state (written by the hook when the server
  names the request, read by the server: :mod:`gittornado.packreply`);
* ``stats/<host>``: the hooks' counters (:func:`count`), summed by :func:`read_counters`.

The hook imports this module on every fetch, so it imports only a few cheap
standard modules at the top (see :mod:`gittornado.packhook` for the cost).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import zlib

try:  # the builtin module: hashlib would load OpenSSL, about 3 ms on every fetch
    from _sha256 import sha256
except ImportError:  # pragma: no cover - Python 3.12 renamed it
    from hashlib import sha256

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, List, Mapping, Optional

#: Environment variables gittornado gives upload-pack (and so the hook).
DIR_ENV = "GITTORNADO_PACK_CACHE"
LIMITS_ENV = "GITTORNADO_PACK_CACHE_LIMITS"
SALT_ENV = "GITTORNADO_PACK_CACHE_SALT"
#: The server's key of the request being answered, when it may be answered again without git.
REQUEST_ENV = "GITTORNADO_PACK_CACHE_REQUEST"

#: After the pack: magic, the pack's length and its CRC-32.  Its presence marks a complete entry.
TRAILER = struct.Struct(">8sQI")
MAGIC = b"gtpack\x00\x01"
#: Bytes moved per read or write.
CHUNK = 1 << 20
#: An unlocked temporary or growing file this old belongs to a writer that died.
STALE_WRITE = 60.0
#: The hooks' counters, in the order they are stored in ``stats/<host>``.
COUNTERS = ("hits", "misses", "served_bytes", "written_bytes", "errors")
_COUNTER_FILE = struct.Struct(">8Q")


class HookSettings:
    """What the hook needs from the server, read from its environment."""

    def __init__(self, directory: str, max_entry_bytes: int, salt: str) -> None:
        self.directory = directory
        self.max_entry_bytes = max_entry_bytes
        self.salt = salt

    def environment(self) -> Dict[str, str]:
        """The variables that carry these settings to the hook."""
        return {DIR_ENV: self.directory, LIMITS_ENV: str(self.max_entry_bytes), SALT_ENV: self.salt}

    @classmethod
    def from_environment(cls, env: Mapping[str, str]) -> Optional[HookSettings]:
        """The settings gittornado passed, or None (no cache: run pack-objects as it is)."""
        directory = env.get(DIR_ENV)
        try:
            max_entry_bytes = int(env.get(LIMITS_ENV, ""))
        except ValueError:
            return None
        return cls(directory, max_entry_bytes, env.get(SALT_ENV, "")) if directory else None


def repository_state(git_dir: str, include_tags: bool) -> bytes:
    """What besides pack-objects' input decides its output, as bytes to hash.

    The config (pack settings), the shallow file, and with ``--include-tag``
    the tags (which annotated tags go along is not in the input).  Stat data,
    not contents: any rewrite changes them.
    """
    paths = [os.path.join(git_dir, "config"), os.path.join(git_dir, "shallow")]
    if include_tags:
        paths.append(os.path.join(git_dir, "packed-refs"))
        for folder, _, files in os.walk(os.path.join(git_dir, "refs", "tags")):
            paths += (os.path.join(folder, name) for name in sorted(files))
    state = []
    for path in paths:
        try:
            st = os.stat(path)
            state.append(f"{path} {st.st_ino} {st.st_size} {st.st_mtime_ns}")
        except OSError:
            state.append(f"{path} -")
    return "\n".join(state).encode("utf-8", "surrogateescape")


def cache_key(args: List[str], stdin: bytes, git_dir: str, salt: str, env: Mapping[str, str]) -> str:
    """The entry of one pack-objects run: equal keys mean equal packs.

    ``args`` and ``stdin`` are pack-objects' (the wanted and excluded objects,
    shallow boundaries, filters); ``git_dir`` is the repository's real path;
    ``salt`` is git's version; the ``-c`` options git passes down count too.
    A ref change changes the wanted objects, so the key.
    """
    digest = sha256(b"gittornado pack cache 1\0")
    for part in (salt, git_dir, env.get("GIT_CONFIG_PARAMETERS", ""), "\0".join(args)):
        digest.update(part.encode("utf-8", "surrogateescape") + b"\0")
    digest.update(repository_state(git_dir, "--include-tag" in args) + b"\0")
    digest.update(stdin)
    return digest.hexdigest()


class Entry:
    """The file names of one key in a cache directory."""

    def __init__(self, directory: str, key: str) -> None:
        self.folder = os.path.join(directory, key[:2])
        self.base = os.path.join(self.folder, key)
        self.complete = self.base + ".pack"
        self.growing = self.base + ".part"
        # These two are a request key's (the server's), not a pack key's.
        self.seen = self.base + ".seen"
        self.link = self.base + ".link"

    def temporary(self) -> str:
        """A name no other writer uses."""
        return f"{self.base}.{os.getpid()}-{os.urandom(4).hex()}.tmp"


def write_link(directory: str, request_key: str, pack_key: str) -> None:
    """Record that ``pack_key``'s entry answers the server's request ``request_key`` (atomically)."""
    if len(request_key) != 64 or request_key.strip("0123456789abcdef"):
        return  # not a key the server made: never a path
    link = Entry(directory, request_key)
    temporary = link.temporary()
    try:
        os.makedirs(link.folder, exist_ok=True)
        with open(temporary, "w") as f:
            f.write(pack_key)
        os.rename(temporary, link.link)
    except OSError:  # the server then asks git, as without it
        try:
            os.unlink(temporary)
        except OSError:
            pass


def read_link(directory: str, request_key: str) -> Optional[str]:
    """The pack key :func:`write_link` recorded for ``request_key``, if any."""
    try:
        with open(Entry(directory, request_key).link) as f:
            key = f.read(65)
    except OSError:
        return None
    return key if len(key) == 64 else None


def pack_length(fd: int) -> Optional[int]:
    """The pack's length if the file ends in a valid trailer (a complete entry), else None."""
    size = os.fstat(fd).st_size
    if size < TRAILER.size:
        return None
    magic, length, _ = TRAILER.unpack(os.pread(fd, TRAILER.size, size - TRAILER.size))
    return length if magic == MAGIC and length == size - TRAILER.size else None


def verified_length(fd: int) -> Optional[int]:
    """:func:`pack_length`, once the CRC-32 shows the pack is as written (not truncated, not altered)."""
    length = pack_length(fd)
    if length is None:
        return None
    crc = 0
    for offset in range(0, length, CHUNK):
        crc = zlib.crc32(os.pread(fd, min(CHUNK, length - offset), offset), crc)
    return length if crc == TRAILER.unpack(os.pread(fd, TRAILER.size, length))[2] else None


def writer_alive(fd: int) -> bool:
    """Whether the writer still holds its lock on the entry ``fd`` is open on."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def unlink_if_same(path: str, fd: int) -> None:
    """Remove ``path`` if it still names the file ``fd`` is open on (not a newer one)."""
    try:
        here, there = os.stat(path), os.fstat(fd)
        if (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino):
            os.unlink(path)
    except OSError:
        pass


def send_range(fd: int, start: int, end: int, out: int = 1) -> None:
    """Copy bytes ``start:end`` of ``fd`` to ``out`` (sendfile: no copy through Python)."""
    while start < end:
        try:
            sent = os.sendfile(out, fd, start, min(end - start, 1 << 30))
        except OSError as error:
            if error.errno not in (errno.EINVAL, errno.ENOSYS):
                raise
            sent = os.write(out, os.pread(fd, min(end - start, CHUNK), start))
        if sent == 0:
            raise OSError(errno.EIO, "cache entry shrank while being sent")
        start += sent


def count(directory: str, **amounts: int) -> None:
    """Add to this host's counters in ``stats/`` (read-modify-write under a lock); never fails."""
    try:
        fd = os.open(os.path.join(directory, "stats", os.uname().nodename), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        old = os.pread(fd, _COUNTER_FILE.size, 0)
        values = list(_COUNTER_FILE.unpack(old)) if len(old) == _COUNTER_FILE.size else [0] * 8
        for name, amount in amounts.items():
            values[COUNTERS.index(name)] += amount
        os.pwrite(fd, _COUNTER_FILE.pack(*values), 0)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_counters(directory: str) -> Dict[str, int]:
    """The counters of every host that shares ``directory``, summed."""
    totals = dict.fromkeys(COUNTERS, 0)
    try:
        files = os.scandir(os.path.join(directory, "stats"))
    except OSError:
        return totals
    with files:
        for item in files:
            try:
                with open(item.path, "rb") as f:
                    data = f.read(_COUNTER_FILE.size)
            except OSError:
                continue
            if len(data) == _COUNTER_FILE.size:
                for name, value in zip(COUNTERS, _COUNTER_FILE.unpack(data)):
                    totals[name] += value
    return totals
