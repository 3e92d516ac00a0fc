"""The wire codec: every payload Tern puts on MQTT or Kafka is encoded and decoded here.

docs/contracts.md describes the formats in prose; the JSON Schemas in ``tern/core/schemas``
describe the JSON ones formally; this module is the executable version, shared by the
gateway (``edge``) and the bridge (``cloud``). Decoders never trust their input: anything
off-contract raises :class:`CodecError` with a message fit for a dead-letter entry.
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass, field, fields
from typing import Any, Iterator, Mapping

from tern.core.commands import MAX_REPLY_BYTES, OUTCOMES, Outcome, encode_outcome
from tern.core.errors import CodecError
from tern.core.jsonwire import dumps as _dumps, dumps_finite as _dumps_finite, json_object as _json_object
from tern.core.topics import check_id

WIRE_VERSION = 1
#: A node's bundle of readings (docs/contracts.md, "Bundles"): the backlog a node replays
#: after a reconnect or a deep-sleep wake, up to MAX_BUNDLE readings of one boot.
BUNDLE_VERSION = 2
MAX_BUNDLE = 32
#: Boots a node may list in its birth message's "dropped" object.
MAX_DROPPED_BOOTS = 16
#: Sensors a node may list as down in its birth message (a node has at most 16 sensors),
#: and the longest label.
MAX_DOWN = 16
MAX_DOWN_LABEL = 32
_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")

#: Largest node payload accepted. A reading is ~100-300 bytes; the firmware's own buffers
#: are sized far below this, so anything larger is a fault, not data.
MAX_NODE_PAYLOAD = 4096
#: Largest batch envelope on the cloud broker, compressed and decompressed.
MAX_BATCH_BYTES = 1 << 20
MAX_BATCH_INFLATED = 16 << 20
MAX_READINGS_PER_MESSAGE = 32
MAX_NAME_LEN = 32
MAX_TEXT_LEN = 64
#: Sequence numbers and timestamps must survive JSON consumers that use doubles.
MAX_SAFE_INT = 2**53 - 1

STATES = ("online", "offline")

Value = int | float | bool | str


@dataclass(frozen=True, slots=True)
class Reading:
    """One sample from one node, as the node sent it plus where it was seen.

    ``site`` comes from the MQTT topic, ``received_ms`` is stamped by the gateway when it
    committed the reading to its outbox (0 until then).
    """

    device: str
    boot: str
    seq: int
    ts_ms: int
    values: Mapping[str, Value]
    site: str = ""
    received_ms: int = 0

    @property
    def identity(self) -> tuple[str, str, int]:
        """(device, boot, seq): unique per reading, the key consumers de-duplicate on."""
        return (self.device, self.boot, self.seq)


@dataclass(frozen=True, slots=True)
class Status:
    """A node's retained status: the birth message or the last will."""

    device: str
    state: str
    boot: str
    fw: str = ""
    reset: str = ""
    #: ((boot, n), ...): readings the node had to drop, per boot, since it last said so.
    dropped: tuple[tuple[str, int], ...] = ()
    #: Labels of the node's sensors that are not answering now (its "down" list).
    down: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class StatusEvent:
    """A node status as the gateway committed it: the :class:`Status` plus where and when seen.

    Flat rather than wrapping a Status, so the envelope item, the outbox row and the Kafka
    value all map to it field by field. ``site`` comes from the MQTT topic,
    ``received_ms`` is when the gateway committed it (0 until then).
    """

    site: str
    device: str
    state: str
    boot: str
    fw: str = ""
    reset: str = ""
    received_ms: int = 0
    dropped: tuple[tuple[str, int], ...] = ()
    down: tuple[str, ...] = ()

    @classmethod
    def from_status(cls, status: Status, site: str, received_ms: int = 0) -> "StatusEvent":
        """The event for ``status`` seen on ``site``'s topic."""
        return cls(site, status.device, status.state, status.boot, status.fw, status.reset, received_ms, status.dropped,
                   status.down)


@dataclass(frozen=True, slots=True)
class NodeAck:
    """Gateway to node: every reading of ``boot`` with a seq up to ``seq`` is committed."""

    boot: str
    seq: int


#: Why a gateway dropped readings by policy (docs/contracts.md, "Drop events").
DROP_REASONS = ("max_rows", "max_bytes", "max_age")


@dataclass(frozen=True, slots=True)
class DropEvent:
    """Gateway to cloud: the ``count`` readings of one (device, boot) with seqs ``first_seq`` to
    ``last_seq`` were deleted from the outbox by its retention policy and will never arrive.

    The gateway sends runs of consecutive seqs (``count == last_seq - first_seq + 1``); the
    decoder accepts a smaller count. ``dropped_ms`` is when the gateway dropped the last of them.
    """

    site: str
    device: str
    boot: str
    reason: str
    first_seq: int
    last_seq: int
    count: int
    dropped_ms: int


