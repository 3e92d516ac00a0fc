"""Shared fixtures: real brokers on loopback, started per test (mosquitto) or per session (Kafka).

The Kafka is Tansu, or a 3-node Apache Kafka cluster with ``TERN_KAFKA=apache`` (read by
tern.harness.kafka). With ``KAFKA_BOOTSTRAP`` set, the Kafka fixtures use that cluster instead;
every test then writes to topics whose names are unique to the run, so runs never mix.
The ``apache_kafka`` fixture is always a 3-node Apache Kafka cluster, started once per session
(the tests marked ``apache_kafka`` share it, on one xdist worker).
"""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, settings

from tern.cloud.bridge import BridgeThread
from tern.edge.config import GatewayConfig
from tern.edge.service import Gateway
from tern.harness.kafka import KafkaService, kafka_kind, start_kafka
from tern.harness.kafka_cluster import ApacheKafkaCluster
from tern.harness.observe import KafkaTail
from tern.harness.stack import PORT_BLOCK_ENV, Mosquitto, ensure_topics, free_port, kafka_bootstrap_from_env

from tern.harness.faultproxy import FaultProxy
from helpers import FakeGateway, ProxiedTansu, bridge_config


def _port_block(worker: str) -> str:
    """Ports for one pytest-xdist worker (gw0, gw1, ...; "" without xdist): 2,000 of its own,
    below the kernel's ephemeral range, so brokers of parallel tests never meet."""
    match = re.fullmatch(r"gw(\d+)", worker)
    index = int(match.group(1)) + 1 if match else 0
    low = 12000 + 2000 * index
    return f"{low}-{low + 1999}"


# Property tests run beside brokers and JVMs on two cores: how fast hypothesis can generate
# inputs, or how long one example takes, says nothing about the property. Correctness checks
# stay on; the timing ones would only make a loaded run red.
settings.register_profile("tern", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("tern")

# Set at import, before any fixture starts a broker; subprocesses (the demo, the bench, the
# emulator) inherit it.
os.environ.setdefault(PORT_BLOCK_ENV, _port_block(os.environ.get("PYTEST_XDIST_WORKER", "")))


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


#: The SCRAM-SHA-512 user the session's Apache Kafka cluster is formatted with.
APACHE_KAFKA_SCRAM_USER = "tern-bridge"


@pytest.fixture(scope="session")
def apache_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApacheKafkaCluster]:
    """A 3-node Apache Kafka cluster (KRaft, RF 3, min ISR 2), started once per session.

    Besides PLAINTEXT it has a SASL_SSL listener (``sasl_bootstrap``, CA ``ca_file``) with one
    SCRAM-SHA-512 user, ``APACHE_KAFKA_SCRAM_USER`` (password in ``scram_users``): the SASL
    tests need no cluster of their own.
    """
    cluster = ApacheKafkaCluster(tmp_path_factory.mktemp("apache-kafka"),
                                 scram_users={APACHE_KAFKA_SCRAM_USER: f"pw-{uuid.uuid4().hex}"}).start()
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


@pytest.fixture
def concurrent_writers_kafka(apache_kafka: ApacheKafkaCluster) -> tuple[str, dict[str, str]]:
    """(bootstrap, fresh topics) for tests where several bridges write the same partitions at
    once: the session's Apache Kafka cluster (RF 3, min ISR 2), whatever ``TERN_KAFKA`` says.

    Tansu's memory storage was seen to lose or skip records that concurrent producers wrote to
    one partition, with every write acknowledged: 10 of 3,200 readings (three bridges on a
    shared subscription, this suite), 400 of 150,000 (the bench's scale-out), never with one
    producer. Such tests must use the tests' marker and group of the cluster's worker.
    """
    suffix = uuid.uuid4().hex[:8]
    names = {role: f"test.{role}.{suffix}" for role in ("readings", "status", "deadletter")}
    asyncio.run(ensure_topics(apache_kafka.bootstrap, list(names.values()), replication=apache_kafka.replication_factor,
                              min_insync=apache_kafka.min_insync_replicas))
    return apache_kafka.bootstrap, names


@pytest.fixture
def command_topics(kafka_bootstrap: str, kafka_topics: dict[str, str]) -> dict[str, str]:
    """:func:`kafka_topics` and fresh command topics (commands, results), already created."""
    suffix = uuid.uuid4().hex[:8]
    names = dict(kafka_topics, commands=f"test.commands.{suffix}", results=f"test.results.{suffix}")
    asyncio.run(ensure_topics(kafka_bootstrap, [names["commands"], names["results"]]))
    return names


# --- the gateway on two brokers (helpers.gateway) ----------------------------------------


