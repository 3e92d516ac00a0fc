"""The real firmware on the MicroPython unix port against a real mosquitto: no mocks.

Each test watches what actually crosses the broker with a paho subscriber.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from helpers import require_toolchain

from tern.core.codec import decode_reading, decode_status
from tern.device import EmulatedNode
from tern.harness.stack import Mosquitto
from tern.core.topics import ack_topic, status_topic, telemetry_topic

SITE = "lab"


_require_toolchain = require_toolchain


class Watcher:
    """A paho subscriber that records every message it sees (bounded by the test)."""

    def __init__(self, port: int, topic: str = "tern/#") -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(topic, 1)
        self.client.loop_start()
        assert self.subscribed.wait(5), "watcher could not subscribe"

    def _on_message(self, client, userdata, msg) -> None:
        with self.lock:
            self.messages.append((msg.topic, msg.payload, bool(msg.retain)))

    def on(self, topic: str) -> list[bytes]:
        with self.lock:
            return [p for t, p, _ in self.messages if t == topic]

    def wait(self, predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            time.sleep(0.05)
        return bool(predicate(self))

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def retained_status(port: int, device: str, timeout: float = 5.0):
    """What a brand-new subscriber gets on the node's status topic (the retained message)."""
    w = Watcher(port, status_topic(SITE, device))
    try:
        w.wait(lambda w: w.on(status_topic(SITE, device)), timeout)
        payloads = w.on(status_topic(SITE, device))
        return decode_status(payloads[-1]) if payloads else None
    finally:
        w.close()


def seqs(watcher: Watcher, device: str, boot: str | None = None) -> list[int]:
    out = []
    for raw in watcher.on(telemetry_topic(SITE, device)):
        reading = decode_reading(raw, site=SITE, topic_device=device)
        if boot is None or reading.boot == boot:
            out.append(reading.seq)
    return out


@pytest.fixture
def broker(tmp_path: Path):
    _require_toolchain()
    with Mosquitto(tmp_path / "broker") as m:
        yield m


def make_node(tmp_path: Path, broker: Mosquitto, device: str, **kw) -> EmulatedNode:
    return EmulatedNode(tmp_path / device, device=device, site=SITE, broker=broker.address, **kw)


def test_readings_birth_and_last_will(tmp_path: Path, broker: Mosquitto) -> None:
    watcher = Watcher(broker.port)
    node = make_node(tmp_path, broker, "fw-basic", interval_ms=100, max_readings=8)
    try:
        node.start()
        assert node.wait_done(20), node.log_text()
        assert watcher.wait(lambda w: len(seqs(w, node.device)) >= 8, 5)
        readings = [decode_reading(raw, site=SITE, topic_device=node.device) for raw in watcher.on(telemetry_topic(SITE, node.device))]
        assert [r.seq for r in readings] == list(range(1, 9))
        assert {r.boot for r in readings} == {node.boot}
        now_ms = time.time() * 1000
        for r in readings:
            assert isinstance(r.ts_ms, int) and abs(r.ts_ms - now_ms) < 60_000
            assert isinstance(r.values["adc_mv"], int) and isinstance(r.values["temp_c"], float)
        assert node.sent == 8

        birth = retained_status(broker.port, node.device)
        assert birth is not None and birth.state == "online"
        assert birth.boot == node.boot and birth.fw and birth.reset == "PWRON_RESET"

        node.kill()  # no DISCONNECT: the broker must publish the retained will
        assert not node.running
        deadline = time.monotonic() + 10
        status = birth
        while time.monotonic() < deadline and status.state != "offline":
            time.sleep(0.2)
            status = retained_status(broker.port, node.device, 1.0) or status
        assert status.state == "offline" and status.boot == node.boot
    finally:
        node.kill()
        watcher.close()


