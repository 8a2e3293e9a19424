"""IniPolicy: the access policy of a users.ini file (hash checks, throttle, credential caches, reloading).

Users with htpasswd hashes, groups and per-repository ``r``/``rw`` rules, as
:mod:`gittornado.usersfile` reads them, behind HTTP Basic authentication.  A
token (``gtt_...``) may stand in for a user's password; it logs the user in
for the intersection of its scope and the user's rights, until it expires.
README.md's "Access control" section says what an attacker can and cannot do
against these rules; the classes here implement exactly that.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import hmac
import ipaddress
import logging
import math
import os
import secrets
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Callable, Deque, Dict, Mapping, Optional, Tuple, TypeVar

from tornado.httputil import HTTPServerRequest

from .access import AccessDenied, AccessPolicy, AuthenticationFailed
from .passwords import TOKEN_PREFIX, hash_scheme, hash_setting, token_id, verify_password, verify_token
from .permission import Permission
from .usersfile import AccessFileError, AccessRules, Token, load_access_file

#: Not "gittornado.access": that name is the per-request access log.
log = logging.getLogger("gittornado.auth")

T = TypeVar("T")

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


def client_group(address: str) -> str:
    """The name the throttle and the verifier know a client address by.

    IPv4 addresses count one by one; IPv6 addresses by their /64 network,
    because whoever has one address of a /64 (a home, a cloud instance)
    usually has all 2**64 of them.  An IPv4-mapped IPv6 address counts as the
    IPv4 address; anything that is not an address is used as it is.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone (fe80::1%eth0)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class FailureThrottle:
    """Counts failed logins per client and per (client, user); slows them down, then refuses them.

    A client is an address group (:func:`client_group`).  Each attempt is
    counted when it is admitted, before its password is checked, and given
    back (:meth:`forgive`) when the password was right, so a burst of parallel
    guesses is counted as it arrives, not after its checks finish.

    Two counters hold each attempt, and each is a leaky bucket that forgets
    its whole limit over ``window`` seconds (one failure every
    ``window / limit`` seconds), so occasional typos never add up:

    * per (client, user name): the first ``free`` failures cost nothing, later
      attempts wait ``delay`` seconds, doubling up to ``max_delay``; at
      ``limit`` that name is refused (429 with ``Retry-After``) from that client;
    * per client, all names together: the same with ``address_free`` (default
      ``4 * free``) and ``address_limit`` (default ``5 * limit``), which stops
      a client trying one password on many names.  ``address_limit`` exceeds
      ``limit``, so one user's failures never lock out other users of the
      client's address.

    At most ``max_clients`` counters are kept, least recently used dropped
    first.  User names are kept as digests, so long names cost no memory.
    """

    def __init__(
        self,
        free: int = 5,
        limit: int = 20,
        delay: float = 0.25,
        max_delay: float = 4.0,
        window: float = 3600.0,
        max_clients: int = 10000,
        clock: Callable[[], float] = time.monotonic,
        *,
        address_free: Optional[int] = None,
        address_limit: Optional[int] = None,
    ) -> None:
        self.free = free
        self.limit = limit
        self.delay = delay
        self.max_delay = max_delay
        self.window = window
        self.address_free = address_free if address_free is not None else 4 * free
        self.address_limit = address_limit if address_limit is not None else 5 * limit
        if self.address_limit <= limit:
            raise ValueError("address_limit must exceed limit, or one user could lock out an address")
        self.max_clients = max_clients
        self._clock = clock
        #: counter key -> (failures, when last updated)
        self._levels: OrderedDict[Tuple[str, ...], Tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._levels)

    def _counters(self, client: str, user: Optional[str]) -> Tuple[Tuple[Tuple[str, ...], int, int], ...]:
        """(key, free, limit) of the counters an attempt of ``user`` from ``client`` goes into."""
        address = (("address", client), self.address_free, self.address_limit)
        if user is None:
            return (address,)
        name = hashlib.sha256(user.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        return (address, (("user", client, name), self.free, self.limit))

    def _level(self, key: Tuple[str, ...], limit: int, now: float) -> float:
        entry = self._levels.get(key)
        if entry is None:
            return 0.0
        level, updated = entry
        return max(0.0, level - (now - updated) * limit / self.window)

    def _add(self, key: Tuple[str, ...], limit: int, amount: float, now: float) -> None:
        level = self._level(key, limit, now) + amount
        if level <= 0:
            self._levels.pop(key, None)
            return
        self._levels[key] = (level, now)
        self._levels.move_to_end(key)
        while len(self._levels) > self.max_clients:
            self._levels.popitem(last=False)

    def failures(self, client: str, user: Optional[str] = None) -> float:
        """Failures ``client`` is charged with: for ``user``, or for all names together."""
        key, _, limit = self._counters(client, user)[-1]
        return self._level(key, limit, self._clock())

    async def admit(self, client: str, user: str) -> None:
        """Count an attempt of ``user`` from ``client`` and wait what it has earned.

        Raises a 429 :class:`AccessDenied` (nothing counted) when a counter is full.
        """
        now = self._clock()
        counters = self._counters(client, user)
        levels = [self._level(key, limit, now) for key, _, limit in counters]
        for (_, _, limit), level in zip(counters, levels):
            if level > limit - 1:
                retry_after = math.ceil((level - (limit - 1)) * self.window / limit)
                raise AccessDenied(429, "Too many failed logins", retry_after=max(1, retry_after))
        for key, _, limit in counters:
            self._add(key, limit, 1, now)
        # A failure counts whole until it has leaked away entirely (ceil), give or take float error.
        steps = max(math.ceil(level - 1e-9) - free for (_, free, _), level in zip(counters, levels))
        if steps >= 0:
            await asyncio.sleep(min(self.delay * 2**steps, self.max_delay))

    def forgive(self, client: str, user: str) -> None:
        """Give back the attempt :meth:`admit` counted: its password was right."""
        now = self._clock()
        for key, _, limit in self._counters(client, user):
            self._add(key, limit, -1, now)


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


class FairVerifier:
    """Runs password checks in a small thread pool, taking turns between clients.

    Each client (:func:`client_group`) has its own queue and at most
    ``per_client`` checks running; a free thread takes the next check of the
    next client in turn, so a client with many queued guesses delays another
    client's login by about one check, not by its whole queue.  The pool is
    created on first use, so a server that forks starts no thread before.
    """

    def __init__(self, workers: int = 2, per_client: int = 2) -> None:
        self.workers = workers
        self.per_client = per_client
        self._executor: Optional[ThreadPoolExecutor] = None
        self._running: Dict[str, int] = {}
        self._queues: OrderedDict[str, Deque[Tuple[Callable[[], object], asyncio.Future]]] = OrderedDict()

    async def run(self, client: str, check: Callable[[], T]) -> T:
        """Run ``check`` in the pool, in ``client``'s turn; its result."""
        done: asyncio.Future = asyncio.get_running_loop().create_future()
        self._queues.setdefault(client, deque()).append((check, done))
        self._start_checks()
        return await done

    def _start_checks(self) -> None:
        while sum(self._running.values()) < self.workers:
            for client in self._queues:
                if self._running.get(client, 0) < self.per_client:
                    break
            else:
                return
            queue = self._queues.pop(client)
            check, done = queue.popleft()
            if queue:
                self._queues[client] = queue  # at the end: the others go first next time
            if done.cancelled():
                continue
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="gittornado-passwords")
            self._running[client] = self._running.get(client, 0) + 1
            running = asyncio.wrap_future(self._executor.submit(check))
            running.add_done_callback(lambda finished, c=client, d=done: self._finished(c, finished, d))

    def _finished(self, client: str, finished: asyncio.Future, done: asyncio.Future) -> None:
        self._running[client] -= 1
        if not self._running[client]:
            del self._running[client]
        if not done.done():
            error = finished.exception()
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(finished.result())
        self._start_checks()


