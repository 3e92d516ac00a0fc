"""Compact JSON on the wire, and the one untrusting way to read a JSON object off it.

Shared by the reading codec (:mod:`tern.core.codec`) and the command codec
(:mod:`tern.core.commands`), which would otherwise import each other.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from tern.core.errors import CodecError

# One encoder, built once: json.dumps with non-default options builds a new one per call,
# which was a fifth of the cost of a Kafka record on the bridge's hot path.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def dumps(obj: Any) -> bytes:
    """``obj`` as compact UTF-8 JSON; NaN and infinities are refused (not JSON)."""
    return _ENCODER.encode(obj).encode()


def dumps_finite(obj: Any) -> bytes:
    """``obj`` as compact UTF-8 JSON, ten times faster than :func:`dumps`, for documents whose
    floats are known to be finite (values the codec validated, timestamps).

    orjson writes a NaN as ``null`` instead of refusing it, so it is kept to the hot paths
    (batch envelopes, Kafka records) where every float has passed the codec's checks.
    """
    return orjson.dumps(obj)


def json_object(raw: bytes | str, limit: int, what: str) -> dict[str, Any]:
    """Parse ``raw`` as one JSON object of at most ``limit`` bytes, else raise CodecError naming ``what``."""
    if len(raw) > limit:
        raise CodecError(f"{what} is {len(raw)} bytes, over the {limit}-byte limit")
    try:
        # orjson: four times faster than json.loads on the hot paths (batch envelopes).
        obj = orjson.loads(raw)
    except (ValueError, UnicodeDecodeError):
        # It is stricter (NaN and Infinity literals, integers past 64 bits): the standard
        # parser decides, so the caller's checks name what is wrong ("not finite",
        # "out of range") exactly as before.
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise CodecError(f"{what} is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise CodecError(f"{what} must be a JSON object, got {type(obj).__name__}")
    return obj
