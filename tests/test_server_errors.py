"""Malformed requests to every route get a 4xx, never a 5xx, an ERROR log record or a hung connection.

A client's bad input is the client's error: the server must say so with a 4xx and keep serving. A 5xx,
a log record at ERROR or above (Tornado's "Uncaught exception" traceback), a Python traceback sent to the
client, or a connection left without an answer all mean that input reached code that did not expect it.
That is how ``Content-Length: \\xb2``, a signed LFS URL with a 5,000-digit ``size`` and a 5,000-digit
``Range`` were found (fixed by gittornado/util.py ``decimal``); this module sweeps for the rest of that
class and keeps it out.

The cases are data (``CASES``, grouped by what they attack), one parametrized test runs them all: smart
and dumb git, the Git LFS batch, transfer, verify and locking APIs, the access layer (Basic credentials
and tokens of a users.ini), query strings, the headers handlers read, path segments and repository
names (``--create-on-push`` included), JSON bodies of every wrong shape, methods a route does not allow,
HTTP versions, ``--xheaders``, ``--pack-cache``, and pushes the pre-receive check reads. Each request
is raw bytes on a socket to the in-process server as the gittornado command builds it
(HardenedHTTPServer, users.ini policy, LFS on); after each, the server must still answer a clone's first
request. ``ABANDONED`` lists requests the client walks away from halfway: nothing may be logged as an
error for them either. The one 5xx a client may get is 505, for an HTTP version the server does not speak.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, FrozenSet, Iterator, List, Optional, Tuple, Union
from urllib.parse import urlencode

import pytest
from conftest import GitClient, git_processes_under, make_repo, pack_for_push, wait_until
from passlib.hash import apr_md5_crypt

from gittornado import GitBackend, HardenedHTTPServer, RepositoryRoot
from gittornado.access import FailureThrottle, IniPolicy
from gittornado.lfs import LfsServer
from gittornado.lfs.signing import SignedRequest, UrlSigner
from gittornado.packcache import PackCache
from gittornado.passwords import token_digest
from gittornado.pushchecks import PushLimits

# --- What the server knows --------------------------------------------------------------------------

PASSWORD = "s3cret"
#: A well-formed token of bob's (gittornado-passwd would make a random one).
TOKEN = "gtt_0123456789ab_" + "T" * 43
USERS_INI = f"""\
[users]
bob = {apr_md5_crypt.hash(PASSWORD)}
[access]
* = proj=rw
bob = *=rw
[tokens]
0123456789ab = bob {token_digest(TOKEN.encode())} 2099-12-31T00:00:00Z *=rw
"""
#: The LFS signing key: fixed, so that signed URLs can be written down as data.
SIGNER = UrlSigner(bytes(range(32)))
#: Signed URLs expire at 2100-01-01.
EXPIRES = 4_102_444_800
LFS_JSON = "application/vnd.git-lfs+json"
LFS = "/proj.git/info/lfs"
MAX_OBJECT = 4 * 2**20
#: An object the server has, one it does not, and the empty one.
STORED = b"an object the server has\n"
STORED_OID = hashlib.sha256(STORED).hexdigest()
MISSING_OID = hashlib.sha256(b"never uploaded").hexdigest()
EMPTY_OID = hashlib.sha256(b"").hexdigest()
#: How long a client waits for a byte before calling the connection hung (the slowest answer expected
#: is the 408 that ``--header-timeout 1`` gives after a second).
ANSWER_TIMEOUT = 1.6

# --- Requests as bytes ------------------------------------------------------------------------------


def http(method: str, target: str, *headers: str, body: bytes = b"", length: bool = True) -> bytes:
    """One request that closes its connection; ``headers`` are latin-1 text (``\\xb2`` is the byte B2).

    ``length``: add the body's ``Content-Length`` (always for POST and PUT).
    """
    lines = [f"{method} {target} HTTP/1.1", "Host: x", "Connection: close", *headers]
    if length and (body or method in ("POST", "PUT")):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def basic(credentials: bytes) -> str:
    """An ``Authorization: Basic`` header line for ``credentials`` (``user:password`` as bytes)."""
    return "Authorization: Basic " + base64.b64encode(credentials).decode()


BOB = basic(f"bob:{PASSWORD}".encode())


def document(value: Any) -> bytes:
    return value if isinstance(value, bytes) else json.dumps(value).encode()


def lfs_post(path: str, body: Any, *headers: str) -> bytes:
    """A POST of a JSON ``body`` (bytes go verbatim) to ``<repo>/info/lfs/<path>``."""
    return http("POST", f"{LFS}/{path}", f"Content-Type: {LFS_JSON}", *headers, body=document(body))


def batch(body: Any, *headers: str) -> bytes:
    return lfs_post("objects/batch", body, *headers)


def objects(operation: Any, *items: Any) -> Dict[str, Any]:
    return {"operation": operation, "transfers": ["basic"], "objects": list(items)}


def signed(method: str, oid: str, size: int, user: Optional[str] = None) -> str:
    """The query string of a valid signed URL for ``method`` on ``oid`` of ``size`` bytes in proj.git."""
    request = SignedRequest(method, "proj.git", oid, size, user)
    return urlencode(SIGNER.sign(request, now=EXPIRES - SIGNER.lifetime))


def upload_pack(body: bytes, *headers: str) -> bytes:
    return http(
        "POST",
        "/proj.git/git-upload-pack",
        "Content-Type: application/x-git-upload-pack-request",
        *headers,
        body=body,
    )


def receive_pack(body: bytes, *headers: str) -> bytes:
    return http(
        "POST",
        "/proj.git/git-receive-pack",
        "Content-Type: application/x-git-receive-pack-request",
        *headers,
        body=body,
    )


def pkt(text: str) -> bytes:
    data = text.encode()
    return b"%04x" % (len(data) + 4) + data


def nested(depth: int) -> bytes:
    """A JSON value ``depth`` arrays deep."""
    return b"[" * depth + b"]" * depth


ADVERTISE = "/proj.git/info/refs?service=git-upload-pack"
#: 3 MiB of a valid protocol v2 ls-refs request (git reads on), in 6 KiB: over the 2 MiB fetch body cap.
GZIP_BOMB = gzip.compress(pkt("command=ls-refs\n") + b"0001" + pkt("peel\n") * (3 * 2**20 // 9))
ANY_CLIENT_ERROR = tuple(range(400, 500))


#: Requests that need git to build them (a push's pack), by name: made once per module (``prebuilt``).
Prebuilt = Dict[str, bytes]
Request = Union[bytes, Callable[[Prebuilt], bytes]]


@dataclass(frozen=True)
class Case:
    """``request``, after ``setup`` (each answered 2xx), must get one of ``expect`` in time, with
    ``answer`` in the response, and log no error and no traceback.

    ``server``: options of the server for this case: ``xheaders`` (it trusts ``X-Real-Ip`` and friends,
    ``--xheaders``), ``max-file-size`` (``--max-file-size``, so every push runs the pre-receive check),
    ``pack-cache`` (``--pack-cache``).
    """

    request: Request
    expect: Tuple[int, ...] = ANY_CLIENT_ERROR
    setup: Tuple[Request, ...] = ()
    answer: bytes = b""
    server: FrozenSet[str] = frozenset()


def case(
    request: Request, *expect: int, setup: Tuple[Request, ...] = (), answer: bytes = b"", server: str = ""
) -> Case:
    """A :class:`Case`; ``server`` names options of the server, space-separated (see ``backend``)."""
    return Case(request, expect or ANY_CLIENT_ERROR, setup, answer, frozenset(server.split()))


# --- The cases --------------------------------------------------------------------------------------

#: A fetch whose body is announced and never sent (``--header-timeout 1``: 408 after a second).
UPLOAD_PACK_BODY_NEVER_COMES = http(
    "POST",
    "/proj.git/git-upload-pack",
    "Content-Type: application/x-git-upload-pack-request",
    "Content-Length: 100",
    length=False,
)

SMART = {
    "info-refs-unknown-service": case(http("GET", "/proj.git/info/refs?service=git-foo"), 400),
    "info-refs-archive-service": case(http("GET", "/proj.git/info/refs?service=git-upload-archive"), 400),
    "info-refs-service-not-utf8": case(http("GET", "/proj.git/info/refs?service=%FF"), 400),
    "info-refs-service-empty": case(http("GET", "/proj.git/info/refs?service="), 400),
    "info-refs-service-nul": case(http("GET", "/proj.git/info/refs?service=git-upload-pack%00"), 200, 400),
    "info-refs-service-twice": case(
        http("GET", "/proj.git/info/refs?service=git-foo&service=git-upload-pack"), 200, 400
    ),
    "git-protocol-too-long": case(http("GET", ADVERTISE, "Git-Protocol: version=2:" + "a" * 300), 400),
    "git-protocol-latin1": case(http("GET", ADVERTISE, "Git-Protocol: version=\xe9"), 400),
    "git-protocol-empty": case(http("GET", ADVERTISE, "Git-Protocol: "), 400),
    "git-protocol-colons": case(http("GET", ADVERTISE, "Git-Protocol: ::"), 400),
    "git-protocol-unknown-version": case(http("GET", ADVERTISE, "Git-Protocol: version=99999999999"), 200),
    "git-protocol-on-rpc": case(upload_pack(b"0000", "Git-Protocol: version=2:\xe9"), 400),
    "upload-pack-no-content-type": case(http("POST", "/proj.git/git-upload-pack", body=b"0000"), 415),
    "upload-pack-wrong-content-type": case(
        http("POST", "/proj.git/git-upload-pack", "Content-Type: text/\xe9", body=b"0000"), 415
    ),
    "upload-pack-empty-body": case(upload_pack(b""), 400),
    "upload-pack-garbage": case(upload_pack(b"hello, git"), 200, 400),
    "upload-pack-bad-pkt-length": case(upload_pack(b"zzzz" * 10), 200, 400),
    "upload-pack-pkt-past-end": case(upload_pack(b"ffff" + b"x" * 10), 200, 400),
    "upload-pack-want-unknown": case(
        upload_pack(pkt(f"want {'1' * 40}\n") + b"0000" + pkt("done\n")), 200, 400
    ),
    "upload-pack-v2-unknown-command": case(
        upload_pack(pkt("command=bogus\n") + b"0000", "Git-Protocol: version=2"), 200, 400
    ),
    "upload-pack-v2-bad-arg": case(
        upload_pack(
            pkt("command=ls-refs\n") + b"0001" + pkt("frobnicate\n") + b"0000", "Git-Protocol: version=2"
        ),
        200,
        400,
    ),
    "upload-pack-gzip-not-gzip": case(upload_pack(b"0000", "Content-Encoding: gzip"), 400),
    "upload-pack-gzip-truncated": case(
        upload_pack(gzip.compress(b"0000" * 100)[:-9], "Content-Encoding: gzip"), 400
    ),
    "upload-pack-gzip-trailing-data": case(
        upload_pack(gzip.compress(b"0000") + b"more", "Content-Encoding: gzip"), 400
    ),
    "upload-pack-gzip-bomb": case(
        upload_pack(GZIP_BOMB, "Content-Encoding: gzip", "Git-Protocol: version=2"),
        413,
    ),
    "upload-pack-unknown-encoding": case(upload_pack(b"0000", "Content-Encoding: br"), 415),
    "upload-pack-encoding-latin1": case(upload_pack(b"0000", "Content-Encoding: \xe9\xb2"), 415),
    "upload-pack-encoding-list": case(upload_pack(b"0000", "Content-Encoding: gzip, identity"), 415),
    "upload-pack-length-superscript": case(
        http(
            "POST",
            "/proj.git/git-upload-pack",
            "Content-Type: application/x-git-upload-pack-request",
            "Content-Length: \xb2",
            body=b"0000",
            length=False,
        ),
        400,
    ),
    "upload-pack-length-5000-digits": case(
        http(
            "POST",
            "/proj.git/git-upload-pack",
            "Content-Type: application/x-git-upload-pack-request",
            "Content-Length: " + "9" * 5000,
            body=b"0000",
            length=False,
        ),
        400,
        413,
    ),
    "upload-pack-length-20-digits": case(
        http(
            "POST",
            "/proj.git/git-upload-pack",
            "Content-Type: application/x-git-upload-pack-request",
            "Content-Length: " + "9" * 20,
            body=b"0000",
            length=False,
        ),
        400,
        413,
    ),
    # --header-timeout 1: a POST whose body does not start within a second gets 408.
    "upload-pack-body-never-comes": case(
        UPLOAD_PACK_BODY_NEVER_COMES,
        408,
    ),
    "upload-pack-expect-nonsense": case(upload_pack(b"0000", "Expect: 100-nonsense"), 200, 400, 417),
    "receive-pack-garbage": case(receive_pack(b"hello, git"), 200, 400),
    "upload-pack-garbage-1m": case(upload_pack(b"zzzz" * 2**18), 400),
    "receive-pack-flush-then-3m-garbage": case(
        receive_pack(b"0000" + bytes(range(256)) * 12 * 2**10), 200, 400
    ),
    "receive-pack-garbage-3m-chunked": case(
        http(
            "POST",
            "/proj.git/git-receive-pack",
            "Content-Type: application/x-git-receive-pack-request",
            "Transfer-Encoding: chunked",
            body=b"".join(b"40000\r\n" + b"\x00" * 2**18 + b"\r\n" for _ in range(12)) + b"0\r\n\r\n",
            length=False,
        ),
        200,
        400,
    ),
    "receive-pack-flush-only": case(receive_pack(b"0000"), 200, 400),
    "receive-pack-bad-command": case(
        receive_pack(pkt(f"{'0' * 40} {'z' * 40} refs/heads/x\0report-status\n") + b"0000"), 200, 400
    ),
    "receive-pack-command-without-pack": case(
        receive_pack(pkt(f"{'0' * 40} {'1' * 40} refs/heads/x\0report-status\n") + b"0000"), 200, 400
    ),
    "receive-pack-gzip-bomb": case(
        receive_pack(gzip.compress(b"0" * (40 * 2**20)), "Content-Encoding: gzip"), 200, 400, 413
    ),
    "upload-archive-anonymous": case(
        http(
            "POST",
            "/proj.git/git-upload-archive",
            "Content-Type: application/x-git-upload-archive-request",
            body=pkt("argument HEAD\n") + b"0000",
        ),
        403,
    ),
    "upload-archive-garbage": case(
        http(
            "POST",
            "/proj.git/git-upload-archive",
            "Content-Type: application/x-git-upload-archive-request",
            BOB,
            body=pkt("argument --remote=/etc\n") + b"0000",
        ),
        200,
        400,
    ),
    "rpc-unknown-service": case(upload_pack(b"0000").replace(b"git-upload-pack HTTP", b"git-foo HTTP"), 404),
}

DUMB = {
    "dumb-pack-missing": case(http("GET", f"/proj.git/objects/pack/pack-{'0' * 40}.pack"), 404),
    "dumb-idx-sha256-missing": case(http("GET", f"/proj.git/objects/pack/pack-{'0' * 64}.idx"), 404),
    "dumb-loose-missing": case(http("GET", f"/proj.git/objects/00/{'0' * 38}"), 404),
    "dumb-loose-uppercase": case(http("GET", f"/proj.git/objects/AB/{'C' * 38}"), 404),
    "dumb-config": case(http("GET", "/proj.git/config"), 404),
    "dumb-hooks": case(http("GET", "/proj.git/hooks/pre-receive.sample"), 404),
    "dumb-alternates-missing": case(http("GET", "/proj.git/objects/info/alternates"), 404),
    "dumb-http-alternates-missing": case(http("GET", "/proj.git/objects/info/http-alternates"), 404),
    "dumb-range-5000-digits": case(
        http("GET", "/proj.git/HEAD", "Range: bytes=" + "9" * 5000 + "-"), 200, 416
    ),
    "dumb-range-end-5000-digits": case(
        http("GET", "/proj.git/HEAD", "Range: bytes=0-" + "9" * 5000), 200, 206
    ),
    "dumb-range-superscript": case(http("GET", "/proj.git/HEAD", "Range: bytes=\xb2-"), 200),
    "dumb-range-backwards": case(http("GET", "/proj.git/HEAD", "Range: bytes=5-1"), 416),
    "dumb-range-suffix-huge": case(http("GET", "/proj.git/HEAD", "Range: bytes=-" + "9" * 4000), 200, 206),
    "dumb-range-zero-suffix": case(http("GET", "/proj.git/HEAD", "Range: bytes=-0"), 200, 416),
    "dumb-range-several": case(http("GET", "/proj.git/HEAD", "Range: bytes=0-1,3-4"), 200),
    "dumb-range-other-unit": case(http("GET", "/proj.git/HEAD", "Range: pages=1-2"), 200),
    "dumb-if-modified-since-garbage": case(http("GET", "/proj.git/HEAD", "If-Modified-Since: \xb2\xb2"), 200),
    "dumb-if-modified-since-year-99999": case(
        http("GET", "/proj.git/HEAD", "If-Modified-Since: Mon, 01 Jan 99999 00:00:00 GMT"), 200
    ),
    "dumb-if-modified-since-offset": case(
        http("GET", "/proj.git/HEAD", "If-Modified-Since: Mon, 01 Jan 2024 00:00:00 +9999"), 200
    ),
    "dumb-if-none-match-garbage": case(http("GET", "/proj.git/HEAD", 'If-None-Match: "' + "\xe9" * 100), 200),
    "dumb-info-refs-body-never-comes": case(
        http("GET", "/proj.git/info/refs", "Content-Length: 100"), 400, 408
    ),
    "dumb-info-refs-with-form-body": case(
        http(
            "GET",
            "/proj.git/info/refs",
            "Content-Type: multipart/form-data; boundary=zz",
            body=b"--zz\r\nnot a part\r\n--zz--",
        ),
        200,
        400,
    ),
    "dumb-info-refs-with-gzip-form-body": case(
        http(
            "GET",
            "/proj.git/info/refs",
            "Content-Type: application/x-www-form-urlencoded",
            "Content-Encoding: gzip",
            body=b"a=b",
        ),
        200,
        400,
    ),
    "dumb-info-refs-with-many-form-fields": case(
        http(
            "GET",
            "/proj.git/info/refs",
            "Content-Type: application/x-www-form-urlencoded",
            body=b"a=b&" * 20000,
        ),
        200,
        400,
    ),
    "not-found-with-broken-multipart": case(
        http(
            "POST",
            "/nothing/here",
            "Content-Type: multipart/form-data; boundary=\xe9",
            body=b"--\xe9\r\nContent-Disposition: form-data\r\n\r\nx\r\n--\xe9--\r\n",
        ),
        400,
        404,
    ),
}


def lookup(name: str, *headers: str, route: str = "info/refs") -> bytes:
    """A GET of ``route`` under the repository ``name`` (as the URL spells it), by bob, who may read all."""
    return http("GET", f"/{name}/{route}", BOB, *headers)


def create(name: str) -> bytes:
    """The first request of bob's push to ``name``, which --create-on-push makes if it is missing."""
    return lookup(name, route="info/refs?service=git-receive-pack")


