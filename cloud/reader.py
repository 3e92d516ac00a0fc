"""Read what the bridge wrote: Tern's Kafka topics as decoded readings, node statuses and dead letters.

The consumer side of the bridge, for scripts and for ``tern-bridge consume``::

    from tern.cloud.reader import read_tern

    for item in read_tern("kafka:9092", ["tern.readings", "tern.status"], from_beginning=True, dedup_window=100_000):
        if item.kind == "reading":
            print(item.value["device"], item.value["seq"], item.value["readings"])
        elif item.kind == "status":
            print(item.value["device"], item.value["state"])

or, inside asyncio, ``async with TopicReader(...) as reader: async for item in reader: ...``.

Where reading starts follows Kafka's console consumer: without a consumer group, at the end
of each partition (only new records), or at its beginning with ``from_beginning``; with a
``group``, at the group's committed offsets, and where the group has none, at the beginning
(``from_beginning``) or the end. A group's offsets are committed for the records handed out,
so the next run with the same group continues where this one stopped, and several readers
in one group split the partitions between them. Without ``follow`` the reader stops once it
has read every partition up to the end it had when reading began; with it, it waits for new
records until closed.

Delivery from Kafka is at least once (a gateway re-sends a batch whose confirm it lost, a
bridge re-writes a batch whose Kafka write failed half way), so the reader can drop repeats:
readings on ``(device, boot, seq)``, status events on ``(device, boot, state, gateway_rx_ms)``
(a node may go online, offline and online again within one boot, but the gateway stamps each
event when it commits it), drop events on ``(device, boot, first_seq, last_seq, dropped_ms)``,
hold events on ``(device, boot, reason, held_since_ms, updated_ms, count, lifted)``, remembered over a bounded window of the most recent identities.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Hashable, Iterator, Mapping, Sequence

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from tern.core import codec
from tern.core.errors import CodecError, TernError

log = logging.getLogger("tern.reader")

#: Seconds the commit and the disconnect of :meth:`TopicReader.close` may take, each.
CLOSE_TIMEOUT_S = 10.0

#: What a record is: a reading, a node status event, a drop event (readings a gateway's
#: retention policy deleted: they will never arrive), a hold event (readings a gateway held
#: back: not lost, the node re-sends them), a node's step in a fleet rollout (``tern-bridge ota
#: rollout``), a dead letter the bridge wrote (its headers say why), or something on a Tern
#: topic that is none of these.
KINDS = ("reading", "status", "drop", "hold", "ota", "deadletter", "invalid")

#: (kind, the codec's decoder for it). Looked up by name: a codec without drop events (older
#: than the gateway's retention policies) simply never yields kind ``drop``.
_DECODERS = (
    ("reading", "decode_kafka_value"),
    ("status", "decode_kafka_status_value"),
    ("drop", "decode_kafka_drop_value"),
    ("hold", "decode_kafka_hold_value"),
    ("ota", "decode_kafka_ota_value"),
)

#: Identities remembered by default: ~15 MB (measured with tracemalloc), many batches' worth of re-sends from
#: thousands of gateways.
DEFAULT_DEDUP_WINDOW = 100_000
#: A group member's session timeout: Kafka's smallest by default (group.min.session.timeout.ms),
#: so a reader that died hands its partitions on soonest.
DEFAULT_SESSION_TIMEOUT_S = 6.0


class ReaderError(TernError, RuntimeError):
    """Kafka or a topic could not be read; the message says why."""


@dataclass(frozen=True)
class TernRecord:
    """One Kafka record, decoded.

    ``value`` is the decoded reading, status, drop or hold value (``tern.reading/1``, ``tern.status/1``,
    ``tern.drop/1``, ``tern.hold/1``, see docs/contracts.md) and None for the other kinds; ``error`` is the dead letter's reason
    (its ``error`` header) or why an ``invalid`` record did not decode.
    """

    kind: str
    topic: str
    partition: int
    offset: int
    key: str | None
    timestamp_ms: int
    headers: Mapping[str, bytes] = field(repr=False)
    raw: bytes = field(repr=False)
    value: dict[str, Any] | None = None
    error: str | None = None

    @property
    def identity(self) -> tuple[Hashable, ...] | None:
        """The key repeats are recognised by (see the module docstring); None for other kinds."""
        v = self.value
        if v is None:
            return None
        if self.kind == "reading":
            return ("reading", v["device"], v["boot"], v["seq"])
        if self.kind == "drop":
            return ("drop", v["device"], v["boot"], v["first_seq"], v["last_seq"], v["dropped_ms"])
        if self.kind == "hold":
            return ("hold", v["device"], v["boot"], v["reason"], v["held_since_ms"], v["updated_ms"], v["count"],
                    v["lifted"])
        if self.kind == "ota":
            return ("ota", v["rollout"], v["device"], v["state"], v["ms"])
        return ("status", v["device"], v["boot"], v["state"], v["gateway_rx_ms"])

    def header(self, name: str) -> str:
        """A header as text ("" when absent)."""
        return self.headers.get(name, b"").decode(errors="replace")

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: ``kind``, the value's fields (or the dead letter's), and ``kafka`` coordinates.

        Dead letters and invalid records carry their payload as ``payload_b64`` (it may be
        binary, compressed or truncated) and their headers as text.
        """
        out: dict[str, Any] = {"kind": self.kind}
        if self.value is not None:
            out.update(self.value)
        else:
            out["error"] = self.error
            if self.kind == "deadletter":
                out["source_topic"] = self.header("source_topic")
                out["truncated"] = self.header("truncated") == "1"
                out["original_bytes"] = int(self.header("original_bytes") or len(self.raw))
                if "gateway" in self.headers:  # a node payload a gateway refused (deadletters/1)
                    out["gateway"] = self.header("gateway")
            out["payload_b64"] = base64.b64encode(self.raw).decode()
            out["headers"] = {k: v.decode(errors="replace") for k, v in self.headers.items()}
        out["kafka"] = {
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "key": self.key,
            "timestamp_ms": self.timestamp_ms,
        }
        return out


