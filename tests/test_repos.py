"""Repository lookup: name forms, and that nothing outside the root is ever reachable."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import GitClient, make_repo, parse_response, raw_http

from gittornado.repos import resolve_repository


@pytest.fixture
def outside(git: GitClient, tmp_path: Path) -> Path:
    """A real repository next to the root: reaching it would be a traversal."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    return make_repo(git, elsewhere, "outside.git")


def test_name_forms_resolve(git: GitClient, gitbase: Path):
    make_repo(git, gitbase, "bare.git")
    make_repo(git, gitbase, "plain")  # a bare repository without the suffix
    make_repo(git, gitbase, "group/sub/deep.git")
    make_repo(git, gitbase, "work", bare=False)
    root = os.path.realpath(gitbase)
    assert resolve_repository(root, "bare").name == "bare.git"
    assert resolve_repository(root, "bare.git").path == str(gitbase / "bare.git")
    assert resolve_repository(root, "plain.git").name == "plain"
    assert resolve_repository(root, "group/sub/deep").name == "group/sub/deep.git"
    assert resolve_repository(root, "work.git").path == str(gitbase / "work" / ".git")
    assert resolve_repository(root, "missing") is None
    assert resolve_repository(root, "group") is None  # a directory, not a repository


@pytest.mark.parametrize(
    "name",
    [
        "../outside.git",
        "../outside",
        "group/../../outside.git",
        "/etc",
        "a//b",
        ".",
        "..",
        "proj.git\\..\\..\\outside.git",
        "proj\0.git",
        "x" * 2000,
        "",
    ],
    ids=lambda name: repr(name[:30]),
)
def test_bad_names_never_resolve(gitbase: Path, outside: Path, name: str):
    assert resolve_repository(os.path.realpath(gitbase), name) is None


def test_symlink_leading_out_does_not_resolve(gitbase: Path, outside: Path, git: GitClient):
    os.symlink(outside, gitbase / "escape.git")
    make_repo(git, gitbase, "inside.git")
    os.symlink(gitbase / "inside.git", gitbase / "alias.git")
    root = os.path.realpath(gitbase)
    assert resolve_repository(root, "escape.git") is None
    assert resolve_repository(root, "alias").path == str(gitbase / "inside.git")


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize(
    "path",
    [
        "/../outside.git/info/refs",
        "/%2e%2e/outside.git/info/refs",
        "/%2E%2E/outside.git/HEAD",
        "/..%2foutside.git/info/refs",
        "/proj.git/..%2f..%2foutside.git/info/refs",
        "//outside.git/info/refs",
        "/proj.git/%2e%2e/%2e%2e/outside.git/HEAD",
        "/..%5coutside.git/info/refs",
        "/proj.git%00/info/refs",
        "/escape.git/info/refs",
        "/escape.git/HEAD",
        "/escape.git/outside.git/info/refs",
        "/%ff%fe/info/refs",
    ],
)
async def test_traversal_attempts_answer_like_a_missing_repository(
    repo: Path, outside: Path, gitbase: Path, http_port: int, base_url: str, path: str
):
    os.symlink(outside.parent, gitbase / "escape.git")
    raw = await raw_http(
        http_port,
        f"GET {path}?service=git-upload-pack HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(),
    )
    status, _, body = parse_response(raw)
    assert status in (400, 404), raw[:200]
    assert b"refs/heads" not in body and b"ref:" not in body
    # The server keeps serving.
    ok = await raw_http(http_port, b"GET /proj.git/HEAD HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert parse_response(ok)[0] == 200
