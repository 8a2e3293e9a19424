"""An embedder's own LFS store: the handlers reach objects only through the ObjectStore interface.

The store here keeps objects in memory, as a store in a bucket would keep them
away from the repository: no file, no descriptor.  Uploads spanning several of
the server's buffers, downloads whole and by range, and the batch API all work
through it unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, Optional

import pytest
from tornado.httpclient import AsyncHTTPClient

from gittornado import GitBackend, RepositoryRoot
from gittornado.access import AccessPolicy
from gittornado.lfs import LfsServer, ObjectStore, ObjectUpload, StoredObject, UrlSigner
from gittornado.lfs.signing import load_secret
from gittornado.lfs.storage import StorageFull
from gittornado.repos import Repository

LFS_JSON = "application/vnd.git-lfs+json"


class MemoryObject(StoredObject):
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)

    def read(self, position: int, length: int) -> bytes:
        return self.data[position : position + length]

    def close(self) -> None:
        pass


class MemoryUpload(ObjectUpload):
    def __init__(self, objects: Dict[str, bytes], oid: str, room: int) -> None:
        self.objects, self.oid, self.room = objects, oid, room
        self.parts: Optional[bytearray] = bytearray()

    def write(self, data: memoryview) -> None:
        assert self.parts is not None
        if len(self.parts) + len(data) > self.room:
            raise StorageFull("the bucket is full")
        self.parts += data  # a copy: the server fills the buffer behind ``data`` again

    def commit(self) -> None:
        assert self.parts is not None
        self.objects[self.oid] = bytes(self.parts)

    def abort(self) -> None:
        self.parts = None


class MemoryStore(ObjectStore):
    def __init__(self, objects: Dict[str, bytes], room: int) -> None:
        self.objects, self.room = objects, room

    def size(self, oid: str) -> Optional[int]:
        data = self.objects.get(oid)
        return None if data is None else len(data)

    def open(self, oid: str) -> Optional[StoredObject]:
        data = self.objects.get(oid)
        return None if data is None else MemoryObject(data)

    def begin(self, oid: str, size: int) -> ObjectUpload:
        return MemoryUpload(self.objects, oid, self.room)


@pytest.fixture
def bucket() -> Dict[str, Dict[str, bytes]]:
    """Objects by repository name, then by oid."""
    return {}


@pytest.fixture
def backend(gitbase: Path, policy: AccessPolicy, bucket: Dict[str, Dict[str, bytes]]) -> GitBackend:
    def stores(repository: Repository) -> ObjectStore:
        return MemoryStore(bucket.setdefault(repository.name, {}), room=3_000_000)

    lfs = LfsServer(UrlSigner(load_secret(str(gitbase / ".gittornado" / "lfs-secret"))), stores=stores)
    return GitBackend(lookup=RepositoryRoot(str(gitbase)), policy=policy, lfs=lfs)  # conftest's: open


async def actions(base_url: str, operation: str, oid: str, size: int) -> dict:
    response = await AsyncHTTPClient().fetch(
        f"{base_url}/proj.git/info/lfs/objects/batch",
        method="POST",
        headers={"Content-Type": LFS_JSON},
        body=json.dumps({"operation": operation, "objects": [{"oid": oid, "size": size}]}),
    )
    return json.loads(response.body)["objects"][0]


@pytest.mark.gen_test(timeout=30)
async def test_an_embedders_store_serves_uploads_and_downloads(
    base_url: str, repo: Path, bucket: Dict[str, Dict[str, bytes]]
):
    data = os.urandom(2_500_000)  # three of the server's buffers
    oid = hashlib.sha256(data).hexdigest()
    upload = (await actions(base_url, "upload", oid, len(data)))["actions"]["upload"]["href"]
    response = await AsyncHTTPClient().fetch(upload, method="PUT", body=data)
    assert response.code == 200
    assert bucket["proj.git"] == {oid: data} and not (repo / "lfs").exists()

    assert "actions" not in await actions(base_url, "upload", oid, len(data))  # it is there
    download = (await actions(base_url, "download", oid, len(data)))["actions"]["download"]["href"]
    assert (await AsyncHTTPClient().fetch(download)).body == data
    part = await AsyncHTTPClient().fetch(download, headers={"Range": "bytes=1000000-1999999"})
    assert part.code == 206 and part.body == data[1_000_000:2_000_000]

    # The store's own refusal (no room) is the client's 507, and nothing is kept.
    big = os.urandom(3_500_000)
    oid = hashlib.sha256(big).hexdigest()
    upload = (await actions(base_url, "upload", oid, len(big)))["actions"]["upload"]["href"]
    response = await AsyncHTTPClient().fetch(upload, method="PUT", body=big, raise_error=False)
    assert response.code == 507 and oid not in bucket["proj.git"]
