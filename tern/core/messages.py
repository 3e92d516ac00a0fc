"""What travels between the hops: the message types, the limits, and the field checks every
decoder shares (docs/contracts.md). The formats live one module per hop: :mod:`tern.core.node_wire`
(node -> gateway), :mod:`tern.core.envelope` (gateway -> bridge), :mod:`tern.core.kafka_wire`
(bridge -> Kafka); :mod:`tern.core.codec` gathers them for the gateway and the bridge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Iterator, Mapping, Sequence

from tern.core.commands import Outcome
from tern.core.errors import CodecError

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
#: What a node's ``ota`` report may say (docs/ota.md, "What the node reports"), in the order an
#: update goes through them: fetching (with ``pct``), all fetched and about to be checked and
#: installed at the next boot, running on trial, proven; or the release refused or rolled back.
OTA_STATES = ("downloading", "verifying", "trial", "ok", "refused", "rolled_back")
MAX_OTA_VERSION = 40
MAX_OTA_WHY = 120

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
class OtaReport:
    """A node's over-the-air update state, from its birth message (``ota``)."""

    st: str
    ver: str
    why: str = ""
    #: Download progress in percent (``downloading`` only); None when the node did not say.
    pct: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, as the node, the envelope and the Kafka value carry it."""
        out: dict[str, Any] = {"st": self.st, "ver": self.ver}
        if self.why:
            out["why"] = self.why
        if self.pct is not None:
            out["pct"] = self.pct
        return out


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
    #: Its over-the-air update state, when it has one to tell.
    ota: OtaReport | None = None


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
    ota: OtaReport | None = None

    @classmethod
    def from_status(cls, status: Status, site: str, received_ms: int = 0) -> "StatusEvent":
        """The event for ``status`` seen on ``site``'s topic."""
        return cls(site, status.device, status.state, status.boot, status.fw, status.reset, received_ms, status.dropped,
                   status.down, status.ota)


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


#: Why a gateway held a device's readings back (docs/gateway.md, "One node cannot starve the
#: site"): over its share of the outbox, over ``device_share_cap``, above ``device_rate_limit``.
HOLD_REASONS = ("share", "cap", "rate")


@dataclass(frozen=True, slots=True)
class HoldEvent:
    """Gateway to cloud: the gateway held back ``count`` readings of one (device, boot) for
    ``reason`` (the ``holds/1`` envelope extension). **Not a loss**: held-back readings were
    neither committed nor acknowledged to the node, which keeps them and sends them again.

    ``first_seq`` is the first seq held in what this event covers, ``held_since_ms`` when the hold
    it covers started, ``updated_ms`` when the event last changed, and ``lifted`` whether the
    hold had been lifted by then (the device is committed again). ``count`` is the readings held
    back between the event before it and this one (summed over a device's events, the total; a
    node's re-send held again counts again); 0 only in an event that just says the hold lifted.
    """

    site: str
    device: str
    boot: str
    reason: str
    first_seq: int
    count: int
    held_since_ms: int
    updated_ms: int
    lifted: bool = False


@dataclass(frozen=True, slots=True)
class GatewayDeadLetter:
    """Gateway to cloud: a node payload the gateway refused (it broke the contract), as the
    ``deadletters/1`` envelope extension carries it (docs/contracts.md).

    ``topic`` and ``payload`` may be cut (a topic from the network can be 65,000 characters, a
    payload megabytes): ``topic_len`` is the whole topic's length in characters, ``size`` the
    whole payload's in bytes and ``sha256`` its hex digest ("" when the gateway no longer holds
    the whole payload: a letter stored before this extension existed, over 64 KiB). ``id`` is
    the letter's number in the gateway's outbox: with the gateway it names it for de-duplication.
    """

    id: int
    topic: str
    topic_len: int
    reason: str
    payload: bytes
    size: int
    sha256: str
    received_ms: int

    @property
    def payload_cut(self) -> bool:
        """True if ``payload`` is only the start of what the node sent."""
        return self.size > len(self.payload)

    @property
    def topic_cut(self) -> bool:
        """True if ``topic`` is only the start of the topic it came on."""
        return self.topic_len > len(self.topic)


@dataclass(frozen=True, slots=True)
class Batch:
    """Gateway to bridge: readings and node status events from one gateway, each in outbox order,
    drop events (the ``drops/1`` envelope extension), command outcomes (``outcomes/1``),
    dead letters (``deadletters/1``) and hold events (``holds/1``)."""

    gateway: str
    bseq: int
    sent_ms: int
    readings: tuple[Reading, ...] = field(default_factory=tuple)
    statuses: tuple[StatusEvent, ...] = field(default_factory=tuple)
    drops: tuple[DropEvent, ...] = field(default_factory=tuple)
    #: What became of commands sent to this gateway's nodes, in the order it recorded them.
    outcomes: tuple[Outcome, ...] = field(default_factory=tuple)
    #: Node payloads the gateway refused (the ``deadletters/1`` extension), oldest first.
    deadletters: tuple[GatewayDeadLetter, ...] = field(default_factory=tuple)
    #: Devices held back (the ``holds/1`` extension): not losses, the nodes keep the readings.
    holds: tuple[HoldEvent, ...] = field(default_factory=tuple)


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
    #: (name, value) pairs: a tuple, but a list in the reading records the bridge writes
    #: (``kafka_wire.ReadingRecords``), as the Kafka client takes them.
    headers: Sequence[tuple[str, bytes]]


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


def _new_kafka_record(topic: str, key: bytes, value: bytes, headers: Sequence[tuple[str, bytes]]) -> KafkaRecord:
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


_HEX_DIGITS = frozenset("0123456789abcdef")


def _boot(obj: Mapping[str, Any], what: str) -> str:
    boot = _text(obj, "boot", what)
    if not 4 <= len(boot) <= 32 or not _HEX_DIGITS.issuperset(boot):
        raise CodecError(f"{what}: 'boot' must be 4-32 lowercase hex digits, got {boot!r}")
    return boot


def _check_version(obj: Mapping[str, Any], what: str) -> None:
    if obj.get("v") != WIRE_VERSION:
        raise CodecError(f"{what}: unsupported version v={obj.get('v')!r}, this codec speaks v={WIRE_VERSION}")


def _plain_values(values: Any) -> bool:
    """True if ``values`` (a reading's ``r``) certainly passes :func:`_values`; False if it may
    not (then ``_values`` says why). The decoders' fast paths: type tests only, no messages."""
    if type(values) is not dict or not 0 < len(values) <= MAX_READINGS_PER_MESSAGE:
        return False
    for name, value in values.items():
        kind = type(value)
        if not 1 <= len(name) <= MAX_NAME_LEN:
            return False
        if kind is float:
            if value - value != 0.0:  # NaN or an infinity
                return False
        elif kind is str:
            if len(value) > MAX_TEXT_LEN:
                return False
        elif kind is not int and kind is not bool:
            return False
    return True


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
