"""Small helpers shared by the modules that call user-supplied code."""

from __future__ import annotations

import inspect
from typing import Any, Callable


async def maybe_await(func: Callable[..., Any], *args: Any) -> Any:
    """Call ``func`` and await its result when it is awaitable.

    Embedders may plug in plain functions or coroutines for repository lookup
    and access decisions; this lets every call site treat both alike.
    """
    result = func(*args)
    if inspect.isawaitable(result):
        result = await result
    return result
