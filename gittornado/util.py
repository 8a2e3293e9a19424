"""Small helpers shared by the modules that call user-supplied code."""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Mapping


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
