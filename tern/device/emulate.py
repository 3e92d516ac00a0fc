"""Emulated sensor nodes: the unmodified firmware on the MicroPython unix port.

Each node gets a folder that plays its flash: the files of ``device_firmware/`` are copied
there (never edited) with a generated ``config.json``, and the node runs as
``micropython -X heapsize=<heap> main.py`` with that folder as cwd and
``MICROPYPATH=<repo>/hardware/emulated:<umqtt>:<folder>``, so ``machine`` and ``network``
come from the emulated board. The node's stdout goes to ``node.log``; a reader thread
parses its ``TERN <event>`` lines into counters (bounded memory: counters, not lines).

Resets as on the chip: ``machine.reset()`` and a starved ``machine.WDT`` (a real SIGALRM timer)
end the process and the host boots it again with ``SOFT_RESET``/``WDT_RESET``;
``machine.deepsleep(ms)`` ends it and the host wakes it after ``ms`` with ``DEEPSLEEP_RESET``.
Flash (the folder) survives all of them and a power cycle (stop/start); RTC memory (a file
beside the folder) survives resets and deep sleep and is cleared at power-on (``start()``).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
import types
from types import TracebackType
from typing import Any, Callable

from tern.core.errors import ConfigError, TernError
from tern.toolchain import micropython_binary, repo_root, umqtt_path

#: machine.reset() on the emulated board exits with this code (hardware/emulated/machine.py).
RESET_EXIT_CODE = 77
#: machine.deepsleep(ms) exits with this code after printing ``TERN deepsleep <ms>``.
DEEPSLEEP_EXIT_CODE = 78
#: A starved machine.WDT ends the process with SIGALRM (a real timer on the emulated board).
WDT_SIGNAL = signal.SIGALRM
#: The emulated ESP32 has no PSRAM: the firmware gets about as much heap as on the chip.
DEFAULT_HEAP = "100K"
#: How many machine.reset() reboots the emulator performs for one start().
MAX_RESETS = 20
#: Where the broker's CA certificate goes on the board (config key ``tls_ca`` names it).
BOARD_CA = "ca.pem"


def firmware_dir() -> Path:
    """The folder of files that go onto a board."""
    return repo_root() / "device_firmware"


def emulated_dir() -> Path:
    """The emulated ``machine``/``network`` modules (unix port only, never a board)."""
    return repo_root() / "hardware" / "emulated"


def firmware_files() -> list[Path]:
    """The firmware's Python files (config.json is an example and is not among them)."""
    return sorted(firmware_dir().glob("*.py"))


def _firmware_config_module():
    """The firmware's own tern_config module, loaded under CPython to validate configs."""
    # Compiled by hand so no __pycache__ appears among the files that go onto a board.
    # tern_config imports its value rules from tern_rules: lent to it for the import only.
    import sys

    rules = types.ModuleType("tern_rules")
    rules_path = firmware_dir() / "tern_rules.py"
    exec(compile(rules_path.read_text(), str(rules_path), "exec"), rules.__dict__)
    path = firmware_dir() / "tern_config.py"
    module = types.ModuleType("_tern_fw_config")
    saved = sys.modules.get("tern_rules")
    sys.modules["tern_rules"] = rules
    try:
        exec(compile(path.read_text(), str(path), "exec"), module.__dict__)
    finally:
        if saved is None:
            del sys.modules["tern_rules"]
        else:
            sys.modules["tern_rules"] = saved
    return module


def check_config(config: dict[str, Any]) -> dict[str, Any]:
    """Validate a node config with the firmware's rules; raise ConfigError naming the problem."""
    fw = _firmware_config_module()
    try:
        return fw.merge(dict(config))
    except fw.ConfigError as exc:
        raise ConfigError(f"node config: {exc}") from None


def _split_broker(broker: str) -> tuple[str, int]:
    host, sep, port = broker.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"broker must be HOST:PORT, got {broker!r}")
    return host, int(port)


