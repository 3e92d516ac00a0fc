"""Untrusted text in log lines and error messages, kept short.

A topic or payload comes from whoever can publish to a broker: a 65,000-character topic
once made a 130 KB log line. :func:`quote` shows such a value as a ``repr`` cut to a few
hundred characters and says how long it really was, so a log line stays one readable line
of bounded size and still tells the reader what arrived.
"""

from __future__ import annotations

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
