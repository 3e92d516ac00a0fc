"""The whole path on real parts: emulated ESP32 nodes (real firmware on the MicroPython unix
port) → Pi mosquitto → gateway (SQLite outbox) → cloud mosquitto → bridge → Kafka.

These tests fail if any hop drops, invents or reorders a reading.
"""

from __future__ import annotations

from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from tern.cloud.bridge import BridgeThread
from tern.cloud.consume import read_all
from tern.edge.config import GatewayConfig
from tern.edge.service import Gateway
from tern.core import codec, topics
from tern.device.emulate import Fleet
from tern.harness.observe import BrokerObserver, KafkaTail, reconcile, wait_until

from helpers import bridge_config

NODES = 3
READINGS = 200


@pytest.fixture
def pipeline(tmp_path: Path, mosquitto_factory, kafka_bootstrap: str, kafka_topics: dict[str, str]):
    """Pi broker, cloud broker, gateway and bridge, running; yields what a test needs."""
    pi_broker = mosquitto_factory("pi")
    cloud_broker = mosquitto_factory("cloud")
    gateway = Gateway(
        GatewayConfig(
            gateway_id="gw-e2e",
            local_broker=pi_broker.address,
            cloud_broker=cloud_broker.address,
            outbox_path=tmp_path / "outbox.db",
        )
    )
    bridge = BridgeThread(
        bridge_config(cloud_broker, kafka_bootstrap, kafka_topics, name="e2e")
    )
    with gateway, bridge:
        tail = KafkaTail(kafka_bootstrap, kafka_topics["readings"]).start()
        observer = BrokerObserver(pi_broker.host, pi_broker.port).start()
        try:
            yield {
                "pi": pi_broker,
                "gateway": gateway,
                "bridge": bridge,
                "tail": tail,
                "observer": observer,
                "tmp": tmp_path,
                "kafka": kafka_bootstrap,
                "status_topic": kafka_topics["status"],
            }
        finally:
            observer.stop()
            tail.stop()


def retained_status(host: str, port: int, site: str, device: str, timeout: float = 10.0) -> codec.Status | None:
    """Read the retained status of a device with a fresh subscriber."""
    got: list[bytes] = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.on_message = lambda c, u, msg: got.append(msg.payload)
    client.connect(host, port)
    client.subscribe(topics.status_topic(site, device), qos=1)
    client.loop_start()
    try:
        wait_until(lambda: bool(got), timeout)
    finally:
        client.disconnect()
        client.loop_stop()
    return codec.decode_status(got[-1]) if got else None


def kafka_states(bootstrap: str, topic: str, device: str, boot: str) -> list[str]:
    """The states Kafka's status topic holds for one boot of one device, in partition order."""
    records = sorted(read_all(bootstrap, topic, timeout_s=10), key=lambda r: (r.partition, r.offset))
    states = []
    for rec in records:
        value = codec.decode_kafka_status_value(rec.raw)
        assert rec.key == value["device"] and rec.headers["state"] == value["state"].encode()
        if value["device"] == device and value["boot"] == boot:
            states.append(value["state"])
    return states


def test_every_reading_arrives_in_kafka_in_order_and_last_will_fires(pipeline) -> None:
    tail: KafkaTail = pipeline["tail"]
    pi = pipeline["pi"]
    with Fleet(
        pipeline["tmp"] / "nodes", count=NODES, site="site-e2e", broker=pi.address, interval_ms=20, max_readings=READINGS
    ) as fleet:
        assert wait_until(lambda: all(node.wait_done(0) for node in fleet.nodes), 120), [
            (node.device, node.sent) for node in fleet.nodes
        ]
        devices = [node.device for node in fleet.nodes]

        # Each node, one boot, seq 1..READINGS: exactly what the firmware contract promises.
        births = {device: retained_status(pi.host, pi.port, "site-e2e", device) for device in devices}
        for device, birth in births.items():
            assert birth is not None and birth.state == "online" and birth.fw, (device, birth)
        expected = {(device, births[device].boot, seq) for device in devices for seq in range(1, READINGS + 1)}

        assert wait_until(lambda: expected <= set(tail.identities()), 90), (
            f"missing in Kafka: {sorted(expected - set(tail.identities()))[:10]}"
        )
        arrived = tail.identities()
        result = reconcile(expected, arrived)
        assert result.total_missing == 0
        assert sum(result.out_of_order.values()) == 0, result.out_of_order
        # Nothing in Kafka that no node sent.
        assert set(arrived) <= expected, sorted(set(arrived) - expected)[:10]

        # Each device's records sit in one partition, keyed by device, in seq order.
        for device in devices:
            records = [(value, partition) for identity, value, partition in tail.records() if identity[0] == device]
            assert len({partition for _, partition in records}) == 1
            seqs = [value["seq"] for value, _ in records]
            firsts = list(dict.fromkeys(seqs))
            assert firsts == sorted(firsts) == list(range(1, READINGS + 1))
            assert all(value["gateway"] == "gw-e2e" and value["site"] == "site-e2e" for value, _ in records)

        # The gateway deleted what Kafka confirmed, and nothing else went astray.
        assert wait_until(lambda: pipeline["gateway"].stats()["pending"] == 0, 30), pipeline["gateway"].stats()
        assert pipeline["gateway"].stats()["dead_letters"] == 0

        # Kill one node without an MQTT DISCONNECT: the broker must publish its retained will.
        victim = fleet.nodes[0]
        victim.kill()
        assert wait_until(
            lambda: (s := retained_status(pi.host, pi.port, "site-e2e", victim.device, 2)) is not None
            and s.state == "offline"
            and s.boot == births[victim.device].boot,
            30,
        )
        # The others are still online.
        assert retained_status(pi.host, pi.port, "site-e2e", devices[1]).state == "online"

        # Kafka's status topic tells the same story: the victim's birth, then its will.
        boot = births[victim.device].boot
        states: list[str] = []

        def will_in_kafka() -> bool:
            states[:] = kafka_states(pipeline["kafka"], pipeline["status_topic"], victim.device, boot)
            return "offline" in states

        assert wait_until(will_in_kafka, 60), states
        # At least once: a state may repeat, but the birth comes first and the will last.
        assert states[0] == "online" and states[-1] == "offline", states
        assert list(dict.fromkeys(states)) == ["online", "offline"], states
        for device in devices[1:]:
            assert kafka_states(pipeline["kafka"], pipeline["status_topic"], device, births[device].boot)[-1] == "online"
        stats = pipeline["gateway"].stats()
        assert stats["nodes_offline"] == 1 and stats["nodes_online"] == NODES - 1, stats


def test_observer_sees_what_kafka_gets(pipeline) -> None:
    """The demo's 'sent' side (the Pi broker observer) and Kafka agree for a short run."""
    with Fleet(
        pipeline["tmp"] / "nodes", count=2, site="site-obs", broker=pipeline["pi"].address, interval_ms=50, max_readings=30
    ) as fleet:
        assert wait_until(lambda: all(node.wait_done(0) for node in fleet.nodes), 60)
        sent = pipeline["observer"].identities()
        assert len(sent) == 60
        assert wait_until(lambda: sent <= set(pipeline["tail"].identities()), 60)
        result = reconcile(sent, pipeline["tail"].identities())
        assert result.total_missing == 0 and result.sent == {n.device: 30 for n in fleet.nodes}
        assert result.received == result.sent
