"""GitBackend: the composition root every handler of one application shares.

It holds what an embedder may replace (repository lookup, access policy),
the limits, the caches, and the environment git runs with, and it builds
each git process's environment from a request (:meth:`GitBackend.git_environment`),
as ``git http-backend`` does from its CGI variables.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Awaitable, Callable, Dict, List, Optional, Tuple, Union
from weakref import WeakSet

from tornado.web import HTTPError, RequestHandler

from .access import AccessPolicy, ReadOnlyPolicy
from .admission import RepositorySlots
from .adverts import AdvertisementCache
from .maintenance import MaintenanceScheduler
from .observe import Metrics
from .packcache import PackCache
from .process import GitProcesses
from .pushchecks import PushChecks, PushLimits
from .repoconfig import ConfigCache, GitConfig
from .repos import Repository

if TYPE_CHECKING:
    from .lfs import LfsServer

Lookup = Callable[[str], Union[Optional[Repository], Awaitable[Optional[Repository]]]]

#: Never inherited from the server's environment: variables that would point git at
#: another repository than the one named, and those set per request.
REPOSITORY_ENV = frozenset(
    (
        "GIT_DIR",
        "GIT_WORK_TREE",
        "GIT_INDEX_FILE",
        "GIT_OBJECT_DIRECTORY",
        "GIT_ALTERNATE_OBJECT_DIRECTORIES",
        "GIT_COMMON_DIR",
        "GIT_NAMESPACE",
        "GIT_PROTOCOL",
        "REMOTE_USER",
    )
)

#: A Git-Protocol header as gitprotocol-http allows it: colon-separated ``key`` or ``key=value`` items
#: (git itself ignores what it does not know), in printable ASCII.
_ITEM = r"[A-Za-z0-9._-]+(=[\x20-\x39\x3b-\x7e]*)?"  # a key, then a value without ":"
_GIT_PROTOCOL = re.compile(rf"{_ITEM}(:{_ITEM})*")

#: Default cap on an upload-pack request body, decoded (see :attr:`GitBackend.max_fetch_body_size`).
MAX_FETCH_BODY_SIZE = 64 * 1024 * 1024


def server_environment() -> Dict[str, str]:
    """The server's own environment, less what would point git elsewhere or is set per request."""
    return {k: v for k, v in os.environ.items() if k not in REPOSITORY_ENV}


def git_protocol(header: Optional[str]) -> Optional[str]:
    """The ``Git-Protocol`` header as git may read it from ``GIT_PROTOCOL``, or 400.

    It is a colon-separated list of ``key`` and ``key=value``
    (``version=2:agent=git/2.47``); values are printable ASCII, at most 256
    bytes in all.  It reaches git as one environment variable, which no
    value can break out of; anything else is refused.
    """
    if header is None:
        return None
    if len(header) > 256 or not _GIT_PROTOCOL.fullmatch(header):
        raise HTTPError(400, reason="Malformed Git-Protocol header")
    return header


@dataclass
class GitBackend:
    """Everything the handlers of one application share.

    ``lookup`` maps a repository name from the URL to a
    :class:`~gittornado.repos.Repository` (or ``None``); ``policy`` decides
    access; ``max_body_size`` caps push request bodies (``None``: unlimited);
    ``max_fetch_body_size`` caps upload-pack request bodies after decoding
    (negotiation needs a few MiB at most; a gzip bomb needs more);
    ``idle_timeout`` ends a transfer in which no byte moved either way for
    that many seconds (``None``: never); ``body_timeout`` answers 408 to a
    request whose body has not started that many seconds after its headers
    (git starts only then); ``processes`` holds the running git processes and
    their cap; ``metrics``, when set, is served at ``/metrics``; ``adverts``
    replays unchanged upload-pack advertisements; ``push_limits`` says what a
    push may bring (:mod:`gittornado.pushchecks`); ``pack_cache``, when set,
    shares the packs of identical fetches (:mod:`gittornado.packcache`);
    ``pack_slots``, when set, queues fetches that pack beyond a few per
    repository (:mod:`gittornado.admission`); ``maintenance``, when set,
    hears of every push that landed and maintains the repository later
    (:mod:`gittornado.maintenance`); ``lfs``, when set, serves Git LFS for
    every repository (:mod:`gittornado.lfs`).  ``git`` and ``base_env`` are
    the git binary and the environment it runs with; the default ``configs``
    and ``adverts`` read config with those same two.
    """

    lookup: Lookup
    policy: AccessPolicy = field(default_factory=ReadOnlyPolicy)
    max_body_size: Optional[int] = None
    max_fetch_body_size: Optional[int] = MAX_FETCH_BODY_SIZE
    idle_timeout: Optional[float] = None
    body_timeout: Optional[float] = 60.0
    metrics: Optional[Metrics] = None
    git: str = "git"
    configs: Optional[ConfigCache] = None
    adverts: Optional[AdvertisementCache] = None
    pack_cache: Optional[PackCache] = None
    push_limits: PushLimits = field(default_factory=PushLimits)
    pack_slots: Optional[RepositorySlots] = None
    maintenance: Optional[MaintenanceScheduler] = None
    lfs: Optional[LfsServer] = None
    processes: GitProcesses = field(default_factory=GitProcesses)
    base_env: Dict[str, str] = field(default_factory=server_environment)
    #: The requests in progress (a shutdown lets them finish); weak, so none is kept alive by it.
    requests: WeakSet[RequestHandler] = field(default_factory=WeakSet)

    def __post_init__(self) -> None:
        if self.lfs is not None and not self.push_limits.lfs_locks:  # a lock binds every client's pushes
            self.push_limits = dataclasses.replace(self.push_limits, lfs_locks=True)
        self.push_checks = PushChecks(self.push_limits, self.git)
        if self.configs is None:
            self.configs = ConfigCache(self.git, self.base_env)
        if self.adverts is None:  # it watches the global config files of the environment git runs in
            self.adverts = AdvertisementCache(self.base_env)

    def service_setup(
        self,
        command: str,
        repo: Repository,
        config: Optional[GitConfig],
        use_pack_cache: bool = False,
        cache_request_key: Optional[str] = None,
    ) -> Tuple[List[str], Dict[str, str]]:
        """``-c`` options and environment variables that the backend's features add to ``git <command>``:
        the pack cache to upload-pack (when ``use_pack_cache``; see
        :meth:`~gittornado.packcache.PackCache.upload_pack_setup`), the push limits to receive-pack."""
        if command == "upload-pack" and use_pack_cache and self.pack_cache is not None:
            return self.pack_cache.upload_pack_setup(cache_request_key)
        if command == "receive-pack":
            return self.push_checks.receive_pack_setup(repo, config or {})
        return [], {}

    def git_environment(
        self, repository: Repository, user: Optional[str], address: Optional[str], protocol: Optional[str]
    ) -> Dict[str, str]:
        """The environment of one git process, with what ``git http-backend`` gives its git.

        ``protocol`` is the request's ``Git-Protocol`` header, checked by :func:`git_protocol`.
        """
        env = dict(self.base_env)
        address = address or "unknown"
        env["REMOTE_ADDR"] = address
        if user:
            env["REMOTE_USER"] = user
        env.setdefault("GIT_COMMITTER_NAME", user or "anonymous")
        env.setdefault("GIT_COMMITTER_EMAIL", f"{user or 'anonymous'}@http.{address}")
        if protocol is not None:
            env["GIT_PROTOCOL"] = protocol
        if repository.namespace:
            env["GIT_NAMESPACE"] = repository.namespace
        return env
