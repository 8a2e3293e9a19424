"""The pack-objects cache, the server's side: how upload-pack runs the hook, eviction, statistics.

Identical fetches of an unchanged repository share one pack on disk.  A CI
fleet that starts 30 jobs at once makes 30 identical clones; without a cache
each runs its own ``git pack-objects``.  With ``--pack-cache DIR``,
gittornado runs upload-pack with ``-c uploadpack.packObjectsHook=<hook>``
(:meth:`PackCache.upload_pack_setup`; git honours that key only from the
command line or system/global config, never from a repository's), so git runs
the hook (:mod:`gittornado.packhook`) instead of pack-objects, with the same
arguments and standard input, and the hook answers through
:func:`gittornado.packentry.serve`.  The directory's files are described in
:mod:`gittornado.packfiles`.

The hook is a Python program, and its start costs about 7 ms.  Most fetches
are a client's own (its ``have`` lines are nobody else's) and bring a small
pack, so for them the hook would cost more than it could ever save.  So the
server looks at each fetch request before it starts upload-pack
(:meth:`PackCache.use_hook`): a clone (no ``have``) always goes through the
hook, since clones are what storms are made of and their packs are the
expensive ones; a fetch with ``have`` lines goes through it only from its
``min_requests``-th identical request on (GitLab's lesson: caching from the
second sighting halves the disk writes and loses few hits).  Its first
sighting costs what it costs without a cache.

A request seen before in the same repository state may not need git at all:
the server names such requests (:meth:`PackCache.request_key`), the hook
links the name to its entry, and :mod:`gittornado.packreply` answers the next
one from the entry.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shlex
import subprocess
import sys
import time
from typing import Callable, Dict, List, Mapping, Optional, Set, Tuple

from .packfiles import REQUEST_ENV, STALE_WRITE, Entry, HookSettings, read_counters, writer_alive
from .packfiles import TRAILER as TRAILER  # re-exported: tests read entries with it

#: Defaults of ``--pack-cache-max-size`` and ``--pack-cache-max-age``.
DEFAULT_MAX_BYTES = 5 * 1024**3
DEFAULT_MAX_AGE = 600.0
#: The most of a fetch request the server reads before it starts upload-pack, to choose
#: (:meth:`PackCache.use_hook`).  A longer one (a clone of thousands of refs) uses the hook.
SCANNED_REQUEST = 64 * 1024
#: How often the requests waiting for a leader (:meth:`PackCache.leader`) look for its link.
LEADER_POLL = 0.005
#: Capability lines that differ between identical requests from different clients.
_CLIENT_LINES = (b"agent=", b"session-id=")
#: The words of a v2 fetch whose answer is only a pack (see :meth:`PackCache.request_key`).
_PLAIN_FETCH = frozenset(
    (
        b"object-format=sha1",
        b"have",
        b"done",
        b"thin-pack",
        b"no-progress",
        b"include-tag",
        b"ofs-delta",
        b"filter",
    )
)


class PackCache:
    """The server's side of the cache: how upload-pack runs the hook, eviction, statistics.

    ``directory`` holds the entries (created if missing; may be shared by
    several processes and hosts).  Entries older than ``max_age`` seconds
    go, then the oldest until all take at most ``max_bytes``; a key is cached
    from its ``min_requests``-th request on (clones from their first, see
    the module docstring).  :meth:`tidy` does this and counts what is on
    disk; :meth:`keep_tidy` runs it every few seconds.
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
        self.directory = os.path.realpath(directory)
        os.makedirs(os.path.join(self.directory, "stats"), exist_ok=True)
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.min_requests = min_requests
        # Another git may write other packs for the same input.
        version = subprocess.run([git, "--version"], capture_output=True, text=True, env=env).stdout.strip()
        self.settings = HookSettings(self.directory, max_bytes, version)
        hook = os.path.join(os.path.dirname(os.path.abspath(__file__)), "packhook.py")
        # -I -S: no site packages and not the gittornado package (Tornado): see packhook.
        self.hook = f"{shlex.quote(sys.executable)} -I -S {shlex.quote(hook)}"
        # Requests (by request_key) that have started git in this process, until their link appears
        # or their git ends: identical ones arriving meanwhile wait for that, not start git too.
        self._leaders: Dict[str, asyncio.Future[None]] = {}
        self._releasing: Set[asyncio.Task[None]] = set()
        #: Entries and bytes on disk at the last :meth:`tidy`.
        self.entries = 0
        self.disk_bytes = 0

    def upload_pack_setup(self, request_key: Optional[str] = None) -> Tuple[List[str], Dict[str, str]]:
        """The ``-c`` options and environment variables that make upload-pack use the cache.

        With ``request_key`` (:meth:`request_key`), the hook links that
        request to its entry, for :mod:`gittornado.packreply`.
        """
        env = self.settings.environment()
        if request_key is not None:
            env[REQUEST_ENV] = request_key
        return ["-c", f"uploadpack.packObjectsHook={self.hook}"], env

    def use_hook(self, git_dir: str, namespace: str, lines: List[bytes]) -> bool:
        """Whether upload-pack should run the hook for the fetch request of ``lines``
        (:func:`pkt_lines`; see the module docstring).

        A request longer than :data:`SCANNED_REQUEST` is not looked at, and
        always uses the hook.  A request that packs nothing (a negotiation
        round, ``ls-refs``) never starts the hook, whatever this says.  A
        fetch with ``have`` lines is counted here, in a ``.seen`` file of the
        cache directory, so every process and host that shares it counts.
        """
        # With haves, whether git packs is up to it (protocol v2 sends the pack after "ready", without
        # "done"), so every such request counts.
        if not any(line.startswith(b"have ") for line in lines):
            return True
        if self.min_requests <= 1:
            return True
        seen = Entry(
            self.directory, _request_digest(b"gittornado request 1", (git_dir, namespace), lines)
        ).seen
        try:
            os.makedirs(os.path.dirname(seen), exist_ok=True)
            fd = os.open(seen, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, b".")
                return os.fstat(fd).st_size >= self.min_requests
            finally:
                os.close(fd)
        except OSError:
            return False  # cannot count, so cannot cache: as without a cache

    def request_key(
        self, git_dir: str, state: Optional[object], protocol: str, lines: List[bytes]
    ) -> Optional[str]:
        """The key under which the answer to the fetch request of ``lines`` (:func:`pkt_lines`) may be
        sent again without git, or None.

        Only a protocol v2 clone or fetch that says ``done`` and asks for
        nothing but objects qualifies: upload-pack's whole answer to it is then
        ``packfile``, the pack in sideband pkt-lines, and a flush
        (:mod:`gittornado.packreply` rebuilds it).  ``state`` is the
        repository's state as the advertisement cache sees it
        (:meth:`gittornado.adverts.AdvertisementCache.state`; None while a ref
        or the config changed a moment ago, and then nothing qualifies), so a
        ref change or a config change makes a new key.  Every wanted object
        must be a ref's tip: what no ref points to may be pruned later, and
        must then be refused, as upload-pack would.
        """
        if (
            state is None
            or "version=2" not in protocol.split(":")
            or not lines
            or lines[0] != b"command=fetch"
        ):
            return None
        if b"done" not in lines:
            return None
        wants = set()
        for line in lines[1:]:
            word, _, value = line.partition(b" ")
            if word == b"want":
                wants.add(value)
            elif word not in _PLAIN_FETCH and not line.startswith(_CLIENT_LINES):
                return None
        tips = _ref_tips(git_dir)
        if not wants or tips is None or not wants <= tips:
            return None
        return _request_digest(
            b"gittornado reply 1", (self.settings.salt, git_dir, protocol, repr(state)), lines
        )

    def leader(self, request_key: str) -> Optional[asyncio.Future[None]]:
        """The wait of an identical request that has started git in this process, or None (then this
        one leads, and must call :meth:`led`).

        A storm's requests all arrive before the first one's hook has linked
        its entry; without this, each would start upload-pack and follow the
        entry through its own hook.
        """
        waiting = self._leaders.get(request_key)
        if waiting is None:
            self._leaders[request_key] = asyncio.get_running_loop().create_future()
        return waiting

    def led(self, request_key: str, running: Callable[[], bool]) -> None:
        """The leader of ``request_key`` has started git (``running`` says while it runs), or failed to:
        release the requests waiting for it once the link appears, or git has ended."""
        task = asyncio.ensure_future(self._release_when_linked(request_key, running))
        self._releasing.add(task)  # a task nothing refers to may be collected before it ends
        task.add_done_callback(self._releasing.discard)

    async def _release_when_linked(self, request_key: str, running: Callable[[], bool]) -> None:
        link = Entry(self.directory, request_key).link
        try:
            while running() and not os.path.exists(link):
                await asyncio.sleep(LEADER_POLL)
        finally:
            waiting = self._leaders.pop(request_key)
            if not waiting.done():
                waiting.set_result(None)

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
                elif not item.name.endswith((".seen", ".link")) or age > self.max_age:
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
        loop = asyncio.get_running_loop()
        while True:
            await loop.run_in_executor(None, self.tidy)
            await asyncio.sleep(interval)


