"""More than one process: --processes workers, instances behind nginx, and the systemd unit.

Two topologies serve one repository root: ``gittornado --processes 2`` (workers
share one socket) and two separate instances behind nginx configured by
examples/nginx-loadbalance.conf (as two hosts on shared storage would be).  In
both, git's own ref locking has to keep concurrent pushes correct.
"""

from __future__ import annotations

import asyncio
import configparser
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import pytest
from conftest import require_program
from deploy_helpers import (
    EXAMPLES,
    Gittornado,
    Service,
    Services,
    children_of,
    free_port,
    init_bare,
    processes_naming,
    push_big,
)

CLIENTS = 8


def wait_for(predicate, timeout: float = 15.0) -> bool:
    """Poll ``predicate`` (blocking; these tests have no server on their loop) until true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


def workers_of(server: Gittornado, count: int) -> List[int]:
    """The worker pids of a ``--processes`` server, once ``count`` of them run."""
    assert wait_for(lambda: len(children_of(server.proc.pid)) == count), children_of(server.proc.pid)
    return sorted(children_of(server.proc.pid))


def reloaded(server: Gittornado, pid: int) -> bool:
    """Whether worker ``pid`` logged that it re-read the access file (as SIGHUP makes it)."""
    return re.search(rf"\[{pid}\]: .*access rules loaded", server.read()) is not None


@pytest.mark.gen_test(timeout=60)
async def test_killed_worker_is_replaced(git, repo, services, gitbase):
    server = services.gittornado(gitbase, "--processes", "2")
    assert "2 worker processes" in server.read()
    first, second = workers_of(server, 2)
    os.kill(first, signal.SIGKILL)
    assert wait_for(
        lambda: first not in children_of(server.proc.pid) and len(children_of(server.proc.pid)) == 2
    )
    assert second in children_of(server.proc.pid)
    assert "was killed by signal 9; starting a new one" in server.read()
    for _ in range(4):  # whichever worker accepts, it answers
        await git.run("ls-remote", f"{server.url}/proj.git")


@pytest.mark.gen_test(timeout=60)
async def test_sigterm_to_the_parent_stops_every_process(git, repo, services, gitbase, tmp_path):
    server = services.gittornado(gitbase, "--processes", "3")
    workers = workers_of(server, 3)
    await git.run("clone", "-q", f"{server.url}/proj.git", str(tmp_path / "clone"))
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(15) == 0
    assert processes_naming(str(gitbase)) == []
    assert all(f"(pid {pid}) exited" in server.read() for pid in workers)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()


@pytest.mark.gen_test(timeout=60)
async def test_sighup_to_the_parent_reloads_every_worker(git, repo, services, gitbase):
    server = services.gittornado(gitbase, "--processes", "2")
    workers = workers_of(server, 2)
    server.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: all(reloaded(server, pid) for pid in workers)), server.read()
    assert workers_of(server, 2) == workers  # reloaded, not restarted
    await git.run("ls-remote", f"{server.url}/proj.git")


@dataclass
class Topology:
    """Two gittornado processes over one root: ``url`` is where clients push."""

    url: str
    instances: List[Gittornado]
    balancer: Optional[Service] = None


@pytest.fixture(params=["processes", "balanced"])
def topology(request, services: Services, gitbase: Path) -> Topology:
    if request.param == "processes":
        server = services.gittornado(gitbase, "--processes", "2")
        workers_of(server, 2)
        return Topology(server.url, [server])
    require_program("nginx", "nginx")
    first = services.gittornado(gitbase, "--prefix", "/git", "--xheaders")
    second = services.gittornado(gitbase, "--prefix", "/git", "--xheaders")
    port = free_port()
    nginx = services.nginx(
        "nginx-loadbalance.conf",
        {
            "server 10.0.0.11:8080 ": f"server 127.0.0.1:{first.port} ",
            "server 10.0.0.12:8080 ": f"server 127.0.0.1:{second.port} ",
            "listen 80;": f"listen 127.0.0.1:{port};",
        },
        ports=[port],
    )
    return Topology(f"http://127.0.0.1:{port}/git", [first, second], nginx)


async def prepare_clients(git, repo: Path, tmp_path: Path, url: str) -> List[Path]:
    """``CLIENTS`` clones of ``repo``, each with its own new commit on main, remote ``url``."""
    clones = []
    for index in range(CLIENTS):
        work = tmp_path / f"client{index}"
        await git.run("clone", "-q", str(repo), str(work))
        await git.run("remote", "set-url", "origin", url, cwd=work)
        (work / f"client{index}.txt").write_text(f"from client {index}\n")
        await git.run("add", ".", cwd=work)
        await git.run("commit", "-q", "-m", f"client {index}", cwd=work)
        clones.append(work)
    return clones


async def head(git, work: Path) -> str:
    return (await git.run("rev-parse", "HEAD", cwd=work)).stdout.strip()


def assert_fsck_clean(git, repo: Path) -> None:
    """No missing or corrupt object, no broken link; the losers' unreferenced commits may stay."""
    assert git.sync("fsck", "--no-progress", "--no-dangling", cwd=repo) == ""


def assert_each_instance_took_pushes(topology: Topology) -> None:
    """Behind the balancer, both instances really received pushes (round robin)."""
    if topology.balancer is None:
        return
    pushes = [line for line in topology.balancer.read("access.log").splitlines() if "POST " in line]
    for instance in topology.instances:
        assert any(f"upstream=127.0.0.1:{instance.port}" in line for line in pushes), pushes


