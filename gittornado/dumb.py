"""The dumb protocol's files: the pack list generated from disk, and repository files streamed with Range.

Which files are reachable at all is decided by the URL table (``routes.py``);
these handlers only serve them, after the same lookup and access check as
every other request.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from tornado.web import StaticFileHandler

from .backend import GitBackend
from .handlers import FOREVER, NO_CACHE, GitHandler, GitRequestMixin
from .permission import Permission
from .services import GET_ANY_FILE


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
    hooks) is ever reachable.
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
        self.root = repo.path
        await super().get(path, include_body)

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
