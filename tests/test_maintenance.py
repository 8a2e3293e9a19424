"""Maintenance: what a run does to a repository, its lock, the scheduler after pushes,
``gittornado maintain``, and safety while clones and pushes go on (real git, real server)."""

from __future__ import annotations

import asyncio
import configparser
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest
from conftest import GitClient, make_repo, require_program

from gittornado import GitBackend, OpenPolicy, RepositoryRoot
from gittornado.maintenance import (
    BUSY,
    FAILED,
    FULL_STAMP,
    LOCK_NAME,
    OK,
    MaintenanceScheduler,
    MaintenanceSettings,
    maintain,
)
from gittornado.observe import Metrics
from gittornado.process import GitProcesses

DAY = 24 * 3600.0
WORKTREE = str(Path(__file__).resolve().parent.parent)
EXAMPLES = Path(WORKTREE) / "examples"


def commit(git: GitClient, work: Path, name: str, text: str) -> str:
    (work / name).write_text(text)
    git.sync("add", name, cwd=work)
    git.sync("commit", "-q", "-m", name, cwd=work)
    return git.sync("rev-parse", "HEAD", cwd=work).strip()


def exists(git: GitClient, repo: Path, oid: str) -> bool:
    return subprocess.run(["git", "--git-dir", str(repo), "cat-file", "-e", oid], env=git.env).returncode == 0


def age(path: Path, days: float) -> None:
    """Make ``path`` (and, for a directory, everything in it) ``days`` old."""
    when = time.time() - days * DAY
    for inner in [*path.rglob("*"), path] if path.is_dir() else [path]:
        os.utime(inner, (when, when))


def packs(repo: Path) -> List[Path]:
    return sorted((repo / "objects" / "pack").glob("*.pack"))


def test_run_repacks_indexes_and_prunes_only_what_is_older_than_the_grace(
    git: GitClient, gitbase: Path, tmp_path: Path
):
    repo = make_repo(git, gitbase, "proj.git")
    git.sync("config", "receive.unpackLimit", "1", cwd=repo)  # every push keeps a pack, as big pushes do
    work = tmp_path / "work"
    git.sync("clone", "-q", str(repo), str(work))
    for i in range(6):
        commit(git, work, f"f{i}", f"{i}\n")
        git.sync("push", "-q", "origin", "HEAD:main", cwd=work)
    # A secret pushed, then force-pushed away; its pack is three weeks old.
    secret = commit(git, work, "secret", "password\n")
    git.sync("push", "-q", "origin", "HEAD:refs/heads/oops", cwd=work)
    git.sync("push", "-q", "origin", ":refs/heads/oops", cwd=work)
    for pack in (repo / "objects" / "pack").iterdir():
        age(pack, 21)
    old_loose = git.sync("hash-object", "-w", "--stdin", cwd=repo, input="old unreachable\n").strip()
    young_loose = git.sync("hash-object", "-w", "--stdin", cwd=repo, input="young unreachable\n").strip()
    age(repo / "objects" / old_loose[:2] / old_loose[2:], 20)
    stale = repo / "objects" / "tmp_objdir-incoming-stale"
    (stale / "pack").mkdir(parents=True)
    (stale / "pack" / "tmp_pack_x").write_bytes(b"x")
    age(stale, 15)
    in_use = repo / "objects" / "tmp_objdir-incoming-busy"  # an old directory a push just wrote into
    (in_use / "pack").mkdir(parents=True)
    age(in_use, 15)
    (in_use / "pack" / "tmp_pack_y").write_bytes(b"y")
    assert len(packs(repo)) >= 7 and exists(git, repo, secret)

    assert asyncio.run(maintain(str(repo), MaintenanceSettings(env=git.env))) == OK

    assert not exists(git, repo, secret)  # unreachable for longer than the grace: gone
    assert not exists(git, repo, old_loose)
    assert exists(git, repo, young_loose)  # unreachable, but younger than the grace
    assert not stale.exists() and in_use.exists()
    pack_dir = repo / "objects" / "pack"
    assert (pack_dir / "multi-pack-index").exists() and list(pack_dir.glob("multi-pack-index-*.bitmap"))
    assert len([p for p in packs(repo) if not p.with_suffix(".mtimes").exists()]) == 1
    assert (repo / "objects" / "info" / "commit-graphs").is_dir()
    assert "refs/heads/main" in (repo / "packed-refs").read_text()
    assert not (repo / LOCK_NAME).exists() and (repo / FULL_STAMP).exists()
    assert git.sync("fsck", "--strict", "--no-dangling", cwd=repo) == ""
    assert git.sync("rev-parse", "main", cwd=repo).strip() == git.sync("rev-parse", "HEAD~", cwd=work).strip()

    # The next run, within the day, is a geometric repack: cheap, and still one pack plus the new one.
    commit(git, work, "later", "later\n")
    git.sync("push", "-q", "origin", "HEAD:main", cwd=work)
    assert asyncio.run(maintain(str(repo), MaintenanceSettings(env=git.env))) == OK
    assert exists(git, repo, young_loose)
    assert git.sync("fsck", "--no-dangling", cwd=repo) == ""


