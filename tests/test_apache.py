"""gittornado behind real Apache httpd configured by examples/apache.conf.

Apache forwards /git/ to ``gittornado --prefix /git --xheaders``; the server
configuration around the example loads what Debian enables by default
(mod_deflate, mod_reqtimeout), so the example is tested where it will run.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

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
def _apache_installed() -> None:
    require_program("apache2", "apache2")


@dataclass
class ApacheDeployment:
    """gittornado behind Apache: ``url`` is the base URL of the repositories."""

    url: str
    apache: Service
    gittornado: Gittornado


@pytest.fixture
def deployment(services: Services, gitbase: Path) -> ApacheDeployment:
    server = services.gittornado(gitbase, "--prefix", "/git", "--xheaders")
    port = free_port()
    apache = services.apache(
        {
            "<VirtualHost *:80>": f"<VirtualHost 127.0.0.1:{port}>",
            " http://127.0.0.1:8080/git/ flushpackets": f" http://127.0.0.1:{server.port}/git/ flushpackets",
            "ProxyPassReverse /git/ http://127.0.0.1:8080/git/": (
                f"ProxyPassReverse /git/ http://127.0.0.1:{server.port}/git/"
            ),
        },
        port,
    )
    return ApacheDeployment(f"http://127.0.0.1:{port}/git", apache, server)


@pytest.mark.gen_test(timeout=60)
async def test_clone_fetch_v2_and_push_through_apache(git, repo, tmp_path, deployment):
    await git.run("clone", "-q", f"{deployment.url}/proj.git", str(tmp_path / "a"))
    await git.run("clone", "-q", f"{deployment.url}/proj.git", str(tmp_path / "b"))
    pushed = await commit_and_push(git, tmp_path / "a")
    fetch = await git.run(
        "-c", "protocol.version=2", "fetch", cwd=tmp_path / "b", env={"GIT_TRACE_PACKET": "1"}
    )
    assert "< version 2" in fetch.stderr
    assert (await git.run("rev-parse", "origin/main", cwd=tmp_path / "b")).stdout.strip() == pushed


@pytest.mark.gen_test(timeout=60)
async def test_dumb_http_text_is_not_compressed_by_apache(git, repo, tmp_path, deployment):
    # info/refs without ?service= is text/plain, which Debian's mod_deflate compresses;
    # the example opts out so nothing is held back.
    clone = await git.run(
        "-c", "protocol.version=0", "clone", "-q", f"{deployment.url}/proj.git", str(tmp_path / "c"),
        env={"GIT_SMART_HTTP": "0", "GIT_TRACE_CURL": str(tmp_path / "trace"), "GIT_TRACE_CURL_NO_DATA": "1"},
    )  # fmt: skip
    assert clone.returncode == 0
    assert "Content-Encoding" not in (tmp_path / "trace").read_text()


@pytest.mark.transfer
@pytest.mark.gen_test(timeout=300)
async def test_300mb_chunked_push_streams_through_apache(git, gitbase, big_repo, tmp_path, deployment):
    target = init_bare(gitbase / "big.git")
    seconds = await push_big(git, big_repo, f"{deployment.url}/big.git", target, tmp_path)
    print(f"300 MB push through Apache: {seconds:.1f}s")
    access_log = deployment.apache.read("access.log")
    assert "POST /git/big.git/git-receive-pack HTTP/1.1 200 te=chunked" in access_log


@pytest.mark.gen_test(timeout=60)
async def test_apache_sets_the_client_address_a_client_cannot_fake(git, repo, tmp_path, deployment):
    seen = add_remote_addr_hook(repo, tmp_path)
    fake = ["-c", "http.extraHeader=X-Real-IP: 203.0.113.9"]
    fake += ["-c", "http.extraHeader=X-Forwarded-For: 203.0.113.8"]
    await git.run("clone", "-q", f"{deployment.url}/proj.git", str(tmp_path / "w"))
    await commit_and_push(git, tmp_path / "w", fake)
    assert seen.read_text().strip() == "127.0.0.1"


def test_lfs_uploads_and_downloads_through_apache(repo: Path, tmp_path: Path, deployment):
    """Apache passes an upload on with its Content-Length (the example's proxy-sendchunked is for pushes),
    which gittornado needs to read an LFS body into its own buffers."""
    data = os.urandom(3_000_000)
    oid = hashlib.sha256(data).hexdigest()
    (tmp_path / "object").write_bytes(data)
    url = f"{deployment.url}/proj.git/info/lfs/objects/{oid}"
    put = curl("-T", str(tmp_path / "object"), url)
    assert put.stdout == "200", put.stderr
    assert (repo / "lfs" / "objects" / oid[:2] / oid[2:4] / oid).read_bytes() == data
    get = curl("-o", str(tmp_path / "back"), url)
    assert get.stdout == "200" and (tmp_path / "back").read_bytes() == data


def curl(*args: str) -> subprocess.CompletedProcess:
    """curl, printing the status code on stdout."""
    return subprocess.run(["curl", "-sS", "-w", "%{http_code}", *args], capture_output=True, text=True)
