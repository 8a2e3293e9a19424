"""Git LFS, served for every repository: the batch API, basic transfers and file locking.

:class:`LfsServer` is what a :class:`~gittornado.backend.GitBackend` holds
to serve LFS (its ``lfs`` field); the URL table (``routes.py``) then lists
the LFS handlers under each repository's ``info/lfs``, the URL git-lfs
derives from the remote's by itself.  Access follows the same policy as
git: reading to download and list locks, writing to upload and lock.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..repos import Repository
from .locks import locked_paths
from .signing import UrlSigner, load_secret
from .storage import ObjectStore, ObjectUpload, RepositoryObjectStore, StoredObject

__all__ = [
    "LfsServer",
    "ObjectStore",
    "ObjectUpload",
    "RepositoryObjectStore",
    "StoredObject",
    "UrlSigner",
    "locked_paths",
    "secret_file",
]


def secret_file(root: str) -> str:
    """Where a server of ``root`` keeps its signing secret by default (no repository is found there)."""
    return os.path.join(root, ".gittornado", "lfs-secret")


@dataclass
class LfsServer:
    """How LFS is served: the URL signer, the object size cap, where objects are stored.

    ``stores`` maps a repository to its :class:`ObjectStore` (default: files
    in the repository's own ``lfs/`` directory); ``max_object_size`` caps
    one object in bytes (``None``: no cap).  File writes and hashing run on
    ``executor``'s threads, so the event loop keeps serving meanwhile.
    """

    signer: UrlSigner
    max_object_size: Optional[int] = None
    stores: Callable[[Repository], ObjectStore] = RepositoryObjectStore.for_repository
    executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(8, "gittornado-lfs"))

    @classmethod
    def from_secret_file(cls, path: str, max_object_size: Optional[int] = None) -> LfsServer:
        """An LfsServer signing with the secret in ``path``, made there if there is none yet."""
        return cls(UrlSigner(load_secret(path)), max_object_size)
