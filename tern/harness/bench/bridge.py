"""Stage 4, bridge: batches on the cloud broker -> BridgeThread -> Kafka vs aiokafka."""

from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any, Sequence

from tern.core import codec, topics
from tern.core.codec import Batch
from tern.harness.bench.common import (
    BATCH_READINGS,
    BatchSender,
    BenchError,
    Measurement,
    median,
    rate,
    sample_batches,
    wait_event,
)
from tern.harness.bench.lab import Lab

if TYPE_CHECKING:

    from tern.cloud.bridge import BridgeThread

    from tern.harness.stack import Mosquitto


def start_bridge(lab: Lab, stack: ExitStack, cloud: "Mosquitto", readings_topic: str, deadletter_topic: str, name: str) -> "BridgeThread":
    """A BridgeThread from the cloud mosquitto to Kafka; stopped when ``stack`` closes."""
    from tern.cloud.bridge import BridgeThread
    from tern.cloud.config import BridgeConfig

    # The bridge checks every topic it writes to at start-up: give it a status topic of its own.
    (status_topic,) = lab.kafka_topics(f"{name}-status")
    config = BridgeConfig(
        name=f"bench-{name}-{uuid.uuid4().hex[:6]}", mqtt_broker=cloud.address, kafka_bootstrap=lab.kafka(),
        readings_topic=readings_topic, status_topic=status_topic, deadletter_topic=deadletter_topic,
    )
    bridge = BridgeThread(config).start()
    stack.callback(bridge.stop)
    return bridge


def kafka_record_count(bootstrap: str, topic: str, expect: int, timeout_s: float) -> tuple[int, int]:
    """(records, distinct identities) read back from ``topic``, waiting up to ``timeout_s`` for ``expect``.

    Reads the records instead of subtracting offsets: on Tansu, end minus beginning offsets
    does not equal the number of records written.
    """
    from tern.cloud.consume import read_all

    records = read_all(bootstrap, topic, timeout_s=timeout_s, expect=expect)
    return len(records), len({r.identity for r in records})


async def produce_seconds(bootstrap: str, records: Sequence[codec.KafkaRecord], topic: str, deadline_s: float) -> float:
    """Seconds for a raw aiokafka producer (acks=all, the bridge's settings) to write ``records``."""
    from aiokafka import AIOKafkaProducer
    from tern.cloud.config import BridgeConfig

    cfg = BridgeConfig()
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=False,
        linger_ms=cfg.linger_ms, max_batch_size=cfg.max_batch_bytes, request_timeout_ms=cfg.request_timeout_ms,
    )
    await asyncio.wait_for(producer.start(), deadline_s)
    try:
        await asyncio.wait_for(producer.partitions_for(topic), deadline_s)
        start = time.perf_counter()
        futures = [await producer.send(topic, r.value, key=r.key, headers=list(r.headers)) for r in records]
        await asyncio.wait_for(asyncio.gather(*futures), deadline_s)
        return time.perf_counter() - start
    finally:
        await producer.stop()


def kafka_records(batches: Sequence[Batch], topic: str) -> list[codec.KafkaRecord]:
    """The records the bridge writes for ``batches`` (same keys, headers and value sizes)."""
    now = 1_795_456_739_000
    return [codec.kafka_record(r, b.gateway, topic, now) for b in batches for r in b.readings]


def bench_bridge(lab: Lab) -> list[Measurement]:
    """Records/s from batches on the cloud broker until confirmed by the real bridge, vs aiokafka."""
    gateway_id = f"bench-gw-{uuid.uuid4().hex[:6]}"
    batches = sample_batches(gateway_id, lab.sizes.bridge_batches)
    count = len(batches) * BATCH_READINGS
    rounds = [(baseline_round(lab, batches), bridge_round(lab, batches)) for _ in range(lab.sizes.network_repeats)]
    base_rates = [rate(count, base) for base, _ in rounds]
    tern_rates = [rate(count, tern[0]) for _, tern in rounds]
    base_s = min(base for base, _ in rounds)
    seconds, details = min(tern for _, tern in rounds)
    return [Measurement(
        name="bridge.kafka", benchmark="bridge", unit="records/s",
        figure=median(tern_rates), baseline=median(base_rates), rounds=tern_rates, baseline_rounds=base_rates,
        target="ratio >= 0.8",
        what=f"{len(batches)} batches of {BATCH_READINGS} on the cloud broker -> BridgeThread -> Kafka, until confirmed",
        baseline_what="raw aiokafka producer, acks=all, same records (send all, then wait)",
        count=count, details={"seconds": round(seconds, 3), "baseline_seconds": round(base_s, 3),
                              "rounds": lab.sizes.network_repeats, "kafka": lab.kafka_kind, **details},
    )]


def baseline_round(lab: Lab, batches: Sequence[Batch]) -> float:
    """Seconds for a raw aiokafka producer to write the records of ``batches`` to a fresh topic."""
    (topic,) = lab.kafka_topics("baseline")
    return asyncio.run(produce_seconds(lab.kafka(), kafka_records(batches, topic), topic, lab.sizes.deadline_s))


def bridge_round(lab: Lab, batches: Sequence[Batch]) -> tuple[float, dict[str, Any]]:
    """One round on a fresh broker, bridge and topic: seconds until every batch is confirmed."""
    readings_topic, deadletter_topic = lab.kafka_topics("readings", "deadletter")
    gateway_id = batches[0].gateway
    count = len(batches) * BATCH_READINGS
    payloads = [(topics.batch_topic(gateway_id), codec.encode_batch(b)) for b in batches]
    with ExitStack() as stack:
        cloud = lab.mosquitto(stack, "cloud")
        bridge = start_bridge(lab, stack, cloud, readings_topic, deadletter_topic, "bridge")
        sender = BatchSender(cloud.host, cloud.port, gateway_id, len(batches))
        stack.callback(sender.close)
        start = time.perf_counter()
        sender.publish_all(payloads)
        wait_event(sender.done, lab.sizes.deadline_s, f"bridge confirming {len(batches)} batches")
        seconds = time.perf_counter() - start
        stats = bridge.stats()
    written, distinct = kafka_record_count(lab.kafka(), readings_topic, count, lab.sizes.deadline_s)
    if distinct < count:
        raise BenchError(f"bridge: {distinct} distinct readings in Kafka after {count} confirmed")
    return seconds, {"records_in_kafka": written, "distinct_in_kafka": distinct,
                     "bridge": {k: stats[k] for k in ("records_written", "batches_confirmed", "retries")}}
