"""The pack-objects cache, with the real git client against a real server.

Each test serves its repositories with a :class:`~gittornado.packcache.PackCache`
in a temporary directory and looks at what the cache directory holds and what
its counters say, besides checking every clone with ``git fsck``.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import random
import subprocess
import urllib.request
from pathlib import Path
from typing import Any, Awaitable, Iterator, List

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

from gittornado import GitBackend, RepositoryRoot
from gittornado.access import AccessPolicy
from gittornado.adverts import SETTLED, AdvertisementCache
from gittornado.packcache import SCANNED_REQUEST, TRAILER, PackCache
from gittornado.packreply import SidebandReader


@pytest.fixture
def min_requests() -> int:
    """From which identical request on a fetch is cached (tests override it by parametrizing)."""
    return 1


@pytest.fixture
def cache(tmp_path: Path, min_requests: int) -> PackCache:
    return PackCache(str(tmp_path / "cache"), min_requests=min_requests)


@pytest.fixture
def settled() -> float:
    """How long a repository must be left alone before its state is trusted (0: at once, for the server's
    own answers to a fresh test repository; see gittornado.adverts)."""
    return SETTLED


@pytest.fixture
def backend(gitbase: Path, policy: AccessPolicy, cache: PackCache, settled: float) -> GitBackend:
    adverts = AdvertisementCache(settled=settled)
    return GitBackend(lookup=RepositoryRoot(str(gitbase)), policy=policy, pack_cache=cache, adverts=adverts)


def answered_by_server(caplog: pytest.LogCaptureFixture) -> int:
    """Fetches the server answered from the cache without git, by the access log."""
    return sum("service=git-upload-pack:cached " in record.getMessage() for record in caplog.records)


def entries(cache: PackCache, suffix: str = ".pack") -> List[Path]:
    return sorted(Path(cache.directory).glob(f"??/*{suffix}"))


async def clone(git: GitClient, url: str, dest: Path, *options: str) -> str:
    """Clone, check it with git fsck, and return its main."""
    await git.run("clone", "-q", *options, url, str(dest))
    await git.run("-C", str(dest), "fsck", "--no-progress")
    return (await git.run("-C", str(dest), "rev-parse", "HEAD")).stdout.strip()


def counters(cache: PackCache) -> dict:
    return cache.statistics()


@pytest.mark.parametrize("min_requests", [2])
@pytest.mark.gen_test(timeout=30)
async def test_a_clone_is_cached_from_its_first_request(
    git: GitClient, repo: Path, base_url: str, tmp_path: Path, cache: PackCache
):
    """Clones are what storms are made of: the first one already writes the entry the next ones hit."""
    head = git.sync("-C", str(repo), "rev-parse", "main").strip()
    assert await clone(git, f"{base_url}/proj.git", tmp_path / "c1") == head
    assert len(entries(cache)) == 1 and counters(cache)["misses"] == 1
    assert await clone(git, f"{base_url}/proj.git", tmp_path / "c2") == head
    stats = counters(cache)
    assert (stats["hits"], stats["misses"], stats["errors"]) == (1, 1, 0)
    assert stats["served_bytes"] + TRAILER.size == entries(cache)[0].stat().st_size


@pytest.mark.parametrize("min_requests", [2])
@pytest.mark.gen_test(timeout=40)
async def test_a_fetch_runs_no_hook_at_first_is_cached_at_second_and_hit_at_third(
    git: GitClient, repo: Path, base_url: str, tmp_path: Path, cache: PackCache
):
    """A fetch with haves is mostly one client's own: its first sighting costs what it costs uncached."""
    url = f"{base_url}/proj.git"
    clones = [tmp_path / f"c{n}" for n in range(3)]
    for dest in clones:
        await clone(git, url, dest)
    before = counters(cache)
    new = push_noise(git, repo, 1)
    results = []
    for dest in clones:
        await git.run("-C", str(dest), "fetch", "-q", "origin")
        await git.run("-C", str(dest), "fsck", "--no-progress")
        assert git.sync("-C", str(dest), "rev-parse", "origin/main").strip() == new
        stats = counters(cache)
        results.append(
            (stats["hits"] - before["hits"], stats["misses"] - before["misses"], len(entries(cache)))
        )
    assert results == [(0, 0, 1), (0, 1, 2), (1, 1, 2)]  # the hook did not even start for the first
    assert len(entries(cache, ".seen")) >= 1 and counters(cache)["errors"] == 0


