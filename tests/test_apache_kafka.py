"""Tern on a real Apache Kafka: a 3-node KRaft cluster (tests/conftest.py ``apache_kafka``).

Auto-creation is off there, as in production, so the bridge must create its topics (RF 3,
min.insync.replicas 2) or stop with one line saying which is missing. Every check reads the
outcome back from Kafka (admin metadata and configs, records) or from the gateway's outbox.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError

from tern.cloud.bridge import BridgeError, BridgeThread
from tern.cloud.consume import read_all
from tern.edge.service import Gateway
from tern.harness.kafka_cluster import ApacheKafkaCluster
from helpers import wait_until
from helpers.apache import apache_bridge_config as bridge_config, fresh_names
from helpers.pipeline import assert_complete_in_order, by_device, feed, outbox_empty, pipeline_gateway_config as gateway_config

pytestmark = [pytest.mark.apache_kafka, pytest.mark.xdist_group("apache_kafka")]


async def describe(bootstrap: str, topics: list[str], timeout: float = 15.0) -> tuple[dict[str, list[dict]], dict[str, dict[str, str]]]:
    """(topic -> partitions metadata, topic -> its configs) as the cluster reports them.

    A topic just created may not be in the metadata of the broker asked yet: asked again
    until every topic has its partitions (bounded).
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        deadline = time.monotonic() + timeout
        while True:
            metadata = {t["topic"]: t["partitions"] for t in await admin.describe_topics(topics)}
            if all(metadata.get(t) for t in topics) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t) for t in topics])
        configs: dict[str, dict[str, str]] = {}
        for response in responses:
            for resource in response.resources:
                configs[resource[3]] = {entry[0]: entry[1] for entry in resource[4]}
        return metadata, configs
    finally:
        await admin.close()


def run_bridge_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tern.cloud", "run", "--stats-every", "0", "--no-commands", *args],
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


# --- the cluster ------------------------------------------------------------------------------


def test_cluster_has_three_brokers_and_leaders(apache_kafka: ApacheKafkaCluster) -> None:
    async def brokers() -> set[int]:
        admin = AIOKafkaAdminClient(bootstrap_servers=apache_kafka.bootstrap)
        await admin.start()
        try:
            return {b["node_id"] for b in (await admin.describe_cluster())["brokers"]}
        finally:
            await admin.close()

    assert asyncio.run(brokers()) == {1, 2, 3}
    assert len(apache_kafka.bootstrap.split(",")) == 3
    assert apache_kafka.running_nodes() == [1, 2, 3]
    assert 0 < apache_kafka.start_seconds < 90


def test_auto_creation_is_off(apache_kafka: ApacheKafkaCluster) -> None:
    topic = f"ak.unknown.{uuid.uuid4().hex[:8]}"

    async def produce() -> BaseException | None:
        producer = AIOKafkaProducer(bootstrap_servers=apache_kafka.bootstrap, request_timeout_ms=3000)
        await producer.start()
        try:
            await asyncio.wait_for(producer.send_and_wait(topic, b"x"), 30)
        except (KafkaError, asyncio.TimeoutError) as exc:
            return exc
        finally:
            await producer.stop()
        return None

    error = asyncio.run(produce())
    assert error is not None, "a write to an unknown topic succeeded: auto-creation is on"
    admin_topics = asyncio.run(_list_topics(apache_kafka.bootstrap))
    assert topic not in admin_topics


async def _list_topics(bootstrap: str) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


# --- the bridge's topics ------------------------------------------------------------------------


