"""The users.ini grammar: sections, users, groups, per-repository rules and tokens.

Read by the access policy (:mod:`gittornado.inipolicy`) and edited by
``gittornado-passwd`` (:mod:`gittornado.passwd`), so both see one file the
same way.  It imports neither Tornado nor a hashing library: whether a
[users] value is a hash worth accepting is asked of the ``hash_scheme``
callable the caller passes (:func:`gittornado.passwords.hash_scheme`).

The README's "Access control" section describes the format;
:class:`AccessRules` decides exactly as it says.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Dict, FrozenSet, List, Mapping, Optional, Pattern, Set, Tuple

from .permission import Permission

#: Says which accepted hash scheme a [users] value is in, or None; raises ValueError for a malformed hash.
HashScheme = Callable[[str], Optional[str]]

_SECTIONS = ("users", "groups", "access", "tokens")
#: An inline comment: ``;`` or ``#`` at the start of a line or after whitespace
#: (no hash format contains whitespace, so a hash is never cut).
_COMMENT = re.compile(r"(?:^|\s)[;#]")
_DELIMITER = re.compile(r"[=:]")
#: Characters a user name may not contain: the file's own syntax and whitespace.
_NOT_IN_NAME = re.compile(r"[\s=:;#\[\],]|[\x00-\x1f\x7f]")
#: A [tokens] key: the id that is part of the token (:func:`gittornado.passwords.new_token`).
_TOKEN_ID = re.compile(r"[0-9a-f]{12}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
#: How [tokens] lines write expiry times: UTC, to the second.
EXPIRY_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


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


def allowed_by(rules: Tuple[RepositoryRule, ...], repository: str, permission: Permission) -> bool:
    """Whether any of ``rules`` grants ``permission`` on ``repository`` (``rw`` implies ``r``)."""
    return any((rule.write or permission is Permission.READ) and rule.matches(repository) for rule in rules)


def format_expiry(when: datetime) -> str:
    """``when`` as [tokens] lines write it (``2027-02-27T04:50:08Z``)."""
    return when.astimezone(timezone.utc).strftime(EXPIRY_FORMAT)


@dataclass(frozen=True)
class Token:
    """A [tokens] line: ``id = user sha256 expiry rule, rule...``.

    A token logs ``user`` in until ``expires``, and only for what its
    ``rules`` (the [access] syntax) grant: the policy intersects them with
    the user's own rights.  ``digest`` is the token's SHA-256, never the token.
    """

    id: str
    user: str
    digest: str = field(repr=False)
    expires: datetime
    rules: Tuple[RepositoryRule, ...]

    def expired(self, now: datetime) -> bool:
        """Whether the token no longer logs anyone in at ``now``."""
        return now >= self.expires

    def allows(self, repository: str, permission: Permission) -> bool:
        """Whether the token's scope covers ``permission`` on ``repository``."""
        return allowed_by(self.rules, repository, permission)

    @property
    def scope(self) -> str:
        """The rules as the file writes them (``team/*=rw, docs=rw``)."""
        return ", ".join(f"{rule.pattern}={'rw' if rule.write else 'r'}" for rule in self.rules)


@dataclass(frozen=True)
class AccessRules:
    """The decision table of one users.ini.

    ``users`` maps names to password hashes, ``groups`` group names (without
    ``@``) to members, ``grants`` each subject of an [access] line (``*``, a
    user name or ``@group``) to its rules, ``tokens`` token ids to tokens.
    """

    users: Mapping[str, str]
    groups: Mapping[str, FrozenSet[str]]
    grants: Mapping[str, Tuple[RepositoryRule, ...]]
    tokens: Mapping[str, Token] = field(default_factory=dict)

    def subjects(self, user: Optional[str]) -> List[str]:
        """The [access] keys that speak for ``user``: ``*``, the user, the user's groups."""
        if user is None:
            return ["*"]
        return ["*", user] + [f"@{group}" for group, members in self.groups.items() if user in members]

    def allows(self, user: Optional[str], repository: str, permission: Permission) -> bool:
        """Whether any rule for ``user`` grants ``permission`` on ``repository``.

        Rights only add up: ``rw`` implies ``r``; no matching rule, no access.
        """
        subjects = self.subjects(user)
        return any(allowed_by(self.grants.get(subject, ()), repository, permission) for subject in subjects)