def pkt(text: str) -> bytes:
    return b"%04x%s" % (len(text) + 4, text.encode())


def v2_post(repository: str, body: bytes, close: bool = True) -> bytes:
    """A raw protocol-v2 upload-pack request (see conftest.upload_pack_post)."""
    return upload_pack_post(repository, body, close).replace(
        b"Host: x\r\n", b"Host: x\r\nGit-Protocol: version=2\r\n"
    )


@pytest.mark.gen_test(timeout=30)
async def test_a_fetch_request_that_stalls_while_gathered_gets_408_and_starts_no_git(
    repo: Path, gitbase: Path, backend: GitBackend, http_port: int, base_url: str
):
    """With a cache, upload-pack waits for the whole request: one that stops halfway must not wait forever."""
    backend.body_timeout = 1
    reader, writer = await asyncio.open_connection("127.0.0.1", http_port)
    try:
        writer.write(upload_pack_post("proj.git", b"", close=False).replace(b"Length: 0", b"Length: 100"))
        writer.write(pkt("command=fetch\n") + pkt("object-format=sha1\n"))  # and then nothing more
        await writer.drain()
        await asyncio.sleep(0.5)
        assert git_processes_under(gitbase) == [] and not backend.processes.running
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    status, _, body = parse_response(raw)
    assert status == 408 and b"did not come in time" in body, raw
    assert not backend.processes.running


