"""Shared fixtures: real repositories, a real git client, a real server.

The server runs on the test's io_loop (pytest-tornado's ``app`` fixture); the
git client runs as an asyncio subprocess so the loop keeps serving while it
works.  ``spawn_server`` starts the real ``gittornado`` command instead.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import deploy_helpers
import pytest

from gittornado import GitBackend, OpenPolicy, RepositoryRoot
from gittornado.access import AccessPolicy
from gittornado.server import make_application


def require_program(program: str, package: str) -> str:
    """The path of ``program``; a missing one fails the test (never skips), saying how to install it."""
    path = shutil.which(program)
    if path is None:
        pytest.fail(f"{program} is not installed: apt-get install {package} (.ci/run does)", pytrace=False)
    return path


@pytest.fixture(scope="session")
def git_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A HOME with no user config, so the host's ~/.gitconfig never leaks in."""
    return tmp_path_factory.mktemp("home")


@pytest.fixture
def git_env(git_home: Path) -> Dict[str, str]:
    """Environment for every git client in the tests."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(
        HOME=str(git_home),
        GIT_CONFIG_NOSYSTEM="1",
        GIT_TERMINAL_PROMPT="0",
        GIT_AUTHOR_NAME="Test Author",
        GIT_AUTHOR_EMAIL="author@example.com",
        GIT_COMMITTER_NAME="Test Committer",
        GIT_COMMITTER_EMAIL="committer@example.com",
        GIT_ASKPASS="/bin/false",
    )
    return env


@dataclass
class GitResult:
    """What a finished git client run printed."""

    returncode: int
    stdout: str
    stderr: str


class GitClient:
    """Runs the real git client, async (for the io_loop server) or sync (for setup)."""

    def __init__(self, env: Dict[str, str]) -> None:
        self.env = env

    async def run(
        self,
        *args: str,
        cwd: Optional[Path] = None,
        check: bool = True,
        env: Optional[Dict[str, str]] = None,
        input: Optional[bytes] = None,
    ) -> GitResult:
        proc = await asyncio.create_subprocess_exec(
            "git",
            *args,
            cwd=cwd,
            env={**self.env, **(env or {})},
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = await proc.communicate(input)
        result = GitResult(proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace"))
        if check and result.returncode != 0:
            raise AssertionError(f"git {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def sync(
        self,
        *args: str,
        cwd: Optional[Path] = None,
        env: Optional[Dict[str, str]] = None,
        input: Optional[str] = None,
    ) -> str:
        return subprocess.run(
            ["git", *args],
            cwd=cwd,
            env={**self.env, **(env or {})},
            check=True,
            capture_output=True,
            text=True,
            input=input,
        ).stdout


@pytest.fixture
def git(git_env: Dict[str, str]) -> GitClient:
    return GitClient(git_env)


@pytest.fixture
def gitbase(tmp_path: Path) -> Path:
    """The directory the server serves."""
    path = tmp_path / "repos"
    path.mkdir()
    return path


def make_repo(git: GitClient, gitbase: Path, name: str, commits: int = 2, bare: bool = True) -> Path:
    """Create repository ``name`` under ``gitbase`` with ``commits`` commits on main."""
    work = gitbase.parent / ("work-" + name.replace("/", "-"))
    git.sync("init", "-q", "-b", "main", str(work))
    for i in range(commits):
        (work / f"file{i}.txt").write_text(f"content {i}\n" * (i + 1))
        git.sync("add", ".", cwd=work)
        git.sync("commit", "-q", "-m", f"commit {i}", cwd=work)
    if not bare:
        target = gitbase / name
        target.parent.mkdir(parents=True, exist_ok=True)
        work.rename(target)
        return target
    target = gitbase / name
    target.parent.mkdir(parents=True, exist_ok=True)
    git.sync("clone", "-q", "--bare", str(work), str(target))
    return target


@pytest.fixture
def repo(git: GitClient, gitbase: Path) -> Path:
    """``proj.git``: a bare repository with two commits on main."""
    return make_repo(git, gitbase, "proj.git")


@pytest.fixture
def policy() -> AccessPolicy:
    """The access policy of the in-process server; override per test module."""
    return OpenPolicy()


@pytest.fixture
def backend(gitbase: Path, policy: AccessPolicy) -> GitBackend:
    return GitBackend(lookup=RepositoryRoot(str(gitbase)), policy=policy)


@pytest.fixture
def app(backend: GitBackend):
    """The application pytest-tornado serves on ``base_url``."""
    return make_application(backend)


@pytest.fixture
def base_url(http_server, http_port: int) -> str:
    """URL of the in-process server; unlike pytest-tornado's own, it starts the server."""
    return f"http://127.0.0.1:{http_port}"


