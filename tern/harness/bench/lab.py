"""The lab: brokers, Kafka and the pub/sub baseline shared by the stages of one run."""

from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from tern.core import topics
from tern.harness.bench.common import (
    CountingSubscriber,
    MqttPeer,
    Sizes,
    rate,
    telemetry_messages,
    wait_event,
)

if TYPE_CHECKING:

    from tern.harness.stack import Mosquitto


class Lab:
    """Working folder, process cleanup, Kafka and cached baselines for one ``make bench`` run."""

    def __init__(self, sizes: Sizes, workdir: Path) -> None:
        self.sizes = sizes
        self.workdir = workdir
        self.stack = ExitStack()
        self._bootstrap: str | None = None
        self.kafka_kind = ""
        self._pubsub: dict[int, float] = {}
        #: Baselines and figures one stage measures and a later one reuses (naive rates, capacity).
        self.cache: dict[str, object] = {}
        #: Series for the figures of docs/ (drain progress, latency samples), by name.
        self.series: dict[str, object] = {}

    def folder(self, name: str) -> Path:
        """A fresh sub-folder of the working folder."""
        path = self.workdir / f"{name}-{uuid.uuid4().hex[:6]}"
        path.mkdir(parents=True)
        return path

    def mosquitto(self, stack: ExitStack, name: str) -> "Mosquitto":
        """Start a private mosquitto, stopped when ``stack`` closes."""
        from tern.harness.stack import Mosquitto

        broker = Mosquitto(self.folder(name)).start()
        stack.callback(broker.stop)
        return broker

    def kafka(self) -> str:
        """Bootstrap of ``KAFKA_BOOTSTRAP`` or of the harness's Kafka (``TERN_KAFKA``), started on first use."""
        if self._bootstrap is None:
            from tern.harness.kafka import start_kafka
            from tern.harness.stack import kafka_bootstrap_from_env

            external = kafka_bootstrap_from_env()
            if external:
                self._bootstrap, self.kafka_kind = external, f"KAFKA_BOOTSTRAP={external}"
            else:
                kafka = start_kafka(self.folder("kafka"))
                self.stack.callback(kafka.close)
                label = "Apache Kafka, 3 nodes, RF 3" if kafka.kind == "apache" else "tansu"
                self._bootstrap, self.kafka_kind = kafka.bootstrap, f"{label} (private, loopback)"
        return self._bootstrap

    def kafka_topics(self, *roles: str) -> list[str]:
        """Fresh topic names (unique to this run), created on the Kafka broker."""
        from tern.harness.stack import ensure_topics

        suffix = uuid.uuid4().hex[:8]
        names = [f"bench.{role}.{suffix}" for role in roles]
        asyncio.run(ensure_topics(self.kafka(), names))
        return names

    def pubsub_baseline(self, count: int) -> float:
        """Readings/s of paho publisher -> mosquitto -> paho subscriber, measured once per count."""
        if count not in self._pubsub:
            self._pubsub[count] = measure_pubsub(self, count)
        return self._pubsub[count]

    def close(self) -> None:
        """Stop every process the run started."""
        self.stack.close()


def measure_pubsub(lab: Lab, count: int) -> float:
    """Readings/s of paho QoS 1 publisher -> mosquitto -> plain paho QoS 1 subscriber (best round)."""
    messages = telemetry_messages(count)
    return rate(count, min(pubsub_seconds(lab, messages) for _ in range(lab.sizes.network_repeats)))


def pubsub_seconds(lab: Lab, messages: Sequence[tuple[str, bytes]]) -> float:
    """One round of the pub/sub baseline on a fresh mosquitto: seconds until all are received."""
    count = len(messages)
    with ExitStack() as stack:
        broker = lab.mosquitto(stack, "pubsub")
        subscriber = CountingSubscriber(broker.host, broker.port, topics.TELEMETRY_FILTER, count)
        stack.callback(subscriber.close)
        publisher = MqttPeer(broker.host, broker.port, "bench-node")
        stack.callback(publisher.close)
        start = time.perf_counter()
        publisher.publish_all(messages)
        wait_event(subscriber.done, lab.sizes.deadline_s, f"pub/sub baseline ({count} readings)")
        return time.perf_counter() - start