def test_bridge_creates_its_topics_with_rf3_and_min_isr2(apache_kafka: ApacheKafkaCluster, mosquitto) -> None:
    names = fresh_names()
    # Defaults: replication one per broker (3 here), min.insync.replicas from the broker (2).
    with BridgeThread(bridge_config(mosquitto.address, apache_kafka.bootstrap, names, topic_partitions=4)):
        pass
    metadata, configs = asyncio.run(describe(apache_kafka.bootstrap, list(names.values())))
    for topic in names.values():
        partitions = metadata[topic]
        assert len(partitions) == 4, topic
        assert all(len(p["replicas"]) == 3 for p in partitions), partitions
        assert configs[topic]["min.insync.replicas"] == "2", configs[topic]
    # Explicit settings (and the command topics, with the router on) are honoured too.
    names = fresh_names()
    config = bridge_config(mosquitto.address, apache_kafka.bootstrap, names, topic_partitions=2,
                           topic_replication=3, topic_min_insync=2, commands=True,
                           commands_topic=f"{names['readings']}.cmd", command_results_topic=f"{names['readings']}.res")
    with BridgeThread(config):
        pass
    topics = [*names.values(), config.commands_topic, config.command_results_topic]
    metadata, configs = asyncio.run(describe(apache_kafka.bootstrap, topics))
    for topic in topics:
        assert [len(p["replicas"]) for p in metadata[topic]] == [3, 3], topic
        assert configs[topic]["min.insync.replicas"] == "2"


def test_bridge_with_creation_off_and_a_missing_topic_exits_with_one_line(apache_kafka: ApacheKafkaCluster) -> None:
    names = fresh_names("missing")
    result = run_bridge_cli("--mqtt", "127.0.0.1:1", "--kafka", apache_kafka.bootstrap, "--topic", names["readings"],
                            "--status-topic", names["status"], "--deadletter", names["deadletter"],
                            "--no-create-topics")
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert names["readings"] in lines[0] and "--create-topics" in lines[0] and "TERN_BRIDGE_CREATE_TOPICS" in lines[0]
    assert names["readings"] not in asyncio.run(_list_topics(apache_kafka.bootstrap))


def test_bridge_whose_topics_cannot_be_created_exits_with_one_line(apache_kafka: ApacheKafkaCluster) -> None:
    names = fresh_names("badrf")
    result = run_bridge_cli("--mqtt", "127.0.0.1:1", "--kafka", apache_kafka.bootstrap, "--topic", names["readings"],
                            "--status-topic", names["status"], "--deadletter", names["deadletter"],
                            "--topic-replication", "5")
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "InvalidReplicationFactor" in lines[0] and "--topic-replication" in lines[0], lines[0]
    # The same in-process: BridgeError, one line.
    with pytest.raises(BridgeError) as info:
        BridgeThread(bridge_config("127.0.0.1:1", apache_kafka.bootstrap, names, topic_replication=5)).start()
    assert "\n" not in str(info.value)


# --- the whole path ---------------------------------------------------------------------------


def test_gateway_bridge_apache_kafka_carries_every_reading(tmp_path, mosquitto_factory,
                                                           apache_kafka: ApacheKafkaCluster) -> None:
    pi, cloud = mosquitto_factory("pi"), mosquitto_factory("cloud")
    names = fresh_names("pipe")
    devices = [f"dev-{i:02d}" for i in range(6)]
    per_device = 200
    gateway = Gateway(gateway_config(tmp_path, pi, cloud, uplink_window=4, batch_size=40, confirm_timeout_s=30))
    # Real Kafka: RF 3, two in sync per write, idempotent producer.
    bridge = BridgeThread(bridge_config(cloud.address, apache_kafka.bootstrap, names, topic_partitions=3,
                                        topic_replication=3, topic_min_insync=2, enable_idempotence=True))
    started = time.monotonic()
    with gateway, bridge:
        assert gateway.wait_connected(30)
        feed(gateway, devices, per_device, chunk=25)
        deadline = time.monotonic() + 90
        while not outbox_empty(gateway) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert outbox_empty(gateway), gateway.stats()
        stats = gateway.stats()
    assert stats["forwarded"] == len(devices) * per_device, stats
    records = read_all(apache_kafka.bootstrap, names["readings"], timeout_s=30, expect=len(devices) * per_device)
    assert by_device(records) == {d: list(range(per_device)) for d in devices}
    print(f"\n{len(devices) * per_device} readings through Apache Kafka in {time.monotonic() - started:.1f} s")


