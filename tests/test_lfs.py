"""Git LFS with the real git-lfs client against the real ``gittornado`` command.

Pushes, clones and ``git lfs fsck``, a download that resumes, two users
locking one file, a read-only user's push, credentials asked once, and a
``--prefix``.  Each test has a HOME of its own, where ``git lfs install``
and a credential helper that logs each question are configured.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import pytest
from conftest import require_program
from deploy_helpers import Gittornado, Services, free_port, init_bare

from gittornado.lfs import locked_paths

PASSWORDS = {"alice": "alice-pw", "carol": "carol-pw", "bob": "bob-pw"}
#: alice and carol may push; bob may only read.
ACCESS = "[access]\nalice = *=rw\ncarol = *=rw\nbob = *=r\n"
HELPER = """#!/bin/sh
echo "$1" >> "$HELPER_LOG"
[ "$1" = get ] && [ -n "$LFS_USER" ] && printf 'username=%s\\npassword=%s\\n' "$LFS_USER" "$LFS_PASSWORD"
exit 0
"""


@pytest.fixture(autouse=True)
def _git_lfs_installed() -> None:
    require_program("git-lfs", "git-lfs")


def sha1_hash(password: str) -> str:
    return "{SHA}" + base64.b64encode(hashlib.sha1(password.encode()).digest()).decode()


@dataclass
class LfsClient:
    """The real git and git-lfs, run as one user (or anonymous), with their own HOME."""

    env: Dict[str, str]
    helper_log: Path

    def run(
        self,
        *args: str,
        cwd: Optional[Path] = None,
        check: bool = True,
        env_extra: Optional[Dict[str, str]] = None,
    ) -> subprocess.CompletedProcess:
        env = {**self.env, **(env_extra or {})}
        result = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True)
        if check and result.returncode != 0:
            raise AssertionError(f"git {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def questions(self) -> List[str]:
        """What the credential helper was asked so far ('get', 'store', 'erase')."""
        return self.helper_log.read_text().split() if self.helper_log.exists() else []


@pytest.fixture
def client_for(tmp_path: Path):
    """``client_for(user)``: an :class:`LfsClient` whose credential helper answers as ``user``."""

    def make(user: Optional[str]) -> LfsClient:
        home = tmp_path / f"home-{user or 'anonymous'}"
        home.mkdir(exist_ok=True)
        helper = home / "helper.sh"
        helper.write_text(HELPER)
        helper.chmod(0o755)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_", "LFS_"))}
        env.update(
            HOME=str(home),
            GIT_CONFIG_NOSYSTEM="1",
            GIT_TERMINAL_PROMPT="0",
            GIT_ASKPASS="/bin/false",
            GIT_AUTHOR_NAME=user or "anonymous",
            GIT_AUTHOR_EMAIL="a@example.com",
            GIT_COMMITTER_NAME=user or "anonymous",
            GIT_COMMITTER_EMAIL="a@example.com",
            HELPER_LOG=str(home / "helper.log"),
            LFS_USER=user or "",
            LFS_PASSWORD=PASSWORDS.get(user or "", ""),
        )
        client = LfsClient(env, home / "helper.log")
        client.run("lfs", "install", "--skip-repo")
        client.run("config", "--global", "credential.helper", str(helper))
        client.run("config", "--global", "init.defaultBranch", "main")
        return client

    return make


@pytest.fixture
def gitbase(tmp_path: Path) -> Path:
    path = tmp_path / "repos"
    path.mkdir()
    init_bare(path / "proj.git")
    subprocess.run(
        ["git", "-C", str(path / "proj.git"), "symbolic-ref", "HEAD", "refs/heads/main"], check=True
    )
    return path


@pytest.fixture
def users(tmp_path: Path) -> Path:
    path = tmp_path / "users.ini"
    path.write_text("[users]\n" + "".join(f"{u} = {sha1_hash(p)}\n" for u, p in PASSWORDS.items()) + ACCESS)
    return path


@pytest.fixture
def serve(services: Services, gitbase: Path, users: Path):
    """``serve(*args)``: the real gittornado on ``gitbase`` with the users above."""

    def start(*args: str) -> Gittornado:
        return services.gittornado_command("--gitbase", str(gitbase), "--accessfile", str(users), *args)

    return start


def write_objects(work: Path, sizes: Dict[str, int]) -> Dict[str, bytes]:
    contents = {}
    for name, size in sizes.items():
        contents[name] = os.urandom(size)
        (work / name).write_bytes(contents[name])
    return contents


def push_lfs_files(client: LfsClient, url: str, work: Path, sizes: Dict[str, int]) -> Dict[str, bytes]:
    """A new repository in ``work`` tracking ``*.bin`` with LFS, files of ``sizes`` committed and pushed."""
    client.run("init", "-q", str(work))
    client.run("lfs", "track", "*.bin", cwd=work)
    contents = write_objects(work, sizes)
    client.run("add", ".", cwd=work)
    client.run("commit", "-q", "-m", "objects", cwd=work)
    client.run("remote", "add", "origin", url, cwd=work)
    client.run("push", "-q", "origin", "main", cwd=work)
    return contents


def stored(gitbase: Path, data: bytes) -> Path:
    oid = hashlib.sha256(data).hexdigest()
    return gitbase / "proj.git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid


def access_lines(server: Gittornado, service: str) -> List[str]:
    return [line for line in server.log().splitlines() if f"service={service} " in line]


def test_push_several_objects_clone_elsewhere_and_fsck(serve, client_for, tmp_path: Path, gitbase: Path):
    server = serve()
    alice = client_for("alice")
    # The remote names the repository without .git: git-lfs adds it, and both find the repository.
    sizes = {"a.bin": 3_000_000, "b.bin": 1, "c.bin": 0, "d.bin": 700_000}
    contents = push_lfs_files(alice, f"{server.url}/proj", tmp_path / "work", sizes)
    for data in contents.values():
        if not data:
            continue  # git-lfs leaves empty files in git
        assert stored(gitbase, data).read_bytes() == data  # as git-lfs lays them out: lfs/objects/ab/cd/<oid>
    assert list((gitbase / "proj.git" / "lfs" / "tmp").iterdir()) == []
    assert len(access_lines(server, "lfs:upload")) >= 4  # the batch and the PUTs went through the LFS API

    bob = client_for("bob")
    bob.run("clone", "-q", f"{server.url}/proj.git", str(tmp_path / "clone"))
    assert "Git LFS fsck OK" in bob.run("lfs", "fsck", cwd=tmp_path / "clone").stdout
    for name, data in contents.items():
        assert (tmp_path / "clone" / name).read_bytes() == data
    downloads = [line for line in access_lines(server, "lfs:download") if "method=GET" in line]
    assert len(downloads) == 3 and all(
        "user=bob " in line and "status=200" in line for line in downloads
    )  # c.bin is empty


@pytest.mark.transfer
def test_200mb_object_round_trip(serve, client_for, tmp_path: Path, gitbase: Path):
    server = serve()
    alice = client_for("alice")
    contents = push_lfs_files(alice, f"{server.url}/proj.git", tmp_path / "work", {"big.bin": 200 * 2**20})
    assert stored(gitbase, contents["big.bin"]).stat().st_size == 200 * 2**20
    alice.run("clone", "-q", f"{server.url}/proj.git", str(tmp_path / "clone"))
    assert "Git LFS fsck OK" in alice.run("lfs", "fsck", cwd=tmp_path / "clone").stdout
    assert (tmp_path / "clone" / "big.bin").read_bytes() == contents["big.bin"]


def test_anonymous_is_asked_for_credentials_once(serve, client_for, tmp_path: Path):
    server = serve()
    sizes = {f"{i}.bin": 50_000 for i in range(6)}
    push_lfs_files(client_for("alice"), f"{server.url}/proj.git", tmp_path / "work", sizes)
    bob = client_for("bob")
    bob.env["GIT_LFS_SKIP_SMUDGE"] = "1"  # git alone: git-lfs has not met the server yet
    bob.run("clone", "-q", f"{server.url}/proj.git", str(tmp_path / "clone"))
    del bob.env["GIT_LFS_SKIP_SMUDGE"]
    bob.helper_log.unlink()
    bob.run("lfs", "pull", cwd=tmp_path / "clone")
    # Six objects, one question: git-lfs's first batch request goes without credentials and gets 401
    # with LFS-Authenticate; it asks the helper, retries, and the downloads follow signed URLs.
    assert bob.questions().count("get") == 1
    batches = [line for line in server.log().splitlines() if "method=POST" in line and "service=lfs" in line]
    assert "user=- " in batches[-2] and "status=401" in batches[-2]
    assert "user=bob " in batches[-1] and "status=200" in batches[-1]
    downloads = [line for line in access_lines(server, "lfs:download") if "method=GET" in line]
    assert len(downloads) == 6 and all("user=bob " in line and "status=200" in line for line in downloads)
    assert "Git LFS fsck OK" in bob.run("lfs", "fsck", cwd=tmp_path / "clone").stdout


def test_an_interrupted_download_resumes(serve, client_for, tmp_path: Path):
    server = serve()
    alice = client_for("alice")
    contents = push_lfs_files(alice, f"{server.url}/proj.git", tmp_path / "work", {"big.bin": 4_000_000})
    data = contents["big.bin"]
    oid = hashlib.sha256(data).hexdigest()
    alice.env["GIT_LFS_SKIP_SMUDGE"] = "1"
    clone = tmp_path / "clone"
    alice.run("clone", "-q", f"{server.url}/proj.git", str(clone))
    del alice.env["GIT_LFS_SKIP_SMUDGE"]
    # What an interrupted download leaves behind: the first 1.5 MB in git-lfs's incomplete file.
    incomplete = clone / ".git" / "lfs" / "incomplete"
    incomplete.mkdir(parents=True, exist_ok=True)
    (incomplete / f"{oid}.part").write_bytes(data[:1_500_000])
    alice.run("lfs", "pull", cwd=clone)
    assert (clone / "big.bin").read_bytes() == data
    downloads = [line for line in access_lines(server, "lfs:download") if "method=GET" in line]
    assert len(downloads) == 1 and "status=206" in downloads[0] and "out=2500000 " in downloads[0]


def test_two_users_lock_one_file_and_locks_survive_a_restart(
    serve, client_for, tmp_path: Path, gitbase: Path
):
    server = serve()
    alice, carol = client_for("alice"), client_for("carol")
    push_lfs_files(alice, f"{server.url}/proj.git", tmp_path / "work", {"model.bin": 1000})
    carol.run("clone", "-q", f"{server.url}/proj.git", str(tmp_path / "carol"))
    assert "Locked model.bin" in alice.run("lfs", "lock", "model.bin", cwd=tmp_path / "work").stdout
    refused = carol.run("lfs", "lock", "model.bin", cwd=tmp_path / "carol", check=False)
    assert refused.returncode != 0 and "already created lock" in refused.stderr + refused.stdout
    assert locked_paths(str(gitbase / "proj.git")) == {"model.bin": "alice"}

    server.stop()
    server = serve()  # a new process, on a new port: the lock is on disk
    for work, client in ((tmp_path / "work", alice), (tmp_path / "carol", carol)):
        client.run("remote", "set-url", "origin", f"{server.url}/proj.git", cwd=work)
    assert "model.bin\talice" in carol.run("lfs", "locks", cwd=tmp_path / "carol").stdout
    not_hers = carol.run("lfs", "unlock", "model.bin", cwd=tmp_path / "carol", check=False)
    assert not_hers.returncode != 0 and "belongs to alice" in not_hers.stderr + not_hers.stdout
    carol.run("lfs", "unlock", "--force", "model.bin", cwd=tmp_path / "carol")
    assert locked_paths(str(gitbase / "proj.git")) == {}
    assert "Locked model.bin" in carol.run("lfs", "lock", "model.bin", cwd=tmp_path / "carol").stdout


def test_a_push_over_someone_elses_lock_is_refused_by_the_server(
    serve, client_for, tmp_path: Path, gitbase: Path
):
    """git-lfs checks locks in its pre-push hook; the server checks them too, whatever the client skips."""
    server = serve()
    alice, carol = client_for("alice"), client_for("carol")
    push_lfs_files(alice, f"{server.url}/proj.git", tmp_path / "work", {"model.bin": 1000, "other.bin": 10})
    carol.run("clone", "-q", f"{server.url}/proj.git", str(tmp_path / "carol"))
    alice.run("lfs", "lock", "model.bin", cwd=tmp_path / "work")
    head = subprocess.run(
        ["git", "-C", str(gitbase / "proj.git"), "rev-parse", "main"], capture_output=True, text=True
    ).stdout
    (tmp_path / "carol" / "model.bin").write_bytes(os.urandom(500))
    carol.run("commit", "-q", "-am", "change a locked file", cwd=tmp_path / "carol")
    refused = carol.run("push", "--no-verify", "origin", "main", cwd=tmp_path / "carol", check=False)
    assert refused.returncode != 0
    assert "remote: gittornado: push refused: model.bin is locked by alice" in refused.stderr
    after = subprocess.run(
        ["git", "-C", str(gitbase / "proj.git"), "rev-parse", "main"], capture_output=True, text=True
    ).stdout
    assert after == head
    # A change to an unlocked file lands; so does the lock owner's change to hers.
    carol.run("reset", "-q", "--hard", "origin/main", cwd=tmp_path / "carol")
    (tmp_path / "carol" / "other.bin").write_bytes(os.urandom(20))
    carol.run("commit", "-q", "-am", "change an unlocked file", cwd=tmp_path / "carol")
    carol.run("push", "-q", "origin", "main", cwd=tmp_path / "carol")  # with git-lfs's hook: it uploads
    alice.run("pull", "-q", "--rebase", "origin", "main", cwd=tmp_path / "work")
    (tmp_path / "work" / "model.bin").write_bytes(os.urandom(600))
    alice.run("commit", "-q", "-am", "alice changes her locked file", cwd=tmp_path / "work")
    alice.run("push", "-q", "origin", "main", cwd=tmp_path / "work")


def test_a_read_only_users_push_is_refused_with_a_clear_message(
    serve, client_for, tmp_path: Path, gitbase: Path
):
    server = serve()
    bob = client_for("bob")
    work = tmp_path / "work"
    bob.run("init", "-q", str(work))
    bob.run("lfs", "track", "*.bin", cwd=work)
    data = write_objects(work, {"x.bin": 5000})["x.bin"]
    bob.run("add", ".", cwd=work)
    bob.run("commit", "-q", "-m", "x", cwd=work)
    bob.run("remote", "add", "origin", f"{server.url}/proj.git", cwd=work)
    push = bob.run("push", "origin", "main", cwd=work, check=False)
    assert push.returncode != 0 and "Push not allowed" in push.stderr
    lfs_push = bob.run("lfs", "push", "--all", "origin", cwd=work, check=False)
    assert lfs_push.returncode != 0
    assert "You may read proj.git but not write to it" in lfs_push.stderr + lfs_push.stdout
    assert not stored(gitbase, data).exists()


def test_lfs_under_a_prefix(serve, client_for, tmp_path: Path, gitbase: Path):
    server = serve("--prefix", "/git")
    assert server.url.endswith("/git")
    alice = client_for("alice")
    contents = push_lfs_files(alice, f"{server.url}/proj", tmp_path / "work", {"p.bin": 100_000})
    assert stored(gitbase, contents["p.bin"]).exists()
    alice.run("clone", "-q", f"{server.url}/proj.git", str(tmp_path / "clone"))
    assert (tmp_path / "clone" / "p.bin").read_bytes() == contents["p.bin"]


def test_lfs_behind_nginx_with_tls(
    serve, services: Services, client_for, tmp_path: Path, gitbase: Path, certificate
):
    """examples/nginx.conf: TLS at nginx, /git/ passed to gittornado --prefix /git --xheaders."""
    require_program("nginx", "nginx")
    server = serve("--prefix", "/git", "--xheaders")
    http_port, https_port = free_port(), free_port()
    cert, key = certificate
    services.nginx(
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
    url = f"https://127.0.0.1:{https_port}/git/proj.git"
    alice = client_for("alice")
    alice.run("config", "--global", "http.sslCAInfo", str(cert))
    contents = push_lfs_files(alice, url, tmp_path / "work", {"n.bin": 2_000_000})
    assert stored(gitbase, contents["n.bin"]).read_bytes() == contents["n.bin"]
    alice.run("clone", "-q", url, str(tmp_path / "clone"))
    assert (tmp_path / "clone" / "n.bin").read_bytes() == contents["n.bin"]
    # The signed URLs named nginx's address with its port, as the client reached it: the PUT went through.
    assert any("method=PUT status=200" in line for line in access_lines(server, "lfs:upload"))


def test_lfs_over_gittornados_own_tls(serve, client_for, tmp_path: Path, gitbase: Path, certificate):
    """An upload read from a TLS stream into the server's buffers, several of them: it arrives whole."""
    cert, key = certificate
    server = serve("--certfile", str(cert), "--keyfile", str(key))
    alice = client_for("alice")
    alice.run("config", "--global", "http.sslCAInfo", str(cert))
    url = f"{server.url}/proj.git"
    contents = push_lfs_files(alice, url, tmp_path / "work", {"t.bin": 3_500_000, "u.bin": 10})
    for data in contents.values():
        assert stored(gitbase, data).read_bytes() == data
    alice.run("clone", "-q", url, str(tmp_path / "clone"))
    assert (tmp_path / "clone" / "t.bin").read_bytes() == contents["t.bin"]


