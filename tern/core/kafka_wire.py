"""Kafka records (bridge -> Kafka): one record per reading, status event, drop event, hold event
and command outcome, keyed by device, with the JSON values docs/contracts.md describes; and one per
gateway dead letter (raw payload, keyed by source topic, described by its headers).
"""

from __future__ import annotations

import re
from typing import Any, Iterator, Sequence

from tern.core.commands import Outcome, encode_outcome
from tern.core.envelope import decode_batch_with
from tern.core.errors import CodecError
from tern.core.jsonwire import dumps_finite as _dumps_finite
from tern.core.jsonwire import json_object as _json_object
from tern.core.messages import (
    DROP_REASONS,
    HOLD_REASONS,
    MAX_NODE_PAYLOAD,
    Batch,
    DropEvent,
    GatewayDeadLetter,
    HoldEvent,
    KafkaRecord,
    Reading,
    StatusEvent,
    Value,
    _boot,
    _int,
    _new_kafka_record,
    _text,
    _values,
)
from tern.core.node_wire import _down, _dropped, _ota, _state
from tern.core.topics import check_id

def _schema_object(raw: bytes, limit: int, what: str, schema_id: str) -> dict[str, Any]:
    """``raw`` as a JSON object of at most ``limit`` bytes whose ``schema`` is ``schema_id``."""
    obj = _json_object(raw, limit, what)
    if obj.get("schema") != schema_id:
        raise CodecError(f"{what}: unknown schema {obj.get('schema')!r}")
    return obj


KAFKA_SCHEMA_ID = "tern.reading/1"


#: Text that needs no escaping inside a JSON string: what ids and boots are made of.
_PLAIN = re.compile(r"[A-Za-z0-9_.-]*")


#: What the records of a (site, device, boot) share: the key, the device and boot headers.
_Parts = tuple[bytes, tuple[str, bytes], tuple[str, bytes]]
#: One reading's record, compact: (its shared parts, value, seq as text). One tuple of bytes and
#: tuples, which the garbage collector stops tracking once it has seen it.
_Row = tuple[_Parts, bytes, bytes]
#: What is built once for a (site, device, boot): the value up to ``seq``, and the shared parts;
#: None for ids that need escaping in JSON.
_Known = tuple[bytes, _Parts] | None