def _timed_check(password: bytes, hashed: Optional[str]) -> Tuple[bool, float, float]:
    """Whether ``password`` matches ``hashed`` (never, without one), when the check began, how long it took.

    Runs in a pool thread; ``verify_password`` is looked up when called.
    """
    began = time.monotonic()
    matches = hashed is not None and verify_password(password, hashed)
    return matches, began, time.monotonic() - began


class CheckCosts:
    """How long a password check takes per hash setting, so every rejection can take the slowest's time.

    A setting (:func:`~gittornado.passwords.hash_setting`) is measured the
    first time a rejection needs it, by checking a wrong password against one
    of its hashes in the verifier's pool.  Real checks can only raise the
    estimate (when the machine is busy), never lower it below that
    measurement: a client could otherwise send passwords that fail fast (a NUL
    byte, which bcrypt refuses unchecked) to shorten every rejection.
    """

    def __init__(self, verifier: FairVerifier) -> None:
        self._verifier = verifier
        self._measured: Dict[str, float] = {}
        self._recent: Dict[str, float] = {}
        self._measuring: Dict[str, asyncio.Future] = {}

    def observe(self, setting: str, seconds: float) -> None:
        """Count one real check of ``setting`` that took ``seconds``."""
        recent = self._recent.get(setting)
        self._recent[setting] = seconds if recent is None else 0.8 * recent + 0.2 * seconds

    async def slowest(self, samples: Mapping[str, str]) -> float:
        """Seconds a check of the slowest setting in ``samples`` (setting -> one of its hashes) takes."""
        missing = [setting for setting in samples if setting not in self._measured]
        for setting in missing:
            if setting not in self._measuring:
                self._measuring[setting] = asyncio.ensure_future(self._measure(setting, samples[setting]))
        if missing:
            measuring = [self._measuring[setting] for setting in missing if setting in self._measuring]
            await asyncio.gather(*map(asyncio.shield, measuring), return_exceptions=True)
        return max((max(self._measured.get(s, 0.0), self._recent.get(s, 0.0)) for s in samples), default=0.0)

    async def _measure(self, setting: str, hashed: str) -> None:
        try:
            check = functools.partial(_timed_check, secrets.token_hex(16).encode(), hashed)
            _, _, seconds = await self._verifier.run("(measuring)", check)
            self._measured[setting] = seconds
        finally:
            del self._measuring[setting]


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
        self._costs = CheckCosts(self._verifier)
        self._stamp = _file_stamp(path)
        self._rules = load_access_file(path, hash_scheme)
        self._samples = _setting_samples(self._rules)
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
        self._samples = _setting_samples(rules)
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
        await self._pad_rejection(began, samples)
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
        await self._pad_rejection(began, samples)
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

    async def _pad_rejection(self, began: float, samples: Mapping[str, str]) -> None:
        """Wait until a rejection that began at ``began`` took as long as the slowest hash check.

        It always ends on a timer, whether or not a check ran: a check that already took the slowest time
        would otherwise end a moment sooner than a wait for it, and that moment can be measured.
        """
        slowest = await self._costs.slowest(samples)
        await asyncio.sleep(max(_PAD_MARGIN, began + slowest + _PAD_MARGIN - time.monotonic()))

    def authorize(self, user: Optional[str], repository: str, permission: Permission) -> bool:
        token = getattr(user, "token", None)
        if token is not None and not token.allows(repository, permission):
            return False
        return self.rules.allows(user, repository, permission)


#: Seconds every rejection waits beyond the slowest check (see IniPolicy.authenticate).
_PAD_MARGIN = 0.005


def _setting_samples(rules: AccessRules) -> Dict[str, str]:
    """One hash of each setting the file uses, to measure what checking it costs."""
    samples: Dict[str, str] = {}
    for hashed in rules.users.values():
        samples.setdefault(hash_setting(hashed), hashed)
    return samples
