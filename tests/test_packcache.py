"""The pack-objects cache, with the real git client against a real server.

Each test serves its repositories with a :class:`~gittornado.packcache.PackCache`
in a temporary directory and looks at what the cache directory holds and what
its counters say, besides checking every clone with ``git fsck``.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import urllib.request
from pathlib import Path
from typing import Iterator, List

import pytest
from conftest import GitClient, make_repo, push_noise, upload_pack_post, wait_until

from gittornado import GitBackend, RepositoryRoot
from gittornado.access import AccessPolicy
from gittornado.packcache import TRAILER, PackCache


@pytest.fixture
def min_requests() -> int:
    """From which identical request on a fetch is cached (tests override it by parametrizing)."""
    return 1


@pytest.fixture
def cache(tmp_path: Path, min_requests: int) -> PackCache:
    return PackCache(str(tmp_path / "cache"), min_requests=min_requests)


@pytest.fixture
def backend(gitbase: Path, policy: AccessPolicy, cache: PackCache) -> GitBackend:
    return GitBackend(lookup=RepositoryRoot(str(gitbase)), policy=policy, pack_cache=cache)


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
async def test_second_request_is_cached_third_is_a_hit(
    git: GitClient, repo: Path, base_url: str, tmp_path: Path, cache: PackCache
):
    head = git.sync("-C", str(repo), "rev-parse", "main").strip()
    assert await clone(git, f"{base_url}/proj.git", tmp_path / "c1") == head
    assert entries(cache) == [] and counters(cache)["misses"] == 1  # first sighting: only remembered
    assert await clone(git, f"{base_url}/proj.git", tmp_path / "c2") == head
    assert len(entries(cache)) == 1 and counters(cache)["hits"] == 0
    assert await clone(git, f"{base_url}/proj.git", tmp_path / "c3") == head
    stats = counters(cache)
    assert (stats["hits"], stats["misses"], stats["errors"]) == (1, 2, 0)
    assert stats["served_bytes"] + TRAILER.size == entries(cache)[0].stat().st_size


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


@pytest.mark.gen_test(timeout=40)
async def test_corrupt_or_truncated_entry_is_never_served(
    git: GitClient, repo: Path, base_url: str, tmp_path: Path, cache: PackCache
):
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


def pack_objects_under(hook_marker: str) -> List[int]:
    """PIDs of ``git pack-objects`` whose parent is a pack hook."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            parent = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]
            parent_argv = Path(f"/proc/{parent}/cmdline").read_bytes()
        except OSError:
            continue
        if argv[1:2] == [b"pack-objects"] and hook_marker.encode() in parent_argv:
            found.append(int(entry))
    return found


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
async def test_writer_killed_mid_pack_is_never_complete_and_its_follower_still_gets_a_pack(
    git: GitClient, gitbase: Path, base_url: str, http_port: int, tmp_path: Path, cache: PackCache
):
    repo = make_repo(git, gitbase, "big.git")
    head = push_noise(git, repo, 24)  # more than the pipes and socket buffers hold
    git.sync("-C", str(repo), "repack", "-a", "-d", "-q")
    # The writer's client sends its request, then reads nothing: the writer stalls mid-pack.
    body = v2_fetch_body(repo, git)
    request = upload_pack_post("big.git", body).replace(
        b"Content-Type", b"Git-Protocol: version=2\r\nContent-Type", 1
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", http_port)
    writer.write(request)
    await writer.drain()
    assert await wait_until(lambda: pack_objects_under("packhook") != [], timeout=15)
    (growing,) = await _growing(cache)
    assert await wait_until(lambda: growing.stat().st_size > 1 << 20 if growing.exists() else False)
    # The follower: a real clone, which streams the entry as it grows.
    follower = asyncio.ensure_future(clone(git, f"{base_url}/big.git", tmp_path / "follower", "--bare"))
    await asyncio.sleep(1.0)
    assert not follower.done()
    for pid in pack_objects_under("packhook"):
        os.kill(pid, signal.SIGKILL)
    writer.close()  # the writer's client leaves, as it would once its fetch failed
    assert await asyncio.wait_for(follower, 40) == head
    assert entries(cache) == [] and entries(cache, ".part") == []  # nothing of the dead writer is served
    assert counters(cache)["errors"] >= 1
    assert await clone(git, f"{base_url}/big.git", tmp_path / "after", "--bare") == head


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


def test_command_reports_cache_metrics_across_processes(
    spawn_server, git: GitClient, repo: Path, tmp_path: Path
):
    cache_dir = tmp_path / "shared-cache"
    server = spawn_server(
        "--gitbase", str(repo.parent), "--pack-cache", str(cache_dir), "--processes", "2", "--metrics"
    )
    for number in range(4):
        git.sync("clone", "-q", "--bare", f"{server.url}/proj.git", str(tmp_path / f"c{number}"))
    # Cached from the second request on, whichever worker answers: two hits in four.
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert "gittornado_pack_cache_hits_total 2.0" in text
    assert "gittornado_pack_cache_misses_total 2.0" in text
