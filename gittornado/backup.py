"""Backups of every served repository, taken while the server keeps serving.

For each repository (named by its git directory's path below the root,
``team/app.git``, or ``work/.git`` for a work tree), the backup holds::

    DEST/team/app.git/repository.bundle   git bundle create --all: every ref and what it reaches
    DEST/team/app.git/files/              HEAD, config, description, hooks/, info/attributes,
                                          lfs/objects/ (what a bundle does not carry)

A bundle is consistent by construction: git lists the refs once, then packs
what they reach, and objects never change, so pushes landing meanwhile are
simply not in it, and a concurrent repack or prune (which only drops objects
no ref reaches) cannot take anything from it.  LFS objects are named by
their hash and never change either: each is copied once, so a second backup
into the same place copies only new ones.  Every file is written under a
temporary name and renamed, so an interrupted backup leaves the previous
one intact.

Restoring is two commands per repository::

    git clone --mirror DEST/team/app.git/repository.bundle /srv/git/team/app.git
    cp -r DEST/team/app.git/files/. /srv/git/team/app.git/

A repository without any ref has no bundle; ``git init --bare`` takes the clone's place.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from typing import Dict, List

from .maintenance import find_repositories, low_priority

log = logging.getLogger("gittornado.backup")

BUNDLE = "repository.bundle"
FILES = "files"
#: What is copied besides the bundle, relative to the git directory.
EXTRA_FILES = ("HEAD", "config", "description", "hooks", os.path.join("info", "attributes"))
LFS_OBJECTS = os.path.join("lfs", "objects")


def copy_file(source: str, target: str) -> None:
    """Copy one file (and its mode) so that ``target`` appears whole or not at all."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    temporary = f"{target}.tmp-{os.getpid()}"
    try:
        shutil.copy2(source, temporary)
        os.replace(temporary, target)
    except BaseException:
        if os.path.lexists(temporary):
            os.unlink(temporary)
        raise


def copy_tree(source: str, target: str, immutable: bool) -> int:
    """Copy the files below ``source`` to ``target`` (symlinks not followed); return how many.

    With ``immutable``, a file already present at the same size is taken as copied.
    """
    copied = 0
    for folder, dirs, files in os.walk(source):
        dirs.sort()
        for name in files:
            path = os.path.join(folder, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            destination = os.path.join(target, os.path.relpath(path, source))
            if immutable and os.path.isfile(destination):
                if os.path.getsize(destination) == os.path.getsize(path):
                    continue
            copy_file(path, destination)
            copied += 1
    return copied


def has_refs(git_dir: str, env: Dict[str, str], git: str = "git") -> bool:
    """Whether the repository has a single ref (git refuses to bundle none)."""
    out = subprocess.run(
        [git, "--git-dir", git_dir, "for-each-ref", "--count=1", "--format=x"],
        env=env,
        check=True,
        capture_output=True,
    ).stdout
    return bool(out.strip())


def write_bundle(git_dir: str, target: str, env: Dict[str, str], git: str = "git") -> None:
    """``git bundle create --all`` into ``target``, checked with ``git bundle verify`` before it replaces
    the previous one."""
    temporary = f"{target}.tmp-{os.getpid()}"
    try:
        for step, options in (("create", ["-q", temporary, "--all"]), ("verify", ["-q", temporary])):
            argv = [*low_priority(), git, "--git-dir", git_dir, "bundle", step, *options]
            done = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True)
            if done.returncode != 0:
                problem = done.stderr.decode("utf-8", "replace").strip()[-2000:]
                raise RuntimeError(f"git bundle {step} failed: {problem}")
        os.replace(temporary, target)
    finally:
        if os.path.lexists(temporary):
            os.unlink(temporary)


def back_up_repository(git_dir: str, target: str, env: Dict[str, str], git: str = "git") -> None:
    """Write the backup of one repository into the directory ``target`` (see the module docstring)."""
    os.makedirs(target, exist_ok=True)
    bundle = os.path.join(target, BUNDLE)
    if has_refs(git_dir, env, git):
        write_bundle(git_dir, bundle, env, git)
    elif os.path.exists(bundle):
        os.unlink(bundle)  # every ref was deleted since the last backup
    files = os.path.join(target, FILES)
    for name in EXTRA_FILES:
        source = os.path.join(git_dir, name)
        if os.path.isdir(source) and not os.path.islink(source):
            copy_tree(source, os.path.join(files, name), immutable=False)
        elif os.path.isfile(source) and not os.path.islink(source):
            copy_file(source, os.path.join(files, name))
    lfs = os.path.join(git_dir, LFS_OBJECTS)
    if os.path.isdir(lfs):
        copy_tree(lfs, os.path.join(files, LFS_OBJECTS), immutable=True)


def back_up(root: str, destination: str, env: Dict[str, str], git: str = "git") -> List[str]:
    """Back up every repository below ``root`` into ``destination``; return the names that failed."""
    failed = []
    for git_dir in find_repositories(root):
        name = os.path.relpath(git_dir, root)
        try:
            back_up_repository(git_dir, os.path.join(destination, name), env, git)
        except (OSError, RuntimeError, subprocess.CalledProcessError) as error:
            log.error("%s: backup failed: %s", name, error)
            failed.append(name)
        else:
            log.info("%s: backed up", name)
    return failed
