"""What the pack-objects hook does with one request: send an entry, follow its writer, write it, or run git.

:func:`serve` answers a request of git's ``uploadpack.packObjectsHook``
(:mod:`gittornado.packhook`) from the cache directory described in
:mod:`gittornado.packfiles`.  Nothing lives in one process's memory, so the
hooks of every worker process and of every host sharing the directory
cooperate.  A cache that cannot be written (disk full, permissions) serves the
fetch uncached, never fails it.

The hook imports this module on every fetch, so it imports only a few cheap
standard modules at the top (see :mod:`gittornado.packhook` for the cost).
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
import time
import zlib

from .packfiles import (
    CHUNK,
    MAGIC,
    REQUEST_ENV,
    TRAILER,
    Entry,
    HookSettings,
    cache_key,
    count,
    pack_length,
    send_range,
    unlink_if_same,
    verified_length,
    write_link,
    writer_alive,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, List, Optional, Tuple

#: How often a follower that has caught up with a live writer looks again.
FOLLOW_POLL = 0.005
#: signal.SIGKILL (the signal module imports enum: 3 ms on every fetch).
_SIGKILL = 9
#: fcntl's F_SETPIPE_SZ (Linux), and the pipe size asked for (that of gittornado.sizes.STDOUT_PIPE_SIZE).
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
OUTPUT_PIPE_SIZE = 1 << 20


def widen_output() -> None:
    """Give the pipe to upload-pack 1 MiB (git makes it 64 KiB), as the server does for upload-pack's own.

    Packs come faster than upload-pack reads them (an entry with
    ``sendfile``), and a small pipe wakes both for every 64 KiB: a repeated
    280 MiB clone took 0.40 s instead of 0.29 s.
    """
    try:
        fcntl.fcntl(1, _F_SETPIPE_SZ, OUTPUT_PIPE_SIZE)
    except OSError:  # not a pipe, or the kernel refuses this user more pipe memory: it still works
        pass


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is out."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def offer(fd: int, start: int, end: int) -> Tuple[int, bool]:
    """Send bytes ``start:end`` of ``fd`` to git as far as its pipe takes them without waiting.

    Returns where sending stopped, and False if git's pipe broke (the client is gone).
    """
    try:
        while start < end:
            start += os.sendfile(1, fd, start, end - start)
    except BlockingIOError:
        pass
    except OSError:
        return start, False
    return start, True


def deliver(fd: int, start: int, end: int) -> bool:
    """Send bytes ``start:end`` of ``fd`` to git, waiting as needed; False if its pipe broke."""
    try:
        send_range(fd, start, end)
    except OSError:
        return False
    return True


def deliver_piece(piece: bytes) -> bool:
    """Send ``piece`` to git, waiting as needed; False if its pipe broke."""
    try:
        write_all(1, piece)
    except OSError:
        return False
    return True


class Fetch:
    """One pack-objects request the hook answers: from an entry, by following a writer, or by git."""

    def __init__(self, argv: List[str], stdin: bytes, env: Dict[str, str], settings: HookSettings) -> None:
        self.argv = argv
        self.stdin = stdin
        self.env = env
        self.settings = settings
        git_dir = os.path.realpath(env.get("GIT_DIR", "."))
        self.key = cache_key(argv[1:], stdin, git_dir, settings.salt, env)
        self.entry = Entry(settings.directory, self.key)

    def link(self) -> None:
        """The entry exists (complete or growing): let the server find it for the next identical request.

        Not before: requests waiting for this link try the entry at once.
        """
        request = self.env.get(REQUEST_ENV)
        if request:
            write_link(self.settings.directory, request, self.key)

    def serve(self) -> int:
        """Answer the request; the exit status for git."""
        widen_output()
        try:
            os.makedirs(self.entry.folder, exist_ok=True)
        except OSError:
            return self.uncached(error=True)
        for _ in range(3):  # a writer may finish, appear or die between the looks
            for attempt in (self.hit, self.follow):
                status = attempt()
                if status is not None:
                    return status
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
            self.link()
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
        if writer_alive(fd):
            self.link()
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

        Each piece goes to the cache file first, and to git only as fast as
        git takes it without blocking (the rest follows from the file), so a
        slow client of the writer never holds back the entry, nor so its
        followers.  If the cache cannot be written (disk full, the entry would
        pass the size limit), the writer drops the entry and goes on serving
        its own client.
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
        self.link()
        pid, out = self.spawn(capture=True)
        assert out is not None
        caching, client_ok, length, delivered, crc = True, True, 0, 0, 0
        os.set_blocking(1, False)
        try:
            while True:
                piece = os.read(out, CHUNK)
                if not piece:
                    break
                if caching:
                    try:
                        if length + len(piece) > self.settings.max_entry_bytes:
                            raise OSError(errno.EFBIG, "entry over the size limit")
                        write_all(fd, piece)
                        length += len(piece)
                        crc = zlib.crc32(piece, crc)
                    except OSError:  # from now on, straight to git: first what it has not had yet
                        caching = False
                        os.set_blocking(1, True)
                        client_ok = client_ok and deliver(fd, delivered, length) and deliver_piece(piece)
                        self.drop(fd, temporary)
                        fd = -1
                        continue
                    if client_ok:
                        delivered, client_ok = offer(fd, delivered, length)
                elif client_ok:
                    client_ok = deliver_piece(piece)
        finally:
            os.close(out)
            os.set_blocking(1, True)
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
            fcntl.flock(fd, fcntl.LOCK_UN)  # followers see the trailer
            count(self.settings.directory, misses=1, written_bytes=length + TRAILER.size)
        if fd >= 0 and client_ok:
            client_ok = deliver(fd, delivered, length)  # what git has not had yet
        if not (caching and status == 0):  # followers fall back to pack-objects of their own
            self.drop(fd, temporary)
            count(self.settings.directory, misses=1, errors=int(cache_error))
        elif fd >= 0:
            os.close(fd)
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
