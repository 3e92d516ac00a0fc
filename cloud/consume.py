"""Read a Kafka topic from the beginning, whole: for tests, the demo and the bench.

No consumer group and no offset commits: every call reads the topic afresh, assigning
all of its partitions itself. For following a topic, consumer groups and de-duplication
(and ``tern-bridge consume``) see :mod:`tern.cloud.reader`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from aiokafka import AIOKafkaConsumer, TopicPartition

from tern.core import codec
from tern.core.errors import CodecError, TernError


class ConsumeError(TernError, RuntimeError):
    """The topic could not be read; the message says why."""


@dataclass(frozen=True)
class ConsumedRecord:
    """One Kafka record as read back.

    ``value`` is the decoded reading (:func:`tern.core.codec.decode_kafka_value`) or None when
    the raw bytes are not a reading (a dead-letter record, say); ``raw`` always holds them.
    ``status`` is the decoded node-status value (:func:`tern.core.codec.decode_kafka_status_value`)
    of a record on the status topic, else None.
    """

    topic: str
    partition: int
    offset: int
    key: str | None
    headers: dict[str, bytes]
    raw: bytes
    value: dict[str, Any] | None
    timestamp_ms: int
    decode_error: str | None = field(default=None)
    status: dict[str, Any] | None = field(default=None)

    @property
    def identity(self) -> tuple[str, str, int] | None:
        """(device, boot, seq) of a reading record, the key to de-duplicate on."""
        if self.value is None:
            return None
        return (self.value["device"], self.value["boot"], self.value["seq"])


def _convert(msg: Any) -> ConsumedRecord:
    raw = msg.value if msg.value is not None else b""
    value: dict[str, Any] | None = None
    status: dict[str, Any] | None = None
    error: str | None = None
    try:
        value = codec.decode_kafka_value(raw)
    except CodecError as exc:
        error = str(exc)
        try:
            status, error = codec.decode_kafka_status_value(raw), None
        except CodecError:
            pass
    return ConsumedRecord(
        topic=msg.topic,
        partition=msg.partition,
        offset=msg.offset,
        key=msg.key.decode(errors="replace") if msg.key is not None else None,
        headers={k: bytes(v) for k, v in (msg.headers or ())},
        raw=bytes(raw),
        value=value,
        timestamp_ms=msg.timestamp,
        decode_error=error,
        status=status,
    )


async def assign_from_beginning(consumer: AIOKafkaConsumer, topic: str, timeout_s: float) -> list[TopicPartition]:
    """Assign every partition of ``topic`` to a started consumer and seek to their beginning.

    Waits up to ``timeout_s`` for the topic's metadata; raises ConsumeError if it never appears.
    """
    deadline = time.monotonic() + timeout_s
    partitions = consumer.partitions_for_topic(topic)
    while not partitions and time.monotonic() < deadline:
        await consumer._client.force_metadata_update()  # no public "wait for topic"
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            await asyncio.sleep(0.1)
    if not partitions:
        raise ConsumeError(f"Kafka topic {topic!r} not found after {timeout_s:.0f} s")
    tps = [TopicPartition(topic, p) for p in sorted(partitions)]
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)
    return tps


async def read_records(
    bootstrap: str,
    topic: str,
    *,
    until: Callable[[Sequence[ConsumedRecord]], bool] | None = None,
    timeout_s: float = 10.0,
    max_records: int | None = None,
) -> list[ConsumedRecord]:
    """Read ``topic`` from its beginning.

    Stops when ``until(records_so_far)`` is true, or, with ``until`` None, once every
    partition has been read up to the end it had when reading began; also at
    ``max_records`` or when ``timeout_s`` runs out (then returns what it has: the caller
    decides whether that is enough). Records are in partition order within a partition.
    """
    deadline = time.monotonic() + timeout_s
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        request_timeout_ms=max(1000, int(min(timeout_s, 30) * 1000)),
    )
    try:
        await asyncio.wait_for(consumer.start(), max(0.1, deadline - time.monotonic()))
    except Exception as exc:  # aiokafka raises several kinds when Kafka is unreachable
        await consumer.stop()
        raise ConsumeError(f"cannot reach Kafka at {bootstrap}: {type(exc).__name__}: {exc}") from None
    records: list[ConsumedRecord] = []
    try:
        tps = await assign_from_beginning(consumer, topic, deadline - time.monotonic())
        ends = await consumer.end_offsets(tps) if until is None else {}
        positions = {tp: 0 for tp in tps}

        def finished() -> bool:
            if max_records is not None and len(records) >= max_records:
                return True
            if until is not None:
                return until(records)
            return all(positions[tp] >= ends[tp] for tp in tps)

        while not finished():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            batches = await consumer.getmany(timeout_ms=int(min(left, 0.5) * 1000))
            for tp, msgs in batches.items():
                for msg in msgs:
                    records.append(_convert(msg))
                    positions[tp] = msg.offset + 1
    finally:
        await consumer.stop()
    # getmany returns several partitions at once: the last call may overshoot the limit.
    return records[:max_records] if max_records is not None else records


def read_all(bootstrap: str, topic: str, timeout_s: float = 10.0, expect: int | None = None) -> list[ConsumedRecord]:
    """Synchronous :func:`read_records`: with ``expect``, wait until that many records exist."""
    until = None if expect is None else (lambda records: len(records) >= expect)
    return asyncio.run(read_records(bootstrap, topic, until=until, timeout_s=timeout_s))
