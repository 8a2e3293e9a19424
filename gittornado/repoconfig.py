"""How git reads a repository's config: its effective settings, their types, the files they come from.

:class:`ConfigCache` runs git's own parser, so includes, conditional sections
and system/global settings count exactly as they do for git, and keeps each
reading while none of its files changed.  :func:`parse_git_bool` and
:func:`config_bool` type a value as ``git config --type=bool`` does.
:func:`global_config_files` and :func:`file_stamp` say which files to watch
and whether one changed; :mod:`gittornado.adverts` watches them too.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import subprocess
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Tuple

if TYPE_CHECKING:  # only a type here: repos re-exports this module's names for old imports
    from .repos import Repository

log = logging.getLogger("gittornado")


#: A repository's effective config: lower-cased keys; ``None`` for a bare key (``[http] uploadpack``).
GitConfig = Dict[str, Optional[str]]

_C_SPACE = " \t\n\v\f\r"
#: What C's strtoimax(value, &end, 0) reads: sign, then hex, octal or decimal digits; the rest is the unit.
_C_INTEGER = re.compile(r"([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)(.*)", re.DOTALL)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_INT_MAX = 2**31 - 1


def parse_git_bool(value: Optional[str]) -> Optional[bool]:
    """``value`` as ``git config --type=bool`` reads it, or None where git would refuse it.

    A bare key (``None``) is true, an empty value false; ``true``/``yes``/``on``
    and ``false``/``no``/``off`` in any case; otherwise an ``int`` in C syntax
    with an optional ``k``/``m``/``g`` unit, true when nonzero.
    """
    if value is None:
        return True
    if value.lower() in ("", "false", "no", "off"):
        return False
    if value.lower() in ("true", "yes", "on"):
        return True
    match = _C_INTEGER.fullmatch(value.lstrip(_C_SPACE))
    if match is None or match.group(3).lower() not in _UNITS:
        return None
    # The sign changes neither the truth nor git's range check (which, by C division, refuses INT_MIN too).
    _, digits, unit = match.groups()
    number = int(digits, 16) if digits[:2].lower() == "0x" else int(digits, 8 if digits[0] == "0" else 10)
    if number > _INT_MAX // _UNITS[unit.lower()]:
        return None
    return number != 0


def config_bool(config: GitConfig, key: str, default: bool, source: str = "the repository") -> bool:
    """Read a boolean the way git does (:func:`parse_git_bool`); ``default`` when unset.

    A value git could not read is taken as off, and logged with ``source``:
    git itself would stop with an error, so nothing it guards should run.
    """
    key = key.lower()
    if key not in config:
        return default
    value = parse_git_bool(config[key])
    if value is None:
        log.warning("%s: %s = %r is not a boolean git can read; taken as off", source, key, config[key])
        return False
    return value


def global_config_files(env: Mapping[str, str]) -> List[str]:
    """The system and global config files git reads besides the repository's own."""
    home = env.get("HOME", "")
    xdg = env.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    return [
        env.get("GIT_CONFIG_SYSTEM", "/etc/gitconfig"),
        env.get("GIT_CONFIG_GLOBAL", os.path.join(home, ".gitconfig")),
        os.path.join(xdg, "git", "config"),
    ]


#: One file's identity and times: (path, inode, size, mtime_ns, ctime_ns); missing files have zeros.
Stamp = Tuple[str, int, int, int, int]


