"""Admission of packing fetches: at most a few per repository at once, the rest queued in arrival order.

A clone storm (30 CI jobs cloning one commit) makes every fetch run its own
``pack-objects`` on the same repository; on a small host they then share the
CPUs and all finish late, or the host runs out of memory.  Queued instead,
the first few finish at full speed and the rest follow (with the pack cache,
from its entry).  A waiting request has not started git yet, so it costs no
process and only its connection; one that waits longer than the queue
timeout gets 503 with ``Retry-After``.  The limit is per server process, like
``--max-git-processes``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Callable, Dict, Tuple

from tornado.locks import Semaphore
from tornado.util import TimeoutError as WaitTimeout

from .process import Busy


class RepositorySlots:
    """``limit`` slots per repository (by its git directory), handed out first come, first served."""

    def __init__(self, limit: int, queue_timeout: float = 60.0) -> None:
        if limit < 1:
            raise ValueError("a repository needs at least one slot")
        self.limit = limit
        self.queue_timeout = queue_timeout
        # git directory -> (its slots, requests holding or waiting for one)
        self._repositories: Dict[str, Tuple[Semaphore, int]] = {}

    def waiting_or_running(self, key: str) -> int:
        """Requests holding or waiting for one of ``key``'s slots."""
        entry = self._repositories.get(key)
        return entry[1] if entry is not None else 0

    async def acquire(self, key: str) -> Callable[[], None]:
        """Wait for one of ``key``'s slots (or raise :class:`~.process.Busy`); returns what gives it back."""
        slots, users = self._repositories.get(key, (None, 0))
        if slots is None:
            slots = Semaphore(self.limit)
        self._repositories[key] = (slots, users + 1)
        try:
            await slots.acquire(timeout=timedelta(seconds=self.queue_timeout))
        except WaitTimeout:
            self._forget(key)
            raise Busy(retry_after=max(1, round(self.queue_timeout / 4))) from None
        except BaseException:
            self._forget(key)
            raise
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                slots.release()
                self._forget(key)

        return release

    def _forget(self, key: str) -> None:
        slots, users = self._repositories[key]
        if users <= 1:
            del self._repositories[key]  # no one holds or waits: the semaphore is at its limit again
        else:
            self._repositories[key] = (slots, users - 1)
