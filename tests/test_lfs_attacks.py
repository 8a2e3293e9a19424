"""Git LFS against bad input: every malformed or hostile request gets its documented status and a JSON
message, stores nothing, touches nothing outside the repository, and the server keeps serving."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import re
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import urlsplit, urlunsplit

import pytest
from conftest import raw_http
from tornado.httpclient import AsyncHTTPClient, HTTPResponse

from gittornado import GitBackend, RepositoryRoot
from gittornado.access import AccessPolicy, AuthenticationFailed
from gittornado.lfs import LfsServer
from gittornado.lfs.signing import load_secret
from gittornado.permission import Permission

LFS_JSON = "application/vnd.git-lfs+json"
OID = hashlib.sha256(b"hello lfs\n").hexdigest()


class TeamPolicy(AccessPolicy):
    """An embedder's own policy, written without LFS in mind: a user header; writer may write, reader read."""

    realm = "team"

    def authenticate(self, request):
        user = request.headers.get("X-User")
        if user not in (None, "writer", "reader"):
            raise AuthenticationFailed("unknown user")
        return user

    def authorize(self, user, repository, permission):
        return user == "writer" or (user == "reader" and permission is Permission.READ)


@pytest.fixture
def policy() -> AccessPolicy:
    return TeamPolicy()


@pytest.fixture
def backend(gitbase: Path, policy: AccessPolicy) -> GitBackend:
    lfs = LfsServer.from_secret_file(str(gitbase / ".gittornado" / "lfs-secret"), max_object_size=4 * 2**20)
    return GitBackend(lookup=RepositoryRoot(str(gitbase)), policy=policy, lfs=lfs, idle_timeout=1.0)


async def fetch(
    url: str, method: str = "GET", body: Any = None, user: Optional[str] = "writer", **headers: str
) -> HTTPResponse:
    if user:
        headers["X-User"] = user
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    if method in ("POST", "PUT") and body is None:
        body = b""
    if method == "POST" and "Content-Type" not in headers:
        headers["Content-Type"] = LFS_JSON
    return await AsyncHTTPClient().fetch(url, method=method, body=body, headers=headers, raise_error=False)


async def batch(base_url: str, body: Any, user: Optional[str] = "writer") -> Tuple[int, Dict[str, Any]]:
    response = await fetch(f"{base_url}/proj.git/info/lfs/objects/batch", "POST", body, user)
    return response.code, json.loads(response.body)


def objects(operation: str, *items: Any) -> Dict[str, Any]:
    return {"operation": operation, "transfers": ["basic"], "objects": list(items)}


def lfs_files(repo: Path) -> List[str]:
    """Every file under the repository's lfs/ directory (objects and leftovers alike)."""
    return sorted(str(p.relative_to(repo)) for p in (repo / "lfs").rglob("*") if p.is_file())


async def upload_href(base_url: str, oid: str, size: int) -> str:
    code, answer = await batch(base_url, objects("upload", {"oid": oid, "size": size}))
    assert code == 200, answer
    return answer["objects"][0]["actions"]["upload"]["href"]


async def assert_still_serving(base_url: str, repo: Path) -> None:
    data = b"still serving\n"
    oid = hashlib.sha256(data).hexdigest()
    href = await upload_href(base_url, oid, len(data))
    assert (await fetch(href, "PUT", data, user=None)).code == 200
    assert (repo / "lfs" / "objects" / oid[:2] / oid[2:4] / oid).read_bytes() == data


