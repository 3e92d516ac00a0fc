"""The bridge's Prometheus metrics, /healthz and retained presence, against real mosquitto and Tansu.

Counters are checked against what is really in Kafka; health against brokers really stopped;
the last will against a bridge process really killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tern.cloud import presence
from tern.cloud.bridge import BridgeError, BridgeThread
from tern.cloud.config import BridgeConfig
from tern.cloud.consume import read_all
from tern.core import codec, topics
from tern.core.errors import ConfigError
from tern.harness.stack import Mosquitto, Tansu, ensure_topics, free_port

from helpers import bridge_config, http_status, scrape_url, value, wait_until

GATEWAY = "gw-metrics"
BOOT = "feed0001"
REPO = Path(__file__).resolve().parents[1]
#: How long a wait on the bridge's HTTP answers may take.
POLL_S = 30.0


def config_for(broker: Mosquitto, bootstrap: str, kafka_topics: dict[str, str], **extra) -> BridgeConfig:
    """A bridge that gives up connecting after 10 s and retries Kafka within 0.2 to 1 s."""
    return bridge_config(broker, bootstrap, kafka_topics, name=f"m{uuid.uuid4().hex[:8]}", connect_timeout_s=10,
                         retry_initial_s=0.2, retry_max_s=1.0, **extra)


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """The bridge's /metrics on ``port``, parsed."""
    return scrape_url(f"http://127.0.0.1:{port}/metrics")


def publish(broker: Mosquitto, messages: list[tuple[str, bytes]]) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:6]}")
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        for topic, payload in messages:
            info = client.publish(topic, payload, qos=1)
            info.wait_for_publish(10)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def make_batch(bseq: int, n: int, statuses: tuple = ()) -> bytes:
    readings = tuple(
        codec.Reading(f"dev-{i % 2}", BOOT, bseq * 100 + i, 1, {"t": float(i)}, site="s1", received_ms=2) for i in range(n)
    )
    return codec.encode_batch(codec.Batch(GATEWAY, bseq, 3, readings=readings, statuses=statuses))


