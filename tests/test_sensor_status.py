"""A sensor that stops answering is named in the node's status ("down"), not only in its readings.

Gateway side on a real SQLite outbox (storage, de-duplication, the migration of an outbox
written before the column existed, hostile statuses as dead letters); then end to end on the
real firmware (MicroPython unix port) with a simulated PMS5003 on a pty → Pi mosquitto →
gateway → cloud mosquitto → bridge → Kafka (Tansu).
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from tern.core import codec, topics
from tern.core.codec import StatusEvent
from tern.edge.ingest import decode
from tern.edge.outbox import DeadLetter, Outbox

from helpers import bridge_config, run_mp

SITE = "site-dn"


def birth(down: tuple[str, ...] = (), boot: str = "b001", state: str = "online", device: str = "dev-a") -> StatusEvent:
    fw = "0.1.0" if state == "online" else ""
    return StatusEvent(SITE, device, state, boot, fw=fw, reset="PWRON_RESET" if fw else "", down=down)


# --- the outbox --------------------------------------------------------------------------------


def test_outbox_stores_the_sensors_down_and_a_new_set_is_news(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path) as box:
        assert box.add([], statuses=[birth()], received_ms=10).statuses == 1
        # Same boot, same state, a sensor went down: a real change, stored.
        result = box.add([], statuses=[birth(("pms5003",)), birth(("pms5003",))], received_ms=20)
        assert (result.statuses, result.status_duplicates) == (1, 1)  # the second is a re-delivery
        assert box.add([], statuses=[birth(("pms5003", "sht3x"))], received_ms=30).statuses == 1
        assert box.add([], statuses=[birth()], received_ms=40).statuses == 1  # back: news again
        rows = box.take_statuses(10)
        assert [r.event.down for r in rows] == [(), ("pms5003",), ("pms5003", "sht3x"), ()]
        assert rows[1].event == StatusEvent(SITE, "dev-a", "online", "b001", "0.1.0", "PWRON_RESET", 20, (), ("pms5003",))
        box.delete([], [r.id for r in rows])
    with Outbox(path) as box:  # after a restart the latest set still de-duplicates
        assert box.add([], statuses=[birth()]).status_duplicates == 1
        assert box.add([], statuses=[birth(("sht3x",))]).statuses == 1
    raw = sqlite3.connect(path)
    try:
        assert raw.execute("SELECT down FROM node_status").fetchall() == [('["sht3x"]',)]
        assert raw.execute("SELECT down FROM status_events").fetchall() == [('["sht3x"]',)]
    finally:
        raw.close()


def _make_old(path: Path, *, without_dropped: bool) -> None:
    """An outbox as an older gateway left it: the same tables without the newer columns,
    with one status waiting to be forwarded and the device's latest status."""
    with Outbox(path) as box:
        box.add([], statuses=[birth(boot="b00a")], received_ms=77)
    db = sqlite3.connect(path)
    try:
        for table in ("status_events", "node_status"):
            db.execute(f"ALTER TABLE {table} DROP COLUMN down")
            if without_dropped:
                db.execute(f"ALTER TABLE {table} DROP COLUMN dropped")
        db.commit()
        columns = {row[1] for row in db.execute("PRAGMA table_info(status_events)")}
        assert "down" not in columns and ("dropped" in columns) != without_dropped
    finally:
        db.close()


