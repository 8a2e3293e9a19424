"""Connections and descriptors: idle connections never starve a real client, and a server out of
descriptors pauses instead of spinning (gittornado/connections.py, gittornado/httpserver.py).

The attacker's connections come from 127.0.0.2 and the real client from 127.0.0.1 (the whole of
127.0.0.0/8 is this machine), so the per-address cap has two addresses to tell apart.
"""

from __future__ import annotations

import asyncio
import configparser
import os
import re
import socket
import ssl
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Iterator, List

import deploy_helpers
import pytest
from conftest import GitClient, parse_response, require_program
from tornado.testing import bind_unused_port

from gittornado.connections import ConnectionLimits
from gittornado.httpserver import HardenedHTTPServer

ATTACKER = "127.0.0.2"
#: The descriptor limit of the spawned servers: far below a machine's default.
LOW_LIMIT = 128


def spawn_limited(services: deploy_helpers.Services, nofile: object, *args: str) -> deploy_helpers.Service:
    """The real ``gittornado`` command with the descriptor limit ``nofile`` (``soft:hard``, or both); its
    ``port`` read from the startup line."""
    prlimit = require_program("prlimit", "util-linux")
    limit = nofile if isinstance(nofile, str) else f"{nofile}:{nofile}"
    argv = [prlimit, f"--nofile={limit}", "gittornado", "--port", "0", "--address", "127.0.0.1"]
    server = deploy_helpers.Service("gittornado", [*argv, *args], services._subdir("gittornado"))
    services.started.append(server)
    deadline = time.monotonic() + 20
    while not (match := re.search(r"http://127\.0\.0\.1:(\d+)/", server.read())):
        assert server.proc.poll() is None and time.monotonic() < deadline, server.read()
        time.sleep(0.05)
    server.port = int(match.group(1))  # type: ignore[attr-defined]
    return server


def cpu_seconds(pid: int) -> float:
    """User and system CPU time ``pid`` has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_idle(port: int, count: int, stack: ExitStack, source: str = ATTACKER) -> List[socket.socket]:
    """``count`` connections from ``source`` that send nothing (closed with ``stack``)."""
    connections = []
    for _ in range(count):
        sock = stack.enter_context(socket.socket())
        sock.settimeout(5)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        connections.append(sock)
    return connections


def answer_of(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """What the server sent on ``sock`` before closing it (b"" for a close or reset without an answer)."""
    sock.settimeout(timeout)
    received = b""
    try:
        while data := sock.recv(65536):
            received += data
    except (ConnectionResetError, socket.timeout):
        pass
    return received


def clone(git: GitClient, url: str, target: Path) -> subprocess.CompletedProcess:
    """A real ``git clone``, bounded in time."""
    return subprocess.run(
        ["git", "clone", "-q", url, str(target)], env=git.env, capture_output=True, text=True, timeout=30
    )


def emfile_lines(log: str) -> int:
    return sum("Too many open files" in line or "EMFILE" in line for line in log.splitlines())


def test_idle_connections_do_not_starve_a_clone(
    services: deploy_helpers.Services, git: GitClient, repo: Path, gitbase: Path, tmp_path: Path
):
    """150 idle connections against ``ulimit -n 128``: the caps, sized from that limit, keep descriptors
    for real clients; the connections over them get a 503; the server neither spins nor floods its log."""
    # 4 git processes: 16 descriptors kept for their pipes, the rest for connections (2 each).
    server = spawn_limited(services, LOW_LIMIT, "--gitbase", str(gitbase), "--max-git-processes", "4")
    assert "at most 32 connections, 8 per address" in server.read(), server.read()
    pid = server.proc.pid
    with ExitStack() as stack:
        idle = open_idle(server.port, 150, stack)
        before = cpu_seconds(pid)
        time.sleep(2)
        result = clone(git, f"http://127.0.0.1:{server.port}/proj.git", tmp_path / "clone")
        assert result.returncode == 0, (result.stderr, server.read()[-2000:])
        spent = cpu_seconds(pid) - before
        answers = [answer_of(sock, timeout=0.1) for sock in idle]
    assert spent < 1.5, f"the server used {spent:.1f}s of CPU while idle connections waited"
    assert server.proc.poll() is None
    log = server.read()
    assert emfile_lines(log) <= 2 and len(log) < 20_000, log[-3000:]
    refused = [a for a in answers if a]
    assert refused, "no connection over the cap was answered"
    status, headers, body = parse_response(refused[0])
    assert status == 503 and headers["server"] == "gittornado", refused[0]
    assert b"too many connections from your address (at most 8)" in body, body


def test_accepting_pauses_when_descriptors_run_out(
    services: deploy_helpers.Services, git: GitClient, repo: Path, gitbase: Path, tmp_path: Path
):
    """Caps set far beyond the descriptor limit: accept() fails with EMFILE. Accepting pauses (no busy
    loop, one log line), and once the idle connections go, a clone is served."""
    server = spawn_limited(
        services,
        64,
        "--gitbase",
        str(gitbase),
        "--max-connections",
        "1000",
        "--max-connections-per-address",
        "1000",
    )
    pid = server.proc.pid
    with ExitStack() as stack:
        open_idle(server.port, 100, stack)
        deadline = time.monotonic() + 10
        while not emfile_lines(server.read()) and time.monotonic() < deadline:
            time.sleep(0.1)
        before = cpu_seconds(pid)
        time.sleep(3)
        spent = cpu_seconds(pid) - before
    assert spent < 1.0, f"the server used {spent:.1f}s of CPU in 3s without descriptors"
    log = server.read()
    assert emfile_lines(log) == 1, log[-3000:]
    assert "accepting pauses" in log and "Traceback" not in log, log[-3000:]
    result = clone(git, f"http://127.0.0.1:{server.port}/proj.git", tmp_path / "clone")
    assert result.returncode == 0, (result.stderr, server.read()[-2000:])


@pytest.fixture
def limited_server(io_loop, app) -> Iterator[HardenedHTTPServer]:
    """The in-process server with small caps: 4 connections, 2 per address."""
    listener, port = bind_unused_port()
    server = HardenedHTTPServer(app, limits=ConnectionLimits(total=4, per_address=2))
    server.add_socket(listener)
    server.port = port  # type: ignore[attr-defined]
    yield server
    server.stop()
    io_loop.run_sync(server.close_all_connections, timeout=10)


async def request_from(source: str, port: int) -> bytes:
    """A GET of /healthz from ``source``, kept alive; what came back until the server closed or answered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    try:
        return await asyncio.wait_for(reader.read(), 5)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