def test_workers_of_processes_share_the_secret_and_the_locks(
    serve, client_for, tmp_path: Path, gitbase: Path
):
    server = serve("--processes", "2")
    alice, carol = client_for("alice"), client_for("carol")
    sizes = {f"{i}.bin": 20_000 + i for i in range(12)}
    contents = push_lfs_files(alice, f"{server.url}/proj.git", tmp_path / "work", sizes)
    # A URL signed by one worker is honoured by whichever worker the PUT reaches.
    uploads = [line for line in access_lines(server, "lfs:upload") if "method=PUT" in line]
    assert len(uploads) == 12 and all("status=200" in line for line in uploads)
    assert (
        len({line.split("[")[1].split("]")[0] for line in server.log().splitlines() if "access[" in line})
        == 2
    )
    assert all(stored(gitbase, data).exists() for data in contents.values())
    carol.run("clone", "-q", f"{server.url}/proj.git", str(tmp_path / "carol"))
    assert "Locked 0.bin" in alice.run("lfs", "lock", "0.bin", cwd=tmp_path / "work").stdout
    for _ in range(4):  # whichever worker answers, the lock is there
        refused = carol.run("lfs", "lock", "0.bin", cwd=tmp_path / "carol", check=False)
        assert refused.returncode != 0 and "already created lock" in refused.stderr + refused.stdout


def test_without_a_secret_lfs_is_off_or_the_command_stops(services: Services, gitbase: Path, tmp_path: Path):
    (gitbase / ".gittornado").write_text("not a directory")  # the default place cannot hold a secret
    server = services.gittornado_command("--gitbase", str(gitbase))
    assert "Git LFS is off" in server.log()
    request = urllib.request.Request(
        f"{server.url}/proj.git/info/lfs/objects/batch", data=b"{}", method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request)
    assert refused.value.code == 404  # git itself is still served
    assert urllib.request.urlopen(f"{server.url}/proj.git/info/refs?service=git-upload-pack").status == 200
    stopped = subprocess.run(
        [
            "gittornado",
            "--gitbase",
            str(gitbase),
            "--port",
            "0",
            "--lfs-secret-file",
            str(gitbase / ".gittornado" / "s"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert stopped.returncode != 0 and "gittornado: --lfs-secret-file:" in stopped.stderr
