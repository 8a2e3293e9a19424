"""The git services gittornado offers, as data.

Like ``git http-backend``'s ``rpc_service[]``: each service names the git
command it runs, the permission it needs, the per-repository config switch
that can turn it off, and config git runs it with unless the repository
itself says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Mapping, Tuple

from .permission import Permission


@dataclass(frozen=True)
class Service:
    """One smart-HTTP service (``git-upload-pack`` and friends)."""

    name: str
    command: Tuple[str, ...]
    permission: Permission
    switch: str
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
    switch="http.uploadpack",
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
    switch="http.receivepack",
    advertises=True,
    # Check every pushed object before it lands; a malformed one is refused
    # with git's reason and nothing of the push is written.
    defaults={"receive.fsckobjects": "true"},
)

# upload-archive answers one request and exits, so it has no --stateless-rpc.
UPLOAD_ARCHIVE = Service(
    name="git-upload-archive",
    command=("upload-archive",),
    permission=Permission.READ,
    switch="http.uploadarchive",
    advertises=False,
)

SERVICES: Dict[str, Service] = {s.name: s for s in (UPLOAD_PACK, RECEIVE_PACK, UPLOAD_ARCHIVE)}

#: Switch for the dumb protocol's plain files, as in ``git http-backend``.
GET_ANY_FILE = "http.getanyfile"
