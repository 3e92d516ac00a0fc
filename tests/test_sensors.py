"""Sensor drivers of the firmware, run on the real MicroPython unix port with the emulated
board; UART frames come from the host-side serial simulator through a real pty."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tern.core.sensor_protocols import PMSFrame, decode_nmea, encode_pms, encode_sht3x
from tern.device.serial_sim import BREAKAGES, SerialSim

from helpers import run_mp


def test_tmp102_decoding_including_negative_temperatures(tmp_path: Path) -> None:
    temps = ["25.0", "0.0", "-0.0625", "-25.5", "-55.0", "127.9375", "21.53"]
    result = run_mp(
        tmp_path,
        """
import os, json
from tern_sensors import TMP102Sensor, tmp102_celsius, Sensors
s = TMP102Sensor({"name": "t", "addr": 0x48})
out = {"read": [], "raw": []}
for t in %r:
    os.putenv("TERN_EMU_TMP102", t)
    d = {}
    s.read(d)
    out["read"].append(d["t"])
for b0, b1 in ((0xFF, 0xF0), (0xE7, 0x00), (0x7F, 0xF0), (0xC9, 0x00), (0x19, 0x00)):
    out["raw"].append(tmp102_celsius(b0, b1))
os.putenv("TERN_EMU_TMP102", "fail")
sens = Sensors([{"type": "tmp102", "name": "t"}, {"type": "tmp102", "name": "u", "addr": 0x49}])
d = {}
out["failed"] = sens.read(d)
out["errors"] = sens.errors
out["left"] = d
print(json.dumps(out))
"""
        % temps,
    )
    # 21.53 C is not a multiple of 1/16: the sensor's 12 bits round it to 21.5
    assert result["read"] == [25.0, 0.0, -0.0625, -25.5, -55.0, 127.9375, 21.5]
    assert result["raw"] == [-0.0625, -25.0, 127.9375, -55.0, 25.0]
    # a sensor that stops answering and one that is absent: counted, not fatal, named
    assert result["failed"] == 2 and result["errors"] == 2 and result["left"] == {"down": "t,u"}


def test_adc_millivolts(tmp_path: Path) -> None:
    result = run_mp(
        tmp_path,
        """
import json, machine
from tern_sensors import ADCSensor
d = {}
ADCSensor({"name": "mv", "pin": 34}).read(d)
ADCSensor({"name": "other", "pin": 35}).read(d)
a = machine.ADC(machine.Pin(34))
print(json.dumps({"d": d, "u16": a.read_u16(), "raw": a.read()}))
""",
        env={"TERN_EMU_ADC_34": "1234"},
    )
    assert result["d"]["mv"] == 1234
    assert 650 <= result["d"]["other"] <= 2650  # the default simulated signal: 1650 +- 1000 mV
    assert result["u16"] == 1234 * 65535 // 3300 and result["raw"] == 1234 * 4095 // 3300



UART_SCRIPT = """
import json, time
from tern_uart import UARTSensor
s = UARTSensor({"uart": 2, "protocol": %r})
deadline = time.ticks_add(time.ticks_ms(), 8000)
while s.good_frames < %d and time.ticks_diff(deadline, time.ticks_ms()) > 0:
    s.poll()
    time.sleep_ms(10)
