"""Streaming both ways: encodings, framing, failures, aborted clients, flat memory."""

from __future__ import annotations

import asyncio
import gzip
import os
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
from conftest import (
    GitClient,
    git_processes_under,
    make_repo,
    parse_response,
    push_noise,
    raw_http,
    upload_pack_post,
    wait_until,
)


def pkt(text: str) -> bytes:
    return b"%04x" % (len(text) + 4) + text.encode()


def want_request(oid: str) -> bytes:
    """A protocol v0 upload-pack request for everything reachable from ``oid``."""
    return pkt(f"want {oid} ofs-delta\n") + b"0000" + pkt("done\n")


def head_of(git: GitClient, repo: Path) -> str:
    return git.sync("rev-parse", "refs/heads/main", cwd=repo).strip()


def add_local_commits(git: GitClient, work: Path, count: int) -> None:
    """``count`` commits on main that the server lacks, in one fast-import run."""
    stream = "".join(
        f"commit refs/heads/main\ncommitter L <l@example.com> {1_800_000_000 + i} +0000\ndata 4\nl{i:03d}\n"
        + ("from refs/heads/main^0\n" if i == 0 else "")
        + "\n"
        for i in range(count)
    )
    git.sync("fast-import", "--quiet", cwd=work, input=stream)


def dechunk(raw: bytes) -> tuple[bytes, bool]:
    """Decode a chunked body; also say whether the terminating zero chunk arrived."""
    body, rest = b"", raw
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return body, True
        body, rest = body + rest[:size], rest[size + 2 :]
    return body, False


@pytest.mark.gen_test(timeout=60)
async def test_fetch_with_many_haves_sends_gzip(git: GitClient, repo: Path, base_url: str, tmp_path: Path):
    work = tmp_path / "w"
    await git.run("clone", f"{base_url}/proj.git", str(work))
    # Many local commits the server lacks: each becomes a "have" line, so the
    # negotiation request grows past the size where git gzips it.
    add_local_commits(git, work, 200)
    other = tmp_path / "other"
    git.sync("clone", "-q", str(repo), str(other))
    git.sync("commit", "-q", "--allow-empty", "-m", "server side", cwd=other)
    git.sync("push", "-q", "origin", "HEAD:refs/heads/main", cwd=other)
    result = await git.run(
        "-c",
        "protocol.version=0",
        "fetch",
        "origin",
        cwd=work,
        env={"GIT_TRACE_CURL": "1", "GIT_TRACE_CURL_NO_DATA": "1"},
    )
    assert "Content-Encoding: gzip" in result.stderr
    assert git.sync("rev-parse", "origin/main", cwd=work).strip() == head_of(git, repo)


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("encoding", ["gzip", "x-gzip"])
async def test_gzip_request_body_is_decoded(
    http_client, git: GitClient, repo: Path, base_url: str, encoding: str
):
    response = await http_client.fetch(
        f"{base_url}/proj.git/git-upload-pack",
        method="POST",
        body=gzip.compress(want_request(head_of(git, repo))),
        headers={"Content-Type": "application/x-git-upload-pack-request", "Content-Encoding": encoding},
    )
    assert response.body.startswith(b"0008NAK\n")
    assert b"PACK" in response.body


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize(
    "body",
    [b"this is not gzip at all", gzip.compress(b"0032want " + b"a" * 40 + b"\n")[:-12]],
    ids=["not-gzip", "truncated"],
)
async def test_broken_gzip_is_400_and_leaves_nothing(
    http_client, repo: Path, gitbase: Path, base_url: str, body: bytes
):
    response = await http_client.fetch(
        f"{base_url}/proj.git/git-upload-pack",
        method="POST",
        body=body,
        raise_error=False,
        headers={"Content-Type": "application/x-git-upload-pack-request", "Content-Encoding": "gzip"},
    )
    assert response.code == 400
    assert b"gzip" in response.body
    assert await wait_until(lambda: not git_processes_under(gitbase))
    again = await http_client.fetch(f"{base_url}/proj.git/info/refs?service=git-upload-pack")
    assert again.code == 200