class EmulatedNode:
    """One emulated ESP32 node running the real firmware against a real broker."""

    def __init__(
        self,
        workdir: Path,
        *,
        device: str,
        site: str,
        broker: str,
        interval_ms: int = 1000,
        max_readings: int = 0,
        keepalive: int = 30,
        heap: str = DEFAULT_HEAP,
        sensors: list | None = None,
        extra_config: dict | None = None,
        env: dict[str, str] | None = None,
        auto_reset: bool = True,
        mpy: bool = True,
        ota_key: Path | None = None,
        ca_file: Path | None = None,
    ) -> None:
        """``mpy``: the firmware goes on as .mpy (main.py as source), as ``tern-device flash``
        ships it; False copies the .py sources. ``ota_key``: the fleet's verify key (ota.key).
        ``ca_file``: the node speaks TLS to ``broker``, checked against this CA (copied onto
        the flash as ``ca.pem``, as ``tern-device flash --ca`` does)."""
        self.workdir = Path(workdir)
        self.mpy = mpy
        self.ota_key = Path(ota_key) if ota_key is not None else None
        self.ca_file = Path(ca_file) if ca_file is not None else None
        self.device = device
        self.site = site
        self.heap = heap
        self.auto_reset = auto_reset
        self.extra_env = dict(env or {})
        host, port = _split_broker(broker)
        self.sims: list[Any] = []
        self._sim_specs: dict[int, dict] = {}
        flash_sensors = None
        if sensors is not None:
            flash_sensors = []
            for spec in sensors:
                spec = dict(spec)
                sim = spec.pop("sim", None)
                if spec.get("type") == "uart" and sim is not False:
                    self._sim_specs[int(spec.get("uart", 1))] = {"protocol": spec.get("protocol", "pms5003"), **(sim or {})}
                flash_sensors.append(spec)
        config: dict[str, Any] = {
            "site": site,
            "device": device,
            "broker": host,
            "port": port,
            "keepalive": keepalive,
            "interval_ms": interval_ms,
            "max_readings": max_readings,
            "ntp": False,
        }
        if flash_sensors is not None:
            config["sensors"] = flash_sensors
        if self.ca_file is not None:
            config["tls_ca"] = BOARD_CA
        config.update(extra_config or {})
        check_config(config)
        self.config = config
        self.log_path = self.workdir / "node.log"
        # RTC memory lives beside the flash folder, not in it: it is no file on the board.
        self.rtc_path = self.workdir.parent / f".{self.workdir.name}.rtc"
        self.process: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._log = None
        self._stopping = False
        self._done = threading.Event()
        self._reset_counters()
        self.boots = 0
        self.resets = 0
        self.wakes = 0  # deep-sleep wake-ups
        self.reset_causes: collections.deque[str] = collections.deque(maxlen=50)
        self._wake = threading.Event()
        self.exit_code: int | None = None
        self.errors: collections.deque[str] = collections.deque(maxlen=20)
        self.tail: collections.deque[str] = collections.deque(maxlen=50)

    def _reset_counters(self) -> None:
        self.boot = ""
        self.sent = 0  # highest seq published (seqs are sent in order, so also the count)
        self.resent = 0
        self.acked = 0
        self.dropped = 0
        self.connects = 0
        self.replayed = 0  # readings re-sent from the flash spill this boot
        self.replay_messages = 0
        self.spilled = 0
        self.spill_dropped = 0
        self.stats: dict[str, int] = {}
        self._done.clear()

    # --- flash -------------------------------------------------------------------------

    def flash(self) -> None:
        """Copy the firmware (unmodified; .py or .mpy) and write config.json into the node's
        folder, with the fleet's verify key if it has one. The ota/ folder (releases) is kept,
        as flashing keeps a board's other files."""
        from tern.device.release import board_files

        self.workdir.mkdir(parents=True, exist_ok=True)
        files = board_files(firmware_files(), self.mpy)
        names = {f.name for f in files}
        for old in [*self.workdir.glob("*.py"), *self.workdir.glob("*.mpy")]:
            if old.name not in names:
                old.unlink()   # the other form (.py vs .mpy) would shadow or be shadowed
        for src in files:
            dst = self.workdir / src.name
            shutil.copyfile(src, dst)
            if hashlib.sha256(dst.read_bytes()).digest() != hashlib.sha256(src.read_bytes()).digest():
                raise TernError(f"copy of {src.name} differs from the firmware")
        (self.workdir / "config.json").write_text(json.dumps(self.config, indent=1))
        if self.ota_key is not None:
            shutil.copyfile(self.ota_key, self.workdir / "ota.key")
        if self.ca_file is not None:
            shutil.copyfile(self.ca_file, self.workdir / BOARD_CA)

    def environment(self) -> dict[str, str]:
        """The environment the emulated board runs with."""
        uid = hashlib.sha256(self.device.encode()).hexdigest()[:12]
        env = dict(os.environ)
        env.update(
            MICROPYPATH=os.pathsep.join([str(emulated_dir()), str(umqtt_path()), str(self.workdir)]),
            TERN_EMU_UID=uid,
            TERN_EMU_RESET_CAUSE="PWRON_RESET",
            TERN_EMU_RTC=str(self.rtc_path),
        )
        for uart, sim in zip(self._sim_specs, self.sims):
            env[f"TERN_EMU_UART{uart}"] = sim.path
        env.update(self.extra_env)
        return env

    # --- process -----------------------------------------------------------------------

    def start(self) -> "EmulatedNode":
        """Flash and power on the node (returns at once; see wait_connected/wait_done)."""
        if self.running:
            return self
        from tern.device.serial_sim import SerialSim

        self.flash()
        if not self.sims:
            for uart, opts in self._sim_specs.items():
                self.sims.append(SerialSim(**opts).start())
        self._stopping = False
        self._wake.clear()
        self.resets = 0
        # Power on: RTC memory is lost, flash (the folder) is kept.
        self.rtc_path.unlink(missing_ok=True)
        self._spawn(self.environment())
        return self

    def _spawn(self, env: dict[str, str]) -> None:
        if (self.workdir / "umqtt").exists():
            raise TernError(f"{self.workdir} holds a 'umqtt' folder; it would shadow the real one")
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [str(micropython_binary()), "-X", f"heapsize={self.heap}", "main.py"],
            cwd=self.workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.exit_code = None
        self._reader = threading.Thread(target=self._read, args=(self.process, env), daemon=True, name=f"node-{self.device}")
        self._reader.start()

    def _read(self, process: subprocess.Popen, env: dict[str, str]) -> None:
        assert process.stdout is not None
        cause = "SOFT_RESET"
        sleep_ms = 0
        log = self._log
        for raw in process.stdout:
            if log is not None:
                log.write(raw)
                log.flush()
            line = raw.decode(errors="replace").rstrip()[:300]
            self.tail.append(line)
            if line == "TERN error watchdog":
                cause = "WDT_RESET"
            elif line.startswith("TERN deepsleep "):
                try:
                    sleep_ms = int(line.split()[2])
                except ValueError:
                    sleep_ms = 0
            self._parse(line)
        code = process.wait()
        self.exit_code = code
        if log is not None:
            log.close()
        if code == -WDT_SIGNAL:
            cause = "WDT_RESET"
        if code == DEEPSLEEP_EXIT_CODE and self.auto_reset:
            # The timer wakes the chip: RTC memory and flash kept, reset cause DEEPSLEEP_RESET.
            # (Sleeps are not resets: a node that sleeps forever is not a crash loop.)
            self._wake.wait(min(sleep_ms, 3_600_000) / 1000)
            with self._lock:
                if not self._stopping:
                    self.wakes += 1
                    self.reset_causes.append("DEEPSLEEP_RESET")
                    self._spawn(dict(env, TERN_EMU_RESET_CAUSE="DEEPSLEEP_RESET"))
            return
        with self._lock:
            # (bounded: a node that crashes at every boot is left down, not respawned forever)
            if code in (RESET_EXIT_CODE, -WDT_SIGNAL) and self.auto_reset and not self._stopping and self.resets < MAX_RESETS:
                # machine.reset() or the watchdog: boot again, as the board would, with the
                # reset cause set; flash and RTC memory are kept.
                self.resets += 1
                self.reset_causes.append(cause)
                self._spawn(dict(env, TERN_EMU_RESET_CAUSE=cause))

    def _parse(self, line: str) -> None:
        parts = line.split()
        if len(parts) < 2 or parts[0] != "TERN":
            if "Error" in line or "Traceback" in line:
                self.errors.append(line)
            return
        event, args = parts[1], parts[2:]
        try:
            if event == "boot":
                self._reset_counters()
                self.boots += 1
                self.boot = args[0]
            elif event == "connected":
                self.connects += 1
            elif event == "sent":
                self.sent = max(self.sent, int(args[0]))
            elif event == "resent":
                self.resent += 1
            elif event == "acked":
                self.acked = max(self.acked, int(args[0]))
            elif event == "dropped":
                self.dropped = int(args[0])
            elif event == "stats":
                self.stats = {k: int(v) for k, v in (a.split("=", 1) for a in args)}
            elif event == "replayed":
                self.replayed += int(args[3])
                self.replay_messages += 1
            elif event == "spilled":
                self.spilled += int(args[0])
            elif event == "spill_dropped":
                self.spill_dropped += int(args[0])
            elif event == "done":
                self._done.set()
            elif event == "error":
                self.errors.append(" ".join(args))
        except (IndexError, ValueError):
            self.errors.append(f"unparsed: {line}")

    @property
    def running(self) -> bool:
        """True while the node's process is alive."""
        return self.process is not None and self.process.poll() is None

    def wait_done(self, timeout: float) -> bool:
        """Wait until the node printed ``TERN done`` (all max_readings published once)."""
        return self._done.wait(timeout)

    def wait_for(self, predicate, timeout: float, interval: float = 0.05) -> bool:
        """Poll ``predicate(self)`` until true or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            time.sleep(interval)
        return bool(predicate(self))

    def wait_connected(self, timeout: float = 10.0) -> bool:
        """Wait until the node has connected to the broker at least once this boot."""
        return self.wait_for(lambda n: n.connects > 0, timeout)

    def _signal_and_wait(self, sig: int, timeout: float, *, signal_sent: bool = False) -> None:
        process = self.process
        if process is None:
            return
        with self._lock:
            self._stopping = True
        self._wake.set()
        if process.poll() is None and signal_sent:
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        if process.poll() is None:
            try:
                os.kill(process.pid, sig)
            except ProcessLookupError:
                pass
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        if self._reader is not None:
            self._reader.join(5)

    def stop(self, timeout: float = 5.0, *, signal_sent: bool = False) -> None:
        """Graceful stop: SIGINT (the node publishes 'offline' and disconnects), then SIGKILL."""
        self._signal_and_wait(signal.SIGINT if not signal_sent else signal.SIGKILL, timeout, signal_sent=signal_sent)
        self._stop_sims()

    def kill(self) -> None:
        """Pull the plug: SIGKILL, no MQTT DISCONNECT, so the broker publishes the will."""
        self._signal_and_wait(signal.SIGKILL, 10)
        self._stop_sims()

    def _stop_sims(self) -> None:
        for sim in self.sims:
            sim.stop()
        self.sims = []

    def log_text(self) -> str:
        """The whole node log (for failure messages)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> "EmulatedNode":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EmulatedNode({self.device!r}, running={self.running}, sent={self.sent}, acked={self.acked})"


