"""Waiting on a condition in tests, instead of sleeping and hoping.

``await wait_until(lambda: switch.statistics()["ports"] == 0)`` polls the condition
every ``interval`` seconds (a sync or async callable) and returns as soon as it holds;
after ``timeout`` seconds it fails the test, saying what it waited for. It costs no
more than the condition takes to become true, so it is both faster and more honest
than a fixed ``trio.sleep`` standing in for "by now X has happened".
"""

from __future__ import annotations

import inspect
from typing import Any, Awaitable, Callable

import trio

__all__ = ["wait_until"]


async def wait_until(predicate: Callable[[], Any | Awaitable[Any]], *, timeout: float = 10.0,
                     interval: float = 0.005, what: str | None = None) -> Any:
    """Return the first true value of ``predicate()``; raise AssertionError after ``timeout``."""
    with trio.move_on_after(timeout):
        while True:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
            await trio.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or _describe(predicate)}")


def _describe(predicate: Callable[..., Any]) -> str:
    try:
        return inspect.getsource(predicate).strip()
    except (OSError, TypeError):
        return repr(predicate)