@pytest.fixture
def brokers(mosquitto_factory: Callable[..., Mosquitto]) -> tuple[Mosquitto, Mosquitto]:
    """Two private mosquittos: (local, cloud)."""
    return mosquitto_factory("local"), mosquitto_factory("cloud")


@pytest.fixture
def outbox_path(tmp_path: Path) -> Path:
    """Where a test's gateway keeps its outbox (not created)."""
    return tmp_path / "gw" / "outbox.db"


def _ender(item: Any) -> Callable[[], None]:
    """How :func:`cleanup` ends ``item``: a bare paho client is disconnected and its loop stopped,
    gateways, fault proxies and whatever has no ``close()`` (an emulated node's process) are
    stopped, anything else is closed."""
    if isinstance(item, mqtt.Client):
        return lambda: (item.disconnect(), item.loop_stop())
    if isinstance(item, (Gateway, FaultProxy)) or not callable(getattr(item, "close", None)):
        end = getattr(item, "stop", None)
        if not callable(end):
            # Refused when registered: a teardown that cannot end it would leave it running unseen.
            raise TypeError(f"cleanup cannot end {item!r}: it has neither close() nor stop()")
        return end
    return item.close


@pytest.fixture
def cleanup() -> Iterator[Callable[[Any], None]]:
    """Close nodes and stubs, stop gateways, fault proxies and emulated nodes, last in first out,
    even when a test fails halfway."""
    enders: list[Callable[[], None]] = []
    yield lambda item: enders.append(_ender(item))
    for end in reversed(enders):
        try:
            end()
        except Exception:
            pass


# --- the bridge and Kafka (helpers.kafka) -----------------------------------------------


@pytest.fixture
def gateway_factory() -> Iterator[Callable[..., FakeGateway]]:
    """Make stand-ins for a gateway's cloud side (``make(broker, gateway, persistent=False)``); all closed afterwards."""
    made: list[FakeGateway] = []

    def make(broker: Mosquitto, gateway: str, persistent: bool = False) -> FakeGateway:
        gw = FakeGateway(broker, gateway, persistent)
        made.append(gw)
        return gw

    yield make
    for gw in made:
        gw.close()


@pytest.fixture
def proxied_kafka(tmp_path: Path) -> Iterator[tuple[FaultProxy, str]]:
    """A private Tansu behind a fault proxy; yields (proxy, bootstrap through the proxy).

    Always a private Tansu, also when KAFKA_BOOTSTRAP names a real cluster: a fault proxy
    only works if the broker advertises the proxy's address.
    """
    tansu_port = free_port()
    proxy = FaultProxy("127.0.0.1", tansu_port).start()
    tansu = ProxiedTansu(tmp_path / "tansu", advertised_port=proxy.port)
    tansu.port = tansu_port
    try:
        tansu.start()
        yield proxy, proxy.address
    finally:
        tansu.stop()
        proxy.stop()


@pytest.fixture
def firmware_pipeline(
    tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto], kafka_bootstrap: str, kafka_topics: dict[str, str]
) -> Iterator[dict[str, Any]]:
    """For the real firmware: Pi broker behind a fault proxy, cloud broker, gateway, bridge, and a
    Kafka tail; yields {"proxy", "tail", "tmp", "kafka", "status_topic"}."""
    pi = mosquitto_factory("pi")
    cloud = mosquitto_factory("cloud")
    gateway = Gateway(
        GatewayConfig(gateway_id="gw-rst", local_broker=pi.address, cloud_broker=cloud.address, outbox_path=tmp_path / "outbox.db")
    )
    bridge = BridgeThread(bridge_config(cloud, kafka_bootstrap, kafka_topics, name="rst"))
    with gateway, bridge, FaultProxy("127.0.0.1", pi.port) as proxy:
        tail = KafkaTail(kafka_bootstrap, kafka_topics["readings"]).start()
        try:
            yield {"proxy": proxy, "tail": tail, "tmp": tmp_path, "kafka": kafka_bootstrap, "status_topic": kafka_topics["status"]}
        finally:
            tail.stop()


#: Modules whose every test belongs to ``make test-quick`` (no firmware, no long outages).
QUICK_MODULES = {
    "test_codec.py", "test_outbox.py", "test_serial_protocols.py", "test_redact.py", "test_pinmap.py",
    "test_kafka_sink.py", "test_layout.py", "test_status_order.py", "test_dedup.py", "test_ports.py",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the quick tests, and start the long ones first.

    Under pytest-xdist a long test that starts last keeps one worker busy after the others
    are done; handed out first, the short tests fill the other workers around it.
    """
    for item in items:
        if item.path.name in QUICK_MODULES or "config" in item.name:
            item.add_marker(pytest.mark.quick)
    items.sort(key=lambda item: 0 if item.get_closest_marker("slow") or item.get_closest_marker("xdist_group") else 1)
