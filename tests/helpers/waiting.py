"""Bounded waits: poll a real outcome under a deadline, never sleep for a guessed time."""

from __future__ import annotations

import time
from typing import Any, Callable

#: The default deadline of a wait, in seconds (modules with slower outcomes pass their own).
DEADLINE = 20.0


def poll_until(predicate: Callable[[], Any], timeout: float = DEADLINE, interval: float = 0.05) -> Any:
    """Poll ``predicate`` every ``interval`` s until it returns something true, for at most
    ``timeout`` s; returns that value, or the value of one last call at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def wait_until(
    predicate: Callable[[], Any], timeout: float = DEADLINE, what: str = "condition", interval: float = 0.05
) -> Any:
    """Poll ``predicate`` until it returns something true (returned), failing the test after
    ``timeout`` seconds with ``what`` and the last value seen."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")