def test_lock_keeps_a_second_run_out_and_a_dead_one_is_taken_over(git: GitClient, repo: Path):
    settings = MaintenanceSettings(env=git.env)
    lock = repo / LOCK_NAME
    lock.write_text(f"{socket.gethostname()} {os.getpid()}\n")  # a live run on this host
    assert asyncio.run(maintain(str(repo), settings)) == BUSY
    lock.write_text(f"other-host {os.getpid()}\n")  # a run on another host, recent
    assert asyncio.run(maintain(str(repo), settings)) == BUSY
    assert not (repo / "objects" / "pack" / "multi-pack-index").exists()
    age(lock, 1)  # older than any run: its host died
    assert asyncio.run(maintain(str(repo), settings)) == OK
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock.write_text(f"{socket.gethostname()} {dead.pid}\n")
    assert asyncio.run(maintain(str(repo), settings)) == OK
    assert not lock.exists()


def metric(metrics: Metrics, name: str, result: str) -> float:
    text = metrics.exposition().decode()
    match = re.search(rf'^{name}{{result="{result}"}} (\S+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


@pytest.fixture
def scheduled(gitbase: Path, git_env: Dict[str, str], request) -> GitBackend:
    """A backend whose scheduler maintains 2 s after the last push (``git`` from the test's params).

    Two seconds, not less: on a loaded machine one push can take longer than half a second, and the
    burst test must see its pushes as one burst.
    """
    processes = GitProcesses()
    metrics = Metrics(processes)
    git_binary = getattr(request, "param", "git")
    settings = MaintenanceSettings(git=git_binary, env=git_env)
    return GitBackend(
        lookup=RepositoryRoot(str(gitbase)),
        policy=OpenPolicy(),
        processes=processes,
        metrics=metrics,
        maintenance=MaintenanceScheduler(settings, delay=2.0, metrics=metrics),
    )


@pytest.fixture
def backend(scheduled: GitBackend) -> GitBackend:
    return scheduled


async def push_commits(git: GitClient, work: Path, count: int, tag: str = "p") -> None:
    for i in range(count):
        commit(git, work, f"{tag}{i}", f"{i}\n")
        await git.run("push", "-q", "origin", "HEAD:main", cwd=work)


@pytest.mark.gen_test(timeout=30)
async def test_a_burst_of_pushes_gets_one_run_after_it(
    git: GitClient, repo: Path, base_url: str, tmp_path: Path, scheduled: GitBackend
):
    work = tmp_path / "work"
    await git.run("clone", "-q", f"{base_url}/proj.git", str(work))
    await push_commits(git, work, 3)
    # The pushes did not wait for maintenance, and nothing ran yet.
    assert not (repo / "objects" / "pack" / "multi-pack-index").exists()
    assert scheduled.metrics is not None
    deadline = time.monotonic() + 15
    while metric(scheduled.metrics, "gittornado_maintenance_runs_total", "ok") < 1:
        assert time.monotonic() < deadline, scheduled.metrics.exposition().decode()
        await asyncio.sleep(0.1)
    await asyncio.sleep(2.5)  # longer than the delay: a second run would have started by now
    assert metric(scheduled.metrics, "gittornado_maintenance_runs_total", "ok") == 1.0  # one, not three
    assert (repo / "objects" / "pack" / "multi-pack-index").exists()
    assert scheduled.maintenance is not None and scheduled.maintenance.pending == 0
    await scheduled.maintenance.close()


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("scheduled", ["/nonexistent/git"], indirect=True)
async def test_a_failed_run_is_counted_and_the_next_push_lands(
    git: GitClient, repo: Path, base_url: str, tmp_path: Path, scheduled: GitBackend
):
    work = tmp_path / "work"
    await git.run("clone", "-q", f"{base_url}/proj.git", str(work))
    assert scheduled.metrics is not None and scheduled.maintenance is not None
    for round in range(1, 3):
        await push_commits(git, work, 1, tag=f"r{round}-")
        assert git.sync("rev-parse", "main", cwd=repo) == git.sync("rev-parse", "HEAD", cwd=work)
        deadline = time.monotonic() + 10
        while metric(scheduled.metrics, "gittornado_maintenance_runs_total", FAILED) < round:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
    assert not (repo / LOCK_NAME).exists()
    await scheduled.maintenance.close()


@pytest.mark.gen_test(timeout=60)
async def test_clones_and_pushes_stay_whole_while_maintenance_runs_in_a_loop(
    git: GitClient, repo: Path, base_url: str, tmp_path: Path, scheduled: GitBackend
):
    git.sync("config", "receive.unpackLimit", "1", cwd=repo)
    runs: List[str] = []
    done = asyncio.Event()

    async def maintenance_loop() -> None:
        round = 0
        while not done.is_set():  # full and geometric repacks in turn
            settings = MaintenanceSettings(full_interval=0 if round % 2 else DAY, env=git.env)
            runs.append(await maintain(str(repo), settings))
            round += 1

    async def pusher(index: int) -> List[str]:
        work = tmp_path / f"pusher{index}"
        await git.run("clone", "-q", f"{base_url}/proj.git", str(work))
        heads = []
        for i in range(6):
            heads.append(commit(git, work, f"w{index}-{i}", f"{index} {i}\n" * 100))
            await git.run("push", "-q", "origin", f"HEAD:refs/heads/w{index}", cwd=work)
        return heads

    async def cloner(index: int) -> int:
        clones = 0
        while not done.is_set():
            target = tmp_path / f"clone{index}-{clones}"
            await git.run("clone", "-q", "--mirror", f"{base_url}/proj.git", str(target))
            await git.run("--git-dir", str(target), "fsck", "--strict", "--no-dangling")
            clones += 1
        return clones

    looping = asyncio.ensure_future(maintenance_loop())
    cloning = [asyncio.ensure_future(cloner(index)) for index in range(2)]
    pushed = await asyncio.gather(pusher(0), pusher(1))
    done.set()
    clones = await asyncio.gather(*cloning)
    await looping
    assert sum(clones) >= 4 and runs.count(OK) >= 3 and set(runs) <= {OK, BUSY}, (clones, runs)
    for index, heads in enumerate(pushed):
        assert git.sync("rev-parse", f"w{index}", cwd=repo).strip() == heads[-1]
    assert git.sync("fsck", "--strict", "--no-dangling", cwd=repo) == ""


def run_command(*args: str, env: Dict[str, str]) -> subprocess.CompletedProcess:
    env = {**env, "PYTHONPATH": WORKTREE}
    return subprocess.run(
        [sys.executable, "-m", "gittornado.server", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_maintain_verify_reports_the_broken_repository_and_exits_non_zero(git: GitClient, gitbase: Path):
    good = make_repo(git, gitbase, "team/good.git")
    broken = make_repo(git, gitbase, "broken.git")
    blob = git.sync("rev-parse", "main:file0.txt", cwd=broken).strip()
    (broken / "objects" / blob[:2] / blob[2:]).unlink()

    result = run_command("maintain", "--all", "--gitbase", str(gitbase), "--verify", env=git.env)
    assert result.returncode == 1, result.stderr
    assert "broken.git: broken" in result.stderr and "team/good.git: maintained" in result.stderr
    assert (good / "objects" / "pack" / "multi-pack-index").exists()
    assert not (broken / "objects" / "pack" / "multi-pack-index").exists()  # reported, not repacked

    result = run_command("maintain", "team/good", "--gitbase", str(gitbase), "--verify", env=git.env)
    assert result.returncode == 0, result.stderr
    result = run_command("maintain", "nosuch", "--gitbase", str(gitbase), env=git.env)
    assert result.returncode == 2 and "nosuch: no such repository" in result.stderr
    result = run_command("maintain", "--all", "--gitbase", str(gitbase), "--grace", "0", env=git.env)
    assert result.returncode == 2 and "too short" in result.stderr  # a push in progress needs its objects


@pytest.mark.gen_test(timeout=60)
async def test_the_gittornado_command_maintains_after_a_push(
    services, git: GitClient, repo: Path, gitbase: Path, tmp_path: Path
):
    server = services.gittornado(gitbase, "--maintenance-delay", "0.3")
    work = tmp_path / "work"
    await git.run("clone", "-q", f"{server.url}/proj.git", str(work))
    await push_commits(git, work, 1)
    midx = repo / "objects" / "pack" / "multi-pack-index"
    deadline = time.monotonic() + 15
    while not midx.exists():
        assert time.monotonic() < deadline, server.log()
        await asyncio.sleep(0.1)


@pytest.mark.gen_test(timeout=60)
async def test_the_server_turns_off_receive_packs_own_gc(
    services, git: GitClient, repo: Path, gitbase: Path, tmp_path: Path
):
    # git would repack everything, inside the third push, at normal priority.
    for key, value in (("gc.autoPackLimit", "2"), ("gc.autoDetach", "false"), ("receive.unpackLimit", "1")):
        git.sync("config", key, value, cwd=repo)
    server = services.gittornado(gitbase, "--maintenance-delay", "1h")
    work = tmp_path / "work"
    await git.run("clone", "-q", f"{server.url}/proj.git", str(work))
    await push_commits(git, work, 4)
    assert len(packs(repo)) >= 4


def test_the_example_timer_and_its_service_run_maintain_all(git: GitClient, gitbase: Path, tmp_path: Path):
    analyze = require_program("systemd-analyze", "systemd")
    gittornado = "/opt/gittornado/bin/gittornado"
    copies = []
    for name in ("gittornado-maintain.service", "gittornado-maintain.timer"):
        copies.append(tmp_path / name)
        text = (EXAMPLES / name).read_text().replace(gittornado, "/bin/true")
        copies[-1].write_text(text.replace("/srv/git", str(gitbase)).replace("=git\n", "=root\n"))
    result = subprocess.run([analyze, "verify", *map(str, copies)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == "", result.stderr

    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(EXAMPLES / "gittornado-maintain.service")
    argv = shlex.split(unit["Service"]["ExecStart"])
    assert argv[0] == gittornado and unit["Service"]["Type"] == "oneshot"
    repo = make_repo(git, gitbase, "team/app.git")
    result = run_command(*(str(gitbase) if arg == "/srv/git" else arg for arg in argv[1:]), env=git.env)
    assert result.returncode == 0 and "team/app.git: maintained" in result.stderr, result.stderr
    assert (repo / "objects" / "pack" / "multi-pack-index").exists()


@pytest.mark.gen_test(timeout=30)
async def test_a_repository_another_worker_maintains_is_retried_not_run_twice(
    git: GitClient, repo: Path, base_url: str, tmp_path: Path, scheduled: GitBackend
):
    lock = repo / LOCK_NAME
    lock.write_text(f"{socket.gethostname()} {os.getpid()}\n")  # another worker's run, in progress
    work = tmp_path / "work"
    await git.run("clone", "-q", f"{base_url}/proj.git", str(work))
    await push_commits(git, work, 1)
    await asyncio.sleep(1.5)  # three delays: each attempt found it busy and scheduled another
    midx = repo / "objects" / "pack" / "multi-pack-index"
    assert not midx.exists() and lock.exists()
    assert scheduled.maintenance is not None and scheduled.maintenance.pending == 1
    lock.unlink()  # the other run ended
    deadline = time.monotonic() + 10
    while not midx.exists() or scheduled.maintenance.pending:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    assert not lock.exists()
    await scheduled.maintenance.close()
