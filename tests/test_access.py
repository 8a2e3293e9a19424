"""users.ini access control, end to end with the real git client.

The matrix runs every cell of {anonymous, right password, wrong password,
unknown user} x {no rule, r, rw} x {clone, push, dumb clone}; the other tests
cover the file format, the hash formats htpasswd writes, groups and globs,
live reload, REMOTE_USER in hooks, the event loop while bcrypt runs,
throttling, and that no password ever reaches a log line.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest
from conftest import GitClient, make_repo, require_program
from passlib.hash import bcrypt
from tornado.httpclient import AsyncHTTPClient, HTTPResponse
from tornado.httputil import HTTPHeaders, HTTPServerRequest, RequestStartLine

from gittornado.access import (
    AccessDenied,
    AccessFileError,
    AuthenticationFailed,
    FailureThrottle,
    IniPolicy,
    Permission,
    parse_access_file,
)

FIXTURES = Path(__file__).parent / "fixtures"
#: Users (one per hash format) whose hashes the real htpasswd made; see the file's header.
HTPASSWD_USERS = FIXTURES / "htpasswd-users.ini"
PASSWORDS = {
    "bcrypt": "secret-bcrypt",
    "apr1": "secret-apr1",
    "sha1": "secret-sha1",
    "sha256": "secret-sha256",
    "sha512": "secret-sha512",
    "longbcrypt": "L" * 80,
    "utf8": "grüße-utf8",
}
REALM = "gittornado tests"


def fixture_users(*names: str, rename: Optional[Dict[str, str]] = None) -> str:
    """[users] lines for ``names`` from the htpasswd fixture (optionally under other names)."""
    rules = parse_access_file(HTPASSWD_USERS.read_text(encoding="utf-8"), str(HTPASSWD_USERS))
    rename = rename or {}
    return "".join(f"{rename.get(name, name)} = {rules.users[name]}\n" for name in names)


#: Users of most tests: alice (bcrypt), bob (apr1), carol (sha512) with the fixture passwords.
USERS = fixture_users(
    "bcrypt", "apr1", "sha512", rename={"bcrypt": "alice", "apr1": "bob", "sha512": "carol"}
)
CREDENTIALS = {"alice": PASSWORDS["bcrypt"], "bob": PASSWORDS["apr1"], "carol": PASSWORDS["sha512"]}

DEFAULT_ACCESS = f"""\
; the rules most tests here use
[users]
{USERS}
[groups]
devs = carol