class ReadingRecords(Sequence[KafkaRecord]):
    """The Kafka records of one gateway's readings bridged at one moment (``bridged_ms``) onto
    ``topic``, in order: key = device id, so a device stays in order.

    Built for the bridge's backlog, where a batch holds hundreds of readings of a few devices:

    - what is the same for the readings of a (site, device, boot) is built once, and each record
      adds its numbers and its values (the only part that goes through the JSON encoder). The
      bytes are those of the dict form the general path writes (tests hold them equal), in a
      third of the time; ids that would need escaping (never, once the codec checked them) take
      that general path;
    - a record is kept as a row of bytes and tuples, which the garbage collector soon stops
      looking at, and a :class:`KafkaRecord` is made only as it is read (by the Kafka sink, which
      appends it to its record batch and drops it). A bridge keeps up to 20,000 records in
      flight until Kafka acknowledges them: as objects, the collector's passes over them took a
      fifth of its time.
    """

    __slots__ = ("gateway", "topic", "bridged_ms", "_gateway_header", "_tail", "_plain", "_known", "_rows")

    def __init__(self, gateway: str, topic: str, bridged_ms: int) -> None:
        self.gateway, self.topic, self.bridged_ms = gateway, topic, bridged_ms
        self._gateway_header = ("gateway", gateway.encode())
        self._tail = b',"bridge_ms":%d,"readings":' % bridged_ms if type(bridged_ms) is int else b""
        self._plain = type(bridged_ms) is int and _PLAIN.fullmatch(gateway) is not None
        # Shared by all batches (a gateway's ids are the same from one to the next); a
        # bridged_ms that is not an int takes the general path: a memo of its own.
        self._known = _KNOWN if self._plain else {}
        self._rows: list[_Row] = []

    def row(self, device: str, boot: str, seq: int, ts_ms: int, values: dict[str, Value], site: str,
            received_ms: int) -> _Row:
        """One reading's row, from its fields as the envelope's decoder checked them (ints, and
        a dict of values), in the order of :func:`tern.core.messages.new_reading`.

        Appended by :meth:`add`, or by :func:`decode_batch_records` a batch at a time.
        """
        try:
            known = self._known[(self.gateway, site, device, boot)]
        except KeyError:
            known = self._learn(site, device, boot)
        if known is None:
            return self._general(device, boot, seq, ts_ms, values, site, received_ms)
        start, parts = known
        seq_text = b"%d" % seq
        value = b'%b%b,"ts_ms":%d,"gateway_rx_ms":%d%b%b}' % (
            start, seq_text, ts_ms, received_ms, self._tail, _dumps_finite(values))
        return parts, value, seq_text

    def add(self, reading: Reading) -> None:
        """Append ``reading``'s record."""
        values = reading.values if type(reading.values) is dict else dict(reading.values)  # orjson takes only a dict
        fields = (reading.device, reading.boot, reading.seq, reading.ts_ms, values, reading.site, reading.received_ms)
        if type(reading.seq) is int and type(reading.ts_ms) is int and type(reading.received_ms) is int:
            self._rows.append(self.row(*fields))
        else:  # as the dict form writes them (a bool, say): the decoder never lets one through
            self._rows.append(self._general(*fields))

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> KafkaRecord:  # type: ignore[override]  (no slices)
        (key, device_header, boot_header), value, seq_text = self._rows[index]
        return _new_kafka_record(self.topic, key, value, [device_header, self._gateway_header, boot_header,
                                                          ("seq", seq_text)])

    def __iter__(self) -> Iterator[KafkaRecord]:
        topic, gateway_header = self.topic, self._gateway_header
        for (key, device_header, boot_header), value, seq_text in self._rows:
            # The headers as a list, as the Kafka client takes them.
            yield _new_kafka_record(topic, key, value, [device_header, gateway_header, boot_header, ("seq", seq_text)])

    def entries(self) -> Iterator[tuple[str, bytes, bytes, list[tuple[str, bytes]]]]:
        """Each record's ``(topic, key, value, headers)``, as iteration gives them but without
        a KafkaRecord each: what the Kafka sink reads (cloud/kafka_sink.py)."""
        topic, gateway_header = self.topic, self._gateway_header
        return ((topic, key, value, [device_header, gateway_header, boot_header, ("seq", seq_text)])
                for (key, device_header, boot_header), value, seq_text in self._rows)

    def _learn(self, site: str, device: str, boot: str) -> _Known:
        known = None
        if self._plain and _PLAIN.fullmatch(f"{site}{device}{boot}"):
            start = (f'{{"schema":"{KAFKA_SCHEMA_ID}","site":"{site}","device":"{device}",'
                     f'"gateway":"{self.gateway}","boot":"{boot}","seq":').encode()
            key = device.encode()
            known = (start, (key, ("device", key), ("boot", boot.encode())))
        if len(self._known) >= MAX_KNOWN:  # bounded, whatever the fleet
            self._known.clear()
        self._known[(self.gateway, site, device, boot)] = known
        return known

    def _general(self, device: str, boot: str, seq: int, ts_ms: int, values: dict[str, Value], site: str,
                 received_ms: int) -> _Row:
        value = _dumps_finite({
            "schema": KAFKA_SCHEMA_ID,
            "site": site,
            "device": device,
            "gateway": self.gateway,
            "boot": boot,
            "seq": seq,
            "ts_ms": ts_ms,
            "gateway_rx_ms": received_ms,
            "bridge_ms": self.bridged_ms,
            "readings": values,
        })
        key = device.encode()
        return (key, ("device", key), ("boot", boot.encode())), value, str(seq).encode()


#: What :class:`ReadingRecords` built once for a (gateway, site, device, boot): it depends on the
#: four ids alone, so the memo holds across batches (and threads). Bounded (~0.5 KB an entry): at
#: the limit it starts afresh.
_KNOWN: dict[tuple[str, str, str, str], _Known] = {}
MAX_KNOWN = 8192


