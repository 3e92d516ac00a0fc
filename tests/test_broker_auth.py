"""Per-device accounts and TLS, tried against a real mosquitto.

The password file, ACL and certificates are made by Tern's own code (tern.security); mosquitto
decides. Refusals are read from CONNACK codes; "dropped by the broker" is shown with a marker
message sent after the forbidden one on the same connection: MQTT keeps one connection's
messages in order, so once the marker has arrived the forbidden one would have too.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from tern.core.topics import ack_topic, fw_get_topic, fw_topic, status_topic, telemetry_topic
from tern.harness.stack import BrokerTls, Mosquitto
from tern.security import pki
from tern.security.mosquitto_auth import (DeviceAuth, hash_password, read_password_file,
                                          verify_password)
from tern.security.secret_files import exposure_warning, write_private

SITE = "lab"
WAIT_S = 20.0


class Client:
    """A paho client that records what it receives and the CONNACK it got."""

    def __init__(self, broker: Mosquitto, client_id: str, username: str | None = None,
                 password: str | None = None, tls: ssl.SSLContext | None = None) -> None:
        self.received: list[tuple[str, bytes]] = []
        self.connack: int | None = None
        #: Why connect() returned -1 (for the failure message).
        self.error = ""
        self._cond = threading.Condition()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
        if username is not None:
            self.c.username_pw_set(username, password)
        if tls is not None:
            self.c.tls_set_context(tls)
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.on_subscribe = self._on_subscribe
        self.c.on_disconnect = self._on_disconnect
        self.subacks: set[int] = set()
        self.broker = broker

    def _on_connect(self, client, userdata, flags, reason, props) -> None:
        with self._cond:
            self.connack = reason.value
            self._cond.notify_all()

    def _on_disconnect(self, client, userdata, flags, reason, props) -> None:
        with self._cond:
            if self.connack is None:  # closed before any CONNACK: the TLS layer said no
                self.connack = -1
            self._cond.notify_all()

    def _on_subscribe(self, client, userdata, mid, reasons, props) -> None:
        with self._cond:
            self.subacks.add(mid)
            self._cond.notify_all()

    def _on_message(self, client, userdata, msg) -> None:
        with self._cond:
            self.received.append((msg.topic, msg.payload))
            self._cond.notify_all()

    def connect(self) -> int:
        """Connect and return the CONNACK code (0 = accepted); -1 if the TLS handshake failed."""
        try:
            self.c.connect(self.broker.host, self.broker.port, keepalive=30)
        except (ssl.SSLError, OSError) as exc:
            self.error = f"connect to {self.broker.host}:{self.broker.port}: {exc!r}"
            return -1
        self.c.loop_start()
        with self._cond:
            self._cond.wait_for(lambda: self.connack is not None, WAIT_S)
        if self.connack is None:
            self.error = f"no CONNACK from {self.broker.host}:{self.broker.port} in {WAIT_S:.0f} s"
            self.close()
            return -1
        if self.connack == -1:
            self.error = f"{self.broker.host}:{self.broker.port} closed the connection before a CONNACK"
        return self.connack

    def subscribe(self, topic: str) -> None:
        """Subscribe and wait for the SUBACK, so later publishes from others are seen."""
        result, mid = self.c.subscribe(topic, qos=1)
        assert result == mqtt.MQTT_ERR_SUCCESS
        with self._cond:
            assert self._cond.wait_for(lambda: mid in self.subacks, WAIT_S), "no SUBACK"

    def publish(self, topic: str, payload: bytes) -> None:
        self.c.publish(topic, payload, qos=1).wait_for_publish(WAIT_S)

    def wait_for(self, payload: bytes) -> list[tuple[str, bytes]]:
        """Wait (bounded) until ``payload`` has arrived; return everything received so far."""
        with self._cond:
            ok = self._cond.wait_for(lambda: any(p == payload for _, p in self.received), WAIT_S)
            assert ok, f"{payload!r} never arrived; got {self.received}"
            return list(self.received)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


@pytest.fixture()
def secured(tmp_path: Path):
    """A mosquitto with anonymous access off, a gateway account and two devices."""
    auth = DeviceAuth(tmp_path / "auth")
    gw_pw = auth.set_gateway("tern-gateway")
    pw = {d: auth.add_device(d, SITE) for d in ("node-a", "node-b")}
    broker = Mosquitto(tmp_path / "mq", auth_folder=auth.folder)
    broker.start()
    clients: list[Client] = []

    def client(*args, **kw) -> Client:
        c = Client(broker, *args, **kw)
        clients.append(c)
        return c

    yield auth, broker, gw_pw, pw, client
    for c in clients:
        c.close()
    broker.stop()


def test_hash_matches_mosquitto_passwd(tmp_path: Path) -> None:
    passwd = tmp_path / "pw"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwd), "alice", "s3cret-pw"], check=True)
    stored = read_password_file(passwd)["alice"]
    assert verify_password("s3cret-pw", stored)
    assert not verify_password("s3cret-px", stored)
    # Our hash of the same password with mosquitto's salt is mosquitto's hash, byte for byte.
    import base64
    salt = base64.b64decode(stored.split("$")[3])
    assert hash_password("s3cret-pw", salt=salt) == stored


def test_devices_connect_only_with_their_own_password(secured) -> None:
    auth, broker, gw_pw, pw, client = secured
    assert client("node-a", "node-a", pw["node-a"]).connect() == 0
    assert client("gw", "tern-gateway", gw_pw).connect() == 0
    # Wrong password, another node's password, no password, anonymous: all refused.
    assert client("node-b", "node-b", pw["node-a"]).connect() in (4, 5, 134, 135)
    assert client("node-b", "node-b", "guess").connect() in (4, 5, 134, 135)
    assert client("node-b", "node-b", None).connect() in (4, 5, 134, 135)
    assert client("anon").connect() in (4, 5, 134, 135)


def test_acl_confines_each_node_to_its_topics(secured) -> None:
    auth, broker, gw_pw, pw, client = secured
    gateway = client("gw", "tern-gateway", gw_pw)
    node_a = client("node-a", "node-a", pw["node-a"])
    node_b = client("node-b", "node-b", pw["node-b"])
    for c in (gateway, node_a, node_b):
        assert c.connect() == 0
    gateway.subscribe("tern/#")
    node_b.subscribe(ack_topic(SITE, "node-b"))
    node_a.subscribe("tern/#")  # the broker grants nothing a node may not read

    # node-a speaking as node-b (telemetry, status) and forging node-b's ack: all dropped.
    node_a.publish(telemetry_topic(SITE, "node-b"), b"forged-reading")
    node_a.publish(status_topic(SITE, "node-b"), b"forged-status")
    node_a.publish(ack_topic(SITE, "node-b"), b"forged-ack")
    node_a.publish(telemetry_topic("other-site", "node-a"), b"wrong-site")
    node_a.publish(telemetry_topic(SITE, "node-a"), b"marker-a")
    got = gateway.wait_for(b"marker-a")
    assert [p for _, p in got] == [b"marker-a"]

    # Only the gateway's account reaches node-b's ack topic.
    gateway.publish(ack_topic(SITE, "node-b"), b"real-ack")
    assert [p for _, p in node_b.wait_for(b"real-ack")] == [b"real-ack"]
    # node-a read nothing of the others: not node-b's ack, not the gateway's traffic.
    node_a.publish(status_topic(SITE, "node-a"), b"marker-a2")
    gateway.wait_for(b"marker-a2")
    assert all(t == ack_topic(SITE, "node-a") for t, _ in node_a.received), node_a.received


def test_acl_lets_a_node_ask_for_and_read_only_its_own_release_chunks(secured) -> None:
    auth, broker, gw_pw, pw, client = secured
    gateway = client("gw", "tern-gateway", gw_pw)
    node_a = client("node-a", "node-a", pw["node-a"])
    node_b = client("node-b", "node-b", pw["node-b"])
    for c in (gateway, node_a, node_b):
        assert c.connect() == 0
    gateway.subscribe("tern/+/+/fw_get")
    node_a.subscribe(fw_topic(SITE, "node-a"))
    node_b.subscribe(fw_topic(SITE, "node-b"))
    node_a.subscribe(fw_topic(SITE, "node-b"))   # granted nothing: not its topic
    node_a.publish(fw_get_topic(SITE, "node-b"), b"0.5.0 0 0 as node-b")
    node_a.publish(fw_get_topic(SITE, "node-a"), b"0.5.0 0 0")
    assert [p for _, p in gateway.wait_for(b"0.5.0 0 0")] == [b"0.5.0 0 0"]
    node_b.publish(fw_topic(SITE, "node-a"), b"forged-chunk")   # only the gateway serves chunks
    gateway.publish(fw_topic(SITE, "node-b"), b"chunk-b")
    gateway.publish(fw_topic(SITE, "node-a"), b"chunk-a")
    assert [p for _, p in node_a.wait_for(b"chunk-a")] == [b"chunk-a"]
    assert [p for _, p in node_b.wait_for(b"chunk-b")] == [b"chunk-b"]


def test_removed_device_is_locked_out_at_next_connect(secured) -> None:
    auth, broker, gw_pw, pw, client = secured
    assert client("node-b", "node-b", pw["node-b"]).connect() == 0
    auth.remove_device("node-b")
    broker.reload()
    deadline = time.monotonic() + WAIT_S
    code = 0
    while code == 0 and time.monotonic() < deadline:  # SIGHUP is handled asynchronously
        code = client("node-b", "node-b", pw["node-b"]).connect()
    assert code in (4, 5, 134, 135)
    assert [d.device for d in auth.devices()] == ["node-a"]
    assert client("node-a", "node-a", pw["node-a"]).connect() == 0


def test_secret_files_are_owner_only(secured, tmp_path: Path) -> None:
    auth = secured[0]
    for path in (auth.passwd_path, auth.acl_path, auth.registry_path):
        assert path.stat().st_mode & 0o777 == 0o600, path
        assert exposure_warning(path) is None
    exposed = tmp_path / "exposed.secret"
    write_private(exposed, "x")
    exposed.chmod(0o644)
    assert "readable by others" in exposure_warning(exposed)
    # No password is stored in clear anywhere in the folder.
    for path in auth.folder.iterdir():
        for password in secured[3].values():
            assert password not in path.read_text()


def _tls_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def test_mutual_tls_listener(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    ca = pki.make_ca()
    ca_crt, _ = ca.write(certs, "ca")
    srv_crt, srv_key = pki.issue_server(ca, ["127.0.0.1", "localhost"]).write(certs, "broker")
    gw_crt, gw_key = pki.issue_client(ca, "gw-1").write(certs, "gw-1")
    rogue = pki.make_ca("rogue CA")
    rogue_crt, rogue_key = pki.issue_client(rogue, "gw-1").write(certs, "rogue")
    broker = Mosquitto(tmp_path / "mq", tls=BrokerTls(ca_crt, srv_crt, srv_key, require_client_cert=True))
    with broker:
        good = Client(broker, "gw-1", tls=_tls_context(ca_crt, gw_crt, gw_key))
        assert good.connect() == 0
        good.subscribe("t/#")
        good.publish("t/x", b"over-tls")
        good.wait_for(b"over-tls")
        good.close()
        # No client certificate, a certificate from another CA, plain TCP: no connection.
        assert Client(broker, "gw-2", tls=_tls_context(ca_crt)).connect() != 0
        assert Client(broker, "gw-3", tls=_tls_context(ca_crt, rogue_crt, rogue_key)).connect() != 0
        assert Client(broker, "gw-4").connect() != 0


def _gateway_cli(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("tern-gateway")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=60)


def test_devices_cli_provisions_and_locks_out(tmp_path: Path) -> None:
    auth_dir = tmp_path / "auth"
    pid_file = tmp_path / "mosquitto.pid"
    assert _gateway_cli("devices", "--auth-dir", str(auth_dir), "init").returncode == 0
    added = _gateway_cli("devices", "--auth-dir", str(auth_dir), "add", "node-7", "--site", SITE,
                         "--config-out", str(tmp_path / "node-7.json"))
    assert added.returncode == 0, added.stderr
    node_config = json.loads((tmp_path / "node-7.json").read_text())
    assert (tmp_path / "node-7.json").stat().st_mode & 0o777 == 0o600
    password = node_config["mqtt_password"]
    gateway_password = (auth_dir / "gateway.secret").read_text().strip()
    listed = _gateway_cli("devices", "--auth-dir", str(auth_dir), "list")
    assert "node-7" in listed.stdout and SITE in listed.stdout
    for out in (added, listed):  # the tool never prints a password
        assert password not in out.stdout + out.stderr
        assert gateway_password not in out.stdout + out.stderr

    with Mosquitto(tmp_path / "mq", auth_folder=auth_dir) as broker:
        pid_file.write_text(f"{broker.process.pid}\n")
        node = Client(broker, "node-7", "node-7", password)
        assert node.connect() == 0
        node.close()
        assert Client(broker, "gw", "tern-gateway", gateway_password).connect() == 0
        removed = _gateway_cli("devices", "--auth-dir", str(auth_dir), "--pid-file", str(pid_file),
                               "remove", "node-7")
        assert removed.returncode == 0 and "reloaded" in removed.stdout
        deadline, code = time.monotonic() + WAIT_S, 0
        while code == 0 and time.monotonic() < deadline:
            code = Client(broker, "node-7", "node-7", password).connect()
        assert code in (4, 5, 134, 135)
    again = _gateway_cli("devices", "--auth-dir", str(auth_dir), "remove", "node-7")
    assert again.returncode == 2 and "no device 'node-7'" in again.stderr


def test_certs_cli_makes_a_working_pki(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    made = _gateway_cli("certs", "--out", str(out), "--broker-host", "127.0.0.1", "--gateway", "gw-1")
    assert made.returncode == 0, made.stderr
    assert (out / "ca.key").stat().st_mode & 0o777 == 0o600
    # A second run reuses the CA: certificates for new gateways chain to the same root.
    assert _gateway_cli("certs", "--out", str(out), "--gateway", "gw-2").returncode == 0
    broker = Mosquitto(tmp_path / "mq", tls=BrokerTls(out / "ca.crt", out / "broker.crt",
                                                      out / "broker.key", require_client_cert=True))
    with broker:
        for gw in ("gw-1", "gw-2"):
            ctx = _tls_context(out / "ca.crt", out / f"{gw}.crt", out / f"{gw}.key")
            assert Client(broker, gw, tls=ctx).connect() == 0


def test_cloud_acl_confines_gateways_to_their_topics(tmp_path: Path) -> None:
    """Gateways by client certificate, the bridge by password, on one TLS listener."""
    from tern.security.mosquitto_auth import hash_password, render_cloud_acl

    certs = tmp_path / "certs"
    ca = pki.make_ca()
    ca_crt, _ = ca.write(certs, "ca")
    srv_crt, srv_key = pki.issue_server(ca, ["127.0.0.1"]).write(certs, "broker")
    gw_crt, gw_key = pki.issue_client(ca, "gw-1").write(certs, "gw-1")
    (tmp_path / "acl").write_text(render_cloud_acl(["tern-bridge"]))
    (tmp_path / "passwd").write_text(f"tern-bridge:{hash_password('bridge-pw-1')}\n")
    # Two listeners: gateways with certificates, the bridge with a password (on loopback).
    bridge_port = Mosquitto(tmp_path / "unused").port
    broker = Mosquitto(tmp_path / "mq", tls=BrokerTls(ca_crt, srv_crt, srv_key, require_client_cert=True),
                       auth_folder=tmp_path, extra_conf=f"listener {bridge_port} 127.0.0.1")
    with broker:
        bridge_side = Mosquitto(tmp_path / "unused2", port=bridge_port)  # only to address the 2nd listener
        bridge = Client(bridge_side, "tern-bridge", "tern-bridge", "bridge-pw-1")
        assert bridge.connect() == 0, f"{bridge.error}\n{broker.log_tail(40)}"
        bridge.subscribe("$share/bridges/tern-gw/+/batch")
        gw = Client(broker, "gw-1", tls=_tls_context(ca_crt, gw_crt, gw_key))
        assert gw.connect() == 0
        gw.subscribe("tern-gw/+/confirm")
        gw.publish("tern-gw/gw-2/batch", b"as-another-gateway")
        gw.publish("tern-gw/gw-1/batch", b"own-batch")
        got = bridge.wait_for(b"own-batch")
        assert [p for _, p in got] == [b"own-batch"]
        bridge.publish("tern-gw/gw-2/confirm", b"other-confirm")
        bridge.publish("tern-gw/gw-1/confirm", b"own-confirm")
        assert [p for _, p in gw.wait_for(b"own-confirm")] == [b"own-confirm"]
        # Firmware releases: the bridge's account sends them, each gateway reads only its own.
        gw.subscribe("tern-gw/+/release")
        bridge.publish("tern-gw/gw-2/release", b"other-release")
        bridge.publish("tern-gw/gw-1/release", b"own-release")
        assert [p for t, p in gw.wait_for(b"own-release") if t.endswith("/release")] == [b"own-release"]
        assert Client(bridge_side, "anon").connect() != 0
