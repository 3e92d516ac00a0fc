"""Sensor drivers of the firmware, run on the real MicroPython unix port with the emulated
board; UART frames come from the host-side serial simulator through a real pty."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tern.device.emulate import emulated_dir, firmware_dir
from tern.device.serial_sim import BREAKAGES, SerialSim, make_frame
from tern.toolchain import micropython_binary


def run_mp(tmp_path: Path, script: str, env: dict[str, str] | None = None, timeout: float = 20) -> dict:
    """Run a MicroPython script with the firmware and emulated board on the path; parse its last line."""
    try:
        binary = micropython_binary()
    except Exception as exc:  # a missing install step must fail, not skip
        pytest.fail(f"MicroPython missing: {exc}")
    path = tmp_path / "driver.py"
    path.write_text(script)
    full_env = dict(os.environ, MICROPYPATH=f"{emulated_dir()}:{firmware_dir()}", **(env or {}))
    out = subprocess.run(
        [str(binary), "-X", "heapsize=64K", str(path)], cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


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
    # a sensor that stops answering and one that is absent: counted, not fatal
    assert result["failed"] == 2 and result["errors"] == 2 and result["left"] == {}


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


def test_uart_frames_with_broken_ones(tmp_path: Path) -> None:
    with SerialSim() as sim:
        sim.write_frame((21.5, 40.1))
        for how in BREAKAGES:
            sim.write_frame((99.0, 99.0), broken=how)
        sim.write_raw(b"$TRN,22.2")  # a frame split across two reads...
        sim.write_raw(make_frame((22.25, 41.75))[9:])  # ...is one good frame
        result = run_mp(
            tmp_path,
            """
import json, time
from tern_uart import UARTSensor
s = UARTSensor({"uart": 2, "names": ["air_c", "rh"]})
deadline = time.ticks_add(time.ticks_ms(), 5000)
while s.good_frames < 2 and time.ticks_diff(deadline, time.ticks_ms()) > 0:
    s.poll()
    time.sleep_ms(10)
d = {}
s.read(d)
print(json.dumps({"good": s.good_frames, "bad": s.bad_frames, "d": d}))
""",
            env={"TERN_EMU_UART2": sim.path},
        )
    assert result["good"] == 2
    assert result["bad"] == len(BREAKAGES)
    assert result["d"] == {"air_c": 22.25, "rh": 41.75}


def test_uart_without_frames_is_a_counted_error(tmp_path: Path) -> None:
    with SerialSim() as sim:
        result = run_mp(
            tmp_path,
            """
import json
from tern_sensors import Sensors
s = Sensors([{"type": "uart", "uart": 1}, {"type": "adc", "name": "mv", "pin": 34}])
d = {}
failed = s.read(d)
print(json.dumps({"failed": failed, "errors": s.errors, "keys": sorted(d)}))
""",
            env={"TERN_EMU_UART1": sim.path},
        )
    assert result == {"failed": 1, "errors": 1, "keys": ["mv"]}