@pytest.mark.gen_test(timeout=120)
async def test_concurrent_pushes_to_one_branch_exactly_one_wins(git, repo, tmp_path, topology):
    clones = await prepare_clients(git, repo, tmp_path, f"{topology.url}/proj.git")
    results = await asyncio.gather(
        *(git.run("push", "origin", "HEAD:main", cwd=work, check=False) for work in clones)
    )
    winners = [work for work, result in zip(clones, results) if result.returncode == 0]
    assert len(winners) == 1, [r.stderr for r in results]
    for result in results:
        if result.returncode != 0:
            # Rejected by the client (it saw the winner's commit: not a fast-forward) or by
            # git on the server (the ref moved after it was advertised: lock check failed).
            assert re.search(r"\[rejected\]|\[remote rejected\]|failed to update ref", result.stderr), (
                result.stderr
            )
    assert git.sync("rev-parse", "main", cwd=repo).strip() == await head(git, winners[0])
    assert_fsck_clean(git, repo)
    assert_each_instance_took_pushes(topology)


@pytest.mark.gen_test(timeout=120)
async def test_concurrent_pushes_to_different_branches_all_land(git, repo, tmp_path, topology):
    clones = await prepare_clients(git, repo, tmp_path, f"{topology.url}/proj.git")
    results = await asyncio.gather(
        *(
            git.run("push", "origin", f"HEAD:branch{i}", cwd=work, check=False)
            for i, work in enumerate(clones)
        )
    )
    assert [r.returncode for r in results] == [0] * CLIENTS, [r.stderr for r in results]
    for index, work in enumerate(clones):
        assert git.sync("rev-parse", f"branch{index}", cwd=repo).strip() == await head(git, work)
    assert_fsck_clean(git, repo)
    assert_each_instance_took_pushes(topology)


@pytest.mark.transfer
@pytest.mark.gen_test(timeout=300)
async def test_300mb_chunked_push_to_several_processes(git, gitbase, big_repo, tmp_path, services):
    server = services.gittornado(gitbase, "--processes", "2")
    target = init_bare(gitbase / "big.git")
    seconds = await push_big(git, big_repo, f"{server.url}/big.git", target, tmp_path)
    print(f"300 MB push to --processes 2: {seconds:.1f}s")


# The systemd unit: run its command line, then reload and stop it as systemd would.


@pytest.fixture
def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # keys are case-sensitive in systemd
    parser.read(EXAMPLES / "gittornado.service")
    return parser


def test_unit_passes_systemd_analyze(tmp_path):
    analyze = require_program("systemd-analyze", "systemd")
    text = (EXAMPLES / "gittornado.service").read_text()
    copy = tmp_path / "gittornado.service"
    copy.write_text(text.replace("/opt/gittornado/bin/gittornado", shutil.which("gittornado")))
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == "", result.stderr


@pytest.mark.gen_test(timeout=90)
async def test_unit_command_serves_reloads_and_stops_gracefully(git, repo, tmp_path, services, gitbase, unit):
    service = unit["Service"]
    assert service["KillMode"] == "mixed" and service["Restart"] == "on-failure"
    argv = shlex.split(service["ExecStart"])
    assert argv[0].endswith("/gittornado")
    replacements = {
        "8080": "0",
        "/srv/git": str(gitbase),
        "/etc/gittornado/users.ini": str(services.access_file),
    }
    server = services.gittornado_command(*(replacements.get(arg, arg) for arg in argv[1:]))
    assert server.url == f"http://127.0.0.1:{server.port}/git"
    workers = workers_of(server, os.cpu_count() or 1)
    await git.run("clone", "-q", f"{server.url}/proj.git", str(tmp_path / "clone"))

    reload = shlex.split(service["ExecReload"].replace("$MAINPID", str(server.proc.pid)))
    subprocess.run(reload, check=True)
    assert wait_for(lambda: all(reloaded(server, pid) for pid in workers)), server.read()
    await git.run("ls-remote", f"{server.url}/proj.git")

    # systemctl stop with KillMode=mixed: SIGTERM to the main process only.
    server.proc.send_signal(signal.SIGTERM)
    grace = int(service["TimeoutStopSec"])
    assert server.proc.wait(grace) == 0
    assert processes_naming(str(gitbase)) == []


@pytest.mark.gen_test(timeout=60)
async def test_every_scrape_counts_every_worker(repo, services, gitbase):
    """With --processes, /metrics answers with the totals of all workers, whichever answers."""
    from tornado.httpclient import AsyncHTTPClient

    server = services.gittornado(gitbase, "--processes", "2", "--metrics")
    first, second = workers_of(server, 2)
    client = AsyncHTTPClient(force_instance=True)  # a new connection per request: any worker may accept
    url = f"{server.url}/proj.git/info/refs?service=git-upload-pack"
    await asyncio.gather(*(client.fetch(url) for _ in range(40)))
    assert wait_for(lambda: server.read().count("service=info/refs:git-upload-pack") == 40)
    served_by = set(re.findall(r"\[(\d+)\]: .*service=info/refs:git-upload-pack", server.read()))
    assert served_by == {str(first), str(second)}, "both workers should have served some"
    line = 'gittornado_requests_total{service="info/refs:git-upload-pack",status="200"} 40.0'
    for _ in range(6):
        assert line in (await client.fetch(f"{server.url}/metrics")).body.decode()
    # A worker that dies takes its gauges along, but its counts stay in the totals.
    os.kill(first, signal.SIGKILL)
    assert wait_for(lambda: first not in children_of(server.proc.pid))
    workers_of(server, 2)  # and its replacement runs
    for _ in range(4):
        metrics = (await client.fetch(f"{server.url}/metrics")).body.decode()
        assert line in metrics and "gittornado_git_processes 0.0" in metrics
    client.close()
