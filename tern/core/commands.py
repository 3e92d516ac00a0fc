"""The command codec: commands from the cloud team to a node, and what became of them.

A command travels Kafka (``tern.commands``, key = device id) -> bridge -> the gateway's command
topic on the cloud broker -> the node's own command topic on the Pi broker; the node's reply
and every step's outcome travel back to Kafka (``tern.command-results``, keyed by device).
docs/contracts.md describes the formats in prose, ``tern/core/schemas/kafka-command*.json``
formally; this module is the executable version shared by the bridge, the gateway and tests.

The codec checks structure only (ids, a command name, flat arguments, an expiry). Whether a
command exists and its arguments make sense is the node's call, with the firmware's own rules,
so a fleet with newer firmware can take commands this codec has never heard of.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from tern.core.errors import CodecError
from tern.core.jsonwire import dumps as _dumps
from tern.core.jsonwire import json_object as _json_object
from tern.core.topics import check_id

COMMAND_SCHEMA_ID = "tern.command/1"
RESULT_SCHEMA_ID = "tern.command-result/1"
NODE_VERSION = 1

#: A command record is small; anything bigger is a mistake, not a command.
MAX_COMMAND_BYTES = 2048
MAX_ARGS = 8
MAX_TEXT = 64
#: A node's reply (for example its config, secrets masked) is bounded like a node payload.
MAX_REPLY_BYTES = 1024
MAX_SAFE_INT = 2**53 - 1

#: What became of a command. ``delivered``: the node has it; the rest are final.
DELIVERED = "delivered"
DONE = "done"
REJECTED = "rejected"
EXPIRED = "expired"
OUTCOMES = (DELIVERED, DONE, REJECTED, EXPIRED)
FINAL_OUTCOMES = (DONE, REJECTED, EXPIRED)

# Command names and argument keys become firmware dispatch keys: a small safe alphabet.
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")

ArgValue = int | float | bool | str


@dataclass(frozen=True, slots=True)
class Command:
    """One command for one device, as the cloud team wrote it."""

    id: str
    device: str
    name: str
    args: Mapping[str, ArgValue] = field(default_factory=dict)
    expires_ms: int = 0
    gateway: str = ""

    def expired(self, now_ms: int) -> bool:
        """True once the expiry has passed (0 means the command never expires)."""
        return bool(self.expires_ms) and now_ms >= self.expires_ms


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of a command: ``outcome`` is one of :data:`OUTCOMES`.

    ``detail`` says why (a rejection's reason, the node's error); ``reply`` is the node's
    answer to a ``done`` command.
    """

    id: str
    device: str
    outcome: str
    gateway: str = ""
    detail: str = ""
    reply: Mapping[str, Any] | None = None
    ms: int = 0

    @property
    def final(self) -> bool:
        """True when nothing more will happen to the command."""
        return self.outcome in FINAL_OUTCOMES


@dataclass(frozen=True, slots=True)
class NodeReply:
    """A node's answer to a command it was given."""

    device: str
    id: str
    ok: bool
    result: Mapping[str, Any] | None = None
    error: str = ""


def _text(obj: Mapping[str, Any], key: str, what: str, *, required: bool = True, limit: int = MAX_TEXT) -> str:
    value = obj.get(key, None if required else "")
    if not isinstance(value, str) or len(value) > limit:
        raise CodecError(f"{what}: {key!r} must be a string of at most {limit} characters, got {value!r:.80}")
    return value


def _uint(obj: Mapping[str, Any], key: str, what: str, *, required: bool = True) -> int:
    value = obj.get(key, None if required else 0)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SAFE_INT:
        raise CodecError(f"{what}: {key!r} must be an integer in [0, 2**53-1], got {value!r:.80}")
    return value


