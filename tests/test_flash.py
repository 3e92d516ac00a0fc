"""``tern-device flash`` against an emulated board that speaks MicroPython's raw REPL on a pty.

The real mpremote copies the firmware, umqtt and a generated config.json onto the board (its
flash is a folder), the tool verifies every file by sha256 on the board, and the board's reset
boots ``main.py``, which must then come online on a real mosquitto. Wrong, busy and silent
ports each give one clear line. QEMU is tried where an ESP32-capable build exists.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import serial

from tern.core.codec import decode_status
from tern.core.errors import ConfigError
from tern.device.emulate import firmware_dir, firmware_files
from tern.device.flash import (Provision, build_config, esptool_commands, expected_files, flash, read_config,
                               tool_command, verify)
from tern.security.secret_files import write_private
from tern.device.repl_board import ReplBoard
from tern.harness.stack import Mosquitto
from tern.toolchain import qemu_esp32, umqtt_path

# The console script of this environment, run as the README shows it: venv not activated.
TERN_DEVICE = str(Path(sys.executable).parent / "tern-device")
BARE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV",)}
    environment.update({"PATH": BARE_PATH, **(env or {})})
    return subprocess.run([TERN_DEVICE, *args], capture_output=True, text=True, timeout=timeout, env=environment)


def board_files(flash_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(flash_dir)): p.read_bytes() for p in flash_dir.rglob("*") if p.is_file()}


def test_flash_as_the_readme_shows_then_the_node_boots(tmp_path: Path) -> None:
    secret = "wifi-secret-7f3a"
    with Mosquitto(tmp_path / "broker") as broker, \
            ReplBoard(tmp_path / "flash", link=tmp_path / "ttyBOARD", boot_main=True) as board:
        births: list[bytes] = []
        watcher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        watcher.on_message = lambda c, u, m: births.append(m.payload)
        watcher.connect(broker.host, broker.port)
        watcher.subscribe("tern/farm/node-7/status", 1)
        watcher.loop_start()
        try:
            out = run_cli("flash", "--port", board.port, "--device-id", "node-7", "--site", "farm",
                          "--wifi-ssid", "lab", "--gateway", broker.address,
                          env={"TERN_WIFI_PASSWORD": secret})
            assert out.returncode == 0, out.stdout + out.stderr
            assert "verified" in out.stdout and "by sha256" in out.stdout
            assert secret not in out.stdout + out.stderr

            on_board = board_files(tmp_path / "flash")
            # .mpy by default: main.py (the loader) as source, every other module precompiled
            assert on_board["main.py"] == (firmware_dir() / "main.py").read_bytes()
            for f in firmware_files():
                if f.name != "main.py":
                    assert f.name not in on_board and on_board[f.stem + ".mpy"][:2] == b"M\x06"
            assert on_board["umqtt/simple.py"] == (umqtt_path() / "umqtt" / "simple.py").read_bytes()
            config = json.loads(on_board["config.json"])
            assert config["device"] == "node-7" and config["site"] == "farm"
            assert (config["broker"], config["port"]) == (broker.host, broker.port)
            assert config["wifi"] == {**config["wifi"], "ssid": "lab", "password": secret}

            # The reset at the end boots the flashed main.py: the node comes online.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not births:
                time.sleep(0.1)
        finally:
            watcher.loop_stop()
            watcher.disconnect()
        assert board.hard_resets == 1
        assert births, board.console.decode(errors="replace")[-2000:]
        status = decode_status(births[0], topic_device="node-7")
        assert status.state == "online"


def test_verify_finds_a_file_that_differs_on_the_board(tmp_path: Path) -> None:
    with ReplBoard(tmp_path / "flash") as board:
        assert flash(board.port, provision=Provision(device_id="n-1"), reset=False, echo=lambda _: None) == 0
        config_file = tmp_path / "config.json"
        config_file.write_bytes((tmp_path / "flash" / "config.json").read_bytes())
        files = expected_files(config_file)
        mpremote = tool_command("mpremote")
        assert verify(board.port, files, mpremote) == []
        damaged = tmp_path / "flash" / "tern_ring.mpy"
        damaged.write_bytes(damaged.read_bytes()[:-10])  # a copy cut short
        (tmp_path / "flash" / "umqtt" / "simple.py").unlink()
        assert verify(board.port, files, mpremote) == ["tern_ring.mpy", "umqtt/simple.py"]


def test_a_missing_port_is_one_clear_line(tmp_path: Path) -> None:
    out = run_cli("flash", "--port", str(tmp_path / "ttyNONE"), timeout=60)
    assert out.returncode == 2
    assert "no such serial port" in out.stderr and "Traceback" not in out.stderr


def test_a_busy_port_is_one_clear_line(tmp_path: Path) -> None:
    with ReplBoard(tmp_path / "flash") as board:
        holder = serial.Serial(board.port, 115200, exclusive=True)  # a serial monitor left open
        try:
            out = run_cli("flash", "--port", board.port, timeout=60)
        finally:
            holder.close()
    assert out.returncode == 2
    assert "is busy" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "flash" / "main.py").exists()


def test_a_board_that_does_not_answer_is_one_clear_line(tmp_path: Path) -> None:
    master, slave = os.openpty()  # a port with nothing behind it that speaks
    drained = threading.Event()

    def drain() -> None:  # swallow what the tool sends, answer nothing
        while not drained.is_set():
            try:
                os.read(master, 1024)
            except OSError:
                return

    threading.Thread(target=drain, daemon=True).start()
    try:
        started = time.monotonic()
        out = run_cli("flash", "--port", os.ttyname(slave), timeout=60)
        took = time.monotonic() - started
    finally:
        drained.set()
        os.close(slave)
        os.close(master)
    assert out.returncode == 2
    assert "does not answer" in out.stderr and "Traceback" not in out.stderr
    assert took < 30


def test_micropython_image_is_written_with_esptool_first(tmp_path: Path) -> None:
    image = tmp_path / "ESP32_GENERIC-v1.25.0.bin"
    out = run_cli("flash", "--port", "/dev/ttyUSB0", "--micropython-image", str(image), "--dry-run")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "esptool --chip esp32 --port /dev/ttyUSB0 --baud 460800 erase-flash"
    assert lines[1] == f"esptool --chip esp32 --port /dev/ttyUSB0 --baud 460800 write-flash -z 0x1000 {image}"
    assert lines[2].startswith("mpremote connect /dev/ttyUSB0 cp ")
    s3 = esptool_commands("/dev/ttyACM0", image, "esp32s3", ["esptool"])
    assert s3[1][-3:] == ["-z", "0x0", str(image)]
    # The real esptool parses exactly these arguments (its --help for the subcommand).
    check = subprocess.run([*tool_command("esptool"), "--chip", "esp32", "--port", "/dev/ttyUSB0",
                            "write-flash", "--help"], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "-z" in check.stdout


def test_tools_come_from_this_environment_not_path() -> None:
    assert tool_command("mpremote") == [sys.executable, "-m", "mpremote"]
    assert tool_command("esptool") == [sys.executable, "-m", "esptool"]


def test_the_generated_config_is_validated_and_private(tmp_path: Path) -> None:
    base = read_config(None)
    config = build_config(base, Provision(device_id="n-2", site="s", gateway="10.1.2.3", wifi_ssid="x"))
    assert (config["broker"], config["port"], config["device"]) == ("10.1.2.3", 1883, "n-2")
    with pytest.raises(ConfigError, match="invalid device"):
        build_config(base, Provision(device_id="../etc"))
    path = tmp_path / "config.json"
    write_private(path, json.dumps(config))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


QEMU, QEMU_WHY = qemu_esp32()


def test_qemu_without_an_esp32_machine_is_one_clear_line() -> None:
    if QEMU is not None:
        pytest.skip("an ESP32-capable QEMU is installed here")
    out = run_cli("qemu", "--image", "/nonexistent.bin", timeout=60)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "esp32" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.skipif(QEMU is None, reason=f"Espressif QEMU: {QEMU_WHY}; the QEMU self-test is untested here")
def test_qemu_self_test(tmp_path: Path) -> None:
    image = os.environ.get("TERN_QEMU_IMAGE")
    if not image:
        pytest.skip("set TERN_QEMU_IMAGE to a merged MicroPython ESP32 flash image to run the QEMU self-test")
    out = run_cli("qemu", "--image", image, "--self-test", timeout=600)
    assert out.returncode == 0 and "TERN self-test ok" in out.stdout, out.stdout + out.stderr



def test_flash_with_credentials_then_the_node_connects_only_with_them(tmp_path: Path) -> None:
    """--auth-dir gives the node its own account; removed, it is refused, says why, and backs off."""
    from tern.security.mosquitto_auth import DeviceAuth

    auth = DeviceAuth(tmp_path / "auth")
    gateway_password = auth.set_gateway("tern-gateway")
    with Mosquitto(tmp_path / "broker", auth_folder=auth.folder) as broker, \
            ReplBoard(tmp_path / "flash", link=tmp_path / "ttyBOARD", boot_main=True) as board:
        births: list[bytes] = []
        watcher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="tern-gateway")
        watcher.username_pw_set("tern-gateway", gateway_password)
        watcher.on_message = lambda c, u, m: births.append(m.payload)
        watcher.connect(broker.host, broker.port)
        watcher.subscribe("tern/farm/node-9/status", 1)
        watcher.loop_start()
        try:
            out = run_cli("flash", "--port", board.port, "--device-id", "node-9", "--site", "farm",
                          "--gateway", broker.address, "--auth-dir", str(auth.folder))
            assert out.returncode == 0, out.stdout + out.stderr
            config = json.loads((tmp_path / "flash" / "config.json").read_text())
            password = config["mqtt_password"]
            assert len(password) >= 20 and password not in out.stdout + out.stderr
            assert [d.device for d in auth.devices()] == ["node-9"]
            broker.reload()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not births:
                time.sleep(0.1)
            assert births, board.console.decode(errors="replace")[-2000:]
            assert decode_status(births[0], topic_device="node-9").state == "online"

            # Locked out: the running node is dropped at its next connect, says why, keeps trying.
            auth.remove_device("node-9")
            broker.reload()
            broker.stop()
            broker.start()
            deadline = time.monotonic() + 60
            refusals = 0
            while time.monotonic() < deadline and refusals < 2:
                refusals = board.console.count(b"broker refused us: not authorised")
                refusals += board.console.count(b"broker refused us: bad username or password")
                time.sleep(0.2)
            assert refusals >= 2, board.console.decode(errors="replace")[-2000:]
            assert board.main_running and board.hard_resets == 1  # backs off, never crash-loops
        finally:
            watcher.loop_stop()
            watcher.disconnect()
