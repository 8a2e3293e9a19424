"""Short-lived signed URLs for LFS transfers, and the server secret that signs them.

A batch answer hands the client one URL per object and action.  The URL
carries its own authorization: an HMAC-SHA256, under the server's secret, of
the HTTP method, the repository's real name, the oid, the size, the user and
the expiry time.  The client follows it without credentials (the batch
answer marks each object ``authenticated``), so git's credential helper is
asked once per push or fetch, and the user's password never appears in a
URL.  A URL does one thing to one object for one user, until it expires.

The secret is a file created once, atomically and with mode 0600 (written in
full to a temporary file, then linked to its name, which fails if another
process got there first): every ``--processes`` worker and every host sharing
the directory signs with the same secret, and it survives restarts.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass
from typing import Dict, Optional

from ..util import decimal

#: Bytes of randomness in a new secret.
SECRET_BYTES = 32


def load_secret(path: str) -> bytes:
    """The secret in ``path``, created (with its directory) if there is none yet."""
    try:
        with open(path, "rb") as f:
            secret = f.read()
    except FileNotFoundError:
        secret = _create_secret(path)
    if len(secret) < SECRET_BYTES:
        raise ValueError(f"{path}: shorter than {SECRET_BYTES} bytes; remove it to make a new one")
    return secret


def _create_secret(path: str) -> bytes:
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    temporary = f"{path}.{secrets.token_hex(8)}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        secret = secrets.token_bytes(SECRET_BYTES)
        os.write(fd, secret)
        os.fsync(fd)
        os.close(fd)
        try:
            os.link(temporary, path)
        except FileExistsError:  # another worker or host made it first: use theirs
            with open(path, "rb") as f:
                secret = f.read()
    finally:
        os.unlink(temporary)
    return secret


@dataclass(frozen=True)
class SignedRequest:
    """What a signed URL allows: ``method`` on object ``oid`` of ``size`` bytes in ``repository``."""

    method: str
    repository: str
    oid: str
    size: int
    user: Optional[str]


class UrlSigner:
    """Signs and checks the query strings of transfer URLs, valid for ``lifetime`` seconds."""

    def __init__(self, secret: bytes, lifetime: int = 900) -> None:
        self._secret = secret
        self.lifetime = lifetime

    def sign(self, request: SignedRequest, now: Optional[float] = None) -> Dict[str, str]:
        """The query arguments that authorize ``request`` for :attr:`lifetime` seconds from ``now``."""
        expires = int(now if now is not None else time.time()) + self.lifetime
        query = {"size": str(request.size), "expires": str(expires), "sig": self._mac(request, expires)}
        if request.user is not None:
            query["user"] = request.user
        return query

    def verify(
        self, method: str, repository: str, oid: str, query: Dict[str, str], now: Optional[float] = None
    ) -> Optional[SignedRequest]:
        """The request ``query`` (a signed URL's arguments) authorizes, or None if it authorizes nothing."""
        size, expires = decimal(query.get("size", "")), decimal(query.get("expires", ""))
        if size is None or expires is None or expires < (now if now is not None else time.time()):
            return None
        request = SignedRequest(method, repository, oid, size, query.get("user"))
        if not hmac.compare_digest(query.get("sig", "").encode(), self._mac(request, expires).encode()):
            return None
        return request

    def _mac(self, request: SignedRequest, expires: int) -> str:
        # Each field is length-prefixed, so no value can pass for the end of another.
        fields = (
            request.method,
            request.repository,
            request.oid,
            str(request.size),
            request.user,
            str(expires),
        )
        message = b"".join(b"-" if field is None else _field(field) for field in fields)
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()


def _field(value: str) -> bytes:
    data = value.encode(errors="surrogatepass")
    return b"%d:%s" % (len(data), data)
