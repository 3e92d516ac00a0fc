"""Compact JSON on the wire, and the one untrusting way to read a JSON object off it.

Shared by the reading codec (:mod:`tern.core.codec`) and the command codec
(:mod:`tern.core.commands`), which would otherwise import each other.
"""

from __future__ import annotations

import json
from typing import Any

from tern.core.errors import CodecError


def dumps(obj: Any) -> bytes:
    """``obj`` as compact UTF-8 JSON; NaN and infinities are refused (not JSON)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def json_object(raw: bytes | str, limit: int, what: str) -> dict[str, Any]:
    """Parse ``raw`` as one JSON object of at most ``limit`` bytes, else raise CodecError naming ``what``."""
    if len(raw) > limit:
        raise CodecError(f"{what} is {len(raw)} bytes, over the {limit}-byte limit")
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CodecError(f"{what} is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise CodecError(f"{what} must be a JSON object, got {type(obj).__name__}")
    return obj
