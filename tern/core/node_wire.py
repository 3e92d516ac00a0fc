"""Node payloads (node -> gateway): readings, bundles, the retained status, and the gateway's
ack back to the node. Decoders never trust their input: anything off-contract raises
:class:`CodecError` with a message fit for a dead-letter entry.
"""

from __future__ import annotations

from typing import Any, Mapping

import orjson

from tern.core.errors import CodecError
from tern.core.jsonwire import dumps as _dumps
from tern.core.jsonwire import json_object as _json_object
from tern.core.messages import (
    _HEX_DIGITS,
    _LABEL_CHARS,
    BUNDLE_VERSION,
    MAX_BUNDLE,
    MAX_DOWN,
    MAX_DOWN_LABEL,
    MAX_DROPPED_BOOTS,
    MAX_NODE_PAYLOAD,
    MAX_OTA_VERSION,
    MAX_OTA_WHY,
    MAX_SAFE_INT,
    OTA_STATES,
    STATES,
    WIRE_VERSION,
    NodeAck,
    OtaReport,
    Reading,
    Status,
    _boot,
    _check_version,
    _int,
    _object_list,
    _plain_values,
    _text,
    _values,
    new_reading,
)
from tern.core.topics import check_id

_loads = orjson.loads


def _node_message(raw: bytes, what: str, topic_device: str | None) -> tuple[dict[str, Any], str]:
    """Parse a node's JSON message and its device id, which must be the topic's device:
    per-device topics are what the broker's ACLs protect."""
    obj = _json_object(raw, MAX_NODE_PAYLOAD, what)
    return obj, _node_device(obj, what, topic_device)


def _node_device(obj: dict[str, Any], what: str, topic_device: str | None) -> str:
    """The device id of a parsed node message (v1), checked against the topic's."""
    _check_version(obj, what)
    device = obj.get("dev")
    if topic_device is not None and device == topic_device:
        return topic_device  # the topic's id, already checked
    device = check_id(_text(obj, "dev", what), "device")
    if topic_device is not None and device != topic_device:
        raise CodecError(f"{what}: device {device!r} published on the topic of {topic_device!r}")
    return device


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
    return _reading(_json_object(raw, MAX_NODE_PAYLOAD, "node payload"), site, topic_device)


def _reading(obj: dict[str, Any], site: str, topic_device: str | None) -> Reading:
    """The reading of a parsed v1 telemetry payload."""
    device, boot, seq, ts, values = obj.get("dev"), obj.get("boot"), obj.get("seq"), obj.get("ts"), obj.get("r")
    # Ingest's hot path: a plainly valid reading from the device its topic names passes on type
    # and range tests alone (the same verdicts as the checks below, which run on anything
    # else and name what is wrong), and is built without the frozen dataclass's __init__.
    if (topic_device is not None and device == topic_device and obj.get("v") == WIRE_VERSION
            and type(boot) is str and 4 <= len(boot) <= 32 and _HEX_DIGITS.issuperset(boot)
            and type(seq) is int and 0 <= seq <= MAX_SAFE_INT
            and type(ts) is int and 0 <= ts <= MAX_SAFE_INT
            and _plain_values(values)):
        return new_reading(device, boot, seq, ts, values, site, 0)
    what = "node payload"
    device = _node_device(obj, what, topic_device)
    return new_reading(device, _boot(obj, what), _int(obj, "seq", what), _int(obj, "ts", what),
                       _values(obj, what), site, 0)


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
    # orjson straight away (what _json_object tries first, one call less per reading on
    # ingest's hot path); anything it refuses, or that is not an object, _json_object explains.
    try:
        obj = _loads(raw) if len(raw) <= MAX_NODE_PAYLOAD else None
    except ValueError:
        obj = None
    if type(obj) is not dict:
        obj = _json_object(raw, MAX_NODE_PAYLOAD, what)
    if obj.get("v") != BUNDLE_VERSION:
        return (_reading(obj, site, topic_device),)  # parsed once: this is ingest's hot path
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


def _ota(obj: Mapping[str, Any], what: str) -> OtaReport | None:
    """The optional ``ota`` object of a status (docs/ota.md): None when absent."""
    raw = obj.get("ota")
    if raw is None:
        return None
    where = f"{what} ota"
    if not isinstance(raw, dict):
        raise CodecError(f"{where}: must be an object")
    st = raw.get("st")
    if st not in OTA_STATES:
        raise CodecError(f"{where}: 'st' must be one of {OTA_STATES}, got {st!r:.40}")
    ver, why = raw.get("ver"), raw.get("why", "")
    if not isinstance(ver, str) or not 1 <= len(ver) <= MAX_OTA_VERSION:
        raise CodecError(f"{where}: 'ver' must be a string of 1-{MAX_OTA_VERSION} characters")
    if not isinstance(why, str) or len(why) > MAX_OTA_WHY:
        raise CodecError(f"{where}: 'why' must be a string of at most {MAX_OTA_WHY} characters")
    pct = raw.get("pct")
    if pct is not None and (type(pct) is not int or not 0 <= pct <= 100):
        raise CodecError(f"{where}: 'pct' must be an integer 0-100, got {pct!r:.40}")
    return OtaReport(st, ver, why, pct)


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
    if status.ota is not None:
        obj["ota"] = status.ota.to_dict()
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
        ota=_ota(obj, what),
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
