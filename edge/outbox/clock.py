"""The gateway's clock: wall-clock milliseconds, the unit of every timestamp on the wire."""

from __future__ import annotations

import time


def now_ms() -> int:
    """Wall-clock milliseconds, the unit of every timestamp on the wire."""
    return time.time_ns() // 1_000_000
