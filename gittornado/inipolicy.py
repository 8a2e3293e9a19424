"""IniPolicy: the access policy of a users.ini file (logins, credential memories, reloading).

Users with htpasswd hashes, groups and per-repository ``r``/``rw`` rules, as
:mod:`gittornado.usersfile` reads them, behind HTTP Basic authentication.  A
token (``gtt_...``) may stand in for a user's password; it logs the user in
for the intersection of its scope and the user's rights, until it expires.
README.md's "Access control" section says what an attacker can and cannot do
against these rules; the classes here implement exactly that, with the
defences against password guessing of :mod:`gittornado.throttle`.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import logging
import os
import secrets
import time
from collections import OrderedDict
from datetime import datetime, timezone
from typing import Callable, Optional, Tuple

from tornado.httputil import HTTPServerRequest

from .access import AccessPolicy, AuthenticationFailed

# Also the old home of FailureThrottle and client_group: they are imported from here too.
from .connections import client_group
from .passwords import TOKEN_PREFIX, hash_scheme, hash_setting, token_id, verify_password, verify_token
from .permission import Permission
from .throttle import CheckCosts, FailureThrottle, FairVerifier, TimedCheck, setting_samples
from .usersfile import AccessFileError, AccessRules, Token, load_access_file

#: Not "gittornado.access": that name is the per-request access log.
log = logging.getLogger("gittornado.auth")

_TOKEN_PREFIX = TOKEN_PREFIX.encode("ascii")


def basic_credentials(header: Optional[str]) -> Optional[Tuple[str, bytes]]:
    """``(user, password)`` from an ``Authorization: Basic`` header.

    ``None`` when there is no header or it uses another scheme (the client is
    anonymous to this policy); :class:`AuthenticationFailed` when it is Basic
    but malformed.  The password stays bytes, exactly as the client sent it.
    """
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        name, colon, password = base64.b64decode(token.strip(), validate=True).partition(b":")
        user = name.decode("utf-8")
    except (binascii.Error, ValueError):
        raise AuthenticationFailed("malformed Basic credentials") from None
    if not colon:
        raise AuthenticationFailed("malformed Basic credentials")
    return user, password


class Login(str):
    """The name of a user :class:`IniPolicy` logged in, saying how.

    It is the user name (a ``str``) wherever a name is used; ``auth`` is
    what the access log reports (``password``, or ``token:<id>``), and
    ``token`` the token whose scope narrows the user's rights, if one was used.
    """

    auth: str
    token: Optional[Token]

    def __new__(cls, user: str, token: Optional[Token] = None) -> Login:
        login = super().__new__(cls, user)
        login.auth = f"token:{token.id}" if token is not None else "password"
        login.token = token
        return login


class CredentialMemory:
    """(user, password) pairs seen recently, keyed by HMAC-SHA256 under a random per-process key.

    It never holds a password, nor anything a guess could be tested against
    offline.  Entries expire after ``ttl`` seconds; at most ``size`` are kept.
    """

    def __init__(
        self, ttl: float = 60.0, size: int = 1024, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl = ttl
        self.size = size
        self._clock = clock
        self._key = secrets.token_bytes(32)
        self._expiry: OrderedDict[bytes, float] = OrderedDict()

    def key(self, user: str, password: bytes, client: str = "") -> bytes:
        """The key for these credentials (sent from ``client``, when that matters)."""
        fields = [client.encode("utf-8", "surrogatepass"), user.encode("utf-8", "surrogatepass"), password]
        message = b"".join(len(field).to_bytes(4, "big") + field for field in fields)
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def __contains__(self, key: bytes) -> bool:
        expiry = self._expiry.get(key)
        if expiry is None:
            return False
        if self._clock() >= expiry:
            del self._expiry[key]
            return False
        return True

    def add(self, key: bytes) -> None:
        """Remember these credentials for ``ttl`` seconds."""
        self._expiry[key] = self._clock() + self.ttl
        self._expiry.move_to_end(key)
        while len(self._expiry) > self.size:
            self._expiry.popitem(last=False)

    def clear(self) -> None:
        """Forget everything (the file changed: a password may have, too)."""
        self._expiry.clear()


class VerifiedCredentials(CredentialMemory):
    """Recently verified credentials, so a clone costs one hash check, not one per request."""


class FailedCredentials(CredentialMemory):
    """Recently refused credentials per client, so a client resending them costs no check and no count.

    libgit2 resends a refused password many times per operation, JGit a few:
    counted each time, one typo would throttle the whole address.
    """


def _timed_check(password: bytes, hashed: Optional[str]) -> TimedCheck:
    """Whether ``password`` matches ``hashed`` (never, without one), when the check began, how long it took.

    Runs in a pool thread (:class:`~gittornado.throttle.FairVerifier`), for
    logins and for :class:`~gittornado.throttle.CheckCosts`' measurements;
    ``verify_password`` is looked up here when called, so one replacement of
    it (a test watching the checks) sees them all.
    """
    began = time.monotonic()
    matches = hashed is not None and verify_password(password, hashed)
    return matches, began, time.monotonic() - began


def _file_stamp(path: str) -> Optional[Tuple[int, int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class IniPolicy(AccessPolicy):
    """Users, groups and per-repository rights from a users.ini file.

    Loading raises :class:`AccessFileError` (or OSError) for a file that
    cannot be used, so a server never starts on one.  Afterwards the file is
    looked at (one ``stat``) at most every ``check_interval`` seconds and
    re-read when it changed; :meth:`reload` re-reads it at once (the
    ``gittornado`` command calls it on SIGHUP).  A reload that fails keeps the
    previous rules and logs why.

    Passwords are checked in a pool of ``workers`` threads shared fairly
    between clients, at most ``checks_per_client`` at once for one client,
    never on the event loop.  Successes are remembered for ``cache_ttl``
    seconds; a refused (user, password) that the same client sends again is
    answered 401 at once, without a check or a count, for ``failure_ttl``
    seconds.  Attempts are counted per client and user by ``throttle``.  Every
    checked rejection takes as long as a check of the slowest hash in the file
    (waiting, not computing), so its time tells nothing about which names exist.

    A [tokens] token sent as the password takes the same path (memories,
    throttle, padding) with a SHA-256 for the hash check; the name it returns
    is a :class:`Login` carrying the token, whose scope :meth:`authorize`
    intersects with the user's rights.
    """

    def __init__(
        self,
        path: str,
        realm: Optional[str] = "gittornado",
        *,
        throttle: Optional[FailureThrottle] = None,
        cache_ttl: float = 60.0,
        check_interval: float = 1.0,
        workers: int = 2,
        failure_ttl: float = 900.0,
        checks_per_client: int = 2,
    ) -> None:
        self.path = path
        self.realm = realm
        self.throttle = throttle if throttle is not None else FailureThrottle()
        self.check_interval = check_interval
        self._verified = VerifiedCredentials(cache_ttl)
        self._failed = FailedCredentials(failure_ttl, size=4096)
        self._verifier = FairVerifier(workers, checks_per_client)
        self._costs = CheckCosts(self._verifier, _timed_check)
        self._stamp = _file_stamp(path)
        self._rules = load_access_file(path, hash_scheme)
        self._samples = setting_samples(self._rules.users.values())
        self._generation = 0
        self._next_check = time.monotonic() + check_interval

    @property
    def rules(self) -> AccessRules:
        """The rules in force, after re-reading the file if it changed."""
        self._refresh()
        return self._rules

    def _refresh(self) -> None:
        """Reload if the file changed; looks (one stat) at most every ``check_interval``."""
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + self.check_interval
            if _file_stamp(self.path) != self._stamp:
                self.reload()

    def reload(self) -> bool:
        """Re-read the file now; on failure keep the previous rules and log why."""
        stamp = _file_stamp(self.path)
        try:
            rules = load_access_file(self.path, hash_scheme)
        except (OSError, AccessFileError) as error:
            # Remember the broken version, so it is reported once, not on every check.
            self._stamp = stamp
            log.error("%s: keeping the previous access rules: %s", self.path, error)
            return False
        self._rules, self._stamp = rules, stamp
        self._samples = setting_samples(rules.users.values())
        self._verified.clear()
        self._failed.clear()
        self._generation += 1
        log.info("%s: access rules loaded (%d users)", self.path, len(rules.users))
        return True

    async def authenticate(self, request: HTTPServerRequest) -> Optional[str]:
        credentials = basic_credentials(request.headers.get("Authorization"))
        if credentials is None:
            return None
        user, password = credentials
        self._refresh()  # a changed file clears the caches before they are consulted
        if password.startswith(_TOKEN_PREFIX):
            return await self._token_login(request, user, password)
        verified_key = self._verified.key(user, password)
        if verified_key in self._verified:
            return Login(user)
        client = client_group(request.remote_ip or "unknown")
        failed_key = self._failed.key(user, password, client)
        if failed_key in self._failed:
            log.debug("refused credentials sent again for user %.80r from %s", user, client)
            raise AuthenticationFailed("wrong password or unknown user")
        await self.throttle.admit(client, user)
        generation, samples = self._generation, self._samples
        hashed = self.rules.users.get(user)
        # An unknown name costs no check, only the same wait (below) as a wrong password.
        matches, began, seconds = await self._verifier.run(
            client, functools.partial(_timed_check, password, hashed)
        )
        if hashed is not None:
            self._costs.observe(hash_setting(hashed), seconds)
        current = generation == self._generation  # else checked against a hash replaced meanwhile
        if matches:
            self.throttle.forgive(client, user)
            if current:
                self._verified.add(verified_key)
            return Login(user)
        if current:
            self._failed.add(failed_key)
        log.warning("authentication failed for user %.80r from %s", user, client)
        await self._costs.pad_rejection(began, samples)
        raise AuthenticationFailed("wrong password or unknown user")

    async def _token_login(self, request: HTTPServerRequest, user: str, secret: bytes) -> Login:
        """Log ``user`` in with a token: the password path's memories and throttle, a SHA-256 for bcrypt.

        A token is checked whenever it is used, even when remembered as
        verified (that only spares it the throttle), so expiry and revocation
        take effect on the next request.
        """
        client = client_group(request.remote_ip or "unknown")
        claimed = token_id(secret)
        if claimed is None:
            # No file can make it valid, so there is nothing to count, check or hide.
            log.warning("authentication failed for user %.80r from %s: malformed token", user, client)
            raise AuthenticationFailed("malformed token")
        verified_key = self._verified.key(user, secret)
        token = self._valid_token(user, claimed, secret)
        if token is not None and verified_key in self._verified:
            return Login(user, token)
        failed_key = self._failed.key(user, secret, client)
        if failed_key in self._failed:
            log.debug("refused token %s sent again for user %.80r from %s", claimed, user, client)
            raise AuthenticationFailed("wrong, expired or revoked token")
        await self.throttle.admit(client, user)
        generation, samples = self._generation, self._samples
        began = time.monotonic()
        token = self._valid_token(user, claimed, secret)  # again: the file may have changed meanwhile
        if token is not None:
            self.throttle.forgive(client, user)
            self._verified.add(verified_key)
            return Login(user, token)
        if generation == self._generation:
            self._failed.add(failed_key)
        log.warning("authentication failed for user %.80r from %s with token %s", user, client, claimed)
        await self._costs.pad_rejection(began, samples)
        raise AuthenticationFailed("wrong, expired or revoked token")

    def _valid_token(self, user: str, claimed: str, secret: bytes) -> Optional[Token]:
        """The token ``secret`` is, if it is ``user``'s, in force and the user still has a password."""
        rules = self.rules
        token = rules.tokens.get(claimed)
        if token is None or token.user != user or user not in rules.users:
            return None
        if not verify_token(secret, token.digest) or token.expired(datetime.now(timezone.utc)):
            return None
        return token

    def authorize(self, user: Optional[str], repository: str, permission: Permission) -> bool:
        token = getattr(user, "token", None)
        if token is not None and not token.allows(repository, permission):
            return False
        return self.rules.allows(user, repository, permission)