NAMES = {
    "name-nul": case(lookup("proj%00.git"), 404),
    "name-nul-anonymous": case(http("GET", "/proj%00.git/info/refs"), 401, 404),
    "name-dotdot-encoded": case(lookup("%2e%2e/proj.git"), 404),
    "name-dotdot-slash-encoded": case(lookup("..%2Fproj.git"), 404),
    "name-dotdot-inside": case(lookup("empty/%2E%2E/proj.git"), 404),
    "name-absolute-encoded": case(lookup("%2Fetc"), 404),
    "name-backslash": case(lookup("proj.git%5C..%5C..%5Cetc"), 404),
    "name-overlong-utf8-dot": case(lookup("%C0%AE%C0%AE/proj.git"), 400),
    "name-not-utf8": case(lookup("%FF%FE"), 400),
    "name-lone-surrogate-utf8": case(lookup("%ED%A0%80"), 400),
    "name-double-slash": case(lookup("/proj.git"), 404),
    "name-trailing-slash-encoded": case(lookup("proj.git%2F"), 404),
    "name-component-300": case(lookup("a" * 300), 404),
    "name-2000-chars": case(lookup("a/" * 999 + "a"), 404),
    "name-emoji-1000": case(lookup("%F0%9F%98%80" * 1000), 404),
    "name-request-line-100k": case(lookup("a" * 100_000), 431),
    "name-is-a-file": case(lookup("plainfile.git"), 404),
    "name-is-a-file-dumb": case(lookup("plainfile.git", route="HEAD"), 404),
    "name-is-a-file-rpc": case(upload_pack(b"0000", BOB).replace(b"/proj.git/", b"/plainfile.git/"), 404),
    "name-is-a-file-lfs": case(
        batch(objects("download"), BOB).replace(b"/proj.git/", b"/plainfile.git/"), 404
    ),
    "name-below-a-file": case(lookup("plainfile.git/x"), 404),
    "name-is-a-plain-directory": case(lookup("empty"), 404),
    "name-inside-repository": case(lookup("proj.git/objects"), 404),
    "name-lfs-nul": case(lookup("proj%00.git", route="info/lfs/locks"), 404),
    "name-lfs-dotdot": case(lookup("proj.git/%2e%2e", route="info/lfs/locks"), 404),
    # --create-on-push: a logged-in user with rw on the name may create it.
    "create-name-240": case(create("c" * 240 + ".git")),
    "create-name-300": case(create("c" * 300)),
    "create-name-by-rpc-245": case(
        receive_pack(b"0000", BOB).replace(b"/proj.git/", b"/" + b"r" * 245 + b".git/")
    ),
    "create-name-deep-long": case(create(("d" * 250 + "/") * 20 + "x.git"), 404),
    "create-name-dot": case(create(".hidden"), 404),
    "create-name-dot-git-part": case(create("team/.git"), 404),
    "create-name-is-a-file": case(create("plainfile.git"), 404),
    "create-name-under-file": case(create("plainfile.git/sub.git"), 404),
    "create-name-inside-repository": case(create("proj.git/inner.git"), 404),
    "create-name-nul": case(create("new%00.git"), 404),
}

