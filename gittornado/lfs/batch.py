"""``POST <repo>/info/lfs/objects/batch``: which objects to move, and a signed URL for each.

Whole-request problems (malformed JSON, an unknown operation or transfer,
too many objects) are answered with an error status and a JSON ``message``;
problems with one object (a malformed oid or size, a missing object) are
that object's ``error`` in a 200 answer, as the batch API documents.
"""

from __future__ import annotations

from typing import Any, Dict, Optional
from urllib.parse import urlencode

from ..permission import Permission
from ..repos import Repository
from .handlers import JsonRequestHandler, LfsError
from .signing import SignedRequest
from .storage import ObjectStore, valid_oid

#: Most objects in one batch request (git-lfs sends 100 at a time).
MAX_BATCH_OBJECTS = 1000
#: Largest size an object may claim, whatever the server's cap: one that JSON and every client can carry.
MAX_SIZE = 2**63 - 1
#: The message of an object whose oid is malformed.
BAD_OID = "oid must be 64 lower-case hex digits (sha256)"
OPERATIONS = {"download": Permission.READ, "upload": Permission.WRITE}


class BatchHandler(JsonRequestHandler):
    """The batch API, with the ``basic`` transfer and SHA-256 object ids."""

    SUPPORTED_METHODS = ("POST",)

    async def post(self, name: str) -> None:
        body = self.json_body()
        operation = body.get("operation")
        if not isinstance(operation, str) or operation not in OPERATIONS:
            raise LfsError(422, "operation must be download or upload")
        transfers = body.get("transfers", ["basic"])
        if not isinstance(transfers, list) or "basic" not in transfers:
            raise LfsError(422, "This server offers the basic transfer only")
        if body.get("hash_algo", "sha256") != "sha256":
            raise LfsError(409, "This server names objects by sha256 only")
        objects = body.get("objects")
        if not isinstance(objects, list):
            raise LfsError(422, "objects must be a list")
        if len(objects) > MAX_BATCH_OBJECTS:
            raise LfsError(413, f"At most {MAX_BATCH_OBJECTS} objects in one batch request")
        repo, grant = await self.open_lfs_repository(name, OPERATIONS[operation])
        self.service_label = f"lfs:{operation}"
        store = self.lfs.stores(repo)
        answers = [self._answer(store, repo, grant.user, operation, item) for item in objects]
        self.send_json({"transfer": "basic", "objects": answers, "hash_algo": "sha256"})

    def _answer(
        self, store: ObjectStore, repo: Repository, user: Optional[str], operation: str, item: Any
    ) -> Dict[str, Any]:
        oid = item.get("oid") if isinstance(item, dict) else None
        size = item.get("size") if isinstance(item, dict) else None
        answer: Dict[str, Any] = {"oid": oid if isinstance(oid, str) else str(oid)[:100], "size": size}
        if not valid_oid(oid):
            return {
                **answer,
                "error": {"code": 422, "message": BAD_OID},
            }
        if type(size) is not int or not 0 <= size <= MAX_SIZE:
            return {**answer, "error": {"code": 422, "message": "size must be a whole number of bytes"}}
        limit = self.lfs.max_object_size
        if operation == "upload" and limit is not None and size > limit:
            return {
                **answer,
                "error": {"code": 422, "message": f"larger than this server's limit of {limit} bytes"},
            }
        stored = store.size(oid)
        if operation == "download":
            if stored is None:
                return {**answer, "error": {"code": 404, "message": "Object does not exist"}}
            answer["size"] = stored
            actions = {"download": self._action("GET", "", repo, oid, stored, user)}
        elif stored == size:
            return answer  # the server has it: no actions, the client uploads nothing
        else:
            actions = {
                "upload": self._action("PUT", "", repo, oid, size, user),
                "verify": self._action("POST", "/verify", repo, oid, size, user),
            }
        return {**answer, "authenticated": True, "actions": actions}

    def _action(
        self, method: str, suffix: str, repo: Repository, oid: str, size: int, user: Optional[str]
    ) -> Dict[str, Any]:
        """A signed URL under the LFS URL the client used (its host, prefix and spelling of the name)."""
        base = self.request.path[: -len("/objects/batch")]
        query = self.lfs.signer.sign(SignedRequest(method, repo.name, oid, size, user))
        href = f"{self.request.protocol}://{self.request.host}{base}/objects/{oid}{suffix}?{urlencode(query)}"
        return {"href": href, "expires_in": self.lfs.signer.lifetime}