def kafka_record(reading: Reading, gateway: str, topic: str, bridged_ms: int) -> KafkaRecord:
    """Map one reading to its Kafka record: key = device id, so a device stays in order.

    The bridge makes them a batch at a time (:func:`decode_batch_records`); this is one.
    """
    records = ReadingRecords(gateway, topic, bridged_ms)
    records.add(reading)
    record = records[0]
    # Headers as a tuple, like every record but the bridge's own reading records (a list each).
    return _new_kafka_record(record.topic, record.key, record.value, tuple(record.headers))


def decode_batch_records(raw: bytes, *, topic_gateway: str, topic: str,
                         bridged_ms: int) -> tuple[Batch, ReadingRecords]:
    """A batch envelope from ``topic_gateway``'s topic, decoded for the bridge: the batch without
    its readings (``readings`` empty), and the Kafka records of its readings on ``topic``, in order.

    The same checks and verdicts as :func:`tern.core.envelope.decode_batch` (it shares them), the
    same records as :func:`kafka_record` of each reading, but no Reading object on the way.
    """
    records = ReadingRecords(topic_gateway, topic, bridged_ms)
    batch, records._rows = decode_batch_with(raw, records.row, topic_gateway=topic_gateway)
    return batch, records


def decode_kafka_value(raw: bytes) -> dict[str, Any]:
    """Decode and check a Kafka reading value (for consumers and tests)."""
    what = "kafka value"
    obj = _schema_object(raw, MAX_NODE_PAYLOAD * 2, what, KAFKA_SCHEMA_ID)
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
    not say, as in a last will), so consumers need no "missing key" case; ``dropped`` and
    ``ota`` only when the node told of them.
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
    if event.ota is not None:  # only while the node has an update to tell of, likewise
        value["ota"] = event.ota.to_dict()
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
    obj = _schema_object(raw, MAX_NODE_PAYLOAD, what, KAFKA_STATUS_SCHEMA_ID)
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
    _ota(obj, what)
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
    obj = _schema_object(raw, MAX_NODE_PAYLOAD, what, KAFKA_DROP_SCHEMA_ID)
    for key in ("first_seq", "last_seq", "dropped_ms", "bridge_ms"):
        _int(obj, key, what)
    _int(obj, "count", what, minimum=1)
    for key in ("site", "device", "gateway"):
        check_id(_text(obj, key, what), key)
    _boot(obj, what)
    if obj.get("reason") not in DROP_REASONS:
        raise CodecError(f"{what}: 'reason' must be one of {DROP_REASONS}, got {obj.get('reason')!r}")
    return obj


KAFKA_HOLD_SCHEMA_ID = "tern.hold/1"


def kafka_hold_record(hold: HoldEvent, gateway: str, topic: str, bridged_ms: int) -> KafkaRecord:
    """Map one hold event to its Kafka record (on the status topic, like drops): key = device id,
    so it sits in order with the device's statuses and drops. A hold is not a loss: the value
    says how many readings the gateway refused to commit, which the node keeps and re-sends."""
    value = {
        "schema": KAFKA_HOLD_SCHEMA_ID,
        "site": hold.site,
        "device": hold.device,
        "gateway": gateway,
        "boot": hold.boot,
        "reason": hold.reason,
        "first_seq": hold.first_seq,
        "count": hold.count,
        "held_since_ms": hold.held_since_ms,
        "updated_ms": hold.updated_ms,
        "lifted": bool(hold.lifted),
        "bridge_ms": bridged_ms,
    }
    headers = (
        ("device", hold.device.encode()),
        ("gateway", gateway.encode()),
        ("boot", hold.boot.encode()),
        ("reason", hold.reason.encode()),
    )
    return KafkaRecord(topic=topic, key=hold.device.encode(), value=_dumps_finite(value), headers=headers)


def decode_kafka_hold_value(raw: bytes) -> dict[str, Any]:
    """Decode and check a Kafka hold value (for consumers and tests)."""
    what = "kafka hold value"
    obj = _schema_object(raw, MAX_NODE_PAYLOAD, what, KAFKA_HOLD_SCHEMA_ID)
    for key in ("first_seq", "count", "held_since_ms", "updated_ms", "bridge_ms"):
        _int(obj, key, what)
    for key in ("site", "device", "gateway"):
        check_id(_text(obj, key, what), key)
    _boot(obj, what)
    if obj.get("reason") not in HOLD_REASONS:
        raise CodecError(f"{what}: 'reason' must be one of {HOLD_REASONS}, got {obj.get('reason')!r}")
    if not isinstance(obj.get("lifted"), bool):
        raise CodecError(f"{what}: 'lifted' must be true or false")
    return obj