@pytest.mark.gen_test(timeout=60)
async def test_chunked_push_with_small_post_buffer(git: GitClient, repo: Path, base_url: str, tmp_path: Path):
    work = tmp_path / "w"
    await git.run("clone", f"{base_url}/proj.git", str(work))
    (work / "blob.bin").write_bytes(os.urandom(300_000))
    git.sync("add", ".", cwd=work)
    git.sync("commit", "-q", "-m", "big", cwd=work)
    result = await git.run(
        "-c",
        "http.postBuffer=1024",
        "push",
        "origin",
        "main",
        cwd=work,
        env={"GIT_TRACE_CURL": "1", "GIT_TRACE_CURL_NO_DATA": "1"},
    )
    assert "Transfer-Encoding: chunked" in result.stderr
    assert head_of(git, repo) == git.sync("rev-parse", "HEAD", cwd=work).strip()
    assert git.sync("fsck", cwd=repo) == ""


@pytest.mark.gen_test(timeout=60)
async def test_http_1_0_client_gets_close_delimited_bodies(
    git: GitClient, repo: Path, http_port: int, base_url: str
):
    raw = await raw_http(http_port, b"GET /proj.git/info/refs?service=git-upload-pack HTTP/1.0\r\n\r\n")
    status, headers, body = parse_response(raw)
    assert status == 200 and "transfer-encoding" not in headers
    assert body.startswith(b"001e# service=git-upload-pack\n0000") and body.endswith(b"0000")

    request = want_request(head_of(git, repo))
    raw = await raw_http(
        http_port,
        b"POST /proj.git/git-upload-pack HTTP/1.0\r\nConnection: keep-alive\r\n"
        b"Content-Type: application/x-git-upload-pack-request\r\n"
        b"Content-Length: %d\r\n\r\n" % len(request) + request,
    )
    status, headers, body = parse_response(raw)
    assert status == 200 and "transfer-encoding" not in headers
    # No side-band was asked for, so the raw pack runs to the end of the body.
    assert body.startswith(b"0008NAK\nPACK") and len(body) > 100


@pytest.mark.gen_test(timeout=60)
async def test_expect_100_continue(git: GitClient, repo: Path, http_port: int, base_url: str):
    request = want_request(head_of(git, repo))
    reader, writer = await asyncio.open_connection("127.0.0.1", http_port)
    writer.write(
        b"POST /proj.git/git-upload-pack HTTP/1.1\r\nHost: x\r\nConnection: close\r\nExpect: 100-continue\r\n"
        b"Content-Type: application/x-git-upload-pack-request\r\nContent-Length: %d\r\n\r\n" % len(request)
    )
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100")
    writer.write(request)
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    status, _, body = parse_response(raw)
    assert status == 200 and b"PACK" in dechunk(body)[0]


@pytest.mark.gen_test(timeout=60)
async def test_git_refusing_the_request_before_output_is_a_short_400(
    http_client, repo: Path, gitbase: Path, base_url: str
):
    response = await http_client.fetch(
        f"{base_url}/proj.git/git-upload-pack",
        method="POST",
        body=b"garbage that is no pkt-line",
        raise_error=False,
        headers={"Content-Type": "application/x-git-upload-pack-request"},
    )
    assert response.code == 400, "a client's garbage is no server error"
    assert response.headers["Content-Type"].startswith("text/plain")
    assert b"Traceback" not in response.body and len(response.body) < 200
    assert await wait_until(lambda: not git_processes_under(gitbase))
    again = await http_client.fetch(f"{base_url}/proj.git/info/refs?service=git-upload-pack")
    assert again.code == 200


