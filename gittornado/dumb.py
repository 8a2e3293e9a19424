"""The dumb protocol's files: lists generated from disk (packs, alternates), other files streamed with Range.

Which files are reachable at all is decided by the URL table (``routes.py``);
these handlers only serve them, after the same lookup and access check as
every other request.
"""

from __future__ import annotations

import os
from typing import Any, List, Optional

from tornado.web import HTTPError, StaticFileHandler

from .backend import GitBackend
from .handlers import FOREVER, NO_CACHE, GitHandler, GitRequestMixin
from .permission import Permission
from .repos import Repository
from .services import GET_ANY_FILE

ALTERNATES = "objects/info/alternates"
#: More than any real alternates file; the rest is not read.
MAX_ALTERNATES_SIZE = 64 * 1024


def served_alternates(repo: Repository, url_name: str) -> List[bytes]:
    """``repo``'s alternates as dumb clients may see them, without the server's paths.

    Each object directory it borrows from that lies under the root becomes a
    path relative to ``<url_name>/objects``, the objects directory as the
    client addresses it, which git's dumb client turns into a URL on this
    server (``../../other.git/objects``).  Lines leading outside the root, to
    nothing, or written in git's quoted form are left out; so is everything
    when ``repo`` was not found under a root (an embedder's own lookup).
    """
    if repo.root is None:
        return []
    objects = os.path.join(repo.path, "objects")
    source = os.path.join(objects, "info", "alternates")
    if not os.path.realpath(source).startswith(repo.path + os.sep):
        return []  # a symlink leading out of the repository
    try:
        with open(source, "rb") as f:
            text = f.read(MAX_ALTERNATES_SIZE)
    except OSError:
        return []
    seen_from = os.path.join(repo.root, url_name, "objects")
    served = []
    for line in text.split(b"\n"):
        if not line or line.startswith((b"#", b'"')):
            continue
        # Relative lines are relative to the objects directory, as git reads them.
        target = os.path.realpath(os.path.join(objects, os.fsdecode(line)))
        if target.startswith(repo.root + os.sep) and os.path.isdir(target):
            served.append(os.fsencode(os.path.relpath(target, seen_from)))
    return served


class PackListHandler(GitHandler):
    """``GET <repo>/objects/info/packs``, generated from the pack directory."""

    SUPPORTED_METHODS = ("GET",)

    async def get(self, name: str) -> None:
        repo, _ = await self.open_repository(name, Permission.READ)
        await self.require_switch(repo, GET_ANY_FILE)
        self.service_label = "dumb"
        try:
            names = sorted(
                entry.name
                for entry in os.scandir(os.path.join(repo.path, "objects", "pack"))
                if entry.name.startswith("pack-") and entry.name.endswith(".pack")
            )
        except FileNotFoundError:
            names = []
        self.set_no_cache()
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish("".join(f"P {n}\n" for n in names) + "\n")


class RepositoryFileHandler(GitRequestMixin, StaticFileHandler):
    """The dumb protocol's files, streamed from disk with Range support.

    The URL table lets through only ``HEAD``, ``objects/info/*alternates``,
    loose objects and pack files, so nothing else in a repository (config,
    hooks) is ever reachable.  ``objects/info/alternates`` is generated
    (:func:`served_alternates`), never sent as it is on disk.
    """

    SUPPORTED_METHODS = ("GET", "HEAD")

    def initialize(self, backend: GitBackend) -> None:  # type: ignore[override]
        super().initialize(backend)
        self.root = ""
        self.default_filename = None

    async def get(self, name: str, path: str, include_body: bool = True) -> None:  # type: ignore[override]
        repo, _ = await self.open_repository(name, Permission.READ)
        await self.require_switch(repo, GET_ANY_FILE)
        self.service_label = "dumb"
        self.path = path
        if path == ALTERNATES:
            self._send_alternates(repo, name)
            return
        if path == "HEAD" and repo.namespace:
            self._send_namespace_head(repo)
            return
        self.root = repo.path
        await super().get(path, include_body)

    def _send_alternates(self, repo: Repository, name: str) -> None:
        lines = served_alternates(repo, name)
        if not lines:
            raise HTTPError(404, reason="No alternates")
        for header, value in NO_CACHE.items():
            self.set_header(header, value)
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(b"".join(line + b"\n" for line in lines))  # Tornado sends no body for HEAD

    def _send_namespace_head(self, repo: Repository) -> None:
        """The namespace's own HEAD, its target named inside the namespace, as git http-backend sends it."""
        prefix = repo.namespace_prefix
        try:
            with open(os.path.join(repo.path, prefix, "HEAD"), "rb") as f:
                head = f.read(4096).strip()
        except OSError:
            raise HTTPError(404, reason="No HEAD in this namespace") from None
        if head.startswith(b"ref: " + prefix.encode()):
            head = b"ref: " + head[len(b"ref: ") + len(prefix) :]
        for header, value in NO_CACHE.items():
            self.set_header(header, value)
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(head + b"\n")

    async def head(self, name: str, path: str) -> None:  # type: ignore[override]
        await self.get(name, path, include_body=False)

    def validate_absolute_path(self, root: str, absolute_path: str) -> Optional[str]:
        # Resolve symlinks first, so a link inside the repository cannot lead out.
        return super().validate_absolute_path(root, os.path.realpath(absolute_path))

    def _immutable(self) -> bool:
        return self.path.startswith("objects/") and not self.path.startswith("objects/info/")

    def compute_etag(self) -> Optional[str]:
        # Object and pack names are content hashes: the name is the version.
        # (The default would hash the whole file, which for a pack is gigabytes.)
        return f'"{os.path.basename(self.path)}"' if self._immutable() else None

    def get_content_type(self) -> str:
        if self.path.endswith(".pack"):
            return "application/x-git-packed-objects"
        if self.path.endswith(".idx"):
            return "application/x-git-packed-objects-toc"
        if self._immutable():
            return "application/x-git-loose-object"
        return "text/plain; charset=utf-8"

    def get_cache_time(self, path: str, modified: Any, mime_type: str) -> int:
        return 0

    def set_extra_headers(self, path: str) -> None:
        for header, value in (FOREVER if self._immutable() else NO_CACHE).items():
            self.set_header(header, value)
