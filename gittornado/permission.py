"""What a request needs of a repository: reading or writing."""

from __future__ import annotations

import enum


class Permission(enum.Enum):
    """What a request needs: reading (fetch, clone, dumb files) or writing (push)."""

    READ = "r"
    WRITE = "w"
