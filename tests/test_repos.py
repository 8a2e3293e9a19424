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
    # Access rules see the real name, never the alias.
    assert resolve_repository(root, "alias").name == "inside.git"


def test_git_directories_inside_repositories_do_not_resolve(git: GitClient, gitbase: Path):
    work = make_repo(git, gitbase, "work", bare=False)
    bare = make_repo(git, gitbase, "proj.git")
    make_repo(git, gitbase, "work/sub/inner.git")  # in a work tree, however deep
    make_repo(git, gitbase, "proj.git/inner.git")  # in a git directory
    make_repo(git, work / ".git" / "modules", "sub")  # where git keeps submodules
    root = os.path.realpath(gitbase)
    for name in (
        "work/sub/inner.git",
        "work/sub/inner",
        "proj.git/inner.git",
        "proj/inner",
        "work/.git/modules/sub",
    ):
        assert resolve_repository(root, name) is None, name
    # The repositories themselves are served, a work tree under either of its names.
    assert resolve_repository(root, "proj").path == str(bare)
    assert resolve_repository(root, "work/.git") == resolve_repository(root, "work")
    assert resolve_repository(root, "work").name == "work"


def test_a_work_tree_is_served_from_its_git_directory_whatever_it_holds(git: GitClient, gitbase: Path):
    work = make_repo(git, gitbase, "work", bare=False)
    # Committed files that look like a git directory, at the top of the work tree.
    (work / "HEAD").write_text("ref: refs/heads/main\n")
    (work / "objects").mkdir()
    (work / "refs").mkdir()
    found = resolve_repository(os.path.realpath(gitbase), "work")
    assert found is not None and found.path == str(work / ".git")


def test_a_root_inside_a_work_tree_still_serves(git: GitClient, tmp_path: Path):
    """The root is the administrator's choice; only what lies below it is checked."""
    checkout = tmp_path / "etc-checkout"
    git.sync("init", "-q", str(checkout))
    make_repo(git, checkout, "proj.git")
    assert resolve_repository(os.path.realpath(checkout), "proj").name == "proj.git"
    assert resolve_repository(os.path.realpath(checkout), ".git") is None  # the root is no repository


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
