"""The request path: git's output read from its start, git started by the body, failures ended cleanly.

Each test drives the real git client or raw HTTP against a real server
(in-process, or the ``gittornado`` command for shutdown) and checks what the
rebuild promises: no deadlock when upload-pack answers while it still reads,
git's own words when it fails mid-answer, process slots given back on every
failure, nothing left running after shutdown, 408 for a body that never
starts, a gzip bomb refused without holding the loop, and HTTP answers that
are always a clear 4xx.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import socket
import struct
import subprocess
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import deploy_helpers
import pytest
from conftest import (
    GitClient,
    git_processes_under,
    pack_for_push,
    parse_response,
    upload_pack_post,
    wait_until,
)
from test_stream import dechunk, head_of, pkt

from gittornado import GitBackend, OpenPolicy, RepositoryRoot
from gittornado.access import AccessPolicy
from gittornado.adverts import AdvertisementCache
from gittornado.process import GitProcesses

#: Commits of the negotiation repository: their ACK lines (56 bytes each) overflow a 1 MiB pipe.
MANY_COMMITS = 30_000
#: Bytes a gzip bomb inflates to.
BOMB_SIZE = 2**30
#: A gzip member header: deflate, no name, no time, unknown OS.
GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
#: A commit id no repository here has.
UNKNOWN_OID = "f" * 40


#: A smart info/refs request for the repository named by ``%s``, on a connection closed after it.
INFO_REFS = b"GET /%s/info/refs?service=git-upload-pack HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def make_chain(git: GitClient, path: Path, count: int) -> List[str]:
    """A bare repository at ``path`` whose main is a chain of ``count`` commits sharing one tree.

    Returns the commit ids, oldest first.
    """
    git.sync("init", "-q", "--bare", "-b", "main", str(path))
    stream = ["blob\nmark :1\ndata 2\nx\n\n"]
    for i in range(count):
        stream.append(
            f"commit refs/heads/main\ncommitter C <c@example.com> {1_700_000_000 + i} +0000\ndata 0\n"
        )
        stream.append("M 100644 :1 f\n\n" if i == 0 else "\n")
    git.sync("fast-import", "--quiet", cwd=path, input="".join(stream))
    return git.sync("rev-list", "--reverse", "main", cwd=path).split()


def negotiation(commits: List[str]) -> bytes:
    """A v0 stateless upload-pack request: want the last commit, have all others, oldest first, no ``done``.

    Oldest first, so no have is known to git through a child: upload-pack
    answers ``ACK <oid> common`` to every one of them while it still reads.
    """
    lines = [pkt(f"want {commits[-1]} multi_ack_detailed side-band-64k\n"), b"0000"]
    lines += [pkt(f"have {oid}\n") for oid in commits[:-1]]
    return b"".join(lines) + b"0000"


def want_request(oid: str) -> bytes:
    """A whole v0 upload-pack request for everything reachable from ``oid``."""
    return pkt(f"want {oid} ofs-delta\n") + b"0000" + pkt("done\n")


def gzip_bomb(prefix: bytes, block: bytes, size: int) -> Iterator[bytes]:
    """A valid gzip stream of ``prefix`` then ``block`` repeated up to ``size`` bytes, made in pieces.

    After a full flush deflate starts afresh, so one compressed block stands
    for every repetition, and the bomb costs no compression time.
    """
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    yield GZIP_HEADER + deflate.compress(prefix) + deflate.flush(zlib.Z_FULL_FLUSH)
    packed = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
    crc, length = zlib.crc32(prefix), len(prefix)
    for _ in range(size // len(block)):
        yield packed
        crc, length = zlib.crc32(block, crc), length + len(block)
    yield deflate.flush() + struct.pack("<II", crc, length & 0xFFFFFFFF)


def held_files() -> List[str]:
    """This process's open files that are held git output (named, or unnamed temporary files)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if "gittornado-held-" in target or (
            target.startswith(tempfile.gettempdir() + "/#") and target.endswith("(deleted)")
        ):
            found.append(target)
    return found


