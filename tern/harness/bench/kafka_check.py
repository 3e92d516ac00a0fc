"""Read a readings topic back and check it: every reading there, each device in order.

Lean on purpose (a million records): only the JSON value's device, boot and seq are looked at,
and what was seen is kept per device as a bytearray indexed by seq.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from tern.harness.bench.common import BenchError


@dataclass
class TopicCheck:
    """What a readings topic holds."""

    records: int = 0
    distinct: int = 0
    duplicates: int = 0
    #: First copies of a reading that came after a later seq of the same device and boot.
    out_of_order: int = 0
    devices: int = 0
    seconds: float = 0.0
    _seen: dict[tuple[str, str, str], bytearray] = field(default_factory=dict, repr=False)
    _last: dict[tuple[str, str, str], int] = field(default_factory=dict, repr=False)

    def add(self, value: bytes) -> None:
        doc = json.loads(value)
        # Per gateway too: the scale-out stage drains copies of one backlog from three gateways.
        key, seq = (doc.get("gateway", ""), doc["device"], doc["boot"]), doc["seq"]
        self.records += 1
        seen = self._seen.get(key)
        if seen is None:
            seen = self._seen[key] = bytearray(1024)
        if seq >= len(seen):
            seen.extend(bytes(max(seq + 1 - len(seen), len(seen))))
        if seen[seq]:
            self.duplicates += 1
            return
        seen[seq] = 1
        self.distinct += 1
        if seq < self._last.get(key, 0):
            self.out_of_order += 1
        else:
            self._last[key] = seq

    def as_json(self) -> dict[str, Any]:
        """The counts, for the JSON details."""
        return {"records_in_kafka": self.records, "distinct_in_kafka": self.distinct, "duplicates": self.duplicates,
                "out_of_order": self.out_of_order, "devices": len(self._seen), "read_back_s": round(self.seconds, 2)}

    def require(self, expect: int, what: str) -> None:
        """Raise BenchError unless all ``expect`` readings are there and in order per device."""
        if self.distinct != expect or self.out_of_order:
            raise BenchError(f"{what}: {self.distinct} of {expect} readings in Kafka, "
                             f"{self.out_of_order} out of order, {self.duplicates} duplicates")


async def _check(bootstrap: str, topic: str, expect: int, timeout_s: float) -> TopicCheck:
    from aiokafka import AIOKafkaConsumer

    from tern.cloud.consume import assign_from_beginning

    result = TopicCheck()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                                auto_offset_reset="earliest", fetch_max_bytes=16 << 20,
                                max_partition_fetch_bytes=8 << 20, fetch_max_wait_ms=100)
    await consumer.start()
    start = time.perf_counter()
    deadline = time.monotonic() + timeout_s
    try:
        partitions = await assign_from_beginning(consumer, topic, timeout_s)
        ends = await consumer.end_offsets(partitions)
        idle_since = time.monotonic()
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200, max_records=50_000)
            for records in batches.values():
                for record in records:
                    result.add(record.value)
            if batches:
                idle_since = time.monotonic()
            done = result.distinct >= expect
            at_end = all([(await consumer.position(tp)) >= ends[tp] for tp in partitions])
            # Past the expected count, read on to the end offsets so duplicates are counted too.
            if done and (at_end or time.monotonic() - idle_since > 1.0):
                break
            if at_end and time.monotonic() - idle_since > 2.0:
                ends = await consumer.end_offsets(partitions)
    finally:
        await consumer.stop()
    result.seconds = time.perf_counter() - start
    return result


def check_topic(bootstrap: str, topic: str, expect: int, timeout_s: float) -> TopicCheck:
    """Read ``topic`` from the beginning until ``expect`` distinct readings (or ``timeout_s``)."""
    return asyncio.run(_check(bootstrap, topic, expect, timeout_s))
