"""URL path -> repository directory, safely: found under a root, or created there for a push.

Everything a client names is checked here before any file or git process is
touched.  A name that is malformed, or that would lead outside the root in any
way (``..``, absolute paths, backslashes, NUL, symlinks pointing out), resolves
to ``None``, which callers answer exactly like a missing repository.

A repository is a directory the administrator placed, found by its real path
(as ``enter_repo()`` and gitolite see it).  A git directory inside another
repository, in its work tree or in its git directory, is content someone
committed or pushed, with whatever ``config`` and ``hooks/`` they chose, so it
is never served.  And a symlink is only another way to write a repository's
name: the :class:`Repository` it finds carries the real name, which is what
access rules are matched against, so an alias grants nothing its target's own
rules do not.

:meth:`RepositoryRoot.create` makes a missing repository a push names (the
``--create-on-push`` option), under the same rules: a name lookup would
refuse, or one inside another repository or behind a symlink, is refused.

How git reads a repository's config lives in :mod:`gittornado.repoconfig`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Mapping, Optional

# Re-exported for old imports (``from gittornado.repos import ConfigCache``): they lived here once.
from .repoconfig import (  # noqa: F401
    SETTLED,
    ConfigCache,
    ConfigUnreadable,
    GitConfig,
    Stamp,
    config_bool,
    file_stamp,
    global_config_files,
    parse_git_bool,
)

log = logging.getLogger("gittornado")

#: Longest repository name accepted; longer names cannot be repositories anyway.
MAX_NAME_LENGTH = 1024


@dataclass(frozen=True)
class Repository:
    """A git directory that may be served.

    ``name`` is the repository's real path relative to the root, as it exists
    on disk (``team/proj.git``, or ``work`` for a work tree), whatever name or
    alias the client used; access rules are matched against it.  ``path`` is
    the absolute git directory (a bare repository, or a work tree's ``.git``).
    ``root`` is the directory it was found under, when it was found under one.
    ``namespace``, set only by an embedder's lookup (never from the request),
    serves one git namespace of the directory as a repository of its own
    (gitnamespaces(7)), smart and dumb answers alike.
    """

    name: str
    path: str
    root: Optional[str] = None
    namespace: Optional[str] = None

    @property
    def namespace_prefix(self) -> str:
        """Where its refs live (``refs/namespaces/a/refs/namespaces/b/`` for ``a/b``), or ``""``."""
        if not self.namespace:
            return ""
        return "".join(f"refs/namespaces/{part}/" for part in self.namespace.split("/") if part)


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


def _git_dir_of(directory: str) -> str:
    """The git directory a directory stands for: its ``.git`` when it has one, else itself.

    A directory with a ``.git`` is a work tree; whatever else it holds
    (even a committed ``HEAD``, ``objects/`` and ``refs/``) is content.
    """
    dot_git = os.path.join(directory, ".git")
    return os.path.realpath(dot_git) if os.path.lexists(dot_git) else directory


def _why_not_served(root: str, home: str) -> Optional[str]:
    """Why the repository whose real directory is ``home`` must not be served, or None.

    Walks from the root down: every directory between the root and ``home``
    must be neither a git directory nor a work tree (a few stats a level).
    """
    if home == root:
        return "it is the root itself"
    if not home.startswith(root + os.sep):
        return "its real path is outside the root"
    ancestor = root
    for part in os.path.relpath(home, root).split(os.sep)[:-1]:
        ancestor = os.path.join(ancestor, part)
        if os.path.lexists(os.path.join(ancestor, ".git")) or _is_git_dir(ancestor):
            return f"it lies inside the repository {os.path.relpath(ancestor, root)!r}"
    return None


def resolve_repository(root: str, name: str) -> Optional[Repository]:
    """Find the repository called ``name`` under ``root``.

    ``proj`` and ``proj.git`` each find either directory; a non-bare
    repository is served from its ``.git``.  ``root`` must be a real path
    (symlinks resolved).  The result's ``name`` is the real one (see the
    module docstring).
    """
    name = clean_name(name)
    if name is None:
        return None
    stem = name[:-4] if name.endswith(".git") else name
    for candidate in dict.fromkeys((name, stem + ".git", stem)):
        requested = os.path.join(root, candidate)
        directory = os.path.realpath(requested)
        symlinked = "" if directory == requested else f" (a symlink to {directory!r})"
        git_dir = _git_dir_of(directory) if _inside(root, directory) else directory
        if not _inside(root, git_dir):
            if os.path.exists(git_dir):
                log.debug("%r%s is not served: its real path is outside the root", candidate, symlinked)
            continue
        if not _is_git_dir(git_dir):
            continue
        # A work tree is named by its top directory, not by its .git.
        home = os.path.dirname(git_dir) if os.path.basename(git_dir) == ".git" else git_dir
        reason = _why_not_served(root, home)
        if reason is not None:
            log.debug("%r%s is not served: %s", candidate, symlinked, reason)
            continue
        return Repository(name=os.path.relpath(home, root).replace(os.sep, "/"), path=git_dir, root=root)
    return None


class RepositoryRoot:
    """The default repository lookup: every git directory below one folder.

    Instances are callables, like any lookup an embedder may pass instead.
    With ``create_on_push``, :meth:`create` makes missing repositories (with
    the ``git`` binary and ``env``, which should hold no ``GIT_DIR``).
    """

    def __init__(
        self,
        root: str,
        create_on_push: bool = False,
        git: str = "git",
        env: Optional[Mapping[str, str]] = None,
    ) -> None:
        self.root = os.path.realpath(root)
        self.create_on_push = create_on_push
        self.git = git
        self.env = dict(env) if env is not None else None

    def __call__(self, name: str) -> Optional[Repository]:
        return resolve_repository(self.root, name)

    async def create(self, name: str) -> Optional[Repository]:
        """The repository a push to the missing ``name`` creates, or None (off, or a refused name).

        Call it only for a user the access rules let push to ``name``.
        """
        if not self.create_on_push:
            return None
        make = functools.partial(create_repository, self.root, name, self.git, self.env)
        # A thread, not the event loop: git init and a few renames and syncs block.
        return await asyncio.get_running_loop().run_in_executor(None, make)


#: A repository a push creates is made under a scratch name first: ``.<name>.git`` and this, and
#: mkdtemp's 8 random characters. Its last part must leave room for them within a file name's 255 bytes.
_SCRATCH_SUFFIX = ".creating-"
_LONGEST_NAME = 255 - len(".") - len(_SCRATCH_SUFFIX) - 8

#: Written into a repository a push creates: git init's HEAD names its default branch, which the
#: push may not have; after the first push that brings a branch, HEAD names it, and the hook goes.
_FIRST_PUSH_HOOK = """#!/bin/sh
# Written by gittornado when a push created this repository; it removes itself.
# Points HEAD at the first branch pushed unless HEAD's branch exists.
if git rev-parse -q --verify HEAD >/dev/null; then
    cat >/dev/null
    rm -f "$0"
    exit 0
