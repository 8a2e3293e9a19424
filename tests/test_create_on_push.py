"""Repositories created by push (``--create-on-push``), with the real git client.

A push by a user with ``rw`` on a pattern matching a missing name creates a
bare repository whose HEAD is the pushed branch; nothing else creates one:
not a user without ``rw``, not a name lookup would refuse, not the default.
Racing first pushes create one repository.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
from pathlib import Path
from typing import List

import pytest
from conftest import GitClient, make_repo
from test_access import CREDENTIALS, USERS, basic, with_credentials
from tornado.httpclient import AsyncHTTPClient

from gittornado import GitBackend, RepositoryRoot
from gittornado.inipolicy import IniPolicy
from gittornado.repos import create_repository

#: alice may push to team/* (and read everything), bob only read team/*, carol push anywhere.
ACCESS = f"[users]\n{USERS}\n[access]\nalice = team/*=rw, race=rw, *=r\nbob = team/*=r\ncarol = *=rw\n"
RECEIVE = "/info/refs?service=git-receive-pack"


@pytest.fixture
def create_on_push() -> bool:
    return True


@pytest.fixture
def policy(tmp_path: Path) -> IniPolicy:
    path = tmp_path / "users.ini"
    path.write_text(ACCESS)
    return IniPolicy(str(path), realm="create")


@pytest.fixture
def backend(gitbase: Path, policy: IniPolicy, create_on_push: bool) -> GitBackend:
    return GitBackend(lookup=RepositoryRoot(str(gitbase), create_on_push=create_on_push), policy=policy)


@pytest.fixture
def work(git: GitClient, tmp_path: Path) -> Path:
    """A work tree with one commit on branch ``trunk`` (neither git's default nor main)."""
    path = tmp_path / "work"
    git.sync("init", "-q", "-b", "trunk", str(path))
    (path / "README").write_text("first\n")
    git.sync("add", "README", cwd=path)
    git.sync("commit", "-q", "-m", "first", cwd=path)
    return path


def url_for(base_url: str, user: str, name: str) -> str:
    return with_credentials(f"{base_url}/{name}", user, CREDENTIALS[user])


def everything_under(root: Path) -> List[str]:
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if ".git/" not in str(p.relative_to(root))
    )


@pytest.mark.gen_test(timeout=60)
async def test_a_push_creates_a_nested_bare_repository_with_the_pushed_branch_as_head(
    git: GitClient, gitbase: Path, base_url: str, work: Path, tmp_path: Path
) -> None:
    push = await git.run(
        "push", url_for(base_url, "alice", "team/sub/new.git"), "trunk", cwd=work, check=False
    )
    assert push.returncode == 0, push.stderr
    created = gitbase / "team/sub/new.git"
    assert git.sync("rev-parse", "--is-bare-repository", cwd=created).strip() == "true"
    assert git.sync("symbolic-ref", "HEAD", cwd=created).strip() == "refs/heads/trunk"
    assert git.sync("rev-parse", "trunk", cwd=created) == git.sync("rev-parse", "HEAD", cwd=work)
    assert not (created / "hooks/post-receive").exists()  # the first-push hook removed itself
    git.sync("fsck", "--strict", cwd=created)
    assert os.listdir(gitbase / "team/sub") == ["new.git"]  # no scratch directory left
    # Cloned back, it checks out the pushed branch; a second push just lands.
    clone = tmp_path / "clone"
    await git.run("clone", "-q", url_for(base_url, "alice", "team/sub/new"), str(clone))
    assert git.sync("branch", "--show-current", cwd=clone).strip() == "trunk"
    git.sync("commit", "-q", "--allow-empty", "-m", "second", cwd=clone)
    await git.run("push", "-q", "origin", "trunk", cwd=clone)
    assert git.sync("log", "-1", "--format=%s", "trunk", cwd=created).strip() == "second"


@pytest.mark.gen_test(timeout=60)
async def test_no_creation_without_rw_on_the_name(
    git: GitClient, gitbase: Path, base_url: str, work: Path
) -> None:
    # 403 where the user may read the name, 404 where not even that (as for any push).
    cases = [
        ("bob", "team/new.git", "403"),
        ("alice", "elsewhere.git", "403"),
        ("bob", "elsewhere.git", "404"),
    ]
    for user, name, code in cases:
        push = await git.run("push", url_for(base_url, user, name), "trunk", cwd=work, check=False)
        assert push.returncode != 0 and code in push.stderr, (user, name, push.stderr)
    # Anonymous: asked to log in; a wrong password: refused; neither creates.
    anonymous = await AsyncHTTPClient().fetch(f"{base_url}/team/anon.git{RECEIVE}", raise_error=False)
    assert anonymous.code == 401
    wrong = await AsyncHTTPClient().fetch(
        f"{base_url}/team/anon.git{RECEIVE}", headers=basic("alice", "wrong"), raise_error=False
    )
    assert wrong.code == 401
    # Fetching never creates, even for a user who could push.
    fetch = await AsyncHTTPClient().fetch(
        f"{base_url}/team/fetched.git/info/refs?service=git-upload-pack",
        headers=basic("alice", CREDENTIALS["alice"]),
        raise_error=False,
    )
    assert fetch.code == 404
    assert os.listdir(gitbase) == []


