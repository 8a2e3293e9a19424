"""The git services gittornado offers, as data.

Like ``git http-backend``'s ``rpc_service[]``: each service names the git
command it runs, the permission it needs, the per-repository config switch
that turns it on or off (and what holds while the repository's config does not
set it), and config git runs it with unless the repository itself says
otherwise.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple

from .permission import Permission
from .repoconfig import GitConfig, config_bool


class Default(enum.Enum):
    """What a switch means while the repository's config does not set it (http-backend's ``enabled``)."""

    ON = 1
    OFF = 0
    #: On for a request with a user name (``REMOTE_USER``), off for an anonymous one (``enabled = -1``).
    AUTHENTICATED = -1


@dataclass(frozen=True)
class Switch:
    """A per-repository config key that turns something on or off, and its :class:`Default`."""

    key: str
    default: Default

    def refusal(self, config: GitConfig, user: Optional[str], source: str) -> Optional[str]:
        """Why a request by ``user`` (None: anonymous) is refused under ``config``, or None.

        ``source`` names the repository in a log line about an unreadable value.
        """
        if self.key.lower() in config:
            if config_bool(config, self.key, False, source):
                return None
            return f"Disabled by {self.key} in the repository's config"
        if self.default is Default.ON or (self.default is Default.AUTHENTICATED and user):
            return None
        if self.default is Default.AUTHENTICATED:
            return f"Only for logged-in users unless the repository's config sets {self.key}=true"
        return f"Off unless the repository's config sets {self.key}=true"


@dataclass(frozen=True)
class Service:
    """One smart-HTTP service (``git-upload-pack`` and friends)."""

    name: str
    command: Tuple[str, ...]
    permission: Permission
    switch: Switch
    advertises: bool
    defaults: Mapping[str, str] = field(default_factory=dict)

    @property
    def result_type(self) -> str:
        """Content-Type of the RPC response."""
        return f"application/x-{self.name}-result"

    @property
    def request_type(self) -> str:
        """Content-Type git clients send with the RPC request."""
        return f"application/x-{self.name}-request"

    @property
    def advertisement_type(self) -> str:
        """Content-Type of the ``info/refs`` advertisement."""
        return f"application/x-{self.name}-advertisement"


UPLOAD_PACK = Service(
    name="git-upload-pack",
    command=("upload-pack", "--stateless-rpc"),
    permission=Permission.READ,
    switch=Switch("http.uploadpack", Default.ON),
    advertises=True,
    # Partial clone out of the box: filters, and the by-id wants that lazy
    # blob fetches send (reachable objects only, never dangling ones).
    defaults={
        "uploadpack.allowfilter": "true",
        "uploadpack.allowreachablesha1inwant": "true",
    },
)

RECEIVE_PACK = Service(
    name="git-receive-pack",
    command=("receive-pack", "--stateless-rpc"),
    permission=Permission.WRITE,
    # http-backend lets only authenticated users push unless the config says so, since
    # its web server's login is its only gate.  Here a push needs a write grant from
    # the access policy, which no policy gives anonymous users unless told to
    # (OpenPolicy, "* = ...=rw" in users.ini): that grant is the administrator's say-so.
    switch=Switch("http.receivepack", Default.ON),
    advertises=True,
    # Check every pushed object before it lands; a malformed one is refused
    # with git's reason and nothing of the push is written.
    # Push options (git push -o key=value) reach the hooks as GIT_PUSH_OPTION_<n>.
    defaults={"receive.fsckobjects": "true", "receive.advertisepushoptions": "true"},
)

# upload-archive answers one request and exits, so it has no --stateless-rpc.
UPLOAD_ARCHIVE = Service(
    name="git-upload-archive",
    command=("upload-archive",),
    permission=Permission.READ,
    # Reading is all it needs, but it runs the repository's filters and archive
    # settings on the server: like http-backend, only for logged-in users by default.
    switch=Switch("http.uploadarchive", Default.AUTHENTICATED),
    advertises=False,
)

SERVICES: Dict[str, Service] = {s.name: s for s in (UPLOAD_PACK, RECEIVE_PACK, UPLOAD_ARCHIVE)}

#: Switch for the dumb protocol's plain files, as in ``git http-backend``.
GET_ANY_FILE = Switch("http.getanyfile", Default.ON)
