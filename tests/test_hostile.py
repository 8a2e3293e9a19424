"""Hostile input: every malformed request gets a 4xx, and leaves the server unharmed.

Each case goes over a raw socket, so what is tested is what really goes on
the wire.  Some never reach a handler (broken framing, broken header lines,
oversized heads): HardenedHTTPServer answers those in Tornado's place, and
these tests pin down the Tornado behaviours it relies on (gittornado/framing.py
and gittornado/httpserver.py).  After every case the same checks run: no git
process is left, no temporary file, the repository is unchanged and fsck-clean,
and a real git client is served normally.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, Optional, Tuple, Union

import pytest
from conftest import GitClient, git_processes_under, parse_response, wait_until
from test_faults import PushRequest, leftovers, push_request
from test_stream import want_request
from tornado.testing import bind_unused_port
from tornado.web import Application, RequestHandler, stream_request_body

from gittornado import GitBackend, HardenedHTTPServer, RepositoryRoot
from gittornado.access import AccessPolicy
from gittornado.httpserver import FramingLogFilter

#: The server's --max-body-size in this module: Target.push fits under it, Target.big_push does not.
LIMIT = 64 * 1024
UPLOAD = ("/proj.git/git-upload-pack", "application/x-git-upload-pack-request")
RECEIVE = ("/proj.git/git-receive-pack", "application/x-git-receive-pack-request")


@pytest.fixture
def backend(gitbase: Path, policy: AccessPolicy) -> GitBackend:
    """The in-process server of this module, with body-size caps like ``--max-body-size 64K`` (and the same
    for fetches, ``--max-fetch-body-size 64K``)."""
    return GitBackend(
        lookup=RepositoryRoot(str(gitbase)), policy=policy, max_body_size=LIMIT, max_fetch_body_size=LIMIT
    )


@pytest.fixture
def http_server(request: pytest.FixtureRequest, io_loop, app, _unused_port):
    """The in-process server as the gittornado command builds it (pytest-tornado's is a plain HTTPServer)."""
    server = HardenedHTTPServer(app)
    server.add_socket(_unused_port[0])
    yield server
    server.stop()
    io_loop.run_sync(server.close_all_connections, timeout=request.config.option.async_test_timeout)


@dataclass
class Target:
    """What the request builders need: the repository's tip and a real push for it."""

    head: str
    push: PushRequest  # ~40 kB: under the cap
    big_push: PushRequest  # ~100 kB: over the cap


@pytest.fixture
def target(git: GitClient, repo: Path, tmp_path: Path) -> Target:
    work = tmp_path / "hostile-work"
    git.sync("clone", "-q", str(repo), str(work))
    head = git.sync("rev-parse", "main", cwd=repo).strip()
    small = push_request(git, repo, work, "refs/heads/main", 40_000)
    git.sync("reset", "-q", "--hard", head, cwd=work)
    big = push_request(git, repo, work, "refs/heads/main", 100_000)
    return Target(head, small, big)


async def exchange(
    port: int, request: bytes, timeout: float = 10.0, tls: Optional[ssl.SSLContext] = None
) -> Tuple[bytes, str]:
    """Send ``request`` (over TLS with ``tls``), then read until the server closes; say how the
    connection ended.

    Unlike conftest.raw_http, a reset is an outcome here, not an error: a
    server that answers early and closes with unread input resets the
    connection, which may be all a client sees.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
    received = b""
    try:
        writer.write(request)
        await writer.drain()
        while True:
            data = await asyncio.wait_for(reader.read(65536), timeout)
            if not data:
                return received, "closed"
            received += data
    except (ConnectionResetError, BrokenPipeError):
        return received, "reset"
    except asyncio.TimeoutError:
        return received, "hung"
    finally:
        writer.close()


def chunked(*pieces: bytes) -> bytes:
    """A complete chunked body, one chunk per piece."""
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def get(path: Union[str, bytes], *headers: bytes) -> bytes:
    """A GET with extra raw header lines; a str path must be ASCII/latin-1, bytes go verbatim."""
    return b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n%s\r\n" % (
        path.encode("latin-1") if isinstance(path, str) else path,
        b"".join(h + b"\r\n" for h in headers),
    )


def raw_post(endpoint: Tuple[str, str], extra: bytes, body: bytes) -> bytes:
    """POST with hand-written framing headers (``extra``) and ``body`` verbatim."""
    path, content_type = endpoint
    return (
        b"POST %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: %s\r\n%s\r\n"
        % (path.encode(), content_type.encode(), extra)
        + body
    )


Unharmed = Callable[[], Awaitable[None]]


@pytest.fixture
def unharmed(
    git: GitClient, repo: Path, gitbase: Path, base_url: str, caplog: pytest.LogCaptureFixture
) -> Unharmed:
    """A check for after the hostile request: no git left running, nothing left behind,
    the repository as it was before the test, the server still serving a real client."""
    caplog.set_level(logging.INFO, logger="gittornado")
    refs = git.sync("for-each-ref", "--format=%(refname) %(objectname)", cwd=repo)

    async def check() -> None:
        assert await wait_until(lambda: not git_processes_under(gitbase), timeout=15), git_processes_under(
            gitbase
        )
        # Polled: under load a quarantine was seen for a moment after the process
        # scan came up empty, then git removed it itself; a real leftover stays.
        assert await wait_until(lambda: not leftovers(repo), timeout=5), (
            leftovers(repo),
            [r.getMessage() for r in caplog.records if r.name == "gittornado"],
        )
        assert git.sync("for-each-ref", "--format=%(refname) %(objectname)", cwd=repo) == refs
        assert git.sync("fsck", "--no-progress", cwd=repo) == ""
        result = await git.run("ls-remote", f"{base_url}/proj.git")
        assert "refs/heads/main" in result.stdout

    return check


def assert_plain_answer(raw: bytes, status: int, words: str) -> None:
    """``raw`` is one complete answer: ``status``, a one-line plain-text reason with ``words``, its
    Content-Length and ``Connection: close``."""
    assert raw, "no answer at all"
    code, headers, body = parse_response(raw)
    assert code == status, raw[:300]
    assert headers["content-type"] == "text/plain; charset=utf-8", raw[:300]
    assert headers["connection"] == "close", raw[:300]
    assert int(headers["content-length"]) == len(body), raw[:300]
    assert headers["server"] == "gittornado", raw[:300]
    text = body.decode()
    assert text.startswith(f"{status} ") and text.count("\n") == 1 and text.endswith("\n"), body
    assert words.lower() in text.lower(), body


#: A password, base64-encoded as Basic auth sends it; it must never come back.
SECRET = b"YWxpY2U6czNjcmV0"

#: Requests no handler sees, refused by HardenedHTTPServer in place of Tornado's bare 400 (see
#: gittornado/framing.py): (request builder, words the plain-text reason has).
BROKEN_FRAMING = {
    "chunk-size-not-hex": (
        lambda t: raw_post(
            RECEIVE, b"Transfer-Encoding: chunked\r\n", b"%x\r\n%s\r\nzz\r\n" % (1000, t.push.body[:1000])
        ),
        "invalid chunk size",
    ),
    "chunk-without-crlf": (
        lambda t: raw_post(
            RECEIVE, b"Transfer-Encoding: chunked\r\n", b"%x\r\n%sXX0\r\n\r\n" % (1000, t.push.body[:1000])
        ),
        "not followed by CRLF",
    ),
    "last-chunk-without-crlf": (
        lambda t: raw_post(UPLOAD, b"Transfer-Encoding: chunked\r\n", b"4\r\n0000\r\n0\r\nXX"),
        "not followed by CRLF",
    ),
    "chunk-size-overflow": (
        lambda t: raw_post(
            RECEIVE, b"Transfer-Encoding: chunked\r\n", b"ffffffffffffffffffff\r\n" + t.push.body[:1000]
        ),
        "chunk sizes add up to more than the body size limit",
    ),
    "chunk-size-negative": (
        lambda t: raw_post(UPLOAD, b"Transfer-Encoding: chunked\r\n", b"-4\r\n0000\r\n0\r\n\r\n"),
        "invalid chunk size",
    ),
    "chunk-extension-junk": (
        lambda t: raw_post(UPLOAD, b"Transfer-Encoding: chunked\r\n", b"4;\x00\x01\r\n0000\r\n0\r\n\r\n"),
        "invalid chunk size",
    ),
    "te-and-content-length": (
        lambda t: raw_post(UPLOAD, b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n", chunked(b"0000")),
        "both Transfer-Encoding and Content-Length",
    ),
    "te-gzip": (
        lambda t: raw_post(UPLOAD, b"Transfer-Encoding: gzip\r\n", gzip.compress(b"0000")),
        "unsupported Transfer-Encoding",
    ),
    "content-length-not-a-number": (
        lambda t: raw_post(UPLOAD, b"Content-Length: 4x\r\n", b"0000"),
        "Content-Length is not a number",
    ),
    # "²" passes str.isdigit() and fails int(): checked against the body size caps, it was a 500.
    "content-length-superscript-fetch": (
        lambda t: raw_post(UPLOAD, b"Content-Length: \xb2\r\n", b"0000"),
        "Content-Length is not a number",
    ),
    "content-length-superscript-push": (
        lambda t: raw_post(RECEIVE, b"Content-Length: \xb2\r\n", b"0000"),
        "Content-Length is not a number",
    ),
    "content-length-negative": (
        lambda t: raw_post(UPLOAD, b"Content-Length: -1\r\n", b"0000"),
        "Content-Length is not a number",
    ),
    "content-length-twice": (
        lambda t: raw_post(UPLOAD, b"Content-Length: 4\r\nContent-Length: 5\r\n", b"0000"),
        "conflicting Content-Length",
    ),
    "content-length-over-tornado-limit": (
        # Not a git URL: Tornado's own body limit (100 MB by default) is in force there.
        lambda t: raw_post(("/elsewhere", "text/plain"), b"Content-Length: %d\r\n" % 2**30, b"0000"),
        "Content-Length is over the body size limit",
    ),
    "request-line-garbage": (lambda t: b"GARBAGE\r\n\r\n", "malformed request line"),
    "tls-client-hello": (
        lambda t: b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64) + b"\r\n\r\n",
        "malformed request line",
    ),
    "header-without-colon": (lambda t: get("/proj.git/HEAD", b"NoColonHere"), "malformed header line"),
    "header-name-with-space": (lambda t: get("/proj.git/HEAD", b"No Token: x"), "malformed header line"),
    "header-folded": (lambda t: get("/proj.git/HEAD", b"X-A: b", b" folded"), "folded lines"),
    "raw-space-in-name": (
        lambda t: get("/pr oj.git/info/refs?service=git-upload-pack"),
        "malformed request line",
    ),
    "git-protocol-control-char": (
        lambda t: get("/proj.git/info/refs?service=git-upload-pack", b"Git-Protocol: version=2\x01"),
        "malformed header line",
    ),
    "authorization-control-char": (
        lambda t: get("/proj.git/HEAD", b"Authorization: Basic " + SECRET + b"\x01"),
        "malformed header line",
    ),
    # A GET's body means nothing, and one announced but never sent would hold the connection.
    "get-with-body": (lambda t: get("/proj.git/HEAD", b"Content-Length: 4") + b"abcd", "has no body"),
    "get-with-chunked-body": (
        lambda t: get("/proj.git/HEAD", b"Transfer-Encoding: chunked") + chunked(b"abcd"),
        "has no body",
    ),
    "host-missing": (lambda t: b"GET /proj.git/HEAD HTTP/1.1\r\n\r\n", "Host header"),
    "host-invalid": (
        lambda t: b"GET /proj.git/HEAD HTTP/1.1\r\nHost: two words\r\nConnection: close\r\n\r\n",
        "Host header",
    ),
    "host-twice": (lambda t: get("/proj.git/HEAD", b"Host: y"), "Host header"),
}


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("case", list(BROKEN_FRAMING))
async def test_broken_framing_is_a_400_with_the_reason(
    case: str, http_port: int, target: Target, unharmed: Unharmed
):
    build, words = BROKEN_FRAMING[case]
    request = build(target)
    raw, ended = await exchange(http_port, request)
    assert ended != "hung"
    assert_plain_answer(raw, 400, words)
    # Our own words, never the request's (gittornado/framing.py REASONS).
    assert request.split(b"\r\n")[0] not in raw and SECRET not in raw, raw
    await unharmed()


#: Request lines with an HTTP version other than 1.0 and 1.1. Tornado serves HTTP/1.2 to 1.9 (with a
#: response that has neither a length nor chunking) and refuses the others itself.
OTHER_VERSIONS = {
    "1.2-kept-alive": b"GET /proj.git/info/refs?service=git-upload-pack HTTP/1.2\r\nHost: x\r\n"
    b"Connection: keep-alive\r\n\r\n",
    "1.9": b"GET /proj.git/info/refs?service=git-upload-pack HTTP/1.9\r\nHost: x\r\n\r\n",
    "1.5-push": b"POST /proj.git/git-receive-pack HTTP/1.5\r\nHost: x\r\nConnection: keep-alive\r\n"
    b"Content-Type: application/x-git-receive-pack-request\r\nContent-Length: 4\r\n\r\n0000",
    "2.0-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "9.9": b"GET /proj.git/HEAD HTTP/9.9\r\nHost: x\r\n\r\n",
}


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("case", list(OTHER_VERSIONS))
async def test_other_http_versions_are_a_505(case: str, http_port: int, unharmed: Unharmed):
    """A complete 505 answer and a closed connection; git never runs."""
    raw, ended = await exchange(http_port, OTHER_VERSIONS[case])
    assert ended != "hung"
    assert_plain_answer(raw, 505, "unsupported HTTP version")
    await unharmed()


@pytest.mark.gen_test(timeout=30)
async def test_credentials_in_a_malformed_header_never_reach_a_log(
    http_server: HardenedHTTPServer, http_port: int, app: Application, caplog: pytest.LogCaptureFixture
):
    """Tornado's own log line for a malformed request would quote the header value (the credentials);
    it says in our words what was wrong instead, and still says from where."""
    caplog.set_level(logging.INFO)
    raw, ended = await exchange(http_port, get("/proj.git/HEAD", b"Authorization: Basic " + SECRET + b"\x01"))
    assert ended != "hung"
    assert_plain_answer(raw, 400, "malformed header line")
    messages = [record.getMessage() for record in caplog.records]
    assert "Malformed HTTP message from 127.0.0.1: malformed header line" in messages, messages
    password = base64.b64decode(SECRET).decode().partition(":")[2]
    for text in [*messages, caplog.text]:
        assert SECRET.decode() not in text and password not in text, text
    # Installed once, however many servers are made.
    HardenedHTTPServer(app)
    filters = logging.getLogger("tornado.general").filters
    assert sum(isinstance(f, FramingLogFilter) for f in filters) == 1, filters


@pytest.mark.gen_test(timeout=60)
async def test_broken_framing_after_100_continue(http_port: int, target: Target, unharmed: Unharmed):
    """Tornado's interim 100 (Continue) goes out first; the answer to the broken chunk follows it."""
    request = raw_post(
        RECEIVE,
        b"Expect: 100-continue\r\nTransfer-Encoding: chunked\r\n",
        b"%x\r\n%sXX" % (1000, target.push.body[:1000]),
    )
    raw, ended = await exchange(http_port, request)
    assert ended != "hung"
    interim = b"HTTP/1.1 100 (Continue)\r\n\r\n"
    assert raw.startswith(interim), raw[:300]
    assert_plain_answer(raw[len(interim) :], 400, "not followed by CRLF")
    await unharmed()


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize(
    "body",
    [
        lambda t: b"0" * 100 + b"%x\r\n%s\r\n0\r\n\r\n" % (1000, t.push.body[:1000]),
        lambda t: b"%x\r\n%s\r\n%x;%s\r\n" % (1000, t.push.body[:1000], 1000, b"e" * 100),
    ],
    ids=["zero-padded-first-size", "long-extension-mid-body"],
)
async def test_overlong_chunk_size_line_is_a_400_not_a_431(
    body: Callable[[Target], bytes], http_port: int, target: Target, unharmed: Unharmed
):
    """Tornado reads a chunk-size line with the same kind of bounded read as the head (64 bytes here):
    overrunning it is broken framing, not an oversized head."""
    raw, ended = await exchange(http_port, raw_post(RECEIVE, b"Transfer-Encoding: chunked\r\n", body(target)))
    assert ended != "hung"
    assert_plain_answer(raw, 400, "chunk-size line too long")
    await unharmed()


#: Requests gittornado itself refuses: (request builder, status, words the plain-text reason has).
REFUSED = {
    "not-gzip": (
        lambda t: raw_post(
            RECEIVE, b"Content-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n", chunked(t.push.body[:5000])
        ),
        400,
        "gzip",
    ),
    "gzip-ends-early": (
        lambda t: (
            lambda z: raw_post(RECEIVE, b"Content-Encoding: gzip\r\nContent-Length: %d\r\n" % len(z), z)
        )(gzip.compress(t.push.body)[:-100]),
        400,
        "gzip",
    ),
    "gzip-then-junk": (
        lambda t: (
            lambda z: raw_post(UPLOAD, b"Content-Encoding: gzip\r\nContent-Length: %d\r\n" % len(z), z)
        )(gzip.compress(want_request(t.head)) + b"junk"),
        400,
        "gzip",
    ),
    "gzip-bomb-over-limit": (
        lambda t: (
            lambda z: raw_post(UPLOAD, b"Content-Encoding: gzip\r\nContent-Length: %d\r\n" % len(z), z)
        )(gzip.compress(want_request(t.head) + bytes(8 * 1024 * 1024))),
        413,
        "too large",
    ),
    "content-length-over-limit": (
        lambda t: raw_post(RECEIVE, b"Content-Length: %d\r\n" % len(t.big_push.body), t.big_push.body),
        413,
        "too large",
    ),
    "chunked-over-limit": (
        lambda t: raw_post(RECEIVE, b"Transfer-Encoding: chunked\r\n", chunked(t.big_push.body)),
        413,
        "too large",
    ),
    "chunked-in-small-pieces-over-limit": (
        lambda t: raw_post(
            RECEIVE,
            b"Transfer-Encoding: chunked\r\n",
            chunked(*(t.big_push.body[i : i + 4096] for i in range(0, len(t.big_push.body), 4096))),
        ),
        413,
        "too large",
    ),
    "gzip-push-over-limit": (
        lambda t: (
            lambda z: raw_post(RECEIVE, b"Content-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n", z)
        )(chunked(gzip.compress(t.big_push.body, compresslevel=1))),
        413,
        "too large",
    ),
    "content-encoding-br": (
        lambda t: raw_post(UPLOAD, b"Content-Encoding: br\r\nContent-Length: 4\r\n", b"0000"),
        415,
        "Content-Encoding",
    ),
    "content-type-missing": (
        lambda t: (
            b"POST /proj.git/git-receive-pack HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n" % len(t.push.body) + t.push.body
        ),
        415,
        "Content-Type",
    ),
    "git-protocol-too-long": (
        lambda t: get("/proj.git/info/refs?service=git-upload-pack", b"Git-Protocol: version=" + b"2" * 300),
        400,
        "Git-Protocol",
    ),
    "git-protocol-empty-key": (
        lambda t: raw_post(UPLOAD, b"Git-Protocol: =2\r\nContent-Length: 4\r\n", b"0000"),
        400,
        "Git-Protocol",
    ),
    "git-protocol-utf8": (
        lambda t: get("/proj.git/info/refs?service=git-upload-pack", "Git-Protocol: versión=2".encode()),
        400,
        "Git-Protocol",
    ),
    "service-unknown": (lambda t: get("/proj.git/info/refs?service=git-evil"), 400, "Unknown service"),
    "service-empty": (lambda t: get("/proj.git/info/refs?service="), 400, "Unknown service"),
    "service-without-advertisement": (
        lambda t: get("/proj.git/info/refs?service=git-upload-archive"),
        400,
        "Unknown service",
    ),
    "service-not-utf8": (lambda t: get("/proj.git/info/refs?service=%ff"), 400, "Bad Request"),
    "service-post-unknown": (
        lambda t: raw_post(
            ("/proj.git/git-evil", "application/x-git-evil-request"), b"Content-Length: 4\r\n", b"0000"
        ),
        404,
        "Not found",
    ),
    "name-unicode": (
        lambda t: get("/pr%C3%B6j%E2%98%83.git/info/refs?service=git-upload-pack"),
        404,
        "not found",
    ),
    "name-raw-utf8": (
        lambda t: get("/pröj☃.git/info/refs?service=git-upload-pack".encode()),
        404,
        "not found",
    ),
    "name-percent-space": (lambda t: get("/pr%20oj.git/info/refs?service=git-upload-pack"), 404, "not found"),
    "name-5000-chars": (
        lambda t: get("/" + "a" * 5000 + ".git/info/refs?service=git-upload-pack"),
        404,
        "not found",
    ),
    "name-300-char-segment": (
        lambda t: raw_post(
            ("/" + "b" * 300 + "/x.git/git-upload-pack", UPLOAD[1]), b"Content-Length: 4\r\n", b"0000"
        ),
        404,
        "not found",
    ),
    "name-deep": (lambda t: get("/" + "d/" * 500 + "x.git/HEAD"), 404, "not found"),
    "name-nul": (lambda t: get("/proj%00.git/info/refs?service=git-upload-pack"), 404, "not found"),
    "name-not-utf8": (lambda t: get("/proj%ff.git/info/refs?service=git-upload-pack"), 400, "Bad Request"),
    "name-surrogate": (lambda t: get("/%ed%a0%80.git/info/refs?service=git-upload-pack"), 400, "Bad Request"),
    "name-control-chars": (lambda t: get("/%01%1b%7f.git/HEAD"), 404, "not found"),
}


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("case", list(REFUSED))
async def test_refused_with_a_short_plain_text_reason(
    case: str, http_port: int, target: Target, unharmed: Unharmed
):
    build, expected, words = REFUSED[case]
    raw, ended = await exchange(http_port, build(target))
    assert ended != "hung"
    assert raw, f"no answer at all ({ended})"
    status, headers, body = parse_response(raw)
    assert status == expected, raw[:300]
    assert headers["content-type"].startswith("text/plain"), headers
    text = body.decode("utf-8", "replace")
    assert len(body) < 200 and "Traceback" not in text, body
    assert words.lower() in text.lower() or words.lower() in raw.split(b"\r\n")[0].decode().lower(), raw[:300]
    await unharmed()


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("endpoint", [UPLOAD, RECEIVE], ids=["upload-pack", "receive-pack"])
@pytest.mark.parametrize(
    "framing", ["content-length-cut", "content-length-overstated", "chunked-cut", "chunked-unterminated"]
)
async def test_body_shorter_than_announced_then_close(
    endpoint: Tuple[str, str],
    framing: str,
    gitbase: Path,
    http_port: int,
    target: Target,
    unharmed: Unharmed,
):
    """The client sends less than its framing promised and hangs up: nothing may come of it.

    In the "overstated" and "unterminated" cases every byte of git's payload
    arrives (a complete pack), only the HTTP body is incomplete; git must
    still not act on a request that never arrived whole.
    """
    body = want_request(target.head) if endpoint is UPLOAD else target.push.body
    framings = {
        "content-length-cut": (b"Content-Length: %d\r\n" % len(body), body[:-10]),
        "content-length-overstated": (b"Content-Length: %d\r\n" % (len(body) + 10), body),
        "chunked-cut": (b"Transfer-Encoding: chunked\r\n", b"%x\r\n%s" % (len(body), body[:-10])),
        "chunked-unterminated": (b"Transfer-Encoding: chunked\r\n", b"%x\r\n%s\r\n" % (len(body), body)),
    }
    request = raw_post(endpoint, *framings[framing])
    reader, writer = await asyncio.open_connection("127.0.0.1", http_port)
    writer.write(request)
    await writer.drain()
    assert await wait_until(lambda: git_processes_under(gitbase), timeout=10), "git never started"
    writer.close()
    await writer.wait_closed()
    await unharmed()


#: What an oversized head is answered with (Tornado's default max_header_size).
TOO_BIG = "request line and headers exceed 65536 bytes"


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize(
    "request_bytes",
    [
        get("/proj.git/info/refs?service=git-upload-pack", b"X-Big: " + b"a" * 100_000),
        get("/proj.git/info/refs?service=git-upload-pack", *(b"X-H%d: v" % i for i in range(10_000))),
        get("/proj.git/info/refs?service=git-upload-pack&pad=" + "p" * 100_000),
    ],
    ids=["one-100k-header", "10k-headers", "100k-url"],
)
async def test_oversized_head_does_not_hurt_the_server(
    request_bytes: bytes, repo: Path, http_port: int, unharmed: Unharmed
):
    """A head past Tornado's max_header_size (64 KiB): a 431, no hang, nothing runs, serving goes on."""
    raw, ended = await exchange(http_port, request_bytes)
    assert ended != "hung"
    assert_plain_answer(raw, 431, TOO_BIG)
    await unharmed()


@pytest.mark.gen_test(timeout=30)
async def test_oversized_head_is_answered_with_431(repo: Path, http_port: int, base_url: str):
    """Also on a kept-alive connection, after a response: each request's head is watched anew."""
    first = b"GET /proj.git/HEAD HTTP/1.1\r\nHost: x\r\n\r\n"
    raw, ended = await exchange(http_port, first + get("/proj.git/HEAD", b"X-Big: " + b"a" * 100_000))
    assert raw, f"no answer at all, the connection was {ended}"
    assert parse_response(raw)[0] == 200, raw[:300]
    assert_plain_answer(raw[raw.index(b"HTTP/1.1 431 ") :], 431, TOO_BIG)


@pytest.mark.gen_test(timeout=30)
async def test_head_just_under_the_limit_is_served(repo: Path, http_port: int, base_url: str):
    raw, _ = await exchange(http_port, get("/proj.git/HEAD", b"X-Big: " + b"a" * 60_000))
    assert parse_response(raw)[0] == 200, raw[:300]


@pytest.mark.gen_test(timeout=60)
async def test_answers_over_tls(git, repo: Path, gitbase: Path, services, certificate, target: Target):
    """The real command over TLS (an SSLIOStream): the same answers, then it serves on."""
    cert, key = certificate
    server = services.gittornado(gitbase, "--certfile", str(cert), "--keyfile", str(key))
    tls = ssl.create_default_context(cafile=str(cert))
    cases = [
        (get("/proj.git/HEAD", b"X-Big: " + b"a" * 100_000), 431, TOO_BIG),
        (
            BROKEN_FRAMING["te-and-content-length"][0](target),
            400,
            "both Transfer-Encoding and Content-Length",
        ),
        (BROKEN_FRAMING["chunk-size-not-hex"][0](target), 400, "invalid chunk size"),
        (
            raw_post(RECEIVE, b"Transfer-Encoding: chunked\r\n", b"%x;%s\r\n" % (1000, b"e" * 100)),
            400,
            "chunk-size line too long",
        ),
    ]
    for request, status, words in cases:
        raw, ended = await exchange(server.port, request, tls=tls)
        assert ended != "hung"
        assert_plain_answer(raw, status, words)
    result = await git.run("-c", f"http.sslCAInfo={cert}", "ls-remote", f"{server.url}/proj.git")
    assert "refs/heads/main" in result.stdout


@stream_request_body
class EarlyAnswer(RequestHandler):
    """Starts its response before reading the body, as an embedder's handler may."""

    async def prepare(self) -> None:
        self.write("early\n")
        await self.flush()

    def data_received(self, chunk: bytes) -> None:
        pass

    def post(self) -> None:
        self.finish()


@pytest.mark.gen_test(timeout=30)
async def test_overlong_chunk_size_line_after_the_response_started_adds_nothing():
    """Once a response has started, a chunk-size line overrunning its limit only ends the connection
    (the client sees a failed transfer): no answer of ours is written into the response."""
    listener, port = bind_unused_port()
    server = HardenedHTTPServer(Application([("/early", EarlyAnswer)]))
    server.add_socket(listener)
    try:
        request = raw_post(
            ("/early", "text/plain"), b"Transfer-Encoding: chunked\r\n", b"4;" + b"e" * 100 + b"\r\n"
        )
        raw, ended = await exchange(port, request)
    finally:
        server.stop()
        await server.close_all_connections()
    assert ended != "hung"
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n") and raw.endswith(b"\r\n\r\n6\r\nearly\n\r\n"), raw
