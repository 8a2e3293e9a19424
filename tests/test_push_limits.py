"""Push limits, checked by git's own pre-receive hook point: the pushing user reads why, nothing lands.

The repository's own hooks keep running behind gittornado's, and push options reach them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import GitClient, make_repo

from gittornado import GitBackend, RepositoryRoot
from gittornado.access import AccessPolicy
from gittornado.observe import Metrics
from gittornado.process import GitProcesses
from gittornado.pushchecks import PushLimits

MIB = 1024 * 1024


@pytest.fixture
def limits() -> PushLimits:
    return PushLimits(max_push_size=3 * MIB, max_file_size=MIB, repo_quota=None)


@pytest.fixture
def backend(gitbase: Path, policy: AccessPolicy, limits: PushLimits) -> GitBackend:
    processes = GitProcesses()
    return GitBackend(
        lookup=RepositoryRoot(str(gitbase)),
        policy=policy,
        push_limits=limits,
        processes=processes,
        metrics=Metrics(processes),
    )


def refusals(backend: GitBackend, reason: str) -> float:
    """What the metrics say of pushes refused for ``reason``."""
    assert backend.metrics is not None
    text = backend.metrics.exposition().decode()
    line = f'gittornado_pushes_refused_total{{reason="{reason}"}} '
    return sum(float(row[len(line) :]) for row in text.splitlines() if row.startswith(line))


async def work_tree(git: GitClient, base_url: str, tmp_path: Path, name: str = "proj.git") -> Path:
    """A clone through the server (async: the server runs on this test's event loop)."""
    work = tmp_path / "work"
    await git.run("clone", "-q", f"{base_url}/{name}", str(work))
    return work


def commit_file(git: GitClient, work: Path, name: str, size: int) -> str:
    (work / name).parent.mkdir(parents=True, exist_ok=True)
    (work / name).write_bytes(os.urandom(size))
    git.sync("add", name, cwd=work)
    git.sync("commit", "-q", "-m", f"add {name}", cwd=work)
    return git.sync("rev-parse", "HEAD", cwd=work).strip()


def untouched(git: GitClient, repo: Path, head: str) -> None:
    """No ref moved, no quarantine left, the repository is whole."""
    assert git.sync("rev-parse", "main", cwd=repo).strip() == head
    assert not list((repo / "objects").glob("tmp_objdir*"))
    git.sync("fsck", "--no-progress", cwd=repo)


@pytest.mark.gen_test(timeout=60)
async def test_a_file_over_the_limit_is_refused_by_name(
    git: GitClient, repo: Path, base_url: str, tmp_path: Path, backend: GitBackend
):
    head = git.sync("rev-parse", "main", cwd=repo).strip()
    work = await work_tree(git, base_url, tmp_path)
    commit_file(git, work, "small.bin", 1000)
    commit_file(git, work, "assets/huge.bin", 2 * MIB)
    pushed = await git.run("push", "origin", "main", cwd=work, check=False)
    assert pushed.returncode != 0
    assert (
        "remote: gittornado: push refused: assets/huge.bin is 2.0 MiB, over the limit of 1.0 MiB"
        in pushed.stderr
    )
    untouched(git, repo, head)
    # Without the big file the same push lands.
    git.sync("reset", "-q", "--hard", "HEAD~1", cwd=work)
    await git.run("push", "-q", "origin", "main", cwd=work)
    assert git.sync("rev-parse", "main", cwd=repo).strip() == git.sync("rev-parse", "HEAD", cwd=work).strip()


@pytest.mark.gen_test(timeout=60)
async def test_a_push_over_the_size_limit_is_refused_while_it_streams(
    git: GitClient, repo: Path, base_url: str, tmp_path: Path, limits: PushLimits, backend: GitBackend
):
    head = git.sync("rev-parse", "main", cwd=repo).strip()
    work = await work_tree(git, base_url, tmp_path)
    for i in range(4):  # four files under the per-file limit, together over the push limit
        commit_file(git, work, f"part{i}.bin", MIB - 4096)
    pushed = await git.run("push", "origin", "main", cwd=work, check=False)
    assert pushed.returncode != 0
    assert "pack exceeds maximum allowed size" in pushed.stderr
    untouched(git, repo, head)
    assert refusals(backend, "push-size") == 1 and refusals(backend, "file-size") == 0


@pytest.mark.parametrize("limits", [PushLimits(repo_quota=64 * 1024)])
@pytest.mark.gen_test(timeout=60)
async def test_a_quota_smaller_than_one_pack_refuses_what_adds_and_lets_deletions_land(
    git: GitClient, repo: Path, base_url: str, tmp_path: Path, limits: PushLimits, backend: GitBackend
):
    head = git.sync("rev-parse", "main", cwd=repo).strip()
    git.sync("branch", "old", "main", cwd=repo)
    work = await work_tree(git, base_url, tmp_path)
    commit_file(git, work, "data.bin", 200 * 1024)
    pushed = await git.run("push", "origin", "main", cwd=work, check=False)
    assert pushed.returncode != 0 and "over its quota of 64.0 KiB" in pushed.stderr
    untouched(git, repo, head)
    assert refusals(backend, "quota") == 1
    await git.run("push", "-q", "origin", ":old", cwd=work)  # adds nothing: not refused
    assert "old" not in git.sync("branch", cwd=repo)


@pytest.mark.gen_test(timeout=60)
async def test_the_repositorys_own_hooks_still_run_and_see_push_options(
    git: GitClient, gitbase: Path, base_url: str, tmp_path: Path, backend: GitBackend
):
    repo = make_repo(git, gitbase, "hooked.git")
    marker = tmp_path / "hooks.log"
    # git gives push options to pre-receive and post-receive (not to update).
    for name, line in (
        ("pre-receive", "pre-receive $GIT_PUSH_OPTION_COUNT $GIT_PUSH_OPTION_0"),
        ("update", "update $1"),
        ("post-receive", "post-receive $GIT_PUSH_OPTION_COUNT $GIT_PUSH_OPTION_0"),
    ):
        hook = repo / "hooks" / name
        hook.write_text(
            f'#!/bin/sh\necho "{line}" >> {marker}\n' + ("" if name == "update" else "cat >/dev/null\n")
        )
        hook.chmod(0o755)
    work = await work_tree(git, base_url, tmp_path, "hooked.git")
    commit_file(git, work, "a.txt", 10)
    await git.run("push", "-q", "-o", "ci.skip", "origin", "main", cwd=work)
    lines = marker.read_text().splitlines()
    assert lines == ["pre-receive 1 ci.skip", "update refs/heads/main", "post-receive 1 ci.skip"]
    # The repository's own pre-receive may still refuse.
    (repo / "hooks" / "pre-receive").write_text("#!/bin/sh\necho 'not today' >&2\nexit 1\n")
    commit_file(git, work, "b.txt", 10)
    refused = await git.run("push", "origin", "main", cwd=work, check=False)
    assert refused.returncode != 0 and "remote: not today" in refused.stderr
    assert backend.metrics is not None  # the repository's own refusal is not one of the push limits'
    assert "gittornado_pushes_refused_total{" not in backend.metrics.exposition().decode()
