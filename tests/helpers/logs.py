"""Log records of the ``tern`` loggers, caught by a handler a test installs for its duration."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator, TypeVar

H = TypeVar("H", bound=logging.Handler)


@contextlib.contextmanager
def log_handler(handler: H, level: int, logger: str = "tern") -> Iterator[H]:
    """``handler`` on ``logger``, set to ``level``, while the block runs; the old level afterwards."""
    log = logging.getLogger(logger)
    old = log.level
    log.setLevel(level)
    log.addHandler(handler)
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        log.setLevel(old)
