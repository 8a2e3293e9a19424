"""users.ini logins under attack: what an attacker tried, and what each attempt must now get.

Parallel guesses are counted before they are checked; one client's queue of
checks does not hold up another client's login; clients that resend a refused
password (libgit2, JGit) cost one failure, not a lockout; one user's failures
do not lock out the other users of an address, but spraying names does get
stopped; IPv6 clients are counted by /64; and a rejection takes as long
whether or not the name exists.  Everything goes over real HTTP to the
in-process server, from several loopback addresses (127.0.0.x), except the
rules that need other addresses or a clock (the throttle called directly).
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
from passlib.hash import bcrypt
from test_access import ADVERTISE, CREDENTIALS, USERS, basic, fake_request, fixture_users
from tornado.httpclient import AsyncHTTPClient

import gittornado.inipolicy
from gittornado.access import AccessDenied, AuthenticationFailed, FailureThrottle, IniPolicy
from gittornado.inipolicy import client_group

#: alice (bcrypt), bob (apr1), carol (sha512) may read proj.git.
ACCESS = f"[users]\n{USERS}[access]\nalice = proj=r\nbob = proj=r\ncarol = proj=r\n"


@pytest.fixture
def access_text() -> str:
    return ACCESS


@pytest.fixture
def settings() -> Dict[str, Any]:
    """IniPolicy keyword arguments; ``throttle`` is a dict of FailureThrottle arguments."""
    return {}


@pytest.fixture
def policy(tmp_path: Path, access_text: str, settings: Dict[str, Any]) -> IniPolicy:
    path = tmp_path / "users.ini"
    path.write_text(access_text)
    options = dict(settings)
    throttle = FailureThrottle(**options.pop("throttle", {}))
    return IniPolicy(str(path), realm="attacks", throttle=throttle, **options)


@pytest.fixture
def url(http_server, http_port: int, repo: Path) -> str:
    return f"http://127.0.0.1:{http_port}/proj.git{ADVERTISE}"


@pytest.fixture
def client() -> Iterator[AsyncHTTPClient]:
    """An HTTP client that really sends hundreds of requests at once."""
    http = AsyncHTTPClient(force_instance=True, max_clients=500)
    yield http
    http.close()


async def attempt(
    client: AsyncHTTPClient, url: str, user: str, password: str, source: str = "127.0.0.1"
) -> Tuple[int, float]:
    """(status, seconds) of one login from loopback address ``source``."""
    begin = time.perf_counter()
    response = await client.fetch(
        url, headers=basic(user, password), network_interface=source, raise_error=False, request_timeout=60
    )
    return response.code, time.perf_counter() - begin


@pytest.fixture
def checks(monkeypatch) -> Dict[str, Any]:
    """Watches the real password check: which passwords it saw, and how many guesses ran at once."""
    seen: Dict[str, Any] = {"passwords": [], "running": 0, "most": 0}
    lock = threading.Lock()
    real = gittornado.inipolicy.verify_password

    def watched(password: bytes, hashed: str) -> bool:
        guess = password.startswith(b"guess-")  # not the server's own measuring of the hashes
        with lock:
            seen["passwords"].append(password)
            seen["running"] += guess
            seen["most"] = max(seen["most"], seen["running"])
        try:
            return real(password, hashed)
        finally:
            with lock:
                seen["running"] -= guess

    monkeypatch.setattr(gittornado.inipolicy, "verify_password", watched)
    return seen


# -- 1. parallel guessing --------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_parallel_guesses_are_counted_before_they_are_checked(
    url: str, client: AsyncHTTPClient, checks: Dict[str, Any]
) -> None:
    """150 different wrong passwords at once: only the throttle's 20 are checked, the rest get 429."""
    results = await asyncio.gather(*(attempt(client, url, "bob", f"guess-{i}") for i in range(150)))
    codes = [code for code, _ in results]
    assert codes.count(401) <= 20 and codes.count(429) >= 130, sorted(set(codes))
    assert sum(password.startswith(b"guess-") for password in checks["passwords"]) <= 20
    # Other users of the address are not locked out by bob's failures.
    assert (await attempt(client, url, "carol", CREDENTIALS["carol"]))[0] == 200


@pytest.mark.parametrize("settings", [{"workers": 4, "throttle": {"free": 1000, "limit": 1000}}])
@pytest.mark.gen_test(timeout=60)
async def test_one_client_runs_few_checks_at_once(
    settings: Dict[str, Any], url: str, client: AsyncHTTPClient, checks: Dict[str, Any]
) -> None:
    results = await asyncio.gather(*(attempt(client, url, "alice", f"guess-{i}") for i in range(30)))
    assert {code for code, _ in results} == {401}
    assert checks["most"] <= 2  # of 4 threads: the other two stay free for other clients


