"""HTTPS served by gittornado itself (--certfile, --keyfile), with a certificate made for the test."""

from __future__ import annotations

import pytest
from deploy_helpers import commit_and_push, init_bare, push_big


@pytest.fixture
def https_server(services, gitbase, certificate):
    cert, key = certificate
    return services.gittornado(gitbase, "--certfile", str(cert), "--keyfile", str(key))


@pytest.fixture
def trust(certificate):
    """git options that trust the test's certificate."""
    return ["-c", f"http.sslCAInfo={certificate[0]}"]


def test_startup_line_announces_https(https_server):
    assert https_server.url == f"https://127.0.0.1:{https_server.port}"


@pytest.mark.gen_test(timeout=60)
async def test_clone_fetch_and_push_over_https(git, repo, tmp_path, https_server, trust):
    url = f"{https_server.url}/proj.git"
    await git.run(*trust, "clone", "-q", url, str(tmp_path / "a"))
    await git.run(*trust, "clone", "-q", url, str(tmp_path / "b"))
    pushed = await commit_and_push(git, tmp_path / "a", trust)
    await git.run(*trust, "-c", "protocol.version=2", "fetch", "-q", cwd=tmp_path / "b")
    assert (await git.run("rev-parse", "origin/main", cwd=tmp_path / "b")).stdout.strip() == pushed


@pytest.mark.gen_test(timeout=60)
async def test_untrusted_certificate_is_refused_by_git(git, repo, https_server):
    result = await git.run("ls-remote", f"{https_server.url}/proj.git", check=False)
    assert result.returncode != 0
    assert "certificate" in result.stderr.lower()


@pytest.mark.gen_test(timeout=60)
async def test_plain_http_to_the_https_port_gets_nothing(git, repo, https_server):
    result = await git.run("ls-remote", f"http://127.0.0.1:{https_server.port}/proj.git", check=False)
    assert result.returncode != 0


@pytest.mark.transfer
@pytest.mark.gen_test(timeout=300)
async def test_300mb_chunked_push_over_https(git, gitbase, big_repo, tmp_path, https_server, trust):
    target = init_bare(gitbase / "big.git")
    seconds = await push_big(git, big_repo, f"{https_server.url}/big.git", target, tmp_path, trust)
    print(f"300 MB push over TLS (gittornado's own): {seconds:.1f}s")


def test_key_without_certificate_is_refused(services, gitbase, certificate):
    with pytest.raises(AssertionError, match="--keyfile needs --certfile"):
        services.gittornado(gitbase, "--keyfile", str(certificate[1]))


def test_unreadable_certificate_stops_the_command(services, gitbase, tmp_path):
    with pytest.raises(AssertionError, match="cannot use certificate"):
        services.gittornado(gitbase, "--certfile", str(tmp_path / "missing.pem"))