AUTH = {
    "auth-basic-empty": case(http("GET", ADVERTISE, "Authorization: Basic"), 401),
    "auth-basic-bad-base64": case(http("GET", ADVERTISE, "Authorization: Basic !!!!"), 401),
    "auth-basic-bad-padding": case(http("GET", ADVERTISE, "Authorization: Basic Ym9iOng"), 401),
    "auth-basic-latin1": case(http("GET", ADVERTISE, "Authorization: Basic \xe9\xe9\xe9\xe9"), 401),
    "auth-basic-no-colon": case(http("GET", ADVERTISE, basic(b"bob")), 401),
    "auth-basic-user-not-utf8": case(http("GET", ADVERTISE, basic(b"\xff\xfe:" + PASSWORD.encode())), 401),
    "auth-basic-user-nul": case(http("GET", ADVERTISE, basic(b"b\x00ob:" + PASSWORD.encode())), 401),
    "auth-basic-user-empty": case(http("GET", ADVERTISE, basic(b":" + PASSWORD.encode())), 401),
    "auth-basic-password-nul": case(http("GET", ADVERTISE, basic(b"bob:s3\x00cret")), 401),
    "auth-basic-password-not-utf8": case(http("GET", ADVERTISE, basic(b"bob:\xff\xfe")), 401),
    "auth-basic-password-40k": case(http("GET", ADVERTISE, basic(b"bob:" + b"x" * 40000)), 401),
    "auth-basic-header-100k": case(http("GET", ADVERTISE, "Authorization: Basic " + "A" * 100_000), 431),
    "auth-basic-wrong-password": case(http("GET", ADVERTISE, basic(b"bob:wrong")), 401),
    "auth-basic-unknown-user": case(http("GET", ADVERTISE, basic(b"mallory:" + PASSWORD.encode())), 401),
    "auth-basic-user-control-chars": case(http("GET", ADVERTISE, basic(b"b\x1b[31mob\n:x")), 401),
    "auth-two-headers": case(http("GET", ADVERTISE, BOB, BOB), 400, 401),
    "auth-other-scheme": case(http("GET", ADVERTISE, "Authorization: Bearer \xe9"), 200),
    "auth-token-malformed": case(http("GET", ADVERTISE, basic(b"bob:gtt_nothex_x")), 401),
    "auth-token-unknown-id": case(http("GET", ADVERTISE, basic(b"bob:gtt_ffffffffffff_" + b"T" * 43)), 401),
    "auth-token-wrong-secret": case(http("GET", ADVERTISE, basic(b"bob:gtt_0123456789ab_" + b"U" * 43)), 401),
    "auth-token-other-user": case(http("GET", ADVERTISE, basic(b"mallory:" + TOKEN.encode())), 401),
    "auth-token-not-utf8": case(http("GET", ADVERTISE, basic(b"bob:gtt_\xff\xfe")), 401),
    "auth-token-huge": case(http("GET", ADVERTISE, basic(b"bob:gtt_" + b"0" * 40000)), 401),
    "auth-basic-user-40k": case(http("GET", ADVERTISE, basic(b"b" * 40000 + b":x")), 401),
    "auth-token-valid": case(http("GET", ADVERTISE, basic(f"bob:{TOKEN}".encode())), 200),
    "auth-token-as-user-name": case(http("GET", ADVERTISE, basic(f"{TOKEN}:x".encode())), 401),
    "auth-on-push": case(receive_pack(b"0000", "Authorization: Basic !!"), 401),
    "auth-on-lfs-batch": case(batch(objects("download"), "Authorization: Basic !!"), 401),
    "auth-on-lfs-locks": case(http("GET", f"{LFS}/locks", basic(b"\xff:\xff")), 401),
    "auth-on-lfs-put": case(http("PUT", f"{LFS}/objects/{STORED_OID}", basic(b"bob"), body=STORED), 401),
    "x-forwarded-for-garbage": case(
        http("GET", ADVERTISE, "X-Forwarded-For: \xe9, ::1%eth0, 999.1.1.1", "X-Real-Ip: %00"), 200
    ),
}

