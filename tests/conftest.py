"""Shared fixtures: real brokers on loopback, started per test (mosquitto) or per session (Kafka).

The Kafka is Tansu, or a 3-node Apache Kafka cluster with ``TERN_KAFKA=apache`` (read by
tern.harness.kafka). With ``KAFKA_BOOTSTRAP`` set, the Kafka fixtures use that cluster instead;
every test then writes to topics whose names are unique to the run, so runs never mix.
The ``apache_kafka`` fixture is always a 3-node Apache Kafka cluster, started once per session
(the tests marked ``apache_kafka`` share it, on one xdist worker).
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tern.harness.kafka import KafkaService, kafka_kind, start_kafka
from tern.harness.kafka_cluster import ApacheKafkaCluster
from tern.harness.stack import Mosquitto, ensure_topics, kafka_bootstrap_from_env


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[..., Mosquitto]]:
    """Start as many private mosquittos as a test needs; all are stopped afterwards."""
    started: list[Mosquitto] = []

    def start(name: str = "mosquitto", **options) -> Mosquitto:
        broker = Mosquitto(tmp_path / f"{name}-{len(started)}", **options).start()
        started.append(broker)
        return broker

    yield start
    for broker in started:
        broker.stop()


@pytest.fixture
def mosquitto(mosquitto_factory: Callable[..., Mosquitto]) -> Mosquitto:
    """One private mosquitto on a free loopback port."""
    return mosquitto_factory()


@pytest.fixture(scope="session")
def apache_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApacheKafkaCluster]:
    """A 3-node Apache Kafka cluster (KRaft, RF 3, min ISR 2), started once per session."""
    cluster = ApacheKafkaCluster(tmp_path_factory.mktemp("apache-kafka")).start()
    print(f"\nApache Kafka cluster ready in {cluster.start_seconds:.1f} s at {cluster.bootstrap}")
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="session")
def kafka_service(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaService | None]:
    """The harness's Kafka (``TERN_KAFKA``), or None when ``KAFKA_BOOTSTRAP`` names an external one."""
    if kafka_bootstrap_from_env():
        yield None
        return
    if kafka_kind() == "apache":
        yield request.getfixturevalue("apache_kafka")  # one cluster per session, shared
        return
    service = start_kafka(tmp_path_factory.mktemp("tansu"), "tansu")
    try:
        yield service
    finally:
        service.close()


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_service: KafkaService | None) -> str:
    """Bootstrap address of a Kafka-protocol broker: ``KAFKA_BOOTSTRAP`` or the harness's Kafka."""
    external = kafka_bootstrap_from_env()
    if external:
        return external
    assert kafka_service is not None
    return kafka_service.bootstrap


@pytest.fixture
def kafka_topics(kafka_bootstrap: str, kafka_service: KafkaService | None) -> dict[str, str]:
    """Fresh Kafka topic names for one test (readings, status, deadletter), already created."""
    suffix = uuid.uuid4().hex[:8]
    names = {
        "readings": f"test.readings.{suffix}",
        "status": f"test.status.{suffix}",
        "deadletter": f"test.deadletter.{suffix}",
    }
    replication = kafka_service.replication_factor if kafka_service else 1
    min_insync = kafka_service.min_insync_replicas if kafka_service and replication > 1 else None
    asyncio.run(ensure_topics(kafka_bootstrap, list(names.values()), replication=replication, min_insync=min_insync))
    return names