def open_files() -> List[str]:
    """What this process's file descriptors point at (for failure messages)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return sorted(found)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def exchange(port: int, request: Union[bytes, Iterable[bytes]], timeout: float = 10.0) -> bytes:
    """Send ``request`` (bytes, or pieces) while reading the answer; everything read until EOF or reset.

    Reads as it sends, and keeps what came before a reset: a server that
    answers early and closes while the body still flows resets the
    connection, and asyncio's streams would then drop the answer.
    """
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    received = bytearray()

    async def send() -> None:
        for piece in [request] if isinstance(request, bytes) else request:
            await loop.sock_sendall(sock, piece)

    async def receive() -> None:
        while True:
            data = await loop.sock_recv(sock, 65536)
            if not data:
                return
            received.extend(data)

    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        sending = asyncio.ensure_future(send())
        try:
            await asyncio.wait_for(receive(), timeout)
        except ConnectionError:
            pass
        if not sending.done():
            sending.cancel()
        try:
            await sending
        except (ConnectionError, asyncio.CancelledError):
            pass
    finally:
        sock.close()
    return bytes(received)


@pytest.fixture
def backend_options() -> Dict[str, Any]:
    """GitBackend arguments of one test; ``limit``/``queue_timeout`` go to a fresh GitProcesses."""
    return {}


@pytest.fixture
def backend(gitbase: Path, policy: AccessPolicy, backend_options: Dict[str, Any]) -> GitBackend:
    options = dict(backend_options)
    processes = GitProcesses(
        limit=options.pop("limit", None), queue_timeout=options.pop("queue_timeout", 10.0)
    )
    # Advertisements are recorded at once, so the tee of info/refs runs in every test.
    return GitBackend(
        lookup=RepositoryRoot(str(gitbase)),
        policy=policy,
        processes=processes,
        adverts=AdvertisementCache(settled=0),
        **options,
    )


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory, git_home: Path) -> Tuple[Path, List[str]]:
    """A bare repository with :data:`MANY_COMMITS` commits, made once; copied where a test serves it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(HOME=str(git_home), GIT_CONFIG_NOSYSTEM="1")
    path = tmp_path_factory.mktemp("chain") / "chain.git"
    return path, make_chain(GitClient(env), path, MANY_COMMITS)


def serve_copy(source: Path, gitbase: Path, name: str) -> Path:
    target = gitbase / name
    subprocess.run(["cp", "-a", str(source), str(target)], check=True)
    return target


# 1. upload-pack answers while it reads: no deadlock.


@pytest.mark.parametrize("pipe_size", ["default", "64KiB"])
@pytest.mark.gen_test(timeout=90)
async def test_many_common_haves_do_not_deadlock(
    chain: Tuple[Path, List[str]],
    gitbase: Path,
    base_url: str,
    http_port: int,
    pipe_size: str,
    monkeypatch: pytest.MonkeyPatch,
):
    if pipe_size == "64KiB":  # the kernel's default pipe: git blocks after 64 KiB of unread ACKs
        monkeypatch.setattr("gittornado.process.STDOUT_PIPE_SIZE", None)
        monkeypatch.setattr("gittornado.sizes.STDOUT_PIPE_SIZE", 65536, raising=False)
    source, commits = chain
    serve_copy(source, gitbase, "chain.git")
    started = time.monotonic()
    raw = await exchange(http_port, upload_pack_post("chain.git", negotiation(commits)), timeout=60)
    status, headers, body = parse_response(raw)
    assert status == 200, raw[:300]
    data, complete = dechunk(body)
    assert complete
    acks = data.count(b"ACK ")
    assert acks >= MANY_COMMITS - 1, acks
    assert data.endswith(b"0008NAK\n"), data[-100:]
    print(f"{acks} ACK lines in {time.monotonic() - started:.1f}s ({pipe_size} pipe)")


# 2. git fails after its output started: the client prints git's words, not a transfer error.