@pytest.mark.gen_test(timeout=30)
async def test_malformed_objects_get_per_object_422_and_nothing_is_stored(base_url: str, repo: Path):
    bad = [
        {"oid": OID.upper(), "size": 1},
        {"oid": OID[:63], "size": 1},
        {"oid": "../../../../etc/passwd", "size": 1},
        {"oid": "../" + OID[3:], "size": 1},
        {"oid": 12345, "size": 1},
        {"oid": OID, "size": -1},
        {"oid": OID, "size": 2**70},
        {"oid": OID, "size": 1.5},
        {"oid": OID, "size": True},
        {"oid": OID, "size": "10"},
        "not an object",
    ]
    code, answer = await batch(base_url, objects("upload", *bad))
    assert code == 200
    assert [o["error"]["code"] for o in answer["objects"]] == [422] * len(bad)
    assert all("actions" not in o for o in answer["objects"])
    # Too large for this server (its cap is 4 MiB): refused before any byte moves.
    code, answer = await batch(base_url, objects("upload", {"oid": OID, "size": 4 * 2**20 + 1}))
    assert (
        answer["objects"][0]["error"]["code"] == 422 and "limit" in answer["objects"][0]["error"]["message"]
    )
    code, answer = await batch(base_url, objects("download", {"oid": OID, "size": 10}))
    assert answer["objects"][0]["error"] == {"code": 404, "message": "Object does not exist"}
    assert not (repo / "lfs").exists()
    await assert_still_serving(base_url, repo)


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize(
    "body, status, words",
    [
        (b"{not json", 422, "not valid JSON"),
        (b"[1, 2]", 422, "JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, 422, "not valid JSON"),  # nesting past the parser's recursion
        (json.dumps(objects("delete", {"oid": OID, "size": 1})).encode(), 422, "download or upload"),
        (json.dumps({**objects("upload"), "transfers": ["tus"]}).encode(), 422, "basic transfer"),
        (json.dumps({**objects("upload"), "hash_algo": "sha512"}).encode(), 409, "sha256"),
        (json.dumps({"operation": "upload", "objects": "all"}).encode(), 422, "objects must be a list"),
        (json.dumps(objects("upload", *[{"oid": OID, "size": 1}] * 1001)).encode(), 413, "At most 1000"),
        (json.dumps(objects("upload", *[{"oid": OID, "size": 1}] * 100_000)).encode(), 413, "larger than"),
        (b" " * (2 * 2**20), 413, "larger than"),
    ],
    ids=["garbage", "array", "deep", "operation", "transfer", "hash", "objects", "1001", "100000", "2MiB"],
)
async def test_bad_batch_requests_get_a_status_and_a_json_message(
    base_url: str, repo: Path, body: bytes, status: int, words: str
):
    response = await fetch(f"{base_url}/proj.git/info/lfs/objects/batch", "POST", body)
    assert response.code == status
    assert response.headers["Content-Type"] == LFS_JSON
    answer = json.loads(response.body)
    assert words in answer["message"] and len(answer["request_id"]) == 32
    assert not (repo / "lfs").exists()
    await assert_still_serving(base_url, repo)


@pytest.mark.gen_test(timeout=30)
async def test_chunked_json_beyond_the_cap_is_refused(base_url: str, repo: Path):
    async def body(write):  # no Content-Length: the cap is counted as the body arrives
        for _ in range(40):
            await write(b" " * 65536)
        await write(b"{}")

    response = await AsyncHTTPClient().fetch(
        f"{base_url}/proj.git/info/lfs/objects/batch",
        method="POST",
        body_producer=body,
        headers={"Content-Type": LFS_JSON, "X-User": "writer"},
        raise_error=False,
    )
    assert response.code == 413 and "larger than" in json.loads(response.body)["message"]
    await assert_still_serving(base_url, repo)


@pytest.mark.gen_test(timeout=30)
async def test_uploads_that_do_not_match_are_thrown_away(base_url: str, repo: Path, http_port: int):
    data = b"x" * 100_000
    oid = hashlib.sha256(data).hexdigest()
    href = await upload_href(base_url, oid, len(data))
    # Longer or shorter than the signed size: refused before a byte is stored.
    for body in (data + b"y", data[:-1]):
        response = await fetch(href, "PUT", body, user=None)
        assert response.code == 400 and "object's 100000 bytes" in json.loads(response.body)["message"]
    # The right length, the wrong content.
    response = await fetch(href, "PUT", b"z" * len(data), user=None)
    assert response.code == 422 and json.loads(response.body)["message"] == "The body's sha256 is not the oid"
    # A body cut short: the client announces all of it, sends most of it (a thread is writing) and leaves.
    data = os.urandom(3_500_000)
    oid = hashlib.sha256(data).hexdigest()
    href = await upload_href(base_url, oid, len(data))
    path = urlsplit(href)
    head = (
        f"PUT {path.path}?{path.query} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", http_port)
    writer.write(head + data[:3_000_000])
    await writer.drain()
    await asyncio.sleep(0.3)
    writer.close()
    await asyncio.sleep(0.3)
    assert lfs_files(repo) == []  # no object, no temporary file left
    # Chunked: no length to hold the body to, so refused before a byte is stored.

    async def chunks(write: Any) -> None:
        await write(data[:1000])
        await write(data[1000:])

    response = await AsyncHTTPClient().fetch(href, method="PUT", body_producer=chunks, raise_error=False)
    assert response.code == 411 and "Content-Length" in json.loads(response.body)["message"]
    assert lfs_files(repo) == []
    # Without a signature, a PUT is the policy's to allow, and needs its Content-Length.
    plain = f"{base_url}/proj.git/info/lfs/objects/{oid}"
    assert (await fetch(plain, "PUT", data, user="reader")).code == 403
    assert (await fetch(plain, "PUT", data, user=None)).code == 401
    assert lfs_files(repo) == []
    assert (await fetch(plain, "PUT", data, user="writer")).code == 200
    assert lfs_files(repo) == [f"lfs/objects/{oid[:2]}/{oid[2:4]}/{oid}"]


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize(
    "oid",
    [
        "..%2F..%2Fconfig",
        "%2e%2e",
        OID.upper(),
        OID + "0",
        "..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "%00" + OID[1:],
    ],
)
async def test_path_tricks_in_transfer_urls_get_422(base_url: str, repo: Path, oid: str):
    before = sorted(p.name for p in repo.iterdir())
    for method, suffix, body in (("GET", "", None), ("PUT", "", b"data"), ("POST", "/verify", "{}")):
        response = await fetch(f"{base_url}/proj.git/info/lfs/objects/{oid}{suffix}", method, body)
        assert response.code == 422, (method, response.code)
        assert "64 lower-case hex" in json.loads(response.body)["message"]
    assert sorted(p.name for p in repo.iterdir()) == before


@pytest.mark.gen_test(timeout=30)
async def test_a_signed_url_does_one_thing_for_one_user(base_url: str, repo: Path):
    data = b"signed\n"
    oid = hashlib.sha256(data).hexdigest()
    href = await upload_href(base_url, oid, len(data))
    # Nothing about it may change: each altered URL is no longer signed, and falls to the policy (401).
    for old, new in (
        (f"size={len(data)}", "size=8"),
        ("expires=", "expires=9"),
        ("user=writer", "user=reader"),
        (oid, OID),
        ("sig=", "sig=0"),
    ):
        altered = href.replace(old, new, 1)
        assert altered != href
        response = await fetch(altered, "PUT", data, user=None)
        assert response.code == 401 and response.headers["LFS-Authenticate"] == 'Basic realm="team"'
    # An upload URL does not download.
    assert (await fetch(href, "GET", user=None)).code == 401
    assert (await fetch(href, "PUT", data, user=None)).code == 200
    # It names no password: only the user, and a signature.
    assert "writer" in href and "X-User" not in href


@pytest.mark.gen_test(timeout=30)
async def test_concurrent_uploads_of_one_object_are_harmless(base_url: str, repo: Path):
    data = os.urandom(300_000)
    oid = hashlib.sha256(data).hexdigest()
    href = await upload_href(base_url, oid, len(data))
    responses = await asyncio.gather(*(fetch(href, "PUT", data, user=None) for _ in range(20)))
    assert [r.code for r in responses] == [200] * 20
    assert lfs_files(repo) == [f"lfs/objects/{oid[:2]}/{oid[2:4]}/{oid}"]
    # Now it is there: a batch upload of it has nothing to do.
    code, answer = await batch(base_url, objects("upload", {"oid": oid, "size": len(data)}))
    assert answer["objects"] == [{"oid": oid, "size": len(data)}]


@pytest.mark.gen_test(timeout=60)
async def test_thirty_different_uploads_at_once_each_arrive_whole(base_url: str, repo: Path):
    """Each upload fills and reuses buffers of its own while the threads hash and write the others'."""
    contents = [os.urandom(1_500_000 + i) for i in range(30)]  # two buffers each
    hrefs = [await upload_href(base_url, hashlib.sha256(data).hexdigest(), len(data)) for data in contents]
    responses = await asyncio.gather(*(fetch(h, "PUT", d, user=None) for h, d in zip(hrefs, contents)))
    assert [r.code for r in responses] == [200] * 30
    for data in contents:
        oid = hashlib.sha256(data).hexdigest()
        assert (repo / "lfs" / "objects" / oid[:2] / oid[2:4] / oid).read_bytes() == data
    assert not list((repo / "lfs" / "tmp").iterdir())


@pytest.mark.gen_test(timeout=30)
async def test_a_full_disk_answers_507_and_leaves_nothing(base_url: str, repo: Path):
    (repo / "lfs").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(repo / "lfs")], check=True)
    try:
        data = os.urandom(600_000)
        oid = hashlib.sha256(data).hexdigest()
        href = await upload_href(base_url, oid, len(data))
        response = await fetch(href, "PUT", data, user=None)
        assert response.code == 507 and "no room" in json.loads(response.body)["message"]
        assert lfs_files(repo) == []
        await assert_still_serving(base_url, repo)  # a small one still fits
    finally:
        subprocess.run(["umount", "--lazy", str(repo / "lfs")], check=True)  # if a failure left files open


