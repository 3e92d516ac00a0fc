"""An optional uplink rate limit for metered links: a token bucket the uplink consults per batch.

``uplink_rate_limit`` is ``"<number> readings/s"`` or ``"<number> bytes/s"`` (also ``kB/s`` and
``MB/s``, powers of 1000). The bucket holds one second's worth; a batch may take it below zero
(a batch is never split for the limit), and the next batch waits until it is back above zero,
so over any stretch longer than a few batches the uplink sends at most the rate. Status events
are free: a node that dies is reported at once, whatever the limit. A gateway coming back from
a long outage therefore drains its backlog at the configured pace instead of flooding the link.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from typing import Callable

READINGS = "readings"
BYTES = "bytes"
_UNITS = {"readings/s": (READINGS, 1), "bytes/s": (BYTES, 1), "kb/s": (BYTES, 1000), "mb/s": (BYTES, 1_000_000)}
_RATE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z/]+)\s*$")


class RateLimitError(ValueError):
    """An ``uplink_rate_limit`` that does not parse; the message says what is expected."""


@dataclass(frozen=True)
class Rate:
    """So many readings or bytes per second."""

    per_second: float
    unit: str

    def __str__(self) -> str:
        return f"{self.per_second:g} {self.unit}/s"


def parse_rate(text: str) -> Rate:
    """``"500 readings/s"``, ``"20000 bytes/s"``, ``"20 kB/s"`` -> :class:`Rate`."""
    match = _RATE.match(text) if isinstance(text, str) else None
    unit = _UNITS.get(match.group(2).lower()) if match else None
    if match is None or unit is None or float(match.group(1)) <= 0:
        raise RateLimitError(f"expected '<positive number> readings/s' or '<number> bytes/s' (or kB/s, MB/s), found {text!r}")
    kind, scale = unit
    return Rate(float(match.group(1)) * scale, kind)


class TokenBucket:
    """Tokens refill at ``rate.per_second`` up to one second's worth; :meth:`acquire` waits while
    the bucket is below zero, then takes the cost (possibly going below zero)."""

    def __init__(self, rate: Rate, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self._clock = clock
        self._capacity = rate.per_second
        self._tokens = self._capacity
        self._stamp = clock()
        self._lock = threading.Lock()
        self._waited_s = 0.0
        self._taken = 0.0

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self._capacity, self._tokens + (now - self._stamp) * self.rate.per_second)
        self._stamp = now

    def delay(self) -> float:
        """Seconds until the bucket is back at zero (0 if it is not below)."""
        with self._lock:
            self._refill()
            return max(0.0, -self._tokens / self.rate.per_second)

    def take(self, cost: float) -> None:
        """Take ``cost`` tokens now (the caller waited for :meth:`delay`)."""
        with self._lock:
            self._refill()
            self._tokens -= cost
            self._taken += cost

    def acquire(self, cost: float, stop: threading.Event) -> bool:
        """Wait until the bucket allows a send, then take ``cost``; False if ``stop`` was set first."""
        while True:
            wait = self.delay()
            if wait <= 0:
                self.take(cost)
                return True
            started = self._clock()
            if stop.wait(min(wait, 1.0)):
                return False
            with self._lock:
                self._waited_s += self._clock() - started

    def note_waited(self, seconds: float) -> None:
        """Count time a caller that polls :meth:`delay` (instead of :meth:`acquire`) spent held back."""
        with self._lock:
            self._waited_s += max(0.0, seconds)

    def stats(self) -> dict:
        """The limit, the time spent waiting for it and what went through it."""
        with self._lock:
            return {
                "rate_limit": str(self.rate),
                "rate_limited_s": round(self._waited_s, 3),
                # Readings or bytes (as the limit says) sent under the limit.
                "rate_limit_sent": int(self._taken),
            }