fi
while read -r old new ref; do
    case "$ref" in
    refs/heads/*)
        git symbolic-ref HEAD "$ref"
        cat >/dev/null
        rm -f "$0"
        exit 0
        ;;
    esac
done
"""


def _why_not_created(root: str, directory: str) -> Optional[str]:
    """Why a new repository may not go into ``directory`` (under ``root``), else None, creating it.

    Each level below the root must be a real directory (no symlink, whatever
    it points to), neither a git directory nor a work tree; missing levels
    are made.
    """
    current = root
    for part in os.path.relpath(directory, root).split(os.sep) if directory != root else ():
        current = os.path.join(current, part)
        try:
            os.mkdir(current)
        except FileExistsError:
            pass
        except OSError as error:
            return f"cannot make {os.path.relpath(current, root)!r}: {error.strerror}"
        if os.path.islink(current) or not os.path.isdir(current):
            return f"{os.path.relpath(current, root)!r} is a symlink or not a directory"
        if os.path.lexists(os.path.join(current, ".git")) or _is_git_dir(current):
            return f"it would lie inside the repository {os.path.relpath(current, root)!r}"
    return None


def create_repository(
    root: str, name: str, git: str = "git", env: Optional[Mapping[str, str]] = None
) -> Optional[Repository]:
    """Create the bare repository ``name`` (``.git`` added) under ``root``, or find it made meanwhile.

    It is made whole in a temporary directory beside its place, then renamed
    there, so no lookup ever finds half a repository, and of two creations
    at once, one wins the rename and the other uses the winner's.  Returns
    None, logging why, for a name :func:`resolve_repository` would refuse or
    a place it would not serve, or one with a part that starts with a dot
    (``.git``, hidden directories, the temporary directories of creations).
    """
    name = clean_name(name)
    if name is None:
        return None
    if env is None:
        from .backend import server_environment  # imports this module: not at the top

        env = server_environment()
    stem = name[:-4] if name.endswith(".git") else name
    if any(not part or part.startswith(".") for part in stem.split("/")):
        # ``team/.git`` would make ``team`` a work tree, hiding every repository in it.
        log.warning("not creating repository %r: a part of the name is empty or starts with a dot", name)
        return None
    target = os.path.join(root, stem + ".git")
    parent = os.path.dirname(target)
    reason = _why_not_created(root, parent)
    if reason is None and len(os.fsencode(os.path.basename(target))) > _LONGEST_NAME:
        reason = f"its last part is longer than {_LONGEST_NAME} bytes"
    if reason is None and os.path.lexists(target):
        reason = "something else has that name"
    if reason is None and os.path.realpath(parent) != parent:
        reason = "its directory's real path is another"
    if reason is not None:
        found = resolve_repository(root, name)  # made by a push that raced this one?
        if found is None:
            log.warning("not creating repository %r: %s", name, reason)
        return found
    scratch = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}{_SCRATCH_SUFFIX}", dir=parent)
    try:
        subprocess.run(
            [git, "init", "-q", "--bare", scratch],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            check=True,
        )
        hook = os.path.join(scratch, "hooks", "post-receive")
        os.makedirs(os.path.dirname(hook), exist_ok=True)
        with open(hook, "w", encoding="utf-8") as f:
            f.write(_FIRST_PUSH_HOOK)
        os.chmod(hook, 0o755)
        os.rename(scratch, target)  # fails if another creation got there first: the target is not empty
        scratch = ""
        log.info("created repository %r for a push", os.path.relpath(target, root))
    except subprocess.CalledProcessError as error:
        log.error("cannot create repository %r: git init: %s", name, error.stderr.decode(errors="replace"))
    except OSError as error:
        if not os.path.isdir(target):
            log.error("cannot create repository %r: %s", name, error)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    return resolve_repository(root, name)