class StatusWatcher:
    """Subscribes to a bridge's retained status topic and keeps every message it gets."""

    def __init__(self, broker: Mosquitto, name: str) -> None:
        self.messages: list[dict] = []
        self._cond = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"watch-{uuid.uuid4().hex[:6]}")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topics.bridge_status_topic(name), qos=1)
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def _on_message(self, client, userdata, message) -> None:
        with self._cond:
            self.messages.append(dict(presence.decode_status(message.payload), retained=bool(message.retain)))
            self._cond.notify_all()

    def wait_for(self, state: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for message in self.messages:
                    if message["state"] == state:
                        return message
                left = deadline - time.monotonic()
                assert left > 0, f"no {state!r} status within {timeout} s: {self.messages}"
                self._cond.wait(left)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# --- metrics ----------------------------------------------------------------------------


def test_metrics_agree_with_kafka(mosquitto, kafka_bootstrap, kafka_topics):
    port = free_port()
    config = config_for(mosquitto, kafka_bootstrap, kafka_topics, metrics_port=port)
    online = codec.StatusEvent(site="s1", device="dev-0", state="online", boot=BOOT, fw="1", received_ms=4)
    messages = [(topics.batch_topic(GATEWAY), make_batch(b, 3 + b)) for b in range(1, 5)]
    messages.append((topics.batch_topic(GATEWAY), make_batch(5, 2, (online,))))
    messages.append((topics.batch_topic(GATEWAY), b"{not json"))
    with BridgeThread(config):
        publish(mosquitto, messages)
        samples = wait_until(
            lambda: (s := scrape(port))
            and value(s, "tern_bridge_batches_confirmed_total") == 5
            and value(s, "tern_bridge_deadlettered_total") == 1
            and s,
            POLL_S, "5 confirmed and 1 dead-lettered", interval=0.2,
        )
    readings = read_all(kafka_bootstrap, kafka_topics["readings"], timeout_s=15)
    statuses = read_all(kafka_bootstrap, kafka_topics["status"], timeout_s=15)
    dead = read_all(kafka_bootstrap, kafka_topics["deadletter"], timeout_s=15)
    assert (len(readings), len(statuses), len(dead)) == (4 + 5 + 6 + 7 + 2, 1, 1)

    assert value(samples, "tern_bridge_batches_matched_total") == 6
    assert value(samples, "tern_bridge_records_written_total", kind="reading") == len(readings)
    assert value(samples, "tern_bridge_records_written_total", kind="status") == len(statuses)
    assert value(samples, "tern_bridge_deadlettered_total") == len(dead)
    assert value(samples, "tern_bridge_retried_total") == 0
    assert value(samples, "tern_bridge_duplicates_total") == 0  # nothing was sent twice
    assert value(samples, "tern_bridge_inflight") == 0
    assert value(samples, "tern_bridge_oldest_unacked_age_seconds") == 0
    assert value(samples, "tern_bridge_mqtt_connected") == 1
    assert value(samples, "tern_bridge_kafka_connected") == 1
    assert value(samples, "tern_bridge_up") == 1
    # Every Kafka write is timed: today one per message (five batches, one dead letter); a
    # bridge that groups or splits writes differently changes the count, not its presence.
    writes = value(samples, "tern_bridge_kafka_write_seconds_count")
    assert 1 <= writes <= 6 + len(readings) + len(statuses)
    assert 0 < value(samples, "tern_bridge_kafka_write_seconds_sum") < 60
    assert value(samples, "tern_bridge_kafka_write_seconds_bucket", le="+Inf") == writes


def test_healthz_follows_the_brokers(mosquitto, tmp_path):
    """200 with both brokers up; 503 naming Kafka when Kafka stops, naming MQTT when the broker stops."""
    tansu = Tansu(tmp_path / "tansu").start()
    try:
        names = {k: f"h.{k}.{uuid.uuid4().hex[:6]}" for k in ("readings", "status", "deadletter")}
        asyncio.run(ensure_topics(tansu.bootstrap, list(names.values())))
        port = free_port()
        with BridgeThread(config_for(mosquitto, tansu.bootstrap, names, metrics_port=port)):
            status, body = http_status(f"http://127.0.0.1:{port}/healthz")
            assert status == 200, body
            info = json.loads(body)
            assert info["status"] == "ok" and info["mqtt"] is True and info["kafka"] is True
            assert http_status(f"http://127.0.0.1:{port}/nothing")[0] == 404

            tansu.stop()
            down = wait_until(lambda: (r := http_status(f"http://127.0.0.1:{port}/healthz"))[0] == 503 and r,
                              POLL_S, "503 for Kafka", interval=0.2)
            info = json.loads(down[1])
            assert info == dict(info, status="unavailable", kafka=False, mqtt=True)
            assert value(scrape(port), "tern_bridge_up") == 0

            mosquitto.stop()
            down = wait_until(lambda: json.loads(http_status(f"http://127.0.0.1:{port}/healthz")[1])["mqtt"] is False,
                              POLL_S, "MQTT down in /healthz", interval=0.2)
            assert http_status(f"http://127.0.0.1:{port}/healthz")[0] == 503
    finally:
        tansu.stop()


def test_metrics_config_and_busy_port(mosquitto, kafka_bootstrap, kafka_topics):
    assert BridgeConfig.from_env({"TERN_BRIDGE_METRICS_PORT": "9464", "TERN_BRIDGE_METRICS_HOST": "0.0.0.0"}).metrics_port == 9464
    assert BridgeConfig().metrics_port == 0 and BridgeConfig().metrics_host == "127.0.0.1"
    for bad in ("abc", "70000", -1):
        with pytest.raises(ConfigError, match="metrics_port"):
            BridgeConfig(metrics_port=bad)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = config_for(mosquitto, kafka_bootstrap, kafka_topics, metrics_port=taken.getsockname()[1])
        with pytest.raises(BridgeError, match="metrics"):
            BridgeThread(config).start()


# --- presence: retained status and last will ---------------------------------------------------


def start_bridge_process(broker: Mosquitto, bootstrap: str, kafka_topics: dict[str, str], name: str, port: int) -> subprocess.Popen:
    env = dict(os.environ, TERN_BRIDGE_METRICS_PORT=str(port))
    return subprocess.Popen(
        [sys.executable, "-m", "tern.cloud", "run", "--mqtt", broker.address, "--kafka", bootstrap,
         "--topic", kafka_topics["readings"], "--status-topic", kafka_topics["status"],
         "--deadletter", kafka_topics["deadletter"], "--name", name, "--stats-every", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO,
    )


def wait_healthy(proc: subprocess.Popen, port: int) -> None:
    def healthy():
        assert proc.poll() is None, proc.stdout.read().decode(errors="replace")
        try:
            return http_status(f"http://127.0.0.1:{port}/healthz")[0] == 200
        except OSError:
            return False

    wait_until(healthy, 60, "bridge process healthy", interval=0.2)


def test_killed_bridge_leaves_retained_offline(mosquitto, kafka_bootstrap, kafka_topics):
    name = f"k{uuid.uuid4().hex[:6]}"
    port = free_port()
    proc = start_bridge_process(mosquitto, kafka_bootstrap, kafka_topics, name, port)
    watcher = StatusWatcher(mosquitto, name)
    try:
        wait_healthy(proc, port)
        assert watcher.wait_for("online")["clean"] is True
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        will = watcher.wait_for("offline")
        assert will["clean"] is False and will["bridge"] == name
    finally:
        watcher.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        proc.stdout.close()
    # Anyone subscribing later sees the bridge as dead, retained by the broker.
    late = StatusWatcher(mosquitto, name)
    try:
        retained = late.wait_for("offline")
        assert retained["retained"] and retained["clean"] is False
    finally:
        late.close()


def test_stopped_bridge_says_offline_cleanly(mosquitto, kafka_bootstrap, kafka_topics):
    name = f"s{uuid.uuid4().hex[:6]}"
    port = free_port()
    proc = start_bridge_process(mosquitto, kafka_bootstrap, kafka_topics, name, port)
    try:
        wait_healthy(proc, port)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
    late = StatusWatcher(mosquitto, name)
    try:
        retained = late.wait_for("offline")
        assert retained["retained"] and retained["clean"] is True
    finally:
        late.close()
