"""Sensors wired to the Pi: pyserial reads a pty-backed simulated PMS5003 / GPS, the readings go
through the gateway's outbox to Kafka, and the adapter is unplugged and plugged back (the pty
and the udev-like symlink to it disappear and a new one appears under the same name)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tern.cloud.bridge import BridgeThread
from tern.cloud.config import BridgeConfig
from tern.cloud.consume import read_all
from tern.core import codec
from tern.core.errors import ConfigError
from tern.device.serial_sim import SerialSim
from tern.edge.config import GatewayConfig
from tern.edge.config_file import resolve
from tern.edge.outbox import Outbox
from tern.edge.serial_sensors import SerialSensor, parse_specs

from helpers import poll_until


def plug(link: Path, sim: SerialSim) -> None:
    """The adapter appears: a symlink (as udev makes /dev/serial/by-id/...) to the sim's pty."""
    tmp = link.with_suffix(".new")
    os.symlink(sim.path, tmp)
    os.replace(tmp, link)


def rows(outbox: Outbox, device: str) -> list[tuple[str, int, dict]]:
    import json

    return [(boot, seq, json.loads(values)) for boot, seq, values in outbox.db.execute(
        "SELECT boot, seq, \"values\" FROM outbox WHERE device = ? ORDER BY id", [device]).fetchall()]


def statuses(outbox: Outbox, device: str) -> list[str]:
    return [s for (s,) in outbox.db.execute("SELECT state FROM status_events WHERE device = ? ORDER BY id", [device])]


# --- config ----------------------------------------------------------------------------


def test_spec_parsing_and_clear_errors(tmp_path: Path) -> None:
    specs = parse_specs("/dev/ttyUSB0:9600:pms5003:pi-pm, /dev/serial/by-id/gps:4800:nmea:pi-gps:roof", "gw1")
    assert [(s.path, s.baud, s.protocol, s.device, s.site) for s in specs] == [
        ("/dev/ttyUSB0", 9600, "pms5003", "pi-pm", "gw1"), ("/dev/serial/by-id/gps", 4800, "nmea", "pi-gps", "roof")]
    assert parse_specs("", "gw1") == []
    for bad, words in (("/dev/ttyUSB0:9600:pms5003", "PATH:BAUD:PROTOCOL:DEVICE"),
                       ("ttyUSB0:9600:pms5003:a", "absolute device path"),
                       ("/dev/ttyUSB0:9601:pms5003:a", "baud must be one of"),
                       ("/dev/ttyUSB0:9600:sds011:a", "protocol must be one of pms5003, nmea"),
                       ("/dev/ttyUSB0:9600:nmea:-bad", "invalid device"),
                       ("/dev/a:9600:nmea:x,/dev/b:9600:nmea:x", "its own device id")):
        with pytest.raises(ConfigError, match=words):
            parse_specs(bad, "gw1")
    # As a gateway setting: from the file and from the environment, errors naming the source.
    conf = tmp_path / "gw.toml"
    conf.write_text('gateway_id = "gw1"\ncloud_broker = "127.0.0.1:1"\noutbox_path = "%s"\n'
                    'serial_sensors = "/dev/ttyUSB0:9600:pms5003:pi-pm"\n' % (tmp_path / "o.db"))
    assert resolve(conf, env={}).serial_sensor_specs()[0].device == "pi-pm"
    with pytest.raises(ConfigError, match="TERN_SERIAL_SENSORS.*|serial_sensors.*protocol"):
        resolve(conf, env={"TERN_SERIAL_SENSORS": "/dev/ttyUSB0:9600:bogus:x"})
    with pytest.raises(ConfigError, match="serial_sensors"):
        GatewayConfig(gateway_id="gw1", cloud_broker="127.0.0.1:1", outbox_path=tmp_path / "o.db", serial_sensors="nope")