BATCH = {
    "batch-operation-list": case(batch(objects([])), 422),
    "batch-operation-dict": case(batch(objects({"upload": 1})), 422),
    "batch-operation-number": case(batch(objects(1)), 422),
    "batch-operation-null": case(batch(objects(None)), 422),
    "batch-transfers-dict": case(batch({**objects("download"), "transfers": {"basic": 1}}), 422),
    "batch-transfers-string": case(batch({**objects("download"), "transfers": "basic"}), 422),
    "batch-hash-algo-list": case(batch({**objects("download"), "hash_algo": ["sha256"]}), 409),
    "batch-objects-dict": case(batch({"operation": "download", "objects": {"oid": STORED_OID}}), 422),
    "batch-objects-null": case(batch({"operation": "download", "objects": None}), 422),
    "batch-body-array": case(batch([]), 422),
    "batch-body-null": case(batch(b"null"), 422),
    "batch-body-empty": case(batch(b""), 422),
    "batch-body-not-utf8": case(batch(b'{"operation": "\xff\xfe"}'), 422),
    "batch-body-bom": case(batch(b"\xef\xbb\xbf" + document(objects("download"))), 200),
    "batch-content-type-twice": case(batch(objects("download"), f"Content-Type: {LFS_JSON}"), 200, 415),
    "batch-body-utf16": case(batch('{"operation": "download"}'.encode("utf-16")), 422),
    "batch-body-deep": case(batch(nested(100_000)), 422),
    "batch-body-gzip": case(
        batch(gzip.compress(document(objects("download"))), "Content-Encoding: gzip"), 422
    ),
    "batch-duplicate-keys": case(
        batch(b'{"operation": "download", "operation": "delete", "objects": []}'), 422
    ),
    "batch-int-5000-digits": case(
        batch(b'{"operation": "download", "objects": [], "x": ' + b"9" * 5000 + b"}"), 422
    ),
    "batch-object-wrong-types": case(
        batch(
            objects(
                "upload",
                {"oid": STORED_OID, "size": 10**400},
                {"oid": STORED_OID, "size": -(10**400)},
                {"oid": STORED_OID, "size": True},
                {"oid": STORED_OID, "size": "25"},
                {"oid": STORED_OID, "size": None},
                {"oid": STORED_OID, "size": [25]},
                {"oid": STORED_OID, "size": {"n": 25}},
                {"oid": 12345, "size": 1},
                {"oid": [STORED_OID], "size": 1},
                {"oid": {"a": [1, 2]}, "size": 1},
                {"oid": 10**400, "size": 1},
                {"oid": None, "size": 1},
                {"oid": "", "size": 1},
                "oid",
                None,
                [],
                3.5,
            )
        ),
        200,
    ),
    "batch-size-infinity": case(
        batch(
            b'{"operation": "upload", "objects": [{"oid": "' + STORED_OID.encode() + b'", "size": 1e999}]}'
        ),
        200,
    ),
    "batch-size-nan": case(
        batch(b'{"operation": "upload", "objects": [{"oid": "' + STORED_OID.encode() + b'", "size": NaN}]}'),
        200,
    ),
    "batch-size-float": case(batch(objects("upload", {"oid": MISSING_OID, "size": 25.0})), 200),
    "batch-size-over-cap": case(batch(objects("upload", {"oid": MISSING_OID, "size": 2**63})), 200),
    "batch-ref-wrong-types": case(batch({**objects("download"), "ref": [{"name": 1}]}), 200),
    "batch-oid-dotdot": case(batch(objects("download", {"oid": "../../../../etc/passwd", "size": 1})), 200),
    "batch-content-type-missing": case(
        http("POST", f"{LFS}/objects/batch", body=document(objects("download"))), 415
    ),
    "batch-content-type-latin1": case(
        http("POST", f"{LFS}/objects/batch", "Content-Type: \xe9", body=document(objects("download"))), 415
    ),
    "batch-length-superscript": case(
        http(
            "POST",
            f"{LFS}/objects/batch",
            f"Content-Type: {LFS_JSON}",
            "Content-Length: \xb2",
            body=b"{}",
            length=False,
        ),
        400,
    ),
    "batch-length-5000-digits": case(
        http(
            "POST",
            f"{LFS}/objects/batch",
            f"Content-Type: {LFS_JSON}",
            "Content-Length: " + "9" * 5000,
            body=b"{}",
            length=False,
        ),
        400,
        413,
    ),
    "batch-body-never-comes": case(
        http(
            "POST", f"{LFS}/objects/batch", f"Content-Type: {LFS_JSON}", "Content-Length: 100", length=False
        ),
        408,
    ),
    "batch-length-over-cap": case(
        http(
            "POST",
            f"{LFS}/objects/batch",
            f"Content-Type: {LFS_JSON}",
            "Content-Length: 2000000",
            "Expect: 100-continue",
            length=False,
        ),
        413,
    ),
}
# A JSON value as deep as the parser takes, where the answer echoes it (an object's size) or prints it (oid).
for _depth in (900, 950):
    _deep = nested(_depth)
    BATCH[f"batch-size-nested-{_depth}"] = case(
        batch(
            b'{"operation": "upload", "objects": [{"oid": "'
            + STORED_OID.encode()
            + b'", "size": '
            + _deep
            + b"}]}"
        ),
        200,
        422,
    )
    BATCH[f"batch-oid-nested-{_depth}"] = case(
        batch(b'{"operation": "upload", "objects": [{"size": 1, "oid": ' + _deep + b"}]}"), 200, 422
    )

