"""Clone storms queue per repository instead of thrashing: a waiting fetch costs no git process.

One slot per repository here: a fetch that holds it (its client reads nothing, so its git blocks),
a second that waits for it in line and then gets its pack, protocol v2 ls-refs, which packs nothing
and is never queued, and one that waits too long (503).
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
from conftest import GitClient, git_processes_under, parse_response, push_noise, upload_pack_post, wait_until
from test_stream import pkt, want_request

from gittornado import GitBackend, RepositoryRoot
from gittornado.access import AccessPolicy
from gittornado.admission import RepositorySlots


@pytest.fixture
def slots() -> RepositorySlots:
    return RepositorySlots(1, queue_timeout=30.0)


@pytest.fixture
def backend(gitbase: Path, policy: AccessPolicy, slots: RepositorySlots) -> GitBackend:
    return GitBackend(lookup=RepositoryRoot(str(gitbase)), policy=policy, pack_slots=slots)


async def hold_a_fetch(port: int, request: bytes) -> asyncio.StreamWriter:
    """Send ``request`` and read nothing: its git blocks on a full pipe, holding its slot."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    _, writer = await asyncio.open_connection(sock=sock)
    writer.write(request)
    await writer.drain()
    return writer


async def fetch(port: int, request: bytes, protocol: bytes = b"") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request.replace(b"\r\n\r\n", b"\r\n" + protocol + b"\r\n\r\n", 1) if protocol else request)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()


@pytest.mark.gen_test(timeout=90)
async def test_fetches_of_one_repository_wait_in_line(
    git: GitClient, repo: Path, gitbase: Path, base_url: str, http_port: int, slots: RepositorySlots
):
    head = push_noise(git, repo, 16)
    request = upload_pack_post("proj.git", want_request(head))
    holder = await hold_a_fetch(http_port, request)
    key = str(repo.resolve())
    assert await wait_until(lambda: slots.waiting_or_running(key) == 1)

    waiting = asyncio.ensure_future(fetch(http_port, request))
    assert await wait_until(lambda: slots.waiting_or_running(key) == 2)
    await asyncio.sleep(0.5)
    assert len(git_processes_under(gitbase)) == 1, "a waiting fetch runs no git"

    # ls-refs packs nothing: it is answered while the slot is taken.
    ls_refs = pkt("command=ls-refs\n") + b"0000"
    listed = await fetch(http_port, upload_pack_post("proj.git", ls_refs), b"Git-Protocol: version=2")
    assert parse_response(listed)[0] == 200 and b"refs/heads/main" in listed

    holder.close()  # the first fetch ends; the one in line gets the slot and its whole pack
    status, _, body = parse_response(await waiting)
    assert status == 200 and b"PACK" in body
    assert await wait_until(lambda: slots.waiting_or_running(key) == 0)

    # One that waits longer than the queue allows gets 503, with a time to come back.
    slots.queue_timeout = 1.0
    holder = await hold_a_fetch(http_port, request)
    assert await wait_until(lambda: slots.waiting_or_running(key) == 1)
    status, headers, body = parse_response(await fetch(http_port, request))
    assert status == 503 and "retry-after" in headers and b"Too many fetches of this repository" in body
    holder.close()
    assert await wait_until(lambda: slots.waiting_or_running(key) == 0)
    assert await wait_until(lambda: not git_processes_under(gitbase))


@pytest.mark.gen_test(timeout=90)
async def test_a_client_that_leaves_while_queued_gives_its_place_back(
    git: GitClient, repo: Path, gitbase: Path, base_url: str, http_port: int, slots: RepositorySlots
):
    head = push_noise(git, repo, 16)
    request = upload_pack_post("proj.git", want_request(head))
    holder = await hold_a_fetch(http_port, request)
    key = str(repo.resolve())
    assert await wait_until(lambda: slots.waiting_or_running(key) == 1)
    _, leaver = await asyncio.open_connection("127.0.0.1", http_port)
    leaver.write(request)
    await leaver.drain()
    assert await wait_until(lambda: slots.waiting_or_running(key) == 2)
    leaver.close()  # gone while in line
    await asyncio.sleep(0.3)
    holder.close()
    # The one that left never runs git, and no slot stays taken: the next fetch is served at once.
    assert await wait_until(lambda: slots.waiting_or_running(key) == 0)
    status, _, body = parse_response(await fetch(http_port, request))
    assert status == 200 and b"PACK" in body
    assert await wait_until(lambda: not git_processes_under(gitbase))


def test_the_command_queues_per_cpu_without_the_pack_cache_and_not_with_it(tmp_path: Path):
    from tornado.process import cpu_count

    from gittornado.server import build_parser, pack_slots

    plain = pack_slots(build_parser().parse_args([]))
    assert plain is not None and plain.limit == cpu_count()
    assert pack_slots(build_parser().parse_args(["--pack-cache", str(tmp_path)])) is None
    chosen = pack_slots(
        build_parser().parse_args(["--pack-cache", str(tmp_path), "--max-packs-per-repository", "3"])
    )
    assert chosen is not None and chosen.limit == 3
    assert pack_slots(build_parser().parse_args(["--max-packs-per-repository", "0"])) is None