# --- unplug and replug ------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["pms5003", "nmea"])
def test_sensor_survives_unplug_and_replug(tmp_path: Path, protocol: str) -> None:
    link = tmp_path / "ttyUSB-sensor"
    outbox = Outbox(tmp_path / "outbox.db")
    spec = parse_specs(f"{link}:9600:{protocol}:pi-{protocol}", "gw1")[0]
    reader = SerialSensor(spec, outbox, retry_s=0.1, stale_s=5)
    sim = SerialSim(protocol=protocol, interval_s=0.05, bad_fraction=0.3, seed=11)
    sim2 = None
    try:
        reader.start()  # before the adapter is plugged in: it waits for it
        assert poll_until(lambda: reader.stats()["opens"] == 0) and not reader.stats()["online"]
        plug(link, sim)
        sim.start()
        assert poll_until(lambda: len(rows(outbox, spec.device)) >= 10), reader.stats()
        assert poll_until(lambda: reader.stats()["bad_frames"] >= 1), reader.stats()
        first_boot = rows(outbox, spec.device)[0][0]

        sim.stop()          # unplugged: the pty goes away...
        os.unlink(link)     # ...and so does its name
        assert poll_until(lambda: reader.stats()["unplugged"] == 1 and not reader.stats()["online"]), reader.stats()
        before = len(rows(outbox, spec.device))
        time.sleep(0.3)     # (while unplugged nothing may arrive; the reader keeps retrying)
        assert len(rows(outbox, spec.device)) == before

        sim2 = SerialSim(protocol=protocol, interval_s=0.05, seed=12)
        plug(link, sim2)    # plugged back: a new pty under the same name
        sim2.start()
        assert poll_until(lambda: len({b for b, _, _ in rows(outbox, spec.device)}) == 2), reader.stats()
        assert poll_until(lambda: len(rows(outbox, spec.device)) >= before + 5), reader.stats()
    finally:
        reader.stop()
        sim.stop()
        if sim2 is not None:
            sim2.stop()
    got = rows(outbox, spec.device)
    boots = list(dict.fromkeys(b for b, _, _ in got))
    assert len(boots) == 2 and boots[0] == first_boot
    for boot in boots:  # gap-free seq per opening
        assert [s for b, s, _ in got if b == boot] == list(range(1, 1 + sum(1 for b, _, _ in got if b == boot)))
    names = {"pms5003": {"pm1_0", "pm2_5", "pm10"}, "nmea": {"lat", "lon", "alt_m", "sats", "fix"}}[protocol]
    assert all(names <= set(v) for _, _, v in got)
    if protocol == "nmea":  # speed comes from the RMC that follows a boot's first GGA
        assert all("speed_kn" in v for _, seq, v in got if seq > 1)
    assert any(v.get("bad_frames", 0) >= 1 for b, _, v in got if b == boots[0])
    assert statuses(outbox, spec.device) == ["online", "offline", "online", "offline"]
    stats = reader.stats()
    assert stats["opens"] == 2 and stats["unplugged"] == 1 and stats["dropped_full"] == 0
    outbox.close()


def test_silent_sensor_goes_offline_and_comes_back(tmp_path: Path) -> None:
    link = tmp_path / "ttyPM"
    outbox = Outbox(tmp_path / "outbox.db")
    spec = parse_specs(f"{link}:9600:pms5003:pi-pm", "gw1")[0]
    with SerialSim(protocol="pms5003", interval_s=0.05) as sim:
        plug(link, sim)
        sim.start()
        reader = SerialSensor(spec, outbox, retry_s=0.1, stale_s=0.5).start()
        try:
            assert poll_until(lambda: reader.stats()["online"])
            sim.pause()
            assert poll_until(lambda: reader.stats()["stale"] >= 1 and not reader.stats()["online"]), reader.stats()
            sim.pause(False)
            assert poll_until(lambda: reader.stats()["online"]), reader.stats()
        finally:
            reader.stop()
    assert statuses(outbox, spec.device)[:3] == ["online", "offline", "online"]
    outbox.close()


# --- all the way to Kafka -------------------------------------------------------------------