def check_name(value: object, what: str = "command name") -> str:
    """Return ``value`` if it is a valid command name or argument key, else raise CodecError."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise CodecError(f"invalid {what} {value!r:.80}: want 1-32 of [a-z0-9_], starting with a letter")
    return value


def check_args(args: object, what: str) -> dict[str, ArgValue]:
    """Check a flat argument object: short safe keys, finite numbers, booleans, short strings."""
    if args is None:
        return {}
    if not isinstance(args, dict):
        raise CodecError(f"{what}: 'args' must be an object, got {type(args).__name__}")
    if len(args) > MAX_ARGS:
        raise CodecError(f"{what}: {len(args)} arguments, over the limit of {MAX_ARGS}")
    out: dict[str, ArgValue] = {}
    for key, value in args.items():
        check_name(key, "argument name")
        if isinstance(value, float) and not math.isfinite(value):
            raise CodecError(f"{what}: argument {key!r} is not finite")
        if isinstance(value, str) and len(value) > MAX_TEXT:
            raise CodecError(f"{what}: argument {key!r} is longer than {MAX_TEXT} characters")
        if not isinstance(value, (int, float, bool, str)):
            raise CodecError(f"{what}: argument {key!r} must be a number, boolean or short string")
        out[key] = value
    return out


# --- Kafka command records (cloud team -> bridge) -------------------------------------


def encode_command(command: Command) -> bytes:
    """The Kafka value of a command record (key: the device id)."""
    check_id(command.id, "command id")
    check_id(command.device, "device")
    check_name(command.name)
    value: dict[str, Any] = {
        "schema": COMMAND_SCHEMA_ID,
        "id": command.id,
        "device": command.device,
        "name": command.name,
        "args": check_args(dict(command.args), "command"),
        "expires_ms": command.expires_ms,
    }
    if command.gateway:
        value["gateway"] = check_id(command.gateway, "gateway")
    return _dumps(value)


def decode_command(raw: bytes, *, key: bytes | None = None) -> Command:
    """Decode a command record, raising CodecError with the reason a rejection carries.

    ``key`` is the record's Kafka key: when present it must be the command's device, so a
    command cannot be routed by one device id and addressed to another.
    """
    what = "command"
    obj = _json_object(raw, MAX_COMMAND_BYTES, what)
    if obj.get("schema") != COMMAND_SCHEMA_ID:
        raise CodecError(f"{what}: unknown schema {obj.get('schema')!r:.80}, want {COMMAND_SCHEMA_ID!r}")
    command = Command(
        id=check_id(_text(obj, "id", what), "command id"),
        device=check_id(_text(obj, "device", what), "device"),
        name=check_name(obj.get("name")),
        args=check_args(obj.get("args"), what),
        expires_ms=_uint(obj, "expires_ms", what, required=False),
        gateway=_text(obj, "gateway", what, required=False),
    )
    if command.gateway:
        check_id(command.gateway, "gateway")
    if key is not None and key != command.device.encode():
        raise CodecError(f"{what}: record key {key[:64]!r} is not the device {command.device!r}")
    unknown = set(obj) - {"schema", "id", "device", "name", "args", "expires_ms", "gateway"}
    if unknown:
        raise CodecError(f"{what}: unknown field(s) {', '.join(sorted(unknown))[:120]}")
    return command


def salvage_identity(raw: bytes, key: bytes | None) -> tuple[str, str]:
    """Best-effort (command id, device) of a malformed record, for its ``rejected`` outcome.

    Ids that are not valid become ``""`` / ``"unknown"``: the outcome must itself be valid.
    """
    command_id, device = "", ""
    try:
        obj = json.loads(raw[:MAX_COMMAND_BYTES])
        if isinstance(obj, dict):
            command_id = obj.get("id", "") if isinstance(obj.get("id"), str) else ""
            device = obj.get("device", "") if isinstance(obj.get("device"), str) else ""
    except (ValueError, UnicodeDecodeError):
        pass
    if not device and key:
        device = key.decode("utf-8", "replace")

    def valid(value: str, what: str) -> bool:
        try:
            check_id(value, what)
            return True
        except CodecError:
            return False

    return (command_id if valid(command_id, "id") else "", device if valid(device, "device") else "unknown")


# --- outcomes (gateway/bridge -> Kafka) ----------------------------------------------


def encode_outcome(outcome: Outcome) -> bytes:
    """The Kafka value of an outcome record (topic ``tern.command-results``, key: device)."""
    if outcome.outcome not in OUTCOMES:
        raise CodecError(f"unknown outcome {outcome.outcome!r}")
    value: dict[str, Any] = {
        "schema": RESULT_SCHEMA_ID,
        "id": outcome.id,
        "device": outcome.device,
        "gateway": outcome.gateway,
        "outcome": outcome.outcome,
        "detail": outcome.detail[:200],
        "reply": dict(outcome.reply) if outcome.reply is not None else None,
        "ms": outcome.ms,
    }
    return _dumps(value)


def decode_outcome(raw: bytes) -> Outcome:
    """Decode an outcome record (for consumers, ``tern-bridge command --wait`` and tests)."""
    what = "command result"
    obj = _json_object(raw, MAX_COMMAND_BYTES + MAX_REPLY_BYTES, what)
    if obj.get("schema") != RESULT_SCHEMA_ID:
        raise CodecError(f"{what}: unknown schema {obj.get('schema')!r:.80}")
    outcome = _text(obj, "outcome", what)
    if outcome not in OUTCOMES:
        raise CodecError(f"{what}: unknown outcome {outcome!r}")
    reply = obj.get("reply")
    if reply is not None and not isinstance(reply, dict):
        raise CodecError(f"{what}: 'reply' must be an object or null")
    return Outcome(
        id=_text(obj, "id", what),
        device=_text(obj, "device", what),
        outcome=outcome,
        gateway=_text(obj, "gateway", what, required=False),
        detail=_text(obj, "detail", what, required=False, limit=200),
        reply=reply,
        ms=_uint(obj, "ms", what, required=False),
    )


# --- node side (gateway <-> node on the Pi broker) ------------------------------------


def encode_node_command(command: Command) -> bytes:
    """What the gateway publishes on the node's command topic: small, for a small heap."""
    return _dumps({"v": NODE_VERSION, "id": command.id, "name": command.name, "args": dict(command.args)})


def decode_node_reply(raw: bytes, *, topic_device: str | None = None) -> NodeReply:
    """Decode a node's reply, which must come from the device whose topic it is on."""
    what = "command reply"
    obj = _json_object(raw, MAX_REPLY_BYTES, what)
    if obj.get("v") != NODE_VERSION:
        raise CodecError(f"{what}: unsupported version v={obj.get('v')!r:.20}")
    device = check_id(_text(obj, "dev", what), "device")
    if topic_device is not None and device != topic_device:
        raise CodecError(f"{what}: device {device!r} replied on the topic of {topic_device!r}")
    ok = obj.get("ok")
    if not isinstance(ok, bool):
        raise CodecError(f"{what}: 'ok' must be true or false")
    result = obj.get("result")
    if result is not None and not isinstance(result, dict):
        raise CodecError(f"{what}: 'result' must be an object")
    return NodeReply(
        device=device,
        id=check_id(_text(obj, "id", what), "command id"),
        ok=ok,
        result=result,
        error=_text(obj, "error", what, required=False, limit=200),
    )
