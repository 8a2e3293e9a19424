"""Fault injection: clients that vanish at random points, and git killed mid-stream.

test_stream.py shows one vanishing clone and one half-sent push leave nothing
behind.  Here a hundred clients hang up at random byte offsets, in both
directions, with FIN or RST, mixed with real git clients killed at random
moments; and git itself is killed while a clone streams and while a push
waits in its hook.  After all of it the repository must be exactly as before,
clean, and served normally.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import socket
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import pytest
from conftest import GitClient, git_processes_under, make_repo, pack_for_push, wait_until
from test_stream import pkt, want_request

from gittornado import GitBackend

ZERO_OID = "0" * 40


@dataclass
class PushRequest:
    """A complete receive-pack request body for one ref update, pack included."""

    ref: str
    old: str
    new: str
    body: bytes


def push_request(git: GitClient, repo: Path, work: Path, ref: str, blob_size: int) -> PushRequest:
    """Commit ``blob_size`` random bytes in ``work`` and build the request that would push it to ``ref``.

    The commit exists only in ``work``; sending the body whole would create or
    move ``ref`` in ``repo``, so any prefix of it must change nothing.
    """
    (work / f"{ref.replace('/', '-')}.bin").write_bytes(os.urandom(blob_size))
    git.sync("add", ".", cwd=work)
    git.sync("commit", "-q", "-m", f"for {ref}", cwd=work)
    new = git.sync("rev-parse", "HEAD", cwd=work).strip()
    current = subprocess.run(
        ["git", "rev-parse", "--verify", "-q", ref], cwd=repo, env=git.env, capture_output=True, text=True
    ).stdout.strip()
    old = current or ZERO_OID
    revs = f"{new}\n" + "".join(f"^{oid}\n" for oid in git.sync("rev-parse", "--all", cwd=repo).split())
    pack = pack_for_push(git, work, revs)
    commands = pkt(f"{old} {new} {ref}\0report-status side-band-64k\n") + b"0000"
    return PushRequest(ref, old, new, commands + pack)


def post(path: str, content_type: str, body_length: int, chunked: bool = False) -> bytes:
    """Request head of a POST with a Content-Length or chunked framing."""
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % body_length
    return b"POST %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: %s\r\n%s\r\n\r\n" % (
        path.encode(),
        content_type.encode(),
        framing,
    )


def leftovers(repo: Path) -> List[str]:
    """Temporary files git leaves when a push is cut short without cleanup."""
    objects = repo / "objects"
    found = [
        f"{p.name} {sorted(str(f.relative_to(p)) for f in p.rglob('*'))}"
        for p in objects.iterdir()
        if p.name.startswith(("incoming-", "tmp_objdir"))
    ]
    found += [p.name for p in (objects / "pack").glob("tmp_*")]
    found += [str(p.relative_to(repo)) for p in repo.rglob("*.lock")]
    return found


async def _vanish(port: int, head: bytes, body: bytes, send: int, read: int, rst: bool, pause: float):
    """Send ``send`` bytes of head+body, read up to ``read`` bytes of the answer, then vanish."""
    sock = socket.socket()
    if read and read < 64 * 1024:
        # A small window so the server really is mid-stream, blocked on us, when we leave.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write((head + body)[:send])
        await writer.drain()
        got = 0
        while got < read:
            data = await asyncio.wait_for(reader.read(min(65536, read - got)), 5)
            if not data:
                break
            got += len(data)
        if pause:
            await asyncio.sleep(pause)
    finally:
        if rst:
            # SO_LINGER 0: close with a reset instead of a FIN, as a crashed client's kernel would.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()


async def _killed_git(args: List[str], env: Dict[str, str], after: float, cwd: Path) -> int:
    """Run a real git client and kill its whole process group after ``after`` seconds."""
    proc = await asyncio.create_subprocess_exec(
        "git",
        *args,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        await asyncio.wait_for(proc.wait(), after)
    except asyncio.TimeoutError:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # it finished just as the time ran out
        await proc.wait()
    return proc.returncode


@pytest.mark.gen_test(timeout=120)
async def test_a_hundred_clients_vanishing_at_random_points(
    git: GitClient, gitbase: Path, http_port: int, base_url: str, tmp_path: Path, backend: GitBackend
):
    seed = int(os.environ.get("GITTORNADO_FAULT_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    repo = make_repo(git, gitbase, "vanish.git", commits=1)
    work = tmp_path / "vanish-work"
    git.sync("clone", "-q", str(repo), str(work))
    # A clone answer of ~300 kB, so a reader can leave well inside it.
    (work / "clone-me.bin").write_bytes(os.urandom(300_000))
    git.sync("add", ".", cwd=work)
    git.sync("commit", "-q", "-m", "payload", cwd=work)
    git.sync("push", "-q", "origin", "HEAD:main", cwd=work)
    head = git.sync("rev-parse", "main", cwd=repo).strip()
    clone_body = want_request(head)
    pushes = [
        push_request(git, repo, work, "refs/heads/main", 150_000),
        push_request(git, repo, work, "refs/heads/created", 50_000),
    ]
    refs_before = git.sync("for-each-ref", cwd=repo)
    fds_before = len(os.listdir("/proc/self/fd"))
    real_pushes: Dict[str, str] = {}

    kinds = ["clone"] * 45 + ["push"] * 45 + ["git-clone"] * 5 + ["git-push"] * 5
    rng.shuffle(kinds)
    for trial, kind in enumerate(kinds):
        rst, pause = rng.random() < 0.3, rng.choice([0, 0, 0.01, 0.05])
        if kind == "clone":
            request_head = post(
                "/vanish.git/git-upload-pack", "application/x-git-upload-pack-request", len(clone_body)
            )
            whole = len(request_head) + len(clone_body)
            # Mostly the whole request then a partial read; sometimes a cut inside the request.
            send = whole if rng.random() < 0.8 else rng.randrange(whole)
            read = rng.randrange(400_000) if send == whole else 0
            await _vanish(http_port, request_head, clone_body, send, read, rst, pause)
        elif kind == "push":
            push = rng.choice(pushes)
            chunked = rng.random() < 0.3
            body = b"%x\r\n%s\r\n" % (len(push.body), push.body) if chunked else push.body
            request_head = post(
                "/vanish.git/git-receive-pack", "application/x-git-receive-pack-request", len(body), chunked
            )
            # Never the whole request: for chunked, even the full data without the last chunk is cut.
            limit = len(request_head) + (len(body) if chunked else len(body) - 1)
            await _vanish(http_port, request_head, body, rng.randrange(limit + 1), 0, rst, pause)
        elif kind == "git-clone":
            await _killed_git(
                ["clone", "-q", f"{base_url}/vanish.git", str(tmp_path / f"clone-{trial}")],
                git.env,
                rng.uniform(0.0, 0.4),
                tmp_path,
            )
        else:
            ref = f"refs/heads/real-{trial}"
            real_pushes[ref] = git.sync("rev-parse", "HEAD", cwd=work).strip()
            await _killed_git(
                ["push", "-q", base_url + "/vanish.git", f"HEAD:{ref}"], git.env, rng.uniform(0.0, 0.4), work
            )

    gone = await wait_until(lambda: not git_processes_under(gitbase), timeout=20)
    assert gone, f"seed {seed}: git still running: {git_processes_under(gitbase)}"
    assert await wait_until(lambda: not backend.processes.running, timeout=5), f"seed {seed}"
    # A real push killed at a random moment may have landed or not, but never half.
    for ref, oid in real_pushes.items():
        now = subprocess.run(
            ["git", "rev-parse", "-q", "--verify", ref], cwd=repo, capture_output=True, text=True
        )
        assert now.returncode != 0 or now.stdout.strip() == oid, f"seed {seed}: {ref} points at {now.stdout}"
    refs_after = "".join(
        line for line in git.sync("for-each-ref", cwd=repo).splitlines(True) if "refs/heads/real-" not in line
    )
    assert refs_after == refs_before, f"seed {seed}: an aborted push moved a ref"
    assert await wait_until(lambda: not leftovers(repo), timeout=5), f"seed {seed}: {leftovers(repo)}"
    assert git.sync("fsck", "--no-progress", cwd=repo) == ""
    assert await wait_until(lambda: len(os.listdir("/proc/self/fd")) <= fds_before, timeout=5), (
        f"seed {seed}: file descriptors leaked: {len(os.listdir('/proc/self/fd'))} > {fds_before}"
    )
    await git.run("clone", "-q", f"{base_url}/vanish.git", str(tmp_path / "after"))
    assert git.sync("rev-parse", "HEAD", cwd=tmp_path / "after").strip() == head


def _service_processes(gitbase: Path, service: bytes) -> List[int]:
    """git processes running ``service`` for a request (not the info/refs advertisement)."""
    found = []
    for pid in git_processes_under(gitbase):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if service in argv and b"--advertise-refs" not in argv:
            found.append(pid)
    return found


def _kill_group(pid: int) -> int:
    group = os.getpgid(pid)
    os.killpg(group, signal.SIGKILL)
    return group


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.gen_test(timeout=90)
async def test_git_killed_while_a_clone_streams(
    git: GitClient,
    gitbase: Path,
    base_url: str,
    tmp_path: Path,
    backend: GitBackend,
    caplog: pytest.LogCaptureFixture,
):
    caplog.set_level(logging.INFO, logger="gittornado")
    repo = make_repo(git, gitbase, "stream.git", commits=1)
    work = tmp_path / "stream-work"
    git.sync("clone", "-q", str(repo), str(work))
    (work / "big.bin").write_bytes(os.urandom(1_000_000))
    git.sync("add", ".", cwd=work)
    git.sync("commit", "-q", "-m", "big", cwd=work)
    git.sync("push", "-q", "origin", "HEAD:main", cwd=work)
    # git's own hook for serving packs (trusted only from the command line or
    # system config, as here): pass the first 100 kB, then stall, so the
    # clone is certainly mid-stream when the test kills git.
    mark = tmp_path / "stalled"
    hook = tmp_path / "stall-hook"
    hook.write_text(f'#!/bin/sh\n"$@" | {{ head -c 100000; touch {mark}; sleep 60; cat; }}\n')
    hook.chmod(0o755)
    saved_env = dict(backend.base_env)
    backend.base_env.update(
        GIT_CONFIG_COUNT="1", GIT_CONFIG_KEY_0="uploadpack.packObjectsHook", GIT_CONFIG_VALUE_0=str(hook)
    )
    target = tmp_path / "clone"
    clone = asyncio.ensure_future(git.run("clone", f"{base_url}/stream.git", str(target), check=False))
    assert await wait_until(mark.exists, timeout=20)
    assert await wait_until(lambda: any((target / ".git/objects/pack").glob("tmp_pack_*")), timeout=10)
    [upload_pack] = _service_processes(gitbase, b"upload-pack")
    group = _kill_group(upload_pack)
    result = await clone
    assert result.returncode != 0
    assert "error:" in result.stderr or "fatal:" in result.stderr, result.stderr
    print(f"git clone after upload-pack was killed:\n{result.stderr}")
    failures = [
        r.getMessage()
        for r in caplog.records
        if r.name == "gittornado" and "exited with status" in r.getMessage()
    ]
    assert any("mid-transfer" in m for m in failures), [r.getMessage() for r in caplog.records]
    assert await wait_until(lambda: not _group_alive(group), timeout=10), "the hook's processes outlived git"
    assert await wait_until(lambda: not git_processes_under(gitbase), timeout=10)
    backend.base_env.clear()
    backend.base_env.update(saved_env)
    await git.run("clone", "-q", f"{base_url}/stream.git", str(tmp_path / "again"))
    assert git.sync("fsck", "--no-progress", cwd=repo) == ""


@pytest.mark.gen_test(timeout=90)
async def test_git_killed_while_a_push_waits_in_its_hook(
    git: GitClient,
    repo: Path,
    gitbase: Path,
    base_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
):
    caplog.set_level(logging.INFO, logger="gittornado")
    mark = tmp_path / "in-hook"
    hook = repo / "hooks" / "pre-receive"
    hook.write_text(f"#!/bin/sh\ntouch {mark}\nsleep 60\n")
    hook.chmod(0o755)
    work = tmp_path / "w"
    git.sync("clone", "-q", str(repo), str(work))
    (work / "new.txt").write_text("never lands\n")
    git.sync("add", ".", cwd=work)
    git.sync("commit", "-q", "-m", "never lands", cwd=work)
    refs_before = git.sync("for-each-ref", cwd=repo)
    push = asyncio.ensure_future(git.run("push", f"{base_url}/proj.git", "HEAD:main", cwd=work, check=False))
    assert await wait_until(mark.exists, timeout=20)
    [receive_pack] = _service_processes(gitbase, b"receive-pack")
    group = _kill_group(receive_pack)
    result = await push
    assert result.returncode != 0
    assert "error:" in result.stderr or "fatal:" in result.stderr, result.stderr
    print(f"git push after receive-pack was killed:\n{result.stderr}")
    messages = [r.getMessage() for r in caplog.records if r.name == "gittornado"]
    assert any("exited with status -9" in m for m in messages), messages
    assert await wait_until(lambda: not _group_alive(group), timeout=10)
    assert git.sync("for-each-ref", cwd=repo) == refs_before
    assert git.sync("fsck", "--no-progress", cwd=repo) == ""
    hook.unlink()
    print(f"left behind by the killed receive-pack: {leftovers(repo)}")
    # git cannot clean up after SIGKILL: its quarantine stays (see the report),
    # yet the next push goes through.
    result = await git.run("push", "-q", f"{base_url}/proj.git", "HEAD:main", cwd=work)
    assert git.sync("rev-parse", "main", cwd=repo) == git.sync("rev-parse", "HEAD", cwd=work)
