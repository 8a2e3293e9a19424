"""IniPolicy: the access policy of a users.ini file (hash checks, throttle, credential cache, reloading).

Users with htpasswd hashes, groups and per-repository ``r``/``rw`` rules, as
:mod:`gittornado.usersfile` reads them, behind HTTP Basic authentication.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import math
import os
import secrets
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Tuple

from tornado.httputil import HTTPServerRequest

from .access import AccessDenied, AccessPolicy, AuthenticationFailed
from .passwords import hash_scheme, verify_password
from .permission import Permission
from .usersfile import AccessFileError, AccessRules, load_access_file

#: Not "gittornado.access": that name is the per-request access log.
log = logging.getLogger("gittornado.auth")


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


class FailureThrottle:
    """Slows down, then refuses, a client address that keeps sending wrong passwords.

    The first ``free`` failures cost nothing (people mistype); each later
    attempt waits ``delay`` seconds, doubling up to ``max_delay``; from
    ``limit`` failures on, the address gets 429 with ``Retry-After`` until
    ``window`` seconds after its last failure, when it is forgotten.  At most
    ``max_clients`` addresses are remembered, least recently failed dropped
    first, so a scan from many addresses cannot grow it without bound.  Other
    addresses are never affected.
    """

    def __init__(
        self,
        free: int = 5,
        limit: int = 20,
        delay: float = 0.25,
        max_delay: float = 4.0,
        window: float = 300.0,
        max_clients: int = 10000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.free = free
        self.limit = limit
        self.delay = delay
        self.max_delay = max_delay
        self.window = window
        self.max_clients = max_clients
        self._clock = clock
        self._failures: OrderedDict[str, Tuple[int, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._failures)

    def failures(self, address: str) -> int:
        """Recent failures from ``address`` (0 once its window has passed)."""
        entry = self._failures.get(address)
        if entry is None:
            return 0
        if self._clock() - entry[1] >= self.window:
            del self._failures[address]
            return 0
        return entry[0]

    async def admit(self, address: str) -> None:
        """Wait as long as ``address`` has earned, or raise a 429 :class:`AccessDenied`."""
        count = self.failures(address)
        if count >= self.free:
            self._refuse_if_blocked(address)
            await asyncio.sleep(min(self.delay * 2 ** (count - self.free), self.max_delay))
            # Parallel attempts may have used up the rest of the allowance meanwhile.
            self._refuse_if_blocked(address)

    def failed(self, address: str) -> None:
        """Count one more failure from ``address``."""
        self._failures[address] = (self.failures(address) + 1, self._clock())
        self._failures.move_to_end(address)
        while len(self._failures) > self.max_clients:
            self._failures.popitem(last=False)

    def _refuse_if_blocked(self, address: str) -> None:
        if self.failures(address) >= self.limit:
            last = self._failures[address][1]
            retry_after = max(1, math.ceil(last + self.window - self._clock()))
            raise AccessDenied(429, "Too many failed logins", retry_after=retry_after)


class VerifiedCredentials:
    """Recently verified (user, password) pairs, so a clone costs one hash check, not one per request.

    Entries are keyed by HMAC-SHA256 under a random per-process key: the cache
    never holds a password, nor anything a guess could be tested against
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

    def key(self, user: str, password: bytes) -> bytes:
        """The cache key for these credentials."""
        name = user.encode("utf-8")
        return hmac.new(self._key, len(name).to_bytes(4, "big") + name + password, hashlib.sha256).digest()

    def __contains__(self, key: bytes) -> bool:
        expiry = self._expiry.get(key)
        if expiry is None:
            return False
        if self._clock() >= expiry:
            del self._expiry[key]
            return False
        return True

    def add(self, key: bytes) -> None:
        """Remember a successful verification."""
        self._expiry[key] = self._clock() + self.ttl
        self._expiry.move_to_end(key)
        while len(self._expiry) > self.size:
            self._expiry.popitem(last=False)

    def clear(self) -> None:
        """Forget everything (the file changed: a password may have, too)."""
        self._expiry.clear()


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

    Passwords are verified in a pool of ``workers`` threads, never on the
    event loop; successes are cached for ``cache_ttl`` seconds; wrong
    passwords are counted per client address by ``throttle``.
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
    ) -> None:
        self.path = path
        self.realm = realm
        self.throttle = throttle if throttle is not None else FailureThrottle()
        self.check_interval = check_interval
        self._verified = VerifiedCredentials(cache_ttl)
        self._workers = workers
        # Created on first use, so a server that forks workers starts no thread before the fork.
        self._executor: Optional[ThreadPoolExecutor] = None
        self._stamp = _file_stamp(path)
        self._rules = load_access_file(path, hash_scheme)
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
        self._verified.clear()
        self._generation += 1
        log.info("%s: access rules loaded (%d users)", self.path, len(rules.users))
        return True

    async def authenticate(self, request: HTTPServerRequest) -> Optional[str]:
        credentials = basic_credentials(request.headers.get("Authorization"))
        if credentials is None:
            return None
        user, password = credentials
        key = self._verified.key(user, password)
        self._refresh()  # a changed file clears the cache before it is consulted
        if key in self._verified:
            return user
        address = request.remote_ip or "unknown"
        await self.throttle.admit(address)
        generation = self._generation
        users = self.rules.users
        hashed = users.get(user)
        # An unknown name costs a real check too (against some user's hash, the
        # answer ignored), so response times do not tell which names exist.
        decoy = hashed if hashed is not None else next(iter(users.values()), None)
        verified = decoy is not None and await self._verify(password, decoy)
        if hashed is None or not verified:
            self.throttle.failed(address)
            log.warning("authentication failed for user %.80r from %s", user, address)
            raise AuthenticationFailed("wrong password or unknown user")
        if generation == self._generation:  # not checked against a hash replaced meanwhile
            self._verified.add(key)
        return user

    def authorize(self, user: Optional[str], repository: str, permission: Permission) -> bool:
        return self.rules.allows(user, repository, permission)

    async def _verify(self, password: bytes, hashed: str) -> bool:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._workers, thread_name_prefix="gittornado-passwords")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, verify_password, password, hashed)
