"""The upload-pack advertisement cache (gittornado/adverts.py): replayed only while it is still true.

A replayed answer shows in the access log as ``git_exit=-`` (no git ran), a
fresh one as ``git_exit=0``.  Each staleness test first makes the cache warm
and settled (a replay is seen), then changes the server's repository, then
asks again at once: the answer must be what git itself says now.  Refs are
read with ``ls-remote`` over protocol v0, whose refs come from the
advertisement (v2 lists them in a later request, which is never cached).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
from conftest import GitClient
from tornado.httpclient import AsyncHTTPClient

from gittornado import GitBackend, RepositoryRoot
from gittornado.access import AccessPolicy
from gittornado.adverts import MAX_ANSWER, MAX_TOTAL, AdvertisementCache, Recording

#: The cache's racy-timestamp guard in this module: short, so the tests are quick.
SETTLED = 0.3

#: An access-log line of an advertisement: its service and git's exit status (``-``: replayed).
ADVERT_LINE = re.compile(r" service=info/refs:(\S+) .* git_exit=(\S+)$")


@pytest.fixture
def global_config(tmp_path: Path) -> Path:
    """The server's global git config file (``GIT_CONFIG_GLOBAL``); it does not exist at first."""
    return tmp_path / "server.gitconfig"


@pytest.fixture
def backend(gitbase: Path, policy: AccessPolicy, git_home: Path, global_config: Path) -> GitBackend:
    """The in-process server of this module, with a cache that trusts a state after SETTLED seconds.

    Its git and its cache read a global config of the test's own, so the host's, which the cache
    watches, can neither change under a test nor turn caching off.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(HOME=str(git_home), GIT_CONFIG_GLOBAL=str(global_config), GIT_CONFIG_NOSYSTEM="1")
    return GitBackend(
        lookup=RepositoryRoot(str(gitbase)),
        policy=policy,
        adverts=AdvertisementCache(env, settled=SETTLED),
        base_env=env,
    )


def parse_listing(listing: str) -> Dict[str, str]:
    """``ls-remote --symref`` output as {ref: object id}, and {"<ref> symref": target} for symrefs."""
    refs = {}
    for line in listing.splitlines():
        value, name = line.split("\t")
        if value.startswith("ref: "):
            refs[f"{name} symref"] = value[len("ref: ") :]
        else:
            refs[name] = value
    return refs


class Served:
    """The server's repository ``proj.git`` as clients see it, and how each answer was made."""

    def __init__(
        self,
        git: GitClient,
        repo: Path,
        base_url: str,
        http_client: AsyncHTTPClient,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        self.git = git
        self.repo = repo
        self.url = f"{base_url}/proj.git"
        self.http_client = http_client
        self.caplog = caplog

    def _git_exit(self, mark: int, service: str) -> str:
        """git_exit of the one advertisement of ``service`` logged since record ``mark``."""
        found = [
            ADVERT_LINE.search(record.getMessage())
            for record in self.caplog.records[mark:]
            if record.name == "gittornado.access"
        ]
        exits = [match[2] for match in found if match and match[1] == service]
        assert len(exits) == 1, [r.getMessage() for r in self.caplog.records[mark:]]
        return exits[0]

    async def advertisement(
        self, protocol: Optional[str] = None, service: str = "git-upload-pack"
    ) -> Tuple[bytes, str]:
        """The body of ``info/refs?service=<service>`` and its git_exit."""
        mark = len(self.caplog.records)
        response = await self.http_client.fetch(
            f"{self.url}/info/refs?service={service}",
            headers={"Git-Protocol": protocol} if protocol else None,
        )
        assert response.headers["Content-Type"] == f"application/x-{service}-advertisement"
        assert "no-cache" in response.headers["Cache-Control"]
        return response.body, self._git_exit(mark, service)

    async def ls_remote(self) -> Tuple[Dict[str, str], str]:
        """The refs the real git client sees over HTTP (protocol v0), and the git_exit of that answer."""
        mark = len(self.caplog.records)
        result = await self.git.run("-c", "protocol.version=0", "ls-remote", "--symref", self.url)
        return parse_listing(result.stdout), self._git_exit(mark, "git-upload-pack")

    async def truth(self) -> Dict[str, str]:
        """What git says the refs are now, reading the repository itself (hidden refs stay hidden)."""
        result = await self.git.run("-c", "protocol.version=0", "ls-remote", "--symref", str(self.repo))
        return parse_listing(result.stdout)

    async def warm(self) -> Dict[str, str]:
        """Let the repository settle, make the cache keep its answer, and see it replayed."""
        await asyncio.sleep(SETTLED + 0.1)
        first, _ = await self.ls_remote()
        replayed, git_exit = await self.ls_remote()
        assert git_exit == "-", "a settled, unchanged repository was not answered from the cache"
        assert replayed == first == await self.truth()
        return replayed

    async def assert_seen_at_once(self) -> Dict[str, str]:
        """The next answer, asked right after a change, is git's fresh and right one."""
        refs, git_exit = await self.ls_remote()
        assert git_exit == "0"
        assert refs == await self.truth()
        return refs

    def new_commit(self) -> str:
        """A commit on top of main, made in the server's repository without moving any ref."""
        return self.git.sync("commit-tree", "main^{tree}", "-p", "main", "-m", "new", cwd=self.repo).strip()

    def work_tree(self, tmp_path: Path) -> Path:
        """A local clone of the repository with one more commit on main, ready to push."""
        work = tmp_path / "work"
        self.git.sync("clone", "-q", str(self.repo), str(work))
        (work / "pushed.txt").write_text("pushed\n")
        self.git.sync("add", "pushed.txt", cwd=work)
        self.git.sync("commit", "-q", "-m", "pushed", cwd=work)
        return work


@pytest.fixture
def served(
    git: GitClient, repo: Path, base_url: str, http_client, caplog: pytest.LogCaptureFixture
) -> Served:
    caplog.set_level(logging.INFO, logger="gittornado.access")
    return Served(git, repo, base_url, http_client, caplog)


@pytest.mark.gen_test(timeout=20)
async def test_settled_answer_is_replayed_byte_for_byte(served: Served):
    await asyncio.sleep(SETTLED + 0.1)
    fresh, git_exit = await served.advertisement()
    assert git_exit == "0"
    for _ in range(2):
        replayed, git_exit = await served.advertisement()
        assert git_exit == "-"
        assert replayed == fresh


@pytest.mark.gen_test(timeout=20)
async def test_protocol_v0_and_v2_are_kept_apart(served: Served):
    await asyncio.sleep(SETTLED + 0.1)
    head = served.git.sync("rev-parse", "main", cwd=served.repo).strip()
    answers: Dict[str, List[Tuple[bytes, str]]] = {"": [], "version=2": []}
    for _ in range(2):  # v0, v2, v0, v2: each first answer is git's, each second a replay of its own
        for protocol, seen in answers.items():
            seen.append(await served.advertisement(protocol))
    for protocol, ((fresh, first_exit), (replayed, second_exit)) in answers.items():
        assert (first_exit, second_exit) == ("0", "-"), protocol
        assert replayed == fresh, protocol
    v0 = answers[""][1][0]
    assert v0.startswith(b"001e# service=git-upload-pack\n0000")
    assert f"{head} refs/heads/main".encode() in v0
    v2 = answers["version=2"][1][0]
    assert v2.startswith(b"000eversion 2\n") and b"ls-refs" in v2
    assert b"# service=" not in v2 and head.encode() not in v2


@pytest.mark.gen_test(timeout=20)
async def test_pushed_commit_is_seen_at_once(served: Served, tmp_path: Path):
    work = served.work_tree(tmp_path)
    before = await served.warm()
    await served.git.run("push", "-q", served.url, "HEAD:refs/heads/main", cwd=work)
    refs = await served.assert_seen_at_once()
    pushed = served.git.sync("rev-parse", "HEAD", cwd=work).strip()
    assert refs["refs/heads/main"] == refs["HEAD"] == pushed != before["refs/heads/main"]


@pytest.mark.gen_test(timeout=20)
async def test_pushed_branch_appears_at_once(served: Served, tmp_path: Path):
    work = served.work_tree(tmp_path)
    before = await served.warm()
    await served.git.run("push", "-q", served.url, "HEAD:refs/heads/feature", cwd=work)
    refs = await served.assert_seen_at_once()
    assert "refs/heads/feature" not in before
    assert refs["refs/heads/feature"] == served.git.sync("rev-parse", "HEAD", cwd=work).strip()


@pytest.mark.gen_test(timeout=20)
async def test_deleted_branch_disappears_at_once(served: Served, tmp_path: Path):
    work = served.work_tree(tmp_path)
    served.git.sync("update-ref", "refs/heads/doomed", "main", cwd=served.repo)
    before = await served.warm()
    assert "refs/heads/doomed" in before
    await served.git.run("push", "-q", served.url, ":refs/heads/doomed", cwd=work)
    refs = await served.assert_seen_at_once()
    assert "refs/heads/doomed" not in refs and "refs/heads/main" in refs


@pytest.mark.gen_test(timeout=20)
async def test_refs_moved_into_and_changed_within_packed_refs(served: Served):
    repo = served.repo
    served.git.sync("update-ref", "refs/heads/loose", "main", cwd=repo)
    before = await served.warm()

    # main moves, and all loose refs (main's new value with them) go into packed-refs.
    new = served.new_commit()
    served.git.sync("update-ref", "refs/heads/main", new, cwd=repo)
    served.git.sync("pack-refs", "--all", cwd=repo)
    assert not any((repo / "refs" / "heads").iterdir())
    refs = await served.assert_seen_at_once()
    assert refs["refs/heads/main"] == new != before["refs/heads/main"]
    assert refs["refs/heads/loose"] == before["refs/heads/loose"]

    # Now a change that rewrites packed-refs and nothing else.
    served.git.sync("update-ref", "refs/heads/packed", "main~1", cwd=repo)
    served.git.sync("pack-refs", "--all", cwd=repo)
    before = await served.warm()
    assert "refs/heads/packed" in before
    served.git.sync("update-ref", "-d", "refs/heads/packed", cwd=repo)
    assert not any((repo / "refs" / "heads").iterdir())
    refs = await served.assert_seen_at_once()
    assert "refs/heads/packed" not in refs and refs["refs/heads/loose"] == before["refs/heads/loose"]


@pytest.mark.gen_test(timeout=20)
async def test_new_head_symref_is_advertised_at_once(served: Served):
    served.git.sync("update-ref", "refs/heads/other", served.new_commit(), cwd=served.repo)
    before = await served.warm()
    assert before["HEAD symref"] == "refs/heads/main"
    served.git.sync("symbolic-ref", "HEAD", "refs/heads/other", cwd=served.repo)
    body, git_exit = await served.advertisement()
    assert git_exit == "0"
    assert b" symref=HEAD:refs/heads/other " in body and b"symref=HEAD:refs/heads/main" not in body
    refs = await served.assert_seen_at_once()
    assert refs["HEAD symref"] == "refs/heads/other" and refs["HEAD"] == refs["refs/heads/other"]


@pytest.mark.gen_test(timeout=20)
async def test_hidden_ref_is_hidden_at_once(served: Served):
    served.git.sync("update-ref", "refs/heads/secret", "main", cwd=served.repo)
    before = await served.warm()
    assert "refs/heads/secret" in before
    served.git.sync("config", "uploadpack.hideRefs", "refs/heads/secret", cwd=served.repo)
    refs = await served.assert_seen_at_once()
    assert "refs/heads/secret" not in refs and "refs/heads/main" in refs


@pytest.mark.gen_test(timeout=20)
async def test_ref_hidden_by_the_global_config_is_hidden_at_once(served: Served, global_config: Path):
    served.git.sync("update-ref", "refs/heads/secret", "main", cwd=served.repo)
    before = await served.warm()
    assert "refs/heads/secret" in before
    served.git.sync("config", "--file", str(global_config), "uploadpack.hideRefs", "refs/heads/secret")
    # Not compared with served.truth(): the client's git does not read the server's global config.
    refs, git_exit = await served.ls_remote()
    assert git_exit == "0"
    assert "refs/heads/secret" not in refs and refs["refs/heads/main"] == before["refs/heads/main"]


@pytest.mark.gen_test(timeout=20)
async def test_ref_hidden_by_an_included_config_file_is_hidden_at_once(served: Served, tmp_path: Path):
    included = tmp_path / "hidden-refs.cfg"
    included.write_text("")
    served.git.sync("config", "include.path", str(included), cwd=served.repo)
    served.git.sync("update-ref", "refs/heads/secret", "main", cwd=served.repo)
    await asyncio.sleep(SETTLED + 0.1)
    for _ in range(2):  # settled and unchanged: a cache that ignores included files keeps this answer
        refs, _ = await served.ls_remote()
        assert "refs/heads/secret" in refs
    included.write_text("[uploadpack]\n\thideRefs = refs/heads/secret\n")
    refs = await served.assert_seen_at_once()
    assert "refs/heads/secret" not in refs and "refs/heads/main" in refs


@pytest.mark.gen_test(timeout=20)
async def test_nothing_is_kept_until_a_change_has_settled(served: Served):
    await served.warm()
    new = served.new_commit()
    served.git.sync("update-ref", "refs/heads/main", new, cwd=served.repo)
    for _ in range(2):  # no sleep: the second would be a replay if the first had been kept
        refs, git_exit = await served.ls_remote()
        assert git_exit == "0" and refs["refs/heads/main"] == new
    assert (await served.warm())["refs/heads/main"] == new


@pytest.mark.gen_test(timeout=20)
async def test_receive_pack_advertisement_is_never_replayed(served: Served):
    await served.warm()
    upload_pack, _ = await served.advertisement()
    for _ in range(3):
        body, git_exit = await served.advertisement(service="git-receive-pack")
        assert git_exit == "0"
        assert body.startswith(b"001f# service=git-receive-pack\n0000") and b"report-status" in body
    # The upload-pack answer kept before is still there, and still upload-pack's.
    assert await served.advertisement() == (upload_pack, "-")


def session_id(body: bytes) -> bytes:
    """The ``session-id`` capability's value in an advertisement."""
    match = re.search(rb"session-id=([^ \n]+)", body)
    assert match, body
    return match[1]


@pytest.mark.gen_test(timeout=20)
async def test_repository_advertising_session_ids_is_never_replayed(served: Served):
    await served.warm()
    served.git.sync("config", "transfer.advertiseSID", "true", cwd=served.repo)
    await asyncio.sleep(SETTLED + 0.1)
    for protocol in ("", "version=2"):
        (first, first_exit), (second, second_exit) = [await served.advertisement(protocol) for _ in range(2)]
        assert (first_exit, second_exit) == ("0", "0"), protocol
        assert session_id(first) != session_id(second), protocol


@pytest.mark.gen_test(timeout=20)
async def test_answer_over_max_answer_is_served_but_not_kept(served: Served):
    head = served.git.sync("rev-parse", "main", cwd=served.repo).strip()
    # Long names make a big advertisement from few refs; packed, so their number is not the reason.
    names = [f"refs/heads/many/{'n' * 180}-{i:04d}" for i in range(1200)]
    served.git.sync(
        "update-ref", "--stdin", cwd=served.repo, input="".join(f"create {n} {head}\n" for n in names)
    )
    served.git.sync("pack-refs", "--all", cwd=served.repo)
    await asyncio.sleep(SETTLED + 0.1)
    first, first_exit = await served.advertisement()
    second, second_exit = await served.advertisement()
    assert len(first) > MAX_ANSWER
    assert (first_exit, second_exit) == ("0", "0")
    assert second == first
    refs, git_exit = await served.ls_remote()
    assert git_exit == "0"
    assert refs == await served.truth()
    assert all(refs[name] == head for name in names)


def test_cache_stays_within_max_total_dropping_the_least_recently_used():
    cache = AdvertisementCache(settled=SETTLED)
    state = (("/srv/git/r.git/HEAD", 1, 2, 3, 4),)
    fits = MAX_TOTAL // MAX_ANSWER

    def put(git_dir: str, fill: int) -> None:
        recording = Recording()
        recording(memoryview(bytes([fill]) * MAX_ANSWER))
        cache.put(git_dir, "", state, recording)

    # Replacing an answer counts only the new one: these would fill the cache many times over.
    for fill in range(3 * fits):
        put("/r0", fill)
    for i in range(1, fits):
        put(f"/r{i}", i)
    assert cache.get("/r0", "", state) == bytes([3 * fits - 1]) * MAX_ANSWER
    # /r0 was just used, so /r1, /r2 ... are the ones to go.
    for i in range(fits, fits + 3):
        put(f"/r{i}", i)
    kept = [i for i in range(fits + 3) if cache.get(f"/r{i}", "", state) is not None]
    assert kept == [0, *range(4, fits + 3)]
    assert len(kept) * MAX_ANSWER <= MAX_TOTAL
