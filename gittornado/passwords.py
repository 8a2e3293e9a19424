"""What users.ini keeps of passwords (htpasswd's hashes) and tokens: recognizing, verifying, making.

The one module that imports the hashing library (passlib, as its maintained
fork libpass), shared by the access policy and ``gittornado-passwd``.
Tokens need no slow hash: they are 32 random bytes, so SHA-256 of one is as
good as bcrypt of it, and checking one costs microseconds.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from typing import Optional, Tuple

from passlib.context import CryptContext
from passlib.hash import bcrypt

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


def hash_setting(hashed: str) -> str:
    """What decides how long checking a password against ``hashed`` takes: scheme and cost (``bcrypt/12``).

    Hashes of one setting cost the same to check whatever their salt, so the
    access policy measures each setting once.  ``hashed`` must be an accepted hash.
    """
    scheme = PASSWORD_HASHES.identify(hashed)
    rounds = getattr(PASSWORD_HASHES.handler(scheme).from_string(hashed), "rounds", None)
    return scheme if rounds is None else f"{scheme}/{rounds}"


def hash_scheme(hashed: str) -> Optional[str]:
    """The accepted scheme ``hashed`` is in, or None; ValueError (naming the scheme) if malformed."""
    scheme = PASSWORD_HASHES.identify(hashed)
    if scheme is None:
        return None
    try:
        PASSWORD_HASHES.handler(scheme).from_string(hashed)
    except ValueError:
        raise ValueError(scheme) from None
    return scheme


#: bcrypt work factor of new hashes: about a quarter of a second per check on current hardware.
DEFAULT_COST = 12


def hash_password(password: str, cost: int = DEFAULT_COST) -> str:
    """A bcrypt hash in the ``$2y$`` form that htpasswd -B writes."""
    return bcrypt.using(ident="2y", rounds=cost).hash(password)


#: What every token starts with, so that a token is recognizable (by secret scanners, and here).
TOKEN_PREFIX = "gtt_"
#: ``gtt_<id: 12 hex digits>_<32 random bytes, base64url without padding>``.
_TOKEN = re.compile(rb"gtt_([0-9a-f]{12})_[A-Za-z0-9_-]{43}")


def new_token() -> Tuple[str, str]:
    """A new token's ``(id, token)``; the id is part of the token, so a check finds its line at once."""
    token_id = secrets.token_hex(6)
    return token_id, f"{TOKEN_PREFIX}{token_id}_{secrets.token_urlsafe(32)}"


def token_id(secret: bytes) -> Optional[str]:
    """The id of ``secret`` if it is a well-formed token, else None."""
    match = _TOKEN.fullmatch(secret)
    return match.group(1).decode("ascii") if match else None


def token_digest(secret: bytes) -> str:
    """What users.ini stores of a token: its SHA-256, in hex."""
    return hashlib.sha256(secret).hexdigest()


def verify_token(secret: bytes, digest: str) -> bool:
    """Whether ``secret`` is the token whose digest is ``digest``, compared in constant time."""
    return hmac.compare_digest(token_digest(secret), digest)