[access]
alice = proj.git=rw, private=rw
bob: proj=r
@devs = team/*=rw
* = public.git=r
"""


@pytest.fixture
def access_text() -> str:
    """The users.ini of the test's server; tests parametrize it to change the rules."""
    return DEFAULT_ACCESS


@pytest.fixture
def access_file(tmp_path: Path, access_text: str) -> Path:
    path = tmp_path / "users.ini"
    path.write_text(access_text, encoding="utf-8")
    return path


@pytest.fixture
def throttle_settings() -> Dict[str, Any]:
    """FailureThrottle arguments for the test's server; tests parametrize it."""
    return {}


@pytest.fixture
def throttle(throttle_settings: Dict[str, Any]) -> FailureThrottle:
    return FailureThrottle(**throttle_settings)


@pytest.fixture
def policy(access_file: Path, throttle: FailureThrottle) -> IniPolicy:
    return IniPolicy(str(access_file), realm=REALM, throttle=throttle)


@pytest.fixture
def server_url(http_server, http_port: int) -> str:
    """The in-process server (started by requesting http_server)."""
    return f"http://127.0.0.1:{http_port}"


def with_credentials(url: str, user: Optional[str], password: Optional[str]) -> str:
    """``url`` with ``user:password@`` (percent-encoded, as git expects) after the scheme."""
    if user is None:
        return url
    scheme, rest = url.split("://", 1)
    return (
        f"{scheme}://{urllib.parse.quote(user, safe='')}:{urllib.parse.quote(password or '', safe='')}@{rest}"
    )


def basic(user: str, password: str) -> Dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


async def get(url: str, user: Optional[str] = None, password: Optional[str] = None, **kwargs) -> HTTPResponse:
    headers = basic(user, password or "") if user is not None else {}
    return await AsyncHTTPClient().fetch(url, headers=headers, raise_error=False, **kwargs)


def fake_request(
    user: Optional[str] = None, password: str = "", address: str = "192.0.2.1"
) -> HTTPServerRequest:
    """A request object for calling a policy directly, from ``address``."""
    headers = HTTPHeaders({"Host": "git.example", **(basic(user, password) if user else {})})
    request = HTTPServerRequest(start_line=RequestStartLine("GET", "/", "HTTP/1.1"), headers=headers)
    request.remote_ip = address
    return request


# -- the file format -------------------------------------------------------------------------------


def test_example_file_in_the_repository_loads() -> None:
    example = Path(__file__).parent.parent / "users.ini"
    rules = parse_access_file(example.read_text(encoding="utf-8"), "users.ini")
    assert rules.allows(None, "proj.git", Permission.READ)
    assert not rules.allows(None, "proj.git", Permission.WRITE)
    assert rules.allows("carol", "team/x.git", Permission.WRITE)
    assert not rules.allows("carol", "private.git", Permission.READ)


def test_rules_read_like_the_readme_says() -> None:
    rules = parse_access_file(DEFAULT_ACCESS, "users.ini")
    read, write = Permission.READ, Permission.WRITE
    # rw implies r; with or without .git on either side
    for name in ("proj.git", "proj"):
        assert rules.allows("alice", name, read) and rules.allows("alice", name, write)
        assert rules.allows("bob", name, read) and not rules.allows("bob", name, write)
    assert rules.allows("alice", "private.git", write)
    # no rule, no access
    assert not rules.allows("bob", "private.git", read)
    assert not rules.allows(None, "proj.git", read)
    # * is everyone, anonymous included, and rights add up
    for user in (None, "alice", "bob", "carol"):
        assert rules.allows(user, "public", read) and not rules.allows(user, "public.git", write)
    # groups and globs: * crosses /, but the prefix must match
    assert rules.allows("carol", "team/a.git", write)
    assert rules.allows("carol", "team/deep/b", write)
    assert not rules.allows("carol", "teamwork.git", read)
    assert not rules.allows("bob", "team/a.git", read)


def test_question_mark_and_colon_keys() -> None:
    rules = parse_access_file("[access]\n* : v?.git = r ; comment\n# another\n", "f")
    assert rules.allows(None, "v1.git", Permission.READ)
    assert rules.allows(None, "v2", Permission.READ)
    assert not rules.allows(None, "v10.git", Permission.READ)


def test_rules_are_case_sensitive_and_whole_path() -> None:
    rules = parse_access_file("[access]\n* = proj=r\n", "f")
    assert not rules.allows(None, "Proj.git", Permission.READ)
    assert not rules.allows(None, "team/proj.git", Permission.READ)
    assert not rules.allows(None, "proj.git.bak", Permission.READ)


@pytest.mark.parametrize(
    "text, message",
    [
        ("[users]\nalice = $2y$05$aaaa\n", "line 2: user 'alice': malformed bcrypt hash"),
        ("[users]\n\nbob = plain-secret-value\n", "line 3: user 'bob': not a password hash"),
        ("[users]\nbob = $1$abc$abcdefghijklmnopqrstuv\n", "line 2: user 'bob': not a password hash"),
        ("[users]\ndave\n", "line 2: expected [section] or name = value"),
        ("alice = proj=r\n", "line 1: 'alice' comes before any [section]"),
        ("[user]\n", "line 1: unknown section [user]"),
        ("[access]\nalice = proj=w\n", "line 2: a right must be r or rw"),
        ("[access]\nalice = proj\n", "line 2: each rule must be repository=r or repository=rw"),
        ("[access]\nalice = /srv/proj=r\n", "line 2: repository paths are relative"),
        ("[access]\neve = {SHA}qElppSoiqH8yXpLm8MCPmsgmOYc=\n", "line 2: a right must be r or rw"),
        ("[access]\n@ops = proj=r\n", "line 2: no group 'ops' in [groups]"),
        ("[groups]\nall = @devs\n", "line 2: group 'all': groups cannot contain groups"),
        ("[users]\n* = {SHA}qElppSoiqH8yXpLm8MCPmsgmOYc=\n", "line 2: not a valid user name"),
        ("[users]\nbob hunter2 = {SHA}qElppSoiqH8yXpLm8MCPmsgmOYc=\n", "line 2: not a valid user name"),
    ],
)
def test_broken_files_are_refused_naming_line_and_user(text: str, message: str) -> None:
    with pytest.raises(AccessFileError) as error:
        parse_access_file(text, "users.ini")
    assert str(error.value).startswith("users.ini, line")
    assert message in str(error.value)
    for secret in ("$2y$05$aaaa", "plain-secret-value", "abcdefghijklmnopqrstuv", "qElppSoi", "hunter2"):
        assert secret not in str(error.value)


def test_rules_accumulate_across_repeated_keys_and_sections() -> None:
    text = "[access]\nbob = a=r\n[groups]\ng = bob\n[access]\nbob = b=rw\n@g = c=r\n"
    rules = parse_access_file(text, "f")
    assert all(rules.allows("bob", name, Permission.READ) for name in ("a", "b", "c"))
    assert rules.allows("bob", "b", Permission.WRITE) and not rules.allows("bob", "a", Permission.WRITE)


# -- hash formats ----------------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_every_htpasswd_format_verifies(tmp_path: Path) -> None:
    policy = IniPolicy(str(HTPASSWD_USERS), throttle=FailureThrottle(free=100, limit=100))
    assert sorted(policy.rules.users) == sorted(PASSWORDS)
    for user, password in PASSWORDS.items():
        assert await policy.authenticate(fake_request(user, password)) == user
        with pytest.raises(AuthenticationFailed):
            await policy.authenticate(fake_request(user, "X" + password[1:]))


@pytest.mark.gen_test
async def test_hashes_htpasswd_makes_now_verify(tmp_path: Path) -> None:
    """The installed htpasswd, run at test time: every format it offers that we accept."""
    require_program("htpasswd", "apache2-utils")
    lines = ["[users]"]
    for flag in ("-B", "-m", "-s", "-2", "-5"):
        user = "user" + flag
        made = subprocess.run(
            ["htpasswd", "-nb", flag, user, f"pw{flag}"], check=True, capture_output=True, text=True
        )
        lines.append(made.stdout.strip())  # htpasswd's own user:hash line, unchanged
    path = tmp_path / "users.ini"
    path.write_text("\n".join(lines) + "\n")
    policy = IniPolicy(str(path), throttle=FailureThrottle(free=100, limit=100))
    for flag in ("-B", "-m", "-s", "-2", "-5"):
        assert await policy.authenticate(fake_request("user" + flag, f"pw{flag}")) == "user" + flag
        with pytest.raises(AuthenticationFailed):
            await policy.authenticate(fake_request("user" + flag, "pw"))
    # Plain text (-p) and DES crypt (-d) are refused at load.
    for flag in ("-p", "-d"):
        made = subprocess.run(["htpasswd", "-nb", flag, "weak", "pw"], capture_output=True, text=True)
        path.write_text("[users]\n" + made.stdout.strip() + "\n")
        with pytest.raises(AccessFileError, match="line 2: user 'weak'"):
            IniPolicy(str(path))


@pytest.mark.parametrize("user", sorted(PASSWORDS))
@pytest.mark.parametrize(
    "access_text", [f"[users]\n{fixture_users(*PASSWORDS)}[access]\n* = *=r\n"], ids=["everyone-reads"]
)
@pytest.mark.gen_test(timeout=60)
async def test_git_clones_with_each_hash_format(
    user: str, access_text: str, git: GitClient, repo: Path, server_url: str, tmp_path: Path
) -> None:
    """Everyone may read, so git sends the password only because info/refs asks for it."""
    url = with_credentials(f"{server_url}/proj.git", user, PASSWORDS[user])
    await git.run("clone", "-q", url, str(tmp_path / "clone"))
    # and with a credential helper instead of the URL
    helper = f"!f() {{ echo username={user}; echo 'password={PASSWORDS[user]}'; }}; f"
    await git.run(
        "-c",
        f"credential.helper={helper}",
        "ls-remote",
        f"{server_url}/proj.git",
        env={"GIT_SMART_HTTP": "1"},
    )


# -- the matrix ------------------------------------------------------------------------------------

#: who -> (user, password) the git client sends, and whose [access] line the rule goes on
CLIENTS: Dict[str, Tuple[Optional[str], Optional[str], str]] = {
    "anonymous": (None, None, "*"),
    "right-password": ("alice", CREDENTIALS["alice"], "alice"),
    "wrong-password": ("alice", "not-" + CREDENTIALS["alice"], "alice"),
    "unknown-user": ("mallory", "secret-mallory", "mallory"),
}
#: What git prints for each outcome.
GIT_SAYS = {
    "401-asks": "could not read Username",  # asked for credentials, and it has none
    "401": "Authentication failed",
    "403": "The requested URL returned error: 403",
    "404": "not found",
}


def expected_outcome(who: str, rule: str, operation: str) -> str:
    """The issue's table: what each cell must do."""
    if who in ("wrong-password", "unknown-user"):
        return "401"
    needs_write = operation == "push"
    if rule == "rw" or (rule == "r" and not needs_write):
        return "ok"
    if who == "anonymous":
        return "401-asks"
    return "403" if rule == "r" else "404"


def matrix() -> List[object]:
    cells = []
    for who, (_, _, subject) in CLIENTS.items():
        for rule in ("none", "r", "rw"):
            line = "" if rule == "none" else f"{subject} = proj.git={rule}\n"
            text = f"[users]\n{USERS}[access]\n{line}"
            for operation in ("clone", "push", "dumb-clone"):
                cells.append(pytest.param(who, rule, operation, text, id=f"{who}-{rule}-{operation}"))
    return cells


@pytest.mark.parametrize("who, rule, operation, access_text", matrix())
@pytest.mark.gen_test(timeout=60)
async def test_access_matrix(
    who: str,
    rule: str,
    operation: str,
    access_text: str,
    git: GitClient,
    repo: Path,
    server_url: str,
    tmp_path: Path,
) -> None:
    user, password, _ = CLIENTS[who]
    url = with_credentials(f"{server_url}/proj.git", user, password)
    target = tmp_path / "client"
    if operation == "push":
        git.sync("clone", "-q", str(repo), str(target))
        (target / "pushed.txt").write_text("pushed\n")
        git.sync("add", ".", cwd=target)
        git.sync("commit", "-q", "-m", "push me", cwd=target)
        result = await git.run("push", url, "HEAD:refs/heads/pushed", cwd=target, check=False)
    else:
        env = {"GIT_SMART_HTTP": "0"} if operation == "dumb-clone" else {}
        result = await git.run("clone", url, str(target), check=False, env=env)

    outcome = expected_outcome(who, rule, operation)
    pushed = git.sync("--git-dir", str(repo), "for-each-ref", "refs/heads/pushed")
    if outcome == "ok":
        assert result.returncode == 0, result.stderr
        if operation == "push":
            assert pushed
        else:
            assert (target / "file1.txt").exists()
    else:
        assert result.returncode != 0
        assert GIT_SAYS[outcome] in result.stderr, result.stderr
        assert not pushed
    if password:
        assert password not in result.stderr


# -- exact HTTP answers ----------------------------------------------------------------------------

ADVERTISE = "/info/refs?service=git-upload-pack"
RECEIVE = "/info/refs?service=git-receive-pack"


@pytest.fixture
def repositories(git: GitClient, gitbase: Path, repo: Path) -> Path:
    for name in ("private.git", "public.git", "team/a.git"):
        make_repo(git, gitbase, name, commits=1)
    return gitbase


@pytest.mark.parametrize(
    "user, path, status",
    [
        (None, "/public.git" + ADVERTISE, 200),
        (None, "/public.git/HEAD", 200),
        (None, "/proj.git" + ADVERTISE, 401),
        (None, "/public.git" + RECEIVE, 401),
        (None, "/missing.git" + ADVERTISE, 401),  # anonymous: not told what exists
        ("alice", "/proj.git" + RECEIVE, 200),
        ("alice", "/proj/HEAD", 200),
        ("alice", "/private" + RECEIVE, 200),
        ("alice", "/missing.git" + ADVERTISE, 404),
        ("alice", "/public.git" + RECEIVE, 403),
        ("bob", "/proj.git" + ADVERTISE, 200),
        ("bob", "/proj.git/objects/info/packs", 200),
        ("bob", "/proj.git" + RECEIVE, 403),
        ("bob", "/private.git" + ADVERTISE, 404),
        ("bob", "/private.git" + RECEIVE, 404),
        ("bob", "/private.git/HEAD", 404),
        ("bob", "/team/a.git" + ADVERTISE, 404),
        ("carol", "/team/a.git" + RECEIVE, 200),
        ("carol", "/team/a" + ADVERTISE, 200),
        ("carol", "/proj.git" + ADVERTISE, 404),
    ],
)
@pytest.mark.gen_test(timeout=30)
async def test_http_status(
    user: Optional[str], path: str, status: int, repositories: Path, server_url: str
) -> None:
    response = await get(server_url + path, user, CREDENTIALS.get(user or ""))
    assert response.code == status, response.body
    challenge = response.headers.get("WWW-Authenticate")
    assert challenge == (f'Basic realm="{REALM}"' if status == 401 else None)


@pytest.mark.gen_test(timeout=30)
async def test_push_body_refused_for_reader(repositories: Path, server_url: str) -> None:
    response = await AsyncHTTPClient().fetch(
        f"{server_url}/proj.git/git-receive-pack",
        method="POST",
        body=b"0000",
        headers={
            "Content-Type": "application/x-git-receive-pack-request",
            **basic("bob", CREDENTIALS["bob"]),
        },
        raise_error=False,
    )
    assert response.code == 403


@pytest.mark.parametrize(
    "authorization",
    [
        "Basic !!!not-base64",
        "Basic " + base64.b64encode(b"no-colon").decode(),
        "Basic " + base64.b64encode(b"\xff\xfe:pw").decode(),
        "Basic " + base64.b64encode(b"alice:wrong").decode(),
        "Basic " + base64.b64encode(b"nobody:" + CREDENTIALS["alice"].encode()).decode(),
    ],
)
@pytest.mark.gen_test(timeout=30)
async def test_bad_credentials_get_401_even_where_anonymous_may_read(
    authorization: str, repositories: Path, server_url: str
) -> None:
    response = await AsyncHTTPClient().fetch(
        f"{server_url}/public.git{ADVERTISE}", headers={"Authorization": authorization}, raise_error=False
    )
    assert response.code == 401
    assert response.headers["WWW-Authenticate"] == f'Basic realm="{REALM}"'


@pytest.mark.gen_test(timeout=30)
async def test_other_schemes_are_anonymous(repositories: Path, server_url: str) -> None:
    headers = {"Authorization": "Bearer abc"}
    public = await AsyncHTTPClient().fetch(f"{server_url}/public.git{ADVERTISE}", headers=headers)
    assert public.code == 200
    private = await AsyncHTTPClient().fetch(
        f"{server_url}/proj.git{ADVERTISE}", headers=headers, raise_error=False
    )
    assert private.code == 401


# -- cost: one verification per clone, off the event loop ------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_one_verification_per_clone_and_fetch(
    git: GitClient, repo: Path, server_url: str, access_file: Path, tmp_path: Path, monkeypatch
) -> None:
    import gittornado.inipolicy

    calls: List[str] = []
    real = gittornado.inipolicy.verify_password

    def counting(password: bytes, hashed: str) -> bool:
        calls.append(hashed)
        return real(password, hashed)

    monkeypatch.setattr(gittornado.inipolicy, "verify_password", counting)
    url = with_credentials(f"{server_url}/proj.git", "alice", CREDENTIALS["alice"])
    clone = tmp_path / "clone"
    await git.run("clone", "-q", url, str(clone))
    await git.run("fetch", "-q", "origin", cwd=clone)
    await git.run("fetch", "-q", "origin", cwd=clone)
    assert len(calls) == 1

    # A changed file drops the cache (its password may have changed).
    access_file.write_text(access_file.read_text() + "\n; touched\n")
    await asyncio.sleep(1.1)
    await git.run("fetch", "-q", "origin", cwd=clone)
    assert len(calls) == 2


@pytest.fixture(scope="module")
def slow_hash() -> Tuple[str, float]:
    """A bcrypt hash slow enough that running it on the loop would show, and its cost in seconds."""
    begin = time.perf_counter()
    hashed = bcrypt.using(ident="2y", rounds=13).hash("slow-password")
    return hashed, time.perf_counter() - begin


@pytest.mark.gen_test(timeout=60)
async def test_event_loop_stays_responsive_during_bcrypt(
    tmp_path: Path, slow_hash: Tuple[str, float], server_url: str
) -> None:
    hashed, one_check = slow_hash
    users = "".join(f"slow{i} = {hashed}\n" for i in range(4))
    path = tmp_path / "slow.ini"
    path.write_text(f"[users]\n{users}[access]\n* = public=r\n")
    policy = IniPolicy(str(path))
    started = time.perf_counter()
    checks = asyncio.ensure_future(
        asyncio.gather(*(policy.authenticate(fake_request(f"slow{i}", "slow-password")) for i in range(4)))
    )
    latencies = []
    while not checks.done():
        begin = time.perf_counter()
        response = await get(f"{server_url}/nothing-here")  # a 404 the server answers itself
        latencies.append(time.perf_counter() - begin)
        assert response.code == 404
        await asyncio.sleep(0.01)
    assert await checks == [f"slow{i}" for i in range(4)]
    verifying = time.perf_counter() - started
    latencies.sort()
    median, p90 = latencies[len(latencies) // 2], latencies[len(latencies) * 9 // 10]
    print(
        f"one bcrypt-13 check ~{one_check:.2f}s; 4 took {verifying:.2f}s; {len(latencies)} GETs meanwhile, "
        f"median {median * 1000:.1f} ms, 90th percentile {p90 * 1000:.1f} ms, "
        f"max {latencies[-1] * 1000:.1f} ms"
    )
    # Run on the loop, the checks would let a handful of GETs through between them, each
    # waiting a whole check; off it, GETs keep flowing at their usual speed.  (Bounds are
    # generous: the machine may be busy with other work.)
    assert len(latencies) >= 30
    assert median < 0.05
    assert p90 < 0.25


# -- throttling ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "throttle_settings",
    [{"free": 2, "limit": 4, "delay": 0.3, "max_delay": 0.3, "window": 60}],
    ids=["small"],
)
@pytest.mark.gen_test(timeout=60)
async def test_repeated_failures_are_delayed_then_refused(
    throttle_settings: Dict[str, Any], repositories: Path, server_url: str
) -> None:
    url = f"{server_url}/proj.git{ADVERTISE}"
    # A success before the attack is cached: it keeps working throughout.
    assert (await get(url, "alice", CREDENTIALS["alice"])).code == 200
    durations = []
    for guess in range(4):
        begin = time.perf_counter()
        assert (await get(url, "bob", f"guess-{guess}")).code == 401
        durations.append(time.perf_counter() - begin)
    assert max(durations[:2]) < 0.25 and min(durations[2:]) >= 0.3

    refused = await get(url, "bob", "guess-4")
    assert refused.code == 429
    # 4 failures leak away over 60 s: the next attempt may come in 15 s.
    assert 10 <= int(refused.headers["Retry-After"]) <= 15
    assert "WWW-Authenticate" not in refused.headers
    # Even bob's right password is refused now from this address, without being checked...
    assert (await get(url, "bob", CREDENTIALS["bob"])).code == 429
    # ...but other users, verified credentials and anonymous reads are not.
    assert (await get(url, "carol", CREDENTIALS["carol"])).code == 404
    assert (await get(url, "alice", CREDENTIALS["alice"])).code == 200
    assert (await get(f"{server_url}/public.git{ADVERTISE}")).code == 200


@pytest.mark.gen_test
async def test_throttle_is_per_address_and_forgets(access_file: Path) -> None:
    now = [1000.0]
    throttle = FailureThrottle(free=1, limit=3, delay=0.01, window=60, clock=lambda: now[0])
    policy = IniPolicy(str(access_file), throttle=throttle)
    for guess in range(3):
        with pytest.raises(AuthenticationFailed):
            await policy.authenticate(fake_request("bob", f"guess-{guess}", address="198.51.100.7"))
    with pytest.raises(AccessDenied) as refused:
        await policy.authenticate(fake_request("bob", CREDENTIALS["bob"], address="198.51.100.7"))
    assert (refused.value.status_code, refused.value.retry_after) == (429, 20)
    # Someone elsewhere logs in as usual, with no delay.
    begin = time.perf_counter()
    assert await policy.authenticate(fake_request("bob", CREDENTIALS["bob"], address="203.0.113.9")) == "bob"
    assert time.perf_counter() - begin < 0.2
    now[0] += 21  # one failure has leaked away
    assert await policy.authenticate(fake_request("bob", CREDENTIALS["bob"], address="198.51.100.7")) == "bob"


@pytest.mark.gen_test
async def test_throttle_state_is_bounded() -> None:
    throttle = FailureThrottle(max_clients=100)
    for i in range(5000):
        await throttle.admit(f"10.0.{i // 256}.{i % 256}", "someone")
    assert len(throttle) == 100  # an address and its user, for each of the last 50 addresses
    assert throttle.failures("10.0.19.135") == pytest.approx(1, abs=0.01)  # the most recent are kept
    assert throttle.failures("10.0.0.1") == 0


# -- reload ----------------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_changes_apply_without_restart(
    repositories: Path, server_url: str, access_file: Path, caplog
) -> None:
    url = f"{server_url}/private.git{ADVERTISE}"
    assert (await get(url, "bob", CREDENTIALS["bob"])).code == 404

    access_file.write_text(DEFAULT_ACCESS + "bob = private=r\n")
    begin = time.perf_counter()
    assert await wait_until_status(url, 200, "bob", CREDENTIALS["bob"])
    assert time.perf_counter() - begin < 2.5

    # A broken file keeps the last good rules and says why (once).
    access_file.write_text(DEFAULT_ACCESS + "bob = private=r\n[users]\neve = hunter2\n")
    eve_line = DEFAULT_ACCESS.count("\n") + 3
    await asyncio.sleep(1.2)
    for _ in range(3):
        assert (await get(url, "bob", CREDENTIALS["bob"])).code == 200
        await asyncio.sleep(0.4)
    errors = [r.getMessage() for r in caplog.records if "keeping the previous access rules" in r.getMessage()]
    assert len(errors) == 1
    assert f"line {eve_line}: user 'eve'" in errors[0] and "hunter2" not in errors[0]

    # Deleting bob's password with gittornado-passwd locks him out.
    run_passwd(access_file, "bob", "-D", input=None, expect_ok=False)  # the file is broken: refused
    access_file.write_text(DEFAULT_ACCESS + "bob = private=r\n")
    run_passwd(access_file, "bob", "-D", input=None)
    assert await wait_until_status(url, 401, "bob", CREDENTIALS["bob"])


async def wait_until_status(url: str, status: int, user: str, password: str, timeout: float = 5.0) -> bool:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if (await get(url, user, password)).code == status:
            return True
        await asyncio.sleep(0.1)
    return False


def run_passwd(path: Path, user: str, *options: str, input: Optional[str], expect_ok: bool = True) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "gittornado.passwd", *options, str(path), user],
        input=input,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode == 0) == expect_ok, result.stderr
    return result.stderr


def http_status(url: str) -> Tuple[int, Dict[str, str]]:
    """Status and headers (lower-cased names) of a GET from a synchronous test."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}


def test_sighup_reloads_at_once(
    git: GitClient, gitbase: Path, repo: Path, tmp_path: Path, spawn_server
) -> None:
    access = tmp_path / "users.ini"
    access.write_text(f"[users]\n{USERS}[access]\n* = xxxx.git=r\n")
    server = spawn_server("--gitbase", str(gitbase), "--accessfile", str(access), "--realm", "Our Git")
    url = f"{server.url}/proj.git{ADVERTISE}"
    status, headers = http_status(url)
    assert (status, headers["www-authenticate"]) == (401, 'Basic realm="Our Git"')

    # Same size, same inode, mtime put back: only SIGHUP can notice this change.
    before = access.stat()
    with open(access, "r+") as f:
        f.write(access.read_text().replace("* = xxxx.git=r", "* = proj.git=r"))
    os.utime(access, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = access.stat()
    assert (after.st_mtime_ns, after.st_size, after.st_ino) == (
        before.st_mtime_ns,
        before.st_size,
        before.st_ino,
    )
    time.sleep(1.5)
    assert http_status(url)[0] == 401

    server.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 2
    while http_status(url)[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert http_status(url)[0] == 200, server.log()
    assert server.proc.poll() is None
    assert "access rules loaded" in server.log()


def test_broken_file_stops_the_server_at_startup(gitbase: Path, tmp_path: Path) -> None:
    access = tmp_path / "broken.ini"
    access.write_text(f"[users]\n{USERS}bob2 = my-plain-password\n")
    result = subprocess.run(
        [
            "gittornado",
            "--port",
            "0",
            "--address",
            "127.0.0.1",
            "--gitbase",
            str(gitbase),
            "--accessfile",
            str(access),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert f"{access}, line 5: user 'bob2'" in result.stderr
    assert "my-plain-password" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr

    missing = subprocess.run(
        ["gittornado", "--port", "0", "--gitbase", str(gitbase), "--accessfile", str(tmp_path / "nope.ini")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert missing.returncode != 0 and "nope.ini" in missing.stderr


# -- git hooks see the user; secrets never leak ----------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_remote_user_reaches_hooks(git: GitClient, repo: Path, server_url: str, tmp_path: Path) -> None:
    seen = tmp_path / "seen"
    hook = repo / "hooks" / "pre-receive"
    hook.write_text(f'#!/bin/sh\necho "$REMOTE_USER" > "{seen}"\n')
    hook.chmod(0o755)
    work = tmp_path / "work"
    git.sync("clone", "-q", str(repo), str(work))
    git.sync("commit", "-q", "--allow-empty", "-m", "by alice", cwd=work)
    url = with_credentials(f"{server_url}/proj.git", "alice", CREDENTIALS["alice"])
    await git.run("push", "-q", url, "HEAD:refs/heads/by-alice", cwd=work)
    assert seen.read_text() == "alice\n"


@pytest.mark.parametrize("throttle_settings", [{"free": 100, "limit": 100}], ids=["no-delays"])
@pytest.mark.gen_test(timeout=60)
async def test_passwords_never_reach_logs_or_pages(
    throttle_settings: Dict[str, Any],
    git: GitClient,
    repositories: Path,
    server_url: str,
    access_file: Path,
    policy: IniPolicy,
    tmp_path: Path,
    caplog,
) -> None:
    caplog.set_level("DEBUG")
    wrong = "Wr0ng-Guess-Pa55"
    bodies = []
    for user, password in [
        ("alice", wrong),
        ("alice", CREDENTIALS["alice"]),
        ("nobody", wrong),
        ("bob", wrong),
    ]:
        for path in ("/proj.git" + ADVERTISE, "/proj.git" + RECEIVE, "/private.git/HEAD"):
            response = await get(server_url + path, user, password)
            bodies.append(response.body.decode(errors="replace"))
    for password in (wrong, CREDENTIALS["alice"]):
        url = with_credentials(f"{server_url}/proj.git", "alice", password)
        await git.run("clone", "-q", url, str(tmp_path / f"clone-{len(password)}"), check=False)
    access_file.write_text(DEFAULT_ACCESS + f"[users]\neve = {wrong}\n")
    assert not policy.reload()

    secrets = [wrong, CREDENTIALS["alice"]]
    secrets += [base64.b64encode(f"alice:{p}".encode()).decode() for p in secrets]
    text = caplog.text + "".join(bodies)
    assert "authentication failed for user 'alice'" in caplog.text
    for secret in secrets:
        assert secret not in text
