"""Small helpers shared by several modules: calling user-supplied code, reading numbers clients send."""

from __future__ import annotations

import asyncio
import importlib
import inspect
from typing import Any, Callable, Mapping, Optional


def decimal(text: str) -> Optional[int]:
    """``text`` as a whole number if it is at most 18 ASCII digits, else None.

    ``str.isdigit`` also accepts characters that ``int`` refuses (``²``, a
    byte a client may put in a header) and others that ``int`` reads
    (``٣``), and ``int`` refuses more than 4,300 digits: a number from a
    request must not reach ``int`` through it.  18 digits hold any size,
    time or process id there is.
    """
    return int(text) if len(text) <= 18 and text.isascii() and text.isdigit() else None


async def maybe_await(func: Callable[..., Any], *args: Any) -> Any:
    """Call ``func`` and await its result when it is awaitable.

    Embedders may plug in plain functions or coroutines for repository lookup
    and access decisions; this lets every call site treat both alike.
    """
    result = func(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


def moved_names(module: str, moved: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that finds names which moved to other modules of the package.

    ``moved`` maps each old name to the module (``inipolicy`` for
    ``gittornado.inipolicy``) that holds it now, so ``from gittornado.access
    import IniPolicy`` keeps working for embedders; the import happens on
    first use, which also keeps the two modules from importing each other.
    """

    def find(name: str) -> Any:
        if name in moved:
            return getattr(importlib.import_module(f"gittornado.{moved[name]}"), name)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return find


class Deadline:
    """``expired()`` runs ``timeout`` seconds after the last :meth:`restart`, unless :meth:`stop` comes first.

    For a request whose body, or next piece of it, must come in time. A ``timeout`` of None or 0 never
    expires.
    """

    def __init__(self, timeout: Optional[float], expired: Callable[[], None]) -> None:
        self.timeout = timeout
        self.expired = expired
        self._timer: Optional[asyncio.TimerHandle] = None

    def restart(self) -> None:
        """Count the ``timeout`` from now."""
        self.stop()
        if self.timeout:
            self._timer = asyncio.get_running_loop().call_later(self.timeout, self._expire)

    def stop(self) -> None:
        """Never expire (until the next :meth:`restart`)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        self.expired()