@dataclass(frozen=True, slots=True)
class Batch:
    """Gateway to bridge: readings and node status events from one gateway, each in outbox order,
    drop events (the ``drops/1`` envelope extension) and command outcomes (``outcomes/1``)."""

    gateway: str
    bseq: int
    sent_ms: int
    readings: tuple[Reading, ...] = field(default_factory=tuple)
    statuses: tuple[StatusEvent, ...] = field(default_factory=tuple)
    drops: tuple[DropEvent, ...] = field(default_factory=tuple)
    #: What became of commands sent to this gateway's nodes, in the order it recorded them.
    outcomes: tuple[Outcome, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class Confirm:
    """Bridge to gateway: batch ``bseq`` is acknowledged by Kafka (acks=all)."""

    gateway: str
    bseq: int
    count: int


@dataclass(frozen=True, slots=True)
class KafkaRecord:
    """What the bridge hands to the Kafka producer for one reading or status event."""

    topic: str
    key: bytes
    value: bytes
    headers: tuple[tuple[str, bytes], ...]


# Fast constructors for the hot paths (a backlog builds a million readings and records). A
# frozen dataclass's __init__ sets each field through object.__setattr__; the slot
# descriptors set them directly, in less than half the time. Same objects, positional
# arguments in field order, no defaults.
_new = object.__new__
_R_DEVICE, _R_BOOT, _R_SEQ, _R_TS, _R_VALUES, _R_SITE, _R_RX = (
    getattr(Reading, f.name).__set__ for f in fields(Reading))
_K_TOPIC, _K_KEY, _K_VALUE, _K_HEADERS = (getattr(KafkaRecord, f.name).__set__ for f in fields(KafkaRecord))


def new_reading(device: str, boot: str, seq: int, ts_ms: int, values: Mapping[str, Value], site: str,
                received_ms: int) -> Reading:
    """``Reading(device, boot, seq, ts_ms, values, site, received_ms)``, built fast (no checks)."""
    reading = _new(Reading)
    _R_DEVICE(reading, device)
    _R_BOOT(reading, boot)
    _R_SEQ(reading, seq)
    _R_TS(reading, ts_ms)
    _R_VALUES(reading, values)
    _R_SITE(reading, site)
    _R_RX(reading, received_ms)
    return reading


def _new_kafka_record(topic: str, key: bytes, value: bytes, headers: tuple[tuple[str, bytes], ...]) -> KafkaRecord:
    record = _new(KafkaRecord)
    _K_TOPIC(record, topic)
    _K_KEY(record, key)
    _K_VALUE(record, value)
    _K_HEADERS(record, headers)
    return record



# --- helpers -------------------------------------------------------------------------


def _int(obj: Mapping[str, Any], key: str, what: str, *, minimum: int = 0) -> int:
    value = obj.get(key)
    # bool is an int in Python; a JSON true is not a sequence number.
    if not isinstance(value, int) or isinstance(value, bool):
        raise CodecError(f"{what}: {key!r} must be an integer, got {value!r}")
    if not minimum <= value <= MAX_SAFE_INT:
        raise CodecError(f"{what}: {key!r}={value} out of range [{minimum}, 2**53-1]")
    return value


def _text(obj: Mapping[str, Any], key: str, what: str, *, required: bool = True) -> str:
    value = obj.get(key, None if required else "")
    if not isinstance(value, str) or len(value) > MAX_TEXT_LEN:
        raise CodecError(f"{what}: {key!r} must be a string of at most {MAX_TEXT_LEN} characters")
    return value


def _boot(obj: Mapping[str, Any], what: str) -> str:
    boot = _text(obj, "boot", what)
    if not 4 <= len(boot) <= 32 or any(c not in "0123456789abcdef" for c in boot):
        raise CodecError(f"{what}: 'boot' must be 4-32 lowercase hex digits, got {boot!r}")
    return boot


def _check_version(obj: Mapping[str, Any], what: str) -> None:
    if obj.get("v") != WIRE_VERSION:
        raise CodecError(f"{what}: unsupported version v={obj.get('v')!r}, this codec speaks v={WIRE_VERSION}")


def _values(obj: Mapping[str, Any], what: str) -> dict[str, Value]:
    values = obj.get("r")
    if not isinstance(values, dict) or not values:
        raise CodecError(f"{what}: 'r' must be a non-empty object of readings")
    if len(values) > MAX_READINGS_PER_MESSAGE:
        raise CodecError(f"{what}: {len(values)} readings, over the limit of {MAX_READINGS_PER_MESSAGE}")
    for name, value in values.items():
        if not 1 <= len(name) <= MAX_NAME_LEN:
            raise CodecError(f"{what}: reading name {name!r} must be 1-{MAX_NAME_LEN} characters")
        if isinstance(value, float) and not math.isfinite(value):
            raise CodecError(f"{what}: reading {name!r} is not finite")
        if isinstance(value, str) and len(value) > MAX_TEXT_LEN:
            raise CodecError(f"{what}: reading {name!r} is longer than {MAX_TEXT_LEN} characters")
        if not isinstance(value, (int, float, bool, str)):
            raise CodecError(f"{what}: reading {name!r} must be a number, boolean or short string")
    return values


# --- node payloads (node -> gateway) -------------------------------------------------


def _node_message(raw: bytes, what: str, topic_device: str | None) -> tuple[dict[str, Any], str]:
    """Parse a node's JSON message and its device id, which must be the topic's device:
    per-device topics are what the broker's ACLs protect."""
    obj = _json_object(raw, MAX_NODE_PAYLOAD, what)
    _check_version(obj, what)
    device = check_id(_text(obj, "dev", what), "device")
    if topic_device is not None and device != topic_device:
        raise CodecError(f"{what}: device {device!r} published on the topic of {topic_device!r}")
    return obj, device


def encode_reading(reading: Reading) -> bytes:
    """Encode a reading the way the firmware does (used by tests and simulators)."""
    return _dumps(
        {
            "v": WIRE_VERSION,
            "dev": reading.device,
            "boot": reading.boot,
            "seq": reading.seq,
            "ts": reading.ts_ms,
            "r": dict(reading.values),
        }
    )


def decode_reading(raw: bytes, *, site: str = "", topic_device: str | None = None) -> Reading:
    """Decode a node's telemetry payload.

    ``topic_device`` is the device id from the MQTT topic; a payload claiming another device
    is rejected, because per-device topics are what the broker's ACLs protect.
    """
    what = "node payload"
    obj, device = _node_message(raw, what, topic_device)
    return Reading(
        device=device,
        boot=_boot(obj, what),
        seq=_int(obj, "seq", what),
        ts_ms=_int(obj, "ts", what),
        values=_values(obj, what),
        site=site,
    )


def encode_bundle(readings: "tuple[Reading, ...] | list[Reading]") -> bytes:
    """Encode readings of one device and boot as a v2 bundle (as the firmware does)."""
    if not readings or len(readings) > MAX_BUNDLE:
        raise CodecError(f"a bundle holds 1-{MAX_BUNDLE} readings, got {len(readings)}")
    first = readings[0]
    if any(r.device != first.device or r.boot != first.boot for r in readings):
        raise CodecError("a bundle holds readings of one device and boot")
    return _dumps(
        {
            "v": BUNDLE_VERSION,
            "dev": first.device,
            "boot": first.boot,
            "items": [{"seq": r.seq, "ts": r.ts_ms, "r": dict(r.values)} for r in readings],
        }
    )


def decode_readings(raw: bytes, *, site: str = "", topic_device: str | None = None) -> tuple[Reading, ...]:
    """Decode a node's telemetry payload: one reading (v1) or a bundle (v2) of up to
    :data:`MAX_BUNDLE` readings of one boot, seqs strictly increasing."""
    what = "node payload"
    obj = _json_object(raw, MAX_NODE_PAYLOAD, what)
    if obj.get("v") != BUNDLE_VERSION:
        return (decode_reading(raw, site=site, topic_device=topic_device),)
    what = "node bundle"
    device = check_id(_text(obj, "dev", what), "device")
    if topic_device is not None and device != topic_device:
        raise CodecError(f"{what}: device {device!r} published on the topic of {topic_device!r}")
    boot = _boot(obj, what)
    items = list(_object_list(obj, "items", what, "item"))
    if not 1 <= len(items) <= MAX_BUNDLE:
        raise CodecError(f"{what}: 'items' must hold 1-{MAX_BUNDLE} readings, got {len(items)}")
    out = []
    for where, item in items:
        seq = _int(item, "seq", where)
        if out and seq <= out[-1].seq:
            raise CodecError(f"{where}: seq {seq} does not follow {out[-1].seq}")
        out.append(Reading(device=device, boot=boot, seq=seq, ts_ms=_int(item, "ts", where), values=_values(item, where), site=site))
    return tuple(out)


def _dropped(obj: Mapping[str, Any], what: str) -> tuple[tuple[str, int], ...]:
    """The optional ``dropped`` object of a status: {boot: readings dropped}."""
    raw = obj.get("dropped", {})
    if not isinstance(raw, dict) or len(raw) > MAX_DROPPED_BOOTS:
        raise CodecError(f"{what}: 'dropped' must be an object of at most {MAX_DROPPED_BOOTS} boots")
    out = []
    for boot, n in raw.items():
        _boot({"boot": boot}, f"{what} dropped")
        out.append((boot, _int({"n": n}, "n", f"{what} dropped[{boot!r}]")))
    return tuple(out)


def _down(obj: Mapping[str, Any], what: str) -> tuple[str, ...]:
    """The optional ``down`` list of a status: labels of the sensors not answering."""
    raw = obj.get("down", [])
    if not isinstance(raw, list) or len(raw) > MAX_DOWN:
        raise CodecError(f"{what}: 'down' must be a list of at most {MAX_DOWN} sensor labels")
    for label in raw:
        if not isinstance(label, str) or not 1 <= len(label) <= MAX_DOWN_LABEL or not _LABEL_CHARS.issuperset(label):
            raise CodecError(
                f"{what}: 'down' entries must be 1-{MAX_DOWN_LABEL} of [A-Za-z0-9_.-], got {label!r:.80}"
            )
    return tuple(raw)


def encode_status(status: Status) -> bytes:
    """Encode a birth message or last will."""
    obj: dict[str, Any] = {"v": WIRE_VERSION, "dev": status.device, "state": status.state, "boot": status.boot}
    if status.fw:
        obj["fw"] = status.fw
    if status.reset:
        obj["reset"] = status.reset
    if status.dropped:
        obj["dropped"] = dict(status.dropped)
    if status.down:
        obj["down"] = list(status.down)
    return _dumps(obj)


def _state(obj: Mapping[str, Any], what: str) -> str:
    state = obj.get("state")
    if state not in STATES:
        raise CodecError(f"{what}: 'state' must be one of {STATES}, got {state!r}")
    return state


def decode_status(raw: bytes, *, topic_device: str | None = None) -> Status:
    """Decode a retained status message.

    ``topic_device`` is the device id from the MQTT topic; as for readings, a status
    claiming another device is rejected.
    """
    what = "status"
    obj, device = _node_message(raw, what, topic_device)
    return Status(
        device=device,
        state=_state(obj, what),
        boot=_boot(obj, what),
        fw=_text(obj, "fw", what, required=False),
        reset=_text(obj, "reset", what, required=False),
        dropped=_dropped(obj, what),
        down=_down(obj, what),
    )


def encode_node_ack(ack: NodeAck) -> bytes:
    """Encode the gateway's acknowledgement to a node."""
    return _dumps({"v": WIRE_VERSION, "boot": ack.boot, "seq": ack.seq})


def decode_node_ack(raw: bytes) -> NodeAck:
    """Decode a gateway acknowledgement (the firmware has its own few-line decoder)."""
    what = "node ack"
    obj = _json_object(raw, MAX_NODE_PAYLOAD, what)
    _check_version(obj, what)
    return NodeAck(boot=_boot(obj, what), seq=_int(obj, "seq", what))


# --- batch envelope (gateway -> bridge) ----------------------------------------------


def _reading_item(reading: Reading) -> dict[str, Any]:
    return {
        "site": reading.site,
        "dev": reading.device,
        "boot": reading.boot,
        "seq": reading.seq,
        "ts": reading.ts_ms,
        "rx": reading.received_ms,
        "r": dict(reading.values),
    }


def _status_item(event: StatusEvent) -> dict[str, Any]:
    item: dict[str, Any] = {"site": event.site, "dev": event.device, "state": event.state, "boot": event.boot}
    # Optional, as in the node's own status: a last will carries neither.
    if event.fw:
        item["fw"] = event.fw
    if event.reset:
        item["reset"] = event.reset
    if event.dropped:
        item["dropped"] = dict(event.dropped)
    if event.down:  # only when a sensor is down: other envelopes stay byte-identical
        item["down"] = list(event.down)
    item["rx"] = event.received_ms
    return item


#: Envelope extensions this codec speaks. An envelope lists those it uses in ``ext``; a
#: decoder refuses an envelope naming one it does not know rather than silently dropping
#: what it carries.
DROPS_EXTENSION = "drops/1"
OUTCOMES_EXTENSION = "outcomes/1"
EXTENSIONS = (DROPS_EXTENSION, OUTCOMES_EXTENSION)
#: Drop events per envelope at most (they are coalesced per device, boot and reason).
MAX_DROPS_PER_BATCH = 1000
#: Command outcomes per envelope at most (a node reply is at most ~1 KB).
MAX_OUTCOMES_PER_BATCH = 100
#: Longest outcome detail carried (a rejection's reason, a node's error).
MAX_OUTCOME_DETAIL = 200


def _drop_item(drop: DropEvent) -> dict[str, Any]:
    return {
        "site": drop.site,
        "dev": drop.device,
        "boot": drop.boot,
        "reason": drop.reason,
        "first": drop.first_seq,
        "last": drop.last_seq,
        "n": drop.count,
        "at": drop.dropped_ms,
    }


def _outcome_item(outcome: Outcome) -> dict[str, Any]:
    if outcome.outcome not in OUTCOMES:
        raise CodecError(f"unknown command outcome {outcome.outcome!r}")
    return {
        "id": outcome.id,
        "dev": outcome.device,
        "outcome": outcome.outcome,
        "detail": outcome.detail[:MAX_OUTCOME_DETAIL],
        "reply": dict(outcome.reply) if outcome.reply is not None else None,
        "at": outcome.ms,
    }


def encode_batch(batch: Batch) -> bytes:
    """Encode a batch envelope: zlib-compressed compact JSON."""
    check_id(batch.gateway, "gateway")
    doc: dict[str, Any] = {
        "v": WIRE_VERSION,
        "gw": batch.gateway,
        "bseq": batch.bseq,
        "sent": batch.sent_ms,
        "items": [_reading_item(r) for r in batch.readings],
    }
    # Only when there are any: a batch of readings alone stays byte-identical to before.
    if batch.statuses:
        doc["events"] = [_status_item(e) for e in batch.statuses]
    if batch.drops:
        if len(batch.drops) > MAX_DROPS_PER_BATCH:
            raise CodecError(f"{len(batch.drops)} drop events, over the limit of {MAX_DROPS_PER_BATCH} per batch")
        doc.setdefault("ext", []).append(DROPS_EXTENSION)
        doc["drops"] = [_drop_item(d) for d in batch.drops]
    if batch.outcomes:
        if len(batch.outcomes) > MAX_OUTCOMES_PER_BATCH:
            raise CodecError(f"{len(batch.outcomes)} command outcomes, over the limit of {MAX_OUTCOMES_PER_BATCH} per batch")
        doc.setdefault("ext", []).append(OUTCOMES_EXTENSION)
        doc["outcomes"] = [_outcome_item(o) for o in batch.outcomes]
    # Every float in a batch is a reading value the codec checked (finite) on the way in.
    data = zlib.compress(_dumps_finite(doc), 6)
    if len(data) > MAX_BATCH_BYTES:
        raise CodecError(
            f"batch of {len(batch.readings)} readings and {len(batch.statuses)} status events"
            f" compresses to {len(data)} bytes, over {MAX_BATCH_BYTES}"
        )
    return data


def _object_list(
    obj: Mapping[str, Any], key: str, what: str, label: str, *, default: list | None = None
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (where, item) for each object in the list ``obj[key]``, rejecting anything else."""
    items = obj.get(key, default)
    if not isinstance(items, list):
        raise CodecError(f"{what}: {key!r} must be a list")
    for index, item in enumerate(items):
        where = f"{what} {label} {index}"
        if not isinstance(item, dict):
            raise CodecError(f"{where}: must be an object")
        yield where, item


def _decode_status_events(obj: Mapping[str, Any], what: str) -> tuple[StatusEvent, ...]:
    """The envelope's optional ``events`` list; absent means none (older gateways never send it)."""
    return tuple(
        StatusEvent(
            site=check_id(_text(item, "site", where), "site"),
            device=check_id(_text(item, "dev", where), "device"),
            state=_state(item, where),
            boot=_boot(item, where),
            fw=_text(item, "fw", where, required=False),
            reset=_text(item, "reset", where, required=False),
            received_ms=_int(item, "rx", where),
            dropped=_dropped(item, where),
            down=_down(item, where),
        )
        for where, item in _object_list(obj, "events", what, "event", default=[])
    )


def _decode_extensions(obj: Mapping[str, Any], what: str) -> tuple[str, ...]:
    """The envelope's optional ``ext`` list, every entry one this codec speaks."""
    ext = obj.get("ext", [])
    if not isinstance(ext, list) or not all(isinstance(e, str) for e in ext):
        raise CodecError(f"{what}: 'ext' must be a list of extension names")
    unknown = [e for e in ext if e not in EXTENSIONS]
    if unknown:
        raise CodecError(f"{what}: unsupported extension {unknown[0]!r}, this codec speaks {list(EXTENSIONS)}")
    return tuple(ext)


def _decode_drops(obj: Mapping[str, Any], what: str, ext: tuple[str, ...]) -> tuple[DropEvent, ...]:
    """The envelope's ``drops`` list; only with the ``drops/1`` extension named in ``ext``."""
    if "drops" not in obj:
        return ()
    if DROPS_EXTENSION not in ext:
        raise CodecError(f"{what}: 'drops' present without {DROPS_EXTENSION!r} in 'ext'")
    drops = []
    for where, item in _object_list(obj, "drops", what, "drop"):
        if len(drops) >= MAX_DROPS_PER_BATCH:
            raise CodecError(f"{what}: over {MAX_DROPS_PER_BATCH} drop events")
        reason = item.get("reason")
        if reason not in DROP_REASONS:
            raise CodecError(f"{where}: 'reason' must be one of {DROP_REASONS}, got {reason!r}")
        first, last = _int(item, "first", where), _int(item, "last", where)
        count = _int(item, "n", where, minimum=1)
        if last < first or count > last - first + 1:
            raise CodecError(f"{where}: {count} readings do not fit seqs {first}..{last}")
        drops.append(
            DropEvent(
                site=check_id(_text(item, "site", where), "site"),
                device=check_id(_text(item, "dev", where), "device"),
                boot=_boot(item, where),
                reason=reason,
                first_seq=first,
                last_seq=last,
                count=count,
                dropped_ms=_int(item, "at", where),
            )
        )
    return tuple(drops)


def _decode_outcomes(obj: Mapping[str, Any], what: str, ext: tuple[str, ...], gateway: str) -> tuple[Outcome, ...]:
    """The envelope's ``outcomes`` list; only with the ``outcomes/1`` extension named in ``ext``."""
    if "outcomes" not in obj:
        return ()
    if OUTCOMES_EXTENSION not in ext:
        raise CodecError(f"{what}: 'outcomes' present without {OUTCOMES_EXTENSION!r} in 'ext'")
    out = []
    for where, item in _object_list(obj, "outcomes", what, "outcome"):
        if len(out) >= MAX_OUTCOMES_PER_BATCH:
            raise CodecError(f"{what}: over {MAX_OUTCOMES_PER_BATCH} command outcomes")
        outcome = item.get("outcome")
        if outcome not in OUTCOMES:
            raise CodecError(f"{where}: 'outcome' must be one of {OUTCOMES}, got {outcome!r:.40}")
        # A malformed command's id may be unknown (""): its rejection is reported all the same.
        command_id = _text(item, "id", where)
        if command_id:
            check_id(command_id, "command id")
        detail = item.get("detail", "")
        if not isinstance(detail, str) or len(detail) > MAX_OUTCOME_DETAIL:
            raise CodecError(f"{where}: 'detail' must be a string of at most {MAX_OUTCOME_DETAIL} characters")
        reply = item.get("reply")
        if reply is not None and not isinstance(reply, dict):
            raise CodecError(f"{where}: 'reply' must be an object or null")
        if reply is not None and len(_dumps(reply)) > MAX_REPLY_BYTES:
            raise CodecError(f"{where}: 'reply' is over {MAX_REPLY_BYTES} bytes")
        out.append(
            Outcome(
                id=command_id,
                device=check_id(_text(item, "dev", where), "device"),
                outcome=outcome,
                gateway=gateway,
                detail=detail,
                reply=reply,
                ms=_int(item, "at", where),
            )
        )
    return tuple(out)


def _reading_fast(item: dict[str, Any], checked: set[str]) -> Reading | None:
    """The reading of an envelope item that is plainly valid, else None.

    A backlog batch holds hundreds of readings from a few devices: once one item has proved
    its device, site and boot valid (the full checks, with their error messages, run on
    anything else), the rest need only cheap type and range tests. Same verdicts as the full
    checks, a third of the time.
    """
    device, site, boot = item.get("dev"), item.get("site"), item.get("boot")
    seq, ts, rx, values = item.get("seq"), item.get("ts"), item.get("rx"), item.get("r")
    if not (type(device) is str and device in checked and type(site) is str and site in checked
            and type(boot) is str and "boot:" + boot in checked
            and type(seq) is int and 0 <= seq <= MAX_SAFE_INT
            and type(ts) is int and 0 <= ts <= MAX_SAFE_INT
            and type(rx) is int and 0 <= rx <= MAX_SAFE_INT
            and type(values) is dict and 0 < len(values) <= MAX_READINGS_PER_MESSAGE):
        return None
    for name, value in values.items():
        kind = type(value)
        if not 1 <= len(name) <= MAX_NAME_LEN:
            return None
        if kind is float:
            if value - value != 0.0:  # NaN or an infinity
                return None
        elif kind is str:
            if len(value) > MAX_TEXT_LEN:
                return None
        elif kind is not int and kind is not bool:
            return None
    return new_reading(device, boot, seq, ts, values, site, rx)


def decode_batch(raw: bytes, *, topic_gateway: str | None = None) -> Batch:
    """Decode a batch envelope, refusing oversized, zip-bomb or off-contract input."""
    what = "batch"
    if len(raw) > MAX_BATCH_BYTES:
        raise CodecError(f"{what} is {len(raw)} bytes, over the {MAX_BATCH_BYTES}-byte limit")
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(raw, MAX_BATCH_INFLATED + 1)
    except zlib.error as exc:
        raise CodecError(f"{what} is not zlib data: {exc}") from None
    if len(text) > MAX_BATCH_INFLATED or inflater.unconsumed_tail:
        raise CodecError(f"{what} inflates past {MAX_BATCH_INFLATED} bytes")
    if not inflater.eof:
        raise CodecError(f"{what} is truncated zlib data")
    obj = _json_object(text, MAX_BATCH_INFLATED, what)
    _check_version(obj, what)
    ext = _decode_extensions(obj, what)
    gateway = check_id(_text(obj, "gw", what), "gateway")
    if topic_gateway is not None and gateway != topic_gateway:
        raise CodecError(f"{what}: gateway {gateway!r} published on the topic of {topic_gateway!r}")
    readings = []
    checked: set[str] = set()  # ids and boots this batch already proved valid
    for where, item in _object_list(obj, "items", what, "item"):
        reading = _reading_fast(item, checked)
        if reading is None:  # something to look at closely: the checks that explain it
            reading = Reading(
                device=check_id(_text(item, "dev", where), "device"),
                boot=_boot(item, where),
                seq=_int(item, "seq", where),
                ts_ms=_int(item, "ts", where),
                values=_values(item, where),
                site=check_id(_text(item, "site", where), "site"),
                received_ms=_int(item, "rx", where),
            )
            checked.update((reading.device, reading.site, "boot:" + reading.boot))
        readings.append(reading)
    return Batch(
        gateway=gateway,
        bseq=_int(obj, "bseq", what),
        sent_ms=_int(obj, "sent", what),
        readings=tuple(readings),
        statuses=_decode_status_events(obj, what),
        drops=_decode_drops(obj, what, ext),
        outcomes=_decode_outcomes(obj, what, ext, gateway),
    )


def encode_confirm(confirm: Confirm) -> bytes:
    """Encode the bridge's confirmation of a batch."""
    return _dumps({"v": WIRE_VERSION, "gw": confirm.gateway, "bseq": confirm.bseq, "n": confirm.count})


def decode_confirm(raw: bytes) -> Confirm:
    """Decode the bridge's confirmation of a batch."""
    what = "confirm"
    obj = _json_object(raw, MAX_NODE_PAYLOAD, what)
    _check_version(obj, what)
    return Confirm(
        gateway=check_id(_text(obj, "gw", what), "gateway"),
        bseq=_int(obj, "bseq", what),
        count=_int(obj, "n", what),
    )


# --- Kafka records (bridge -> Kafka) -------------------------------------------------

KAFKA_SCHEMA_ID = "tern.reading/1"


#: Text that needs no escaping inside a JSON string: what ids and boots are made of.
_PLAIN = re.compile(r"[A-Za-z0-9_.-]*")


def kafka_record(reading: Reading, gateway: str, topic: str, bridged_ms: int) -> KafkaRecord:
    """Map one reading to its Kafka record: key = device id, so a device stays in order."""
    site, device, boot = reading.site, reading.device, reading.boot
    seq, ts, rx = reading.seq, reading.ts_ms, reading.received_ms
    if (type(seq) is int and type(ts) is int and type(rx) is int and type(bridged_ms) is int
            and _PLAIN.fullmatch(f"{site}{device}{gateway}{boot}")):
        # The bridge's hot path, spelled out rather than built as a dict and serialized: the
        # ids need no escaping, and only the values go through the JSON encoder. The same
        # bytes as the dict form below (tests hold them equal), in a third of the time.
        value = (f'{{"schema":"{KAFKA_SCHEMA_ID}","site":"{site}","device":"{device}","gateway":"{gateway}",'
                 f'"boot":"{boot}","seq":{seq},"ts_ms":{ts},"gateway_rx_ms":{rx},"bridge_ms":{bridged_ms},'
                 '"readings":'
                 ).encode() + _dumps_finite(dict(reading.values)) + b"}"
    else:
        value = _dumps_finite({
            "schema": KAFKA_SCHEMA_ID,
            "site": site,
            "device": device,
            "gateway": gateway,
            "boot": boot,
            "seq": seq,
            "ts_ms": ts,
            "gateway_rx_ms": rx,
            "bridge_ms": bridged_ms,
            "readings": dict(reading.values),
        })
    headers = (
        ("device", device.encode()),
        ("gateway", gateway.encode()),
        ("boot", boot.encode()),
        ("seq", str(seq).encode()),
    )
    return _new_kafka_record(topic, device.encode(), value, headers)


def decode_kafka_value(raw: bytes) -> dict[str, Any]:
    """Decode and check a Kafka reading value (for consumers and tests)."""
    what = "kafka value"
    obj = _json_object(raw, MAX_NODE_PAYLOAD * 2, what)
    if obj.get("schema") != KAFKA_SCHEMA_ID:
        raise CodecError(f"{what}: unknown schema {obj.get('schema')!r}")
    for key in ("seq", "ts_ms", "gateway_rx_ms", "bridge_ms"):
        _int(obj, key, what)
    for key in ("site", "device", "gateway"):
        check_id(_text(obj, key, what), key)
    _boot(obj, what)
    _values({"r": obj.get("readings")}, what)
    return obj


KAFKA_STATUS_SCHEMA_ID = "tern.status/1"


def kafka_status_record(event: StatusEvent, gateway: str, topic: str, bridged_ms: int) -> KafkaRecord:
    """Map one node status event to its Kafka record: key = device id, like the readings.

    ``fw``, ``reset`` and ``down`` are always present in the value (empty when the node did
    not say, as in a last will), so consumers need no "missing key" case.
    """
    value = {
        "schema": KAFKA_STATUS_SCHEMA_ID,
        "site": event.site,
        "device": event.device,
        "gateway": gateway,
        "boot": event.boot,
        "state": event.state,
        "fw": event.fw,
        "reset": event.reset,
        "down": list(event.down),
        "gateway_rx_ms": event.received_ms,
        "bridge_ms": bridged_ms,
    }
    if event.dropped:  # only when the node lost readings: other records stay as they were
        value["dropped"] = dict(event.dropped)
    headers = (
        ("device", event.device.encode()),
        ("gateway", gateway.encode()),
        ("boot", event.boot.encode()),
        ("state", event.state.encode()),
    )
    return KafkaRecord(topic=topic, key=event.device.encode(), value=_dumps_finite(value), headers=headers)


def decode_kafka_status_value(raw: bytes) -> dict[str, Any]:
    """Decode and check a Kafka status value (for consumers and tests)."""
    what = "kafka status value"
    obj = _json_object(raw, MAX_NODE_PAYLOAD, what)
    if obj.get("schema") != KAFKA_STATUS_SCHEMA_ID:
        raise CodecError(f"{what}: unknown schema {obj.get('schema')!r}")
    for key in ("gateway_rx_ms", "bridge_ms"):
        _int(obj, key, what)
    for key in ("site", "device", "gateway"):
        check_id(_text(obj, key, what), key)
    _boot(obj, what)
    _state(obj, what)
    _text(obj, "fw", what)
    _text(obj, "reset", what)
    _dropped(obj, what)
    _down(obj, what)  # (absent in records of bridges that predate it: read as none)
    return obj


def kafka_outcome_record(outcome: Outcome, gateway: str, topic: str) -> KafkaRecord:
    """Map one command outcome to its Kafka record (the results topic): key = device id, so a
    device's outcomes stay in order; the value is :func:`tern.core.commands.encode_outcome`'s."""
    value = encode_outcome(Outcome(outcome.id, outcome.device, outcome.outcome, gateway, outcome.detail,
                                   outcome.reply, outcome.ms))
    headers = (
        ("device", outcome.device.encode()),
        ("gateway", gateway.encode()),
        ("command", outcome.id.encode()),
        ("outcome", outcome.outcome.encode()),
    )
    return KafkaRecord(topic=topic, key=outcome.device.encode(), value=value, headers=headers)


KAFKA_DROP_SCHEMA_ID = "tern.drop/1"


def kafka_drop_record(drop: DropEvent, gateway: str, topic: str, bridged_ms: int) -> KafkaRecord:
    """Map one drop event to its Kafka record (on the status topic): key = device id, so it
    sits in order with the device's statuses."""
    value = {
        "schema": KAFKA_DROP_SCHEMA_ID,
        "site": drop.site,
        "device": drop.device,
        "gateway": gateway,
        "boot": drop.boot,
        "reason": drop.reason,
        "first_seq": drop.first_seq,
        "last_seq": drop.last_seq,
        "count": drop.count,
        "dropped_ms": drop.dropped_ms,
        "bridge_ms": bridged_ms,
    }
    headers = (
        ("device", drop.device.encode()),
        ("gateway", gateway.encode()),
        ("boot", drop.boot.encode()),
        ("reason", drop.reason.encode()),
    )
    return KafkaRecord(topic=topic, key=drop.device.encode(), value=_dumps_finite(value), headers=headers)


def decode_kafka_drop_value(raw: bytes) -> dict[str, Any]:
    """Decode and check a Kafka drop value (for consumers and tests)."""
    what = "kafka drop value"
    obj = _json_object(raw, MAX_NODE_PAYLOAD, what)
    if obj.get("schema") != KAFKA_DROP_SCHEMA_ID:
        raise CodecError(f"{what}: unknown schema {obj.get('schema')!r}")
    for key in ("first_seq", "last_seq", "dropped_ms", "bridge_ms"):
        _int(obj, key, what)
    _int(obj, "count", what, minimum=1)
    for key in ("site", "device", "gateway"):
        check_id(_text(obj, key, what), key)
    _boot(obj, what)
    if obj.get("reason") not in DROP_REASONS:
        raise CodecError(f"{what}: 'reason' must be one of {DROP_REASONS}, got {obj.get('reason')!r}")
    return obj