def _request_digest(kind: bytes, parts: Tuple[str, ...], lines: List[bytes]) -> str:
    """A request's key: ``parts`` and its pkt-lines, less what differs between identical clients' requests."""
    digest = hashlib.sha256(kind + b"\0")
    for part in parts:
        digest.update(part.encode("utf-8", "surrogateescape") + b"\0")
    for line in lines:
        if not line.startswith(_CLIENT_LINES):
            digest.update(b"%d:%s" % (len(line), line))
    return digest.hexdigest()


def pkt_lines(data: bytes) -> List[bytes]:
    """The payloads of the pkt-lines in ``data``, without their newline, up to anything else."""
    lines = []
    position = 0
    while position + 4 <= len(data):
        try:
            length = int(data[position : position + 4], 16)
        except ValueError:
            break
        if length < 4:  # flush, delimiter, response-end
            position += 4
            continue
        lines.append(data[position + 4 : position + length].rstrip(b"\n"))
        position += length
    return lines


def _ref_tips(git_dir: str) -> Optional[Set[bytes]]:
    """The object ids that ``HEAD``, ``packed-refs`` and the loose refs point to (peeled tags too);
    None where they cannot all be read."""
    tips: Set[bytes] = set()
    try:
        with open(os.path.join(git_dir, "packed-refs"), "rb") as f:
            for line in f:
                if line[:1] != b"#":
                    tips.add(line.lstrip(b"^")[:40])
    except FileNotFoundError:
        pass
    except OSError:
        return None
    files = [os.path.join(git_dir, "HEAD")]
    directories = [os.path.join(git_dir, "refs")]
    while directories:
        try:
            with os.scandir(directories.pop()) as entries:
                for entry in entries:
                    (directories if entry.is_dir(follow_symlinks=False) else files).append(entry.path)
        except OSError:
            return None
    for path in files:
        try:
            with open(path, "rb") as f:
                tips.add(f.read(40))
        except OSError:
            return None
    return tips


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