@pytest.mark.gen_test(timeout=30)
async def test_too_large_uploads_are_refused_before_the_body(base_url: str, repo: Path):
    data = b"q" * (4 * 2**20 + 1)
    plain = f"{base_url}/proj.git/info/lfs/objects/{hashlib.sha256(data).hexdigest()}"
    response = await fetch(plain, "PUT", data)
    assert response.code == 413 and "limit of 4194304 bytes" in json.loads(response.body)["message"]
    assert not (repo / "lfs").exists()


@pytest.mark.gen_test(timeout=30)
async def test_access_follows_the_policy(base_url: str, repo: Path, gitbase: Path):
    request = objects("download", {"oid": OID, "size": 1})
    response = await fetch(f"{base_url}/proj.git/info/lfs/objects/batch", "POST", request, user=None)
    assert response.code == 401
    assert (
        response.headers["LFS-Authenticate"] == response.headers["WWW-Authenticate"] == 'Basic realm="team"'
    )
    assert json.loads(response.body)["message"] == "Authentication required"
    assert (await batch(base_url, request, user="reader"))[0] == 200
    code, answer = await batch(base_url, objects("upload", {"oid": OID, "size": 1}), user="reader")
    assert code == 403 and answer["message"] == "You may read proj.git but not write to it"
    locks = f"{base_url}/proj.git/info/lfs/locks"
    assert (await fetch(locks, user="reader")).code == 200
    assert (await fetch(locks, "POST", {"path": "a.bin"}, user="reader")).code == 403
    assert (await fetch(f"{base_url}/missing.git/info/lfs/locks", user="writer")).code == 404
    # The secret's directory is no repository, and its file is never served.
    for path in (
        "/.gittornado/info/lfs/objects/batch",
        "/.gittornado/lfs-secret",
        "/.gittornado/info/lfs/locks",
    ):
        assert (await fetch(base_url + path, "POST", request, user="writer")).code == 404