SLOW_HASH = bcrypt.using(ident="2y", rounds=11).hash("slow-secret")


@pytest.mark.parametrize(
    "access_text", [f"[users]\ntarget = {SLOW_HASH}\n{USERS}[access]\nalice = proj=r\n"], ids=["slow"]
)
@pytest.mark.parametrize("settings", [{"throttle": {"free": 1000, "limit": 1000}}], ids=["no-limit"])
@pytest.mark.gen_test(timeout=60)
async def test_a_flood_of_checks_does_not_hold_up_another_clients_login(
    settings: Dict[str, Any], access_text: str, url: str, client: AsyncHTTPClient
) -> None:
    """40 parallel guesses at a bcrypt-11 user from 127.0.0.2 fill both threads of the pool;
    alice's login from 127.0.0.3 takes the next free thread, not a place behind all 40."""
    flood = [
        asyncio.ensure_future(attempt(client, url, "target", f"guess-{i}", source="127.0.0.2"))
        for i in range(40)
    ]
    await asyncio.sleep(0.3)  # the flood is queued and running
    code, seconds = await attempt(client, url, "alice", CREDENTIALS["alice"], source="127.0.0.3")
    finished = sum(future.done() for future in flood)
    results = await asyncio.gather(*flood)
    assert code == 200
    assert {code for code, _ in results} == {401}
    assert finished < 20, f"alice waited for {finished} of the 40 guesses ({seconds:.2f} s)"


# -- 2. resent and sprayed passwords ---------------------------------------------------------------


@pytest.mark.gen_test(timeout=90)
async def test_a_resent_wrong_password_counts_once(
    url: str, client: AsyncHTTPClient, checks: Dict[str, Any]
) -> None:
    """libgit2 resends a refused password 14 times per operation: two typos must not lock anyone out."""
    begin = time.perf_counter()
    for typo in ("typo-1", "typo-2"):
        for _ in range(14):
            assert (await attempt(client, url, "alice", typo))[0] == 401
    assert time.perf_counter() - begin < 5  # each typo checked once, the resends answered at once
    assert checks["passwords"].count(b"typo-1") == 1 and checks["passwords"].count(b"typo-2") == 1
    for user in ("alice", "bob"):
        assert (await attempt(client, url, user, CREDENTIALS[user]))[0] == 200


@pytest.mark.parametrize("settings", [{"throttle": {"delay": 0.01, "max_delay": 0.01}}], ids=["fast"])
@pytest.mark.gen_test(timeout=60)
async def test_one_users_failures_do_not_lock_out_the_address(
    settings: Dict[str, Any], url: str, client: AsyncHTTPClient
) -> None:
    codes = [(await attempt(client, url, "bob", f"guess-{i}"))[0] for i in range(25)]
    assert codes == [401] * 20 + [429] * 5
    assert (await attempt(client, url, "bob", CREDENTIALS["bob"]))[0] == 429
    # carol and alice, behind the same address, log in as usual.
    assert (await attempt(client, url, "carol", CREDENTIALS["carol"]))[0] == 200
    assert (await attempt(client, url, "alice", CREDENTIALS["alice"]))[0] == 200


@pytest.mark.parametrize("settings", [{"throttle": {"delay": 0.01, "max_delay": 0.01}}], ids=["fast"])
@pytest.mark.gen_test(timeout=60)
async def test_spraying_names_from_one_address_is_stopped(
    settings: Dict[str, Any], url: str, client: AsyncHTTPClient
) -> None:
    results = await asyncio.gather(
        *(attempt(client, url, f"user{i:03}", "Summer2024!", source="127.0.0.2") for i in range(130))
    )
    codes = [code for code, _ in results]
    assert (codes.count(401), codes.count(429)) == (100, 30)
    # The price: until its failures leak away, the address gets no new login checked...
    assert (await attempt(client, url, "alice", CREDENTIALS["alice"], source="127.0.0.2"))[0] == 429
    # ...while everyone else's are.
    assert (await attempt(client, url, "alice", CREDENTIALS["alice"], source="127.0.0.3"))[0] == 200