KAFKA_OTA_SCHEMA_ID = "tern.ota/1"
#: A node's part in a fleet rollout (``tern-bridge ota rollout``, docs/ota.md): on the release
#: already at the start; the ota_update command sent; its update under way (the node's own
#: report); healthy on the release; failed (why in ``detail``); not sent because the rollout
#: halted; or left out (offline when the rollout began).
OTA_ROLLOUT_STATES = ("already", "sent", "downloading", "verifying", "trial", "healthy", "failed", "held", "skipped")
#: Longest ``detail`` of a rollout record.
MAX_OTA_DETAIL = 200


def kafka_ota_record(topic: str, rollout: str, release: str, device: str, wave: int, state: str,
                     detail: str = "", command: str = "", ms: int = 0) -> KafkaRecord:
    """A node's step in a fleet rollout, as a record on the status topic: key = device id, so it
    sits in order with the device's statuses. ``wave`` 0 is the canary group."""
    if state not in OTA_ROLLOUT_STATES:
        raise CodecError(f"rollout state must be one of {OTA_ROLLOUT_STATES}, got {state!r}")
    value = {
        "schema": KAFKA_OTA_SCHEMA_ID,
        "rollout": rollout,
        "release": release,
        "device": device,
        "wave": wave,
        "state": state,
        "detail": detail[:MAX_OTA_DETAIL],
        "command": command,
        "ms": ms,
    }
    headers = (("device", device.encode()), ("rollout", rollout.encode()), ("state", state.encode()))
    return KafkaRecord(topic=topic, key=device.encode(), value=_dumps_finite(value), headers=headers)


def decode_kafka_ota_value(raw: bytes) -> dict[str, Any]:
    """Decode and check a Kafka rollout value (for consumers and tests)."""
    what = "kafka ota value"
    obj = _schema_object(raw, MAX_NODE_PAYLOAD, what, KAFKA_OTA_SCHEMA_ID)
    for key in ("wave", "ms"):
        _int(obj, key, what)
    for key in ("rollout", "device"):
        check_id(_text(obj, key, what), key)
    _text(obj, "release", what)
    _text(obj, "command", what)
    if obj.get("state") not in OTA_ROLLOUT_STATES:
        raise CodecError(f"{what}: 'state' must be one of {OTA_ROLLOUT_STATES}, got {obj.get('state')!r:.40}")
    detail = obj.get("detail")
    if not isinstance(detail, str) or len(detail) > MAX_OTA_DETAIL:
        raise CodecError(f"{what}: 'detail' must be a string of at most {MAX_OTA_DETAIL} characters")
    return obj


def kafka_deadletter_record(letter: GatewayDeadLetter, gateway: str, topic: str, bridge: str) -> KafkaRecord:
    """Map one gateway dead letter (``deadletters/1``) to its record on the dead-letter topic.

    Like the bridge's own dead letters: the (cut) raw payload as the value, keyed by source topic
    so one node's junk stays in order in one partition, and headers saying where it came from
    and why; unlike them, the size, SHA-256 and cut flags are always present (a gateway's letter
    is cut at 2 KiB, which is most of the point of looking at them).
    """
    headers = (
        ("gateway", gateway.encode()),
        ("source_topic", letter.topic.encode(errors="replace")),
        ("source_topic_chars", str(letter.topic_len).encode()),
        ("error", letter.reason.encode(errors="replace")),
        ("received_ms", str(letter.received_ms).encode()),
        ("original_bytes", str(letter.size).encode()),
        ("original_sha256", letter.sha256.encode()),
        ("truncated", b"1" if letter.payload_cut else b"0"),
        ("topic_truncated", b"1" if letter.topic_cut else b"0"),
        ("deadletter_id", str(letter.id).encode()),
        ("bridge", bridge.encode()),
    )
    return KafkaRecord(topic=topic, key=letter.topic.encode(errors="replace"), value=letter.payload, headers=headers)
