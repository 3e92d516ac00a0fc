"""The shipped Pi mosquitto config (deploy/mosquitto-pi.conf) keeps queued QoS 1 messages over a
restart: the reason it exists (deploy/mosquitto.conf, the container's, lost them on a Pi).

mosquitto runs with the shipped file, every line kept except the ones naming a path, the port
and (as root) the user, which move into the test's temporary folder: the settings under test
(persistence, autosave, queue limits, accounts) are the shipped ones.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tern.core import codec, topics
from tern.core.codec import Reading
from tern.harness.stack import free_port, wait_for_port
from tern.security.mosquitto_auth import DeviceAuth
from tern.toolchain import mosquitto_binary

ROOT = Path(__file__).resolve().parents[1]
PI_CONF = ROOT / "deploy" / "mosquitto-pi.conf"
DEADLINE = 20.0
#: The keys whose values are machine paths, the port or the user; everything else is kept.
REWRITTEN = {"user", "pid_file", "listener", "password_file", "acl_file", "persistence_location", "log_dest"}


def settings(text: str) -> list[tuple[str, str]]:
    """(key, value) of every setting line, comments and blank lines left out."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            out.append((key, value.strip()))
    return out


def rewrite(text: str, tmp: Path, port: int, auth: DeviceAuth) -> str:
    """The shipped config with only its paths, port and user moved to ``tmp``."""
    found = {key for key, _ in settings(text)}
    # If the shipped file grows another path, this test must learn about it.
    assert found >= REWRITTEN, f"the Pi config lost {REWRITTEN - found}"
    out = []
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        if line.lstrip().startswith("#") or key not in REWRITTEN:
            out.append(line)
        elif key == "user":
            # As root mosquitto would drop to 'mosquitto', which cannot write our tmp folder.
            out.append("user root" if os.geteuid() == 0 else line)
        elif key == "pid_file":
            out.append(f"pid_file {tmp / 'mosquitto.pid'}")
        elif key == "listener":
            out.append(f"listener {port} 127.0.0.1")
        elif key == "password_file":
            out.append(f"password_file {auth.passwd_path}")
        elif key == "acl_file":
            out.append(f"acl_file {auth.acl_path}")
        elif key == "persistence_location":
            out.append(f"persistence_location {tmp / 'data'}/")
        elif key == "log_dest":
            assert value.startswith("file "), "the Pi config logs to a file"
            out.append(f"log_dest file {tmp / 'mosquitto.log'}")
    return "\n".join(out) + "\n"


class Broker:
    def __init__(self, conf: Path, port: int) -> None:
        self.conf, self.port = conf, port
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [str(mosquitto_binary()), "-c", str(self.conf)], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )
        wait_for_port("127.0.0.1", self.port, DEADLINE, self.process)

    def terminate(self) -> int:
        """SIGTERM (as `systemctl stop` sends) and wait for the exit."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(DEADLINE)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(DEADLINE)


def client(user: str, password: str, port: int, clean: bool) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=user, clean_session=clean, protocol=mqtt.MQTTv311)
    c.username_pw_set(user, password)
    return c


def connect(c: mqtt.Client, port: int) -> bool:
    """Connect, wait for CONNACK; return session_present."""
    answer: list = []
    done = threading.Event()

    def on_connect(cl, userdata, flags, rc, props):
        answer.append((flags.session_present, rc))
        done.set()

    c.on_connect = on_connect
    c.connect("127.0.0.1", port)
    c.loop_start()
    assert done.wait(DEADLINE), "no CONNACK"
    present, rc = answer[0]
    assert not rc.is_failure, f"refused: {rc}"
    return present


@pytest.fixture
def broker(tmp_path):
    auth = DeviceAuth(tmp_path / "auth")
    gateway_password = auth.set_gateway("pi-gw")
    node_password = auth.add_device("node-1", "site1")
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(rewrite(PI_CONF.read_text(), tmp_path, port, auth))
    (tmp_path / "data").mkdir()
    b = Broker(conf, port)
    b.start()
    yield b, port, gateway_password, node_password, tmp_path
    b.close()


def test_rewrite_keeps_every_other_line_of_the_shipped_config(tmp_path):
    text = PI_CONF.read_text()
    shipped = settings(text)
    rewritten = settings(rewrite(text, tmp_path, 1884, DeviceAuth(tmp_path / "auth")))
    assert [kv for kv in shipped if kv[0] not in REWRITTEN] == [kv for kv in rewritten if kv[0] not in REWRITTEN]
    values = dict(shipped)
    # What the Pi needs, as the issue says: Debian paths, persistence that works, the nodes' listener.
    assert values["persistence"] == "true" and values["persistence_location"] == "/var/lib/mosquitto/"
    assert int(values["autosave_interval"]) > 0 and int(values["max_queued_messages"]) >= 100_000
    assert values["pid_file"] == "/run/mosquitto/mosquitto.pid" and values["user"] == "mosquitto"
    assert values["log_dest"] == "file /var/log/mosquitto/mosquitto.log"
    assert values["listener"] == "1883" and values["allow_anonymous"] == "false"
    # The container's config stays apart and says so.
    assert "/mosquitto/data/" in (ROOT / "deploy" / "mosquitto.conf").read_text()
    assert "mosquitto-pi.conf" in (ROOT / "deploy" / "mosquitto.conf").read_text()


def test_queued_qos1_messages_survive_a_restart_with_the_shipped_pi_config(broker):
    b, port, gateway_password, node_password, tmp = broker
    # The gateway's persistent session subscribes, then goes away (stopped, or busy elsewhere).
    gw = client("pi-gw", gateway_password, port, clean=False)
    subscribed = threading.Event()
    gw.on_subscribe = lambda *a: subscribed.set()
    connect(gw, port)
    gw.subscribe(topics.TELEMETRY_FILTER, qos=1)
    assert subscribed.wait(DEADLINE)
    gw.disconnect()
    gw.loop_stop()

    # A node publishes 200 readings while nobody is there to take them: they queue in the session.
    node = client("node-1", node_password, port, clean=True)
    connect(node, port)
    sent = []
    for seq in range(200):
        payload = codec.encode_reading(Reading("node-1", "b007", seq, 1_700_000_000_000 + seq, {"t": 20.5}))
        info = node.publish(topics.telemetry_topic("site1", "node-1"), payload, qos=1)
        info.wait_for_publish(DEADLINE)
        assert info.is_published()
        sent.append(payload)
    node.disconnect()
    node.loop_stop()

    # Restart the broker as systemd would: SIGTERM, then start it again.
    assert b.terminate() == 0
    stderr = b.process.stderr.read().decode(errors="replace") if b.process.stderr else ""
    log = (tmp / "mosquitto.log").read_text(errors="replace")
    assert "Error saving" not in log + stderr, log[-2000:] + stderr
    assert (tmp / "data" / "mosquitto.db").stat().st_size > 0
    b.start()

    received: list[bytes] = []
    done = threading.Event()

    def on_message(cl, userdata, msg):
        received.append(msg.payload)
        if len(received) >= len(sent):
            done.set()

    gw = client("pi-gw", gateway_password, port, clean=False)
    gw.on_message = on_message
    try:
        assert connect(gw, port), "the gateway's session did not survive the restart"
        assert done.wait(DEADLINE), f"only {len(received)} of {len(sent)} queued messages came back"
    finally:
        gw.disconnect()
        gw.loop_stop()
    assert received == sent
