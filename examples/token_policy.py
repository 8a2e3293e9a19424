"""An access policy of your own: per-repository access tokens instead of users.ini.

Clients send the token as the password of HTTP Basic auth (any user name), as
they do with the big hosting sites::

    git clone http://ci:s3cret-token@localhost:8000/app.git

Run it:

    python examples/token_policy.py --port 8000 --gitbase /srv/git

The policy is two small methods; both could be ``async`` and ask a database or
an identity service instead of the dictionary below.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
from typing import Dict, Optional, Tuple

import tornado.web
from tornado.httputil import HTTPServerRequest

from gittornado import AccessPolicy, AuthenticationFailed, Permission, git_routes

#: token name -> (sha256 of the token, repository it opens, may push).
#: Store digests, never the tokens themselves.
TOKENS: Dict[str, Tuple[str, str, bool]] = {
    "ci": (hashlib.sha256(b"s3cret-token").hexdigest(), "app.git", True),
    "docs-bot": (hashlib.sha256(b"read-only-token").hexdigest(), "docs.git", False),
}


class TokenPolicy(AccessPolicy):
    """Anonymous may read nothing; each token opens one repository, read-only or read-write."""

    realm = "tokens"

    def __init__(self, tokens: Dict[str, Tuple[str, str, bool]]) -> None:
        self.tokens = tokens

    def authenticate(self, request: HTTPServerRequest) -> Optional[str]:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return None
        try:
            _, _, secret = base64.b64decode(header[6:]).decode().partition(":")
        except ValueError:
            raise AuthenticationFailed("malformed credentials") from None
        digest = hashlib.sha256(secret.encode()).hexdigest()
        for name, (expected, _, _) in self.tokens.items():
            if hmac.compare_digest(digest, expected):
                return name
        raise AuthenticationFailed("unknown token")  # never include the token itself

    def authorize(self, user: Optional[str], repository: str, permission: Permission) -> bool:
        if user is None:
            return False
        _, allowed, may_push = self.tokens[user]
        return repository == allowed and (permission is Permission.READ or may_push)


async def main() -> None:
    parser = argparse.ArgumentParser(description="gittornado with per-repository access tokens")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--gitbase", default=".")
    args = parser.parse_args()
    app = tornado.web.Application(git_routes(root=args.gitbase, policy=TokenPolicy(TOKENS)))
    app.listen(args.port, address="127.0.0.1")
    print(f"token example: git at http://127.0.0.1:{args.port}/", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