@pytest.mark.gen_test(timeout=60)
async def test_git_failing_mid_stream_ends_the_response_for_git_to_judge(
    git: GitClient, gitbase: Path, http_port: int, base_url: str, tmp_path: Path
):
    repo = make_repo(git, gitbase, "broken.git", commits=3)
    # A blob goes missing: upload-pack starts answering, then pack-objects dies.
    blob = git.sync("rev-parse", "main:file2.txt", cwd=repo).strip()
    (repo / "objects" / blob[:2] / blob[2:]).unlink()
    request = pkt(f"want {head_of(git, repo)} ofs-delta\n") + b"0000" + pkt("done\n")
    raw = await raw_http(http_port, upload_pack_post("broken.git", request))
    status, headers, body = parse_response(raw)
    assert status == 200 and headers["transfer-encoding"] == "chunked"
    _, complete = dechunk(body)
    # git's protocol is self-delimiting, so the client judges the answer, and says what git said.
    assert complete
    clone = await git.run("clone", f"{base_url}/broken.git", str(tmp_path / "c"), check=False)
    assert clone.returncode != 0
    assert "RPC failed" not in clone.stderr and "curl" not in clone.stderr


@pytest.mark.gen_test(timeout=60)
async def test_unknown_content_type_and_service(http_client, repo: Path, base_url: str):
    wrong_type = await http_client.fetch(
        f"{base_url}/proj.git/git-upload-pack",
        method="POST",
        body=b"0000",
        raise_error=False,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert wrong_type.code == 415
    unknown = await http_client.fetch(f"{base_url}/proj.git/info/refs?service=git-shell", raise_error=False)
    assert unknown.code == 400
    not_allowed = await http_client.fetch(f"{base_url}/proj.git/git-upload-pack", raise_error=False)
    assert not_allowed.code == 405 and not_allowed.headers["Allow"] == "POST"
    bad_protocol = await http_client.fetch(
        f"{base_url}/proj.git/info/refs?service=git-upload-pack",
        raise_error=False,
        headers={"Git-Protocol": "version=2:" + "x" * 300},
    )
    assert bad_protocol.code == 400


@pytest.mark.gen_test(timeout=60)
async def test_client_vanishing_mid_clone_leaves_no_git_process(
    git: GitClient, gitbase: Path, http_port: int, base_url: str, tmp_path: Path
):
    repo = make_repo(git, gitbase, "large.git", commits=1)
    request = want_request(push_noise(git, repo, 32))
    fds_before = len(os.listdir("/proc/self/fd"))
    # A client that reads a little of the pack and hangs up: git is blocked on
    # a full pipe (backpressure), and must be ended and reaped.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", http_port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(upload_pack_post("large.git", request, close=False))
    await asyncio.wait_for(reader.readexactly(4096), 10)
    assert git_processes_under(gitbase)
    writer.close()
    await writer.wait_closed()
    assert await wait_until(lambda: not git_processes_under(gitbase), timeout=10)
    assert await wait_until(lambda: len(os.listdir("/proc/self/fd")) <= fds_before, timeout=5)

    # The same with the real git client killed mid-clone.
    proc = await asyncio.create_subprocess_exec(
        "git",
        "clone",
        f"{base_url}/large.git",
        str(tmp_path / "killed"),
        env=git.env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert await wait_until(lambda: any(git_processes_under(gitbase)), timeout=10)
    proc.kill()
    await proc.wait()
    assert await wait_until(lambda: not git_processes_under(gitbase), timeout=10)
    assert git.sync("fsck", cwd=repo) == ""


@pytest.mark.gen_test(timeout=60)
async def test_aborted_push_changes_nothing(
    git: GitClient, repo: Path, gitbase: Path, http_port: int, base_url: str, tmp_path: Path
):
    work = tmp_path / "w"
    await git.run("clone", f"{base_url}/proj.git", str(work))
    (work / "blob.bin").write_bytes(os.urandom(2_000_000))
    git.sync("add", ".", cwd=work)
    git.sync("commit", "-q", "-m", "never lands", cwd=work)
    pack = (
        await asyncio.create_subprocess_exec(
            "git",
            "pack-objects",
            "--stdout",
            "--revs",
            cwd=work,
            env=git.env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
    ).communicate(f"{git.sync('rev-parse', 'HEAD', cwd=work).strip()}\n^{head_of(git, repo)}\n".encode())
    pack_bytes, _ = await pack
    old, new = head_of(git, repo), git.sync("rev-parse", "HEAD", cwd=work).strip()
    body = pkt(f"{old} {new} refs/heads/main\0report-status\n") + b"0000" + pack_bytes
    refs_before = git.sync("for-each-ref", cwd=repo)
    reader, writer = await asyncio.open_connection("127.0.0.1", http_port)
    writer.write(
        b"POST /proj.git/git-receive-pack HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/x-git-receive-pack-request\r\nContent-Length: %d\r\n\r\n"
        % len(body)
        + body[: len(body) // 2]
    )
    await writer.drain()
    assert await wait_until(lambda: any(git_processes_under(gitbase)), timeout=10)
    writer.close()
    assert await wait_until(lambda: not git_processes_under(gitbase), timeout=10)
    assert git.sync("for-each-ref", cwd=repo) == refs_before
    assert git.sync("fsck", cwd=repo) == ""
    leftovers = [
        p.name for p in (repo / "objects").iterdir() if p.name.startswith(("incoming-", "tmp_objdir"))
    ]
    leftovers += [p.name for p in (repo / "objects" / "pack").glob("tmp_*")]
    assert leftovers == []


class PeakRSS:
    """Samples this process's resident memory from a thread (the io_loop stays free)."""

    def __init__(self) -> None:
        self.peak = self.current()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def current() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            time.sleep(0.01)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="session")
def big_blob(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """200 MiB of incompressible bytes, made once per test session."""
    path = tmp_path_factory.mktemp("big") / "big.bin"
    with open(path, "wb") as f:
        for _ in range(200):
            f.write(os.urandom(1024 * 1024))
    yield path


@pytest.mark.gen_test(timeout=300)
async def test_200mb_clone_and_push_keep_server_memory_flat(
    git: GitClient, gitbase: Path, base_url: str, tmp_path: Path, big_blob: Path
):
    source = make_repo(git, gitbase, "source.git", commits=1)
    work = tmp_path / "big-work"
    git.sync("clone", "-q", str(source), str(work))
    os.link(big_blob, work / "big.bin")
    git.sync("add", "big.bin", cwd=work)
    git.sync("commit", "-q", "-m", "200 MiB", cwd=work)
    git.sync("push", "-q", "origin", "HEAD:main", cwd=work)
    git.sync("init", "-q", "--bare", str(gitbase / "target.git"))

    baseline = PeakRSS.current()
    with PeakRSS() as clone_rss:
        await git.run("clone", "-q", f"{base_url}/source.git", str(tmp_path / "clone"))
    assert (tmp_path / "clone" / "big.bin").stat().st_size == 200 * 1024 * 1024
    with PeakRSS() as push_rss:
        await git.run("push", "-q", f"{base_url}/target.git", "main", cwd=tmp_path / "clone")
    assert git.sync("rev-parse", "main", cwd=gitbase / "target.git") == git.sync(
        "rev-parse", "main", cwd=work
    )
    mib = 1024 * 1024
    # 200 MiB went through each way; the server's footprint grew by a few buffers at most.
    assert (clone_rss.peak - baseline) < 20 * mib, (
        f"clone grew RSS by {(clone_rss.peak - baseline) / mib:.1f} MiB"
    )
    assert (push_rss.peak - baseline) < 20 * mib, (
        f"push grew RSS by {(push_rss.peak - baseline) / mib:.1f} MiB"
    )


@pytest.mark.gen_test(timeout=60)
async def test_gzip_bodies_work_when_the_server_decompresses_itself(
    app, git: GitClient, repo: Path, tmp_path: Path
):
    from tornado.httpclient import AsyncHTTPClient
    from tornado.httpserver import HTTPServer
    from tornado.testing import bind_unused_port

    sock, port = bind_unused_port()
    server = HTTPServer(app, decompress_request=True)
    server.add_sockets([sock])
    try:
        response = await AsyncHTTPClient().fetch(
            f"http://127.0.0.1:{port}/proj.git/git-upload-pack",
            method="POST",
            body=gzip.compress(want_request(head_of(git, repo))),
            headers={"Content-Type": "application/x-git-upload-pack-request", "Content-Encoding": "gzip"},
        )
        assert response.body.startswith(b"0008NAK\nPACK")
        # A real fetch that gzips its negotiation, through the decompressing server.
        work = tmp_path / "w"
        await git.run("clone", f"http://127.0.0.1:{port}/proj.git", str(work))
        add_local_commits(git, work, 200)
        other = tmp_path / "other"
        git.sync("clone", "-q", str(repo), str(other))
        git.sync("commit", "-q", "--allow-empty", "-m", "server side", cwd=other)
        git.sync("push", "-q", "origin", "HEAD:refs/heads/main", cwd=other)
        trace = {"GIT_TRACE_CURL": "1", "GIT_TRACE_CURL_NO_DATA": "1"}
        result = await git.run("-c", "protocol.version=0", "fetch", "origin", cwd=work, env=trace)
        assert "Content-Encoding: gzip" in result.stderr
        assert git.sync("rev-parse", "origin/main", cwd=work).strip() == head_of(git, repo)
    finally:
        server.stop()


def chunk_sizes(raw: bytes) -> list[int]:
    """The sizes of a chunked body's chunks, the terminating zero included."""
    sizes, rest = [], raw
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        sizes.append(int(size_line, 16))
        rest = rest[sizes[-1] + 2 :]
    return sizes


@pytest.mark.gen_test(timeout=60)
async def test_git_answers_pass_a_compressing_application_unchanged(
    backend, git: GitClient, repo: Path, tmp_path: Path
):
    """git's output is framed by the relay, past the handler: an app's gzip transform must not touch it."""
    from tornado.httpserver import HTTPServer
    from tornado.testing import bind_unused_port
    from tornado.web import Application

    from gittornado import routes_for

    head = push_noise(git, repo, 2)
    sock, port = bind_unused_port()
    server = HTTPServer(Application(routes_for(backend, ""), compress_response=True))
    server.add_sockets([sock])
    try:
        request = upload_pack_post("proj.git", want_request(head))
        raw = await raw_http(port, request.replace(b"Host: x\r\n", b"Host: x\r\nAccept-Encoding: gzip\r\n"))
        status, headers, body = parse_response(raw)
        assert status == 200 and "content-encoding" not in headers
        sizes = chunk_sizes(body)
        # Large, bounded chunks (a 2 MiB pack in a few of them), and the terminating one.
        assert sizes[-1] == 0 and max(sizes) <= 256 * 1024 and len(sizes) < 60, sizes
        payload, complete = dechunk(body)
        assert complete and payload.startswith(b"0008NAK\nPACK") and len(payload) > 2 * 1024 * 1024

        dumb = b"GET /proj.git/info/refs HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n"
        raw = await raw_http(port, dumb + b"Connection: close\r\n\r\n")
        status, headers, body = parse_response(raw)
        assert status == 200 and "content-encoding" not in headers
        assert f"{head}\trefs/heads/main".encode() in dechunk(body)[0]

        await git.run("clone", "-q", f"http://127.0.0.1:{port}/proj.git", str(tmp_path / "clone"))
        assert git.sync("rev-parse", "HEAD", cwd=tmp_path / "clone").strip() == head
    finally:
        server.stop()


@pytest.mark.gen_test(timeout=30)
async def test_a_claimed_body_leaves_tornado_only_what_it_did_not_read():
    """Pins Tornado behaviour 9 of gittornado.httpserver, which LFS uploads rely on.

    Tornado must read the body only after prepare, taking its length (and Expect) from the headers then:
    otherwise it would wait for bytes prepare already took, or read a pipelined request as body.
    """
    from tornado.netutil import bind_sockets
    from tornado.web import Application, RequestHandler, stream_request_body

    from gittornado.httpserver import ClaimedBody, HardenedHTTPServer

    @stream_request_body
    class Claims(RequestHandler):
        async def prepare(self) -> None:
            self.claimed, self.rest = b"", b""
            body = ClaimedBody.claim(self.request)
            if body is None:  # the GET
                return
            buffer = memoryview(bytearray(int(self.get_query_argument("take"))))
            filled = 0
            while filled < len(buffer) and body.remaining:
                filled += await body.read_into(buffer[filled:])
            self.claimed = bytes(buffer[:filled])

        def data_received(self, chunk: bytes) -> None:
            self.rest += chunk

        def put(self) -> None:
            self.finish(b"%d+%d:" % (len(self.claimed), len(self.rest)) + self.claimed + self.rest)

        def get(self) -> None:
            self.finish(b"next")

    server = HardenedHTTPServer(Application([("/", Claims)]))
    sockets = bind_sockets(0, "127.0.0.1")
    server.add_sockets(sockets)
    port = sockets[0].getsockname()[1]
    body = os.urandom(300_000)

    def put(take: int, *headers: bytes) -> bytes:
        return b"PUT /?take=%d HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%s\r\n" % (
            take,
            len(body),
            b"".join(header + b"\r\n" for header in headers),
        )

    last = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    try:
        # All of it claimed, part of it, none: Tornado reads exactly the rest, and then the next request.
        for take in (len(body), 1000, 0):
            raw = await raw_http(port, put(take) + body + last)
            first, _, second = raw.partition(b"HTTP/1.1 200")[2].partition(b"HTTP/1.1 200")
            assert first.endswith(b"%d+%d:" % (take, len(body) - take) + body), take
            assert second.endswith(b"\r\n\r\nnext")

        # A client waiting for 100 Continue gets it once, before the body it then sends.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(put(len(body), b"Expect: 100-continue", b"Connection: close"))
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 (Continue)\r\n\r\n"
        writer.write(body)
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200") and b"100 (Continue)" not in answer
        assert answer.endswith(b"%d+0:" % len(body) + body)
    finally:
        server.stop()


@pytest.mark.gen_test(timeout=30)
async def test_a_streaming_handler_lifts_the_body_timeout_in_prepare():
    """Pins the body-timeout half of Tornado behaviour 9 of gittornado.httpserver: HardenedHTTPServer cuts a
    body that takes longer than its idle timeout; a push (which may take hours) lifts that in prepare."""
    from tornado.netutil import bind_sockets
    from tornado.web import Application, RequestHandler, stream_request_body

    from gittornado.httpserver import HardenedHTTPServer

    @stream_request_body
    class Slow(RequestHandler):
        def prepare(self) -> None:
            self.received = 0
            if self.get_query_argument("lift", ""):
                self.request.connection.set_body_timeout(None)

        def data_received(self, chunk: bytes) -> None:
            self.received += len(chunk)

        def put(self) -> None:
            self.finish(str(self.received))

    server = HardenedHTTPServer(Application([("/", Slow)]), idle_connection_timeout=0.5)
    sockets = bind_sockets(0, "127.0.0.1")
    server.add_sockets(sockets)

    async def slow_put(query: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", sockets[0].getsockname()[1])
        head = b"PUT /%s HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 10\r\n\r\n" % query
        writer.write(head + b"hello")
        await asyncio.sleep(1.5)  # three times the body timeout
        try:
            writer.write(b"world")
            return await asyncio.wait_for(reader.read(), 5)
        except ConnectionError:
            return b""
        finally:
            writer.close()

    try:
        assert (await slow_put(b"?lift=1")).endswith(b"\r\n\r\n10")
        assert await slow_put(b"") == b""  # cut, without an answer: no handler has seen the request yet
    finally:
        server.stop()