@pytest.mark.parametrize("without_dropped", [False, True], ids=["before-down", "before-dropped"])
def test_an_outbox_of_the_old_schema_gets_the_column_and_keeps_its_rows(tmp_path: Path, without_dropped: bool) -> None:
    path = tmp_path / "old.db"
    _make_old(path, without_dropped=without_dropped)
    with Outbox(path) as box:
        # The waiting status survives the migration and reads as "no sensor down".
        rows = box.take_statuses(10)
        assert [r.event for r in rows] == [StatusEvent(SITE, "dev-a", "online", "b00a", "0.1.0", "PWRON_RESET", 77)]
        # The retained birth re-delivered after the upgrade is still the latest one: ignored.
        assert box.add([], statuses=[birth(boot="b00a")]).status_duplicates == 1
        assert box.add([], statuses=[birth(("pms5003",), boot="b00a")], received_ms=90).statuses == 1
        assert [r.event.down for r in box.take_statuses(10)] == [(), ("pms5003",)]
    db = sqlite3.connect(path)
    try:
        for table in ("status_events", "node_status"):
            assert {"down", "dropped"} <= {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
    finally:
        db.close()
    with Outbox(path) as box:  # opening again is a no-op for the schema
        assert box.status_pending() == 2


# --- ingest: hostile statuses are dead letters ----------------------------------------------------


def test_ingest_decodes_down_and_dead_letters_hostile_lists() -> None:
    topic = topics.status_topic(SITE, "dev-a")
    ok = {"v": 1, "dev": "dev-a", "state": "online", "boot": "0badc0de", "fw": "0.1.0", "down": ["pms5003"]}
    event = decode(topic, json.dumps(ok).encode(), 5)
    assert isinstance(event, StatusEvent) and event.down == ("pms5003",) and event.site == SITE
    for bad in ([f"s{i}" for i in range(17)], ["x" * 33], "pms5003", [1], [None], ["a b"], {"pms5003": True}):
        letter = decode(topic, json.dumps({**ok, "down": bad}).encode(), 5)
        assert isinstance(letter, DeadLetter) and "'down'" in letter.error, (bad, letter)


# --- end to end on the real firmware ---------------------------------------------------------------


class StatusWatch:
    """Every status a device publishes on the Pi broker (the retained one first), decoded, in order."""

    def __init__(self, port: int, device: str) -> None:
        self.got: list[codec.Status] = []
        self.retained: list[bool] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, u, f, rc, p=None: c.subscribe(topics.status_topic(SITE, device), 1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        if msg.payload:
            self.got.append(codec.decode_status(msg.payload))
            self.retained.append(bool(msg.retain))

    def downs(self) -> list[tuple[str, ...]]:
        return [s.down for s in self.got if s.state == "online"]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def retained(port: int, device: str, timeout: float = 5.0) -> codec.Status | None:
    """The status the Pi broker retains for ``device`` now, as a new subscriber sees it."""
    watch = StatusWatch(port, device)
    try:
        deadline = time.monotonic() + timeout
        while not watch.got and time.monotonic() < deadline:
            time.sleep(0.05)
        return watch.got[0] if watch.got and watch.retained[0] else None
    finally:
        watch.close()


@pytest.fixture
def pipeline(tmp_path: Path, mosquitto_factory, kafka_bootstrap: str, kafka_topics: dict[str, str]):
    from tern.cloud.bridge import BridgeThread
    from tern.edge.config import GatewayConfig
    from tern.edge.service import Gateway
    from tern.harness.observe import KafkaTail

    pi, cloud = mosquitto_factory("pi"), mosquitto_factory("cloud")
    gateway = Gateway(GatewayConfig(gateway_id="gw-dn", local_broker=pi.address, cloud_broker=cloud.address,
                                    outbox_path=tmp_path / "outbox.db"))
    bridge = BridgeThread(bridge_config(cloud, kafka_bootstrap, kafka_topics, name="dn"))
    with gateway, bridge:
        tail = KafkaTail(kafka_bootstrap, kafka_topics["readings"]).start()
        try:
            yield {"pi": pi, "gateway": gateway, "tail": tail, "tmp": tmp_path, "kafka": kafka_bootstrap,
                   "status_topic": kafka_topics["status"]}
        finally:
            tail.stop()


def kafka_statuses(bootstrap: str, topic: str, device: str, boot: str) -> list[dict]:
    """The status values Kafka holds for one boot of one device, in partition order (checked)."""
    from tern.cloud.consume import read_all

    records = sorted(read_all(bootstrap, topic, timeout_s=10), key=lambda r: (r.partition, r.offset))
    out = []
    for rec in records:
        value = json.loads(rec.raw)
        if value.get("schema") != codec.KAFKA_STATUS_SCHEMA_ID:
            continue
        codec.decode_kafka_status_value(rec.raw)
        if value["device"] == device and value["boot"] == boot:
            out.append(value)
    return out


def test_a_sensor_that_stops_is_named_in_the_status_down_to_kafka_and_the_others_keep_going(pipeline) -> None:
    from tern.device import EmulatedNode
    from tern.harness.observe import wait_until

    pi, tail = pipeline["pi"], pipeline["tail"]
    device = "fw-down"
    node = EmulatedNode(
        pipeline["tmp"] / "node", device=device, site=SITE, broker=pi.address, interval_ms=200, heap="100K",
        sensors=[
            {"type": "uart", "uart": 2, "protocol": "pms5003", "max_age_ms": 1500, "sim": {"interval_s": 0.1, "seed": 3}},
            {"type": "tmp102", "name": "temp_c"},
        ],
    )
    watch = StatusWatch(pi.port, device)
    kafka: list[dict] = []

    def in_kafka(pred) -> bool:
        """Read the device's status records again (into ``kafka``); True if one matches ``pred``."""
        kafka[:] = kafka_statuses(pipeline["kafka"], pipeline["status_topic"], device, node.boot)
        return any(pred(v) for v in kafka)

    def readings(since: int) -> list[dict]:
        return [value["readings"] for identity, value, _ in tail.records()[since:] if identity[0] == device]

    try:
        node.start()
        assert wait_until(lambda: any("pm2_5" in r and "temp_c" in r for r in readings(0)), 60), node.log_text()[-2000:]
        assert wait_until(lambda: watch.downs() and watch.downs()[-1] == (), 30), (watch.got, node.log_text()[-2000:])

        # The PMS5003 stops answering: the node publishes a fresh retained birth naming it.
        pms = node.sims[0]
        pms.pause()
        mark = len(tail.records())
        assert wait_until(lambda: ("pms5003",) in watch.downs(), 30), (watch.got, node.log_text()[-2000:])
        now = retained(pi.port, device)
        assert now is not None and now.state == "online" and now.down == ("pms5003",) and now.boot == node.boot, now
        assert any(line.startswith("TERN status down=pms5003") for line in node.tail), node.log_text()[-2000:]
        # ...which the gateway forwards and the bridge writes to Kafka.
        assert wait_until(lambda: in_kafka(lambda v: v["down"] == ["pms5003"]), 60), kafka
        down_at = next(i for i, v in enumerate(kafka) if v["down"] == ["pms5003"])
        assert kafka[down_at]["state"] == "online" and kafka[down_at]["fw"]
        # Meanwhile the TMP102 keeps reporting, and the readings name the silent sensor.
        assert wait_until(lambda: sum(1 for r in readings(mark) if r.get("down") == "pms5003" and "temp_c" in r) >= 5, 60)
        assert not [r for r in readings(mark) if r.get("down") == "pms5003" and "pm2_5" in r]

        # It comes back: a new birth without it, on the broker and in Kafka.
        seen = len(watch.got)
        pms.pause(False)
        assert wait_until(lambda: () in [s.down for s in watch.got[seen:] if s.state == "online"], 30), watch.got
        assert retained(pi.port, device).down == ()
        assert wait_until(lambda: in_kafka(lambda v: False) or any(v["down"] == [] for v in kafka[down_at + 1:]), 60), kafka
        assert kafka[-1]["down"] == [] and kafka[-1]["state"] == "online"
        mark = len(tail.records())
        assert wait_until(lambda: any("pm2_5" in r and "temp_c" in r and "down" not in r for r in readings(mark)), 30)
        # One boot all along, every status valid; no status storm: a handful, not one per reading.
        assert node.boots == 1 and not [e for e in node.errors if "Error" in e], node.log_text()[-2000:]
        assert len(watch.got) <= 6, watch.got
        assert pipeline["gateway"].stats()["dead_letters"] == 0

        # A hostile "down" on the Pi broker is a dead letter; the gateway keeps forwarding.
        evil = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        evil.connect("127.0.0.1", pi.port)
        evil.loop_start()
        try:
            bad = {"v": 1, "dev": "evil", "state": "online", "boot": "0badc0de", "down": ["x" * 40] * 20}
            evil.publish(topics.status_topic(SITE, "evil"), json.dumps(bad), qos=1).wait_for_publish(10)
        finally:
            evil.disconnect()
            evil.loop_stop()
        assert wait_until(lambda: pipeline["gateway"].stats()["dead_letters"] == 1, 30), pipeline["gateway"].stats()
        mark = len(tail.records())
        assert wait_until(lambda: len(readings(mark)) >= 3, 30)
    finally:
        node.kill()
        watch.close()


# --- the gateway's status command ----------------------------------------------------------------


def test_gateway_status_shows_the_sensors_down(tmp_path: Path) -> None:
    """``tern-gateway status`` (the real command, service stopped: the outbox file only) names a
    node's sensors that are down; an outbox of the old schema, opened read-only, still shows."""
    import os
    import subprocess
    import sys

    from tern.edge.health import read_node_rows
    from tern.edge.outbox import open_readonly

    def run_status(path: Path) -> str:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TERN_") or k == "TERN_CACHE"}
        env.update(COLUMNS="160", NO_COLOR="1", TERM="dumb")
        result = subprocess.run([sys.executable, "-m", "tern.edge", "status", "--outbox", str(path), "--url",
                                 "http://127.0.0.1:9"], capture_output=True, text=True, timeout=60, env=env)
        assert "Traceback" not in result.stderr, result.stderr
        return result.stdout

    path = tmp_path / "outbox.db"
    with Outbox(path) as box:
        box.add([], statuses=[birth(("pms5003", "sht3x")), birth(device="dev-b")])
    db = open_readonly(path)
    try:
        assert {r["device"]: r["down"] for r in read_node_rows(db)} == {"dev-a": ["pms5003", "sht3x"], "dev-b": []}
    finally:
        db.close()
    out = run_status(path)
    line_a = next(line for line in out.splitlines() if "dev-a" in line)
    line_b = next(line for line in out.splitlines() if "dev-b" in line)
    assert "online (pms5003, sht3x down)" in line_a and "down" not in line_b, out

    old = tmp_path / "old.db"
    _make_old(old, without_dropped=False)
    db = open_readonly(old)
    try:
        assert [(r["device"], r["state"], r["down"]) for r in read_node_rows(db)] == [("dev-a", "online", [])]
    finally:
        db.close()
    assert "dev-a" in run_status(old)


# --- the firmware's bound on status messages (MicroPython unix port) ----------------------------


def test_a_flapping_sensor_cannot_flood_the_status(tmp_path: Path) -> None:
    """The firmware's Sensors on the real unix port, a TMP102 that fails and answers while the ADC
    keeps going: a one-reading blip is no news; a sensor flapping every two readings costs STATUS_BURST
    statuses, then one per STATUS_EVERY_MS (shortened here), each naming the set as it is then."""
    result = run_mp(
        tmp_path,
        """
import os, json, time
import tern_sensors
from tern_sensors import Sensors

class Client:
    def __init__(self):
        self.sent = []
    def publish(self, topic, msg, retain, qos):
        self.sent.append(json.loads(msg))

class Node:
    t_status = "tern/s/d/status"
    def __init__(self, s):
        self.client = Client()
        self.s = s
    def _status(self, state):
        d = {"state": state}
        self.s.status(d)
        return json.dumps(d)
    def drop(self, why):
        raise RuntimeError(why)

def run(pattern, reads, pause_ms=0):
    s = Sensors([{"type": "tmp102", "name": "t"}, {"type": "adc", "name": "mv", "pin": 34}])
    node = Node(s)
    node._status("online")  # the birth at connect: all answering
    t0 = time.ticks_ms()
    for i in range(reads):
        os.putenv("TERN_EMU_TMP102", "fail" if pattern(i) else "20.0")
        s.read({})
        s.tell(node)
        if pause_ms:
            time.sleep_ms(pause_ms)
    return node.client.sent, time.ticks_diff(time.ticks_ms(), t0)

out = {"burst": tern_sensors.STATUS_BURST}
out["blips"], _ = run(lambda i: i % 2, 200)               # fails every other reading
out["flaps"], _ = run(lambda i: (i // 2) % 2, 200)         # fails two readings, answers two
tern_sensors.STATUS_EVERY_MS = 300
out["slow"], out["slow_ms"] = run(lambda i: (i // 2) % 2 and i < 150, 200, 10)
print(json.dumps(out))
""",
        env={"TERN_EMU_TMP102": "20.0", "TERN_EMU_ADC_34": "1500"},
    )
    burst = result["burst"]
    assert result["blips"] == []
    assert [m.get("down") for m in result["flaps"]] == [["t"], None, ["t"]][:burst] and len(result["flaps"]) == burst
    slow, elapsed = result["slow"], result["slow_ms"]
    # Refilled one per 300 ms: more than the burst, never more than the bucket allows.
    assert burst < len(slow) <= burst + elapsed // 300 + 1, (len(slow), elapsed)
    # Coalesced: the last status tells the set as it ended (all answering), not a stale one.
    assert "down" not in slow[-1] and all(m["state"] == "online" for m in slow)


def test_the_firmware_config_check_makes_any_label_fit_the_status() -> None:
    """A label (or a reading name standing for one) that the status contract would refuse is
    turned into one it takes, by the firmware's own config check, at boot."""
    from tern.device.emulate import check_config

    sensors = [
        {"type": "tmp102", "name": "temp c"},
        {"type": "uart", "uart": 2, "protocol": "pms5003", "label": "PM 2.5 (Plantower) in the attic, north side"},
        {"type": "sht3x"},
        {"type": "adc", "name": "adc_mv", "label": ""},
    ]
    merged = check_config({"site": "s", "device": "d", "sensors": [dict(x) for x in sensors]})["sensors"]
    labels = [spec.get("label") for spec in merged]
    assert labels == ["temp_c", "PM_2.5__Plantower__in_the_attic_", None, "sensor"]
    for label in ("temp_c", "PM_2.5__Plantower__in_the_attic_", "sht3x", "sensor"):
        codec.decode_status(json.dumps({"v": 1, "dev": "d", "state": "online", "boot": "0badc0de", "down": [label]}).encode())
