"""The ``gittornado`` command as people run it, and the embedding example."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

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
from tornado.httpclient import AsyncHTTPClient

ROOT = Path(__file__).resolve().parent.parent


def test_help_lists_every_option():
    result = subprocess.run(["gittornado", "--help"], capture_output=True, text=True, check=True)
    for option in (
        "--port",
        "--address",
        "--gitbase",
        "--accessfile",
        "--realm",
        "--max-body-size",
        "--max-connections",
        "--max-connections-per-address",
        "--log-level",
    ):
        assert option in result.stdout
    assert "nobody may push" in result.stdout
    assert "not with --xheaders" in " ".join(result.stdout.split())


@pytest.mark.parametrize(
    "args, words",
    [
        (["--xheaders", "--max-connections-per-address", "5"], "does not apply with --xheaders"),
        (["--max-connections", "0"], "--max-connections must be 1 or more"),
        (["--max-connections-per-address", "-1"], "--max-connections-per-address must be 1 or more"),
    ],
)
def test_bad_connection_caps_are_a_clear_error(args, words, tmp_path: Path):
    result = subprocess.run(
        ["gittornado", "--port", "0", "--gitbase", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0 and words in result.stderr and "Traceback" not in result.stderr


def test_caps_show_in_the_startup_line(spawn_server, gitbase: Path):
    """As given, and without a per-address cap behind a proxy (--xheaders)."""
    server = spawn_server("--gitbase", str(gitbase), "--max-connections", "50")
    assert "at most 50 connections, 8 per address)" in server.startup_line
    proxied = spawn_server("--gitbase", str(gitbase), "--xheaders", "--max-connections", "50")
    assert "at most 50 connections)" in proxied.startup_line


#: One request for each kind of response: handlers, dumb files, errors, the 404 outside the routes, the
#: status endpoints, and the answers of gittornado/httpserver.py (broken framing, an HTTP version).
EVERY_KIND = {
    "info-refs": (b"GET /proj.git/info/refs?service=git-upload-pack", 200),
    "dumb-file": (b"GET /proj.git/HEAD", 200),
    "no-such-repository": (b"GET /nope.git/info/refs?service=git-upload-pack", 404),
    "push-refused": (b"GET /proj.git/info/refs?service=git-receive-pack", 403),
    "outside-the-routes": (b"GET /elsewhere", 404),
    "healthz": (b"GET /healthz", 200),
    "metrics": (b"GET /metrics", 200),
    "method-not-allowed": (b"DELETE /proj.git/HEAD", 405),
    "broken-framing": (b"GET /proj.git/HEAD HTTP/1.1\r\nHost: x\r\nX-Bad\x01: y", 400),
    "http-1.5": (b"GET /proj.git/HEAD HTTP/1.5\r\nHost: x", 505),
}


@pytest.mark.gen_test(timeout=60)
async def test_every_response_names_gittornado_without_a_version(spawn_server, repo: Path, gitbase: Path):
    server = spawn_server("--gitbase", str(gitbase), "--metrics")
    for kind, (start, expected) in EVERY_KIND.items():
        if b"HTTP/1." not in start:
            start += b" HTTP/1.1\r\nHost: x"
        raw = await raw_http(server.port, start + b"\r\nConnection: close\r\n\r\n")
        status, headers, _ = parse_response(raw)
        assert status == expected, (kind, raw[:300])
        assert headers.get("server") == "gittornado", (kind, raw[:300])
        assert b"Tornado" not in raw.partition(b"\r\n\r\n")[0], (kind, raw[:300])


def test_bad_gitbase_is_a_clear_error(tmp_path: Path):
    result = subprocess.run(
        ["gittornado", "--port", "0", "--gitbase", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "nope" in result.stderr and "not a directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_size_is_a_clear_error():
    result = subprocess.run(["gittornado", "--max-body-size", "lots"], capture_output=True, text=True)
    assert result.returncode == 2 and "not a size" in result.stderr


def test_port_in_use_is_a_clear_error(spawn_server, gitbase: Path):
    first = spawn_server("--gitbase", str(gitbase))
    result = subprocess.run(
        ["gittornado", "--address", "127.0.0.1", f"--port={first.port}", "--gitbase", str(gitbase)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0 and "cannot listen" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.gen_test(timeout=60)
async def test_spawned_server_serves_clone_and_refuses_push(
    spawn_server, git: GitClient, repo: Path, gitbase: Path, tmp_path: Path
):
    server = spawn_server("--gitbase", str(gitbase))
    assert re.match(r"gittornado \S+ serving .*repos at http://127\.0\.0\.1:\d+/", server.startup_line)
    assert "anyone may read, nobody may push" in server.startup_line
    await git.run("clone", f"{server.url}/proj", str(tmp_path / "c"))
    ls = await git.run("-c", "protocol.version=2", "ls-remote", f"{server.url}/proj.git")
    assert "refs/heads/main" in ls.stdout
    push = await git.run("push", "origin", "main:refs/heads/x", cwd=tmp_path / "c", check=False)
    assert push.returncode != 0 and "403" in push.stderr
    assert "refs/heads/x" not in git.sync("for-each-ref", cwd=repo)
    # One access-log line per request reaches the log.
    assert "repo=proj.git service=info/refs:git-upload-pack method=GET status=200" in server.log()


@pytest.mark.gen_test(timeout=60)
async def test_max_body_size(spawn_server, git: GitClient, repo: Path, gitbase: Path):
    server = spawn_server("--gitbase", str(gitbase), "--max-fetch-body-size", "1K", "--max-body-size", "1K")
    head = git.sync("rev-parse", "main", cwd=repo).strip().encode()
    big = b"0032want " + head + b"\n"
    big = big * 40  # 2 KB of wants: git waits for more, so only the cap ends the request
    declared = await raw_http(server.port, upload_pack_post("proj.git", big))
    assert parse_response(declared)[0] == 413
    chunked = await raw_http(
        server.port,
        b"POST /proj.git/git-upload-pack HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Type: application/x-git-upload-pack-request\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"".join(
            b"%x\r\n%s\r\n" % (len(big[i : i + 500]), big[i : i + 500]) for i in range(0, len(big), 500)
        )
        + b"0\r\n\r\n",
    )
    status, _, body = parse_response(chunked)
    assert status == 413 and b"too large" in body
    assert await wait_until(lambda: not git_processes_under(gitbase))
    # Normal fetches are well under the cap and still work.
    assert "refs/heads/main" in (await git.run("ls-remote", f"{server.url}/proj.git")).stdout


@pytest.mark.gen_test(timeout=120)
async def test_sigterm_lets_running_transfer_finish(
    spawn_server, git: GitClient, gitbase: Path, tmp_path: Path
):
    head = push_noise(git, make_repo(git, gitbase, "slow.git", commits=1), 16)
    server = spawn_server("--gitbase", str(gitbase))
    want = b"0032want %s\n" % head.encode()
    request = want + b"00000009done\n"

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(upload_pack_post("slow.git", request))
    received = await reader.readexactly(64 * 1024)  # the transfer is under way, held back by us
    server.proc.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.5)
    # New connections are refused while the running transfer drains.
    with pytest.raises(OSError):
        await asyncio.wait_for(asyncio.open_connection("127.0.0.1", server.port), 2)
    assert server.proc.poll() is None
    received += await asyncio.wait_for(reader.read(), 60)
    writer.close()
    assert received.endswith(b"0\r\n\r\n"), "the running clone was completed, not cut"
    assert len(received) > 16 * 1024 * 1024
    assert server.proc.wait(30) == 0
    assert not git_processes_under(gitbase)


@pytest.mark.gen_test(timeout=120)
async def test_sigterm_lets_a_dumb_download_finish(spawn_server, git: GitClient, gitbase: Path):
    """A pack file download runs no git process; shutdown still waits for it."""
    repo = make_repo(git, gitbase, "dumb.git", commits=1)
    push_noise(git, repo, 16)
    git.sync("repack", "-a", "-d", "-q", cwd=repo)
    pack = next((repo / "objects" / "pack").glob("pack-*.pack"))
    server = spawn_server("--gitbase", str(gitbase))

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(b"GET /dumb.git/objects/pack/%s HTTP/1.1\r\nHost: x\r\n\r\n" % pack.name.encode())
    received = await reader.readexactly(64 * 1024)  # under way, held back by us
    server.proc.send_signal(signal.SIGTERM)
    await asyncio.sleep(1)
    assert server.proc.poll() is None, "the server quit with a download in progress"
    head, _, body = received.partition(b"\r\n\r\n")
    length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
    body += await asyncio.wait_for(reader.readexactly(length - len(body)), 60)
    writer.close()
    assert body == pack.read_bytes(), "the download was completed, not cut"
    assert server.proc.wait(30) == 0


@pytest.mark.gen_test(timeout=60)
async def test_embed_example(git: GitClient, repo: Path, gitbase: Path, tmp_path: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "embed.py"), "--port", str(port), "--gitbase", str(gitbase)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert "git at" in proc.stdout.readline()
        page = await AsyncHTTPClient().fetch(f"http://127.0.0.1:{port}/")
        assert page.headers["Content-Type"].startswith("text/html")
        assert b"proj.git" in page.body
        await git.run("clone", f"http://127.0.0.1:{port}/git/proj.git", str(tmp_path / "c"))
        assert (tmp_path / "c" / "file1.txt").exists()
        missing = await AsyncHTTPClient().fetch(
            f"http://127.0.0.1:{port}/proj.git/info/refs", raise_error=False
        )
        assert missing.code == 404  # git lives under /git/ only
    finally:
        proc.terminate()
        proc.wait(10)


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_line = ci.split("# The README's test command:\n", 1)[1].splitlines()[0]
    assert test_line in readme.split("```")[1], "the README opens with the command CI runs"


@pytest.mark.gen_test(timeout=60)
async def test_token_policy_example(git: GitClient, gitbase: Path, tmp_path: Path):
    make_repo(git, gitbase, "app.git")
    make_repo(git, gitbase, "docs.git")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "examples" / "token_policy.py"),
            "--port",
            str(port),
            "--gitbase",
            str(gitbase),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert "git at" in proc.stdout.readline()
        base = f"http://127.0.0.1:{port}"
        work = tmp_path / "app"
        await git.run("clone", f"http://ci:s3cret-token@127.0.0.1:{port}/app.git", str(work))
        git.sync("commit", "-q", "--allow-empty", "-m", "by token", cwd=work)
        await git.run("push", "origin", "main", cwd=work)
        assert "by token" in git.sync("log", "-1", "--format=%s", "main", cwd=gitbase / "app.git")
        anonymous = await git.run("clone", f"{base}/app.git", str(tmp_path / "anon"), check=False)
        assert anonymous.returncode != 0 and "could not read Username" in anonymous.stderr  # a 401 challenge
        wrong = await git.run(
            "clone", f"http://ci:guess@127.0.0.1:{port}/app.git", str(tmp_path / "w"), check=False
        )
        assert wrong.returncode != 0 and "guess" not in wrong.stderr
        # The docs token reads docs.git only, and may not push to it.
        docs = tmp_path / "docs"
        await git.run("clone", f"http://bot:read-only-token@127.0.0.1:{port}/docs.git", str(docs))
        other = await git.run(
            "clone", f"http://bot:read-only-token@127.0.0.1:{port}/app.git", str(tmp_path / "x"), check=False
        )
        assert other.returncode != 0 and "not found" in other.stderr.lower()
        git.sync("commit", "-q", "--allow-empty", "-m", "nope", cwd=docs)
        push = await git.run("push", "origin", "main", cwd=docs, check=False)
        assert push.returncode != 0 and "403" in push.stderr
    finally:
        proc.terminate()
        proc.wait(10)
