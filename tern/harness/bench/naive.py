"""Baselines of issue 13: the naive per-message bridge, live and draining a backlog.

The naive bridge (:func:`tern.harness.bench.proc.run_naive`, a process of its own) is what a
first attempt looks like: a paho subscriber that, per message, decodes the reading, writes it
with one aiokafka ``send_and_wait`` (acks=all) and only then PUBACKs it by hand. It is
lossless, and slow: one Kafka round trip per reading.

- live: the node fleet publishes while the naive bridge runs; readings/s until the last one
  is in Kafka;
- drain: the readings wait in the naive bridge's persistent session on the broker (it was
  subscribed, then went away); readings/s from its start until the last one is in Kafka.

Both are measured once per run (in rounds) and reused by every stage that compares with them.
"""

from __future__ import annotations

import time
import uuid
from contextlib import ExitStack
from typing import Any

from tern.harness.bench.common import median, run_rounds
from tern.harness.bench.kafka_check import check_topic
from tern.harness.bench.lab import Lab
from tern.harness.bench.nodes import NodeFleet, fleet_messages
from tern.harness.bench.proc import Child

DEVICES = 100


def naive_config(lab: Lab, broker: Any, topic: str, client_id: str) -> dict[str, Any]:
    """The naive child's settings."""
    return {"mqtt_host": broker.host, "mqtt_port": broker.port, "bootstrap": lab.kafka(), "topic": topic,
            "client_id": client_id}


def naive_round(lab: Lab, drain: bool) -> dict[str, Any]:
    """One round on a fresh broker and topic: readings/s and the child's resources."""
    count = lab.sizes.naive_readings
    messages = fleet_messages(count, DEVICES)
    (topic,) = lab.kafka_topics("naive")
    client_id = f"bench-naive-{uuid.uuid4().hex[:6]}"
    with ExitStack() as stack:
        broker = lab.mosquitto(stack, "naive")
        fleet = NodeFleet(broker.host, broker.port, min(lab.sizes.connections, 10))
        stack.callback(fleet.close)
        if drain:
            # Subscribe once and go away: the broker keeps the session and queues the backlog.
            Child("naive", naive_config(lab, broker, topic, client_id)).stop()
            fleet.publish_all(messages)
            fleet.wait_published(lab.sizes.deadline_s)
            child = Child("naive", naive_config(lab, broker, topic, client_id))
            stack.callback(child.stop)
            start = child.ready_t
        else:
            child = Child("naive", naive_config(lab, broker, topic, client_id))
            stack.callback(child.stop)
            start = time.time()
            fleet.publish_all(messages)
        end = child.wait_for(lambda s: s.get("written", 0) >= count, lab.sizes.deadline_s,
                             f"naive bridge {'draining' if drain else 'live'} ({count} readings)")
        resources = child.resources()
    check = check_topic(lab.kafka(), topic, count, lab.sizes.deadline_s)
    check.require(count, "naive bridge")
    seconds = max(end - start, 1e-6)
    return {"rate": count / seconds, "seconds": seconds, "cpu_s": resources["cpu_s"],
            "peak_rss_mib": resources["peak_rss_mib"], "count": count, **check.as_json()}


def naive_rates(lab: Lab) -> dict[str, Any]:
    """{"live": [...rounds], "drain": [...rounds]}, measured on first use and cached for the run."""
    if "naive" not in lab.cache:
        lab.cache["naive"] = {
            "live": run_rounds(lab.sizes, lambda i: naive_round(lab, drain=False)),
            "drain": run_rounds(lab.sizes, lambda i: naive_round(lab, drain=True)),
        }
    return lab.cache["naive"]  # type: ignore[return-value]


def naive_rate(lab: Lab, kind: str) -> tuple[float, list[float]]:
    """(median readings/s, every round's) of the naive bridge, ``kind`` live or drain."""
    rounds = [r["rate"] for r in naive_rates(lab)[kind]]
    return median(rounds), rounds
