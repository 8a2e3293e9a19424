"""The URL table: every URL gittornado answers, on one screen.

Repository names may contain slashes (``group/proj.git``); the pattern for
each file or service anchors at the end of the path, so the shortest prefix
before it is the repository.  Anything not listed here is 404.
"""

from __future__ import annotations

import re
from typing import List, Optional

from tornado.routing import Rule
from tornado.web import URLSpec

from .access import AccessPolicy, ReadOnlyPolicy
from .backend import GitBackend, Lookup
from .dumb import PackListHandler, RepositoryFileHandler
from .lfs import LfsServer
from .lfs.batch import BatchHandler
from .lfs.lockapi import LocksHandler, LockVerifyHandler, UnlockHandler
from .lfs.transfer import ObjectHandler, VerifyHandler
from .repos import RepositoryRoot
from .smart import InfoRefsHandler, ServiceHandler
from .status import HealthHandler, MetricsHandler

_HEX = "[0-9a-f]"
_LOOSE_OBJECT = rf"objects/{_HEX}{{2}}/(?:{_HEX}{{38}}|{_HEX}{{62}})"  # SHA-1 or SHA-256
_PACK_FILE = rf"objects/pack/pack-(?:{_HEX}{{40}}|{_HEX}{{64}})\.(?:pack|idx)"
_TEXT_FILE = r"HEAD|objects/info/(?:alternates|http-alternates)"
_SERVICE = r"git-upload-pack|git-receive-pack|git-upload-archive"


def git_routes(
    prefix: str = "",
    *,
    root: Optional[str] = None,
    lookup: Optional[Lookup] = None,
    policy: Optional[AccessPolicy] = None,
    max_body_size: Optional[int] = None,
    lfs: Optional[LfsServer] = None,
) -> List[Rule]:
    """Return the URL rules that serve git repositories under ``prefix``.

    Give either ``root`` (serve every repository below that directory) or
    ``lookup`` (a sync or async callable mapping a repository name to a
    :class:`~gittornado.repos.Repository` or ``None``).  ``policy`` defaults
    to :class:`~gittornado.access.ReadOnlyPolicy`: anyone may read, nobody
    may push.  ``max_body_size`` caps request bodies in bytes (``None``:
    unlimited, as git's own pushes need).  ``lfs`` (an
    :class:`~gittornado.lfs.LfsServer`) serves Git LFS for every repository too.

    Mount the result in any :class:`tornado.web.Application`::

        app = Application([(r"/", Home)] + git_routes("/git", root="/srv/git"))
    """
    if (root is None) == (lookup is None):
        raise ValueError("give exactly one of root and lookup")
    backend = GitBackend(
        lookup=lookup if lookup is not None else RepositoryRoot(root),  # type: ignore[arg-type]
        policy=policy if policy is not None else ReadOnlyPolicy(),
        max_body_size=max_body_size,
        lfs=lfs,
    )
    return routes_for(backend, prefix)


def routes_for(backend: GitBackend, prefix: str = "") -> List[Rule]:
    """The URL table for an existing :class:`~gittornado.handlers.GitBackend`.

    With ``backend.lfs``, every repository also serves Git LFS under its
    ``info/lfs`` (:mod:`gittornado.lfs`).  ``<prefix>/healthz`` and (when the
    backend has metrics) ``<prefix>/metrics`` cannot collide with a
    repository: every repository URL has a suffix.
    """
    base = re.escape(prefix.rstrip("/"))
    repo = base + "/(.+?)"
    args = {"backend": backend}
    routes = [
        URLSpec(rf"{repo}/info/refs", InfoRefsHandler, args),
        URLSpec(rf"{repo}/objects/info/packs", PackListHandler, args),
        URLSpec(rf"{repo}/({_TEXT_FILE}|{_LOOSE_OBJECT}|{_PACK_FILE})", RepositoryFileHandler, args),
        URLSpec(rf"{repo}/({_SERVICE})", ServiceHandler, args),
        URLSpec(rf"{base}/healthz", HealthHandler),
    ]
    if backend.lfs is not None:  # git-lfs finds these by itself: <remote URL>[.git]/info/lfs
        lfs = rf"{repo}/info/lfs"
        routes[-1:-1] = [
            URLSpec(rf"{lfs}/objects/batch", BatchHandler, args),
            URLSpec(rf"{lfs}/objects/([^/]+)/verify", VerifyHandler, args),
            URLSpec(rf"{lfs}/objects/([^/]+)", ObjectHandler, args),
            URLSpec(rf"{lfs}/locks", LocksHandler, args),
            URLSpec(rf"{lfs}/locks/verify", LockVerifyHandler, args),
            URLSpec(rf"{lfs}/locks/([^/]+)/unlock", UnlockHandler, args),
        ]
    if backend.metrics is not None:
        routes.append(URLSpec(rf"{base}/metrics", MetricsHandler, args))
    return routes
