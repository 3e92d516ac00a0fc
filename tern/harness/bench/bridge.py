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
    skipped,
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
    """Records/s from batches on the cloud broker until confirmed by the real bridge, vs aiokafka
    (issue 13: >= 0.8x) and vs a plain librdkafka producer (issue 27: >= 0.3x)."""
    return bridge_measurements(lab, "", {"aiokafka": "ratio >= 0.8", "librdkafka": "ratio >= 0.3"})


def bridge_measurements(lab: Lab, prefix: str, targets: dict[str, str]) -> list[Measurement]:
    """``<prefix>bridge.kafka`` (vs aiokafka) and ``<prefix>bridge.vs_librdkafka`` on ``lab.kafka()``.

    Each round writes the same records three ways, on fresh topics: raw aiokafka, librdkafka,
    then the bridge (batches on a fresh cloud mosquitto until confirmed), so noise on the
    shared machine falls on all three alike. ``targets`` by baseline name; absent: no target.
    """
    from tern.harness.bench import rdkafka

    gateway_id = f"bench-gw-{uuid.uuid4().hex[:6]}"
    batches = sample_batches(gateway_id, lab.sizes.bridge_batches)
    count = len(batches) * BATCH_READINGS
    no_rdkafka = rdkafka.missing()
    rounds = []
    for _ in range(lab.sizes.network_repeats):
        aio_s = baseline_round(lab, batches)
        rd_s = None if no_rdkafka else librdkafka_round(lab, batches)
        rounds.append((aio_s, rd_s, bridge_round(lab, batches)))
    aio_rates = [rate(count, aio) for aio, _, _ in rounds]
    tern_rates = [rate(count, tern[0]) for _, _, tern in rounds]
    seconds, details = min(tern for _, _, tern in rounds)
    what = f"{len(batches)} batches of {BATCH_READINGS} on the cloud broker -> BridgeThread -> Kafka, until confirmed"
    common = {"seconds": round(seconds, 3), "rounds": lab.sizes.network_repeats, "kafka": lab.current_kind, **details}
    out = [Measurement(
        name=f"{prefix}bridge.kafka", benchmark="bridge", unit="records/s",
        figure=median(tern_rates), baseline=median(aio_rates), rounds=tern_rates, baseline_rounds=aio_rates,
        target=targets.get("aiokafka"), what=what,
        baseline_what="raw aiokafka producer, acks=all, same records (send all, then wait)",
        count=count, details={**common, "baseline_seconds": round(min(aio for aio, _, _ in rounds), 3)},
    )]
    rd_what = "plain librdkafka producer (confluent-kafka, its defaults, acks=all, no idempotence), same records, until flush()"
    if no_rdkafka:
        out.append(skipped(f"{prefix}bridge.vs_librdkafka", "bridge", "records/s", what, rd_what, no_rdkafka,
                           targets.get("librdkafka")))
        return out
    rd_rates = [rate(count, rd) for _, rd, _ in rounds]
    out.append(Measurement(
        name=f"{prefix}bridge.vs_librdkafka", benchmark="bridge", unit="records/s",
        figure=median(tern_rates), baseline=median(rd_rates), rounds=tern_rates, baseline_rounds=rd_rates,
        target=targets.get("librdkafka"), what=what, baseline_what=rd_what, count=count,
        details={**common, "baseline_seconds": round(min(rd for _, rd, _ in rounds), 3),
                 "client": rdkafka.version(), "settings": rdkafka.SETTINGS},
    ))
    return out


def baseline_round(lab: Lab, batches: Sequence[Batch]) -> float:
    """Seconds for a raw aiokafka producer to write the records of ``batches`` to a fresh topic."""
    (topic,) = lab.kafka_topics("baseline")
    return asyncio.run(produce_seconds(lab.kafka(), kafka_records(batches, topic), topic, lab.sizes.deadline_s))


def librdkafka_round(lab: Lab, batches: Sequence[Batch]) -> float:
    """Seconds for a plain librdkafka producer to write the records of ``batches`` to a fresh topic."""
    from tern.harness.bench import rdkafka

    (topic,) = lab.kafka_topics("librdkafka")
    return rdkafka.produce_seconds(lab.kafka(), kafka_records(batches, topic), topic, lab.sizes.deadline_s)


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
