"""The boards' pin maps (hardware/pinmaps.json) and the pin check tern-device flash runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tern.core.errors import ConfigError
from tern.device.emulate import check_config, firmware_dir
from tern.device.pins import board_for, board_names, check_pins, pinmaps


def test_pin_maps_are_consistent() -> None:
    assert {"esp32-devkitc", "esp32-s3-devkitc-1"} <= set(board_names())
    for name in board_names():
        b = board_for(name)
        gpio = set(b["gpio"])
        for key in ("input_only", "flash", "adc1", "adc2"):
            assert set(b[key]) <= gpio, (name, key)
        for key in ("strapping", "console", "reserved"):
            assert {int(p) for p in b[key]} <= gpio, (name, key)
        assert not set(b["adc1"]) & set(b["adc2"])
        assert b["chip"] in pinmaps()["chips"] and pinmaps()["chips"][b["chip"]] == name
    assert board_for(chip="esp32s3")["id"] == "esp32-s3-devkitc-1"


def test_example_config_fits_the_devkitc() -> None:
    config = json.loads((firmware_dir() / "config.json").read_text())
    check_config(config)
    assert check_pins(config)["id"] == "esp32-devkitc"
    # The same sensors with the S3's pins fit the S3 board.
    s3 = {"sensors": [{"type": "adc", "pin": 4}, {"type": "tmp102", "scl": 9, "sda": 8},
                      {"type": "sht3x", "scl": 9, "sda": 8},
                      {"type": "uart", "uart": 1, "tx": 17, "rx": 18, "protocol": "pms5003"},
                      {"type": "uart", "uart": 2, "tx": 15, "rx": 16, "protocol": "nmea"}]}
    assert check_pins(s3, chip="esp32s3")["chip"] == "esp32s3"


@pytest.mark.parametrize(
    "sensors, chip, message",
    [
        ([{"type": "adc", "pin": 4}], "esp32", r"sensors\[0\] \(adc\)\.pin: GPIO4 is on ADC2, which cannot be read while Wi-Fi is on"),
        ([{"type": "adc", "pin": 23}], "esp32", "GPIO23 has no ADC"),
        ([{"type": "adc", "pin": 15}], "esp32", "GPIO15 is a strapping pin"),
        ([{"type": "tmp102", "scl": 34, "sda": 19}], "esp32", r"\.scl: GPIO34 is input-only"),
        ([{"type": "sht3x", "scl": 18, "sda": 12}], "esp32", r"\.sda: GPIO12 is a strapping pin \(MTDI: high at reset selects 1.8 V flash"),
        ([{"type": "tmp102", "scl": 7, "sda": 19}], "esp32", "GPIO7 is wired to the module's SPI flash"),
        ([{"type": "uart", "uart": 1}], "esp32", r"\.tx \(UART1's default\): GPIO10 is wired to the module's SPI flash"),
        ([{"type": "uart", "uart": 2, "tx": 36, "rx": 16}], "esp32", r"\.tx: GPIO36 is input-only"),
        ([{"type": "uart", "uart": 2, "tx": 17, "rx": 3}], "esp32", "GPIO3 is UART0 RX"),
        ([{"type": "uart", "uart": 0}], "esp32", "UART0 carries the REPL console"),
        ([{"type": "adc", "pin": 20}], "esp32", "GPIO20 does not exist on the ESP32-DevKitC"),
        ([{"type": "adc", "pin": 34}, {"type": "uart", "uart": 2, "tx": 17, "rx": 34}], "esp32",
         r"sensors\[1\] \(uart\)\.rx: GPIO34 is already used by sensors\[0\] \(adc\)\.pin"),
        ([{"type": "tmp102", "scl": 18, "sda": 19}, {"type": "adc", "pin": 36}, {"type": "sht3x", "scl": 19, "sda": 18}], "esp32",
         r"sensors\[2\] \(sht3x\)\.scl: GPIO19 is already used by sensors\[0\] \(tmp102\)\.sda"),
        ([{"type": "tmp102"}], "esp32s3", r"\.sda: GPIO19 is reserved on the ESP32-S3-DevKitC-1: USB D-"),
        ([{"type": "adc", "pin": 12}], "esp32s3", "GPIO12 is on ADC2"),
        ([{"type": "uart", "uart": 1, "tx": 30, "rx": 18}], "esp32s3", "GPIO30 is wired to the module's SPI flash"),
        ([{"type": "adc", "pin": 46}], "esp32s3", "GPIO46 is a strapping pin"),
        ([{"type": "uart", "uart": 2}], "esp32s3", r"\.tx: UART2 has no default tx pin on the ESP32-S3-DevKitC-1; set one"),
    ],
)
def test_bad_pins_are_named(sensors, chip, message) -> None:
    with pytest.raises(ConfigError, match=message):
        check_pins({"sensors": sensors}, chip=chip)


def test_two_sensors_share_one_i2c_bus() -> None:
    check_pins({"sensors": [{"type": "tmp102", "scl": 18, "sda": 19}, {"type": "sht3x", "scl": 18, "sda": 19}]})


def test_flash_refuses_a_config_with_a_bad_pin_in_one_line(tmp_path: Path) -> None:
    """`tern-device flash` (the real command, dry run: nothing to flash here) stops before copying."""
    config = json.loads((firmware_dir() / "config.json").read_text())
    config["sensors"][0]["pin"] = 4  # the battery divider moved to an ADC2 pin
    path = tmp_path / "node.json"
    path.write_text(json.dumps(config))
    cli = [sys.executable, "-m", "tern.device", "flash", "--port", "/dev/ttyUSB0", "--config", str(path), "--dry-run"]
    out = subprocess.run(cli, capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.strip().splitlines() == [
        "tern-device flash: sensors[0] (adc).pin: GPIO4 is on ADC2, which cannot be read while Wi-Fi is on; "
        "use an ADC1 pin (GPIO32, GPIO33, GPIO34, GPIO35, GPIO36, GPIO39)"]
    assert "mpremote" not in out.stdout
    config["sensors"][0]["pin"] = 35
    path.write_text(json.dumps(config))
    ok = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "mpremote" in ok.stdout, ok.stderr
    # The same config for an ESP32-S3 board: its GPIO35 exists but has no ADC.
    s3 = subprocess.run([*cli, "--chip", "esp32s3"], capture_output=True, text=True, timeout=60)
    assert s3.returncode == 2 and "sensors[0] (adc).pin: GPIO35 has no ADC" in s3.stderr, s3.stderr