@pytest.mark.gen_test(timeout=60)
async def test_names_a_lookup_refuses_are_not_created(
    git: GitClient, gitbase: Path, base_url: str, tmp_path: Path
) -> None:
    make_repo(git, gitbase, "proj.git")
    make_repo(git, gitbase, "team/app.git")
    make_repo(git, gitbase, "worktree", bare=False)
    (gitbase / "real").mkdir()
    (gitbase / "linked").symlink_to(gitbase / "real")
    outside = tmp_path / "outside"
    outside.mkdir()
    (gitbase / "escape").symlink_to(outside)
    (gitbase / "file.txt").write_text("not a directory\n")
    before = everything_under(gitbase)
    names = [
        "proj.git/inner.git",  # inside a bare repository
        "proj.git/inner",
        "team/.git",  # would make team a work tree, hiding team/app.git
        ".git",
        "team/.hidden.git",
        ".git/x.git",
        "worktree/inner.git",  # inside a work tree
        "worktree/sub/inner.git",
        "linked/new.git",  # through a symlink, even one inside the root
        "escape/new.git",
        "file.txt/new.git",
        "%2e%2e/evil.git",
        "team/%2e%2e/%2e%2e/evil.git",
        "a%5cb.git",
        "nul%00.git",
        "x" * 1100 + ".git",
    ]
    for name in names:
        response = await AsyncHTTPClient().fetch(
            f"{base_url}/{name}{RECEIVE}", headers=basic("carol", CREDENTIALS["carol"]), raise_error=False
        )
        assert response.code in (400, 404), (name, response.code)
    assert everything_under(gitbase) == before
    assert os.listdir(outside) == [] and os.listdir(gitbase / "real") == []
    served = await AsyncHTTPClient().fetch(
        f"{base_url}/team/app.git/info/refs?service=git-upload-pack",
        headers=basic("carol", CREDENTIALS["carol"]),
        raise_error=False,
    )
    assert served.code == 200
    assert not (tmp_path / "evil.git").exists()


@pytest.mark.gen_test(timeout=60)
async def test_racing_first_pushes_create_one_repository(
    git: GitClient, gitbase: Path, base_url: str, work: Path, tmp_path: Path
) -> None:
    # Four clients, two histories: the same commit may land twice, a different one is refused cleanly.
    others = []
    for i in range(2):
        other = tmp_path / f"other{i}"
        git.sync("init", "-q", "-b", "trunk", str(other))
        git.sync("commit", "-q", "--allow-empty", "-m", f"other {i}", cwd=other)
        others.append(other)
    pushes = await asyncio.gather(
        *(
            git.run("push", url_for(base_url, "alice", "race.git"), "trunk", cwd=tree, check=False)
            for tree in (work, others[0], work, others[1])
        )
    )
    landed = [p for p in pushes if p.returncode == 0]
    assert landed, [p.stderr for p in pushes]
    for push in pushes:
        if push.returncode != 0:
            assert "rejected" in push.stderr or "failed to" in push.stderr, push.stderr
    assert os.listdir(gitbase) == ["race.git"]
    created = gitbase / "race.git"
    git.sync("fsck", "--strict", cwd=created)
    heads = {git.sync("rev-parse", "HEAD", cwd=tree) for tree in (work, *others)}
    assert git.sync("rev-parse", "trunk", cwd=created) in heads
    assert git.sync("symbolic-ref", "HEAD", cwd=created).strip() == "refs/heads/trunk"


def test_concurrent_creations_of_one_name_make_one_repository(gitbase: Path) -> None:
    results: List[object] = []
    start = threading.Barrier(8)

    def create() -> None:
        start.wait()
        results.append(create_repository(str(gitbase), "group/same"))

    threads = [threading.Thread(target=create) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8 and all(result == results[0] for result in results)
    assert results[0] is not None and results[0].name == "group/same.git"  # type: ignore[attr-defined]
    assert os.listdir(gitbase / "group") == ["same.git"]


@pytest.mark.parametrize("create_on_push", [False])
@pytest.mark.gen_test(timeout=60)
async def test_off_by_default(
    git: GitClient, gitbase: Path, base_url: str, work: Path, create_on_push: bool
) -> None:
    push = await git.run("push", url_for(base_url, "carol", "team/new.git"), "trunk", cwd=work, check=False)
    assert push.returncode != 0 and "404" in push.stderr
    assert os.listdir(gitbase) == []
    assert RepositoryRoot(str(gitbase)).create_on_push is False


def test_the_command_creates_with_create_on_push_only(
    git: GitClient, gitbase: Path, work: Path, tmp_path: Path, spawn_server
) -> None:
    access = tmp_path / "users.ini"
    access.write_text(ACCESS)
    plain = spawn_server("--gitbase", str(gitbase), "--accessfile", str(access))
    creating = spawn_server("--gitbase", str(gitbase), "--accessfile", str(access), "--create-on-push")
    for server, expected in ((plain, False), (creating, True)):
        result = subprocess.run(
            ["git", "push", url_for(server.url, "alice", "team/cli.git"), "trunk"],
            cwd=work,
            env=git.env,
            capture_output=True,
            text=True,
        )
        assert (result.returncode == 0) is expected, result.stderr
        assert (gitbase / "team/cli.git").is_dir() is expected
