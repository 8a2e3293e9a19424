"""URL path -> repository directory, safely; per-repository git config.

Everything a client names is checked here before any file or git process is
touched.  A name that is malformed, or that would lead outside the root in any
way (``..``, absolute paths, backslashes, NUL, symlinks pointing out), resolves
to ``None``, which callers answer exactly like a missing repository.
"""

from __future__ import annotations

import asyncio
import functools
import os
import subprocess
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

#: Longest repository name accepted; longer names cannot be repositories anyway.
MAX_NAME_LENGTH = 1024


@dataclass(frozen=True)
class Repository:
    """A git directory that may be served.

    ``name`` is the path relative to the root as it exists on disk
    (``team/proj.git``); access rules are matched against it.  ``path`` is the
    absolute git directory (a bare repository, or a work tree's ``.git``).
    """

    name: str
    path: str


def _is_git_dir(path: str) -> bool:
    """What git itself checks first: HEAD, objects and refs are present."""
    return (
        os.path.isfile(os.path.join(path, "HEAD"))
        and os.path.isdir(os.path.join(path, "objects"))
        and os.path.isdir(os.path.join(path, "refs"))
    )


def _inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root + os.sep)


def clean_name(name: str) -> Optional[str]:
    """Return ``name`` if it is a well-formed relative repository path, else None."""
    if not name or len(name) > MAX_NAME_LENGTH or "\\" in name or "\0" in name:
        return None
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return None
    try:
        os.fsencode(name)
    except UnicodeEncodeError:
        # A lone surrogate ("\ud800") names no file; os.path.realpath would raise on it.
        return None
    return name


def resolve_repository(root: str, name: str) -> Optional[Repository]:
    """Find the repository called ``name`` under ``root``.

    ``proj`` and ``proj.git`` each find either directory; a non-bare
    repository is served from its ``.git``.  ``root`` must be a real path
    (symlinks resolved).
    """
    name = clean_name(name)
    if name is None:
        return None
    stem = name[:-4] if name.endswith(".git") else name
    for candidate in dict.fromkeys((name, stem + ".git", stem)):
        directory = os.path.realpath(os.path.join(root, candidate))
        if not _inside(root, directory):
            continue
        for git_dir in (directory, os.path.join(directory, ".git")):
            real = os.path.realpath(git_dir)
            if _inside(root, real) and _is_git_dir(real):
                return Repository(name=candidate, path=real)
    return None


class RepositoryRoot:
    """The default repository lookup: every git directory below one folder.

    Instances are callables, like any lookup an embedder may pass instead.
    """

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)

    def __call__(self, name: str) -> Optional[Repository]:
        return resolve_repository(self.root, name)


GitConfig = Dict[str, str]


def config_bool(config: GitConfig, key: str, default: bool) -> bool:
    """Read a boolean the way git does (``true``/``yes``/``on``/``1``, bare key)."""
    value = config.get(key.lower())
    if value is None:
        return default
    return value.strip().lower() in ("", "true", "yes", "on", "1")


class ConfigCache:
    """Each repository's effective git config, re-read only when it changes.

    git's own parser runs (``git config --list``), so includes, conditional
    sections and system/global settings count as they do for git.  The result
    is kept until the repository's ``config`` file changes, so a busy
    repository costs one ``stat`` per request, not a process.
    """

    def __init__(self, git: str = "git", env: Optional[Mapping[str, str]] = None) -> None:
        self._git = git
        self._env = dict(env) if env is not None else None
        self._entries: Dict[str, Tuple[Tuple[int, int, int], GitConfig]] = {}

    async def get(self, repository: Repository) -> GitConfig:
        """Return ``repository``'s config as a dict of lower-cased keys."""
        try:
            st = os.stat(os.path.join(repository.path, "config"))
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            stamp = (0, 0, 0)
        cached = self._entries.get(repository.path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        config = await self._read(repository.path)
        self._entries[repository.path] = (stamp, config)
        return config

    async def _read(self, git_dir: str) -> GitConfig:
        # A thread, not the event loop: starting a process blocks until it has exec'd.
        run = functools.partial(
            subprocess.run,
            [self._git, "--git-dir", git_dir, "config", "--list", "-z"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=self._env,
        )
        output = (await asyncio.get_running_loop().run_in_executor(None, run)).stdout
        config: GitConfig = {}
        for entry in output.split(b"\0"):
            if entry:
                key, _, value = entry.decode("utf-8", "replace").partition("\n")
                config[key.lower()] = value
        return config
