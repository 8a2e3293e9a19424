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

:class:`IniPolicy` is the implementation the ``gittornado`` command uses: users
with htpasswd hashes, groups and per-repository ``r``/``rw`` rules from one
users.ini file, reloaded when it changes.  The README's "Access control"
section describes the format; :class:`AccessRules` decides exactly as it says.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import enum
import hashlib
import hmac
import logging
import math
import os
import re
import secrets
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, List, Mapping, Optional, Pattern, Set, Tuple

from passlib.context import CryptContext
from tornado.httputil import HTTPServerRequest
from tornado.web import HTTPError

from .util import maybe_await


class Permission(enum.Enum):
    """What a request needs: reading (fetch, clone, dumb files) or writing (push)."""

    READ = "r"
    WRITE = "w"


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


# -- users.ini ---------------------------------------------------------------

#: Not "gittornado.access": that name is the per-request access log.
log = logging.getLogger("gittornado.auth")

#: The hash formats htpasswd writes that are still worth accepting, verified by
#: passlib (libpass): bcrypt ($2y$, htpasswd -B; what gittornado-passwd writes),
#: Apache MD5 ($apr1$, htpasswd's default), SHA-1 ({SHA}, htpasswd -s) and
#: SHA-256/512 crypt ($5$/$6$, htpasswd -2/-5).  Plain text, DES crypt and
#: anything else is refused when the file is loaded.
PASSWORD_HASHES = CryptContext(
    schemes=["bcrypt", "apr_md5_crypt", "sha512_crypt", "sha256_crypt", "ldap_sha1"]
)

#: bcrypt reads only the first 72 bytes of a password; htpasswd and Apache cut there too.
BCRYPT_MAX_BYTES = 72

_SECTIONS = ("users", "groups", "access")
#: An inline comment: ``;`` or ``#`` at the start of a line or after whitespace
#: (no hash format contains whitespace, so a hash is never cut).
_COMMENT = re.compile(r"(?:^|\s)[;#]")
_DELIMITER = re.compile(r"[=:]")
#: Characters a user name may not contain: the file's own syntax and whitespace.
_NOT_IN_NAME = re.compile(r"[\s=:;#\[\],]|[\x00-\x1f\x7f]")


class AccessFileError(ValueError):
    """users.ini cannot be used.  The message names the file and line, never a hash."""


@dataclass(frozen=True)
class IniLine:
    """One line of a users.ini, split the way both the loader and gittornado-passwd read it.

    ``section`` is the lower-cased section the line belongs to (``""`` before
    the first header).  An entry has a ``key``; ``value_span`` locates its
    value inside ``text`` so a tool can replace the value and keep the rest of
    the line (spacing, inline comment) as it was.  A line that is neither
    blank, comment, header nor entry has ``malformed`` set.
    """

    number: int
    text: str
    section: str
    is_header: bool = False
    key: Optional[str] = None
    value_span: Tuple[int, int] = (0, 0)
    malformed: bool = False

    @property
    def value(self) -> str:
        """The entry's value, without surrounding space or inline comment."""
        return self.text[self.value_span[0] : self.value_span[1]]


def split_ini_lines(text: str) -> List[IniLine]:
    """Split users.ini text (lines separated by ``\\n``) into :class:`IniLine` s.

    Keys end at the first ``=`` or ``:``, so files written either way load.
    """
    lines = []
    section = ""
    for number, line in enumerate(text.split("\n"), start=1):
        comment = _COMMENT.search(line)
        content = line[: comment.start()] if comment else line
        stripped = content.strip()
        if not stripped:
            lines.append(IniLine(number, line, section))
        elif stripped.startswith("["):
            if stripped.endswith("]"):
                section = stripped[1:-1].strip().lower()
                lines.append(IniLine(number, line, section, is_header=True))
            else:
                lines.append(IniLine(number, line, section, malformed=True))
        else:
            delimiter = _DELIMITER.search(content)
            key = content[: delimiter.start()].strip() if delimiter else ""
            if not delimiter or not key:
                lines.append(IniLine(number, line, section, malformed=True))
                continue
            end = len(content.rstrip())
            start = delimiter.end()
            while start < end and content[start].isspace():
                start += 1
            lines.append(IniLine(number, line, section, key=key, value_span=(start, end)))
    return lines


def valid_user_name(name: str) -> bool:
    """Whether ``name`` can be written to and read back from users.ini unchanged.

    ``*`` and a leading ``@`` are reserved for "everyone" and groups.
    """
    return bool(name) and name != "*" and not name.startswith("@") and not _NOT_IN_NAME.search(name)


def _strip_git(name: str) -> str:
    return name[:-4] if name.endswith(".git") else name


@dataclass(frozen=True)
class RepositoryRule:
    """``pattern=r`` or ``pattern=rw`` from an [access] line.

    The pattern is matched against the whole repository path with any
    ``.git`` suffix removed from both, so ``proj`` and ``proj.git`` are one
    name; ``*`` matches any run of characters (``/`` included) and ``?`` any
    one character.
    """

    pattern: str
    write: bool
    regex: Pattern[str] = field(compare=False, repr=False)

    @classmethod
    def parse(cls, text: str) -> RepositoryRule:
        """Parse ``pattern=r|rw``; raises ValueError saying what is wrong."""
        pattern, sep, right = text.rpartition("=")
        pattern, right = pattern.strip(), right.strip().lower()
        # Messages never quote the line: a hash pasted into the wrong section must not reach a log.
        if not sep or not pattern:
            raise ValueError("each rule must be repository=r or repository=rw")
        if right not in ("r", "rw"):
            raise ValueError("a right must be r or rw")
        if pattern.startswith("/") or "\\" in pattern:
            raise ValueError("repository paths are relative to the root, with / separators")
        translated = "".join(
            ".*" if c == "*" else "." if c == "?" else re.escape(c) for c in _strip_git(pattern)
        )
        return cls(pattern, right == "rw", re.compile(translated, re.DOTALL))

    def matches(self, repository: str) -> bool:
        """Whether the rule names ``repository`` (a path relative to the root)."""
        return self.regex.fullmatch(_strip_git(repository)) is not None


