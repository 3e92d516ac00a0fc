"""The bridge's Kafka sink: record batches built per partition, on a real Kafka-protocol broker.

The sink builds aiokafka record batches itself instead of sending record by record; these
tests hold it to what the per-record path guaranteed: the partition ``send`` would pick for
each key, order within a partition across many concurrent writes, records larger than a
batch, and every write acknowledged only once Kafka holds all of it.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

from aiokafka.partitioner import murmur2

from tern.cloud.config import BridgeConfig
from tern.cloud.consume import read_all
from tern.cloud.kafka_sink import KafkaSink
from tern.core.codec import KafkaRecord


def record(topic: str, device: str, seq: int, size: int = 40) -> KafkaRecord:
    value = f'{{"device":"{device}","seq":{seq},"pad":"{"x" * size}"}}'.encode()
    return KafkaRecord(topic=topic, key=device.encode(), value=value, headers=(("seq", str(seq).encode()),))


def test_concurrent_writes_keep_each_key_in_its_partition_in_order(kafka_bootstrap: str, kafka_topics: dict[str, str]) -> None:
    topic = kafka_topics["readings"]
    devices = [f"dev-{i}" for i in range(12)]
    writes = 40  # concurrent writes, each with every device: small batches (1 KiB) fill up
    per_write = 5

    async def main() -> int:
        sink = KafkaSink(BridgeConfig(kafka_bootstrap=kafka_bootstrap, max_batch_bytes=1024))
        await sink.start(check_topics=[topic])
        written = 0

        def count(records: int, seconds: float, ok: bool) -> None:
            nonlocal written
            written += records if ok else 0

        sink.on_write = count
        try:
            # Write w holds seqs w*per_write+1 .. (w+1)*per_write of every device: the writes run
            # at once, and a device's records must still come out in write order.
            await asyncio.gather(*(
                sink.write([record(topic, d, w * per_write + s) for d in devices for s in range(1, per_write + 1)])
                for w in range(writes)
            ))
        finally:
            await sink.stop()
        return written

    # The sink knows the topic's partitions from start(), so each write is appended in full
    # before the next one runs (as the bridge's are: it never has one device in two writes).
    assert asyncio.run(main()) == len(devices) * writes * per_write
    records = read_all(kafka_bootstrap, topic, expect=len(devices) * writes * per_write)
    assert len(records) == len(devices) * writes * per_write
    by_device: dict[str, list[int]] = defaultdict(list)
    partitions: dict[str, set[int]] = defaultdict(set)
    for rec in sorted(records, key=lambda r: (r.partition, r.offset)):
        assert rec.key is not None
        by_device[rec.key].append(int(rec.headers["seq"]))
        partitions[rec.key].add(rec.partition)
    count = len({r.partition for r in records})
    for device in devices:
        assert by_device[device] == list(range(1, writes * per_write + 1)), device
        # The partition aiokafka's default partitioner (and Java's) picks for the key.
        assert partitions[device] == {(murmur2(device.encode()) & 0x7FFFFFFF) % count}, device


def test_a_record_larger_than_a_batch_goes_alone_and_in_order(kafka_bootstrap: str, kafka_topics: dict[str, str]) -> None:
    topic = kafka_topics["readings"]
    records = [record(topic, "big", 1), record(topic, "big", 2, size=5000), record(topic, "big", 3)]

    async def main() -> None:
        sink = KafkaSink(BridgeConfig(kafka_bootstrap=kafka_bootstrap, max_batch_bytes=1024))
        await sink.start(check_topics=[topic])
        try:
            await sink.write(records)
        finally:
            await sink.stop()

    asyncio.run(main())
    back = sorted(read_all(kafka_bootstrap, topic, expect=3), key=lambda r: r.offset)
    assert [(int(r.headers["seq"]), len(r.raw) > 5000) for r in back] == [(1, False), (2, True), (3, False)]