OBJECTS = {
    "object-oid-short": case(http("GET", f"{LFS}/objects/{STORED_OID[:63]}"), 422),
    "object-oid-upper": case(http("GET", f"{LFS}/objects/{STORED_OID.upper()}"), 422),
    "object-oid-dotdot": case(http("GET", f"{LFS}/objects/%2e%2e"), 422),
    "object-oid-nul": case(http("GET", f"{LFS}/objects/%00{STORED_OID[1:]}"), 422),
    "object-oid-not-utf8": case(http("GET", f"{LFS}/objects/%FF"), 400),
    "object-missing": case(http("GET", f"{LFS}/objects/{MISSING_OID}"), 404),
    "object-empty-get": case(
        http("GET", f"{LFS}/objects/{EMPTY_OID}"), 200, setup=(http("PUT", f"{LFS}/objects/{EMPTY_OID}"),)
    ),
    "object-empty-range": case(
        http("GET", f"{LFS}/objects/{EMPTY_OID}", "Range: bytes=0-"),
        416,
        setup=(http("PUT", f"{LFS}/objects/{EMPTY_OID}"),),
    ),
    "object-sig-not-ascii": case(
        http("GET", f"{LFS}/objects/{STORED_OID}?size={len(STORED)}&expires={EXPIRES}&sig=%C3%A9"), 200, 401
    ),
    "object-head-sig-not-ascii": case(
        http("HEAD", f"{LFS}/objects/{STORED_OID}?size={len(STORED)}&expires={EXPIRES}&sig=%C3%A9"), 200, 401
    ),
    "object-put-sig-not-ascii": case(
        http(
            "PUT", f"{LFS}/objects/{STORED_OID}?size={len(STORED)}&expires={EXPIRES}&sig=%C3%A9", body=STORED
        ),
        200,
        401,
    ),
    "object-sig-not-utf8": case(
        http("GET", f"{LFS}/objects/{STORED_OID}?size={len(STORED)}&expires={EXPIRES}&sig=%FF"), 400
    ),
    "object-sig-empty": case(http("GET", f"{LFS}/objects/{MISSING_OID}?size=1&expires={EXPIRES}&sig="), 404),
    "object-sig-user-not-utf8": case(
        http("GET", f"{LFS}/objects/{MISSING_OID}?{signed('GET', MISSING_OID, 1)}&user=%FF"), 400
    ),
    "object-sig-user-nul": case(
        http("GET", f"{LFS}/objects/{MISSING_OID}?{signed('GET', MISSING_OID, 1, 'bob')}&user=b%00ob"), 404
    ),
    "object-signed-size-negative": case(
        http("GET", f"{LFS}/objects/{MISSING_OID}?size=-1&expires={EXPIRES}&sig=00"), 404
    ),
    "object-signed-expires-float": case(
        http("GET", f"{LFS}/objects/{MISSING_OID}?size=1&expires=1e99&sig=00"), 404
    ),
    "object-signed-for-other-method": case(
        http("DELETE", f"{LFS}/objects/{MISSING_OID}?{signed('DELETE', MISSING_OID, 1)}"), 405
    ),
    "object-range-20-digits": case(
        http("GET", f"{LFS}/objects/{STORED_OID}", "Range: bytes=" + "9" * 20 + "-"), 200
    ),
    "object-range-backwards": case(http("GET", f"{LFS}/objects/{STORED_OID}", "Range: bytes=5-1"), 416),
    "object-range-zero-suffix": case(http("GET", f"{LFS}/objects/{STORED_OID}", "Range: bytes=-0"), 416),
    "object-range-huge-suffix": case(
        http("GET", f"{LFS}/objects/{STORED_OID}", "Range: bytes=-" + "9" * 18), 206
    ),
    "object-range-latin1": case(http("GET", f"{LFS}/objects/{STORED_OID}", "Range: bytes=\xe9-\xb2"), 200),
    "object-range-several": case(http("GET", f"{LFS}/objects/{STORED_OID}", "Range: bytes=0-1,3-4"), 200),
    "object-if-none-match-garbage": case(
        http("GET", f"{LFS}/objects/{STORED_OID}", 'If-None-Match: W/"\xe9", *'), 200
    ),
    "object-put-chunked": case(
        http(
            "PUT",
            f"{LFS}/objects/{STORED_OID}",
            "Transfer-Encoding: chunked",
            body=b"%x\r\n%s\r\n0\r\n\r\n" % (len(STORED), STORED),
            length=False,
        ),
        411,
    ),
    "object-put-length-superscript": case(
        http("PUT", f"{LFS}/objects/{STORED_OID}", "Content-Length: \xb2", body=STORED, length=False),
        400,
        411,
    ),
    "object-put-length-leading-zeros": case(
        http(
            "PUT",
            f"{LFS}/objects/{STORED_OID}",
            "Content-Length: " + "0" * 30 + str(len(STORED)),
            body=STORED,
            length=False,
        ),
        200,
        400,
        411,
    ),
    "object-put-length-negative": case(
        http("PUT", f"{LFS}/objects/{STORED_OID}", "Content-Length: -1", body=STORED, length=False), 400, 411
    ),
    "object-put-length-5000-digits": case(
        http(
            "PUT", f"{LFS}/objects/{STORED_OID}", "Content-Length: " + "9" * 5000, body=STORED, length=False
        ),
        400,
        411,
        413,
    ),
    "object-put-over-cap": case(
        http("PUT", f"{LFS}/objects/{MISSING_OID}", f"Content-Length: {MAX_OBJECT + 1}", length=False), 413
    ),
    "object-put-wrong-content": case(
        http("PUT", f"{LFS}/objects/{MISSING_OID}", body=b"something else"), 422
    ),
    "object-put-gzip": case(
        http("PUT", f"{LFS}/objects/{MISSING_OID}", "Content-Encoding: gzip", body=gzip.compress(b"x")), 422
    ),
    "object-put-signed-wrong-size": case(
        http("PUT", f"{LFS}/objects/{MISSING_OID}?{signed('PUT', MISSING_OID, 3)}", body=b"four"), 400
    ),
    "object-put-bad-oid-expect": case(
        http(
            "PUT",
            f"{LFS}/objects/..%2F..%2Fconfig",
            "Expect: 100-continue",
            "Content-Length: 5",
            length=False,
        ),
        422,
    ),
}

VERIFY = {
    "verify-missing-object": case(
        lfs_post(f"objects/{MISSING_OID}/verify", {"oid": MISSING_OID, "size": 1}), 404
    ),
    "verify-wrong-types": case(lfs_post(f"objects/{STORED_OID}/verify", {"oid": 1, "size": [None]}), 422),
    "verify-size-huge": case(
        lfs_post(f"objects/{STORED_OID}/verify", {"oid": STORED_OID, "size": 10**400}), 422
    ),
    "verify-size-infinity": case(
        lfs_post(f"objects/{STORED_OID}/verify", b'{"oid": "' + STORED_OID.encode() + b'", "size": 1e999}'),
        422,
    ),
    "verify-not-json": case(lfs_post(f"objects/{STORED_OID}/verify", b"{oid"), 422),
    "verify-array": case(lfs_post(f"objects/{STORED_OID}/verify", b"[]"), 422),
    "verify-deep": case(lfs_post(f"objects/{STORED_OID}/verify", nested(100_000)), 422),
    "verify-bad-oid": case(lfs_post("objects/%2e%2e/verify", {}), 422),
    "verify-sig-not-ascii": case(
        lfs_post(
            f"objects/{STORED_OID}/verify?size={len(STORED)}&expires={EXPIRES}&sig=%C3%A9",
            {"oid": STORED_OID, "size": len(STORED)},
        ),
        200,
        401,
    ),
    "verify-no-content-type": case(
        http("POST", f"{LFS}/objects/{STORED_OID}/verify", body=b'{"oid": "x"}'), 415
    ),
}

