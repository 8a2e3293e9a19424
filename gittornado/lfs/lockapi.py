"""The LFS locking API: create, list, verify and delete locks (``<repo>/info/lfs/locks...``).

Listing needs read access; everything else needs write access, as pushing
does.  A user removes their own locks; ``force`` lets any user with write
access remove someone else's (git-lfs's ``unlock --force``).
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..permission import Permission
from .handlers import JsonRequestHandler, LfsError
from .locks import Lock, LockExists, LockStore, valid_lock_path

#: Locks in one answer, when the client asks for no fewer.
MAX_PAGE = 100


def _owner(user: Optional[str]) -> str:
    return user if user is not None else "anonymous"


def _page(locks: List[Lock], cursor: Any, limit: Any) -> Tuple[List[Lock], Optional[str]]:
    """The locks from the one whose id is ``cursor`` on, at most ``limit`` of them, and the next cursor."""
    if cursor:
        ids = [lock.id for lock in locks]
        if cursor not in ids:
            raise LfsError(422, "Unknown cursor")
        locks = locks[ids.index(cursor) :]
    try:
        count = min(int(limit), MAX_PAGE) if limit not in (None, "") else MAX_PAGE
    except (TypeError, ValueError, OverflowError):  # None, "x", 1e999
        raise LfsError(422, "limit must be a number") from None
    if count < 1:
        raise LfsError(422, "limit must be positive")
    return locks[:count], (locks[count].id if len(locks) > count else None)


class LockHandler(JsonRequestHandler):
    """What the lock handlers share: the repository's :class:`LockStore`, used off the event loop."""

    async def locks_of(self, name: str, permission: Permission) -> LockStore:
        repo, _ = await self.open_lfs_repository(name, permission)
        self.service_label = "lfs:locks"
        return LockStore(repo.path)

    async def run(self, call: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.lfs.executor, call, *args)

    def paged(self, key: str, locks: List[Lock], cursor: Any, limit: Any) -> Dict[str, Any]:
        page, next_cursor = _page(locks, cursor, limit)
        answer: Dict[str, Any] = {key: [lock.as_api() for lock in page]}
        if next_cursor:
            answer["next_cursor"] = next_cursor
        return answer


class LocksHandler(LockHandler):
    """``GET``: list locks (filters ``path``, ``id``; ``cursor``, ``limit``); ``POST``: create one."""

    SUPPORTED_METHODS = ("GET", "POST")

    async def get(self, name: str) -> None:
        store = await self.locks_of(name, Permission.READ)
        path, id = self.get_query_argument("path", None), self.get_query_argument("id", None)
        if id is not None:
            lock = await self.run(store.get, id)
            locks = [lock] if lock is not None else []
        else:
            locks = await self.run(store.all)
        if path is not None:
            locks = [lock for lock in locks if lock.path == path]
        cursor, limit = self.get_query_argument("cursor", None), self.get_query_argument("limit", None)
        self.send_json(self.paged("locks", locks, cursor, limit))

    async def post(self, name: str) -> None:
        body = self.json_body()
        store = await self.locks_of(name, Permission.WRITE)
        path = body.get("path")
        if not valid_lock_path(path):
            raise LfsError(422, "path must be a file's path in the repository")
        try:
            lock = await self.run(store.create, path, _owner(self.user))
        except LockExists as exists:
            self.send_json({"lock": exists.lock.as_api(), "message": "already created lock"}, 409)
            return
        self.send_json({"lock": lock.as_api()}, 201)


class LockVerifyHandler(LockHandler):
    """``POST .../locks/verify``: the locks, split into the user's own and everyone else's."""

    SUPPORTED_METHODS = ("POST",)

    async def post(self, name: str) -> None:
        body = self.json_body()
        store = await self.locks_of(name, Permission.WRITE)
        locks = await self.run(store.all)
        page = self.paged("locks", locks, body.get("cursor"), body.get("limit"))
        me = _owner(self.user)
        answer: Dict[str, Any] = {
            "ours": [lock for lock in page["locks"] if lock["owner"]["name"] == me],
            "theirs": [lock for lock in page["locks"] if lock["owner"]["name"] != me],
        }
        if "next_cursor" in page:
            answer["next_cursor"] = page["next_cursor"]
        self.send_json(answer)


class UnlockHandler(LockHandler):
    """``POST .../locks/<id>/unlock``: remove a lock, the user's own or, with ``force``, anyone's."""

    SUPPORTED_METHODS = ("POST",)

    async def post(self, name: str, id: str) -> None:
        body = self.json_body()
        store = await self.locks_of(name, Permission.WRITE)
        lock = await self.run(store.get, id)
        if lock is None:
            raise LfsError(404, "No such lock")
        if lock.owner != _owner(self.user) and body.get("force") is not True:
            raise LfsError(403, f"The lock belongs to {lock.owner}; unlock with --force to remove it")
        if not await self.run(store.delete, lock):
            raise LfsError(404, "No such lock")
        self.send_json({"lock": lock.as_api()})
