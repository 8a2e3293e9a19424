"""Replaying git's own ref advertisement while nothing it is made from has changed.

``GET info/refs?service=git-upload-pack`` is the most frequent request a git
server gets (every fetch, clone and ``ls-remote``, and CI systems poll it), and
starting git for it costs more than everything else the request does.  The
advertisement is a function of the repository's refs (``HEAD``, loose refs,
``packed-refs``, ``shallow``), its git config (hidden refs, capabilities) and
the protocol version the client asked for.  So the first request runs git as
usual, its answer is kept, and later requests get the same bytes for as long
as a ``stat`` of each of those files shows no change.  git still makes every
decision (hidden refs, capabilities); it only does not repeat one.

A repository state is trusted only when every file in it is at least
:data:`SETTLED` old.  File times have a coarse granularity, so a ref rewritten
twice within one tick could otherwise look unchanged (git's own index has the
same "racy" problem, solved the same way).  Right after a push, requests
simply run git again until the state has settled.

Not cached: receive-pack's advertisement (it may carry a per-request push
certificate nonce); repositories whose config turns on
``transfer.advertiseSID`` (a per-process id); repositories whose config
(their own or a global one) includes other files (``include.path``,
``includeIf``), which are not among the files watched; reftable repositories;
and answers over :data:`MAX_ANSWER` bytes or with more than
:data:`MAX_LOOSE_REFS` loose refs (``git gc`` packs them).
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from typing import List, Mapping, Optional, Tuple

from .repoconfig import GitConfig, Stamp, config_bool, file_stamp, global_config_files

#: Seconds every file of a repository state must have been left alone before the state is trusted.
SETTLED = 1.0
#: The largest advertisement kept (a repository with some thousands of refs).
MAX_ANSWER = 256 * 1024
#: Bytes kept for all repositories together; the least recently used go first.
MAX_TOTAL = 4 * 1024 * 1024
#: More loose refs than this, and the state is not worth its stat calls.
MAX_LOOSE_REFS = 2000

State = Tuple[Stamp, ...]


def repository_state(git_dir: str, config_files: List[str], settled: float = SETTLED) -> Optional[State]:
    """What the advertisement of ``git_dir`` is made from, or None when it must not be cached
    (also while any of its files changed less than ``settled`` seconds ago)."""
    if os.path.isdir(os.path.join(git_dir, "reftable")):
        return None
    stamps = [file_stamp(path) for path in config_files]
    names = ("config", "HEAD", "packed-refs", "shallow")
    stamps += [file_stamp(os.path.join(git_dir, name)) for name in names]
    directories = [os.path.join(git_dir, "refs")]
    while directories:
        try:
            entries = list(os.scandir(directories.pop()))
        except OSError:
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                directories.append(entry.path)
            else:
                stamps.append(file_stamp(entry.path, follow=False))
        if len(stamps) > MAX_LOOSE_REFS:
            return None
    recent = time.time_ns() - int(settled * 1e9)
    if any(max(stamp[3], stamp[4]) > recent for stamp in stamps):
        return None
    return tuple(stamps)


class AdvertisementCache:
    """Upload-pack advertisements by repository and protocol, each valid for one repository state.

    ``env`` locates the global git config files; ``settled`` is :data:`SETTLED`.
    """

    def __init__(self, env: Mapping[str, str] = os.environ, settled: float = SETTLED) -> None:
        self._config_files = global_config_files(env)
        self._settled = settled
        self._entries: OrderedDict[Tuple[str, str], Tuple[State, bytes]] = OrderedDict()
        self._total = 0

    def state(self, git_dir: str, config: GitConfig) -> Optional[State]:
        """The state to look up and store under, or None: run git and keep nothing."""
        if config_bool(config, "transfer.advertisesid", False):
            return None
        # A change in an included file (hidden refs, say) would go unseen.
        if any(key.startswith(("include.", "includeif.")) for key in config):
            return None
        return repository_state(git_dir, self._config_files, self._settled)

    def get(self, git_dir: str, protocol: str, state: State) -> Optional[bytes]:
        """git's answer for ``protocol`` in ``state``, if it was kept."""
        entry = self._entries.get((git_dir, protocol))
        if entry is None or entry[0] != state:
            return None
        self._entries.move_to_end((git_dir, protocol))
        return entry[1]

    def put(self, git_dir: str, protocol: str, state: State, recording: Recording) -> None:
        """Keep git's complete answer (``recording``) to a request made in ``state``."""
        answer = recording.answer()
        if answer is None:
            return
        old = self._entries.pop((git_dir, protocol), None)
        if old is not None:
            self._total -= len(old[1])
        self._entries[(git_dir, protocol)] = (state, answer)
        self._total += len(answer)
        while self._total > MAX_TOTAL:
            _, (_, dropped) = self._entries.popitem(last=False)
            self._total -= len(dropped)


class Recording:
    """Keeps a copy of an answer while it streams, up to :data:`MAX_ANSWER` bytes."""

    def __init__(self) -> None:
        self._pieces: List[bytes] = []
        self._size = 0

    def __call__(self, piece: memoryview) -> None:
        self._size += len(piece)
        if self._size <= MAX_ANSWER:
            self._pieces.append(bytes(piece))

    def answer(self) -> Optional[bytes]:
        """The whole answer, or None if it was too large to keep."""
        return b"".join(self._pieces) if self._size <= MAX_ANSWER else None
