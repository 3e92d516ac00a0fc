"""The whole path with security on: per-device accounts and the ACL on the Pi broker, mutual TLS
and the cloud ACL on the cloud broker, run at DEBUG log level, then every log and output is
searched for the secrets the run created.

Nodes run the real firmware on the MicroPython unix port, over plain MQTT here (node TLS:
tests/test_node_tls.py).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from tern.cloud.bridge import BridgeThread
from tern.cloud.config import BridgeConfig
from tern.core import topics
from tern.core.mqtt_session import PersistentSession
from tern.device.emulate import EmulatedNode, Fleet
from tern.edge.config import GatewayConfig
from tern.edge.service import Gateway
from tern.harness.observe import BrokerObserver, KafkaTail, reconcile, wait_until
from tern.harness.secure import SecureSite
from tern.security import pki

SITE = "site-sec"
GATEWAY = "gw-sec"
NODES = 3
READINGS = 60


@pytest.fixture
def secured(tmp_path: Path, kafka_bootstrap: str, kafka_topics: dict[str, str], caplog):
    caplog.set_level(logging.DEBUG)
    site = SecureSite(tmp_path / "site", SITE, GATEWAY, bridges=("sec",))
    pi = site.pi_broker(tmp_path / "pi").start()
    cloud = site.cloud_broker(tmp_path / "cloud").start()
    gateway_config = GatewayConfig(gateway_id=GATEWAY, local_broker=pi.address, cloud_broker=cloud.address,
                                   outbox_path=tmp_path / "outbox.db", log_level="DEBUG", **site.gateway_settings())
    bridge = BridgeThread(BridgeConfig(name="sec", mqtt_broker=cloud.address, kafka_bootstrap=kafka_bootstrap,
                                       readings_topic=kafka_topics["readings"], status_topic=kafka_topics["status"],
                                       deadletter_topic=kafka_topics["deadletter"], **site.bridge_settings("sec")))
    user, password = site.monitor_credentials()
    try:
        with bridge:
            observer = BrokerObserver(pi.host, pi.port, client_id=user, username=user, password=password).start()
            tail = KafkaTail(kafka_bootstrap, kafka_topics["readings"]).start()
            try:
                yield {"site": site, "pi": pi, "cloud": cloud, "gateway_config": gateway_config, "bridge": bridge,
                       "observer": observer, "tail": tail, "tmp": tmp_path, "caplog": caplog}
            finally:
                tail.stop()
                observer.stop()
    finally:
        cloud.stop()
        pi.stop()


def _client(pi, user: str, password: str) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=user)
    client.username_pw_set(user, password)
    client.connect(pi.host, pi.port)
    client.loop_start()
    return client


def test_secured_pipeline_end_to_end(secured) -> None:
    site: SecureSite = secured["site"]
    pi, tmp, observer, tail = secured["pi"], secured["tmp"], secured["observer"], secured["tail"]
    outputs: list[str] = []

    fleet = Fleet(tmp / "nodes", count=NODES, site=SITE, broker=pi.address, interval_ms=50,
                  max_readings=READINGS, per_node=site.add_node)
    pi.reload()  # mosquitto re-reads the password file and ACL the provisioning changed
    with Gateway(secured["gateway_config"]), fleet:
        # Rogues on the same broker: a real node's id with a wrong password, another node's
        # id with a real node's password, and an id with no password at all.
        passwords = {n.device: n.config["mqtt_password"] for n in fleet.nodes}
        rogues = [
            EmulatedNode(tmp / "rogue-wrong", device="node-1", site=SITE, broker=pi.address, interval_ms=50,
                         extra_config={"mqtt_password": "not-the-password"}),
            EmulatedNode(tmp / "rogue-other", device="node-2", site=SITE, broker=pi.address, interval_ms=50,
                         extra_config={"mqtt_password": passwords["node-1"]}),
            EmulatedNode(tmp / "rogue-none", device="rogue-9", site=SITE, broker=pi.address, interval_ms=50),
        ]
        for rogue in rogues:
            rogue.start()
        try:
            assert wait_until(lambda: all(n.wait_done(0) for n in fleet.nodes), 120), [(n.device, n.sent) for n in fleet.nodes]
            # Each rogue is refused, says why, and keeps backing off (no crash loop).
            assert wait_until(lambda: all("broker refused us" in r.log_text() for r in rogues), 60), \
                [r.log_text()[-500:] for r in rogues]
            assert all(r.running and r.connects == 0 for r in rogues)
        finally:
            for rogue in rogues:
                rogue.stop()
                outputs.append(rogue.log_text())

        sent = observer.identities()
        assert len(sent) == NODES * READINGS
        assert wait_until(lambda: sent <= set(tail.identities()), 90)
        result = reconcile(sent, tail.identities())
        assert result.total_missing == 0 and sum(result.out_of_order.values()) == 0
        # Nothing from a rogue: only the real nodes' boots are in Kafka.
        boots = {n.device: n.boot for n in fleet.nodes}
        assert {(d, b) for d, b, _ in tail.identities()} == set(boots.items())
        assert "rogue-9" not in {d for d, _, _ in tail.identities()}

        # A forged ack, even from an account that knows the boot id, never reaches the node.
        # The gateway stops acking (stopped), node-1 keeps reading with a ring of unacked ones.
        victim = fleet.nodes[0]
    # Fleet and gateway stopped here; run node-1 again (a new boot) against a stopped gateway.
    victim = EmulatedNode(tmp / "victim", device="node-1", site=SITE, broker=pi.address, interval_ms=50,
                          extra_config={"mqtt_password": passwords["node-1"]}).start()
    forger = _client(pi, "node-2", passwords["node-2"])
    try:
        assert wait_until(lambda: victim.boot and victim.sent >= 10, 60), victim.log_text()[-500:]
        acked_before = victim.acked
        forged = json.dumps({"v": 1, "boot": victim.boot, "seq": 10**6}).encode()
        forger.publish(topics.ack_topic(SITE, "node-1"), forged, qos=1).wait_for_publish(10)
        # node-2's own status after the forgery: once the observer has it, the broker has
        # handled the forgery too; then give node-1's loop a few readings' time to read acks.
        forger.publish(topics.status_topic(SITE, "node-2"), b'{"marker": 1}', qos=1).wait_for_publish(10)
        sent_then = victim.sent
        assert wait_until(lambda: victim.sent >= sent_then + 5, 30)
        assert victim.acked == acked_before, "a forged ack reached the node"
        # The gateway comes back: every reading of the ring (and the broker's queue) arrives.
        with Gateway(secured["gateway_config"]):
            assert wait_until(lambda: victim.acked >= sent_then, 60), (victim.acked, sent_then)
            victim.stop()
            expected = {("node-1", victim.boot, s) for s in range(1, victim.sent + 1)}
            assert wait_until(lambda: expected <= set(tail.identities()), 60), \
                sorted(expected - set(tail.identities()))[:5]
    finally:
        forger.loop_stop()
        forger.disconnect()
        victim.stop()
        outputs.append(victim.log_text())

    # A gateway whose certificate is not from the site CA cannot reach the cloud broker.
    rogue_ca = pki.make_ca("rogue")
    cert, key = pki.issue_client(rogue_ca, GATEWAY).write(tmp / "rogue-pki", GATEWAY)
    cfg = GatewayConfig(gateway_id=GATEWAY, cloud_broker=secured["cloud"].address, outbox_path=tmp / "x.db",
                        cloud_ca=str(site.ca_file), cloud_cert=str(cert), cloud_key=str(key))
    host, port = cfg.cloud_hostport
    session = PersistentSession("rogue-uplink", host, port, [(topics.confirm_topic(GATEWAY), 1)], lambda m: None,
                                **cfg.cloud_auth())
    session.start()
    try:
        assert not session.wait_connected(8)
    finally:
        session.stop()

    # Secrets: no password and no line of any private key in any log or output of the run.
    check = subprocess.run(
        [str(Path(sys.executable).with_name("tern-gateway")), "check", "--gateway-id", GATEWAY,
         "--local", secured["pi"].address, "--cloud", secured["cloud"].address, "--outbox", str(tmp / "c.db"),
         "--timeout", "3"],
        capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", **{f"TERN_{k.upper()}": str(v) for k, v in site.gateway_settings().items()}})
    outputs += [check.stdout, check.stderr]
    assert "local" in check.stdout and "cloud" in check.stdout, check.stdout + check.stderr
    texts = {
        "in-process logs (DEBUG)": secured["caplog"].text,
        "command outputs and node consoles": "\n".join(outputs),
        "pi mosquitto log": secured["pi"].log_path.read_text(errors="replace"),
        "cloud mosquitto log": secured["cloud"].log_path.read_text(errors="replace"),
    }
    for node_log in (tmp / "nodes").rglob("node.log"):
        texts[str(node_log)] = node_log.read_text(errors="replace")
    assert len(secured["caplog"].text) > 1000  # the run really logged at DEBUG
    secrets = site.secrets()
    assert len(secrets) > NODES + 2
    leaks = [(where, s[:6] + "…") for where, text in texts.items() for s in secrets if s in text]
    assert not leaks, leaks