#: Lock ids are the SHA-256 of the path.
LOCKED_PATH = "assets/model.psd"
LOCK_ID = hashlib.sha256(LOCKED_PATH.encode()).hexdigest()
#: A path of at most 4,096 characters that takes more than 12 KiB as a lock file's JSON (six bytes each).
ESCAPED_PATH = "\xe9" * 2100
LOCKS = {
    "locks-limit-letters": case(http("GET", f"{LFS}/locks?limit=ten"), 422),
    "locks-limit-zero": case(http("GET", f"{LFS}/locks?limit=0"), 422),
    "locks-limit-negative": case(http("GET", f"{LFS}/locks?limit=-5"), 422),
    "locks-limit-5000-digits": case(http("GET", f"{LFS}/locks?limit=" + "9" * 5000), 200, 422),
    "locks-limit-exponent": case(http("GET", f"{LFS}/locks?limit=1e999"), 422),
    "locks-limit-superscript": case(http("GET", f"{LFS}/locks?limit=%C2%B2"), 422),
    "locks-limit-arabic-digit": case(http("GET", f"{LFS}/locks?limit=%D9%A3"), 200, 422),
    "locks-limit-not-utf8": case(http("GET", f"{LFS}/locks?limit=%FF"), 400),
    "locks-cursor-unknown": case(http("GET", f"{LFS}/locks?cursor=nope"), 422),
    "locks-cursor-nul": case(http("GET", f"{LFS}/locks?cursor=%00"), 200, 422),
    "locks-id-dotdot": case(http("GET", f"{LFS}/locks?id=..%2F..%2Fconfig"), 200),
    "locks-path-not-utf8": case(http("GET", f"{LFS}/locks?path=%C0%AE"), 400),
    "locks-refspec-huge": case(http("GET", f"{LFS}/locks?refspec=" + "r" * 30000), 200),
    "locks-create-path-list": case(lfs_post("locks", {"path": ["a"]}), 422),
    "locks-create-path-number": case(lfs_post("locks", {"path": 1}), 422),
    "locks-create-path-null": case(lfs_post("locks", {"path": None}), 422),
    "locks-create-path-missing": case(lfs_post("locks", {}), 422),
    "locks-create-path-empty": case(lfs_post("locks", {"path": ""}), 422),
    "locks-create-path-nul": case(lfs_post("locks", {"path": "a\u0000b"}), 422),
    "locks-create-path-4097": case(lfs_post("locks", {"path": "p" * 4097}), 422),
    "locks-create-path-surrogate": case(lfs_post("locks", b'{"path": "\\ud800"}'), 201, 422),
    "locks-create-path-escaped-twice": case(
        lfs_post("locks", {"path": ESCAPED_PATH}), 409, setup=(lfs_post("locks", {"path": ESCAPED_PATH}),)
    ),
    "locks-create-not-json": case(lfs_post("locks", b"path=a"), 422),
    "locks-create-not-object": case(lfs_post("locks", b'"a.bin"'), 422),
    "locks-create-deep": case(lfs_post("locks", nested(100_000)), 422),
    "locks-create-wrong-content-type": case(
        http("POST", f"{LFS}/locks", "Content-Type: text/plain", body=b'{"path": "a"}'), 415
    ),
    "locks-verify-limit-infinity": case(lfs_post("locks/verify", b'{"limit": 1e999}'), 422),
    "locks-verify-limit-minus-infinity": case(lfs_post("locks/verify", b'{"limit": -1e999}'), 422),
    "locks-verify-limit-nan": case(lfs_post("locks/verify", b'{"limit": NaN}'), 422),
    "locks-verify-limit-string": case(lfs_post("locks/verify", {"limit": "ten"}), 422),
    "locks-verify-limit-list": case(lfs_post("locks/verify", {"limit": [1]}), 422),
    "locks-verify-limit-huge": case(lfs_post("locks/verify", {"limit": 10**400}), 200),
    "locks-verify-cursor-list": case(lfs_post("locks/verify", {"cursor": [1]}), 422),
    "locks-verify-cursor-dict": case(lfs_post("locks/verify", {"cursor": {"id": LOCK_ID}}), 422),
    "locks-verify-cursor-unknown": case(lfs_post("locks/verify", {"cursor": "x" * 64}), 422),
    "locks-verify-not-object": case(lfs_post("locks/verify", b"[]"), 422),
    "locks-verify-not-json": case(lfs_post("locks/verify", b"\xff"), 422),
    "unlock-unknown": case(lfs_post(f"locks/{'0' * 64}/unlock", {}), 404),
    "unlock-dotdot": case(lfs_post("locks/..%2F..%2Fconfig/unlock", {}), 404),
    "unlock-id-not-utf8": case(lfs_post("locks/%FF/unlock", {}), 400),
    "unlock-not-json": case(lfs_post(f"locks/{LOCK_ID}/unlock", b"force"), 422),
    "unlock-force-string": case(
        lfs_post(f"locks/{LOCK_ID}/unlock", {"force": "true"}),
        403,
        setup=(lfs_post("locks", {"path": LOCKED_PATH}, BOB),),
    ),
    "unlock-force-list": case(
        lfs_post(f"locks/{LOCK_ID}/unlock", {"force": [True]}),
        403,
        setup=(lfs_post("locks", {"path": LOCKED_PATH}, BOB),),
    ),
}

METHODS = {
    "method-put-info-refs": case(http("PUT", ADVERTISE, body=b"x"), 405),
    "method-delete-info-refs": case(http("DELETE", ADVERTISE), 405),
    "method-unknown-info-refs": case(http("FROB", ADVERTISE), 400, 405),
    "method-post-packs": case(http("POST", "/proj.git/objects/info/packs", body=b"x"), 405),
    "method-head-packs": case(http("HEAD", "/proj.git/objects/info/packs"), 405),
    "method-put-head-file": case(http("PUT", "/proj.git/HEAD", body=b"ref: refs/heads/evil\n"), 405),
    "method-get-upload-pack": case(http("GET", "/proj.git/git-upload-pack"), 405),
    "method-put-receive-pack": case(http("PUT", "/proj.git/git-receive-pack", body=b"0000"), 405),
    "method-get-batch": case(http("GET", f"{LFS}/objects/batch"), 405),
    "method-head-batch": case(http("HEAD", f"{LFS}/objects/batch"), 405),
    "method-options-batch": case(http("OPTIONS", f"{LFS}/objects/batch"), 405),
    "method-post-object": case(http("POST", f"{LFS}/objects/{STORED_OID}", body=b"{}"), 405),
    "method-delete-object": case(http("DELETE", f"{LFS}/objects/{STORED_OID}"), 405),
    "method-get-verify": case(http("GET", f"{LFS}/objects/{STORED_OID}/verify"), 405),
    "method-patch-locks": case(http("PATCH", f"{LFS}/locks", body=b"{}"), 405),
    "method-delete-locks": case(http("DELETE", f"{LFS}/locks"), 405),
    "method-get-locks-verify": case(http("GET", f"{LFS}/locks/verify"), 405),
    "method-get-unlock": case(http("GET", f"{LFS}/locks/{LOCK_ID}/unlock"), 405),
    "method-post-healthz": case(http("POST", "/healthz", body=b"x"), 405),
    "method-connect": case(http("CONNECT", "proj.git:443"), 400, 404, 405),
    "method-absolute-uri": case(http("GET", "http://x" + ADVERTISE), 200, 400, 404),
    "method-asterisk": case(http("OPTIONS", "*"), 400, 404, 405),
    "method-head-upload-pack": case(http("HEAD", "/proj.git/git-upload-pack"), 405),
    "http10-upload-pack-chunked": case(
        http(
            "POST",
            "/proj.git/git-upload-pack",
            "Content-Type: application/x-git-upload-pack-request",
            "Transfer-Encoding: chunked",
            body=b"4\r\n0000\r\n0\r\n\r\n",
            length=False,
        ).replace(b"HTTP/1.1", b"HTTP/1.0"),
        200,
        400,
    ),
    "http10-batch-without-length": case(
        b"POST "
        + LFS.encode()
        + b"/objects/batch HTTP/1.0\r\nContent-Type: "
        + LFS_JSON.encode()
        + b"\r\n\r\n{}",
        422,
    ),
    "http10-download": case(
        http("GET", f"{LFS}/objects/{STORED_OID}").replace(b"HTTP/1.1", b"HTTP/1.0"), 200
    ),
    "http10-range-on-dumb-file": case(
        http("GET", "/proj.git/HEAD", "Range: bytes=-" + "9" * 5000).replace(b"HTTP/1.1", b"HTTP/1.0"),
        200,
        206,
    ),
    "http09-request-line": case(b"GET /proj.git/info/refs\r\n\r\n", 400, 505),
    "http2-preface": case(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, 505),
    "http12-request": case(http("GET", ADVERTISE).replace(b"HTTP/1.1", b"HTTP/1.2"), 505),
    "host-missing": case(b"GET " + ADVERTISE.encode() + b" HTTP/1.1\r\nConnection: close\r\n\r\n", 400),
    "host-twice": case(http("GET", ADVERTISE, "Host: y"), 400),
}


def push(name: str, *headers: str) -> Request:
    """A push of the prebuilt request ``name`` (see ``prebuilt``)."""
    return lambda prebuilt: receive_pack(prebuilt[name], *headers)


#: A file whose name is not UTF-8 (git takes any bytes but NUL and ``/``).
LATIN1_NAME = b"caf\xe9.txt"
PUSHES = {
    "push-non-utf8-name": case(push("latin1-name"), 200, answer=b"ok refs/heads/main"),
    "push-non-utf8-name-while-a-lock-exists": case(
        push("latin1-name"), 200, answer=b"ok refs/heads/main", setup=(lfs_post("locks", {"path": "x.bin"}),)
    ),
    "push-non-utf8-name-with-max-file-size": case(
        push("latin1-name"), 200, answer=b"ok refs/heads/main", server="max-file-size"
    ),
    "push-garbage-pack": case(
        lambda prebuilt: receive_pack(prebuilt["latin1-name"][:200] + b"PACK" + b"\xff" * 100),
        200,
        400,
        answer=b"",
    ),
}


