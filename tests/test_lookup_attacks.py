"""What counts as a repository and which rights apply, attacked end to end.

Each test is an attack that worked once: a repository committed into a
served work tree, a symlink that borrowed another repository's rights,
upload-archive for anonymous users, alternates that told clients the
server's paths, and config switches read differently from git.  Real git
clients, a real HTTP server, and IniPolicy with real users.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import subprocess
import tarfile
from io import BytesIO
from pathlib import Path
from typing import Optional

import pytest
from conftest import GitClient, make_repo
from tornado.httpclient import AsyncHTTPClient, HTTPResponse

from gittornado import GitBackend, RepositoryRoot
from gittornado.inipolicy import IniPolicy
from gittornado.repos import ConfigCache, parse_git_bool, resolve_repository

PASSWORDS = {"mallory": "mallory-pw", "alice": "alice-pw"}
ACCESS = """\
[users]
{users}
[access]
* = proj.git=r, public.git=r, site=r, site/*=r, fork.git=r, team/fork.git=r, borrower.git=r
mallory = team/*=rw, proj.git=r
alice = private.git=rw
"""


def sha_hash(password: str) -> str:
    """What ``htpasswd -s`` writes: fast to check, unlike bcrypt."""
    return "{SHA}" + base64.b64encode(hashlib.sha1(password.encode()).digest()).decode()


@pytest.fixture
def global_config(tmp_path: Path) -> Path:
    """The server's global git config (``GIT_CONFIG_GLOBAL``), absent until a test writes it."""
    return tmp_path / "server-gitconfig"


@pytest.fixture
def policy(tmp_path: Path) -> IniPolicy:
    users = "".join(f"{user} = {sha_hash(pw)}\n" for user, pw in PASSWORDS.items())
    path = tmp_path / "users.ini"
    path.write_text(ACCESS.format(users=users))
    return IniPolicy(str(path), realm="attacks")


@pytest.fixture
def backend(gitbase: Path, policy: IniPolicy, global_config: Path, git_home: Path) -> GitBackend:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(HOME=str(git_home), GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=str(global_config))
    return GitBackend(lookup=RepositoryRoot(str(gitbase)), policy=policy, base_env=env)


def login(base_url: str, user: str) -> str:
    return base_url.replace("http://", f"http://{user}:{PASSWORDS[user]}@")


def pkt(text: str) -> bytes:
    return b"%04x" % (len(text) + 4) + text.encode()


async def archive_request(url: str, user: Optional[str] = None) -> HTTPResponse:
    """A raw ``git archive --remote`` request (git 2.39 clients cannot send it over HTTP)."""
    headers = {"Content-Type": "application/x-git-upload-archive-request"}
    if user is not None:
        token = base64.b64encode(f"{user}:{PASSWORDS[user]}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    body = pkt("argument --format=tar\n") + pkt("argument main\n") + b"0000"
    return await AsyncHTTPClient().fetch(
        url + "/git-upload-archive", method="POST", body=body, headers=headers, raise_error=False
    )


def tar_names(answer: bytes) -> list[str]:
    """The file names of the tar stream on side-band channel 1 of an upload-archive answer."""
    assert answer.startswith(b"0008ACK\n0000"), answer[:100]
    data, rest = b"", answer[len(b"0008ACK\n0000") :]
    while rest[:4] not in (b"", b"0000"):
        length = int(rest[:4], 16)
        if rest[4:5] == b"\x01":
            data += rest[5:length]
        rest = rest[length:]
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        return sorted(tar.getnames())


# 1. Nested repositories ---------------------------------------------------------------------------


def plant_filter_repository(git: GitClient, path: Path, marker: Path) -> None:
    """A bare repository whose config runs a command when anything checks its files out."""
    work = path.parent / (path.name + "-work")
    git.sync("init", "-q", "-b", "main", str(work))
    (work / ".gitattributes").write_text("* filter=pwn\n")
    (work / "a.txt").write_text("a\n")
    git.sync("add", ".", cwd=work)
    git.sync("commit", "-q", "-m", "x", cwd=work)
    git.sync("clone", "-q", "--bare", str(work), str(path))
    with open(path / "config", "a") as config:
        config.write(f'[filter "pwn"]\n\tsmudge = "touch {marker}; cat"\n[http]\n\tuploadarchive = true\n')


@pytest.mark.gen_test(timeout=30)
async def test_repository_inside_a_work_tree_runs_nothing(
    git: GitClient, gitbase: Path, base_url: str, tmp_path: Path
):
    make_repo(git, gitbase, "site", bare=False)
    marker = tmp_path / "pwned-by-filter"
    plant_filter_repository(git, gitbase / "site" / "evil.git", marker)
    # The attack: an anonymous archive request runs the planted filter as the server user.
    response = await archive_request(f"{base_url}/site/evil.git")
    assert response.code == 404, response.body[:200]
    assert not marker.exists()
    listed = await git.run("ls-remote", f"{base_url}/site/evil.git", check=False)
    assert listed.returncode != 0 and "not found" in listed.stderr
    # The work tree itself is still served.
    assert "refs/heads/main" in (await git.run("ls-remote", f"{base_url}/site")).stdout


@pytest.mark.gen_test(timeout=30)
async def test_pushed_repository_inside_a_work_tree_gets_no_hooks_run(
    git: GitClient, gitbase: Path, base_url: str, tmp_path: Path
):
    project = make_repo(git, gitbase, "team/proj", bare=False)
    git.sync("config", "receive.denyCurrentBranch", "updateInstead", cwd=project)
    marker = tmp_path / "pwned-by-hook"
    mine = tmp_path / "mine"
    await git.run("clone", f"{login(base_url, 'mallory')}/team/proj", str(mine))
    fake = mine / "x.git"
    for directory in ("objects", "refs", "hooks"):
        (fake / directory).mkdir(parents=True)
        (fake / directory / ".keep").write_text("")  # git keeps no empty directories
    (fake / "HEAD").write_text("ref: refs/heads/main\n")
    (fake / "config").write_text("[core]\n\trepositoryformatversion = 0\n\tbare = true\n")
    (fake / "hooks" / "pre-receive").write_text(f"#!/bin/sh\ntouch {marker}\n")
    (fake / "hooks" / "pre-receive").chmod(0o755)
    git.sync("add", ".", cwd=mine)
    git.sync("commit", "-q", "-m", "a repository of my own", cwd=mine)
    # mallory may push to team/*: the fake lands in the served work tree...
    await git.run("push", "-q", "origin", "main", cwd=mine)
    assert (project / "x.git" / "hooks" / "pre-receive").exists()
    # ...but it is content, not a repository: pushing "to" it runs nothing.
    pushed = await git.run(
        "push", f"{login(base_url, 'mallory')}/team/proj/x.git", "main", cwd=mine, check=False
    )
    assert not marker.exists()
    assert pushed.returncode != 0 and "not found" in pushed.stderr


@pytest.mark.gen_test(timeout=30)
async def test_a_hundred_lookups_of_nested_and_aliased_names_at_once(
    git: GitClient, gitbase: Path, base_url: str, tmp_path: Path
):
    make_repo(git, gitbase, "site", bare=False)
    plant_filter_repository(git, gitbase / "site" / "evil.git", tmp_path / "marker")
    os.symlink(gitbase / "site" / "evil.git", gitbase / "sneaky.git")  # a name at the top, leading inside
    client = AsyncHTTPClient(max_clients=100)

    def get(name: str):
        return client.fetch(f"{base_url}/{name}/info/refs?service=git-upload-pack", raise_error=False)

    # Each answers exactly like a missing name that the same rules cover.
    pairs = [("site/evil.git", "site/missing.git"), ("sneaky.git", "missing.git")]
    missing = [await get(absent) for _, absent in pairs]
    answers = await asyncio.gather(*(get(pairs[i % 2][0]) for i in range(100)))
    for i, answer in enumerate(answers):
        assert (answer.code, answer.body) == (missing[i % 2].code, missing[i % 2].body), i
    assert {answer.code for answer in answers} == {401, 404}
    assert "refs/heads/main" in (await git.run("ls-remote", f"{base_url}/site")).stdout
    assert not (tmp_path / "marker").exists()


# 2. Aliases ---------------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_an_alias_grants_only_its_targets_rights(
    git: GitClient, gitbase: Path, base_url: str, tmp_path: Path
):
    make_repo(git, gitbase, "private.git")
    make_repo(git, gitbase, "public.git")
    (gitbase / "team").mkdir()
    os.symlink("../private.git", gitbase / "team" / "alias.git")
    os.symlink("../public.git", gitbase / "team" / "mirror.git")
    mallory = login(base_url, "mallory")
    # mallory may write team/*, and team/alias.git leads to private.git: no read, no write.
    cloned = await git.run("clone", f"{mallory}/team/alias.git", str(tmp_path / "a"), check=False)
    assert cloned.returncode != 0 and "not found" in cloned.stderr
    await git.run("clone", f"{base_url}/public.git", str(tmp_path / "w"))
    pushed = await git.run(
        "push", f"{mallory}/team/alias.git", "main:refs/heads/planted", cwd=tmp_path / "w", check=False
    )
    assert pushed.returncode != 0
    assert "planted" not in git.sync("for-each-ref", cwd=gitbase / "private.git")
    # An alias of a repository everyone may read works, read-only as its target.
    await git.run("clone", f"{mallory}/team/mirror.git", str(tmp_path / "m"))
    pushed = await git.run(
        "push", f"{mallory}/team/mirror.git", "main:refs/heads/planted", cwd=tmp_path / "w", check=False
    )
    assert pushed.returncode != 0 and "403" in pushed.stderr
    # alice's own rights on private.git reach it under its alias too.
    await git.run("clone", f"{login(base_url, 'alice')}/team/alias.git", str(tmp_path / "p"))


def test_refused_symlinks_are_logged(git: GitClient, gitbase: Path, tmp_path: Path, caplog):
    outside = make_repo(git, tmp_path / "elsewhere", "outside.git")
    os.symlink(outside, gitbase / "escape.git")
    make_repo(git, gitbase, "site", bare=False)
    make_repo(git, gitbase, "site/inner.git")
    os.symlink(gitbase / "site" / "inner.git", gitbase / "inner.git")
    caplog.set_level(logging.DEBUG, logger="gittornado")
    root = os.path.realpath(gitbase)
    assert resolve_repository(root, "escape.git") is None
    assert resolve_repository(root, "inner.git") is None
    messages = [r.getMessage() for r in caplog.records if r.name == "gittornado"]
    assert any("'escape.git'" in m and "symlink" in m and "outside the root" in m for m in messages), messages
    assert any(
        "'inner.git'" in m and "symlink" in m and "inside the repository 'site'" in m for m in messages
    )


# 3. upload-archive --------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_upload_archive_is_for_logged_in_users_unless_the_config_says_so(
    git: GitClient, repo: Path, base_url: str
):
    anonymous = await archive_request(f"{base_url}/proj.git")
    assert anonymous.code == 403
    assert "http.uploadarchive" in (anonymous.reason or "")
    assert tar_names((await archive_request(f"{base_url}/proj.git", "mallory")).body) == [
        "file0.txt",
        "file1.txt",
    ]
    git.sync("config", "http.uploadarchive", "true", cwd=repo)
    assert tar_names((await archive_request(f"{base_url}/proj.git")).body) == ["file0.txt", "file1.txt"]
    git.sync("config", "http.uploadarchive", "false", cwd=repo)
    assert (await archive_request(f"{base_url}/proj.git", "mallory")).code == 403
    git.sync("config", "--unset", "http.uploadarchive", cwd=repo)
    with open(repo / "config", "a") as config:
        config.write("[http]\n\tuploadarchive\n")  # a bare key is true
    assert tar_names((await archive_request(f"{base_url}/proj.git")).body) == ["file0.txt", "file1.txt"]


# 4. Alternates ------------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_alternates_name_no_server_paths(
    http_client, git: GitClient, gitbase: Path, repo: Path, base_url: str, tmp_path: Path
):
    git.sync("clone", "-q", "--bare", "--shared", str(repo), str(gitbase / "fork.git"))
    git.sync("clone", "-q", "--bare", "--shared", str(repo), str(gitbase / "team" / "fork.git"))
    outside = make_repo(git, tmp_path / "elsewhere", "outside.git")
    git.sync("clone", "-q", "--bare", "--shared", str(outside), str(gitbase / "borrower.git"))
    assert str(gitbase) in (gitbase / "fork.git" / "objects" / "info" / "alternates").read_text()

    fork = await http_client.fetch(f"{base_url}/fork.git/objects/info/alternates")
    assert fork.body == b"../../proj.git/objects\n"
    head = await http_client.fetch(f"{base_url}/fork.git/objects/info/alternates", method="HEAD")
    assert head.headers["Content-Length"] == str(len(fork.body)) and head.body == b""
    nested = await http_client.fetch(f"{base_url}/team/fork.git/objects/info/alternates")
    assert nested.body == b"../../../proj.git/objects\n"
    borrower = await http_client.fetch(f"{base_url}/borrower.git/objects/info/alternates", raise_error=False)
    assert borrower.code == 404 and str(tmp_path).encode() not in borrower.body
    # One line in, one line out: only the one under the root is served.
    with open(gitbase / "fork.git" / "objects" / "info" / "alternates", "a") as alternates:
        alternates.write(f"{outside}/objects\n")
    mixed = await http_client.fetch(f"{base_url}/fork.git/objects/info/alternates")
    assert mixed.body == b"../../proj.git/objects\n"

    # git's dumb client follows the relative alternates back to proj.git on this server
    # (when told to: alternates count as redirects, which git follows only at first by default).
    for name in ("fork.git", "team/fork.git"):
        clone = tmp_path / name.replace("/", "-")
        url = f"{base_url}/{name}"
        await git.run(
            "-c", "http.followRedirects=true", "clone", url, str(clone), env={"GIT_SMART_HTTP": "0"}
        )
        assert (clone / "file1.txt").exists()
        assert git.sync("fsck", cwd=clone) == ""


# 5. Config switches as git reads them ------------------------------------------------------------

BOOL_VALUES = [
    None, "", "true", "YES", "On", "off", "0", "00", "2", "-1", "+5", "010", "0x10", "1k", "1M", "1g",
    "2147483647", "2147483648", "-2147483648", "2g", "08", "0x", "1kb", "0.5", "maybe", " true", "yes ",
]  # fmt: skip


def test_booleans_are_read_as_git_reads_them(git: GitClient, tmp_path: Path):
    config = tmp_path / "config"
    for value in BOOL_VALUES:
        # Quoted, so git sees exactly the value (spaces included); None is a bare key.
        quoted = '"' + value + '"' if value is not None else None
        config.write_text("[t]\n\tk" + (f" = {quoted}" if quoted is not None else "") + "\n")
        result = subprocess.run(
            ["git", "config", "-f", str(config), "--type=bool", "--get", "t.k"],
            capture_output=True,
            text=True,
            env=git.env,
        )
        expected = (
            {"true": True, "false": False}.get(result.stdout.strip()) if result.returncode == 0 else None
        )
        assert parse_git_bool(value) == expected, (value, result.stdout, result.stderr)


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize(
    "setting, served",
    [("\tuploadpack =\n", False), ("\tuploadpack = 2\n", True), ("\tuploadpack = maybe\n", False)],
    ids=["empty", "two", "unreadable"],
)
async def test_service_switches_read_as_git_reads_them(
    git: GitClient, repo: Path, base_url: str, setting: str, served: bool, caplog
):
    with open(repo / "config", "a") as config:
        config.write("[http]\n" + setting)
    listed = await git.run("ls-remote", f"{base_url}/proj.git", check=False)
    assert (listed.returncode == 0) == served, listed.stderr
    if not served:
        assert "403" in listed.stderr
    if "maybe" in setting:
        assert any(
            "'maybe'" in r.getMessage() and "http.uploadpack" in r.getMessage() for r in caplog.records
        )


@pytest.mark.gen_test(timeout=30)
async def test_changes_to_global_and_included_config_are_noticed(
    http_client, repo: Path, base_url: str, global_config: Path, tmp_path: Path
):
    included = repo / "included.cfg"  # named by the repository's config, missing at first
    with open(repo / "config", "a") as config:
        config.write("[include]\n\tpath = included.cfg\n")  # relative to the including file
    smart = f"{base_url}/proj.git/info/refs?service=git-upload-pack"

    async def status(url: str) -> int:
        return (await http_client.fetch(url, raise_error=False)).code

    # A reading is kept only once its files have been left alone for a second.
    await asyncio.sleep(1.1)
    assert await status(smart) == 200
    assert await status(smart) == 200  # from the kept reading
    global_config.write_text("[http]\n\tuploadpack = false\n")
    assert await status(smart) == 403
    global_config.unlink()
    await asyncio.sleep(1.1)
    assert await status(smart) == 200
    included.write_text("[http]\n\tuploadpack = off\n")
    assert await status(smart) == 403


@pytest.mark.gen_test(timeout=30)
async def test_a_hundred_requests_share_one_config_reading(
    backend: GitBackend, repo: Path, base_url: str, tmp_path: Path
):
    readings = tmp_path / "readings"
    counting_git = tmp_path / "counting-git"
    count = f'case "$*" in *"config --list"*) echo >> {readings};; esac'
    counting_git.write_text(f'#!/bin/sh\n{count}\nexec git "$@"\n')
    counting_git.chmod(0o755)
    backend.configs = ConfigCache(str(counting_git), backend.base_env)
    await asyncio.sleep(1.1)  # the repository's files have settled: a reading may be kept
    client = AsyncHTTPClient(max_clients=100)
    answers = await asyncio.gather(
        *(client.fetch(f"{base_url}/proj.git/info/refs?service=git-upload-pack") for _ in range(100))
    )
    assert {answer.code for answer in answers} == {200}
    assert len(readings.read_text().splitlines()) == 1