@pytest.mark.parametrize("min_requests", [2])
@pytest.mark.gen_test(timeout=30)
async def test_a_request_too_long_to_gather_still_gets_its_pack_through_the_cache(
    git: GitClient, repo: Path, http_port: int, base_url: str, cache: PackCache
):
    head = git.sync("-C", str(repo), "rev-parse", "main").strip()
    haves = b"".join(pkt(f"have {os.urandom(20).hex()}\n") for _ in range(SCANNED_REQUEST // 40))
    body = pkt("command=fetch\n") + b"0001" + pkt(f"want {head}\n") + haves + pkt("done\n") + b"0000"
    assert len(body) > SCANNED_REQUEST
    request = v2_post("proj.git", body)
    status, _, answer = parse_response(await raw_http(http_port, request))
    assert status == 200 and b"packfile\n" in answer, answer[:200]
    # Not looked at, so not counted: through the hook, though a fetch with haves is cached at its second.
    assert counters(cache)["misses"] == 1 and len(entries(cache)) == 1


@pytest.mark.parametrize("settled", [0.0])
@pytest.mark.gen_test(timeout=40)
async def test_a_repeated_clone_is_answered_by_the_server_without_git(
    settled: float,
    git: GitClient,
    repo: Path,
    base_url: str,
    tmp_path: Path,
    cache: PackCache,
    caplog: pytest.LogCaptureFixture,
):
    caplog.set_level("INFO", "gittornado.access")
    head = git.sync("-C", str(repo), "rev-parse", "main").strip()
    url = f"{base_url}/proj.git"
    assert await clone(git, url, tmp_path / "c1") == head
    assert answered_by_server(caplog) == 0 and len(entries(cache, ".link")) == 1
    assert await clone(git, url, tmp_path / "c2") == head  # fsck'd: the server framed a whole pack
    assert answered_by_server(caplog) == 1 and counters(cache)["hits"] == 1
    # Requests whose answer is more than a pack go to git, cached or not: shallow, protocol v0.
    assert await clone(git, url, tmp_path / "shallow", "--depth=1") == head
    await git.run("-c", "protocol.version=0", "clone", "-q", url, str(tmp_path / "v0"))
    await git.run("-C", str(tmp_path / "v0"), "fsck", "--no-progress")
    assert answered_by_server(caplog) == 1


@pytest.mark.parametrize("settled", [0.0])
@pytest.mark.gen_test(timeout=60)
async def test_identical_fetches_arriving_together_start_git_once(
    settled: float,
    git: GitClient,
    repo: Path,
    http_port: int,
    base_url: str,
    cache: PackCache,
    caplog: pytest.LogCaptureFixture,
):
    """A storm: all arrive before the first one's entry exists; the others wait for it, not run git too."""
    caplog.set_level("INFO", "gittornado.access")
    push_noise(git, repo, 4)
    request = v2_post("proj.git", v2_fetch_body(repo, git))
    answers = await asyncio.gather(*(raw_http(http_port, request, timeout=30) for _ in range(6)))
    assert [parse_response(answer)[0] for answer in answers] == [200] * 6
    assert answered_by_server(caplog) == 5 and counters(cache)["misses"] == 1


@pytest.mark.parametrize("settled", [0.0])
@pytest.mark.gen_test(timeout=40)
async def test_an_object_no_ref_points_to_is_never_answered_by_the_server(
    settled: float,
    git: GitClient,
    repo: Path,
    http_port: int,
    base_url: str,
    cache: PackCache,
    caplog: pytest.LogCaptureFixture,
):
    """What no ref points to may be pruned: git must decide each time whether it still gives it out."""
    caplog.set_level("INFO", "gittornado.access")
    old = git.sync("-C", str(repo), "rev-parse", "main~1").strip()
    body = pkt("command=fetch\n") + b"0001" + pkt(f"want {old}\n") + pkt("done\n") + b"0000"
    request = v2_post("proj.git", body)
    answers = [parse_response(await raw_http(http_port, request)) for _ in range(3)]
    assert answered_by_server(caplog) == 0  # git answered each time (it gives out what a ref reaches)
    assert all(status == 200 and b"packfile\n" in answer for status, _, answer in answers)


@pytest.mark.gen_test(timeout=30)
async def test_push_between_clones_reaches_the_second_clone(
    git: GitClient, repo: Path, base_url: str, tmp_path: Path, cache: PackCache
):
    await clone(git, f"{base_url}/proj.git", tmp_path / "c1")
    work = tmp_path / "c1"
    (work / "new.txt").write_text("new\n")
    git.sync("add", "new.txt", cwd=work)
    git.sync("commit", "-q", "-m", "new", cwd=work)
    await git.run("-C", str(work), "push", "-q", "origin", "main")
    new = git.sync("-C", str(work), "rev-parse", "HEAD").strip()
    assert await clone(git, f"{base_url}/proj.git", tmp_path / "c2") == new
    assert (tmp_path / "c2" / "new.txt").exists()
    assert len(entries(cache)) == 2  # the ref change made a new key


@pytest.mark.gen_test(timeout=60)
async def test_random_clones_and_pushes_always_get_complete_packs(
    git: GitClient, repo: Path, base_url: str, tmp_path: Path, cache: PackCache
):
    """Clones race pushes to several branches; every clone's refs have all their objects."""
    rng = random.Random(7)
    url = f"{base_url}/proj.git"
    pushers = []
    for number in range(3):
        work = tmp_path / f"pusher{number}"
        git.sync("clone", "-q", str(repo), str(work))
        pushers.append(work)

    async def push(work: Path) -> None:
        for step in range(3):
            await asyncio.sleep(rng.random() * 0.3)
            (work / f"{work.name}-{step}.txt").write_text(f"{step}\n" * rng.randint(1, 5000))
            git.sync("add", ".", cwd=work)
            git.sync("commit", "-q", "-m", f"{work.name} {step}", cwd=work)
            await git.run("-C", str(work), "push", "-q", url, f"HEAD:refs/heads/{work.name}")

    async def clone_and_check(number: int) -> None:
        await asyncio.sleep(rng.random() * 0.3)
        await clone(git, url, tmp_path / f"clone{number}", "--mirror")

    jobs = [clone_and_check(n) for n in range(10)]
    jobs += [push(work) for work in pushers]
    await asyncio.gather(*jobs)
    await clone(git, url, tmp_path / "last", "--mirror")
    refs = ("for-each-ref", "--format=%(objectname) %(refname)")
    assert git.sync("-C", str(tmp_path / "last"), *refs) == git.sync("-C", str(repo), *refs)
    assert counters(cache)["hits"] >= 1


@pytest.mark.gen_test(timeout=40)
async def test_shallow_filtered_and_each_protocol_hit_entries_of_their_own(
    git: GitClient, repo: Path, base_url: str, tmp_path: Path, cache: PackCache
):
    url = f"{base_url}/proj.git"
    kinds = {  # name: (options of git, options of clone)
        "v2": (["-c", "protocol.version=2"], []),
        "v0": (["-c", "protocol.version=0"], []),
        "shallow": ([], ["--depth=1"]),
        "filtered": ([], ["--filter=blob:none"]),
    }
    hits = {}
    for name, (config, options) in kinds.items():
        for attempt in range(2):
            before = counters(cache)["hits"]
            await git.run(*config, "clone", "-q", *options, url, str(tmp_path / f"{name}{attempt}"))
            await git.run("-C", str(tmp_path / f"{name}{attempt}"), "fsck", "--no-progress")
            hits[name, attempt] = counters(cache)["hits"] - before
    # v0 and v2 hand pack-objects the same input, so they share one entry; the others have their own.
    assert hits == {
        ("v2", 0): 0,
        ("v2", 1): 1,
        ("v0", 0): 1,
        ("v0", 1): 1,
        ("shallow", 0): 0,
        ("shallow", 1): 1,
        ("filtered", 0): 0,
        ("filtered", 1): 2,  # the clone, and the checkout's fetch of the blobs it lacks
    }
    assert len(entries(cache)) == 4
    assert git.sync("-C", str(tmp_path / "shallow1"), "rev-list", "--count", "HEAD").strip() == "1"


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs: a cache directory whose disk fills up."""
    path = tmp_path / "tiny"
    path.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(path)]
    result = subprocess.run(mount, capture_output=True)
    if result.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (the tests run as root): {result.stderr.decode()}", pytrace=False)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.gen_test(timeout=40)
async def test_full_disk_serves_uncached(
    git: GitClient, repo: Path, base_url: str, tmp_path: Path, backend: GitBackend, tiny_disk: Path
):
    backend.pack_cache = cache = PackCache(str(tiny_disk), min_requests=1)
    head = push_noise(git, repo, 1)  # a pack of 1 MiB does not fit
    for number in range(3):
        assert await clone(git, f"{base_url}/proj.git", tmp_path / f"c{number}") == head
    assert entries(cache) == [] and list(tiny_disk.glob("??/*.part")) == []
    assert counters(cache)["errors"] == 3
    # An unwritable directory (the tmpfs now read-only) likewise.
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], check=True)
    assert await clone(git, f"{base_url}/proj.git", tmp_path / "readonly") == head


@pytest.mark.parametrize("settled", [SETTLED, 0.0])  # through the hook, and answered by the server
@pytest.mark.gen_test(timeout=40)
async def test_corrupt_or_truncated_entry_is_never_served(
    settled: float,
    git: GitClient,
    repo: Path,
    base_url: str,
    tmp_path: Path,
    cache: PackCache,
    caplog: pytest.LogCaptureFixture,
):
    caplog.set_level("INFO", "gittornado.access")
    url = f"{base_url}/proj.git"
    await clone(git, url, tmp_path / "first")
    (entry,) = entries(cache)
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0xFF
    entry.write_bytes(bytes(data))
    await clone(git, url, tmp_path / "after-corruption")
    assert counters(cache)["errors"] == 1 and counters(cache)["hits"] == 0
    (entry,) = entries(cache)  # written again, whole
    with open(entry, "r+b") as f:
        f.truncate(entry.stat().st_size - 100)
    await clone(git, url, tmp_path / "after-truncation")
    assert counters(cache)["errors"] == 2 and counters(cache)["hits"] == 0
    await clone(git, url, tmp_path / "hit")
    assert counters(cache)["hits"] == 1
    assert answered_by_server(caplog) == (1 if settled == 0 else 0)


def v2_fetch_body(repo: Path, git: GitClient) -> bytes:
    """The fetch ``git clone -q`` sends for a repository with one branch (so the same cache key)."""

    def pkt(text: str) -> bytes:
        return b"%04x" % (len(text) + 4) + text.encode()

    head = git.sync("-C", str(repo), "rev-parse", "main").strip()
    return (
        pkt("command=fetch\n")
        + pkt("object-format=sha1\n")
        + b"0001"
        + pkt("thin-pack\n")
        + pkt("no-progress\n")
        + pkt("ofs-delta\n")
        + pkt(f"want {head}\n")
        + pkt("done\n")
        + b"0000"
    )


@pytest.mark.gen_test(timeout=60)
async def test_a_writer_whose_client_reads_nothing_does_not_hold_back_its_followers(
    git: GitClient, gitbase: Path, base_url: str, http_port: int, tmp_path: Path, cache: PackCache
):
    repo = make_repo(git, gitbase, "big.git")
    head = push_noise(git, repo, 24)  # more than the pipes and socket buffers hold
    git.sync("-C", str(repo), "repack", "-a", "-d", "-q")
    request = v2_post("big.git", v2_fetch_body(repo, git))
    reader, writer = await asyncio.open_connection("127.0.0.1", http_port)
    writer.write(request)  # and then reads nothing, at the worst moment: it is the entry's writer
    await writer.drain()
    try:
        await _growing(cache)
        follower = clone(git, f"{base_url}/big.git", tmp_path / "follower", "--bare")
        assert await asyncio.wait_for(follower, 30) == head  # not after the writer's idle timeout
        assert len(entries(cache)) == 1  # the entry is whole, though its writer's client is stuck
    finally:
        writer.close()


def fake_writer(cache: PackCache, pack_key: str, data: bytes) -> int:
    """Pose as a live writer of ``pack_key``'s entry that has written ``data`` so far; close the fd to die."""
    growing = Path(cache.directory, pack_key[:2], pack_key + ".part")
    fd = os.open(growing, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, data)
    return fd


async def kill_writer_mid_pack(cache: PackCache, follow: Awaitable[Any]) -> Any:
    """Replace the complete entry by a writer that has written half of it, let ``follow`` start, then die."""
    (entry,) = entries(cache)
    pack = entry.read_bytes()[: -TRAILER.size]
    entry.unlink()
    fd = fake_writer(cache, entry.stem, pack[: len(pack) // 2])
    try:
        started = asyncio.ensure_future(follow)
        await asyncio.sleep(1.5)  # the follower has sent the half by now, and waits for more
        assert not started.done()
    finally:
        os.unlink(Path(cache.directory, entry.stem[:2], entry.stem + ".part"))
        os.close(fd)  # died: the lock goes, and no trailer ever comes
    return await asyncio.wait_for(started, 30)


@pytest.mark.gen_test(timeout=60)
async def test_writer_killed_mid_pack_is_never_complete_and_its_follower_still_gets_a_pack(
    git: GitClient, repo: Path, base_url: str, tmp_path: Path, cache: PackCache
):
    """The hook's follower: it runs pack-objects itself and sends what follows the bytes it already sent."""
    head = push_noise(git, repo, 4)
    url = f"{base_url}/proj.git"
    await clone(git, url, tmp_path / "first", "--bare")
    before = counters(cache)
    assert await kill_writer_mid_pack(cache, clone(git, url, tmp_path / "follower", "--bare")) == head
    assert counters(cache)["errors"] == before["errors"] + 1  # resumed (a fresh start would count none)
    assert entries(cache) == [] and entries(cache, ".part") == []  # nothing of the dead writer is served
    assert await clone(git, url, tmp_path / "after", "--bare") == head


@pytest.mark.parametrize("settled", [0.0])
@pytest.mark.gen_test(timeout=60)
async def test_writer_killed_while_the_server_follows_it_the_server_gets_the_rest_from_git(
    settled: float,
    git: GitClient,
    repo: Path,
    http_port: int,
    base_url: str,
    tmp_path: Path,
    cache: PackCache,
    caplog: pytest.LogCaptureFixture,
):
    caplog.set_level("INFO", "gittornado")
    head = push_noise(git, repo, 4)
    request = v2_post("proj.git", v2_fetch_body(repo, git))
    status, _, _ = parse_response(await raw_http(http_port, request))
    assert status == 200 and len(entries(cache, ".link")) == 1
    status, _, body = parse_response(
        await kill_writer_mid_pack(cache, raw_http(http_port, request, timeout=30))
    )
    assert status == 200
    pack = b"".join(data for band, data in SidebandReader().feed(memoryview(dechunk(body))) if band == 1)
    check = tmp_path / "check.git"
    git.sync("init", "-q", "--bare", str(check))
    subprocess.run(
        ["git", "-C", str(check), "index-pack", "--stdin"], input=pack, check=True, capture_output=True
    )
    git.sync("-C", str(check), "cat-file", "-e", head)  # a whole pack, with the head in it
    assert any("asking git for the rest" in record.getMessage() for record in caplog.records)


def open_entry_files(cache: PackCache) -> List[str]:
    """Files of the cache directory this (the server's) process holds open."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(cache.directory):
            found.append(target)
    return found


@pytest.mark.parametrize("settled", [0.0])
@pytest.mark.gen_test(timeout=60)
async def test_a_client_that_takes_nothing_from_the_server_s_answer_is_let_go(
    settled: float,
    git: GitClient,
    repo: Path,
    http_port: int,
    base_url: str,
    backend: GitBackend,
    cache: PackCache,
):
    push_noise(git, repo, 24)  # more than the socket buffers hold
    body = v2_fetch_body(repo, git)
    whole = v2_post("proj.git", body)
    status, _, _ = parse_response(await raw_http(http_port, whole, timeout=30))
    assert status == 200 and len(entries(cache, ".link")) == 1
    backend.idle_timeout = 1
    request = whole.replace(b"Connection: close\r\n", b"")
    reader, writer = await asyncio.open_connection("127.0.0.1", http_port)
    try:
        writer.write(request)  # and then reads nothing
        await writer.drain()
        assert await wait_until(lambda: open_entry_files(cache) != [], timeout=10)  # being answered
        assert await wait_until(lambda: open_entry_files(cache) == [], timeout=15)  # and let go
    finally:
        writer.close()


def dechunk(body: bytes) -> bytes:
    """An HTTP/1.1 chunked body, decoded."""
    out, position = bytearray(), 0
    while True:
        line_end = body.index(b"\r\n", position)
        size = int(body[position:line_end], 16)
        if size == 0:
            return bytes(out)
        out += body[line_end + 2 : line_end + 2 + size]
        position = line_end + 2 + size + 2


async def _growing(cache: PackCache) -> List[Path]:
    await wait_until(lambda: entries(cache, ".part") != [])
    return entries(cache, ".part")


@pytest.mark.gen_test(timeout=30)
async def test_tidy_evicts_oldest_first_and_by_age(
    git: GitClient, gitbase: Path, base_url: str, tmp_path: Path, cache: PackCache
):
    for number in range(3):
        make_repo(git, gitbase, f"r{number}.git", commits=number + 1)
        await clone(git, f"{base_url}/r{number}.git", tmp_path / f"c{number}")
    packs = entries(cache)
    assert len(packs) == 3
    now = os.path.getmtime(packs[0])
    for age, path in zip((300, 200, 100), packs):
        os.utime(path, (now - age, now - age))
    oldest, newest = packs[0], packs[2]
    cache.max_bytes = sum(p.stat().st_size for p in packs) - 1
    cache.tidy()
    assert not oldest.exists() and len(entries(cache)) == 2 and cache.entries == 2
    cache.max_age = 150
    cache.tidy()
    assert entries(cache) == [newest] and cache.disk_bytes == newest.stat().st_size
    # A dead writer's file goes once it is old; its lock is gone.
    stale = Path(cache.directory) / "ab" / ("ab" * 32 + ".part")
    stale.parent.mkdir(exist_ok=True)
    stale.write_bytes(b"PACK")
    os.utime(stale, (now - 120, now - 120))
    cache.tidy()
    assert not stale.exists()
    # A request's link stays as long as entries may (the server finds entries by it), then goes.
    link = Path(cache.directory) / "cd" / ("cd" * 32 + ".link")
    link.parent.mkdir(exist_ok=True)
    link.write_text("ef" * 32)
    cache.tidy()
    assert link.exists()
    os.utime(link, (now - 200, now - 200))
    cache.tidy()
    assert not link.exists()


def test_command_reports_cache_metrics_across_processes(
    spawn_server, git: GitClient, repo: Path, tmp_path: Path
):
    cache_dir = tmp_path / "shared-cache"
    server = spawn_server(
        "--gitbase", str(repo.parent), "--pack-cache", str(cache_dir), "--processes", "2", "--metrics"
    )
    for number in range(4):
        git.sync("clone", "-q", "--bare", f"{server.url}/proj.git", str(tmp_path / f"c{number}"))
    # Cached by the first clone, whichever worker answered it: the other three hit, wherever they land.
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert "gittornado_pack_cache_hits_total 3.0" in text
    assert "gittornado_pack_cache_misses_total 1.0" in text


@pytest.mark.parametrize(
    "request_key",
    [
        "../../" + "z" * 58,  # 64 characters that climb out of the cache (into tmp_path, where it shows)
        "A" * 64,  # not lower-case hex
        "a" * 63,  # too short
        "",
    ],
)
def test_a_request_key_the_server_did_not_make_is_never_a_path(tmp_path: Path, request_key: str):
    """The hook takes its request key from its environment: anything but 64 hex digits writes nothing."""
    from gittornado.packfiles import read_link, write_link

    cache = tmp_path / "a" / "b" / "cache"
    cache.mkdir(parents=True)
    write_link(str(cache), request_key, "b" * 64)
    assert sorted(tmp_path.rglob("*")) == [tmp_path / "a", tmp_path / "a" / "b", cache]  # nothing written
    write_link(str(cache), "c" * 64, "b" * 64)  # the same call with a key the server makes: linked
    assert read_link(str(cache), "c" * 64) == "b" * 64