def fetch(name: str) -> Request:
    """A protocol v2 fetch with the prebuilt request ``name``."""
    return lambda prebuilt: upload_pack(prebuilt[name], "Git-Protocol: version=2")


#: --pack-cache: fetch requests are read whole (up to 64 KiB) and looked at before git starts.
PACK_CACHE = {
    "pack-cache-garbage": case(upload_pack(b"hello, git"), 400, server="pack-cache"),
    "pack-cache-negative-pkt-lengths": case(
        upload_pack(b"-001-fff+0010abcd" * 4), 200, 400, server="pack-cache"
    ),
    "pack-cache-hex-prefix-lengths": case(
        upload_pack(b"0x10command=fetch" + b"0000", "Git-Protocol: version=2"), 200, 400, server="pack-cache"
    ),
    "pack-cache-clone-twice": case(
        fetch("clone-v2"), 200, answer=b"packfile", setup=(fetch("clone-v2"),), server="pack-cache"
    ),
    "pack-cache-clone-other-protocol-items": case(
        lambda prebuilt: upload_pack(prebuilt["clone-v2"], 'Git-Protocol: version=2:agent=~:x=" ;'),
        200,
        answer=b"packfile",
        server="pack-cache",
    ),
    "pack-cache-want-not-a-tip": case(
        upload_pack(
            pkt("command=fetch\n") + b"0001" + pkt(f"want {'1' * 40}\n") + pkt("done\n") + b"0000",
            "Git-Protocol: version=2",
        ),
        200,
        400,
        server="pack-cache",
    ),
    "pack-cache-want-garbage": case(
        upload_pack(
            pkt("command=fetch\n") + b"0001" + pkt("want \xff\x00/../x\n") + pkt("done\n") + b"0000",
            "Git-Protocol: version=2",
        ),
        200,
        400,
        server="pack-cache",
    ),
    "pack-cache-have-lines": case(
        upload_pack(pkt(f"want {'1' * 40}\n") + b"0000" + pkt(f"have {'2' * 40}\n") * 100 + pkt("done\n")),
        200,
        400,
        server="pack-cache",
    ),
    "pack-cache-request-over-64k": case(
        upload_pack(
            pkt("command=ls-refs\n") + b"0001" + pkt("peel\n") * 10_000 + b"0000", "Git-Protocol: version=2"
        ),
        200,
        server="pack-cache",
    ),
    "pack-cache-gzip-bomb": case(
        upload_pack(GZIP_BOMB, "Content-Encoding: gzip", "Git-Protocol: version=2"),
        413,
        server="pack-cache",
    ),
    "pack-cache-body-never-comes": case(
        UPLOAD_PACK_BODY_NEVER_COMES,
        408,
        server="pack-cache",
    ),
}

XHEADERS = {
    "xheaders-real-ip-not-an-address": case(
        http("GET", ADVERTISE, "X-Real-Ip: a..b"), 200, server="xheaders"
    ),
    "xheaders-real-ip-latin1": case(http("GET", ADVERTISE, "X-Real-Ip: \xe9" * 70), 200, server="xheaders"),
    "xheaders-real-ip-zone": case(
        http("GET", ADVERTISE, "X-Real-Ip: fe80::1%eth0", basic(b"bob:wrong")), 401, server="xheaders"
    ),
    "xheaders-real-ip-short-form": case(
        http("GET", ADVERTISE, "X-Real-Ip: 1", basic(b"bob:wrong")), 401, server="xheaders"
    ),
    "xheaders-forwarded-for-many": case(
        http("GET", ADVERTISE, "X-Forwarded-For: " + ", ".join(["::1"] * 3000), basic(b"x")),
        401,
        server="xheaders",
    ),
    "xheaders-forwarded-proto-garbage": case(
        batch(objects("upload", {"oid": MISSING_OID, "size": 1}), "X-Forwarded-Proto: \xe9, javascript"),
        200,
        server="xheaders",
    ),
    "xheaders-push-from-odd-address": case(
        receive_pack(b"0000", "X-Real-Ip: ::ffff:1.2.3.4"), 200, 400, server="xheaders"
    ),
}

#: Requests the client gives up on, cut after this many bytes (negative: from the end; None: sent whole),
#: the connection closed at once without reading the answer.
ABANDONED: Dict[str, Tuple[Request, Optional[int]]] = {
    "abandon-head": (http("GET", ADVERTISE), 20),
    "abandon-batch-body": (batch(objects("download", {"oid": STORED_OID, "size": 1})), -10),
    "abandon-batch-whole": (batch(objects("download", {"oid": STORED_OID, "size": 1})), None),
    "abandon-locks-body": (lfs_post("locks", {"path": "half.bin"}), -3),
    "abandon-locks-whole": (lfs_post("locks", {"path": "gone.bin"}), None),
    "abandon-verify-body": (lfs_post(f"objects/{STORED_OID}/verify", {"oid": STORED_OID, "size": 1}), -3),
    "abandon-put-body": (http("PUT", f"{LFS}/objects/{STORED_OID}", body=STORED), -5),
    "abandon-put-signed": (
        http("PUT", f"{LFS}/objects/{STORED_OID}?{signed('PUT', STORED_OID, len(STORED))}", body=STORED),
        -5,
    ),
    "abandon-download": (http("GET", f"{LFS}/objects/{STORED_OID}"), None),
    "abandon-wrong-password": (http("GET", ADVERTISE, basic(b"bob:wrong")), None),
    "abandon-token-login": (http("GET", ADVERTISE, basic(f"bob:{TOKEN}".encode())), None),
    "abandon-upload-pack-body": (upload_pack(pkt(f"want {'1' * 40}\n") + b"0000" + pkt("done\n")), -4),
    "abandon-upload-pack-whole": (
        upload_pack(pkt("command=ls-refs\n") + b"0000", "Git-Protocol: version=2"),
        None,
    ),
    "abandon-push-mid-pack": (push("latin1-name"), -40),
    "abandon-push-whole": (push("latin1-name"), None),
    "abandon-gzip-bomb": (
        upload_pack(GZIP_BOMB, "Content-Encoding: gzip", "Git-Protocol: version=2"),
        None,
    ),
    "abandon-create-on-push": (create("new.git"), None),
}


CASES: Dict[str, Case] = {
    **SMART,
    **DUMB,
    **NAMES,
    **AUTH,
    **BATCH,
    **OBJECTS,
    **VERIFY,
    **LOCKS,
    **METHODS,
    **PUSHES,
    **PACK_CACHE,
    **XHEADERS,
}

# --- The server -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def git_client(git_home: Path) -> GitClient:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(HOME=str(git_home), GIT_CONFIG_NOSYSTEM="1")
    env.update(GIT_AUTHOR_NAME="A", GIT_AUTHOR_EMAIL="a@example.com")
    env.update(GIT_COMMITTER_NAME="C", GIT_COMMITTER_EMAIL="c@example.com")
    return GitClient(env)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory, git_client: GitClient) -> Path:
    """proj.git, made once with git; each test serves a copy."""
    base = tmp_path_factory.mktemp("template") / "repos"
    base.mkdir()
    path = make_repo(git_client, base, "proj.git")
    # Few files, so a copy per test is quick: one pack, no sample hooks.
    git_client.sync("repack", "-adq", cwd=path)
    git_client.sync("prune-packed", cwd=path)
    for extra in ("hooks", "info", "branches"):
        shutil.rmtree(path / extra, ignore_errors=True)
    (path / "description").unlink(missing_ok=True)
    return path


@pytest.fixture(scope="module")
def prebuilt(tmp_path_factory: pytest.TempPathFactory, git_client: GitClient, template: Path) -> Prebuilt:
    """Request bodies for the template: ``latin1-name`` pushes a file whose name is not UTF-8 to main,
    ``clone-v2`` fetches main's tip with protocol v2."""
    work = tmp_path_factory.mktemp("work") / "proj"
    git_client.sync("clone", "-q", str(template), str(work))
    old = git_client.sync("rev-parse", "HEAD", cwd=work).strip()
    (work / os.fsdecode(LATIN1_NAME)).write_bytes(b"x\n")
    git_client.sync("add", ".", cwd=work)
    git_client.sync("commit", "-q", "-m", "a file named in latin-1", cwd=work)
    new = git_client.sync("rev-parse", "HEAD", cwd=work).strip()
    pack = pack_for_push(git_client, work, f"{new}\n^{old}\n")
    commands = pkt(f"{old} {new} refs/heads/main\0report-status side-band-64k\n") + b"0000"
    clone = (
        pkt("command=fetch\n") + b"0001" + pkt(f"want {old}\n") + pkt("ofs-delta\n") + pkt("done\n") + b"0000"
    )
    return {"latin1-name": commands + pack, "clone-v2": clone}


