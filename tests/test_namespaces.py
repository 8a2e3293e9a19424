"""One directory, many repositories: an embedder's lookup serves git namespaces (gitnamespaces(7)).

The namespace comes from the lookup, never from the request, and applies to smart and dumb answers alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import pytest
from conftest import GitClient, make_repo

from gittornado import GitBackend, OpenPolicy, Repository


@pytest.fixture
def backend(gitbase: Path) -> GitBackend:
    shared = str(gitbase / "shared.git")

    def lookup(name: str) -> Optional[Repository]:
        """``alpha`` and ``beta`` are namespaces of one directory; ``shared`` is the directory itself."""
        if name in ("alpha", "beta"):
            return Repository(name=name, path=shared, namespace=name)
        if name == "shared":
            return Repository(name=name, path=shared)
        return None

    return GitBackend(lookup=lookup, policy=OpenPolicy())


@pytest.mark.gen_test(timeout=60)
async def test_each_namespace_is_a_repository_of_its_own(
    git: GitClient, gitbase: Path, base_url: str, tmp_path: Path
):
    shared = make_repo(git, gitbase, "shared.git", commits=0)
    source = make_repo(git, gitbase.parent, "source.git", commits=3, bare=False)
    await git.run("push", "-q", f"{base_url}/alpha", "main", cwd=source)
    await git.run("push", "-q", f"{base_url}/beta", "HEAD~1:refs/heads/main", cwd=source)
    # The refs landed inside each namespace, not at the top.
    refs = git.sync("for-each-ref", "--format=%(refname)", cwd=shared).split()
    assert refs == ["refs/namespaces/alpha/refs/heads/main", "refs/namespaces/beta/refs/heads/main"]
    alpha = "refs/namespaces/alpha/"
    git.sync("symbolic-ref", f"{alpha}HEAD", f"{alpha}refs/heads/main", cwd=shared)

    head = git.sync("rev-parse", "HEAD", cwd=source).strip()
    parent = git.sync("rev-parse", "HEAD~1", cwd=source).strip()
    for protocol in ("0", "2"):
        version = f"protocol.version={protocol}"
        listed = (await git.run("-c", version, "ls-remote", f"{base_url}/alpha")).stdout
        assert "refs/namespaces" not in listed and f"{head}\trefs/heads/main" in listed
        other = (await git.run("-c", version, "ls-remote", f"{base_url}/beta")).stdout
        assert f"{parent}\trefs/heads/main" in other and head not in other
    clone = tmp_path / "alpha"
    await git.run("clone", "-q", f"{base_url}/alpha", str(clone))
    assert git.sync("rev-parse", "HEAD", cwd=clone).strip() == head

    # The dumb protocol sees the same: refs and HEAD named inside the namespace.
    dumb = tmp_path / "alpha-dumb"
    await git.run("clone", "-q", f"{base_url}/alpha", str(dumb), env={"GIT_SMART_HTTP": "0"})
    assert git.sync("rev-parse", "HEAD", cwd=dumb).strip() == head
    assert git.sync("symbolic-ref", "HEAD", cwd=dumb).strip() == "refs/heads/main"
