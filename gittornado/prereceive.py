"""The pre-receive hook gittornado gives receive-pack: refuse a push over its limits, then run the own one.

git runs it in the repository's git directory with the pushed objects in
quarantine (``GIT_OBJECT_DIRECTORY``, ``GIT_QUARANTINE_PATH``) and the ref
updates on stdin, one ``<old> <new> <ref>`` line each; the refs have not
moved yet.  What it prints reaches the pushing user as ``remote:`` lines; a
non-zero exit refuses the whole push, and git then removes the quarantine.
See :mod:`gittornado.pushchecks` for how it is installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Dict, Iterator, List, Optional, Tuple

from .pushchecks import GIT_VARIABLE, LIMITS_VARIABLE, REFUSAL_PREFIX, REPOSITORY_HOOKS_VARIABLE

ZERO = "0" * 40
ZERO_SHA256 = "0" * 64

Update = Tuple[str, str, str]


def main() -> int:
    """Check the push, then hand its updates to the repository's own pre-receive hook."""
    updates_text = sys.stdin.buffer.read()
    updates = parse_updates(updates_text.decode("utf-8", "replace"))
    limits = json.loads(os.environ.get(LIMITS_VARIABLE, "{}"))
    refusal = check(updates, limits, os.environ)
    if refusal is not None:
        reason, message = refusal
        # The tag in brackets is for the server, which counts refusals by reason (see PushOutcome).
        sys.stderr.write(f"{REFUSAL_PREFIX}{message} [{reason}]\n")
        return 1
    hook = os.path.join(os.environ.get(REPOSITORY_HOOKS_VARIABLE, "hooks"), "pre-receive")
    if not os.access(hook, os.X_OK):
        return 0
    return subprocess.run([hook, *sys.argv[1:]], input=updates_text).returncode


def parse_updates(text: str) -> List[Update]:
    """``(old, new, ref)`` for each line git gave the hook."""
    updates = []
    for line in text.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3:
            updates.append((parts[0], parts[1], parts[2]))
    return updates


def check(updates: List[Update], limits: Dict[str, object], env: Dict[str, str]) -> Optional[Tuple[str, str]]:
    """Why the push must be refused, as ``(reason, message)``, or None.

    The reasons: ``file-size``, ``quota``, ``lfs-lock``.
    """
    max_file_size = limits.get("max_file_size")
    if isinstance(max_file_size, int):
        for path, size in new_blobs(updates):
            if size > max_file_size:
                return (
                    "file-size",
                    f"{path} is {_size(size)}, over the limit of {_size(max_file_size)} per file",
                )
    quota = limits.get("repo_quota")
    if isinstance(quota, int) and new_commits(updates):  # a push that only deletes always lands
        total = repository_bytes(env)
        if total > quota:
            return "quota", f"the repository would take {_size(total)}, over its quota of {_size(quota)}"
    if limits.get("lfs_locks"):
        from .lfs.locks import locked_paths  # only where LFS locks are enforced

        locks = locked_paths(os.getcwd())
        user = env.get("REMOTE_USER")
        for path in changed_paths(updates):
            owner = locks.get(path)
            if owner is not None and owner != user:
                return "lfs-lock", f"{path} is locked by {owner} (git lfs locks)"
    return None


def new_commits(updates: List[Update]) -> List[str]:
    """The tips pushed (not deletions)."""
    return [new for _, new, _ in updates if new not in (ZERO, ZERO_SHA256)]


def new_blobs(updates: List[Update]) -> Iterator[Tuple[str, int]]:
    """``(path, size)`` of every blob the push brings that no ref reached before."""
    tips = new_commits(updates)
    if not tips:
        return
    listing = _git("rev-list", "--objects", *tips, "--not", "--all")
    named = {}
    for line in listing.splitlines():
        oid, _, path = line.partition(" ")
        if path:
            named.setdefault(oid, path)
    if not named:
        return
    sizes = subprocess.run(
        [_GIT, "cat-file", "--batch-check=%(objectname) %(objecttype) %(objectsize)"],
        input="\n".join(named) + "\n",
        capture_output=True,
        encoding="utf-8",
        errors="surrogateescape",  # see _git
        check=True,
    ).stdout
    for line in sizes.splitlines():
        oid, kind, size = line.split(" ")
        if kind == "blob":
            yield named[oid], int(size)


def changed_paths(updates: List[Update]) -> Iterator[str]:
    """Every path a pushed commit changes, against its first parent."""
    tips = new_commits(updates)
    if not tips:
        return
    commits = _git("rev-list", *tips, "--not", "--all").split()
    if not commits:
        return
    listing = subprocess.run(
        [_GIT, "diff-tree", "--stdin", "-r", "--root", "--no-commit-id", "--name-only", "-z"],
        input="\n".join(commits) + "\n",
        capture_output=True,
        encoding="utf-8",
        errors="surrogateescape",  # see _git
        check=True,
    ).stdout
    yield from dict.fromkeys(path for path in listing.split("\0") if path)


def repository_bytes(env: Dict[str, str]) -> int:
    """The repository's objects on disk with the push's quarantined ones counted in."""
    total = 0
    for directory, subdirectories, files in os.walk("objects"):
        subdirectories[:] = [d for d in subdirectories if not d.startswith("tmp_objdir")]
        total += sum(_file_size(os.path.join(directory, name)) for name in files)
    quarantine = env.get("GIT_QUARANTINE_PATH")
    if quarantine:
        for directory, _, files in os.walk(quarantine):
            total += sum(_file_size(os.path.join(directory, name)) for name in files)
    return total


def _file_size(path: str) -> int:
    try:
        return os.lstat(path).st_size
    except OSError:
        return 0


#: The git binary the server runs.
_GIT = os.environ.get(GIT_VARIABLE, "git")


def _git(*args: str) -> str:
    """git's output as text; paths are bytes to git, and one that is not UTF-8 must not stop a push."""
    return subprocess.run(
        [_GIT, *args], capture_output=True, encoding="utf-8", errors="surrogateescape", check=True
    ).stdout


def _size(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"