@pytest.mark.gen_test(timeout=60)
async def test_failure_after_output_started_shows_gits_words(
    git: GitClient, repo: Path, base_url: str, tmp_path: Path
):
    # Excluding the only branch selects no commit: upload-pack writes "shallow-info", then dies
    # ("no commits selected for shallow requests").  A ref that does not exist would fail before
    # any output (and is a plain 400 then).
    result = await git.run(
        "-c",
        "protocol.version=2",
        "clone",
        "--shallow-exclude=main",
        f"{base_url}/proj.git",
        str(tmp_path / "c"),
        check=False,
    )
    assert result.returncode != 0
    assert "error processing shallow info" in result.stderr, result.stderr
    assert "RPC failed" not in result.stderr and "curl 18" not in result.stderr, result.stderr
    # git's own file:// transport fails the same way, with upload-pack's message on top.
    local = await git.run(
        "clone", "--shallow-exclude=main", f"file://{repo}", str(tmp_path / "local"), check=False
    )
    assert local.returncode != 0 and "no commits selected for shallow requests" in local.stderr


# 3. Slots are given back on every failure.


class NulUserPolicy(OpenPolicy):
    """Everyone may do everything; a request with ``X-Nul-User`` authenticates as a name with a NUL."""

    def authenticate(self, request: Any) -> Optional[str]:
        return "evil\0user" if "X-Nul-User" in request.headers else None


def with_header(request: bytes, header: bytes) -> bytes:
    head, _, rest = request.partition(b"\r\n")
    return head + b"\r\n" + header + b"\r\n" + rest


async def clone_works(git: GitClient, base_url: str, tmp_path: Path, name: str) -> None:
    started = time.monotonic()
    await git.run("clone", "-q", f"{base_url}/proj.git", str(tmp_path / name))
    assert time.monotonic() - started < 5, "the clone waited for a process slot"


@pytest.mark.parametrize("policy", [NulUserPolicy()])
@pytest.mark.parametrize("backend_options", [{"limit": 1, "queue_timeout": 3}])
@pytest.mark.gen_test(timeout=60)
async def test_spawn_failures_give_the_slot_back(
    backend_options: Any,
    policy: Any,
    git: GitClient,
    repo: Path,
    backend: GitBackend,
    base_url: str,
    http_port: int,
    tmp_path: Path,
):
    request = upload_pack_post("proj.git", want_request(head_of(git, repo)))
    # A NUL in the environment: Popen refuses it.
    status, headers, body = parse_response(await exchange(http_port, with_header(request, b"X-Nul-User: 1")))
    assert status == 500 and headers["content-type"].startswith("text/plain"), body
    assert len(body) < 200 and b"Traceback" not in body and b"evil" not in body, body
    await clone_works(git, base_url, tmp_path, "after-nul")
    # A git binary that does not exist.
    real_git = backend.git
    backend.git = str(tmp_path / "no-such-git")
    try:
        status, _, body = parse_response(await exchange(http_port, request))
    finally:
        backend.git = real_git
    assert status == 500 and b"Cannot run git" in body, body
    await clone_works(git, base_url, tmp_path, "after-missing")
    assert not backend.processes.running