d = {}
s.read(d)
print(json.dumps({"good": s.good_frames, "bad": s.bad_frames, "d": d}))
"""


def test_pms5003_frames_from_the_simulator_with_every_breakage(tmp_path: Path) -> None:
    with SerialSim(protocol="pms5003", seed=7) as sim:
        sim.write_frame(encode_pms(PMSFrame(4, 9, 15)))
        for how in BREAKAGES:  # each broken frame is followed by a good one
            sim.write_frame(encode_pms(PMSFrame(99, 99, 99)), broken=how)
            sim.write_frame()
        last = encode_pms(PMSFrame(7, 13, 21, counts=(2100, 640, 120, 14, 3, 1)))
        sim.write_raw(last[:11])  # a frame split across two reads...
        sim.write_raw(last[11:])  # ...is one good frame
        result = run_mp(tmp_path, UART_SCRIPT % ("pms5003", 2 + len(BREAKAGES)), env={"TERN_EMU_UART2": sim.path})
    assert result["good"] == 2 + len(BREAKAGES)
    assert result["bad"] == len(BREAKAGES)
    assert result["d"] == {"pm1_0": 7, "pm2_5": 13, "pm10": 21}


def test_nmea_gps_from_the_simulator_with_every_breakage(tmp_path: Path) -> None:
    with SerialSim(protocol="nmea", seed=3) as sim:
        for how in BREAKAGES:
            sim.write_frame(broken=how)
            for frame in sim.frames():
                sim.write_frame(frame)
        sim.write_raw(b"$GPGSV,1,1,00*79\r\n")  # a valid sentence of a type we do not use
        gga, rmc = sim.frames()
        sim.write_raw(gga + rmc)
        result = run_mp(tmp_path, UART_SCRIPT % ("nmea", 2 * len(BREAKAGES) + 2), env={"TERN_EMU_UART2": sim.path})
    assert result["good"] == 2 * len(BREAKAGES) + 2
    assert result["bad"] == len(BREAKAGES)
    want = decode_nmea(gga)[1] | decode_nmea(rmc)[1]
    got = result["d"]
    assert set(got) == {"lat", "lon", "alt_m", "sats", "fix", "speed_kn"}
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-6), key
    assert 52.4 < got["lat"] < 52.6 and 13.3 < got["lon"] < 13.5 and got["fix"] == 1


def test_gps_without_a_fix_reports_fix_zero_and_no_position(tmp_path: Path) -> None:
    from tern.core.sensor_protocols import encode_gga, encode_rmc

    with SerialSim(protocol="nmea") as sim:
        sim.write_raw(encode_gga(None, None, 0.0, 3, fix=0) + encode_rmc(None, None))
        result = run_mp(tmp_path, UART_SCRIPT % ("nmea", 2), env={"TERN_EMU_UART2": sim.path})
    assert result == {"good": 2, "bad": 0, "d": {"sats": 3, "fix": 0}}


def test_sht3x_over_i2c_with_crc(tmp_path: Path) -> None:
    result = run_mp(
        tmp_path,
        """
import os, json, machine
from tern_sht3x import SHT3xSensor, sht_crc8, sht_decode
s = SHT3xSensor({"names": ["air_c", "rh"]})
out = {"read": []}
for v in ("21.5,40.0", "-10.25,99.5", "85.0,0.0"):
    os.putenv("TERN_EMU_SHT3X", v)
    d = {}
    s.read(d)
    out["read"].append(d)
out["crc_beef"] = sht_crc8(b"\\xbe\\xef")
out["host"] = sht_decode(bytes.fromhex(%r))
os.putenv("TERN_EMU_SHT3X", "crc")
try:
    s.read({})
    out["crc"] = "accepted"
except ValueError as e:
    out["crc"] = str(e)
out["bad"] = s.bad_frames
print(json.dumps(out))
"""
        % encode_sht3x(23.45, 51.2).hex(),
    )
    assert result["read"] == [{"air_c": 21.5, "rh": 40.0}, {"air_c": -10.25, "rh": 99.5}, {"air_c": 85.0, "rh": 0.0}]
    assert result["crc_beef"] == 0x92  # the datasheet's example: CRC(0xBEEF) = 0x92
    assert result["host"] == [23.45, 51.2]
    assert result["crc"] == "sht3x crc" and result["bad"] == 1


def test_failed_sensor_is_named_in_the_reading_while_the_others_keep_going(tmp_path: Path) -> None:
    """UART sensor silent, SHT3x answering with bad CRC, then NACKing: the ADC and TMP102 still report."""
    with SerialSim(protocol="pms5003") as sim:
        result = run_mp(
            tmp_path,
            """
import os, json
from tern_sensors import Sensors
s = Sensors([{"type": "uart", "uart": 1, "protocol": "pms5003"}, {"type": "adc", "name": "mv", "pin": 34},
             {"type": "sht3x"}, {"type": "tmp102", "name": "t"}])
out = []
for v in ("20.0,50.0", "crc", "fail"):
    os.putenv("TERN_EMU_SHT3X", v)
    d = {}
    failed = s.read(d)
    out.append({"failed": failed, "d": d})
print(json.dumps({"runs": out, "errors": s.errors, "bad": s.bad_frames()}))
""",
            env={"TERN_EMU_UART1": sim.path, "TERN_EMU_ADC_34": "1500", "TERN_EMU_TMP102": "19.5"},
        )
    runs = result["runs"]
    assert runs[0] == {"failed": 1, "d": {"mv": 1500, "sht_c": 20.0, "sht_rh": 50.0, "t": 19.5, "down": "pms5003"}}
    assert runs[1] == {"failed": 2, "d": {"mv": 1500, "t": 19.5, "down": "pms5003,sht3x"}}
    assert runs[2] == runs[1]
    assert result["errors"] == 5 and result["bad"] == 1  # the CRC failure is a bad frame


def test_uart_sensor_that_stops_answering_goes_stale_then_recovers(tmp_path: Path) -> None:
    with SerialSim(protocol="pms5003", interval_s=0.05) as sim:
        sim.start()
        result = run_mp(
            tmp_path,
            """
