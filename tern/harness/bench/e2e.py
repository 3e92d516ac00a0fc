"""Stage 5, end to end: paho node -> gateway -> bridge -> Kafka vs the pub/sub baseline."""

from __future__ import annotations

import time
from contextlib import ExitStack
from typing import Any, Sequence

from tern.harness.bench.bridge import kafka_record_count, start_bridge
from tern.harness.bench.common import (
    BenchError,
    Measurement,
    MqttPeer,
    median,
    rate,
    telemetry_messages,
    wait_until,
)
from tern.harness.bench.gateway import start_gateway
from tern.harness.bench.lab import Lab


def bench_e2e(lab: Lab) -> list[Measurement]:
    """Readings/s from a paho node through gateway, bridge and Kafka, vs mosquitto pub/sub."""
    count = lab.sizes.readings
    baseline = lab.pubsub_baseline(count)
    messages = telemetry_messages(count)
    rounds = [e2e_round(lab, messages) for _ in range(lab.sizes.network_repeats)]
    rates = [rate(count, r[0]) for r in rounds]
    seconds, details = min(rounds)
    return [Measurement(
        name="e2e.node_to_kafka", benchmark="e2e", unit="readings/s",
        figure=median(rates), baseline=baseline, rounds=rates,
        what="paho node -> mosquitto -> Gateway -> mosquitto -> BridgeThread -> Kafka",
        baseline_what="paho node -> mosquitto -> plain paho QoS 1 subscriber (both in the bench process)",
        count=count, details={"seconds": round(seconds, 3), "rounds": lab.sizes.network_repeats,
                              "kafka": lab.current_kind, **details},
    )]


def e2e_round(lab: Lab, messages: Sequence[tuple[str, bytes]]) -> tuple[float, dict[str, Any]]:
    """One round on fresh brokers, outbox, bridge and topic: seconds until every reading is in Kafka."""
    count = len(messages)
    readings_topic, deadletter_topic = lab.kafka_topics("e2e", "e2e-deadletter")
    with ExitStack() as stack:
        local, cloud = lab.mosquitto(stack, "local"), lab.mosquitto(stack, "cloud")
        bridge = start_bridge(lab, stack, cloud, readings_topic, deadletter_topic, "e2e")
        gateway = start_gateway(lab, stack, local, cloud, "e2e")
        publisher = MqttPeer(local.host, local.port, "bench-node")
        stack.callback(publisher.close)
        start = time.perf_counter()
        publisher.publish_all(messages)
        # records_written counts records Kafka has acknowledged (acks=all).
        wait_until(lambda: bridge.stats()["records_written"] >= count, lab.sizes.deadline_s,
                   f"end to end ({count} readings into Kafka)")
        seconds = time.perf_counter() - start
        uplink = gateway.uplink.stats()
    written, distinct = kafka_record_count(lab.kafka(), readings_topic, count, lab.sizes.deadline_s)
    if distinct < count:
        raise BenchError(f"end to end: {distinct} distinct readings in Kafka, expected {count}")
    return seconds, {"records_in_kafka": written, "distinct_in_kafka": distinct,
                     "batches_confirmed": uplink["batches_confirmed"]}
