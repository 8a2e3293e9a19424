"""Limits on what a push may bring, checked by git's own hook point before any ref moves.

receive-pack keeps a push's objects in a quarantine directory until its
``pre-receive`` hook has accepted the ref updates; a refusal there leaves
nothing of the push behind and moves no ref, and git shows the hook's words
to the pushing user as ``remote: ...`` lines.  So gittornado runs
receive-pack with ``core.hooksPath`` pointing at a directory of its own
(made once per process): its ``pre-receive`` is :mod:`gittornado.prereceive`,
which checks the limits and then runs the repository's own ``pre-receive``;
every other hook there only runs the repository's own one.  The repository's
hooks (and its own ``core.hooksPath``) keep working as before.

The largest push needs no hook: git's ``receive.maxInputSize`` refuses it
while it streams.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import stat
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

from .lfs.locks import has_locks
from .repoconfig import GitConfig
from .repos import Repository

#: The hooks receive-pack may run; each is passed on to the repository's own.
HOOKS = (
    "pre-receive",
    "update",
    "post-receive",
    "post-update",
    "push-to-checkout",
    "reference-transaction",
    "proc-receive",
)

#: How the hooks learn the limits and where the repository's own hooks are.
LIMITS_VARIABLE = "GITTORNADO_PUSH_LIMITS"
REPOSITORY_HOOKS_VARIABLE = "GITTORNADO_REPOSITORY_HOOKS"
GIT_VARIABLE = "GITTORNADO_GIT"

#: How the pre-receive check begins its refusal, which the pushing user reads as a ``remote:`` line.
REFUSAL_PREFIX = "gittornado: push refused: "
#: A refusal's reason, tagged at its end; and git's own words for a pack over ``receive.maxInputSize``.
_TAGGED = re.compile(re.escape(REFUSAL_PREFIX).encode() + rb"[^\n]*? \[([a-z-]+)\]")
_TOO_LARGE = b"pack exceeds maximum allowed size"

_PASS_ON = """#!/bin/sh
# gittornado: run the repository's own {name} hook, if it has one.
hook="$GITTORNADO_REPOSITORY_HOOKS/{name}"
[ -x "$hook" ] || exit 0
exec "$hook" "$@"
"""

_PRE_RECEIVE = """#!/bin/sh
# gittornado: check the push's limits, then run the repository's own pre-receive hook.
exec {python} -c 'import sys; sys.path.insert(0, sys.argv.pop(1)); from gittornado.prereceive import main; \
sys.exit(main())' {package_parent} "$@"
"""


@dataclass(frozen=True)
class PushLimits:
    """What one push may bring; ``None``: no limit.

    ``max_push_size`` caps the pack a push sends, ``max_file_size`` each file
    (blob) it adds, ``repo_quota`` the repository's objects on disk once the
    push's own are counted in.  ``lfs_locks`` refuses pushes that change a
    path another user holds a Git LFS lock on.
    """

    max_push_size: Optional[int] = None
    max_file_size: Optional[int] = None
    repo_quota: Optional[int] = None
    lfs_locks: bool = False

    def needs_hook(self, repo: Repository) -> bool:
        """Whether a push to ``repo`` runs the pre-receive check (the push size is git's own).

        Lock checks run only where a lock exists: starting the check costs a
        push about a tenth of a second, and most repositories have no locks.
        """
        if self.max_file_size is not None or self.repo_quota is not None:
            return True
        return self.lfs_locks and has_locks(repo.path)


class PushChecks:
    """The receive-pack options and environment that enforce :class:`PushLimits`."""

    def __init__(self, limits: PushLimits, git: str = "git") -> None:
        self.limits = limits
        self.git = git
        self._hooks: Optional[str] = None

    def receive_pack_setup(self, repo: Repository, config: GitConfig) -> Tuple[List[str], Dict[str, str]]:
        """``-c`` options and environment variables for one receive-pack in ``repo``."""
        options: List[str] = []
        env: Dict[str, str] = {}
        if self.limits.max_push_size is not None:
            options += ["-c", f"receive.maxInputSize={self.limits.max_push_size}"]
        if self.limits.needs_hook(repo):
            options += ["-c", f"core.hooksPath={self.hooks_directory()}"]
            env[LIMITS_VARIABLE] = json.dumps(asdict(self.limits))
            env[REPOSITORY_HOOKS_VARIABLE] = repository_hooks(repo, config)
            env[GIT_VARIABLE] = self.git
        return options, env

    def hooks_directory(self) -> str:
        """gittornado's hooks, written on first use into a private directory removed at exit."""
        if self._hooks is None:
            directory = tempfile.mkdtemp(prefix="gittornado-hooks-")
            atexit.register(shutil.rmtree, directory, True)
            package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            for name in HOOKS:
                if name == "pre-receive":
                    text = _PRE_RECEIVE.format(
                        python=_quoted(sys.executable), package_parent=_quoted(package_parent)
                    )
                else:
                    text = _PASS_ON.format(name=name)
                path = os.path.join(directory, name)
                with open(path, "w") as f:
                    f.write(text)
                os.chmod(path, stat.S_IRWXU)
            self._hooks = directory
        return self._hooks


def repository_hooks(repo: Repository, config: GitConfig) -> str:
    """The repository's own hooks: its ``core.hooksPath`` (relative to its git directory), or ``hooks``."""
    configured = config.get("core.hookspath")
    if configured:
        return os.path.join(repo.path, os.path.expanduser(configured))
    return os.path.join(repo.path, "hooks")


def _quoted(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


class PushOutcome:
    """Watches receive-pack's answer go out (a ``tee`` of the response) for why a push was refused.

    The refusal travels to the client inside the answer (git forwards the
    hook's words on the sideband), so the server learns the reason where the
    client does, for the ``gittornado_pushes_refused_total`` metric.
    """

    #: Bytes of the previous piece kept, so a message split between two pieces is still seen.
    OVERLAP = 512

    def __init__(self) -> None:
        self.reason: Optional[str] = None
        self._tail = b""

    def __call__(self, piece: memoryview) -> None:
        if self.reason is not None:
            return
        text = self._tail + bytes(piece)
        tagged = _TAGGED.search(text)
        if tagged is not None:
            self.reason = tagged.group(1).decode()
        elif _TOO_LARGE in text:
            self.reason = "push-size"
        self._tail = text[-self.OVERLAP :]