import json, time, os
from tern_sensors import Sensors
s = Sensors([{"type": "uart", "uart": 1, "protocol": "pms5003", "max_age_ms": 400}, {"type": "adc", "name": "mv", "pin": 34}])
def wait(pred, ms=8000):
    t = time.ticks_add(time.ticks_ms(), ms)
    while not pred() and time.ticks_diff(t, time.ticks_ms()) > 0:
        s.poll()
        time.sleep_ms(20)
def reading():
    d = {}
    s.read(d)
    return d
wait(lambda: s.drivers[0].good_frames >= 3)
first = reading()
open("pause", "w").close()
wait(lambda: "down" in reading())
down = reading()
os.remove("pause")
wait(lambda: "down" not in reading())
print(json.dumps({"first": first, "down": down, "back": reading()}))
""",
            env={"TERN_EMU_UART1": sim.path},
            watch=sim,
        )
    assert {"pm1_0", "pm2_5", "pm10", "mv"} <= set(result["first"]) and "down" not in result["first"]
    assert result["down"]["down"] == "pms5003" and "mv" in result["down"] and "pm2_5" not in result["down"]
    assert "down" not in result["back"] and "pm2_5" in result["back"]


def test_node_publishes_every_protocol_and_names_a_sensor_that_stops(tmp_path: Path) -> None:
    """The whole firmware on the emulated board against a real mosquitto: PMS5003 on UART2 and a
    GPS on UART1 (both with broken frames), SHT3x and TMP102 on I2C. Then the PMS5003 goes
    silent and the SHT3x stops answering: readings name both, the GPS and TMP102 keep going."""
    import paho.mqtt.client as mqtt

    from tern.core.codec import decode_reading
    from tern.core.topics import telemetry_topic
    from tern.device import EmulatedNode
    from tern.harness.stack import Mosquitto

    ctl = tmp_path / "emu.ctl"
    ctl.write_text("")
    readings: list = []
    with Mosquitto(tmp_path / "broker") as broker:
        sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        sub.on_message = lambda c, u, m: readings.append(decode_reading(m.payload, site="lab", topic_device="fw-sens"))
        sub.connect("127.0.0.1", broker.port)
        sub.subscribe(telemetry_topic("lab", "fw-sens"), 1)
        sub.loop_start()
        node = EmulatedNode(
            tmp_path / "node", device="fw-sens", site="lab", broker=broker.address, interval_ms=200, heap="100K",
            sensors=[
                {"type": "uart", "uart": 2, "protocol": "pms5003", "max_age_ms": 1500,
                 "sim": {"interval_s": 0.1, "bad_fraction": 0.3, "seed": 5}},
                {"type": "uart", "uart": 1, "protocol": "nmea", "max_age_ms": 1500,
                 "sim": {"interval_s": 0.2, "bad_fraction": 0.3, "seed": 6}},
                {"type": "sht3x", "names": ["air_c", "rh"]},
                {"type": "tmp102", "name": "temp_c"},
            ],
            extra_config={"ring_slot": 320},  # twelve values and two counters: ~230 bytes
            env={"TERN_EMU_CTL": str(ctl)},
        )

        def wait(pred, timeout: float = 30) -> bool:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and not pred():
                time.sleep(0.05)
            return pred()

        try:
            node.start()
            assert wait(lambda: node.sims and all(sim.sent_bad for sim in node.sims))
            pms, gps = node.sims
            mark = len(readings)
            everything = {"pm1_0", "pm2_5", "pm10", "lat", "lon", "alt_m", "sats", "fix", "speed_kn", "air_c", "rh", "temp_c"}
            assert wait(lambda: any(everything <= set(r.values) and r.values.get("bad_frames", 0) >= 2 for r in readings[mark:])), \
                node.log_text()[-2000:]
            full = next(r for r in readings[mark:] if everything <= set(r.values) and r.values.get("bad_frames", 0) >= 2)
            assert 0 <= full.values["pm2_5"] < 100 and 52.4 < full.values["lat"] < 52.6 and full.values["fix"] == 1
            assert -40 < full.values["air_c"] < 85 and "down" not in full.values

            pms.pause()
            ctl.write_text("TERN_EMU_SHT3X=fail\n")
            mark = len(readings)
            assert wait(lambda: any(r.values.get("down") == "pms5003,sht3x" for r in readings[mark:])), node.log_text()[-2000:]
            down = next(r for r in readings[mark:] if r.values.get("down") == "pms5003,sht3x")
            assert "pm2_5" not in down.values and "air_c" not in down.values
            assert {"lat", "lon", "temp_c"} <= set(down.values)  # the others keep going
            # ...and the node's status line (every 10th reading) counts them.
            assert node.wait_for(lambda n: n.stats.get("sensors_down") == 2, 15), node.stats

            pms.pause(False)
            ctl.write_text("")
            mark = len(readings)
            assert wait(lambda: any("down" not in r.values and "pm2_5" in r.values for r in readings[mark:]))
            assert node.wait_for(lambda n: n.stats.get("sensors_down") == 0, 15), node.stats
            assert node.boots == 1 and not [e for e in node.errors if "Error" in e], node.log_text()[-2000:]
        finally:
            node.kill()
            sub.loop_stop()
            sub.disconnect()


def test_every_sensor_with_a_full_ring_fits_a_100k_heap(tmp_path: Path) -> None:
    """The heaviest node (PMS5003 + GPS with broken frames, SHT3x, TMP102, ADC; 64 unacked
    readings of up to 320 bytes) on the heap of an ESP32 without PSRAM: no MemoryError."""
    from tern.device import EmulatedNode
    from tern.harness.stack import Mosquitto

    with Mosquitto(tmp_path / "broker") as broker:
        node = EmulatedNode(
            tmp_path / "node", device="fw-full", site="lab", broker=broker.address, interval_ms=10, max_readings=150,
            heap="100K", extra_config={"ring_slot": 320, "spill_max": 0},
            sensors=[
                {"type": "adc", "name": "batt_mv", "pin": 34},
                {"type": "tmp102", "name": "temp_c"},
                {"type": "sht3x"},
                {"type": "uart", "uart": 2, "protocol": "pms5003", "sim": {"interval_s": 0.02, "bad_fraction": 0.2}},
                {"type": "uart", "uart": 1, "protocol": "nmea", "sim": {"interval_s": 0.05, "bad_fraction": 0.2}},
            ],
        )
        try:
            node.start()
            assert node.wait_done(40), node.log_text()[-3000:]
            assert node.wait_for(lambda n: n.stats.get("seq") == 150, 5)
            assert node.stats["ring"] == 64 and node.stats["bad_frames"] > 0, node.stats
            assert node.boots == 1 and node.resets == 0, node.log_text()[-3000:]
            assert not [e for e in node.errors if "MemoryError" in e], node.log_text()[-3000:]
            assert node.stats["mem_free"] > 8000, node.stats
        finally:
            node.kill()


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"type": "uart", "uart": 2, "protocol": "sds011"}, r"sensors\[0\]\.protocol must be pms5003 or nmea"),
        ({"type": "uart", "uart": 2, "protocol": ["nmea"]}, r"sensors\[0\]\.protocol must be pms5003 or nmea"),
        ({"type": "uart", "uart": 2, "protocol": "sht3x"}, r"sensors\[0\]\.protocol must be pms5003 or nmea"),
        ({"type": "uart", "uart": 2, "protocol": "pms5003", "names": ["a", "b", "c", "d"]}, "pms5003 gives at most 3 names"),
        ({"type": "sht3x", "names": []}, r"sensors\[0\] needs a name"),
        ({"type": "sht3x", "addr": -1}, r"sensors\[0\]\.addr must be a non-negative integer"),
    ],
)
def test_sensor_config_errors_name_the_sensor(spec: dict, message: str) -> None:
    from tern.core.errors import ConfigError
    from tern.device.emulate import check_config

    with pytest.raises(ConfigError, match=message):
        check_config({"sensors": [spec]})
    good = check_config({"sensors": [{"type": "sht3x"}, {"type": "uart", "protocol": "nmea", "names": ["la", "lo"]}]})
    assert [s["type"] for s in good["sensors"]] == ["sht3x", "uart"]


def test_a_sensor_whose_driver_cannot_start_is_down_in_every_reading(tmp_path: Path) -> None:
    """A UART whose port does not exist (a board without the module): the node still starts,
    the sensor stays in the list and reads as down, and the others report."""
    result = run_mp(
        tmp_path,
        """
import json
from tern_sensors import Sensors
logs = []
s = Sensors([{"type": "uart", "uart": 2, "protocol": "nmea"}, {"type": "adc", "name": "mv", "pin": 34},
             {"type": "uart", "uart": 2, "protocol": "pms5003", "label": "dust"}], log=logs.append)
runs = []
for _ in range(2):
    d = {}
    runs.append({"failed": s.read(d), "d": d})
print(json.dumps({"runs": runs, "logs": logs, "labels": s.labels(s.failed)}))
""",
        env={"TERN_EMU_ADC_34": "1500", "TERN_EMU_UART2": str(tmp_path / "no-such-tty")},
    )
    assert result["runs"][0] == {"failed": 2, "d": {"mv": 1500, "down": "nmea,dust"}}
    assert result["runs"][1] == result["runs"][0]
    assert result["labels"] == ["nmea", "dust"]  # what the node's status names as down
    assert len(result["logs"]) == 2 and all("init" in line for line in result["logs"])