@pytest.mark.gen_test
async def test_guesses_per_hour_are_what_the_readme_says() -> None:
    """One guess a second for two hours: 20 an hour at one name, 100 an hour over many names."""
    now = [0.0]
    throttle = FailureThrottle(delay=0, max_delay=0, clock=lambda: now[0])

    async def admitted(client: str, name: Any) -> List[int]:
        per_hour = [0, 0]
        for second in range(7200):
            now[0] = second
            try:
                await throttle.admit(client, name(second))
            except AccessDenied as refused:
                assert refused.status_code == 429
            else:
                per_hour[second // 3600] += 1
        return per_hour

    # A burst of the limit, then one as each failure leaks away (every 3 minutes, every 36 s).
    first_hour, second_hour = await admitted("192.0.2.1", lambda second: "alice")
    assert 38 <= first_hour <= 40 and 19 <= second_hour <= 21
    first_hour, second_hour = await admitted("192.0.2.2", lambda second: f"name{second}")
    assert 190 <= first_hour <= 200 and 99 <= second_hour <= 101


# -- IPv6 clients by /64 ---------------------------------------------------------------------------


def test_addresses_are_grouped_by_what_one_client_owns() -> None:
    assert client_group("2001:db8:1:2:a:b:c:d") == client_group("2001:db8:1:2::ffff") == "2001:db8:1:2::/64"
    assert client_group("2001:db8:1:3::1") != client_group("2001:db8:1:2::1")
    assert client_group("::ffff:198.51.100.7") == "198.51.100.7"
    assert client_group("198.51.100.7") != client_group("198.51.100.8")
    assert client_group("fe80::1%eth0") == "fe80::/64"


@pytest.mark.gen_test
async def test_a_whole_ipv6_64_counts_as_one_client(tmp_path: Path) -> None:
    path = tmp_path / "users.ini"
    path.write_text(ACCESS)
    policy = IniPolicy(str(path), throttle=FailureThrottle(free=3, limit=3))
    for i in range(3):  # each guess from another address of the same /64
        with pytest.raises(AuthenticationFailed):
            await policy.authenticate(fake_request("bob", f"guess-{i}", address=f"2001:db8:0:7::{i + 1}"))
    with pytest.raises(AccessDenied) as refused:
        await policy.authenticate(fake_request("bob", CREDENTIALS["bob"], address="2001:db8:0:7:ffff::1"))
    assert refused.value.status_code == 429
    elsewhere = fake_request("bob", CREDENTIALS["bob"], address="2001:db8:0:8::1")
    assert await policy.authenticate(elsewhere) == "bob"


# -- 3. no name probing by timing ------------------------------------------------------------------

#: bcrypt first (the old decoy), then the cheap formats htpasswd writes.
MIXED = (
    f"[users]\nfirst = {bcrypt.using(ident='2y', rounds=10).hash('first-secret')}\n"
    + fixture_users("apr1", "sha1", "sha512")
    + "[access]\n* = proj=r\n"
)


@pytest.mark.parametrize("access_text", [MIXED], ids=["mixed"])
@pytest.mark.parametrize("settings", [{"throttle": {"free": 1000, "limit": 1000}}], ids=["no-limit"])
@pytest.mark.gen_test(timeout=60)
async def test_rejections_take_as_long_whether_or_not_the_name_exists(
    settings: Dict[str, Any], access_text: str, url: str, client: AsyncHTTPClient
) -> None:
    hashed = bcrypt.using(ident="2y", rounds=10).hash("y")
    begin = time.perf_counter()
    bcrypt.verify("x", hashed)
    one_check = time.perf_counter() - begin
    await attempt(client, url, "warm-up", "nothing")  # the first rejection measures the file's hashes
    # Passwords bcrypt refuses unchecked (a NUL byte) must not teach the server that checks are quick.
    for i in range(10):
        assert (await attempt(client, url, "first", f"nul-{i}\x00"))[0] == 401
    existing: List[float] = []
    unknown: List[float] = []
    cpu: Optional[float] = None
    for round_ in range(3):
        for name in ("apr1", "sha1", "sha512", "first"):
            code, seconds = await attempt(client, url, name, f"wrong-{round_}")
            assert code == 401
            existing.append(seconds)
        cpu_before = time.process_time()
        for name in ("ghost", "apr2", "nobody", "firsts"):
            code, seconds = await attempt(client, url, name, f"wrong-{round_}")
            assert code == 401
            unknown.append(seconds)
        cpu = (cpu or 0.0) + time.process_time() - cpu_before
    summary = f"existing {sorted(existing)}, unknown {sorted(unknown)}, one check {one_check:.3f} s"
    # Each rejection waits about one check of the slowest hash (bcrypt-10), known name or not.
    assert min(existing + unknown) >= 0.5 * one_check, summary
    assert 0.5 <= statistics.median(existing) / statistics.median(unknown) <= 2, summary
    assert min(unknown) <= max(existing) and min(existing) <= max(unknown), summary
    # ...by waiting, not by computing: 12 unknown names cost far less CPU than 12 checks.
    assert cpu is not None and cpu < 0.5 * 12 * one_check, summary