def test_pi_wired_sensor_readings_and_liveness_reach_kafka(tmp_path: Path, mosquitto_factory, kafka_bootstrap: str,
                                                           kafka_topics: dict[str, str]) -> None:
    from tern.edge.service import Gateway

    pi, cloud = mosquitto_factory("pi"), mosquitto_factory("cloud")
    link = tmp_path / "ttyACM-gps"
    sim = SerialSim(protocol="nmea", interval_s=0.1, bad_fraction=0.2, seed=4)
    plug(link, sim)
    sim.start()
    gateway = Gateway(GatewayConfig(gateway_id="gw-serial", local_broker=pi.address, cloud_broker=cloud.address,
                                    outbox_path=tmp_path / "outbox.db", serial_sensors=f"{link}:9600:nmea:pi-gps:roof"))
    bridge = BridgeThread(BridgeConfig(name="serial", mqtt_broker=cloud.address, kafka_bootstrap=kafka_bootstrap,
                                       readings_topic=kafka_topics["readings"], status_topic=kafka_topics["status"],
                                       deadletter_topic=kafka_topics["deadletter"]))
    try:
        with gateway, bridge:
            assert poll_until(lambda: gateway.stats()["serial_sensors"]["pi-gps"]["readings"] >= 10, 30), gateway.stats()
            sim.stop()
            os.unlink(link)
            assert poll_until(lambda: gateway.stats()["serial_sensors"]["pi-gps"]["unplugged"] == 1, 20)
            stored = gateway.stats()["serial_sensors"]["pi-gps"]["readings"]
            assert poll_until(lambda: gateway.stats()["pending"] == 0 and gateway.stats()["status_pending"] == 0, 30), gateway.stats()
        records = [r for r in read_all(kafka_bootstrap, kafka_topics["readings"], timeout_s=20, expect=stored)
                   if r.key == "pi-gps"]
        values = [codec.decode_kafka_value(r.raw) for r in records]
        assert [v["seq"] for v in values] == list(range(1, stored + 1))
        assert {v["site"] for v in values} == {"roof"} and {v["gateway"] for v in values} == {"gw-serial"}
        assert all(52.4 < v["readings"]["lat"] < 52.6 and v["readings"]["fix"] == 1 for v in values)
        states = [codec.decode_kafka_status_value(r.raw) for r in read_all(kafka_bootstrap, kafka_topics["status"], timeout_s=20, expect=2)]
        assert [s["state"] for s in states if s["device"] == "pi-gps"] == ["online", "offline"]
    finally:
        sim.stop()


def test_simulator_command_line_feeds_pyserial(tmp_path: Path) -> None:
    """`python -m tern.device.serial_sim` (for trying a gateway by hand): a pty that pyserial reads."""
    import subprocess
    import sys

    import serial

    from tern.core.sensor_protocols import PMSStream

    link = tmp_path / "ttyFAKE"
    proc = subprocess.Popen([sys.executable, "-m", "tern.device.serial_sim", "--protocol", "pms5003", "--interval", "0.05",
                             "--seconds", "20", "--link", str(link)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == str(link)
        stream = PMSStream()
        frames = []
        with serial.Serial(str(link), 9600, timeout=0.2) as port:
            deadline = time.monotonic() + 15
            while len(frames) < 5 and time.monotonic() < deadline:
                frames += stream.feed(port.read(64))
        assert len(frames) >= 5 and stream.bad <= 1  # (a first frame may be caught half-way)
        assert all(0 <= f.pm2_5 < 100 for f in frames)
    finally:
        proc.terminate()
        proc.wait(10)
    assert proc.returncode == 0 and not os.path.lexists(link), proc.stderr.read()


def test_full_outbox_counts_what_it_cannot_store(tmp_path: Path) -> None:
    """A sensor cannot be told to wait: readings that find the outbox full are counted and logged."""
    link = tmp_path / "ttyPM"
    outbox = Outbox(tmp_path / "outbox.db", max_rows=4)
    spec = parse_specs(f"{link}:9600:pms5003:pi-pm", "gw1")[0]
    with SerialSim(protocol="pms5003", interval_s=0.03) as sim:
        plug(link, sim)
        sim.start()
        reader = SerialSensor(spec, outbox, retry_s=0.1).start()
        try:
            assert poll_until(lambda: reader.stats()["dropped_full"] >= 3), reader.stats()
        finally:
            reader.stop()
    stored = rows(outbox, spec.device)
    # One row went to the "online" status event; the room check keeps one row spare for "offline".
    assert len(stored) == 2 and [s for _, s, _ in stored] == [1, 2]
    assert statuses(outbox, spec.device) == ["online", "offline"]
    assert reader.stats()["readings"] == 2
    outbox.close()
