"""tern-device: argument errors, flash --dry-run, the optional qemu, a short emulate run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from tern.core.codec import NodeAck, decode_reading, encode_node_ack
from tern.device.emulate import firmware_files
from tern.device.release import board_files
from tern.harness.stack import Mosquitto
from tern.core.topics import ack_topic, parse_node_topic
from tern.toolchain import umqtt_path

CLI = [sys.executable, "-m", "tern.device.cli"]


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """The command, piped, as a script would run it (no COLUMNS: rich then takes 80)."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_flash_dry_run_prints_mpremote_commands(tmp_path: Path) -> None:
    config = tmp_path / "node.json"
    config.write_text(json.dumps({"site": "farm", "device": "esp-7", "broker": "10.0.0.2"}))
    out = run("flash", "--port", "/dev/ttyUSB0", "--config", str(config), "--dry-run")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert all(line.startswith("mpremote connect /dev/ttyUSB0 ") for line in lines)
    # .mpy by default (main.py, the loader, as source), then the .py of each goes
    shipped = board_files(firmware_files())
    assert lines[0].endswith(" :") and all(f"/{f.name} " in lines[0] for f in shipped)
    assert {f.suffix for f in shipped} == {".py", ".mpy"} and [f.name for f in shipped if f.suffix == ".py"] == ["main.py"]
    assert " exec " in lines[1] and "tern_link.py" in lines[1]
    assert lines[2].endswith(f"cp -r {umqtt_path() / 'umqtt'} :")
    assert lines[3].endswith(" :config.json")
    assert lines[4].endswith("ls : + ls :umqtt")


def test_flash_refuses_a_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"site": "farm", "keepalive": "soon"}))
    out = run("flash", "--port", "/dev/ttyUSB0", "--config", str(config), "--dry-run")
    assert out.returncode == 2 and "keepalive" in out.stderr and "Traceback" not in out.stderr
    out = run("flash", "--port", "/dev/ttyUSB0", "--config", str(tmp_path / "missing.json"), "--dry-run")
    assert out.returncode == 2 and "cannot read" in out.stderr and "Traceback" not in out.stderr


def test_bad_arguments_are_clear_errors() -> None:
    out = run("emulate", "--count", "0", "--broker", "127.0.0.1:1883")
    assert out.returncode == 2 and "positive integer" in out.stderr and "Traceback" not in out.stderr
    out = run("emulate", "--broker", "nohostport", "--readings", "1")
    assert out.returncode == 2 and "HOST:PORT" in out.stderr and "Traceback" not in out.stderr


def _emulate(broker: Mosquitto, workdir: Path, *, ack: bool) -> tuple[subprocess.CompletedProcess, list[tuple[str, bytes]]]:
    """Run `tern-device emulate` (2 nodes x 5 readings); the subscriber acks like a gateway if ``ack``."""
    seen: list[tuple[str, bytes]] = []

    def on_message(client: mqtt.Client, userdata, msg: mqtt.MQTTMessage) -> None:
        seen.append((msg.topic, msg.payload))
        if ack:
            where = parse_node_topic(msg.topic)
            reading = decode_reading(msg.payload, topic_device=where.device)
            client.publish(ack_topic(where.site, where.device), encode_node_ack(NodeAck(reading.boot, reading.seq)), qos=1)

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.on_message = on_message
    client.connect(broker.host, broker.port)
    client.subscribe("tern/+/+/telemetry", 1)
    client.loop_start()
    try:
        out = run(
            "emulate", "--count", "2", "--broker", broker.address, "--site", "cli", "--interval-ms", "50",
            "--readings", "5", "--workdir", str(workdir), "--exit-when-done", timeout=60,
        )
        deadline = time.monotonic() + 5
        while len(seen) < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        client.loop_stop()
        client.disconnect()
    return out, seen


def test_emulate_runs_a_fleet_until_done_and_acked(tmp_path: Path) -> None:
    with Mosquitto(tmp_path / "broker") as broker:
        out, seen = _emulate(broker, tmp_path / "nodes", ack=True)
    assert out.returncode == 0, out.stdout + out.stderr
    # Piped, the table fits 80 columns with every node id whole.
    table = [line for line in out.stdout.splitlines() if line[:1] in "│┃┏┡└"]
    assert table and all(len(line) <= 80 for line in table), out.stdout
    assert all(sum(f"{d} " in line for line in table) >= 1 for d in ("node-1", "node-2"))
    for device in ("node-1", "node-2"):
        got = [decode_reading(p, topic_device=device).seq for t, p in seen if t == f"tern/cli/{device}/telemetry"]
        assert got == [1, 2, 3, 4, 5]


def test_emulate_without_a_gateway_reports_unacked_readings(tmp_path: Path) -> None:
    with Mosquitto(tmp_path / "broker") as broker:
        out, seen = _emulate(broker, tmp_path / "nodes", ack=False)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "10 readings were not acknowledged" in out.stdout
    assert len(seen) == 10


def _processes_in(folder: Path) -> list[int]:
    """Pids of the processes whose working folder is inside ``folder`` (the emulated nodes)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = (entry / "cwd").resolve(strict=True)
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if cwd.is_relative_to(folder.resolve()):
            found.append(int(entry.name))
    return found


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_emulate_stops_its_nodes_on_a_stop_signal(tmp_path: Path, sig: signal.Signals) -> None:
    workdir = tmp_path / "nodes"
    with Mosquitto(tmp_path / "broker") as broker:
        proc = subprocess.Popen(
            [*CLI, "emulate", "--count", "3", "--broker", broker.address, "--site", "sig", "--workdir", str(workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 30
            while len(_processes_in(workdir)) < 3 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert len(_processes_in(workdir)) == 3, "the three nodes did not start"
            proc.send_signal(sig)
            assert proc.wait(30) == 0
            assert _processes_in(workdir) == []
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            for pid in _processes_in(workdir):
                os.kill(pid, signal.SIGKILL)