def test_acks_trim_ring_and_unacked_resent_after_broker_restart(tmp_path: Path, broker: Mosquitto) -> None:
    node = make_node(
        tmp_path, broker, "fw-acks", interval_ms=100, max_readings=6, keepalive=10, extra_config={"bundle_max": 1}
    )
    watcher = Watcher(broker.port)
    try:
        node.start()
        assert node.wait_done(20), node.log_text()
        assert watcher.wait(lambda w: len(seqs(w, node.device)) >= 6, 5)
        ack = ack_topic(SITE, node.device)
        # An ack for another boot is stale and must be ignored...
        watcher.publish(ack, json.dumps({"v": 1, "boot": "deadbeef", "seq": 6}).encode())
        # ...ours commits readings 1..3.
        watcher.publish(ack, json.dumps({"v": 1, "boot": node.boot, "seq": 3}).encode())
        assert node.wait_for(lambda n: n.acked == 3, 5), node.log_text()
        time.sleep(0.3)
        assert node.acked == 3
        watcher.close()

        broker.stop()  # the node loses the broker with 4..6 unacked: they go to the flash spill
        assert node.wait_for(lambda n: "disconnected" in " ".join(n.tail), 15), node.log_text()
        broker.start()
        watcher = Watcher(broker.port)
        assert node.wait_for(lambda n: n.connects >= 2, 15), node.log_text()
        assert watcher.wait(lambda w: len(seqs(w, node.device)) >= 3, 10), node.log_text()
        time.sleep(0.5)
        # Exactly the unacked readings, in order, same boot: acked ones are not resent.
        assert seqs(watcher, node.device, node.boot) == [4, 5, 6]
        assert node.spilled == 3 and node.replayed == 3, node.log_text()

        watcher.publish(ack, json.dumps({"v": 1, "boot": node.boot, "seq": 6}).encode())
        assert node.wait_for(lambda n: f"TERN spill_acked {n.boot} 6" in n.tail, 5), node.log_text()
        assert not list(node.workdir.glob("spill.*")), "an all-acked spill leaves no file"
    finally:
        node.kill()
        watcher.close()


def test_ring_is_bounded_and_counts_drops(tmp_path: Path, broker: Mosquitto) -> None:
    node = make_node(
        tmp_path, broker, "fw-ring", interval_ms=20, max_readings=60, extra_config={"ring_size": 5, "spill_max": 0}
    )
    watcher = Watcher(broker.port)
    try:
        node.start()
        assert node.wait_done(20), node.log_text()
        assert node.wait_for(lambda n: n.stats.get("seq") == 60, 5)
        stats = node.stats
        assert stats["ring"] == 5 and stats["dropped"] == 55, stats
        assert stats["mem_free"] > 8000, stats
        assert node.dropped == 55
        # All 60 went out live (the ring only holds what is unacked), in order.
        assert watcher.wait(lambda w: len(seqs(w, node.device)) >= 60, 5)
        assert seqs(watcher, node.device) == list(range(1, 61))
    finally:
        node.kill()
        watcher.close()


def test_full_ring_at_default_size_fits_small_heap(tmp_path: Path, broker: Mosquitto) -> None:
    """64 unacked readings in the emulator's default heap (100K, an ESP32 without PSRAM) with
    the UART sensor on: no MemoryError."""
    node = make_node(
        tmp_path,
        broker,
        "fw-heap",
        heap="100K",
        extra_config={"spill_max": 0},
        interval_ms=10,
        max_readings=150,
        sensors=[
            {"type": "adc", "name": "batt_mv", "pin": 34},
            {"type": "tmp102", "name": "temp_c"},
            {"type": "uart", "uart": 2, "protocol": "pms5003", "sim": {"interval_s": 0.02, "bad_fraction": 0.2}},
        ],
    )
    try:
        node.start()
        assert node.wait_done(30), node.log_text()
        assert node.wait_for(lambda n: n.stats.get("seq") == 150, 5)
        assert node.stats["ring"] == 64 and node.stats["dropped"] == 150 - 64
        assert node.boots == 1 and node.resets == 0, node.log_text()
        assert not [e for e in node.errors if "MemoryError" in e], node.log_text()
    finally:
        node.kill()