def decode_record(topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None,
                  headers: Sequence[tuple[str, bytes]] | None, timestamp_ms: int) -> TernRecord:
    """Classify and decode one Kafka record (never raises on bad content: that is kind ``invalid``)."""
    raw = bytes(value) if value is not None else b""
    header_map = {k: bytes(v) for k, v in (headers or ())}
    common = dict(
        topic=topic,
        partition=partition,
        offset=offset,
        key=key.decode(errors="replace") if key is not None else None,
        timestamp_ms=timestamp_ms,
        headers=header_map,
        raw=raw,
    )
    errors = []
    for kind, name in _DECODERS:
        decode = getattr(codec, name, None)
        if decode is None:
            continue
        try:
            return TernRecord(kind=kind, value=decode(raw), **common)
        except CodecError as exc:
            errors.append(str(exc))
    if "error" in header_map and "source_topic" in header_map:
        return TernRecord(kind="deadletter", error=header_map["error"].decode(errors="replace"), **common)
    # Say the more telling of the two reasons: the one whose schema the record claims.
    reason = next((e for e in errors if "unknown schema" not in e), errors[0])
    return TernRecord(kind="invalid", error=reason, **common)


class Deduplicator:
    """Remembers the last ``window`` identities; :meth:`seen` tells a repeat from a first sighting.

    Bounded: once full, the oldest identity is forgotten, so a repeat arriving more than
    ``window`` identities later passes as new (at-least-once, never a loss).
    """

    def __init__(self, window: int = DEFAULT_DEDUP_WINDOW) -> None:
        if window < 1:
            raise ValueError(f"dedup window must be at least 1, got {window}")
        self.window = window
        self.duplicates = 0
        self._seen: OrderedDict[bytes, None] = OrderedDict()

    def seen(self, identity: Hashable) -> bool:
        """True if ``identity`` is a repeat within the window (and count it); else remember it."""
        # A 16-byte digest instead of the tuple: a third of the memory, and (unlike hash())
        # no collision that could drop a real reading in this universe's lifetime.
        identity = hashlib.blake2b(repr(identity).encode(), digest_size=16).digest()
        if identity in self._seen:
            self._seen.move_to_end(identity)
            self.duplicates += 1
            return True
        self._seen[identity] = None
        if len(self._seen) > self.window:
            self._seen.popitem(last=False)
        return False

    def __len__(self) -> int:
        return len(self._seen)


