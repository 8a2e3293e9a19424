"""Who is asking, and what they may do: the access-policy interface.

A policy answers two questions, each of which may be sync or async:

* :meth:`AccessPolicy.authenticate`: who sent this request (a user name, or
  ``None`` for anonymous)?  Credentials that are present but wrong raise
  :class:`AuthenticationFailed`.
* :meth:`AccessPolicy.authorize`: may this user read (or write) this
  repository?

:func:`check_access` turns the answers into the HTTP outcome, in one place, so
every policy gets the same rules: an anonymous client that lacks a right is
asked for credentials (401) when the policy has a realm; an authenticated user
that lacks write but may read gets 403; anyone else who may not even read gets
404, so private repositories cannot be discovered by probing.

:class:`~gittornado.inipolicy.IniPolicy` is the implementation the
``gittornado`` command uses (users.ini); its names are importable from here
too, where they used to live.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from tornado.httputil import HTTPServerRequest
from tornado.web import HTTPError

from .permission import Permission
from .util import maybe_await, moved_names


class AuthenticationFailed(Exception):
    """Credentials were sent but are wrong, or name an unknown user.

    The message must never contain the password or the Authorization header.
    """


class AccessDenied(HTTPError):
    """An HTTP error that may carry a ``WWW-Authenticate`` challenge.

    ``retry_after`` (seconds) goes out as ``Retry-After``, for 429 answers to
    clients that sent too many wrong passwords.
    """

    def __init__(
        self,
        status_code: int,
        reason: str,
        challenge: Optional[str] = None,
        retry_after: Optional[int] = None,
    ) -> None:
        super().__init__(status_code, reason=reason)
        self.challenge = challenge
        self.retry_after = retry_after


class AccessPolicy:
    """Base class (and interface) for access policies.

    Subclasses override :meth:`authenticate` and :meth:`authorize`; either may
    be a coroutine.  ``realm`` is the HTTP Basic realm offered to clients that
    need to log in; a policy without a realm never asks for credentials, so
    anonymous clients lacking a right get 403 (or 404) instead of 401.
    """

    realm: Optional[str] = None

    def authenticate(self, request: HTTPServerRequest) -> Optional[str]:
        """Return the user name for ``request``, or ``None`` for anonymous."""
        return None

    def authorize(self, user: Optional[str], repository: str, permission: Permission) -> bool:
        """Return whether ``user`` may perform ``permission`` on ``repository``.

        ``repository`` is the repository's path relative to the root, with
        ``/`` separators, as it exists on disk (``team/proj.git``) or, when it
        does not exist, as the client asked for it.
        """
        return False


class ReadOnlyPolicy(AccessPolicy):
    """Everyone may read every repository; nobody may push.

    The default when no access file is configured: safe to expose, since it
    can never change a repository.
    """

    def authorize(self, user: Optional[str], repository: str, permission: Permission) -> bool:
        return permission is Permission.READ


class OpenPolicy(AccessPolicy):
    """Everyone, anonymous included, may read and push everything.

    Only for trusted networks and tests; never a default.
    """

    def authorize(self, user: Optional[str], repository: str, permission: Permission) -> bool:
        return True


@dataclass(frozen=True)
class Grant:
    """The outcome of a successful access check."""

    user: Optional[str]


async def check_access(
    policy: AccessPolicy,
    request: HTTPServerRequest,
    repository: str,
    permission: Permission,
) -> Grant:
    """Authenticate ``request`` and authorize ``permission`` on ``repository``.

    Returns the grant, or raises :class:`AccessDenied` with the status the
    module docstring describes.
    """
    challenge = f'Basic realm="{policy.realm}"' if policy.realm else None
    try:
        user = await maybe_await(policy.authenticate, request)
    except AuthenticationFailed:
        if challenge:
            raise AccessDenied(401, "Authentication failed", challenge) from None
        raise AccessDenied(403, "Forbidden") from None
    if await maybe_await(policy.authorize, user, repository, permission):
        return Grant(user)
    if user is None and challenge:
        raise AccessDenied(401, "Authentication required", challenge)
    if permission is Permission.WRITE and await maybe_await(
        policy.authorize, user, repository, Permission.READ
    ):
        raise AccessDenied(403, "Push not allowed")
    raise AccessDenied(404, "Repository not found")


#: Names that moved to :mod:`gittornado.inipolicy`, :mod:`gittornado.throttle`,
#: :mod:`gittornado.usersfile` and :mod:`gittornado.passwords`, still importable from here.
_MOVED = {
    "IniPolicy": "inipolicy",
    "FailureThrottle": "throttle",
    "VerifiedCredentials": "inipolicy",
    "basic_credentials": "inipolicy",
    "AccessFileError": "usersfile",
    "AccessRules": "usersfile",
    "RepositoryRule": "usersfile",
    "IniLine": "usersfile",
    "split_ini_lines": "usersfile",
    "valid_user_name": "usersfile",
    "PASSWORD_HASHES": "passwords",
    "BCRYPT_MAX_BYTES": "passwords",
    "verify_password": "passwords",
}


_find_moved = moved_names(__name__, _MOVED)


def __getattr__(name: str) -> Any:
    if name in ("parse_access_file", "load_access_file"):  # they checked hashes by themselves then
        import functools

        from . import passwords, usersfile

        return functools.partial(getattr(usersfile, name), hash_scheme=passwords.hash_scheme)
    return _find_moved(name)
