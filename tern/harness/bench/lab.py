"""The lab: brokers, Kafka and the pub/sub baseline shared by the stages of one run."""

from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

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

    from tern.harness.kafka_cluster import ApacheKafkaCluster
    from tern.harness.stack import Mosquitto


#: How the ``apache.*`` rows' Kafka is described in the report.
APACHE_LABEL = "Apache Kafka, 3 KRaft nodes, RF 3, min ISR 2"


class Lab:
    """Working folder, process cleanup, Kafka and cached baselines for one ``make bench`` run.

    The run's default Kafka (Tansu, or ``TERN_KAFKA``/``KAFKA_BOOTSTRAP``) serves every stage;
    the ``apache`` stage also needs a 3-node Apache Kafka cluster (:meth:`apache`), started once
    per run, and points :meth:`kafka` at it while it measures (:meth:`on_apache`), so the
    stages' round functions run unchanged against either broker.
    """

    def __init__(self, sizes: Sizes, workdir: Path, *, explicit: Sequence[str] = (),
                 apache_bootstrap: str | None = None) -> None:
        self.sizes = sizes
        self.workdir = workdir
        self.stack = ExitStack()
        self._bootstrap: str | None = None
        self._default_kind = ""
        #: Stages named with ``--only`` (a quick run still runs the apache stage when named).
        self.explicit = frozenset(explicit)
        #: An already running Apache Kafka cluster to use (the test suite's), else started here.
        self._apache_bootstrap = apache_bootstrap
        self._apache_kind = f"{APACHE_LABEL} (given)" if apache_bootstrap else ""
        self._on_apache = False
        #: Seconds the Apache Kafka cluster took to start (0 when it was given or reused).
        self.apache_start_s = 0.0
        self._apache_cluster: "ApacheKafkaCluster | None" = None
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

    def mosquitto(self, stack: ExitStack, name: str, **options: Any) -> "Mosquitto":
        """Start a private mosquitto (``options`` as :class:`Mosquitto` takes them), stopped when ``stack`` closes."""
        from tern.harness.stack import Mosquitto

        broker = Mosquitto(self.folder(name), **options).start()
        stack.callback(broker.stop)
        return broker

    @property
    def kafka_kind(self) -> str:
        """Which Kafka the rows were measured on: the default one, and the apache stage's if it ran."""
        parts = [self._default_kind] if self._default_kind else []
        if self._apache_kind and self._apache_kind != self._default_kind:
            parts.append(f"`apache.*` rows: {self._apache_kind}")
        return "; ".join(parts)

    @property
    def current_kind(self) -> str:
        """The Kafka :meth:`kafka` points at now (for a stage's details)."""
        return self._apache_kind if self._on_apache else self._default_kind

    def kafka(self) -> str:
        """Bootstrap of the Kafka the current stage writes to: inside :meth:`on_apache` the Apache
        cluster, otherwise ``KAFKA_BOOTSTRAP`` or the harness's Kafka (``TERN_KAFKA``), started on
        first use."""
        if self._on_apache:
            return self.apache()
        if self._bootstrap is None:
            from tern.harness.kafka import start_kafka
            from tern.harness.stack import kafka_bootstrap_from_env

            external = kafka_bootstrap_from_env()
            if external:
                self._bootstrap, self._default_kind = external, f"KAFKA_BOOTSTRAP={external}"
            else:
                kafka = start_kafka(self.folder("kafka"), self.default_kind())
                self.stack.callback(kafka.close)
                label = APACHE_LABEL if kafka.kind == "apache" else "tansu"
                self._bootstrap, self._default_kind = kafka.bootstrap, f"{label} (private, loopback)"
        return self._bootstrap

    @staticmethod
    def default_kind() -> str:
        """``tansu`` or ``apache``: what ``TERN_KAFKA`` asks for (read by tern.harness.kafka)."""
        from tern.harness.kafka import kafka_kind

        return kafka_kind()

    def default_is_apache(self) -> bool:
        """Whether the run's default Kafka is itself a harness-started Apache Kafka cluster."""
        from tern.harness.stack import kafka_bootstrap_from_env

        return not kafka_bootstrap_from_env() and self.default_kind() == "apache"

    def has_apache(self) -> bool:
        """Whether an Apache Kafka cluster is there without starting one (given, or the default)."""
        return self._apache_bootstrap is not None or self.default_is_apache()

    def apache(self) -> str:
        """Bootstrap of the run's 3-node Apache Kafka cluster (RF 3, min ISR 2), started on first use.

        Reuses the default Kafka when that is already one (``TERN_KAFKA=apache``), or the cluster
        given to the constructor. Benchmarks get the full JIT (``fast_start=False``): the C1-only
        start the tests use saves seconds at a throughput cost the figures would carry.
        """
        if self._apache_bootstrap is None:
            if self.default_is_apache():
                self._apache_bootstrap = self.kafka()
                self._apache_kind = self._default_kind
            else:
                from tern.harness.kafka_cluster import ApacheKafkaCluster

                cluster = ApacheKafkaCluster(self.folder("apache-kafka"), fast_start=False).start()
                self._apache_cluster = cluster
                self.stack.callback(self.stop_apache)
                self.apache_start_s = cluster.start_seconds
                self._apache_bootstrap = cluster.bootstrap
                self._apache_kind = f"{APACHE_LABEL} (private, loopback)"
        return self._apache_bootstrap

    def stop_apache(self) -> None:
        """Stop the Apache Kafka cluster this lab started (its three JVMs would only take CPU and
        memory from the stages after it); a later :meth:`apache` would start a new one."""
        cluster, self._apache_cluster = self._apache_cluster, None
        if cluster is not None:
            cluster.close()
            self._apache_bootstrap = None

    @contextmanager
    def on_apache(self) -> Iterator[str]:
        """Within: :meth:`kafka` and :meth:`kafka_topics` use the Apache Kafka cluster; yields its bootstrap."""
        bootstrap = self.apache()
        self._on_apache = True
        try:
            yield bootstrap
        finally:
            self._on_apache = False

    def kafka_topics(self, *roles: str) -> list[str]:
        """Fresh topic names (unique to this run), created on the Kafka broker."""
        from tern.harness.stack import ensure_topics

        suffix = uuid.uuid4().hex[:8]
        names = [f"bench.{role}.{suffix}" for role in roles]
        asyncio.run(ensure_topics(self.kafka(), names))
        return names

    def pubsub_baseline(self, count: int) -> float:
        """Readings/s of paho publisher -> mosquitto -> paho subscriber, all in this process,
        measured once per count (the ``e2e`` stage's baseline; ``gateway`` runs its baseline
        subscriber in a process of its own, :func:`tern.harness.bench.live.pubsub_round`)."""
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
