"""Tokens for automation: made by gittornado-passwd, used by the real git client as the HTTP password.

A token logs its user in for the intersection of its scope and the user's
own rights, until it expires or is revoked (no restart); malformed tokens are
refused at once, wrong ones go through the password throttle, and neither a
token nor its hash ever reaches a log line.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Dict, Tuple

import pytest
from conftest import GitClient, make_repo
from test_access import CREDENTIALS, USERS, basic, with_credentials
from tornado.httpclient import AsyncHTTPClient

from gittornado import GitBackend, RepositoryRoot
from gittornado.inipolicy import FailureThrottle, IniPolicy
from gittornado.observe import Metrics
from gittornado.passwords import new_token, token_digest
from gittornado.process import GitProcesses

#: alice (bcrypt) may push to team/* and other; bob (apr1) may only read team/*.
ACCESS = f"[users]\n{USERS}\n[access]\nalice = team/*=rw, other=rw\nbob = team/*=r\n"
ADVERTISE = "/info/refs?service=git-upload-pack"


def passwd(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """gittornado-passwd from this checkout (not an installed copy)."""
    result = subprocess.run(
        [sys.executable, "-m", "gittornado.passwd", *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def make_token(access_file: Path, user: str, *scopes: str, right: str = "r") -> Tuple[str, str]:
    """(id, token) of a new token made by the command; the token is its standard output, alone."""
    args = [f"--scope={scope}" for scope in scopes]
    result = passwd("--new-token", *args, "--right", right, str(access_file), user)
    token = result.stdout.strip()
    assert token.startswith("gtt_") and "\n" not in token
    return token.split("_")[1], token


@pytest.fixture
def access_file(tmp_path: Path) -> Path:
    path = tmp_path / "users.ini"
    path.write_text(ACCESS)
    return path


@pytest.fixture
def throttle_settings() -> Dict[str, Any]:
    return {}


@pytest.fixture
def policy(access_file: Path, throttle_settings: Dict[str, Any]) -> IniPolicy:
    return IniPolicy(
        str(access_file), realm="tokens", check_interval=0.1, throttle=FailureThrottle(**throttle_settings)
    )


@pytest.fixture
def backend(gitbase: Path, policy: IniPolicy) -> GitBackend:
    processes = GitProcesses()
    return GitBackend(
        lookup=RepositoryRoot(str(gitbase)), policy=policy, processes=processes, metrics=Metrics(processes)
    )


@pytest.fixture
def repos(git: GitClient, gitbase: Path) -> Path:
    make_repo(git, gitbase, "team/app.git")
    make_repo(git, gitbase, "other.git")
    return gitbase


async def status(url: str, user: str, password: str) -> int:
    response = await AsyncHTTPClient().fetch(url, headers=basic(user, password), raise_error=False)
    return response.code


@pytest.mark.gen_test(timeout=60)
async def test_clone_and_push_with_a_token_logged_as_token_never_the_secret(
    git: GitClient, repos: Path, base_url: str, access_file: Path, tmp_path: Path, caplog
) -> None:
    caplog.set_level(logging.DEBUG)
    token_id, token = make_token(access_file, "alice", "team/*", right="rw")
    digest = token_digest(token.encode())
    assert digest in access_file.read_text() and token not in access_file.read_text()
    url = with_credentials(f"{base_url}/team/app.git", "alice", token)
    work = tmp_path / "clone"
    await git.run("clone", "-q", url, str(work))
    (work / "ci.txt").write_text("built by CI\n")
    git.sync("add", "ci.txt", cwd=work)
    git.sync("commit", "-q", "-m", "from CI", cwd=work)
    await git.run("push", "-q", "origin", "HEAD:main", cwd=work)
    assert git.sync("log", "-1", "--format=%s", "main", cwd=repos / "team/app.git").strip() == "from CI"

    listed = passwd("--list-tokens", str(access_file), "alice").stdout
    assert token_id in listed and "team/*=rw" in listed and "expires" in listed
    assert token not in listed and digest not in listed
    metrics = (await AsyncHTTPClient().fetch(f"{base_url}/metrics")).body.decode()

    access = [
        r.getMessage()
        for r in caplog.records
        if r.name == "gittornado.access" and "repo=team" in r.getMessage()
    ]
    # git asks anonymously first (401), then with the token
    logged_in = [line for line in access if "status=401" not in line]
    assert len(logged_in) >= 4 and all(f"user=alice auth=token:{token_id} " in line for line in logged_in)
    pushes = [line for line in access if "service=git-receive-pack" in line]
    assert pushes and all("status=200" in line for line in pushes)
    # clone: advertisement + fetch; push: advertisement + POST (at least)
    logins = float(metrics.split("\ngittornado_token_logins_total ")[1].split()[0])
    assert logins >= 4
    secret = token.split("_", 2)[2]
    assert secret not in caplog.text and digest not in caplog.text


@pytest.mark.gen_test(timeout=60)
async def test_a_token_never_grants_more_than_its_scope_nor_than_its_user_has(
    git: GitClient, repos: Path, base_url: str, access_file: Path, tmp_path: Path
) -> None:
    _, read_only = make_token(access_file, "alice", "team/*", right="r")
    _, team_only = make_token(access_file, "alice", "team/*", right="rw")
    _, bobs_rw = make_token(access_file, "bob", "*", right="rw")
    await AsyncHTTPClient().fetch(f"{base_url}/healthz")  # the policy notices the file change meanwhile
    time.sleep(0.2)

    clone = tmp_path / "clone"
    await git.run("clone", "-q", with_credentials(f"{base_url}/team/app.git", "alice", read_only), str(clone))
    git.sync("commit", "-q", "--allow-empty", "-m", "nope", cwd=clone)
    # An r token of a user who may push: 403.
    push = await git.run("push", "origin", "HEAD:main", cwd=clone, check=False)
    assert push.returncode != 0 and "403" in push.stderr
    # A team/* token cannot read other, which alice's password can.
    other = f"{base_url}/other.git{ADVERTISE}"
    assert await status(other, "alice", CREDENTIALS["alice"]) == 200
    assert await status(other, "alice", team_only) == 404
    # bob may only read team/*: his rw token on * cannot push there, nor read other.
    url = with_credentials(f"{base_url}/team/app.git", "bob", bobs_rw)
    push = await git.run("push", url, "HEAD:main", cwd=clone, check=False)
    assert push.returncode != 0 and "403" in push.stderr
    assert await status(f"{base_url}/team/app.git{ADVERTISE}", "bob", bobs_rw) == 200
    assert await status(other, "bob", bobs_rw) == 404
    # A token is its user's only: bob cannot use alice's.
    assert await status(f"{base_url}/team/app.git{ADVERTISE}", "bob", team_only) == 401


@pytest.mark.gen_test(timeout=60)
async def test_expired_and_revoked_tokens_get_401_without_a_restart(
    repos: Path, base_url: str, access_file: Path
) -> None:
    url = f"{base_url}/team/app.git{ADVERTISE}"
    token_id, token = make_token(access_file, "alice", "team/*")
    assert await status(url, "alice", token) == 200
    assert await status(url, "alice", token) == 200  # now remembered as verified
    passwd("--revoke-token", token_id, str(access_file))
    assert token_id not in access_file.read_text()
    time.sleep(0.2)  # the policy looks at the file every 0.1 s
    assert await status(url, "alice", token) == 401

    # An expired line, as a token made long ago would have it.
    old_id, old = new_token()
    past = (datetime.now(timezone.utc) - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    with access_file.open("a") as f:
        f.write(f"\n[tokens]\n{old_id} = alice {token_digest(old.encode())} {past} team/*=r\n")
    time.sleep(0.2)
    assert await status(url, "alice", old) == 401
    listed = passwd("--list-tokens", str(access_file)).stdout
    assert f"{old_id}  alice  EXPIRED {past}" in listed


@pytest.mark.gen_test(timeout=60)
async def test_malformed_tokens_get_401_at_once_and_the_server_keeps_serving(
    repos: Path, base_url: str, access_file: Path, policy: IniPolicy, caplog
) -> None:
    caplog.set_level(logging.DEBUG)
    url = f"{base_url}/team/app.git{ADVERTISE}"
    _, token = make_token(access_file, "alice", "team/*")
    malformed = [
        "gtt_",
        "gtt_" + "A" * 8000,
        "gtt_0123456789ab_" + "!" * 43,
        "gtt_0123456789ab_" + "A" * 42,
        token + "x",
        token[:-1] + "\u00e9",
        "gtt_0123456789AB_" + token[-43:],
    ]
    for password in malformed * 3:
        began = time.monotonic()
        assert await status(url, "alice", password) == 401
        assert time.monotonic() - began < 1.0
    # Refused by their shape, they cost no throttle count: alice's token still works at once.
    assert policy.throttle.failures("127.0.0.1") == 0
    assert await status(url, "alice", token) == 200
    # Not tokens, but passwords (wrong ones): refused like any wrong password.
    for password in ["", "ghp_" + token[4:], token.upper()]:
        assert await status(url, "alice", password) == 401
    assert round(policy.throttle.failures("127.0.0.1")) == 3  # token.upper() starts "GTT_": a password, too
    assert await status(url, "alice", token) == 200
    text = caplog.text
    assert token.split("_", 2)[2] not in text and "A" * 40 not in text and "!" * 40 not in text


@pytest.mark.parametrize("throttle_settings", [{"free": 1, "limit": 3, "delay": 0.01}])
@pytest.mark.gen_test(timeout=60)
async def test_wrong_tokens_go_through_the_password_throttle(
    repos: Path, base_url: str, access_file: Path, policy: IniPolicy
) -> None:
    url = f"{base_url}/team/app.git{ADVERTISE}"
    token_id, token = make_token(access_file, "alice", "team/*")
    # Well formed, right id, wrong secret: each a new guess.
    guesses = [f"gtt_{token_id}_{os.urandom(32).hex()[:43]}" for _ in range(4)]
    codes = [await status(url, "alice", guess) for guess in guesses]
    assert codes == [401, 401, 401, 429]
    # The same wrong token again costs nothing more (remembered as refused).
    assert await status(url, "alice", guesses[0]) == 401
    assert round(policy.throttle.failures("127.0.0.1", "alice")) == 3  # leaking away slowly
    # Another user of the address is not locked out by alice's failures.
    assert await status(url, "bob", CREDENTIALS["bob"]) == 200
    # Thirty guesses for bob at once are counted as they arrive: three are checked, the rest get 429.
    bobs = [f"gtt_{token_id}_{os.urandom(32).hex()[:43]}" for _ in range(30)]
    codes = await asyncio.gather(*(status(url, "bob", guess) for guess in bobs))
    assert sorted(codes) == [401] * 3 + [429] * 27


def test_tokens_round_trip_through_the_command_and_deleting_a_user_revokes_them(tmp_path: Path) -> None:
    path = tmp_path / "users.ini"
    original = (
        f"; keep me\r\n[users]\r\n{USERS.replace(chr(10), chr(13) + chr(10))}\r\n[access]\r\nalice = x=r\r\n"
    )
    path.write_bytes(original.encode())
    token_id, _ = make_token(path, "alice", "team/*", "docs.git", right="rw")
    after = path.read_bytes().decode()
    assert after.startswith(original) and after.count("\n") == original.count("\n") + 3
    assert f"{token_id} = alice " in after and after.endswith("team/*=rw, docs.git=rw\r\n")
    passwd("--revoke-token", token_id, str(path))
    assert path.read_bytes().decode() == original + "\r\n[tokens]\r\n"
    refused = passwd("--new-token", "--scope=x", str(path), "nobody", check=False)
    assert refused.returncode != 0 and "no user 'nobody'" in refused.stderr
    second, _ = make_token(path, "bob", "x")
    passwd("-D", str(path), "bob")
    assert second not in path.read_text() and "bob" not in path.read_text()
    assert "--revoke-token ID" in passwd("--help").stdout
