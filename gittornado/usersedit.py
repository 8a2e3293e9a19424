"""Edits of users.ini text that leave every other byte as it was: a user's hash, a token's line.

What ``gittornado-passwd`` changes is one line (or a user's lines); comments,
order, spacing, other sections and line endings stay, so a file kept by hand
stays as its administrator wrote it.  No files here: :mod:`gittornado.passwd`
reads, checks and replaces the file.
"""

from __future__ import annotations

from typing import Callable

from .usersfile import IniLine, split_ini_lines


class PasswdError(Exception):
    """Why ``gittornado-passwd`` changed nothing; printed as the command's error message."""


def set_entry(text: str, section: str, key: str, value: str) -> str:
    """Return users.ini ``text`` with ``key = value`` in ``[section]``.

    An existing line keeps its spacing and inline comment; a new key goes
    after the section's last entry (or its last comment), and a file without
    the section gets it appended.
    """
    lines = split_ini_lines(text)
    raw = text.split("\n")
    ending = "\r" if raw and raw[0].endswith("\r") else ""
    for line in lines:
        if line.section == section and line.key == key:
            start, end = line.value_span
            raw[line.number - 1] = line.text[:start] + value + line.text[end:]
            return "\n".join(raw)
    new_line = f"{key} = {value}{ending}"
    in_section = [line for line in lines if line.section == section and line.text.strip()]
    entries = [line for line in in_section if line.key]
    # After the last entry; in a section without entries, after its header and comments.
    anchor = entries[-1] if entries else in_section[-1] if in_section else None
    if anchor is not None:
        raw.insert(anchor.number, new_line)
        return "\n".join(raw)
    if text and not text.endswith("\n"):
        text += ending + "\n"
    separator = ending + "\n" if text.strip() else ""
    return f"{text}{separator}[{section}]{ending}\n{new_line}\n"


def set_user(text: str, user: str, hashed: str) -> str:
    """Return users.ini ``text`` with ``user``'s hash set to ``hashed`` (see :func:`set_entry`)."""
    return set_entry(text, "users", user, hashed)


def _without(text: str, doomed: Callable[[IniLine], bool]) -> str:
    """``text`` without the lines ``doomed`` picks; every other byte stays."""
    numbers = {line.number for line in split_ini_lines(text) if doomed(line)}
    return "\n".join(raw for number, raw in enumerate(text.split("\n"), start=1) if number not in numbers)


def delete_user(text: str, user: str) -> str:
    """Return ``text`` without ``user``'s [users] line(s) and tokens; PasswdError if there is no such user.

    Rules and group memberships naming the user stay: they grant nothing
    without a password, and they come back into force if the user is re-added.
    Tokens go: a user re-added later should not find old tokens working again.
    """
    if not any(line.section == "users" and line.key == user for line in split_ini_lines(text)):
        raise PasswdError(f"no user {user!r} in [users]")
    return _without(
        text,
        lambda line: (
            (line.section == "users" and line.key == user)
            or (line.section == "tokens" and line.value.split(None, 1)[:1] == [user])
        ),
    )


def revoke_token(text: str, token_id: str) -> str:
    """Return ``text`` without the [tokens] line of ``token_id``; PasswdError if there is none."""
    if not any(line.section == "tokens" and line.key == token_id for line in split_ini_lines(text)):
        raise PasswdError(f"no token {token_id!r} in [tokens]")
    return _without(text, lambda line: line.section == "tokens" and line.key == token_id)


def add_token(text: str, token_id: str, user: str, line: str) -> str:
    """Return ``text`` with the [tokens] line ``token_id = line`` of ``user``; PasswdError if
    ``user`` has no password or the id is taken."""
    lines = split_ini_lines(text)
    if not any(line.section == "users" and line.key == user for line in lines):
        raise PasswdError(f"no user {user!r} in [users]: set a password first")
    if any(line.section == "tokens" and line.key == token_id for line in lines):
        raise PasswdError("the new token's id is taken (a one in 2**48 chance): run the command again")
    return set_entry(text, "tokens", token_id, line)