def parse_access_file(text: str, filename: str, hash_scheme: HashScheme) -> AccessRules:
    """Parse users.ini text; raises :class:`AccessFileError` naming ``filename`` and the line.

    Hashes are checked for a known format here, so a broken line stops the
    server at startup (or a reload) instead of failing logins later.  Error
    messages name users but never quote a [users] or [tokens] value.
    """
    users: Dict[str, str] = {}
    tokens: Dict[str, Token] = {}
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
                    f"{where}: unknown section [{line.section}] (use [users], [groups], [access], [tokens])"
                )
            continue
        if line.key is None:
            continue
        if not line.section:
            raise AccessFileError(f"{where}: {line.key!r} comes before any [section]")
        if line.section == "users":
            users[line.key] = _checked_hash(line, where, hash_scheme)
        elif line.section == "tokens":
            tokens[line.key] = _parse_token(line, where)
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
        tokens=tokens,
    )


def _parse_token(line: IniLine, where: str) -> Token:
    """A [tokens] line, or AccessFileError saying what is wrong (never quoting the value)."""
    token_id = line.key or ""
    if not _TOKEN_ID.fullmatch(token_id):
        raise AccessFileError(f"{where}: a token id is 12 hex digits (gittornado-passwd --new-token)")
    fields = line.value.split(None, 3)
    if len(fields) < 4:
        raise AccessFileError(f"{where}: token {token_id}: expected user sha256 expiry repository=r|rw, ...")
    user, digest, expiry, scope = fields
    if not valid_user_name(user):
        raise AccessFileError(f"{where}: token {token_id}: not a valid user name")
    if not _SHA256_HEX.fullmatch(digest):
        raise AccessFileError(f"{where}: token {token_id}: the token's hash must be 64 hex digits (SHA-256)")
    try:
        expires = datetime.strptime(expiry, EXPIRY_FORMAT).replace(tzinfo=timezone.utc)
    except ValueError:
        raise AccessFileError(f"{where}: token {token_id}: expiry is UTC: 2027-02-27T04:50:08Z") from None
    try:
        rules = tuple(RepositoryRule.parse(item) for item in filter(None, map(str.strip, scope.split(","))))
    except ValueError as error:
        raise AccessFileError(f"{where}: token {token_id}: {error}") from None
    return Token(token_id, user, digest, expires, rules)


def _checked_hash(line: IniLine, where: str, hash_scheme: HashScheme) -> str:
    """The [users] line's hash, or AccessFileError naming the user (never the value)."""
    user = line.key or ""
    if not valid_user_name(user):
        # Not quoted: a mangled line may have a password where the name should be.
        raise AccessFileError(
            f"{where}: not a valid user name (no spaces or = : ; # [ ] , and not * or @...)"
        )
    hashed = line.value
    try:
        scheme = hash_scheme(hashed)
    except ValueError as error:
        raise AccessFileError(f"{where}: user {user!r}: malformed {error} hash") from None
    if scheme is None:
        raise AccessFileError(
            f"{where}: user {user!r}: not a password hash gittornado accepts "
            "(bcrypt, $apr1$, {SHA}, $5$, $6$); set the password with gittornado-passwd"
        )
    return hashed


def load_access_file(path: str, hash_scheme: HashScheme) -> AccessRules:
    """Read and parse the users.ini at ``path`` (OSError if unreadable)."""
    with open(path, encoding="utf-8-sig") as f:  # -sig: editors that write a BOM
        text = f.read()
    return parse_access_file(text, path, hash_scheme)