def test_the_secret_is_made_once_private_and_shared(tmp_path: Path):
    path = tmp_path / "state" / "lfs-secret"
    script = (
        "import sys; from gittornado.lfs.signing import load_secret; "
        "sys.stdout.write(load_secret(sys.argv[1]).hex())"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    racers = [
        subprocess.Popen(["python", "-c", script, str(path)], stdout=subprocess.PIPE, env=env)
        for _ in range(8)
    ]
    secrets = {racer.communicate()[0] for racer in racers}
    assert len(secrets) == 1 and len(next(iter(secrets))) == 64
    assert (path.stat().st_mode & 0o777) == 0o600
    assert load_secret(str(path)).hex().encode() in secrets  # a restart reads the same one
    assert sorted(p.name for p in path.parent.iterdir()) == ["lfs-secret"]  # no temporary files left


@pytest.mark.gen_test(timeout=30)
async def test_downloads_resume_with_range_and_are_immutable(base_url: str, repo: Path):
    data = os.urandom(900_000)
    oid = hashlib.sha256(data).hexdigest()
    href = await upload_href(base_url, oid, len(data))
    assert (await fetch(href, "PUT", data, user=None)).code == 200
    code, answer = await batch(base_url, objects("download", {"oid": oid, "size": len(data)}), user="reader")
    get = answer["objects"][0]["actions"]["download"]["href"]
    assert answer["objects"][0]["authenticated"] is True
    whole = await fetch(get, user=None)
    assert whole.body == data and whole.headers["Cache-Control"] == "private, max-age=31536000, immutable"
    part = await fetch(get, user=None, Range="bytes=100000-")
    assert part.code == 206 and part.body == data[100_000:]
    assert part.headers["Content-Range"] == f"bytes 100000-899999/{len(data)}"
    assert (await fetch(get, user=None, Range="bytes=-10")).body == data[-10:]
    outside = await fetch(get, user=None, Range="bytes=900000-")
    assert outside.code == 416 and json.loads(outside.body)["message"] == f"The object has {len(data)} bytes"
    assert (await fetch(get, user=None, **{"If-None-Match": f'"{oid}"'})).code == 304
    # Numbers that are no byte position (int() refuses 4,300 digits, and "²"): the whole object.
    for nonsense in ("bytes=" + "9" * 5000 + "-", "bytes=\xb2-"):
        assert (await fetch(get, user=None, Range=nonsense)).body == data


@pytest.mark.gen_test(timeout=30)
async def test_a_hundred_users_locking_one_path_at_once_get_one_lock(base_url: str, repo: Path):
    locks = f"{base_url}/proj.git/info/lfs/locks"
    responses = await asyncio.gather(*(fetch(locks, "POST", {"path": "art/model.psd"}) for _ in range(100)))
    assert sorted(r.code for r in responses) == [201] + [409] * 99
    winner = next(json.loads(r.body)["lock"] for r in responses if r.code == 201)
    assert all(json.loads(r.body)["lock"] == winner for r in responses if r.code == 409)
    assert sorted(p.name for p in (repo / "lfs" / "locks").iterdir()) == [winner["id"]]  # no temporary files
    listed = json.loads((await fetch(f"{locks}?path=art/model.psd", user="reader")).body)
    assert listed == {"locks": [winner]}
    # Path tricks are a path like any other: hashed into a name, never used as one.
    for path in ("../../../../tmp/x", "/etc/passwd", "a\\..\\b"):
        assert (await fetch(locks, "POST", {"path": path})).code == 201
    assert (await fetch(locks, "POST", {"path": "x\u0000y"})).code == 422
    assert (await fetch(locks, "POST", {"path": ""})).code == 422
    assert len(list((repo / "lfs" / "locks").iterdir())) == 4
    bad_id = await fetch(f"{base_url}/proj.git/info/lfs/locks/..%2F..%2Fconfig/unlock", "POST", {})
    assert bad_id.code == 404 and json.loads(bad_id.body)["message"] == "No such lock"


@pytest.mark.gen_test(timeout=30)
async def test_a_stalled_upload_is_ended_by_the_idle_timeout(base_url: str, repo: Path, http_port: int):
    data = os.urandom(2_000_000)
    href = urlsplit(await upload_href(base_url, hashlib.sha256(data).hexdigest(), len(data)))
    reader, writer = await asyncio.open_connection("127.0.0.1", http_port)
    writer.write(
        f"PUT {href.path}?{href.query} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n".encode()
        + data[:1_500_000]
    )
    await writer.drain()  # ... and then nothing more, the connection left open
    assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the server after 1 s of silence
    writer.close()
    assert lfs_files(repo) == []
    # A body that never starts is ended the same way.
    reader, writer = await asyncio.open_connection("127.0.0.1", http_port)
    writer.write(put_head(urlunsplit(href), len(data)))
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    assert lfs_files(repo) == []
    await assert_still_serving(base_url, repo)


def put_head(href: str, length: int, *headers: str) -> bytes:
    """The head of a PUT of ``length`` bytes to a signed ``href``, as a client sends it."""
    url = urlsplit(href)
    lines = [f"PUT {url.path}?{url.query} HTTP/1.1", "Host: x", f"Content-Length: {length}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def answer_while_sending(port: int, request: bytes) -> bytes:
    """What the server answers while ``request`` is still being sent, up to its close.

    A server that answers before the body's end and then closes makes the
    rest of the sending fail: that is expected here, not an error.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send() -> None:
        try:
            for start in range(0, len(request), 65536):
                writer.write(request[start : start + 65536])
                await writer.drain()
        except ConnectionError:
            pass

    sending = asyncio.ensure_future(send())
    answer = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), 20):
            answer += chunk
    except ConnectionError:
        pass
    finally:
        sending.cancel()
        writer.close()
    return answer


def statuses(raw: bytes) -> List[int]:
    """The status of each response in ``raw``, interim ones included (bodies here never hold one)."""
    return [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)]


@pytest.mark.gen_test(timeout=30)
async def test_requests_after_an_upload_on_one_connection_are_read_as_requests(
    base_url: str, repo: Path, http_port: int
):
    """The server reads an upload's body itself: exactly its length, so the next request is framed right."""
    data = os.urandom(2_500_000)  # spans the server's buffers
    oid = hashlib.sha256(data).hexdigest()
    href = await upload_href(base_url, oid, len(data))
    inner = b"GET /proj.git/info/refs HTTP/1.1\r\nHost: x\r\n\r\n"
    wrong = inner * (len(data) // len(inner))
    wrong += b"x" * (len(data) - len(wrong))
    download = urlsplit(href).path
    last = f"GET {download} HTTP/1.1\r\nHost: x\r\nX-User: writer\r\nConnection: close\r\n\r\n".encode()
    raw = await raw_http(
        http_port, put_head(href, len(data)) + data + put_head(href, len(data)) + wrong + last
    )
    # Stored; the wrong body (requests inside it included) refused as a whole; the download answered.
    assert statuses(raw) == [200, 422, 200], raw[-600:]
    assert raw.endswith(data)
    assert lfs_files(repo) == [f"lfs/objects/{oid[:2]}/{oid[2:4]}/{oid}"]


@pytest.mark.gen_test(timeout=30)
async def test_an_upload_refused_halfway_never_lets_its_body_be_read_as_requests(
    backend: GitBackend, base_url: str, repo: Path, http_port: int, caplog: pytest.LogCaptureFixture
):
    """The disk fills while the body still arrives: 507, and the rest of the body is never a request."""
    caplog.set_level(logging.INFO, logger="gittornado.access")
    backend.lfs.max_object_size = None
    inner = b"GET /proj.git/info/lfs/locks HTTP/1.1\r\nHost: x\r\nX-User: writer\r\n\r\n"
    data = inner * (12_000_000 // len(inner))
    oid = hashlib.sha256(data).hexdigest()
    href = await upload_href(base_url, oid, len(data))
    (repo / "lfs").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(repo / "lfs")], check=True)
    try:
        raw = await answer_while_sending(http_port, put_head(href, len(data)) + data)
        assert statuses(raw) == [507], raw[:300]
        assert "no room" in json.loads(raw.partition(b"\r\n\r\n")[2])["message"]
        served = [record.getMessage() for record in caplog.records if record.name == "gittornado.access"]
        assert len(served) == 2 and "status=507" in served[-1], served  # the batch, the upload: no more
        assert lfs_files(repo) == []
        await assert_still_serving(base_url, repo)
    finally:
        subprocess.run(["umount", "--lazy", str(repo / "lfs")], check=True)  # if a failure left files open


@pytest.mark.gen_test(timeout=30)
async def test_an_upload_expecting_100_continue_gets_it_once_and_only_when_allowed(
    base_url: str, repo: Path, http_port: int
):
    data = os.urandom(1_500_000)
    oid = hashlib.sha256(data).hexdigest()
    href = await upload_href(base_url, oid, len(data))
    reader, writer = await asyncio.open_connection("127.0.0.1", http_port)
    writer.write(put_head(href, len(data), "Expect: 100-continue", "Connection: close"))
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)  # the body waits for it
    writer.write(data)
    rest = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert statuses(interim) == [100] and statuses(rest) == [200]
    assert lfs_files(repo) == [f"lfs/objects/{oid[:2]}/{oid[2:4]}/{oid}"]
    # A user who may not write is refused at once, without being asked for the body.
    plain = f"{base_url}/proj.git/info/lfs/objects/{oid}"
    reader, writer = await asyncio.open_connection("127.0.0.1", http_port)
    writer.write(put_head(plain, 5, "X-User: reader", "Expect: 100-continue"))
    answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert statuses(answer) == [403]


@pytest.mark.gen_test(timeout=60)
async def test_an_upload_trickling_in_tiny_pieces_is_stored_whole(base_url: str, repo: Path, http_port: int):
    data = os.urandom(400_000)
    oid = hashlib.sha256(data).hexdigest()
    href = await upload_href(base_url, oid, len(data))
    reader, writer = await asyncio.open_connection("127.0.0.1", http_port)
    writer.write(put_head(href, len(data), "Connection: close"))
    sizes = random.Random(7).choices([1, 2, 17, 1000, 4096, 65537], k=400)
    position = 0
    for size in sizes:
        writer.write(data[position : position + size])
        position += size
        await writer.drain()
        await asyncio.sleep(0.001)
    writer.write(data[position:])
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert statuses(answer) == [200]
    stored = repo / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
    assert stored.read_bytes() == data


@pytest.mark.gen_test(timeout=30)
async def test_numbers_in_other_digits_are_refused_never_a_server_error(
    base_url: str, repo: Path, http_port: int, caplog: pytest.LogCaptureFixture
):
    """``²`` passes ``str.isdigit()`` and fails ``int()``; 5,000 digits fail ``int()`` too."""
    oid = hashlib.sha256(b"x").hexdigest()
    plain = f"/proj.git/info/lfs/objects/{oid}"
    head = "Host: x\r\nX-User: writer\r\nConnection: close\r\n"
    put = f"PUT {plain} HTTP/1.1\r\n{head}Content-Length: \xb2\r\n\r\nx".encode("latin-1")
    batch = (
        f"POST /proj.git/info/lfs/objects/batch HTTP/1.1\r\n{head}Content-Type: {LFS_JSON}\r\n"
        "Content-Length: \xb2\r\n\r\n{}"
    ).encode("latin-1")
    assert statuses(await raw_http(http_port, put)) == [411]
    assert statuses(await raw_http(http_port, batch)) == [400]  # Tornado's framing answer
    for size in ("%C2%B2", "9" * 5000):
        signed = f"{base_url}{plain}?size={size}&expires={size}&sig=x&user=writer"
        assert (await fetch(signed, "PUT", b"x", user=None)).code == 401  # not signed: the policy's 401
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
    await assert_still_serving(base_url, repo)