@pytest.mark.gen_test(timeout=30)
async def test_caps_count_connections_until_they_close(limited_server: HardenedHTTPServer, repo: Path, git):
    port = limited_server.port  # type: ignore[attr-defined]
    with ExitStack() as stack:
        open_idle(port, 2, stack, "127.0.0.2")
        third = await request_from("127.0.0.2", port)
        status, headers, body = parse_response(third)
        assert status == 503 and b"from your address (at most 2)" in body, third
        assert headers["connection"] == "close" and headers["content-type"].startswith("text/plain"), headers
        open_idle(port, 2, stack, "127.0.0.3")
        fifth = await request_from("127.0.0.4", port)
        assert parse_response(fifth)[0] == 503 and b"too many connections (at most 4)" in fifth, fifth
        await asyncio.sleep(0.2)
        assert len(limited_server.served) == 4
    # Closed by the clients: they count no more, however many came and went.
    for _ in range(50):
        socket.create_connection(("127.0.0.1", port)).close()
    deadline = time.monotonic() + 5
    while limited_server.served and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not limited_server.served and not limited_server.per_address
    answers = await asyncio.gather(*(request_from("127.0.0.5", port) for _ in range(2)))
    assert all(parse_response(a)[0] == 200 for a in answers), answers
    result = await git.run("ls-remote", f"http://127.0.0.1:{port}/proj.git")
    assert "refs/heads/main" in result.stdout


@pytest.mark.gen_test(timeout=30)
async def test_over_the_cap_over_tls_is_answered_after_the_handshake(
    io_loop, app, certificate: tuple[Path, Path]
):
    cert, key = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key))
    listener, port = bind_unused_port()
    server = HardenedHTTPServer(app, ssl_options=context, limits=ConnectionLimits(total=1, per_address=None))
    server.add_socket(listener)
    tls = ssl.create_default_context(cafile=str(cert))
    try:
        first = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
        raw = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        first[1].close()
    finally:
        server.stop()
        await server.close_all_connections()
    status, headers, body = parse_response(raw)
    assert status == 503 and b"too many connections (at most 1)" in body, raw


def test_soft_descriptor_limit_is_raised_to_the_hard_one(services: deploy_helpers.Services, gitbase: Path):
    """Like systemd's default (soft 1024, hard 524288): the caps follow the hard limit."""
    server = spawn_limited(services, "128:256", "--gitbase", str(gitbase))
    # (256 - 32 kept - 16 for refusals - 4 x 16 git processes) / 2 per connection; from 128 it would be 8.
    assert "at most 72 connections, 8 per address" in server.read(), server.read()
    with open(f"/proc/{server.proc.pid}/limits") as f:
        assert re.search(r"Max open files\s+256\s+256", f.read())


def test_limits_are_sized_from_the_descriptor_limit():
    """Each connection may run git (4 descriptors more) unless git processes are capped."""
    assert ConnectionLimits.sized(1024) == ConnectionLimits(195, 19)
    assert ConnectionLimits.sized(1024, git_processes=10) == ConnectionLimits(468, 46)
    assert ConnectionLimits.sized(65536, by_address=False) == ConnectionLimits(13097, None)
    assert ConnectionLimits.sized(64) == ConnectionLimits(3, 3)
    assert ConnectionLimits.sized(10) == ConnectionLimits(1, 1)


def test_example_unit_sets_a_descriptor_limit():
    """examples/gittornado.service raises systemd's default limit (1024: 195 connections per worker)."""
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(deploy_helpers.EXAMPLES / "gittornado.service")
    limit = int(unit["Service"]["LimitNOFILE"])
    assert ConnectionLimits.sized(limit, by_address=False).total > 10_000