# --- two of three brokers down --------------------------------------------------------------


def test_two_brokers_down_nothing_confirmed_then_everything_drains(tmp_path, mosquitto_factory,
                                                                    apache_kafka: ApacheKafkaCluster) -> None:
    """Kill one broker, stop a second: acks=all writes fail with NOT_ENOUGH_REPLICAS, the bridge
    confirms nothing and says why once per back-off, the outbox grows; brokers back -> all of it
    arrives.

    One broker is killed and dropped from the ISRs first, and only then a second one is stopped:
    killing two combined nodes at once would take the controller quorum with them, the ISRs
    could not shrink, and writes would time out instead (measured; see docs/kafka.md).
    """
    pi, cloud = mosquitto_factory("pi"), mosquitto_factory("cloud")
    names = fresh_names("down")
    devices = [f"dev-{i:02d}" for i in range(4)]
    log_path = tmp_path / "bridge.log"
    with open(log_path, "wb") as log:
        bridge = subprocess.Popen(
            [sys.executable, "-m", "tern.cloud", "run", "--mqtt", cloud.address, "--kafka", apache_kafka.bootstrap,
             "--topic", names["readings"], "--status-topic", names["status"], "--deadletter", names["deadletter"],
             "--name", f"down{uuid.uuid4().hex[:6]}", "--topic-partitions", "3", "--topic-replication", "3",
             # Not idempotent: aiokafka retries an idempotent producer's batches forever, so
             # the bridge would see only its own write deadline pass, not the broker's reason.
             "--topic-min-insync", "2", "--no-commands", "--stats-every", "0"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    text = lambda: log_path.read_text(errors="replace")  # noqa: E731
    gateway = Gateway(gateway_config(tmp_path, pi, cloud, uplink_window=2, batch_size=25, confirm_timeout_s=60))
    try:
        wait_until(lambda: " running: " in text() or bridge.poll() is not None, 60, "the bridge running")
        assert bridge.poll() is None, text()[-3000:]
        with gateway:
            assert gateway.wait_connected(30)
            feed(gateway, devices, 50)
            wait_until(lambda: outbox_empty(gateway), 60, "readings forwarded with three brokers")

            apache_kafka.kill(3)
            apache_kafka.wait_out_of_isr(3, names["readings"])
            apache_kafka.stop(2)
            confirmed = gateway.stats()["batches_confirmed"]
            feed(gateway, devices, 50, start=50)
            # A write fails once aiokafka's retries pass request_timeout_ms (15 s): two back-offs.
            wait_until(lambda: text().count("Kafka write of") >= 2, 90, "two failed writes logged")
            pending = gateway.outbox.pending()
            feed(gateway, devices, 50, start=100)
            assert gateway.outbox.pending() > pending >= 50 * len(devices) // 2  # the outbox grows
            assert gateway.stats()["batches_confirmed"] == confirmed  # nothing confirmed meanwhile

            apache_kafka.restart(2)
            apache_kafka.restart(3)
            wait_until(lambda: outbox_empty(gateway), 180, "the outbox drained with the brokers back")
            assert gateway.stats()["forwarded"] >= 150 * len(devices)
    finally:
        for node in (2, 3):
            if node not in apache_kafka.running_nodes():
                apache_kafka.restart(node)
        bridge.terminate()
        try:
            bridge.wait(20)
        except subprocess.TimeoutExpired:
            bridge.kill()
            bridge.wait(10)
    records = read_all(apache_kafka.bootstrap, names["readings"], timeout_s=30, expect=150 * len(devices))
    assert_complete_in_order(records, devices, 150)
    log_text = text()
    failures = [line for line in log_text.splitlines() if "Kafka write of" in line]
    assert len([f for f in failures if "NotEnoughReplicas" in f]) >= 2, log_text[-4000:]
    assert all("retrying in" in line for line in failures), failures
    assert "Got error produce response" not in log_text  # aiokafka's per-retry warnings stay out
    assert "Future exception was never retrieved" not in log_text
    assert "Traceback" not in log_text, log_text[-3000:]
