"""The dumb protocol: GIT_SMART_HTTP=0 clients, generated ref and pack lists, plain files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import GitClient, make_repo
from tornado.httpclient import HTTPClientError

DUMB = {"GIT_SMART_HTTP": "0"}


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "loose"])
async def test_dumb_clone(git: GitClient, repo: Path, base_url: str, tmp_path: Path, packed: bool):
    git.sync("tag", "-a", "-m", "release", "v1", "main", cwd=repo)
    if packed:
        git.sync("gc", "-q", "--prune=now", cwd=repo)
        assert not list((repo / "objects").glob("??/*"))
    else:
        assert not list((repo / "objects" / "pack").glob("*.pack"))
    # gc wrote info/refs and objects/info/packs; remove them to prove both are generated live.
    for stale in (repo / "info" / "refs", repo / "objects" / "info" / "packs"):
        stale.unlink(missing_ok=True)
    result = await git.run(
        "clone", f"{base_url}/proj.git", str(tmp_path / "c"), env={**DUMB, "GIT_CURL_VERBOSE": "1"}
    )
    assert "git-upload-pack" not in result.stderr  # really the dumb protocol
    assert (tmp_path / "c" / "file1.txt").exists()
    tags = git.sync("tag", "-l", cwd=tmp_path / "c").split()
    assert tags == ["v1"]
    assert git.sync("fsck", cwd=tmp_path / "c") == ""


@pytest.mark.gen_test(timeout=30)
async def test_dumb_info_refs_lists_peeled_tags(http_client, git: GitClient, repo: Path, base_url: str):
    git.sync("tag", "-a", "-m", "release", "v1", "main", cwd=repo)
    response = await http_client.fetch(f"{base_url}/proj.git/info/refs")
    tag = git.sync("rev-parse", "v1", cwd=repo).strip()
    commit = git.sync("rev-parse", "v1^{}", cwd=repo).strip()
    assert response.body.decode().splitlines() == [
        f"{commit}\trefs/heads/main",
        f"{tag}\trefs/tags/v1",
        f"{commit}\trefs/tags/v1^{{}}",
    ]
    assert "no-cache" in response.headers["Cache-Control"]


@pytest.mark.gen_test(timeout=30)
async def test_pack_files_cache_forever_and_support_ranges(
    http_client, git: GitClient, repo: Path, base_url: str
):
    git.sync("gc", "-q", cwd=repo)
    packs = await http_client.fetch(f"{base_url}/proj.git/objects/info/packs")
    (name,) = [line[2:] for line in packs.body.decode().splitlines() if line]
    pack_path = repo / "objects" / "pack" / name
    pack_url = f"{base_url}/proj.git/objects/pack/{name}"
    whole = await http_client.fetch(pack_url)
    assert whole.body == pack_path.read_bytes()
    assert whole.headers["Content-Type"] == "application/x-git-packed-objects"
    assert "immutable" in whole.headers["Cache-Control"]
    part = await http_client.fetch(pack_url, headers={"Range": "bytes=4-11"})
    assert part.code == 206
    assert part.body == pack_path.read_bytes()[4:12]
    idx = await http_client.fetch(pack_url[: -len(".pack")] + ".idx")
    assert idx.headers["Content-Type"] == "application/x-git-packed-objects-toc"
    head = await http_client.fetch(f"{base_url}/proj.git/HEAD")
    assert head.body == b"ref: refs/heads/main\n"
    assert "no-cache" in head.headers["Cache-Control"]


@pytest.mark.gen_test(timeout=30)
async def test_sha256_loose_objects_are_served(
    http_client, git: GitClient, gitbase: Path, base_url: str, tmp_path: Path
):
    work = tmp_path / "sha256work"
    git.sync("init", "-q", "--object-format=sha256", "-b", "main", str(work))
    (work / "a.txt").write_text("sha256\n")
    git.sync("add", ".", cwd=work)
    git.sync("commit", "-q", "-m", "one", cwd=work)
    git.sync("clone", "-q", "--bare", str(work), str(gitbase / "modern.git"))
    oid = git.sync("rev-parse", "HEAD", cwd=work).strip()
    assert len(oid) == 64
    loose = gitbase / "modern.git" / "objects" / oid[:2] / oid[2:]
    if not loose.exists():
        git.sync("unpack-objects", "-q", cwd=gitbase / "modern.git")  # pragma: no cover
    response = await http_client.fetch(f"{base_url}/modern.git/objects/{oid[:2]}/{oid[2:]}")
    assert response.headers["Content-Type"] == "application/x-git-loose-object"
    assert response.body == loose.read_bytes()


@pytest.mark.gen_test(timeout=30)
async def test_getanyfile_off_refuses_dumb_files(http_client, git: GitClient, repo: Path, base_url: str):
    git.sync("config", "http.getanyfile", "false", cwd=repo)
    for path in ("info/refs", "HEAD", "objects/info/packs"):
        with pytest.raises(HTTPClientError) as error:
            await http_client.fetch(f"{base_url}/proj.git/{path}")
        assert error.value.code == 403
    # The smart protocol is unaffected.
    smart = await http_client.fetch(f"{base_url}/proj.git/info/refs?service=git-upload-pack")
    assert smart.code == 200


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize(
    "path",
    [
        "config",
        "hooks/pre-receive",
        "description",
        "objects/info/commit-graph",
        "packed-refs",
        "refs/heads/main",
        "objects/pack/pack-123.pack",
        "info/refs/extra",
    ],
)
async def test_everything_else_in_a_repository_is_404(http_client, repo: Path, base_url: str, path: str):
    with pytest.raises(HTTPClientError) as error:
        await http_client.fetch(f"{base_url}/proj.git/{path}")
    assert error.value.code == 404
    assert error.value.response.body.startswith(b"404 ")


@pytest.mark.gen_test(timeout=30)
async def test_symlinked_file_leading_out_is_not_served(
    http_client, repo: Path, base_url: str, tmp_path: Path
):
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret\n")
    os.symlink(secret, repo / "objects" / "info" / "alternates")
    with pytest.raises(HTTPClientError) as error:
        await http_client.fetch(f"{base_url}/proj.git/objects/info/alternates")
    assert error.value.code in (403, 404)
    assert b"top secret" not in (error.value.response.body or b"")


@pytest.mark.gen_test(timeout=30)
async def test_alternates_are_served(http_client, git: GitClient, gitbase: Path, repo: Path, base_url: str):
    make_repo(git, gitbase, "fork.git")
    (gitbase / "fork.git" / "objects" / "info" / "http-alternates").write_text("/proj.git/objects\n")
    response = await http_client.fetch(f"{base_url}/fork.git/objects/info/http-alternates")
    assert response.body == b"/proj.git/objects\n"
