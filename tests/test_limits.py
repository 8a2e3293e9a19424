"""Limits and visibility: idle and header timeouts, the git process cap, fsck on
push, failing hooks, the access log and metrics."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import pytest
from conftest import (
    GitClient,
    git_processes_under,
    parse_response,
    push_noise,
    raw_http,
    upload_pack_post,
    wait_until,
)
from tornado.httpclient import AsyncHTTPClient
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port

from gittornado import AuthenticationFailed, GitBackend, OpenPolicy, RepositoryRoot
from gittornado.observe import Metrics
from gittornado.pipe import GitProcesses
from gittornado.server import make_application

UPLOAD_HEADERS = (
    b"POST /proj.git/git-upload-pack HTTP/1.1\r\nHost: x\r\n"
    b"Content-Type: application/x-git-upload-pack-request\r\nContent-Length: 1000\r\n\r\n"
)


@asynccontextmanager
async def serving(backend: GitBackend, **server_options) -> AsyncIterator[int]:
    """An in-process server for ``backend`` on a free port, for the length of the block."""
    sock, port = bind_unused_port()
    server = HTTPServer(make_application(backend), **server_options)
    server.add_sockets([sock])
    try:
        yield port
    finally:
        server.stop()
        await server.close_all_connections()


def open_backend(gitbase: Path, **options) -> GitBackend:
    return GitBackend(lookup=RepositoryRoot(str(gitbase)), policy=OpenPolicy(), **options)


@pytest.mark.gen_test(timeout=60)
async def test_stalled_body_is_cut_by_the_idle_timeout(repo: Path, gitbase: Path):
    async with serving(open_backend(gitbase, idle_timeout=1.0)) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(UPLOAD_HEADERS + b"0032want ")  # ... and then nothing more
        await writer.drain()
        assert await wait_until(lambda: git_processes_under(gitbase), timeout=5)
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 10) == b""  # the server hung up
        assert time.monotonic() - started < 5
        assert await wait_until(lambda: not git_processes_under(gitbase), timeout=5)
        writer.close()


@pytest.mark.gen_test(timeout=60)
async def test_slow_headers_are_cut_by_the_header_timeout(repo: Path, gitbase: Path):
    async with serving(open_backend(gitbase), idle_connection_timeout=1.0) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /proj.git/HEAD HTTP/1.1\r\nHost: x\r\n")  # headers never end
        await writer.drain()
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 10) == b""
        assert time.monotonic() - started < 5
        writer.close()


@pytest.mark.gen_test(timeout=60)
async def test_git_process_cap_queues_then_refuses_with_503(
    git: GitClient, repo: Path, gitbase: Path, tmp_path: Path
):
    processes = GitProcesses(limit=1, queue_timeout=0.5)
    async with serving(open_backend(gitbase, processes=processes)) as port:
        # One request holds the only slot: its git waits for the rest of a body that is not coming yet.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(UPLOAD_HEADERS + b"0032want ")
        await writer.drain()
        assert await wait_until(lambda: len(processes.running) == 1, timeout=5)
        refused = await raw_http(
            port,
            b"GET /proj.git/info/refs?service=git-upload-pack HTTP/1.1\r\n"
            b"Host: x\r\nConnection: close\r\n\r\n",
        )
        status, headers, body = parse_response(refused)
        assert status == 503 and headers["retry-after"] == "1" and b"Too many git processes" in body
        # A request that arrives while the slot frees up waits for it instead of failing.
        queued = asyncio.ensure_future(
            AsyncHTTPClient().fetch(f"http://127.0.0.1:{port}/proj.git/info/refs?service=git-upload-pack")
        )
        await asyncio.sleep(0.1)
        writer.close()
        assert (await queued).code == 200
        assert len(git_processes_under(gitbase)) <= 1
        await git.run("clone", f"http://127.0.0.1:{port}/proj.git", str(tmp_path / "c"))


@pytest.mark.gen_test(timeout=60)
async def test_malformed_objects_are_refused_and_not_written(
    git: GitClient, repo: Path, base_url: str, tmp_path: Path
):
    work = tmp_path / "w"
    await git.run("clone", f"{base_url}/proj.git", str(work))
    tree = git.sync("rev-parse", "HEAD^{tree}", cwd=work).strip()
    # A commit whose author line git's fsck rejects (no email), written with --literally.
    bad = (
        f"tree {tree}\nauthor Nobody 1700000000 +0000\ncommitter C <c@example.com> 1700000000 +0000\n\nbad\n"
    )
    oid = git.sync("hash-object", "-t", "commit", "-w", "--literally", "--stdin", cwd=work, input=bad).strip()
    push = await git.run("push", "origin", f"{oid}:refs/heads/bad", cwd=work, check=False)
    assert push.returncode != 0
    assert "missingEmail" in push.stderr or "fsck" in push.stderr
    assert "refs/heads/bad" not in git.sync("for-each-ref", cwd=repo)
    exists = await git.run("cat-file", "-e", oid, cwd=repo, check=False)
    assert exists.returncode != 0, "nothing of a refused push is written"
    # A repository's own config may turn the check off.
    git.sync("config", "receive.fsckObjects", "false", cwd=repo)
    await git.run("push", "origin", f"{oid}:refs/heads/bad", cwd=work)
    assert "refs/heads/bad" in git.sync("for-each-ref", cwd=repo)


@pytest.mark.gen_test(timeout=60)
async def test_failing_hook_gives_the_client_git_s_reason(
    git: GitClient, repo: Path, base_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    hook = repo / "hooks" / "pre-receive"
    hook.write_text("#!/bin/sh\necho 'pushes are frozen for the release' >&2\nexit 1\n")
    hook.chmod(0o755)
    work = tmp_path / "w"
    await git.run("clone", f"{base_url}/proj.git", str(work))
    git.sync("commit", "-q", "--allow-empty", "-m", "x", cwd=work)
    before = git.sync("rev-parse", "refs/heads/main", cwd=repo)
    push = await git.run("push", "origin", "main", cwd=work, check=False)
    assert push.returncode != 0
    assert "remote: pushes are frozen for the release" in push.stderr
    assert "pre-receive hook declined" in push.stderr
    assert git.sync("rev-parse", "refs/heads/main", cwd=repo) == before


VALUE = r'(?:"(?:[^"\\]|\\.)*"|[^\s"]+)'  # plain, or a JSON string
LINE = re.compile(
    rf"time=\S+Z client=(?P<client>\S+) user=(?P<user>{VALUE}) auth=\S+ repo=(?P<repo>{VALUE}) "
    r"service=(?P<service>\S+) "
    r"method=(?P<method>[A-Z]+) status=(?P<status>\d+) in=(?P<bytes_in>\d+) out=(?P<bytes_out>\d+) "
    r"duration_ms=[\d.]+ git_exit=(?P<git_exit>\S+)"
)


@pytest.mark.gen_test(timeout=60)
async def test_access_log_has_one_parseable_line_per_request(
    git: GitClient,
    repo: Path,
    gitbase: Path,
    base_url: str,
    http_port: int,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
):
    caplog.set_level(logging.INFO, logger="gittornado.access")
    await git.run("-c", "protocol.version=0", "clone", f"{base_url}/proj.git", str(tmp_path / "c"))
    await raw_http(
        http_port, b"GET /%22odd%20name%22%0A/HEAD HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    lines = [r.getMessage() for r in caplog.records if r.name == "gittornado.access"]
    parsed = [LINE.fullmatch(line) for line in lines]
    assert all(parsed), lines
    refs, upload = parsed[0].groupdict(), parsed[1].groupdict()
    assert (
        refs["service"] == "info/refs:git-upload-pack" and refs["status"] == "200" and refs["git_exit"] == "0"
    )
    assert refs["repo"] == "proj.git" and refs["user"] == "-" and refs["client"] == "127.0.0.1"
    assert upload["service"] == "git-upload-pack" and upload["method"] == "POST"
    assert int(upload["bytes_in"]) > 0 and int(upload["bytes_out"]) > 100
    odd = parsed[2].groupdict()
    assert odd["repo"] == '"\\"odd name\\"\\n"' and odd["status"] == "404"  # quoted, still one line
    assert len(lines) == 3  # advertisement, upload-pack, the odd request: nothing twice

    # A client that leaves mid-clone is logged once, as 499.
    head = push_noise(git, repo, 8)
    caplog.clear()
    request = b"0032want %s\n00000009done\n" % head.encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", http_port)
    writer.write(upload_pack_post("proj.git", request, close=False))
    await reader.readexactly(1000)
    writer.close()
    assert await wait_until(lambda: any("status=499" in r.getMessage() for r in caplog.records))
    await asyncio.sleep(0.5)
    assert [r.getMessage() for r in caplog.records if r.name == "gittornado.access"][0].count(
        "status=499"
    ) == 1
    assert len([r for r in caplog.records if r.name == "gittornado.access"]) == 1


class RejectingCredentials(OpenPolicy):
    """Anonymous may do anything; any credentials sent are wrong."""

    realm = "test"

    def authenticate(self, request):
        if "Authorization" in request.headers:
            raise AuthenticationFailed("wrong password")
        return None


@pytest.mark.gen_test(timeout=60)
async def test_metrics_count_requests_bytes_and_auth_failures(
    git: GitClient, repo: Path, gitbase: Path, tmp_path: Path
):
    processes = GitProcesses()
    backend = GitBackend(
        lookup=RepositoryRoot(str(gitbase)),
        policy=RejectingCredentials(),
        processes=processes,
        metrics=Metrics(processes),
    )
    async with serving(backend) as port:
        await git.run(
            "-c", "protocol.version=2", "clone", f"http://127.0.0.1:{port}/proj.git", str(tmp_path / "c")
        )
        refused = await AsyncHTTPClient().fetch(
            f"http://127.0.0.1:{port}/proj.git/info/refs?service=git-upload-pack",
            auth_username="u",
            auth_password="wrong",
            raise_error=False,
        )
        assert refused.code == 401
        metrics = (await AsyncHTTPClient().fetch(f"http://127.0.0.1:{port}/metrics")).body.decode()
    # protocol v2: one advertisement, then ls-refs and fetch as two POSTs
    assert 'gittornado_requests_total{service="info/refs:git-upload-pack",status="200"} 1.0' in metrics
    assert 'gittornado_requests_total{service="git-upload-pack",status="200"} 2.0' in metrics
    assert re.search(r'gittornado_sent_bytes_total\{service="git-upload-pack"\} [1-9]', metrics)
    assert re.search(r'gittornado_received_bytes_total\{service="git-upload-pack"\} [1-9]', metrics)
    assert 'gittornado_request_duration_seconds_count{service="git-upload-pack"} 2.0' in metrics
    assert "gittornado_auth_failures_total 1.0" in metrics
    assert "gittornado_git_processes 0.0" in metrics
    assert "proj" not in metrics  # no repository names


@pytest.mark.gen_test(timeout=60)
async def test_cli_metrics_flag_and_healthz(spawn_server, gitbase: Path):
    client = AsyncHTTPClient()
    server = spawn_server("--gitbase", str(gitbase), "--metrics")
    assert (await client.fetch(f"{server.url}/healthz")).body == b"ok\n"
    assert b"gittornado_requests_total" in (await client.fetch(f"{server.url}/metrics")).body
    plain = spawn_server("--gitbase", str(gitbase))
    assert (await client.fetch(f"{plain.url}/healthz")).code == 200
    assert (await client.fetch(f"{plain.url}/metrics", raise_error=False)).code == 404


@pytest.mark.gen_test(timeout=60)
async def test_finished_exchanges_leave_nothing_alive(repo: Path, gitbase: Path):
    """Timers and callbacks of a finished transfer must not keep its pipe (and buffers) alive."""
    import gc

    from gittornado.pipe import GitProcessPipe

    def live_pipes() -> set:
        gc.collect()
        return {id(o) for o in gc.get_objects() if isinstance(o, GitProcessPipe)}

    earlier = live_pipes()  # other tests' pipes may linger (an aborted push's grace timer)
    async with serving(open_backend(gitbase, idle_timeout=300)) as port:
        client = AsyncHTTPClient()
        url = f"http://127.0.0.1:{port}/proj.git/info/refs?service=git-upload-pack"
        for _ in range(30):
            assert (await client.fetch(url)).code == 200
        assert await wait_until(lambda: not live_pipes() - earlier, timeout=5), "finished pipes still alive"
