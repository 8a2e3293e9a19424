"""``gittornado backup``: a backup taken while pushes land restores, with the README's two commands, every
ref that had landed before it started, and the files a bundle does not carry."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
from conftest import GitClient, make_repo

WORKTREE = str(Path(__file__).resolve().parent.parent)


def refs(git: GitClient, git_dir: Path) -> Dict[str, str]:
    out = git.sync("--git-dir", str(git_dir), "for-each-ref", "--format=%(refname) %(objectname)")
    return dict(line.split(" ") for line in out.splitlines())


def restore(git: GitClient, backup: Path, target: Path) -> None:
    """The README's restore, two commands."""
    git.sync("clone", "-q", "--mirror", str(backup / "repository.bundle"), str(target))
    subprocess.run(["cp", "-r", f"{backup}/files/.", f"{target}/"], check=True)


@pytest.mark.gen_test(timeout=60)
async def test_backup_during_pushes_restores_every_ref_landed_before_it(
    git: GitClient, gitbase: Path, base_url: str, tmp_path: Path
):
    repo = make_repo(git, gitbase, "team/app.git")
    git.sync("config", "receive.unpackLimit", "1", cwd=repo)
    git.sync("config", "gittornado.note", "kept", cwd=repo)
    oid = hashlib.sha256(b"large file").hexdigest()
    lfs_object = repo / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
    lfs_object.parent.mkdir(parents=True)
    lfs_object.write_bytes(b"large file")
    worktree = make_repo(git, gitbase, "work", bare=False)
    git.sync("init", "-q", "--bare", str(gitbase / "empty.git"))

    work = tmp_path / "work"
    await git.run("clone", "-q", f"{base_url}/team/app.git", str(work))
    stop = asyncio.Event()
    pushed: List[str] = []

    async def pusher() -> None:
        while not stop.is_set():
            n = len(pushed)
            (work / f"n{n}").write_text(f"{n}\n" * 1000)
            git.sync("add", ".", cwd=work)
            git.sync("commit", "-q", "-m", f"n{n}", cwd=work)
            await git.run("push", "-q", "origin", f"HEAD:refs/heads/b{n}", "HEAD:main", cwd=work)
            pushed.append(f"refs/heads/b{n}")

    pushing = asyncio.ensure_future(pusher())
    while len(pushed) < 3:
        await asyncio.sleep(0.05)
    landed = refs(git, repo)
    destination = tmp_path / "backup"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gittornado.server",
        "backup",
        str(destination),
        "--gitbase",
        str(gitbase),
        env={**git.env, "PYTHONPATH": WORKTREE},
        stderr=subprocess.PIPE,
    )
    _, stderr = await proc.communicate()
    during = len(pushed)
    while len(pushed) < during + 2:  # pushes went on during the backup and after it
        await asyncio.sleep(0.05)
    stop.set()
    await pushing
    assert proc.returncode == 0, stderr.decode()

    restored = tmp_path / "restored"
    restore(git, destination / "team" / "app.git", restored / "team" / "app.git")
    after = refs(git, restored / "team" / "app.git")
    assert set(landed) <= set(after)
    for ref, oid in landed.items():  # the same, or (main) moved on by a push during the backup
        git.sync(
            "--git-dir", str(restored / "team" / "app.git"), "merge-base", "--is-ancestor", oid, after[ref]
        )
    assert all(after[ref] == landed[ref] for ref in landed if ref.startswith("refs/heads/b"))
    assert len(after) < len(refs(git, repo))  # the backup did not see the last pushes: a true test
    git.sync("--git-dir", str(restored / "team" / "app.git"), "fsck", "--strict", "--no-dangling")
    assert git.sync("--git-dir", str(restored / "team" / "app.git"), "config", "gittornado.note") == "kept\n"
    assert (restored / "team" / "app.git" / "config").read_text() == (repo / "config").read_text()
    restored_object = restored / "team" / "app.git" / lfs_object.relative_to(repo)
    assert restored_object.read_bytes() == b"large file"

    restore(git, destination / "work" / ".git", restored / "work" / ".git")
    assert refs(git, restored / "work" / ".git") == refs(git, worktree / ".git")
    assert not (destination / "empty.git" / "repository.bundle").exists()
    assert (destination / "empty.git" / "files" / "HEAD").exists()
    assert not list(destination.rglob("*.tmp-*"))


def test_a_second_backup_copies_only_new_lfs_objects_and_replaces_bundles(
    git: GitClient, gitbase: Path, tmp_path: Path
):
    repo = make_repo(git, gitbase, "proj.git")
    lfs = repo / "lfs" / "objects" / "ab" / "cd"
    lfs.mkdir(parents=True)
    (lfs / ("abcd" + "0" * 60)).write_bytes(b"one")
    destination = tmp_path / "backup"
    env = {**git.env, "PYTHONPATH": WORKTREE}
    command = [
        sys.executable,
        "-m",
        "gittornado.server",
        "backup",
        str(destination),
        "--gitbase",
        str(gitbase),
    ]
    subprocess.run(command, env=env, check=True, capture_output=True)
    copied = destination / "proj.git" / "files" / "lfs" / "objects" / "ab" / "cd" / ("abcd" + "0" * 60)
    first_copy = os.stat(copied).st_ino
    (lfs / ("abcd" + "1" * 60)).write_bytes(b"two")
    git.sync("update-ref", "refs/heads/other", "main", cwd=repo)
    subprocess.run(command, env=env, check=True, capture_output=True)
    assert os.stat(copied).st_ino == first_copy  # immutable: not copied again
    assert (copied.parent / ("abcd" + "1" * 60)).read_bytes() == b"two"
    listed = git.sync("bundle", "list-heads", str(destination / "proj.git" / "repository.bundle"), cwd=repo)
    assert "refs/heads/other" in listed

    broken = make_repo(git, gitbase, "broken.git")  # a repository git cannot bundle: said, exit 1
    blob = git.sync("rev-parse", "main:file0.txt", cwd=broken).strip()
    (broken / "objects" / blob[:2] / blob[2:]).unlink()
    failed = subprocess.run(command, env=env, capture_output=True, text=True)
    assert failed.returncode == 1 and "broken.git: backup failed" in failed.stderr, failed.stderr
    assert "proj.git: backed up" in failed.stderr
    assert not (destination / "broken.git" / "repository.bundle").exists()