def _raise_runtime(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("injected fault")


def _raise_os(*args: Any, **kwargs: Any) -> Any:
    raise OSError(28, "injected: no space left on device")


FAULTS = {
    "pipe-write": ("gittornado.pipe.GitProcessPipe.write", _raise_runtime),
    "relay-send": ("gittornado.relay.OutputRelay.send", _raise_runtime),
    "output-release": ("gittornado.pipe.GitOutput.release", _raise_os),
    "advert-recording": ("gittornado.adverts.Recording.__call__", _raise_runtime),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.parametrize("backend_options", [{"limit": 1, "queue_timeout": 3}])
@pytest.mark.gen_test(timeout=60)
async def test_faults_in_our_code_give_everything_back(
    backend_options: Any,
    fault: str,
    git: GitClient,
    repo: Path,
    backend: GitBackend,
    gitbase: Path,
    base_url: str,
    http_port: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    # Enough early output (about 170 KB of ACKs) that it is held in a temporary file.
    commits = make_chain(git, gitbase / "many.git", 3000)
    await clone_works(git, base_url, tmp_path, "warm-up")
    assert await wait_until(lambda: not backend.processes.running)
    await asyncio.sleep(0.2)
    baseline, held_before = open_fds(), held_files()
    target, replacement = FAULTS[fault]
    monkeypatch.setattr(target, replacement)
    if fault == "advert-recording":
        request, whole = INFO_REFS % b"many.git", b"refs/heads/main"
    else:
        request, whole = upload_pack_post("many.git", negotiation(commits)), b"0008NAK\n"
    raw = await exchange(http_port, request, timeout=20)  # never a hang
    if raw:  # else the connection was closed (or reset) without an answer
        status, _, body = parse_response(raw)
        data, terminated = dechunk(body) if status == 200 else (body, True)
        # An error status, or an answer that visibly ends short.
        assert status >= 400 or not (terminated and whole in data), raw[:300]
    # The real client fails too, and says so, rather than taking a cut answer for a whole one.
    clone = await git.run("clone", f"{base_url}/many.git", str(tmp_path / "faulty"), check=False)
    print(f"git clone with {fault} failing:\n{clone.stderr}")
    assert clone.returncode != 0, clone.stderr
    monkeypatch.undo()
    await clone_works(git, base_url, tmp_path, "after")
    assert await wait_until(lambda: not git_processes_under(tmp_path), timeout=10), git_processes_under(
        tmp_path
    )
    assert await wait_until(lambda: open_fds() <= baseline, timeout=10), (
        open_fds(),
        baseline,
        open_files(),
    )
    assert held_files() == held_before
    assert not backend.processes.running


# 4. Shutdown leaves nothing behind.


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return False
    return state != b"Z"


def test_shutdown_ends_a_push_stuck_in_a_hook(
    services: deploy_helpers.Services, git: GitClient, repo: Path, gitbase: Path, tmp_path: Path
):
    marker = tmp_path / "hook-pid"
    hook = repo / "hooks" / "pre-receive"
    hook.write_text(f"#!/bin/sh\ntrap '' TERM\necho $$ > {marker}\nsleep 120\n")
    hook.chmod(0o755)
    server = services.gittornado(gitbase, "--shutdown-grace", "1")
    work = tmp_path / "w"
    git.sync("clone", "-q", str(repo), str(work))
    (work / "new.txt").write_text("never lands\n")
    git.sync("add", ".", cwd=work)
    git.sync("commit", "-q", "-m", "never lands", cwd=work)
    before = head_of(git, repo)
    push = subprocess.Popen(
        ["git", "push", f"{server.url}/proj.git", "HEAD:main"],
        cwd=work,
        env=git.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    suspects: List[int] = []
    try:
        deadline = time.monotonic() + 30
        while not marker.exists() or not marker.read_text().endswith("\n"):
            assert time.monotonic() < deadline, "the hook never ran"
            time.sleep(0.05)
        hook_pid = int(marker.read_text())
        suspects = [hook_pid, *deploy_helpers.children_of(hook_pid), *git_processes_under(gitbase)]
        assert len(suspects) >= 3, suspects  # the hook, its sleep, receive-pack at least
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=20) == 0, server.log()
        push.wait(timeout=20)
        assert push.returncode != 0
        left = [pid for pid in suspects if alive(pid)]
        assert left == [], (left, server.log())
        assert git_processes_under(gitbase) == []
        assert head_of(git, repo) == before
    finally:
        for pid in suspects:  # processes this test started, should the server have left them
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if push.poll() is None:
            push.kill()
            push.wait()


# 5. A body that never starts costs no process.


async def send_headers_only(port: int, repository: str) -> Tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /%s/git-upload-pack HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/x-git-upload-pack-request\r\nContent-Length: 100\r\n\r\n"
        % repository.encode()
    )
    await writer.drain()
    return reader, writer


@pytest.mark.parametrize("backend_options", [{"body_timeout": 1}])
@pytest.mark.gen_test(timeout=30)
async def test_body_that_never_starts_gets_408_without_git(
    backend_options: Any, repo: Path, backend: GitBackend, gitbase: Path, http_port: int, base_url: str
):
    reader, writer = await send_headers_only(http_port, "proj.git")
    try:
        await asyncio.sleep(0.5)
        assert git_processes_under(gitbase) == [] and not backend.processes.running
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    status, headers, body = parse_response(raw)
    assert status == 408, raw
    assert headers["content-type"].startswith("text/plain") and b"did not come in time" in body, raw
    assert not backend.processes.running


@pytest.mark.parametrize("backend_options", [{"limit": 2, "queue_timeout": 3, "body_timeout": 30}])
@pytest.mark.gen_test(timeout=30)
async def test_requests_waiting_for_their_body_hold_no_slot(
    backend_options: Any, git: GitClient, repo: Path, base_url: str, http_port: int, tmp_path: Path
):
    waiting = [await send_headers_only(http_port, "proj.git") for _ in range(2)]
    try:
        await asyncio.sleep(0.3)
        await clone_works(git, base_url, tmp_path, "c")
    finally:
        for _, writer in waiting:
            writer.close()


# 6. A gzip bomb.


async def post_gzip(port: int, chunks: Iterator[bytes]) -> bytes:
    """POST a gzip body (chunked, as git sends it) to git-upload-pack; return the raw answer."""
    head = (
        b"POST /proj.git/git-upload-pack HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Type: application/x-git-upload-pack-request\r\nContent-Encoding: gzip\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    framed = (b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks)
    return await exchange(port, itertools.chain([head], framed, [b"0\r\n\r\n"]), timeout=30)


async def slowest_health_check(port: int, task: asyncio.Future) -> Tuple[float, int]:
    """Ask /healthz over and over while ``task`` runs; the slowest answer's seconds, and how many."""
    slowest, count = 0.0, 0
    while not task.done():
        started = time.monotonic()
        raw = await exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 200"), raw
        slowest, count = max(slowest, time.monotonic() - started), count + 1
        await asyncio.sleep(0.05)
    return slowest, count


@pytest.mark.gen_test(timeout=60)
async def test_gzip_bomb_is_refused_at_the_decoded_cap(
    git: GitClient, repo: Path, base_url: str, http_port: int
):
    # A request git reads on and on without answering: one want, then haves of an unknown commit.
    prefix = pkt(f"want {head_of(git, repo)}\n") + b"0000"
    line = pkt(f"have {UNKNOWN_OID}\n")
    bomb = gzip_bomb(prefix, line * (2**20 // len(line)), BOMB_SIZE)
    started = time.monotonic()
    answer = asyncio.ensure_future(post_gzip(http_port, bomb))
    await asyncio.sleep(0.05)
    slowest, checks = await slowest_health_check(http_port, answer)
    status, _, body = parse_response(await answer)
    took = time.monotonic() - started
    print(f"413 after {took:.2f}s; /healthz answered {checks} times, slowest in {slowest:.3f}s")
    assert status == 413, body
    assert took < 10
    assert slowest < 1.5


@pytest.mark.parametrize("backend_options", [{"max_fetch_body_size": None}])
@pytest.mark.gen_test(timeout=60)
async def test_gzip_bomb_is_not_inflated_once_git_has_stopped(
    backend_options: Any, repo: Path, base_url: str, http_port: int
):
    started = time.monotonic()
    # 4 GiB, which takes this server some seconds to inflate.
    raw = await post_gzip(http_port, gzip_bomb(b"", b"x" * 2**20, 4 * BOMB_SIZE))
    took = time.monotonic() - started
    status, _, body = parse_response(raw)
    print(f"{status} after {took:.2f}s")
    assert 400 <= status < 500, raw[:300]
    assert took < 3, f"took {took:.1f}s: the bomb was inflated after git had stopped"


# 7. HTTP edges.


@pytest.mark.gen_test(timeout=30)
async def test_head_of_info_refs_runs_no_git(
    repo: Path, backend: GitBackend, base_url: str, http_port: int, monkeypatch: pytest.MonkeyPatch
):
    started: List[List[str]] = []
    real_start = backend.processes.start

    async def counting_start(argv: List[str], *args: Any) -> Any:
        started.append(argv)
        return await real_start(argv, *args)

    monkeypatch.setattr(backend.processes, "start", counting_start)
    raw = await exchange(
        http_port,
        b"HEAD /proj.git/info/refs?service=git-upload-pack HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    status, headers, body = parse_response(raw)
    assert status == 200 and body == b"", raw
    assert headers["content-type"] == "application/x-git-upload-pack-advertisement"
    assert started == []


@pytest.mark.gen_test(timeout=30)
async def test_post_results_are_never_cached(git: GitClient, repo: Path, base_url: str, http_port: int):
    raw = await exchange(http_port, upload_pack_post("proj.git", want_request(head_of(git, repo))))
    status, headers, body = parse_response(raw)
    assert status == 200 and headers["content-type"] == "application/x-git-upload-pack-result"
    assert headers["expires"] == "Fri, 01 Jan 1980 00:00:00 GMT"
    assert headers["pragma"] == "no-cache"
    assert headers["cache-control"] == "no-cache, max-age=0, must-revalidate"


@pytest.mark.parametrize(
    "header, v2", [("version=2:agent=x/1", True), ("version=2, foo", False), ("version=2", True)]
)
@pytest.mark.gen_test(timeout=30)
async def test_git_protocol_header_chooses_the_version(
    repo: Path, base_url: str, http_port: int, header: str, v2: bool
):
    raw = await exchange(
        http_port,
        b"GET /proj.git/info/refs?service=git-upload-pack HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Git-Protocol: %s\r\n\r\n" % header.encode(),
    )
    status, _, body = parse_response(raw)
    assert status == 200, raw
    data, _ = dechunk(body)
    if v2:
        assert data.startswith(b"000eversion 2\n"), data[:80]
    else:
        assert data.startswith(b"001e# service=git-upload-pack\n0000") and b"version 2" not in data, data[
            :120
        ]


@pytest.mark.gen_test(timeout=30)
async def test_empty_and_garbage_posts_are_400(repo: Path, base_url: str, http_port: int):
    status, _, body = parse_response(await exchange(http_port, upload_pack_post("proj.git", b"")))
    assert status == 400 and b"Empty request body" in body, body
    for garbage in (b"garbage!", b"0032want " + b"z" * 40 + b"\n0000", b"\x00" * 5000):
        status, _, body = parse_response(await exchange(http_port, upload_pack_post("proj.git", garbage)))
        assert status == 400, (garbage[:20], body)


# 8. No 499 on the wire, no ERROR in the log.


@pytest.mark.gen_test(timeout=30)
async def test_badly_terminated_chunk_is_400_not_499(
    git: GitClient, repo: Path, gitbase: Path, base_url: str, http_port: int, caplog: pytest.LogCaptureFixture
):
    data = want_request(head_of(git, repo))
    raw = await exchange(
        http_port,
        b"POST /proj.git/git-upload-pack HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/x-git-upload-pack-request\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"%x\r\n%sXX0\r\n\r\n" % (len(data), data),
    )
    assert raw.startswith(b"HTTP/1.1 400"), raw
    assert b"499" not in raw
    assert await wait_until(lambda: not git_processes_under(gitbase), timeout=10)


def push_request(git: GitClient, repo: Path, work: Path) -> Tuple[str, str, bytes]:
    """A whole receive-pack request moving main to a new commit: (old, new, body)."""
    git.sync("clone", "-q", str(repo), str(work))
    (work / "new.bin").write_bytes(os.urandom(200_000))
    git.sync("add", ".", cwd=work)
    git.sync("commit", "-q", "-m", "pushed raw", cwd=work)
    old, new = head_of(git, repo), git.sync("rev-parse", "HEAD", cwd=work).strip()
    pack = pack_for_push(git, work, f"{new}\n^{old}\n")
    body = pkt(f"{old} {new} refs/heads/main\0 report-status\n") + b"0000" + pack
    return old, new, body


@pytest.mark.gen_test(timeout=60)
async def test_push_whose_client_leaves_before_the_answer_logs_no_error(
    git: GitClient,
    repo: Path,
    gitbase: Path,
    base_url: str,
    http_port: int,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
):
    caplog.set_level(logging.DEBUG)
    old, new, body = push_request(git, repo, tmp_path / "w")
    request = (
        b"POST /proj.git/git-receive-pack HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/x-git-receive-pack-request\r\nContent-Length: %d\r\n\r\n"
        % len(body)
        + body
    )
    with socket.create_connection(("127.0.0.1", http_port)) as sock:
        sock.sendall(request)
    await asyncio.sleep(0.5)
    assert await wait_until(lambda: not git_processes_under(gitbase), timeout=40)
    await asyncio.sleep(0.2)
    errors = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
    assert head_of(git, repo) in (old, new)
    assert git.sync("fsck", "--no-progress", cwd=repo) == ""
    print("the push", "landed" if head_of(git, repo) == new else "did not land")