class Fleet:
    """N emulated nodes ``<prefix>-1 .. <prefix>-N``, each in ``workdir/<name>``."""

    def __init__(self, workdir: Path, count: int = 3, *, broker: str, site: str, prefix: str = "node",
                 per_node: Callable[[str], dict] | None = None, **node_kwargs: Any) -> None:
        """``per_node(device)`` adds config keys of that node's own (its credentials)."""
        if count < 1:
            raise ConfigError("a fleet needs at least one node")
        self.workdir = Path(workdir)
        self.nodes = []
        for i in range(1, count + 1):
            device = f"{prefix}-{i}"
            kwargs = dict(node_kwargs)
            if per_node is not None:
                kwargs["extra_config"] = {**(kwargs.get("extra_config") or {}), **per_node(device)}
            self.nodes.append(EmulatedNode(self.workdir / device, device=device, site=site, broker=broker, **kwargs))

    def start(self) -> "Fleet":
        """Start every node."""
        for node in self.nodes:
            node.start()
        return self

    def stop_all(self, timeout: float = 5.0) -> None:
        """Stop every node gracefully (SIGINT to all first, then wait)."""
        for node in self.nodes:
            if node.process is not None and node.running:
                node._stopping = True
                node._wake.set()
                try:
                    os.kill(node.process.pid, signal.SIGINT)
                except ProcessLookupError:
                    pass
        for node in self.nodes:
            node.stop(timeout, signal_sent=True)

    def kill_all(self) -> None:
        """SIGKILL every node."""
        for node in self.nodes:
            node.kill()

    def wait_done(self, timeout: float) -> bool:
        """Wait until every node printed ``TERN done``."""
        deadline = time.monotonic() + timeout
        return all(node.wait_done(max(0.0, deadline - time.monotonic())) for node in self.nodes)

    @property
    def devices(self) -> list[str]:
        return [node.device for node in self.nodes]

    def __iter__(self):
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def __getitem__(self, index: int) -> EmulatedNode:
        return self.nodes[index]

    def __enter__(self) -> "Fleet":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop_all()
