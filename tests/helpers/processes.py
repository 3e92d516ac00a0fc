"""Child processes: the real `tern-bridge` / `tern-gateway` (killable with SIGKILL) and
MicroPython scripts on the unix port with the firmware and the emulated board."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tern.cloud.config import BridgeConfig
from tern.device.emulate import emulated_dir, firmware_dir
from tern.device.serial_sim import SerialSim
from tern.toolchain import micropython_binary

from .waiting import wait_until


class Proc:
    """``python -m <argv>`` as a child process in a session of its own, output to ``log_path``
    (so that it can be killed with SIGKILL, and its log read)."""

    def __init__(self, log_path: Path, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.process = subprocess.Popen([sys.executable, "-m", *argv], stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True,
                                        env=dict(os.environ, **(env or {})))

    def log(self) -> str:
        """Everything the process wrote so far."""
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL, and reap it."""
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        """SIGTERM (SIGKILL after 15 s) unless it is gone already; closes the log."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()


class BridgeProcess(Proc):
    """``tern-bridge run`` for ``config`` as a child process, its log in ``workdir``."""

    def __init__(self, workdir: Path, config: BridgeConfig) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        super().__init__(workdir / f"bridge-{config.name}.log", [
            "tern.cloud", "run",
            "--mqtt", config.mqtt_broker, "--kafka", config.kafka_bootstrap,
            "--topic", config.readings_topic, "--status-topic", config.status_topic,
            "--deadletter", config.deadletter_topic, "--name", config.name,
            "--share-group", str(config.share_group), "--stats-every", "0",
        ])

    def wait_running(self, timeout: float = 60) -> None:
        """Wait until the bridge says it runs; fail if it exits first or after ``timeout`` s."""
        wait_until(lambda: " running: " in self.log() or self.process.poll() is not None, timeout, "bridge start")
        assert self.process.poll() is None, self.log()[-2000:]


def run_mp(tmp_path: Path, script: str, env: dict[str, str] | None = None, timeout: float = 30,
           watch: SerialSim | None = None) -> dict:
    """Run a MicroPython script with the firmware and emulated board on the path; parse its last line.

    With ``watch``, the script can silence that simulated sensor by creating the file
    ``pause`` in its folder (and wake it by removing the file).
    """
    try:
        binary = micropython_binary()
    except Exception as exc:  # a missing install step must fail, not skip
        pytest.fail(f"MicroPython missing: {exc}")
    path = tmp_path / "driver.py"
    path.write_text(script)
    full_env = dict(os.environ, MICROPYPATH=f"{emulated_dir()}:{firmware_dir()}", **(env or {}))
    proc = subprocess.Popen(
        [str(binary), "-X", "heapsize=100K", str(path)], cwd=tmp_path, env=full_env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if watch is not None:
                watch.pause((tmp_path / "pause").exists())
            time.sleep(0.02)
        if proc.poll() is None:
            pytest.fail(f"MicroPython script still running after {timeout} s")
        out, err = proc.communicate(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 0, out + err
    return json.loads(out.strip().splitlines()[-1])


def require_toolchain() -> None:
    """Fail (never skip) when MicroPython or umqtt is missing: a missing install step must show."""
    import pytest

    from tern.toolchain import micropython_binary, umqtt_path

    try:
        micropython_binary()
        umqtt_path()
    except Exception as exc:  # ToolMissing
        pytest.fail(f"MicroPython toolchain missing: {exc}")
