"""Untrusted text in log lines and error messages, kept short.

A topic or payload comes from whoever can publish to a broker: a 65,000-character topic
once made a 130 KB log line. :func:`quote` shows such a value as a ``repr`` cut to a few
hundred characters and says how long it really was, so a log line stays one readable line
of bounded size and still tells the reader what arrived.
"""

from __future__ import annotations

import logging

#: Characters of an untrusted value shown in a log line by default.
DEFAULT_LIMIT = 120


def shorten(text: str, limit: int = DEFAULT_LIMIT) -> str:
    """``text`` itself if it is at most ``limit`` characters, else its head, ``…`` and its length."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} chars)"


def quote(value: str | bytes | bytearray | memoryview | None, limit: int = DEFAULT_LIMIT) -> str:
    """``repr`` of an untrusted value (a topic, a payload), cut to about ``limit`` characters.

    Bytes are shown as bytes (``b'...'``), with their length in bytes when cut; control
    characters are escaped by ``repr``, so the result is always one line.
    """
    if value is None:
        return "None"
    if isinstance(value, (bytearray, memoryview)):
        value = bytes(value)
    unit = "bytes" if isinstance(value, bytes) else "chars"
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}… ({len(value)} {unit})"


def describe(exc: BaseException, limit: int = 300) -> str:
    """An exception's message for a log line, shortened: codec errors quote what they reject,
    and what they reject may be a 65,000-character topic."""
    return shorten(str(exc) or type(exc).__name__, limit)


#: A log line longer than this is cut by :class:`BoundedLines` (a safety net, not the rule:
#: log calls quote untrusted values themselves).
MAX_LINE = 4000


class BoundedLines(logging.Filter):
    """A handler filter that cuts every record's message to ``limit`` characters.

    The last line of defence for a log call that forgot to :func:`quote` something. It
    renders the message once (``msg % args``) and keeps the cut text, so no formatter ever
    sees the long one.
    """

    def __init__(self, limit: int = MAX_LINE) -> None:
        super().__init__()
        self.limit = limit

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: let logging report it as it always does
            return True
        if len(message) > self.limit:
            record.msg = shorten(message, self.limit)
            record.args = None
        return True


def bound_log_lines(limit: int = MAX_LINE) -> None:
    """Install :class:`BoundedLines` on every handler of the root logger (call after
    ``logging.basicConfig``)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, BoundedLines) for f in handler.filters):
            handler.addFilter(BoundedLines(limit))
