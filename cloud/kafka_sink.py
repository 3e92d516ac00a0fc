"""The bridge's Kafka producer: writes a group of records and reports all-or-error.

``write`` appends each record to its partition's open record batch (aiokafka's
``create_batch``), and one pump per partition hands the batches to the producer
(``send_batch``) in order; then it waits for the acknowledgements of the batches its records
went into. aiokafka takes a partition's next batch only once the one before has gone into a
request, so under load the open batch fills meanwhile (hundreds of records, shared by the
gateway batches written at the same time) and on a quiet bridge nothing waits. This replaced
one ``send`` per record, which was 40 % of the bridge's time: ``make bench`` measured the bridge
at 0.43 of a raw per-record producer before and above it after. Records go to the partition
``send`` would pick (the default partitioner: murmur2 of the key), so a device stays in one
partition, in order.

It returns only when Kafka has acknowledged every record (``acks=all``) and raises
:class:`KafkaWriteError` otherwise. A failed write may have stored some of the records: the
caller retries the whole group, so delivery is at-least-once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from typing import Any, Callable, Iterable, Iterator, Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner

from tern.cloud.config import BridgeConfig
from tern.core.codec import KafkaRecord
from tern.core.errors import TernError

log = logging.getLogger("tern.bridge.kafka")

#: Keys whose partition the sink remembers (beyond it, the memo starts afresh).
PARTITION_MEMO = 16_384


class KafkaWriteError(TernError, RuntimeError):
    """Kafka did not acknowledge every record of a write; the message says why."""


class KafkaSink:
    """An aiokafka producer owned by one asyncio loop (the bridge's)."""

    def __init__(self, config: BridgeConfig) -> None:
        self.config = config
        self._producer: AIOKafkaProducer | None = None
        # The partitioner ``send`` uses (murmur2 of the key): same partition as before.
        self._partitioner = DefaultPartitioner()
        self._queues: dict[tuple[str, int], _PartitionQueue] = {}
        self._partition_of: dict[tuple[bytes | None, int], int] = {}
        #: Told (records, seconds, ok) after every write: the metrics' latency histogram.
        self.on_write: Callable[[int, float, bool], None] | None = None

    async def start(self, check_topics: Sequence[str] = ()) -> None:
        """Connect to Kafka and make sure ``check_topics`` exist; raise KafkaWriteError if not."""
        cfg = self.config
        producer = AIOKafkaProducer(
            bootstrap_servers=cfg.kafka_servers,
            client_id=cfg.client_id,
            acks="all",
            enable_idempotence=cfg.enable_idempotence,
            compression_type=cfg.compression,
            linger_ms=cfg.linger_ms,
            max_batch_size=cfg.max_batch_bytes,
            request_timeout_ms=cfg.request_timeout_ms,
            **cfg.kafka_security.aiokafka_options(),
        )
        what = "connect"
        try:
            await asyncio.wait_for(producer.start(), cfg.connect_timeout_s)
            for topic in check_topics:
                # The bridge made sure the topics exist (cloud/topic_setup.py); this waits
                # until the producer's metadata has them, instead of on the first batch.
                what = f"topic {topic!r}"
                await asyncio.wait_for(producer.partitions_for(topic), cfg.connect_timeout_s)
        except (KafkaError, asyncio.TimeoutError, OSError) as exc:
            await self._close(producer)
            raise KafkaWriteError(f"cannot use Kafka at {cfg.kafka_bootstrap} ({what}): {_describe(exc)}") from None
        self._producer = producer

    async def stop(self, timeout: float = 5.0) -> None:
        """Flush and close the producer, waiting at most ``timeout`` seconds."""
        producer, self._producer = self._producer, None
        queues, self._queues = self._queues, {}
        for queue in queues.values():
            await queue.close(timeout)
        if producer is not None:
            await self._close(producer, timeout)

    @staticmethod
    async def _close(producer: AIOKafkaProducer, timeout: float = 5.0) -> None:
        try:
            await asyncio.wait_for(producer.stop(), timeout)
        except (asyncio.TimeoutError, KafkaError, OSError) as exc:
            # Only unacknowledged records are pending here, and the bridge never acked
            # their MQTT messages: the broker redelivers them.
            log.warning("Kafka producer did not close cleanly: %s", _describe(exc))

    async def write(self, *parts: Iterable[KafkaRecord]) -> None:
        """Write the records of ``parts``, in order, and wait until Kafka acknowledges every one.

        A part with an ``entries()`` method (codec.ReadingRecords) is read through it: its
        records' ``(topic, key, value, headers)`` without a KafkaRecord object each.

        Raises KafkaWriteError on any failure, after every record handed to the producer
        has settled (so a retry never races records of the failed attempt).
        """
        producer = self._producer
        if producer is None:
            raise KafkaWriteError("Kafka producer is not started")
        futures: list[asyncio.Future] = []
        error: BaseException | None = None
        started = time.monotonic()
        count = 0
        try:
            count = await self._hand_over(producer, parts, futures)
        except (KafkaError, OSError, asyncio.TimeoutError) as exc:
            error = exc
        if futures:
            # A hung broker makes aiokafka fail each batch after request_timeout_ms; the
            # outer deadline is only a safety net against a future that never settles.
            deadline = self.config.request_timeout_ms / 1000 * 2 + 5
            done, pending = await asyncio.wait(futures, timeout=deadline)
            for future in pending:
                future.cancel()
            if pending and error is None:
                error = asyncio.TimeoutError(f"{len(pending)} record batches unacknowledged after {deadline:.0f} s")
            for future in done:
                exc = future.exception() if not future.cancelled() else asyncio.CancelledError()
                if exc is not None and error is None:
                    error = exc
        if self.on_write is not None:
            self.on_write(count, time.monotonic() - started, error is None)
        if error is not None:
            raise KafkaWriteError(_describe(error))

    async def _hand_over(self, producer: AIOKafkaProducer, parts: Sequence[Iterable[KafkaRecord]],
                         futures: list[asyncio.Future]) -> int:
        """Append the records of ``parts`` to their partitions' open record batches, in order,
        and start each partition's pump; append the futures of the batches they went into to
        ``futures``; how many records."""
        partitions: dict[str, list[int]] = {}
        # This write's records by (topic, key) -> their partition's queue: a backlog's records
        # are hundreds per device, and this loop runs once per record.
        route: dict[tuple[str, bytes], _PartitionQueue] = {}
        touched: dict[_PartitionQueue, None] = {}
        handles: set[asyncio.Future] = set()
        count = 0
        last: asyncio.Future | None = None
        for topic, key, value, headers in itertools.chain.from_iterable(map(_entries, parts)):
            count += 1
            queue = route.get((topic, key))
            if queue is None:
                queue = await self._queue_for(producer, topic, key, partitions)
                if key is not None:  # a record without a key goes to a random partition each time
                    route[(topic, key)] = queue
                touched[queue] = None
            handle = queue.append(key, value, headers)
            if handle is not last:  # mostly the same open batch as the record before
                handles.add(handle)
                last = handle
        for queue in touched:
            queue.pump()
        futures.extend(handles)
        return count

    async def _queue_for(self, producer: AIOKafkaProducer, topic: str, key: bytes | None,
                         partitions: dict[str, list[int]]) -> "_PartitionQueue":
        """The queue of the partition ``send`` would pick for ``key`` on ``topic``.

        ``partitions``: the topics' partitions as this write found them.
        """
        known = partitions.get(topic)
        if known is None:
            # The producer's current metadata (kept fresh by aiokafka), as send() uses;
            # waiting for it only for a topic not seen yet.
            current = producer.client.cluster.partitions_for_topic(topic)
            if not current:
                current = await producer.partitions_for(topic)
            known = partitions[topic] = sorted(current)
        if key is None:  # spread at random, as send() does
            partition = self._partitioner(None, known, known)
        else:
            # murmur2 in pure Python was an eighth of the bridge's time: a few thousand
            # devices' partitions are remembered (per partition count, so a topic that grows
            # gets them computed afresh).
            memo = (key, len(known))
            partition = self._partition_of.get(memo)
            if partition is None:
                if len(self._partition_of) >= PARTITION_MEMO:
                    self._partition_of.clear()
                partition = self._partition_of[memo] = self._partitioner(key, known, known)
        where = (topic, partition)
        queue = self._queues.get(where)
        if queue is None:
            queue = self._queues[where] = _PartitionQueue(producer, where)
        return queue

    async def reachable(self, timeout: float = 5.0) -> bool:
        """True if a Kafka broker answered a metadata request within ``timeout`` seconds."""
        producer = self._producer
        if producer is None:
            return False
        try:
            return bool(await asyncio.wait_for(producer.client.force_metadata_update(), timeout))
        except (asyncio.TimeoutError, KafkaError, OSError):
            return False


class _PartitionQueue:
    """One partition's record batches on their way into the producer, strictly in order.

    aiokafka takes a new batch for a partition only once the one before has been drained into
    a produce request, and sends one request per broker at a time. So while a batch waits,
    records keep going into the open one: under load the batches grow by themselves
    (hundreds of records each), and on a quiet bridge a record waits for nothing. One pump
    task per partition hands the batches over, so they reach Kafka in the order appended.
    """

    def __init__(self, producer: AIOKafkaProducer, where: tuple[str, int]) -> None:
        self.producer = producer
        self.topic, self.partition = where
        self._open: Any = None  # the BatchBuilder being filled
        self._open_done: asyncio.Future | None = None
        self._full: deque[tuple[Any, asyncio.Future]] = deque()
        self._task: asyncio.Task | None = None

    def append(self, key: bytes | None, value: bytes, headers: Sequence[tuple[str, bytes]]) -> asyncio.Future:
        """Add a record to the open batch; the future of the batch it went into."""
        if type(headers) is not list:  # the client takes only a list (readings' records carry one)
            headers = list(headers)
        if self._open is not None and self._open.append(
                key=key, value=value, timestamp=None, headers=headers) is not None:
            assert self._open_done is not None
            return self._open_done
        if self._open is not None:  # full: it queues whole, a new one opens
            self._seal()
        self._open = self.producer.create_batch()
        self._open_done = asyncio.get_running_loop().create_future()
        # An empty batch takes its first record whatever its size (one over the broker's
        # limit is refused by Kafka, failing the write, as it should).
        self._open.append(key=key, value=value, timestamp=None, headers=headers)
        return self._open_done

    def _seal(self) -> None:
        assert self._open is not None and self._open_done is not None
        self._full.append((self._open, self._open_done))
        self._open, self._open_done = None, None

    def pump(self) -> None:
        """Make sure the pump runs (it ends by itself once everything is handed over)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"tern-kafka-{self.topic}-{self.partition}")

    async def _run(self) -> None:
        while True:
            if not self._full:
                if self._open is None or self._open.record_count() == 0:
                    return
                self._seal()
            batch, done = self._full.popleft()
            batch.close()
            try:
                # Returns once the partition's previous batch has gone into a request;
                # meanwhile the open batch fills.
                future = await self.producer.send_batch(batch, self.topic, partition=self.partition)
            except asyncio.CancelledError:
                _fail(done, KafkaWriteError("the Kafka producer stopped"))
                raise
            except Exception as exc:  # KafkaTimeoutError, ProducerClosed, metadata errors
                _fail(done, exc)
                continue
            future.add_done_callback(lambda f, done=done: _settle(done, f))

    async def close(self, timeout: float) -> None:
        """Stop pumping; batches not yet handed over fail their writes."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task}, timeout=timeout)
        if self._open is not None:
            self._seal()
        while self._full:
            _, done = self._full.popleft()
            _fail(done, KafkaWriteError("the Kafka producer stopped"))


def _entries(records: Iterable[KafkaRecord]) -> Iterator[tuple[str, bytes | None, bytes, Sequence[tuple[str, bytes]]]]:
    """``(topic, key, value, headers)`` of each record: this loop runs once per record, and a
    batch's readings (codec.ReadingRecords) give them straight from their rows."""
    entries = getattr(records, "entries", None)
    if entries is not None:
        return entries()
    return ((r.topic, r.key, r.value, r.headers) for r in records)


def _fail(done: asyncio.Future, exc: BaseException) -> None:
    if not done.done():
        done.set_exception(exc)


def _settle(done: asyncio.Future, future: asyncio.Future) -> None:
    """Copy the producer's outcome for a batch onto the future its writes wait on."""
    if done.done():
        return
    if future.cancelled():
        done.set_exception(KafkaWriteError("the batch was cancelled"))
    elif future.exception() is not None:
        done.set_exception(future.exception())
    else:
        done.set_result(None)


def _describe(exc: BaseException) -> str:
    text, name = str(exc), type(exc).__name__
    if not text:
        return name
    return text if text.startswith(name) else f"{name}: {text}"