@pytest.fixture(autouse=True)
def _earlier_garbage_collected() -> None:
    """What earlier tests left for the garbage collector (a task pending when their loop closed) is
    logged now, before this test's records are looked at, not by a collection in the middle of them."""
    gc.collect()


@pytest.fixture
def sweep(request: pytest.FixtureRequest) -> Case:
    """The case the test runs (its server options shape the fixtures below); a plain server for others."""
    return CASES.get(request.node.callspec.params["name"], Case(b""))


@pytest.fixture
def repo(gitbase: Path, template: Path) -> Path:
    """A copy of the template, an LFS object in it, and names that are not repositories beside it."""
    path = gitbase / "proj.git"
    shutil.copytree(template, path, symlinks=True)
    stored = path / "lfs" / "objects" / STORED_OID[:2] / STORED_OID[2:4] / STORED_OID
    stored.parent.mkdir(parents=True)
    stored.write_bytes(STORED)
    (gitbase / "plainfile.git").write_text("not a repository\n")
    (gitbase / "empty").mkdir()
    return path


@pytest.fixture
def policy(tmp_path: Path) -> Iterator[IniPolicy]:
    """users.ini: anyone may push to proj; bob (password or token) may do anything anywhere."""
    path = tmp_path / "users.ini"
    path.write_text(USERS_INI)
    # Generous: failed logins here are the cases themselves, not guesses to slow down.
    throttle = FailureThrottle(free=1000, limit=10_000)
    policy = IniPolicy(str(path), realm="sweep", throttle=throttle)
    yield policy
    executor = policy._verifier._executor  # the password checks' threads, made on first use
    if executor is not None:
        executor.shutdown(wait=True)


@pytest.fixture
def lfs(io_loop: Any) -> Iterator[LfsServer]:
    """LFS with the fixed key; its threads end with the test (after the server stopped)."""
    executor = ThreadPoolExecutor(4, "sweep-lfs")
    yield LfsServer(SIGNER, MAX_OBJECT, executor=executor)
    executor.shutdown(wait=True)


@pytest.fixture
def backend(
    gitbase: Path, repo: Path, tmp_path: Path, policy: IniPolicy, lfs: LfsServer, sweep: Case
) -> GitBackend:
    """``gitbase`` with ``repo`` in it, served as ``gittornado --create-on-push --idle-timeout 1
    --header-timeout 1 --max-fetch-body-size 2M`` (``--max-file-size 4M``, ``--pack-cache DIR`` for the
    cases that ask for them)."""
    limits = PushLimits(max_file_size=MAX_OBJECT if "max-file-size" in sweep.server else None)
    pack_cache = PackCache(str(tmp_path / "pack-cache")) if "pack-cache" in sweep.server else None
    return GitBackend(
        lookup=RepositoryRoot(str(gitbase), create_on_push=True),
        policy=policy,
        lfs=lfs,
        idle_timeout=1.0,
        body_timeout=1.0,
        max_fetch_body_size=2 * 2**20,
        push_limits=limits,
        pack_cache=pack_cache,
    )


@pytest.fixture
def http_server(
    request: pytest.FixtureRequest, io_loop: Any, app: Any, _unused_port: Any, sweep: Case
) -> Iterator[HardenedHTTPServer]:
    """The in-process server as the gittornado command builds it (pytest-tornado's is a plain HTTPServer)."""
    server = HardenedHTTPServer(app, xheaders="xheaders" in sweep.server, idle_connection_timeout=1.0)
    server.add_socket(_unused_port[0])
    yield server
    server.stop()
    io_loop.run_sync(server.close_all_connections, timeout=request.config.option.async_test_timeout)


@dataclass
class Answer:
    """What came back: the final status (None: none), everything received, how the connection ended."""

    status: Optional[int]
    raw: bytes
    ended: str

    def __str__(self) -> str:
        return f"{self.ended} after {len(self.raw)} bytes: {self.raw[:600]!r}"


async def exchange(port: int, request: bytes, timeout: float = ANSWER_TIMEOUT) -> Answer:
    """Send ``request`` and read until the server closes, or ``timeout`` passes without a byte."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received, ended = b"", "closed"
    try:
        writer.write(request)
        await writer.drain()
        while data := await asyncio.wait_for(reader.read(65536), timeout):
            received += data
    except (ConnectionResetError, BrokenPipeError):
        ended = "reset"
    except asyncio.TimeoutError:
        ended = f"hung ({timeout}s without a byte)"
    finally:
        writer.close()
    statuses = [int(code) for code in re.findall(rb"^HTTP/1\.[01] (\d{3}) ", received, re.MULTILINE)]
    final = [status for status in statuses if status >= 200]
    return Answer(final[0] if final else None, received, ended)


def trouble(caplog: pytest.LogCaptureFixture) -> List[str]:
    """Log records at ERROR or above, and any record that carries a traceback (git's stderr included)."""
    return [
        f"{record.levelname} {record.name}: {record.getMessage()}\n{record.exc_text or ''}"
        for record in caplog.records
        if record.levelno >= logging.ERROR
        or record.exc_info
        or "Traceback (most recent call last)" in record.getMessage()
    ]


def built(request: Request, prebuilt: Prebuilt) -> bytes:
    return request if isinstance(request, bytes) else request(prebuilt)


@pytest.mark.gen_test(timeout=20)
@pytest.mark.parametrize("name", list(CASES))
async def test_a_malformed_request_gets_a_client_error_and_the_server_keeps_serving(
    name: str,
    sweep: Case,
    http_server: HardenedHTTPServer,
    http_port: int,
    prebuilt: Prebuilt,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The case's answer, in time, without an error logged or a traceback sent; then a clone's first
    request is still answered."""
    caplog.set_level(logging.WARNING)
    for request in sweep.setup:
        answer = await exchange(http_port, built(request, prebuilt))
        assert answer.status is not None and 200 <= answer.status < 300, f"setup: {answer}"
    answer = await exchange(http_port, built(sweep.request, prebuilt))
    assert answer.status is not None, str(answer)
    # 505 for an HTTP version the server does not speak is the one 5xx that is the client's error.
    assert answer.status < 500 or (answer.status == 505 and 505 in sweep.expect), str(answer)
    assert answer.status in sweep.expect, str(answer)
    assert sweep.answer in answer.raw, str(answer)
    assert b"Traceback (most recent call last)" not in answer.raw, str(answer)
    assert not trouble(caplog)
    answer = await exchange(http_port, http("GET", ADVERTISE))
    assert answer.status == 200 and b"# service=git-upload-pack" in answer.raw, str(answer)
    assert not trouble(caplog)


@pytest.mark.gen_test(timeout=20)
@pytest.mark.parametrize("name", list(ABANDONED))
async def test_a_client_that_leaves_mid_request_leaves_no_error(
    name: str,
    http_server: HardenedHTTPServer,
    http_port: int,
    gitbase: Path,
    prebuilt: Prebuilt,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No error logged for the request the client left, nor for anything it had started; still serving."""
    caplog.set_level(logging.INFO, logger="gittornado.access")
    request, cut = ABANDONED[name]
    data = built(request, prebuilt)
    reader, writer = await asyncio.open_connection("127.0.0.1", http_port)
    writer.write(data if cut is None else data[:cut])
    await writer.drain()
    writer.close()
    # The server notices (a request cut inside its head is never logged), and whatever it started ends.
    await wait_until(lambda: any(r.name == "gittornado.access" for r in caplog.records), 0.3, 0.01)
    assert await wait_until(lambda: not git_processes_under(gitbase), 5, 0.01)
    await asyncio.sleep(0.02)
    gc.collect()  # a task or future that failed unseen is logged when collected
    answer = await exchange(http_port, http("GET", ADVERTISE))
    assert answer.status == 200 and b"# service=git-upload-pack" in answer.raw, str(answer)
    assert not trouble(caplog)
