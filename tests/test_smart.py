"""The smart protocol with the real git client: clone, fetch, pull, push, ls-remote."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import GitClient, make_repo


def url(base_url: str, name: str = "proj.git") -> str:
    return f"{base_url}/{name}"


@pytest.mark.gen_test(timeout=20)
@pytest.mark.parametrize("version", ["0", "1", "2"])
async def test_clone_each_protocol_version(
    git: GitClient, repo: Path, base_url: str, tmp_path: Path, version: str
):
    result = await git.run(
        "-c",
        f"protocol.version={version}",
        "clone",
        url(base_url),
        str(tmp_path / "clone"),
        env={"GIT_TRACE_PACKET": "1"},
    )
    assert (tmp_path / "clone" / "file1.txt").read_text() == "content 1\ncontent 1\n"
    log = git.sync("log", "--format=%s", cwd=tmp_path / "clone")
    assert log.split() == ["commit", "1", "commit", "0"]
    if version == "2":
        assert "version 2" in result.stderr and "command=fetch" in result.stderr
    else:
        assert "command=fetch" not in result.stderr


@pytest.mark.gen_test(timeout=20)
@pytest.mark.parametrize("name", ["proj", "proj.git"])
async def test_ls_remote_finds_repository_with_or_without_suffix(
    git: GitClient, repo: Path, base_url: str, name: str
):
    head = git.sync("rev-parse", "refs/heads/main", cwd=repo).strip()
    result = await git.run("ls-remote", url(base_url, name))
    assert f"{head}\tHEAD" in result.stdout
    assert f"{head}\trefs/heads/main" in result.stdout


@pytest.mark.gen_test(timeout=20)
async def test_non_bare_and_nested_repositories(git: GitClient, gitbase: Path, base_url: str, tmp_path: Path):
    make_repo(git, gitbase, "team/tools.git")
    make_repo(git, gitbase, "worktree", bare=False)
    await git.run("clone", url(base_url, "team/tools"), str(tmp_path / "a"))
    await git.run("clone", url(base_url, "worktree.git"), str(tmp_path / "b"))
    assert (tmp_path / "a" / "file0.txt").exists()
    assert (tmp_path / "b" / "file1.txt").exists()


@pytest.mark.gen_test(timeout=20)
async def test_push_then_fetch_and_pull_see_it(git: GitClient, repo: Path, base_url: str, tmp_path: Path):
    await git.run("clone", url(base_url), str(tmp_path / "pusher"))
    await git.run("clone", url(base_url), str(tmp_path / "puller"))
    pusher = tmp_path / "pusher"
    (pusher / "new.txt").write_text("new\n")
    git.sync("add", "new.txt", cwd=pusher)
    git.sync("commit", "-q", "-m", "pushed", cwd=pusher)
    await git.run("push", "origin", "main", cwd=pusher)
    pushed = git.sync("rev-parse", "HEAD", cwd=pusher).strip()
    assert git.sync("rev-parse", "refs/heads/main", cwd=repo).strip() == pushed
    assert git.sync("fsck", "--strict", cwd=repo) == ""

    puller = tmp_path / "puller"
    await git.run("fetch", "origin", cwd=puller)
    assert git.sync("rev-parse", "origin/main", cwd=puller).strip() == pushed
    await git.run("pull", "--ff-only", "origin", "main", cwd=puller)
    assert (puller / "new.txt").read_text() == "new\n"


@pytest.mark.gen_test(timeout=20)
async def test_push_new_branch_and_delete_it(git: GitClient, repo: Path, base_url: str, tmp_path: Path):
    work = tmp_path / "work"
    await git.run("clone", url(base_url), str(work))
    await git.run("push", "origin", "main:refs/heads/feature", cwd=work)
    assert "refs/heads/feature" in git.sync("for-each-ref", cwd=repo)
    await git.run("push", "origin", ":refs/heads/feature", cwd=work)
    assert "refs/heads/feature" not in git.sync("for-each-ref", cwd=repo)


@pytest.mark.gen_test(timeout=20)
async def test_shallow_clone(git: GitClient, repo: Path, base_url: str, tmp_path: Path):
    await git.run("clone", "--depth", "1", url(base_url), str(tmp_path / "shallow"))
    count = git.sync("rev-list", "--count", "HEAD", cwd=tmp_path / "shallow").strip()
    assert count == "1"
    assert (tmp_path / "shallow" / ".git" / "shallow").exists()


@pytest.mark.gen_test(timeout=20)
@pytest.mark.parametrize("version", ["0", "2"])
async def test_partial_clone_fetches_blobs_lazily(
    git: GitClient, gitbase: Path, base_url: str, tmp_path: Path, version: str
):
    make_repo(git, gitbase, "big.git", commits=4)
    clone = tmp_path / "partial"
    await git.run(
        "-c",
        f"protocol.version={version}",
        "clone",
        "--no-checkout",
        "--filter=blob:none",
        url(base_url, "big.git"),
        str(clone),
    )
    missing = git.sync("rev-list", "--objects", "--missing=print", "HEAD", cwd=clone)
    assert sum(line.startswith("?") for line in missing.splitlines()) == 4  # no blob came along
    # The checkout has to fetch the blobs it needs from the server, lazily.
    await git.run("-c", f"protocol.version={version}", "checkout", "main", cwd=clone)
    assert (clone / "file3.txt").read_text() == "content 3\n" * 4


@pytest.mark.gen_test(timeout=20)
async def test_advertisement_format_v0_and_v2(http_client, repo: Path, base_url: str):
    v0 = await http_client.fetch(url(base_url) + "/info/refs?service=git-upload-pack")
    assert v0.headers["Content-Type"] == "application/x-git-upload-pack-advertisement"
    assert v0.body.startswith(b"001e# service=git-upload-pack\n0000")
    assert "no-cache" in v0.headers["Cache-Control"]
    v2 = await http_client.fetch(
        url(base_url) + "/info/refs?service=git-upload-pack", headers={"Git-Protocol": "version=2"}
    )
    assert v2.body.startswith(b"000eversion 2\n")
    # receive-pack has no protocol v2; it keeps the service line whatever the client asks.
    push = await http_client.fetch(
        url(base_url) + "/info/refs?service=git-receive-pack", headers={"Git-Protocol": "version=2"}
    )
    assert push.body.startswith(b"001f# service=git-receive-pack\n0000")
    assert push.headers["Content-Type"] == "application/x-git-receive-pack-advertisement"


@pytest.mark.gen_test(timeout=20)
async def test_upload_archive_with_a_raw_request(
    http_client, git: GitClient, repo: Path, base_url: str, tmp_path: Path
):
    git.sync("config", "http.uploadarchive", "true", cwd=repo)  # anonymous users need it, as in http-backend

    def pkt(text: str) -> bytes:
        return b"%04x" % (len(text) + 4) + text.encode()

    body = pkt("argument --format=tar\n") + pkt("argument main\n") + b"0000"
    response = await http_client.fetch(
        url(base_url) + "/git-upload-archive",
        method="POST",
        body=body,
        headers={"Content-Type": "application/x-git-upload-archive-request"},
    )
    assert response.headers["Content-Type"] == "application/x-git-upload-archive-result"
    assert response.body.startswith(b"0008ACK\n0000")
    # The rest is side-band: channel 1 carries the tar stream.
    data, rest = b"", response.body[len(b"0008ACK\n0000") :]
    while rest[:4] not in (b"", b"0000"):
        length = int(rest[:4], 16)
        if rest[4:5] == b"\x01":
            data += rest[5:length]
        rest = rest[length:]
    (tmp_path / "out.tar").write_bytes(data)
    import tarfile

    with tarfile.open(tmp_path / "out.tar") as tar:
        assert sorted(tar.getnames()) == ["file0.txt", "file1.txt"]


@pytest.mark.gen_test(timeout=20)
async def test_service_switches_in_repository_config(
    git: GitClient, repo: Path, base_url: str, tmp_path: Path
):
    git.sync("config", "http.uploadpack", "false", cwd=repo)
    refused = await git.run("clone", url(base_url), str(tmp_path / "a"), check=False)
    assert refused.returncode != 0 and "403" in refused.stderr
    git.sync("config", "http.uploadpack", "true", cwd=repo)
    git.sync("config", "http.receivepack", "false", cwd=repo)
    await git.run("clone", url(base_url), str(tmp_path / "b"))
    push = await git.run("push", "origin", "main:refs/heads/x", cwd=tmp_path / "b", check=False)
    assert push.returncode != 0 and "403" in push.stderr
    assert "refs/heads/x" not in git.sync("for-each-ref", cwd=repo)


@pytest.mark.gen_test(timeout=20)
async def test_allowfilter_off_in_repository_config_is_respected(
    http_client, git: GitClient, repo: Path, base_url: str
):
    on = await http_client.fetch(url(base_url) + "/info/refs?service=git-upload-pack")
    assert b" filter " in on.body
    git.sync("config", "uploadpack.allowFilter", "false", cwd=repo)
    off = await http_client.fetch(url(base_url) + "/info/refs?service=git-upload-pack")
    assert b" filter " not in off.body


@pytest.mark.gen_test(timeout=20)
async def test_hooks_see_http_backend_environment(git: GitClient, repo: Path, base_url: str, tmp_path: Path):
    hook = repo / "hooks" / "post-receive"
    record = tmp_path / "env.txt"
    hook.write_text(f'#!/bin/sh\necho "$REMOTE_ADDR|$GIT_COMMITTER_NAME|$GIT_COMMITTER_EMAIL" > {record}\n')
    hook.chmod(0o755)
    await git.run("clone", url(base_url), str(tmp_path / "w"))
    await git.run("push", "origin", "main:refs/heads/hooked", cwd=tmp_path / "w")
    assert record.read_text().strip() == "127.0.0.1|anonymous|anonymous@http.127.0.0.1"