def file_stamp(path: str, follow: bool = True) -> Stamp:
    """What changes when ``path`` is written or replaced (zeros while it is missing)."""
    try:
        st = os.stat(path, follow_symlinks=follow)
    except OSError:
        return (path, 0, 0, 0, 0)
    return (path, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


#: Seconds a config file must have been left alone before a reading of it is kept (file times are coarse).
SETTLED = 1.0


class ConfigUnreadable(Exception):
    """git could not read a repository's config (a syntax error, say); git would refuse to serve it too."""


@dataclass(frozen=True)
class _Reading:
    config: GitConfig
    stamps: Tuple[Stamp, ...]


class ConfigCache:
    """Each repository's effective git config, re-read only when it changes.

    git's own parser runs (``git config --list --show-origin``, with the
    server's git binary and environment), so includes, conditional sections
    and system/global settings count as they do for git.  A reading is kept
    while a ``stat`` of every file it came from (the repository's ``config``,
    the system and global files, every file an include names, present or not)
    shows no change, so a busy repository costs a few stats per request, not
    a process.  A reading made within :data:`SETTLED` seconds of a change to
    one of its files is not kept, since a second change in the same clock
    tick could otherwise go unseen.  Concurrent requests share one reading.
    """

    def __init__(self, git: str = "git", env: Optional[Mapping[str, str]] = None) -> None:
        self._git = git
        self._env = dict(env) if env is not None else None
        self._lookup_env: Mapping[str, str] = self._env if self._env is not None else os.environ
        self._global_files = global_config_files(self._lookup_env)
        self._entries: Dict[str, _Reading] = {}
        self._pending: Dict[str, asyncio.Task[GitConfig]] = {}

    async def get(self, repository: Repository) -> GitConfig:
        """Return ``repository``'s config as a dict of lower-cased keys.

        Raises :class:`ConfigUnreadable` when git cannot read it.
        """
        path = repository.path
        cached = self._entries.get(path)
        if cached is not None and cached.stamps == tuple(file_stamp(s[0]) for s in cached.stamps):
            return cached.config
        reading = self._pending.get(path)
        if reading is None:
            reading = self._pending[path] = asyncio.ensure_future(self._read(path))
            reading.add_done_callback(lambda _: self._pending.pop(path, None))
        # Shielded: a request that gives up does not cancel the reading others wait for.
        return await asyncio.shield(reading)

    async def _read(self, git_dir: str) -> GitConfig:
        started = time.time_ns()
        # A thread, not the event loop: starting a process blocks until it has exec'd.
        run = functools.partial(
            subprocess.run,
            [self._git, "--git-dir", git_dir, "config", "--list", "--show-origin", "-z"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self._env,
        )
        result = await asyncio.get_running_loop().run_in_executor(None, run)
        if result.returncode != 0:
            reason = result.stderr.decode("utf-8", "replace").strip().splitlines()
            log.warning("%s: git cannot read its config: %s", git_dir, reason[0] if reason else "no reason")
            raise ConfigUnreadable(git_dir)
        config, files = _parse_listing(result.stdout, self._lookup_env)
        files = [os.path.join(git_dir, "config"), *self._global_files, *files]
        if any(key.startswith("includeif.onbranch:") for key in config):
            files.append(os.path.join(git_dir, "HEAD"))
        stamps = tuple(file_stamp(path) for path in dict.fromkeys(files))
        if all(max(s[3], s[4]) < started - SETTLED * 1e9 for s in stamps):
            self._entries[git_dir] = _Reading(config, stamps)
        else:
            self._entries.pop(git_dir, None)
        return config


def _parse_listing(output: bytes, env: Mapping[str, str]) -> Tuple[GitConfig, List[str]]:
    """``git config --list --show-origin -z`` output -> (config, every file it came from or includes)."""
    config: GitConfig = {}
    files: List[str] = []
    fields = output.split(b"\0")
    for origin_field, entry in zip(fields[0::2], fields[1::2]):
        origin = os.fsdecode(origin_field)
        key, newline, value = entry.decode("utf-8", "replace").partition("\n")
        key = key.lower()
        config[key] = value if newline else None
        if not origin.startswith("file:"):
            continue  # "command line:" (-c, GIT_CONFIG_COUNT): fixed for the server's lifetime
        origin_file = origin[len("file:") :]
        files.append(origin_file)
        if (key == "include.path" or (key.startswith("includeif.") and key.endswith(".path"))) and value:
            # Watched even while missing: creating it changes the config.
            included = os.path.join(env.get("HOME", ""), value[2:]) if value.startswith("~/") else value
            files.append(os.path.join(os.path.dirname(origin_file), included))
    return config, files
