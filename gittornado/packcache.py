"""The pack-objects cache: identical fetches of an unchanged repository share one pack on disk.

A CI fleet that starts 30 jobs at once makes 30 identical clones; without a
cache each runs its own ``git pack-objects``.  With ``--pack-cache DIR``,
gittornado runs upload-pack with ``-c uploadpack.packObjectsHook=<hook>``
(:meth:`PackCache.upload_pack_setup`; git honours that key only from the
command line or system/global config, never from a repository's), so git runs
the hook (:mod:`gittornado.packhook`) instead of pack-objects, with the same
arguments and standard input, and the hook calls :func:`serve`.

Files in the cache directory, by key (see :func:`cache_key`), under
``<first two hex digits>/``:

* ``<key>.pack``: a complete entry, the pack followed by a :data:`TRAILER`
  (magic, length, CRC-32), published by an atomic rename;
* ``<key>.part``: an entry being written, a second name of the writer's
  temporary file ``<key>.<pid>-<random>.tmp``, on which the writer holds an
  exclusive ``flock``.  Requests arriving meanwhile follow it as it grows.  A
  follower that finds the lock released without a trailer knows the writer
  died and runs pack-objects itself (see :meth:`Fetch.rerun`);
* ``<key>.seen``: one byte per request seen; a key is cached from request
  ``min_requests`` on (GitLab's lesson: caching on the second sighting halves
  the disk writes and loses few hits);
* ``stats/<host>``: the hooks' counters, summed by :meth:`PackCache.statistics`.

Nothing lives in one process's memory, so the hooks of every worker process
and of every host sharing the directory cooperate.  A cache that cannot be
written (disk full, permissions) serves the fetch uncached, never fails it.

The hook imports this module on every fetch, so it imports only a few cheap
standard modules at the top (see :mod:`gittornado.packhook` for the cost).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import sys
import time
import zlib

try:  # the builtin module: hashlib would load OpenSSL, about 3 ms on every fetch
    from _sha256 import sha256
except ImportError:  # pragma: no cover - Python 3.12 renamed it
    from hashlib import sha256

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, List, Mapping, Optional, Tuple

#: Environment variables gittornado gives upload-pack (and so the hook).
DIR_ENV = "GITTORNADO_PACK_CACHE"
LIMITS_ENV = "GITTORNADO_PACK_CACHE_LIMITS"
SALT_ENV = "GITTORNADO_PACK_CACHE_SALT"

#: After the pack: magic, the pack's length and its CRC-32.  Its presence marks a complete entry.
TRAILER = struct.Struct(">8sQI")
MAGIC = b"gtpack\x00\x01"
#: Bytes moved per read or write.
CHUNK = 1 << 20
#: How often a follower that has caught up with a live writer looks again.
FOLLOW_POLL = 0.005
#: An unlocked temporary or growing file this old belongs to a writer that died.
STALE_WRITE = 60.0
#: The hooks' counters, in the order they are stored in ``stats/<host>``.
COUNTERS = ("hits", "misses", "served_bytes", "written_bytes", "errors")
_COUNTER_FILE = struct.Struct(">8Q")
#: signal.SIGKILL (the signal module imports enum: 3 ms on every fetch).
_SIGKILL = 9


class HookSettings:
    """What the hook needs from the server, read from its environment."""

    def __init__(self, directory: str, min_requests: int, max_entry_bytes: int, salt: str) -> None:
        self.directory = directory
        self.min_requests = min_requests
        self.max_entry_bytes = max_entry_bytes
        self.salt = salt

    def environment(self) -> Dict[str, str]:
        """The variables that carry these settings to the hook."""
        limits = f"{self.min_requests},{self.max_entry_bytes}"
        return {DIR_ENV: self.directory, LIMITS_ENV: limits, SALT_ENV: self.salt}

    @classmethod
    def from_environment(cls, env: Mapping[str, str]) -> Optional[HookSettings]:
        """The settings gittornado passed, or None (no cache: run pack-objects as it is)."""
        directory = env.get(DIR_ENV)
        try:
            min_requests, max_entry_bytes = (int(n) for n in env.get(LIMITS_ENV, "").split(","))
        except ValueError:
            return None
        return cls(directory, min_requests, max_entry_bytes, env.get(SALT_ENV, "")) if directory else None


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
        self.seen = self.base + ".seen"

    def temporary(self) -> str:
        """A name no other writer uses."""
        return f"{self.base}.{os.getpid()}-{os.urandom(4).hex()}.tmp"


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is out."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


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


class Fetch:
    """One pack-objects request the hook answers: from an entry, by following a writer, or by git."""

    def __init__(self, argv: List[str], stdin: bytes, env: Dict[str, str], settings: HookSettings) -> None:
        self.argv = argv
        self.stdin = stdin
        self.env = env
        self.settings = settings
        git_dir = os.path.realpath(env.get("GIT_DIR", "."))
        self.entry = Entry(settings.directory, cache_key(argv[1:], stdin, git_dir, settings.salt, env))

    def serve(self) -> int:
        """Answer the request; the exit status for git."""
        try:
            os.makedirs(self.entry.folder, exist_ok=True)
        except OSError:
            return self.uncached(error=True)
        counted = False
        for _ in range(3):  # a writer may finish, appear or die between the looks
            for attempt in (self.hit, self.follow):
                status = attempt()
                if status is not None:
                    return status
            if not counted:
                counted = True
                if self.first_sighting():
                    return self.uncached()
            status = self.write()
            if status is not None:
                return status
        return self.uncached()

    def hit(self) -> Optional[int]:
        """Send the complete entry, or None if there is none (a corrupt one is removed)."""
        try:
            fd = os.open(self.entry.complete, os.O_RDONLY)
        except OSError:
            return None
        try:
            try:
                length = verified_length(fd)
            except OSError:
                length = None
            if length is None:  # truncated, altered or unreadable: never sent, removed
                unlink_if_same(self.entry.complete, fd)
                count(self.settings.directory, errors=1)
                return None
            send_range(fd, 0, length)
        except OSError:
            return 128  # git's pipe broke: the client is gone
        finally:
            os.close(fd)
        count(self.settings.directory, hits=1, served_bytes=length)
        return 0

    def follow(self) -> Optional[int]:
        """Stream the entry being written as it grows; None if there is no live one to follow.

        The last :data:`TRAILER`-size bytes seen are held back until the writer
        is done, as they may be the trailer.
        """
        try:
            fd = os.open(self.entry.growing, os.O_RDONLY)
        except OSError:
            return None
        sent = 0
        try:
            while True:
                ready = os.fstat(fd).st_size - TRAILER.size
                if ready > sent:
                    send_range(fd, sent, ready)
                    sent = ready
                elif writer_alive(fd):
                    time.sleep(FOLLOW_POLL)
                else:
                    break
            length = pack_length(fd)  # the writer is done: finished, or died
            if length is None:
                if sent == 0:  # nothing sent yet: clear the dead writer's file, start afresh
                    unlink_if_same(self.entry.growing, fd)
                    return None
                return self.rerun(fd, sent)
            send_range(fd, sent, length)
        except OSError:
            return 128
        finally:
            os.close(fd)
        count(self.settings.directory, hits=1, served_bytes=length)
        return 0

    def first_sighting(self) -> bool:
        """Count this request for its key; True while the key has been asked for too few times."""
        if self.settings.min_requests <= 1:
            return False
        try:
            fd = os.open(self.entry.seen, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, b".")
                return os.fstat(fd).st_size < self.settings.min_requests
            finally:
                os.close(fd)
        except OSError:
            return True  # cannot count, so cannot cache

    def spawn(self, capture: bool) -> Tuple[int, Optional[int]]:
        """Start pack-objects with our standard input; its output on a pipe if ``capture``, else ours.

        Cached runs (``capture``) are single-threaded, so that a rerun after a
        writer died produces the same bytes (see :meth:`rerun`).
        """
        argv = self.argv + ["--threads=1"] if capture else self.argv
        in_r, in_w = os.pipe()
        actions = [(os.POSIX_SPAWN_DUP2, in_r, 0)]
        out_r = out_w = None
        if capture:
            out_r, out_w = os.pipe()
            actions.append((os.POSIX_SPAWN_DUP2, out_w, 1))
        try:
            pid = os.posix_spawnp(argv[0], argv, self.env, file_actions=actions)
        finally:
            os.close(in_r)
            if out_w is not None:
                os.close(out_w)
        try:  # pack-objects reads all of it before it writes anything
            write_all(in_w, self.stdin)
        except BrokenPipeError:
            pass
        finally:
            os.close(in_w)
        return pid, out_r

    def uncached(self, error: bool = False) -> int:
        """Run pack-objects straight to git, as without a cache."""
        pid, _ = self.spawn(capture=False)
        count(self.settings.directory, misses=1, errors=int(error))
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    def write(self) -> Optional[int]:
        """Run pack-objects, sending its pack to git and into a new entry; None if another writer won.

        Each piece goes to the cache file first, so followers never wait for
        this writer's client.  If the cache cannot be written (disk full, the
        entry would pass the size limit), the writer drops the entry and goes
        on serving its own client.
        """
        entry = self.entry
        try:
            temporary = entry.temporary()
            fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError:
            return self.uncached(error=True)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.link(temporary, entry.growing)
        except OSError as error:
            os.close(fd)
            os.unlink(temporary)
            return None if isinstance(error, FileExistsError) else self.uncached(error=True)
        pid, out = self.spawn(capture=True)
        assert out is not None
        caching, client_ok, length, crc = True, True, 0, 0
        try:
            while True:
                piece = os.read(out, CHUNK)
                if not piece:
                    break
                if caching:
                    try:
                        length += len(piece)
                        if length > self.settings.max_entry_bytes:
                            raise OSError(errno.EFBIG, "entry over the size limit")
                        write_all(fd, piece)
                        crc = zlib.crc32(piece, crc)
                    except OSError:
                        caching = False
                        self.drop(fd, temporary)
                        fd = -1
                if client_ok:
                    try:
                        write_all(1, piece)
                    except OSError:  # the client is gone; finish the entry for the others
                        client_ok = False
        finally:
            os.close(out)
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        cache_error = not caching
        if caching and status == 0:
            try:
                write_all(fd, TRAILER.pack(MAGIC, length, crc))
                os.fdatasync(fd)
                os.rename(temporary, entry.complete)
            except OSError:
                caching, cache_error = False, True
        if caching and status == 0:
            unlink_if_same(entry.growing, fd)
            os.close(fd)  # releases the lock: followers see the trailer
            count(self.settings.directory, misses=1, written_bytes=length + TRAILER.size)
        else:  # followers fall back to pack-objects of their own
            self.drop(fd, temporary)
            count(self.settings.directory, misses=1, errors=int(cache_error))
        return status if client_ok else 128

    def drop(self, fd: int, temporary: str) -> None:
        """Give up the entry being written: remove its names, release the lock (followers fall back)."""
        if fd < 0:
            return
        unlink_if_same(self.entry.growing, fd)
        unlink_if_same(temporary, fd)
        os.close(fd)

    def rerun(self, fd: int, sent: int) -> int:
        """The writer died after ``sent`` bytes went to git: run pack-objects, and send what follows them.

        A single-threaded pack-objects of an unchanged repository writes the
        same bytes again; they are compared with those sent, so the client
        never gets a pack spliced from two different ones (if they differ, the
        fetch fails and the client may retry).
        """
        pid, out = self.spawn(capture=True)
        assert out is not None
        position, matched = 0, True
        try:
            while True:
                piece = os.read(out, CHUNK)
                if not piece:
                    break
                if position < sent:
                    overlap = min(len(piece), sent - position)
                    if os.pread(fd, overlap, position) != piece[:overlap]:
                        matched = False
                        os.kill(pid, _SIGKILL)
                        break
                    position += overlap
                    piece = piece[overlap:]
                if piece:
                    write_all(1, piece)
                    position += len(piece)
        finally:
            os.close(out)
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        count(self.settings.directory, misses=1, errors=1)
        if not matched or position < sent:
            sys.stderr.write("gittornado: the pack cache's writer died and its pack could not be resumed\n")
            return 128
        return status


def serve(argv: List[str], stdin: bytes, env: Dict[str, str], settings: HookSettings) -> int:
    """Answer one ``git pack-objects`` request (``argv``, ``stdin``) for git; the exit status."""
    return Fetch(argv, stdin, env, settings).serve()


#: Defaults of ``--pack-cache-max-size`` and ``--pack-cache-max-age``.
DEFAULT_MAX_BYTES = 5 * 1024**3
DEFAULT_MAX_AGE = 600.0


class PackCache:
    """The server's side of the cache: how upload-pack runs the hook, eviction, statistics.

    ``directory`` holds the entries (created if missing; may be shared by
    several processes and hosts).  Entries older than ``max_age`` seconds
    go, then the oldest until all take at most ``max_bytes``; a key is cached
    from its ``min_requests``-th request on.  :meth:`tidy` does this and
    counts what is on disk; :meth:`keep_tidy` runs it every few seconds.
    """

    def __init__(
        self,
        directory: str,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_age: float = DEFAULT_MAX_AGE,
        min_requests: int = 2,
        git: str = "git",
        env: Optional[Mapping[str, str]] = None,
    ) -> None:
        import shlex
        import subprocess

        self.directory = os.path.realpath(directory)
        os.makedirs(os.path.join(self.directory, "stats"), exist_ok=True)
        self.max_bytes = max_bytes
        self.max_age = max_age
        # Another git may write other packs for the same input.
        version = subprocess.run([git, "--version"], capture_output=True, text=True, env=env).stdout.strip()
        self.settings = HookSettings(self.directory, min_requests, max_bytes, version)
        hook = os.path.join(os.path.dirname(os.path.abspath(__file__)), "packhook.py")
        # -I -S: no site packages and not the gittornado package (Tornado): see packhook.
        self.hook = f"{shlex.quote(sys.executable)} -I -S {shlex.quote(hook)}"
        #: Entries and bytes on disk at the last :meth:`tidy`.
        self.entries = 0
        self.disk_bytes = 0

    def upload_pack_setup(self) -> Tuple[List[str], Dict[str, str]]:
        """The ``-c`` options and environment variables that make upload-pack use the cache."""
        return ["-c", f"uploadpack.packObjectsHook={self.hook}"], self.settings.environment()

    def statistics(self) -> Dict[str, int]:
        """Hits, misses, bytes served from and written to the cache, errors, entries and bytes on disk."""
        return {**read_counters(self.directory), "entries": self.entries, "disk_bytes": self.disk_bytes}

    def tidy(self) -> None:
        """Evict old and excess entries, remove dead writers' files and old marks, count the rest."""
        now = time.time()
        entries: List[Tuple[float, int, str]] = []
        others = 0
        for folder in _scan(self.directory):
            if len(folder.name) != 2 or not folder.is_dir(follow_symlinks=False):
                continue
            for item in _scan(folder.path):
                try:
                    st = item.stat(follow_symlinks=False)
                except OSError:
                    continue
                age = now - st.st_mtime
                if item.name.endswith(".pack") and age <= self.max_age:
                    entries.append((st.st_mtime, st.st_size, item.path))
                elif item.name.endswith((".part", ".tmp")) and (age < STALE_WRITE or _locked(item.path)):
                    others += st.st_size
                elif not item.name.endswith(".seen") or age > self.max_age:
                    _remove(item.path)
        entries.sort()
        total = sum(size for _, size, _ in entries)
        while entries and total > self.max_bytes:
            _, size, path = entries.pop(0)
            _remove(path)
            total -= size
        self.entries, self.disk_bytes = len(entries), total + others

    async def keep_tidy(self, interval: float = 10.0) -> None:
        """Run :meth:`tidy` in a thread every ``interval`` seconds, until cancelled."""
        import asyncio

        loop = asyncio.get_running_loop()
        while True:
            await loop.run_in_executor(None, self.tidy)
            await asyncio.sleep(interval)


def _scan(path: str) -> List[os.DirEntry]:
    try:
        with os.scandir(path) as items:
            return list(items)
    except OSError:
        return []


def _locked(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        return writer_alive(fd)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