@dataclass(frozen=True)
class AccessRules:
    """The decision table of one users.ini.

    ``users`` maps names to password hashes, ``groups`` group names (without
    ``@``) to members, ``grants`` each subject of an [access] line (``*``, a
    user name or ``@group``) to its rules.
    """

    users: Mapping[str, str]
    groups: Mapping[str, FrozenSet[str]]
    grants: Mapping[str, Tuple[RepositoryRule, ...]]

    def subjects(self, user: Optional[str]) -> List[str]:
        """The [access] keys that speak for ``user``: ``*``, the user, the user's groups."""
        if user is None:
            return ["*"]
        return ["*", user] + [f"@{group}" for group, members in self.groups.items() if user in members]

    def allows(self, user: Optional[str], repository: str, permission: Permission) -> bool:
        """Whether any rule for ``user`` grants ``permission`` on ``repository``.

        Rights only add up: ``rw`` implies ``r``; no matching rule, no access.
        """
        return any(
            (rule.write or permission is Permission.READ) and rule.matches(repository)
            for subject in self.subjects(user)
            for rule in self.grants.get(subject, ())
        )


def parse_access_file(text: str, filename: str) -> AccessRules:
    """Parse users.ini text; raises :class:`AccessFileError` naming ``filename`` and the line.

    Hashes are checked for a known format here, so a broken line stops the
    server at startup (or a reload) instead of failing logins later.  Error
    messages name users but never quote a [users] value.
    """
    users: Dict[str, str] = {}
    groups: Dict[str, Set[str]] = {}
    grants: Dict[str, List[RepositoryRule]] = {}
    group_references: List[Tuple[IniLine, str]] = []

    for line in split_ini_lines(text):
        where = f"{filename}, line {line.number}"
        if line.malformed:
            raise AccessFileError(f"{where}: expected [section] or name = value")
        if line.is_header:
            if line.section not in _SECTIONS:
                raise AccessFileError(
                    f"{where}: unknown section [{line.section}] (use [users], [groups], [access])"
                )
            continue
        if line.key is None:
            continue
        if not line.section:
            raise AccessFileError(f"{where}: {line.key!r} comes before any [section]")
        if line.section == "users":
            users[line.key] = _checked_hash(line, where)
        elif line.section == "groups":
            if not valid_user_name(line.key):
                raise AccessFileError(f"{where}: {line.key!r} is not a valid group name")
            members = groups.setdefault(line.key, set())
            for member in filter(None, re.split(r"[\s,]+", line.value)):
                if member.startswith("@"):
                    raise AccessFileError(f"{where}: group {line.key!r}: groups cannot contain groups")
                members.add(member)
        else:
            if line.key.startswith("@"):
                group_references.append((line, line.key[1:]))
            elif line.key != "*" and not valid_user_name(line.key):
                raise AccessFileError(f"{where}: {line.key!r} is not *, a user name or @group")
            rules = grants.setdefault(line.key, [])
            for item in filter(None, (part.strip() for part in line.value.split(","))):
                try:
                    rules.append(RepositoryRule.parse(item))
                except ValueError as error:
                    raise AccessFileError(f"{where}: {error}") from None

    for line, group in group_references:
        if group not in groups:
            raise AccessFileError(f"{filename}, line {line.number}: no group {group!r} in [groups]")
    return AccessRules(
        users=users,
        groups={name: frozenset(members) for name, members in groups.items()},
        grants={subject: tuple(rules) for subject, rules in grants.items()},
    )


def _checked_hash(line: IniLine, where: str) -> str:
    """The [users] line's hash, or AccessFileError naming the user (never the value)."""
    user = line.key or ""
    if not valid_user_name(user):
        # Not quoted: a mangled line may have a password where the name should be.
        raise AccessFileError(
            f"{where}: not a valid user name (no spaces or = : ; # [ ] , and not * or @...)"
        )
    hashed = line.value
    scheme = PASSWORD_HASHES.identify(hashed)
    if scheme is None:
        raise AccessFileError(
            f"{where}: user {user!r}: not a password hash gittornado accepts "
            "(bcrypt, $apr1$, {SHA}, $5$, $6$); set the password with gittornado-passwd"
        )
    try:
        PASSWORD_HASHES.handler(scheme).from_string(hashed)
    except ValueError:
        raise AccessFileError(f"{where}: user {user!r}: malformed {scheme} hash") from None
    return hashed


def load_access_file(path: str) -> AccessRules:
    """Read and parse the users.ini at ``path`` (OSError if unreadable)."""
    with open(path, encoding="utf-8-sig") as f:  # -sig: editors that write a BOM
        text = f.read()
    return parse_access_file(text, path)


def verify_password(password: bytes, hashed: str) -> bool:
    """Check ``password`` against one users.ini hash, in constant time.

    Slow by design (bcrypt): call it off the event loop.  Any error (an
    oversized password, say) is a failed check, never an exception that could
    carry the password somewhere.
    """
    if PASSWORD_HASHES.identify(hashed) == "bcrypt":
        password = password[:BCRYPT_MAX_BYTES]
    try:
        return bool(PASSWORD_HASHES.verify(password, hashed))
    except (ValueError, TypeError):
        return False


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
        self._rules = load_access_file(path)
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
            rules = load_access_file(self.path)
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
