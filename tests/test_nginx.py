"""gittornado behind real nginx configured by examples/nginx.conf, and the options a proxy needs.

nginx terminates TLS and forwards /git/ to ``gittornado --prefix /git
--xheaders``; every git operation goes through it with the real git client.
"""

from __future__ import annotations

import http.client
from dataclasses import dataclass
from pathlib import Path
from typing import List

import pytest
from conftest import require_program
from deploy_helpers import (
    Gittornado,
    Service,
    Services,
    add_remote_addr_hook,
    commit_and_push,
    free_port,
    init_bare,
    push_big,
)


@pytest.fixture(autouse=True)
def _nginx_installed() -> None:
    require_program("nginx", "nginx")


@dataclass
class NginxDeployment:
    """gittornado behind nginx: ``url`` is the HTTPS base URL of the repositories."""

    url: str
    http_port: int
    trust: List[str]
    nginx: Service
    gittornado: Gittornado


@pytest.fixture
def deployment(services: Services, gitbase: Path, certificate) -> NginxDeployment:
    server = services.gittornado(gitbase, "--prefix", "/git", "--xheaders")
    http_port, https_port = free_port(), free_port()
    cert, key = certificate
    nginx = services.nginx(
        "nginx.conf",
        {
            "server 127.0.0.1:8080;": f"server 127.0.0.1:{server.port};",
            "listen 80;": f"listen 127.0.0.1:{http_port};",
            "listen 443 ssl;": f"listen 127.0.0.1:{https_port} ssl;",
            "/etc/letsencrypt/live/git.example.com/fullchain.pem": str(cert),
            "/etc/letsencrypt/live/git.example.com/privkey.pem": str(key),
        },
        ports=[http_port, https_port],
    )
    url = f"https://127.0.0.1:{https_port}/git"
    return NginxDeployment(url, http_port, ["-c", f"http.sslCAInfo={cert}"], nginx, server)


@pytest.mark.gen_test(timeout=60)
async def test_clone_fetch_v2_and_push_through_nginx(git, repo, tmp_path, deployment):
    trust = deployment.trust
    await git.run(*trust, "clone", "-q", f"{deployment.url}/proj.git", str(tmp_path / "a"))
    await git.run(*trust, "clone", "-q", f"{deployment.url}/proj.git", str(tmp_path / "b"))
    pushed = await commit_and_push(git, tmp_path / "a", trust)
    fetch = await git.run(
        *trust, "-c", "protocol.version=2", "fetch", cwd=tmp_path / "b", env={"GIT_TRACE_PACKET": "1"}
    )
    assert "< version 2" in fetch.stderr
    assert (await git.run("rev-parse", "origin/main", cwd=tmp_path / "b")).stdout.strip() == pushed


def test_plain_http_redirects_to_https(deployment):
    connection = http.client.HTTPConnection("127.0.0.1", deployment.http_port, timeout=10)
    connection.request("GET", "/git/proj.git/info/refs?service=git-upload-pack")
    response = connection.getresponse()
    assert response.status == 301
    assert (
        response.getheader("Location") == "https://127.0.0.1/git/proj.git/info/refs?service=git-upload-pack"
    )


@pytest.mark.transfer
@pytest.mark.gen_test(timeout=300)
async def test_300mb_chunked_push_streams_through_nginx(git, gitbase, big_repo, tmp_path, deployment):
    target = init_bare(gitbase / "big.git")
    seconds = await push_big(git, big_repo, f"{deployment.url}/big.git", target, tmp_path, deployment.trust)
    print(f"300 MB push through nginx (TLS): {seconds:.1f}s")
    assert "POST /git/big.git/git-receive-pack HTTP/1.1 200 te=chunked" in deployment.nginx.read("access.log")
    # With request buffering on, nginx would have spooled the body to disk and said so.
    assert "buffered to a temporary file" not in deployment.nginx.read("error.log")


@pytest.mark.gen_test(timeout=60)
async def test_nginx_sets_the_client_address_a_client_cannot_fake(git, repo, tmp_path, deployment):
    seen = add_remote_addr_hook(repo, tmp_path)
    fake = [
        "-c",
        "http.extraHeader=X-Real-IP: 203.0.113.9",
        "-c",
        "http.extraHeader=X-Forwarded-For: 203.0.113.8",
    ]
    await git.run(*deployment.trust, "clone", "-q", f"{deployment.url}/proj.git", str(tmp_path / "w"))
    await commit_and_push(git, tmp_path / "w", [*deployment.trust, *fake])
    assert seen.read_text().strip() == "127.0.0.1"


# gittornado's own side of a proxy: --xheaders and --prefix, without a proxy.


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("xheaders", [True, False])
async def test_xheaders_decides_whose_address_git_hooks_see(git, repo, tmp_path, services, gitbase, xheaders):
    server = services.gittornado(gitbase, *(["--xheaders"] if xheaders else []))
    seen = add_remote_addr_hook(repo, tmp_path)
    await git.run("clone", "-q", f"{server.url}/proj.git", str(tmp_path / "w"))
    await commit_and_push(git, tmp_path / "w", ["-c", "http.extraHeader=X-Forwarded-For: 198.51.100.7"])
    assert seen.read_text().strip() == ("198.51.100.7" if xheaders else "127.0.0.1")


@pytest.mark.gen_test(timeout=60)
async def test_prefix_serves_repositories_under_it_only(git, repo, tmp_path, services, gitbase):
    server = services.gittornado(gitbase, "--prefix", "git/", may_push=False)
    assert server.url == f"http://127.0.0.1:{server.port}/git"
    await git.run("clone", "-q", f"{server.url}/proj.git", str(tmp_path / "clone"))
    outside = await git.run("ls-remote", f"http://127.0.0.1:{server.port}/proj.git", check=False)
    assert outside.returncode != 0 and "not found" in outside.stderr


def test_bad_prefix_is_refused(services, gitbase):
    with pytest.raises(AssertionError, match="not a URL path"):
        services.gittornado(gitbase, "--prefix", "/git/../etc")
