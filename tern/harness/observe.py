"""Watch a broker and a Kafka topic, and reconcile what was sent with what arrived.

Used by ``make demo`` and the end-to-end tests: the sent side is measured on the Pi's
broker (every telemetry message a node published), the received side by consuming Kafka.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Self, Any, Callable, Iterable

import paho.mqtt.client as mqtt

from tern.core import codec, topics
from tern.core.errors import CodecError

Identity = tuple[str, str, int]


class BrokerObserver:
    """Subscribes to every node's telemetry and status on a broker and keeps what it saw.

    Memory grows with the number of readings seen; it is meant for demos and tests,
    not for production monitoring.
    """

    def __init__(self, host: str, port: int, client_id: str = "tern-observer",
                 username: str | None = None, password: str | None = None) -> None:
        self._lock = threading.Lock()
        self.sent: dict[str, list[codec.Reading]] = defaultdict(list)
        self.status: dict[str, codec.Status] = {}
        self.rejected = 0
        self._connected = threading.Event()
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        if username is not None:
            self._client.username_pw_set(username, password)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._host, self._port = host, port

    def start(self, timeout: float = 10.0) -> "BrokerObserver":
        """Connect and subscribe; returns once the subscription is in place."""
        self._client.connect(self._host, self._port, keepalive=30)
        self._client.loop_start()
        if not self._connected.wait(timeout):
            self.stop()
            raise TimeoutError(f"observer could not subscribe on {self._host}:{self._port}")
        return self

    def stop(self) -> None:
        """Disconnect."""
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        client.subscribe([(topics.TELEMETRY_FILTER, 1), (topics.STATUS_FILTER, 1)])
        self._connected.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            where = topics.parse_node_topic(msg.topic)
            if where.kind == topics.TELEMETRY:
                reading = codec.decode_reading(msg.payload, site=where.site, topic_device=where.device)
                with self._lock:
                    self.sent[where.device].append(reading)
            elif msg.payload:
                status = codec.decode_status(msg.payload)
                with self._lock:
                    self.status[where.device] = status
        except CodecError:
            with self._lock:
                self.rejected += 1

    def identities(self) -> set[Identity]:
        """Every (device, boot, seq) published so far."""
        with self._lock:
            return {r.identity for readings in self.sent.values() for r in readings}

    def snapshot(self) -> dict[str, list[codec.Reading]]:
        """A copy of the readings seen, per device, in arrival order."""
        with self._lock:
            return {device: list(readings) for device, readings in self.sent.items()}


@dataclass
class Reconciliation:
    """Per device: how many readings were sent, arrived, went missing or came twice."""

    sent: dict[str, int] = field(default_factory=dict)
    received: dict[str, int] = field(default_factory=dict)
    missing: dict[str, int] = field(default_factory=dict)
    duplicated: dict[str, int] = field(default_factory=dict)
    out_of_order: dict[str, int] = field(default_factory=dict)

    @property
    def total_missing(self) -> int:
        """Readings sent but never seen in Kafka."""
        return sum(self.missing.values())


def reconcile(sent: Iterable[Identity], arrived: Iterable[Identity]) -> Reconciliation:
    """Compare sent identities with the identities read from Kafka, in Kafka order.

    ``arrived`` must be in consumption order per partition; a device is out of order when the
    first arrival of some seq comes after the first arrival of a higher seq of the same boot.
    """
    result = Reconciliation()
    sent_by_device: dict[str, set[Identity]] = defaultdict(set)
    for identity in sent:
        sent_by_device[identity[0]].add(identity)
    seen: set[Identity] = set()
    highest: dict[tuple[str, str], int] = {}
    counts: dict[str, int] = defaultdict(int)
    dups: dict[str, int] = defaultdict(int)
    disorder: dict[str, int] = defaultdict(int)
    for identity in arrived:
        device, boot, seq = identity
        counts[device] += 1
        if identity in seen:
            dups[device] += 1
            continue
        seen.add(identity)
        if seq < highest.get((device, boot), -1):
            disorder[device] += 1
        highest[(device, boot)] = max(seq, highest.get((device, boot), -1))
    for device in sorted(set(sent_by_device) | set(counts)):
        expected = sent_by_device.get(device, set())
        result.sent[device] = len(expected)
        result.received[device] = len(expected & seen)
        result.missing[device] = len(expected - seen)
        result.duplicated[device] = dups.get(device, 0)
        result.out_of_order[device] = disorder.get(device, 0)
    return result


def wait_until(predicate, timeout: float, interval: float = 0.1) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


class _TopicConsumer:
    """A Kafka topic consumed from the beginning in a background thread; each record's value
    and partition go to :meth:`_add` (the subclass keeps what it needs, under ``_lock``)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self._lock = threading.Lock()
        self.undecodable = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"kafka-tail-{topic}", daemon=True)

    def start(self, timeout: float = 20.0) -> "Self":
        """Start consuming; returns once the consumer is assigned its partitions."""
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise TimeoutError(f"Kafka consumer for {self.topic} at {self.bootstrap} not ready: {self.error!r}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop consuming."""
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        import asyncio

        try:
            asyncio.run(self._consume())
        except BaseException as exc:  # surfaced through .error; the thread must not die silently
            self.error = exc

    async def _consume(self) -> None:
        from aiokafka import AIOKafkaConsumer

        from tern.cloud.consume import assign_from_beginning

        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
        await consumer.start()
        try:
            await assign_from_beginning(consumer, self.topic, 15)
            self._ready.set()
            while not self._stop.is_set():
                batches = await consumer.getmany(timeout_ms=200, max_records=5000)
                for messages in batches.values():
                    for message in messages:
                        self._add(message.value, message.partition)
        finally:
            await consumer.stop()

    def _add(self, raw: bytes, partition: int) -> None:
        raise NotImplementedError


class KafkaTail(_TopicConsumer):
    """Consumes a Kafka topic from the beginning in a background thread.

    Keeps, in consumption order, the identity and value of every reading record, so the
    demo can show what arrives live and tests can reconcile it with what was sent.
    """

    def __init__(self, bootstrap: str, topic: str) -> None:
        super().__init__(bootstrap, topic)
        self._records: list[tuple[Identity, dict[str, Any], int]] = []

    def _add(self, raw: bytes, partition: int) -> None:
        try:
            value = codec.decode_kafka_value(raw)
        except CodecError:
            with self._lock:
                self.undecodable += 1
            return
        with self._lock:
            self._records.append(((value["device"], value["boot"], value["seq"]), value, partition))

    def records(self) -> list[tuple[Identity, dict[str, Any], int]]:
        """(identity, value, partition) of every reading consumed so far, in order."""
        with self._lock:
            return list(self._records)

    def identities(self) -> list[Identity]:
        """Identities consumed so far, in consumption order."""
        with self._lock:
            return [identity for identity, _, _ in self._records]


class TopicTail(_TopicConsumer):
    """Consumes any Kafka topic from the beginning in a background thread, decoding each value
    with ``decode``; keeps (monotonic time consumed, decoded value) in consumption order.

    The demo follows the status and command-results topics with it: *when* a record arrived
    is part of what it tells (a last will that waited in the outbox arrives after the uplink
    returns). Values ``decode`` rejects with a CodecError are counted, not kept.
    """

    def __init__(self, bootstrap: str, topic: str, decode: Callable[[bytes], Any]) -> None:
        super().__init__(bootstrap, topic)
        self.decode = decode
        self._records: list[tuple[float, Any]] = []

    def _add(self, raw: bytes, partition: int) -> None:
        try:
            value = self.decode(raw)
        except CodecError:
            with self._lock:
                self.undecodable += 1
            return
        with self._lock:
            self._records.append((time.monotonic(), value))

    def records(self) -> list[tuple[float, Any]]:
        """(monotonic time consumed, value) of every record so far, in order."""
        with self._lock:
            return list(self._records)

    def first(self, predicate: Callable[[Any], bool]) -> tuple[float, Any] | None:
        """The first record whose value satisfies ``predicate``, or None."""
        return next(((t, v) for t, v in self.records() if predicate(v)), None)