class TopicReader:
    """An async iterator of :class:`TernRecord` over one or more Kafka topics.

    ``timeout_s`` bounds the wait for Kafka: connecting, finding the topics, and (without
    ``follow``) any stretch with no record while the end is not reached yet; after it the
    reader stops and :attr:`reached_end` stays False. ``session_timeout_s`` is the group
    member's session timeout (with ``group``). ``dedup_window`` > 0 drops repeats
    (counted in :attr:`duplicates`). ``kafka_options`` go to aiokafka (TLS and SASL:
    :meth:`tern.cloud.kafka_security.KafkaSecurity.aiokafka_options`).
    """

    def __init__(
        self,
        bootstrap: str | Sequence[str],
        topics: str | Sequence[str],
        *,
        from_beginning: bool = False,
        group: str | None = None,
        follow: bool = False,
        dedup_window: int = 0,
        timeout_s: float = 10.0,
        kafka_options: Mapping[str, Any] | None = None,
        session_timeout_s: float = DEFAULT_SESSION_TIMEOUT_S,
    ) -> None:
        if not session_timeout_s > 0:
            raise ValueError(f"session_timeout_s must be positive, got {session_timeout_s!r}")
        self.session_timeout_s = session_timeout_s
        self.bootstrap = bootstrap
        self.topics = [topics] if isinstance(topics, str) else list(topics)
        if not self.topics:
            raise ValueError("give at least one topic")
        self.from_beginning = from_beginning
        self.group = group
        self.follow = follow
        self.timeout_s = timeout_s
        self.dedup = Deduplicator(dedup_window) if dedup_window else None
        self.kafka_options = dict(kafka_options or {})
        #: Records handed out, and whether every partition was read up to its end.
        self.delivered = 0
        self.reached_end = False
        self._consumer: AIOKafkaConsumer | None = None
        self._handed: dict[TopicPartition, int] = {}  # next offset to commit, per partition
        self._committed: dict[TopicPartition, int] = {}

    @property
    def duplicates(self) -> int:
        """Repeats dropped so far (0 without de-duplication)."""
        return self.dedup.duplicates if self.dedup is not None else 0

    @property
    def assignment(self) -> set[TopicPartition]:
        """The partitions this reader holds now (with a group: its share, once it joined)."""
        consumer = self._consumer
        return set(consumer.assignment()) if consumer is not None else set()

    async def start(self) -> "TopicReader":
        """Connect, find the topics and position the reader; raise ReaderError if Kafka or a topic is missing."""
        deadline = time.monotonic() + self.timeout_s
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=self.group,
            enable_auto_commit=False,  # committed for what was handed out, see _commit
            auto_offset_reset="earliest" if self.from_beginning else "latest",
            request_timeout_ms=max(1000, int(min(self.timeout_s, 30) * 1000)),
            # A reader that died without leaving hands its partitions on this long after its
            # last heartbeat (heartbeats every third of it).
            session_timeout_ms=int(self.session_timeout_s * 1000),
            heartbeat_interval_ms=max(100, int(self.session_timeout_s * 1000 / 3)),
            **self.kafka_options,
        )
        try:
            await asyncio.wait_for(consumer.start(), max(0.1, deadline - time.monotonic()))
        except Exception as exc:  # aiokafka raises several kinds when Kafka is unreachable
            await consumer.stop()
            raise ReaderError(f"cannot reach Kafka at {self.bootstrap}: {type(exc).__name__}: {exc}") from None
        try:
            partitions = [await _partitions(consumer, topic, deadline) for topic in self.topics]
            if self.group is None:
                tps = [tp for group in partitions for tp in group]
                consumer.assign(tps)
                if self.from_beginning:
                    await consumer.seek_to_beginning(*tps)
                else:
                    await consumer.seek_to_end(*tps)
            else:
                consumer.subscribe(self.topics)
        except BaseException:
            await consumer.stop()
            raise
        self._consumer = consumer
        return self

    async def close(self) -> None:
        """Commit the group's offsets for what was handed out (with a group) and disconnect,
        each within :data:`CLOSE_TIMEOUT_S`: a Ctrl-C must end the reader even when the group
        coordinator does not answer (the next run then re-reads from the last commit)."""
        consumer, self._consumer = self._consumer, None
        if consumer is None:
            return
        try:
            await asyncio.wait_for(self._commit(consumer), CLOSE_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.warning("could not commit offsets of group %s within %.0f s: the next run re-reads from "
                        "the last commit", self.group, CLOSE_TIMEOUT_S)
        finally:
            try:
                await asyncio.wait_for(consumer.stop(), CLOSE_TIMEOUT_S)
            except asyncio.TimeoutError:
                log.warning("the Kafka consumer did not stop within %.0f s; leaving it", CLOSE_TIMEOUT_S)

    async def __aenter__(self) -> "TopicReader":
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __aiter__(self) -> AsyncIterator[TernRecord]:
        return self._records()

    async def _records(self) -> AsyncIterator[TernRecord]:
        consumer = self._consumer
        if consumer is None:
            raise ReaderError("reader is not started (use `async with TopicReader(...)`)")
        ends: dict[TopicPartition, int] = {}
        last_progress = time.monotonic()
        while True:
            if not self.follow:
                assigned = consumer.assignment()
                new = [tp for tp in assigned if tp not in ends]
                if new:
                    ends.update(await consumer.end_offsets(new))
                if assigned and await _at_end(consumer, assigned, ends):
                    self.reached_end = True
                    return
                if time.monotonic() - last_progress > self.timeout_s:
                    log.warning("no record for %.0f s before the end of %s", self.timeout_s, self.topics)
                    return
            await self._commit(consumer)
            batches = await consumer.getmany(timeout_ms=500)
            for tp, messages in batches.items():
                for msg in messages:
                    last_progress = time.monotonic()
                    self._handed[tp] = msg.offset + 1
                    record = decode_record(msg.topic, msg.partition, msg.offset, msg.key, msg.value, msg.headers, msg.timestamp)
                    identity = record.identity
                    if self.dedup is not None and identity is not None and self.dedup.seen(identity):
                        continue
                    self.delivered += 1
                    yield record

    async def _commit(self, consumer: AIOKafkaConsumer) -> None:
        if self.group is None:
            return
        held = consumer.assignment()  # a partition a rebalance took away is its new owner's to commit
        offsets = {tp: off for tp, off in self._handed.items() if tp in held and self._committed.get(tp) != off}
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
            self._committed.update(offsets)
        except KafkaError as exc:  # a rebalance under way: the new owner re-reads from the last commit
            log.warning("could not commit offsets of group %s: %s", self.group, exc)


async def _at_end(consumer: AIOKafkaConsumer, assigned: set[TopicPartition], ends: Mapping[TopicPartition, int]) -> bool:
    for tp in assigned:
        if await consumer.position(tp) < ends[tp]:
            return False
    return True


async def _partitions(consumer: AIOKafkaConsumer, topic: str, deadline: float) -> list[TopicPartition]:
    partitions = consumer.partitions_for_topic(topic)
    while not partitions and time.monotonic() < deadline:
        await consumer._client.force_metadata_update()  # aiokafka has no public "wait for topic"
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            await asyncio.sleep(0.1)
    if not partitions:
        raise ReaderError(f"Kafka topic {topic!r} not found")
    return [TopicPartition(topic, p) for p in sorted(partitions)]


def read_tern(
    bootstrap: str | Sequence[str],
    topics: str | Sequence[str],
    *,
    from_beginning: bool = False,
    group: str | None = None,
    follow: bool = False,
    dedup_window: int = 0,
    timeout_s: float = 10.0,
    kafka_options: Mapping[str, Any] | None = None,
) -> Iterator[TernRecord]:
    """Synchronous :class:`TopicReader`: yields decoded records (for scripts without asyncio).

    Runs its own event loop on the calling thread, so do not call it from inside a running
    loop. Breaking out of the loop closes the reader (and commits a group's offsets).
    """
    reader = TopicReader(bootstrap, topics, from_beginning=from_beginning, group=group, follow=follow,
                         dedup_window=dedup_window, timeout_s=timeout_s, kafka_options=kafka_options)
    # The loop runs on its own thread so that a group's heartbeats go on while the caller
    # works on a record: a caller slower than the session timeout would lose its partitions.
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="tern-reader", daemon=True)
    thread.start()

    def run(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    try:
        run(reader.start())
        records = reader.__aiter__()
        try:
            while True:
                try:
                    yield run(records.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            run(records.aclose())
            run(reader.close())
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
