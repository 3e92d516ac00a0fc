"""The batch envelope (gateway -> bridge) and its confirm (bridge -> gateway): readings,
status events and the envelope's extensions, compressed. Decoders never trust their input.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import zlib
from dataclasses import replace
from typing import Any, Callable, Mapping, Sequence, TypeVar

from tern.core.commands import MAX_REPLY_BYTES, OUTCOMES, Outcome
from tern.core.errors import CodecError
from tern.core.jsonwire import dumps as _dumps
from tern.core.jsonwire import dumps_finite as _dumps_finite
from tern.core.jsonwire import json_object as _json_object
from tern.core.messages import (
    DROP_REASONS,
    HOLD_REASONS,
    MAX_BATCH_BYTES,
    MAX_BATCH_INFLATED,
    MAX_NODE_PAYLOAD,
    MAX_SAFE_INT,
    WIRE_VERSION,
    Batch,
    Confirm,
    DropEvent,
    GatewayDeadLetter,
    HoldEvent,
    Reading,
    StatusEvent,
    _boot,
    _check_version,
    _int,
    _object_list,
    _plain_values,
    _text,
    _values,
    new_reading,
)
from tern.core.node_wire import _down, _dropped, _ota, _state
from tern.core.topics import check_id

T = TypeVar("T")


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


def reading_item_json(site: str, device: str, boot: str, seq: int, ts_ms: int, received_ms: int,
                      values_json: str) -> str:
    """A reading's envelope item as JSON text, from its fields and its values already encoded
    (``values_json``: compact JSON of the values object, as the gateway's outbox stores them).

    The same bytes as :func:`encode_batch` writes for the reading (tests hold them equal): a
    backlog goes out without parsing and re-encoding every stored value. Ids and boots that
    would need escaping (never, once the codec checked them) take the general path.
    """
    if (type(seq) is int and type(ts_ms) is int and type(received_ms) is int
            and _PLAIN.fullmatch(f"{site}{device}{boot}")):
        return (f'{{"site":"{site}","dev":"{device}","boot":"{boot}","seq":{seq},"ts":{ts_ms},"rx":{received_ms},'
                f'"r":{values_json}}}')
    item = {"site": site, "dev": device, "boot": boot, "seq": seq, "ts": ts_ms, "rx": received_ms, "r": None}
    head = _dumps_finite(item).decode()
    return head[: -len("null}")] + values_json + "}"


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
    if event.ota is not None:  # only while the node has an update to tell of: as for "down"
        item["ota"] = event.ota.to_dict()
    item["rx"] = event.received_ms
    return item


#: Envelope extensions this codec speaks. An envelope lists those it uses in ``ext``; a
#: decoder refuses an envelope naming one it does not know rather than silently dropping
#: what it carries.
DROPS_EXTENSION = "drops/1"
OUTCOMES_EXTENSION = "outcomes/1"
DEADLETTERS_EXTENSION = "deadletters/1"
HOLDS_EXTENSION = "holds/1"
EXTENSIONS = (DROPS_EXTENSION, OUTCOMES_EXTENSION, DEADLETTERS_EXTENSION, HOLDS_EXTENSION)
#: Drop events per envelope at most (they are coalesced per device, boot and reason).
MAX_DROPS_PER_BATCH = 1000
#: Hold events per envelope at most (coalesced per device, boot and reason while no batch has
#: taken them, like drop events): the rest wait for the next batches.
MAX_HOLDS_PER_BATCH = 1000
#: Command outcomes per envelope at most (a node reply is at most ~1 KB).
MAX_OUTCOMES_PER_BATCH = 100
#: Longest outcome detail carried (a rejection's reason, a node's error).
MAX_OUTCOME_DETAIL = 200
#: Dead letters per envelope at most: a node spewing junk must not crowd readings out of the
#: uplink; the rest wait for the next batches.
MAX_DEADLETTERS_PER_BATCH = 50
#: Bytes of a dead letter's payload carried (the start of it; its size and SHA-256 say the rest):
#: enough to see what a node sent, small enough that 50 of them fit any envelope.
MAX_DEADLETTER_PAYLOAD = 2048
#: Characters of a dead letter's topic carried: a topic from the network can be 65,000.
MAX_DEADLETTER_TOPIC = 256
#: Characters of a dead letter's reason carried (the gateway's own are at most ~1000).
MAX_DEADLETTER_REASON = 1000
#: zlib level of a batch envelope. The uplink is often the Pi's cellular link, where bytes cost
#: money and bound a backlog's drain, so cheap levels are no bargain: on noisy sensor readings
#: level 1 wrote about a third more bytes than 6. Level 5 wrote a few percent more than 6 for
#: about two thirds of its CPU time (6 searches four times as many matches for little more):
#: see docs/contracts.md. Any level decodes the same.
ZLIB_LEVEL = 5
_HEX = frozenset("0123456789abcdef")
#: Text that needs no escaping inside a JSON string: what ids and boots are made of.
_PLAIN = re.compile(r"[A-Za-z0-9_.-]*")


def gateway_dead_letter(id: int, topic: str, reason: str, payload: bytes, received_ms: int, *,
                        size: int | None = None, topic_len: int | None = None,
                        sha256: str | None = None) -> GatewayDeadLetter:
    """A dead letter cut to the extension's limits. ``payload``/``topic`` may already be cut:
    then ``size``/``topic_len`` give the whole's length (and ``sha256`` its digest, "" if unknown);
    by default they are those of what is passed, and the digest is computed from it."""
    whole = size is None or size == len(payload)
    digest = sha256 if sha256 else (hashlib.sha256(payload).hexdigest() if whole else "")
    return GatewayDeadLetter(
        id=id,
        topic=topic[:MAX_DEADLETTER_TOPIC],
        topic_len=len(topic) if topic_len is None else topic_len,
        reason=reason[:MAX_DEADLETTER_REASON],
        payload=bytes(payload[:MAX_DEADLETTER_PAYLOAD]),
        size=len(payload) if size is None else size,
        sha256=digest,
        received_ms=received_ms,
    )


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


def _hold_item(hold: HoldEvent) -> dict[str, Any]:
    if hold.reason not in HOLD_REASONS:  # the encoder never emits what its decoder refuses
        raise CodecError(f"unknown hold reason {hold.reason!r}")
    return {
        "site": hold.site,
        "dev": hold.device,
        "boot": hold.boot,
        "reason": hold.reason,
        "first": hold.first_seq,
        "n": hold.count,
        "since": hold.held_since_ms,
        "at": hold.updated_ms,
        "lifted": bool(hold.lifted),
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


def _deadletter_item(letter: GatewayDeadLetter) -> dict[str, Any]:
    # Cut here as well (the encoder never emits what its decoder refuses); the lengths stay those
    # of the whole, so a cut is always visible.
    payload = letter.payload[:MAX_DEADLETTER_PAYLOAD]
    return {
        "id": letter.id,
        "topic": letter.topic[:MAX_DEADLETTER_TOPIC],
        "topic_len": max(letter.topic_len, len(letter.topic)),
        "reason": letter.reason[:MAX_DEADLETTER_REASON],
        # base64: a dead letter is whatever bytes a node sent, JSON strings cannot hold them.
        "payload": base64.b64encode(payload).decode(),
        "size": max(letter.size, len(letter.payload)),
        "sha256": letter.sha256,
        "at": letter.received_ms,
    }


def encode_batch(batch: Batch, items: Sequence[str] = ()) -> bytes:
    """Encode a batch envelope: zlib-compressed compact JSON.

    ``items``: readings already encoded by :func:`reading_item_json`; those of
    ``batch.readings``, which go first (the gateway's backlog path passes only these).
    """
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
    if batch.deadletters:
        if len(batch.deadletters) > MAX_DEADLETTERS_PER_BATCH:
            raise CodecError(
                f"{len(batch.deadletters)} dead letters, over the limit of {MAX_DEADLETTERS_PER_BATCH} per batch")
        doc.setdefault("ext", []).append(DEADLETTERS_EXTENSION)
        doc["deadletters"] = [_deadletter_item(d) for d in batch.deadletters]
    if batch.holds:
        if len(batch.holds) > MAX_HOLDS_PER_BATCH:
            raise CodecError(f"{len(batch.holds)} hold events, over the limit of {MAX_HOLDS_PER_BATCH} per batch")
        doc.setdefault("ext", []).append(HOLDS_EXTENSION)
        doc["holds"] = [_hold_item(h) for h in batch.holds]
    # Every float in a batch is a reading value the codec checked (finite) on the way in.
    if items:
        doc["items"] = []
    text = _dumps_finite(doc)
    if items:
        # Spliced in: the keys before "items" are numbers and a checked gateway id, so the first
        # '"items":[' is the key itself.
        head, sep, tail = text.partition(b'"items":[')
        ahead = [_dumps_finite(_reading_item(r)) for r in batch.readings]
        # The items joined as text and encoded once, not one bytes object per item.
        text = head + sep + b",".join([*ahead, ",".join(items).encode()]) + tail
    data = zlib.compress(text, ZLIB_LEVEL)
    if len(data) > MAX_BATCH_BYTES:
        raise CodecError(
            f"batch of {len(batch.readings) + len(items)} readings and {len(batch.statuses)} status events"
            f" compresses to {len(data)} bytes, over {MAX_BATCH_BYTES}"
        )
    return data


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
            ota=_ota(item, where),
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


def _decode_holds(obj: Mapping[str, Any], what: str, ext: tuple[str, ...]) -> tuple[HoldEvent, ...]:
    """The envelope's ``holds`` list; only with the ``holds/1`` extension named in ``ext``."""
    if "holds" not in obj:
        return ()
    if HOLDS_EXTENSION not in ext:
        raise CodecError(f"{what}: 'holds' present without {HOLDS_EXTENSION!r} in 'ext'")
    holds = []
    for where, item in _object_list(obj, "holds", what, "hold"):
        if len(holds) >= MAX_HOLDS_PER_BATCH:
            raise CodecError(f"{what}: over {MAX_HOLDS_PER_BATCH} hold events")
        reason = item.get("reason")
        if reason not in HOLD_REASONS:
            raise CodecError(f"{where}: 'reason' must be one of {HOLD_REASONS}, got {reason!r:.40}")
        lifted = item.get("lifted")
        if not isinstance(lifted, bool):
            raise CodecError(f"{where}: 'lifted' must be true or false")
        count = _int(item, "n", where)
        if count == 0 and not lifted:  # an event with nothing held says only that the hold lifted
            raise CodecError(f"{where}: 'n' must be at least 1 unless the hold lifted")
        since, at = _int(item, "since", where), _int(item, "at", where)
        if at < since:
            raise CodecError(f"{where}: 'at' ({at}) is before 'since' ({since})")
        holds.append(
            HoldEvent(
                site=check_id(_text(item, "site", where), "site"),
                device=check_id(_text(item, "dev", where), "device"),
                boot=_boot(item, where),
                reason=reason,
                first_seq=_int(item, "first", where),
                count=count,
                held_since_ms=since,
                updated_ms=at,
                lifted=lifted,
            )
        )
    return tuple(holds)


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


def _decode_deadletters(obj: Mapping[str, Any], what: str, ext: tuple[str, ...]) -> tuple[GatewayDeadLetter, ...]:
    """The envelope's ``deadletters`` list; only with the ``deadletters/1`` extension named in ``ext``."""
    if "deadletters" not in obj:
        return ()
    if DEADLETTERS_EXTENSION not in ext:
        raise CodecError(f"{what}: 'deadletters' present without {DEADLETTERS_EXTENSION!r} in 'ext'")
    out = []
    for where, item in _object_list(obj, "deadletters", what, "dead letter"):
        if len(out) >= MAX_DEADLETTERS_PER_BATCH:
            raise CodecError(f"{what}: over {MAX_DEADLETTERS_PER_BATCH} dead letters")
        topic, reason, encoded = item.get("topic"), item.get("reason"), item.get("payload")
        if not isinstance(topic, str) or len(topic) > MAX_DEADLETTER_TOPIC:
            raise CodecError(f"{where}: 'topic' must be a string of at most {MAX_DEADLETTER_TOPIC} characters")
        if not isinstance(reason, str) or len(reason) > MAX_DEADLETTER_REASON:
            raise CodecError(f"{where}: 'reason' must be a string of at most {MAX_DEADLETTER_REASON} characters")
        # Checked before decoding: base64 of MAX_DEADLETTER_PAYLOAD bytes is at most this long.
        if not isinstance(encoded, str) or len(encoded) > (MAX_DEADLETTER_PAYLOAD + 2) // 3 * 4:
            raise CodecError(f"{where}: 'payload' must be base64 of at most {MAX_DEADLETTER_PAYLOAD} bytes")
        try:
            payload = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise CodecError(f"{where}: 'payload' is not base64") from None
        topic_len = _int(item, "topic_len", where)
        size = _int(item, "size", where)
        if topic_len < len(topic) or size < len(payload):
            raise CodecError(f"{where}: 'topic_len' and 'size' must be at least what is carried")
        digest = item.get("sha256")
        if not isinstance(digest, str) or (digest and (len(digest) != 64 or not set(digest) <= _HEX)):
            raise CodecError(f"{where}: 'sha256' must be 64 lowercase hex digits or empty")
        if digest and size == len(payload) and hashlib.sha256(payload).hexdigest() != digest:
            raise CodecError(f"{where}: 'sha256' is not the payload's")
        out.append(GatewayDeadLetter(
            id=_int(item, "id", where),
            topic=topic,
            topic_len=topic_len,
            reason=reason,
            payload=payload,
            size=size,
            sha256=digest,
            received_ms=_int(item, "at", where),
        ))
    return tuple(out)


def decode_batch(raw: bytes, *, topic_gateway: str | None = None) -> Batch:
    """Decode a batch envelope, refusing oversized, zip-bomb or off-contract input."""
    batch, readings = decode_batch_with(raw, new_reading, topic_gateway=topic_gateway)
    return replace(batch, readings=tuple(readings))


#: What :func:`decode_batch_with` hands a reading's fields to:
#: ``make(device, boot, seq, ts_ms, values, site, received_ms)``, as :func:`new_reading` takes them.
MakeReading = Callable[[str, str, int, int, dict[str, Any], str, int], T]


def decode_batch_with(raw: bytes, make: MakeReading[T], *,
                      topic_gateway: str | None = None) -> tuple[Batch, list[T]]:
    """Decode a batch envelope as :func:`decode_batch` does (the same checks, the same verdicts),
    but hand each valid reading's fields to ``make`` instead of building a :class:`Reading`: the
    batch without its readings (``readings`` empty) and what ``make`` returned for each, in order.

    The bridge makes Kafka records straight from the fields (``kafka_wire.decode_batch_records``).
    """
    what = "batch"
    obj = _inflate(raw, what)
    _check_version(obj, what)
    ext = _decode_extensions(obj, what)
    gateway = check_id(_text(obj, "gw", what), "gateway")
    if topic_gateway is not None and gateway != topic_gateway:
        raise CodecError(f"{what}: gateway {gateway!r} published on the topic of {topic_gateway!r}")
    made = _decode_readings(obj, what, make)
    batch = Batch(
        gateway=gateway,
        bseq=_int(obj, "bseq", what),
        sent_ms=_int(obj, "sent", what),
        statuses=_decode_status_events(obj, what),
        drops=_decode_drops(obj, what, ext),
        outcomes=_decode_outcomes(obj, what, ext, gateway),
        deadletters=_decode_deadletters(obj, what, ext),
        holds=_decode_holds(obj, what, ext),
    )
    return batch, made


def _inflate(raw: bytes, what: str) -> dict[str, Any]:
    """The envelope's JSON object, refusing oversized, zip-bomb, truncated or non-JSON input."""
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
    return _json_object(text, MAX_BATCH_INFLATED, what)


#: (site, device, boot) identities that passed the full checks: whether one does depends on the
#: three strings alone, so the memo holds across batches (and threads). Bounded (~0.2 KB an
#: entry): at the limit it starts afresh.
_PROVEN: set[tuple[str, str, str]] = set()
MAX_PROVEN = 16_384


def _decode_readings(obj: Mapping[str, Any], what: str, make: MakeReading[T]) -> list[T]:
    """``make`` of each reading of the envelope's ``items``, in order; CodecError at the first bad one.

    A gateway's batches hold the readings of the same devices again and again: once one item has
    proved its (site, device, boot) valid through the full checks (which explain what is wrong
    with anything else), the items of that identity need only cheap type and range tests, inline
    here because this loop is most of the bridge's time. Same verdicts as the full checks.
    """
    items = obj.get("items")
    if not isinstance(items, list):
        raise CodecError(f"{what}: 'items' must be a list")
    made: list[T] = []
    append = made.append
    proven, plain = _PROVEN, _plain_values
    if len(proven) >= MAX_PROVEN:
        proven.clear()
    for index, item in enumerate(items):
        if type(item) is dict:
            site, device, boot = item.get("site"), item.get("dev"), item.get("boot")
            seq, ts, rx, values = item.get("seq"), item.get("ts"), item.get("rx"), item.get("r")
            if (type(site) is str and type(device) is str and type(boot) is str and (site, device, boot) in proven
                    and type(seq) is int and 0 <= seq <= MAX_SAFE_INT
                    and type(ts) is int and 0 <= ts <= MAX_SAFE_INT
                    and type(rx) is int and 0 <= rx <= MAX_SAFE_INT
                    and plain(values)):
                append(make(device, boot, seq, ts, values, site, rx))
                continue
        # Something to look at closely: the checks that explain it.
        where = f"{what} item {index}"
        if not isinstance(item, dict):
            raise CodecError(f"{where}: must be an object")
        device = check_id(_text(item, "dev", where), "device")
        boot = _boot(item, where)
        seq = _int(item, "seq", where)
        ts = _int(item, "ts", where)
        values = _values(item, where)
        site = check_id(_text(item, "site", where), "site")
        rx = _int(item, "rx", where)
        proven.add((site, device, boot))
        append(make(device, boot, seq, ts, values, site, rx))
    return made


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
