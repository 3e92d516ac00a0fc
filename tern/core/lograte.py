"""Log a condition that persists (a full disk, a broker refusing us) as one line per interval.

A condition that is retried every second must not print a line (let alone a traceback) every
second: :class:`Throttled` says it at once, then at most once per ``interval_s`` with how many
times it happened meanwhile, and says so once when it clears.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from tern.core.quoting import shorten

#: Characters of a message at most (before the count): it often carries an exception's message.
LINE_LIMIT = 500


class Throttled:
    """Rate-limited log lines per key (thread-safe)."""

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        # key -> (time of the last line, occurrences since it, first occurrence)
        self._active: dict[str, list[float]] = {}

    def log(self, level: int, key: str, message: str) -> bool:
        """Count one occurrence of ``key``; log ``message`` if it is the first or the last line
        is ``interval_s`` old. True if a line was written."""
        now = self._clock()
        with self._lock:
            state = self._active.get(key)
            if state is None:
                self._active[key] = [now, 0, now]
                line = shorten(message, LINE_LIMIT)
            elif now - state[0] >= self.interval_s:
                line = f"{shorten(message, LINE_LIMIT)} (still so after {now - state[2]:.0f} s; {int(state[1]) + 1} times since the last line)"
                state[0], state[1] = now, 0
            else:
                state[1] += 1
                return False
        self.logger.log(level, "%s", line)
        return True

    def clear(self, key: str, message: str | None = None, level: int = logging.INFO) -> bool:
        """End ``key``'s condition; log ``message`` (with how long it lasted) if it was active."""
        now = self._clock()
        with self._lock:
            state = self._active.pop(key, None)
        if state is None:
            return False
        if message:
            self.logger.log(level, "%s", f"{shorten(message, LINE_LIMIT)} (after {now - state[2]:.0f} s)")
        return True

    def active(self, key: str) -> bool:
        """True while ``key``'s condition has been logged and not cleared."""
        with self._lock:
            return key in self._active