def git_processes_under(path: Path) -> List[int]:
    """PIDs of live (non-zombie) git processes whose command line names ``path``.

    Scoped by path so processes of other tests or other work on the machine
    never count.
    """
    needle = str(path).encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in cmdline and b"git" in cmdline.split(b"\0")[0] and state != b"Z":
            found.append(int(entry))
    return found


async def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    """Poll ``predicate`` on the io_loop until it is true or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return bool(predicate())


def upload_pack_post(repository: str, body: bytes, close: bool = True) -> bytes:
    """A raw HTTP/1.1 upload-pack request for ``repository`` (a URL path), with Content-Length."""
    return (
        b"POST /%s/git-upload-pack HTTP/1.1\r\nHost: x\r\n%s"
        b"Content-Type: application/x-git-upload-pack-request\r\nContent-Length: %d\r\n\r\n"
        % (repository.encode(), b"Connection: close\r\n" if close else b"", len(body))
        + body
    )


def push_noise(git: GitClient, repo: Path, mib: int) -> str:
    """Commit ``mib`` MiB of random bytes on top of ``repo``'s main; return the new head.

    For transfers long enough to interrupt, or to hold back with a small receive window.
    """
    with tempfile.TemporaryDirectory() as work:
        git.sync("clone", "-q", str(repo), work)
        Path(work, "noise.bin").write_bytes(os.urandom(mib * 1024 * 1024))
        git.sync("add", "noise.bin", cwd=Path(work))
        git.sync("commit", "-q", "-m", "noise", cwd=Path(work))
        git.sync("push", "-q", "origin", "HEAD:main", cwd=Path(work))
        return git.sync("rev-parse", "HEAD", cwd=Path(work)).strip()


def pack_for_push(git: GitClient, work: Path, revs: str) -> bytes:
    """The pack a push from ``work`` sends: ``revs`` as git rev-list reads them (``<new>\n^<old>\n``)."""
    return subprocess.run(
        ["git", "pack-objects", "--stdout", "--revs", "-q"],
        cwd=work,
        env=git.env,
        input=revs.encode(),
        capture_output=True,
        check=True,
    ).stdout


async def raw_http(port: int, request: bytes, timeout: float = 10.0) -> bytes:
    """Send ``request`` bytes verbatim over TCP and return everything until the server closes.

    For requests an ordinary client would not send (HTTP/1.0, dot segments,
    broken framing); the connection is half-closed after sending when the
    request carries ``Connection: close``.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def parse_response(raw: bytes) -> tuple[int, Dict[str, str], bytes]:
    """Split a raw HTTP/1.x response into status, headers (lower-cased names) and body."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


# Deployment: real gittornado, nginx and Apache httpd processes (see tests/deploy_helpers.py).


@pytest.fixture
def services(tmp_path: Path) -> Iterator[deploy_helpers.Services]:
    """Starts gittornado, nginx and Apache for one test; all are stopped after it."""
    started = deploy_helpers.Services(tmp_path / "services")
    yield started
    started.stop_all()


@pytest.fixture
def spawn_server(services: deploy_helpers.Services) -> Callable[..., deploy_helpers.Gittornado]:
    """Starts the real ``gittornado --port 0 --address 127.0.0.1 <args>``; stopped after the test."""
    return services.gittornado_command


@pytest.fixture(scope="session")
def big_repo(tmp_path_factory: pytest.TempPathFactory, git_home: Path) -> Iterator[Path]:
    """A work tree with 300 MB of random data on main, made once and pushed by several tests."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(HOME=str(git_home), GIT_CONFIG_NOSYSTEM="1")
    env.update(GIT_AUTHOR_NAME="Big", GIT_AUTHOR_EMAIL="big@example.com")
    env.update(GIT_COMMITTER_NAME="Big", GIT_COMMITTER_EMAIL="big@example.com")
    path = deploy_helpers.make_big_repo(tmp_path_factory.mktemp("big"), env)
    yield path
    deploy_helpers.remove_tree(path)


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (certificate file, key file)."""
    return deploy_helpers.make_certificate(tmp_path_factory.mktemp("tls"))
