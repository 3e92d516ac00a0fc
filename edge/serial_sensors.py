"""Sensors wired to the Pi itself: serial ports read with pyserial, readings into the outbox.

A USB-serial adapter (or the Pi's own UART) carries a PMS5003 or an NMEA GPS, the same
protocols as on a node's UART (``tern.core.sensor_protocols``). The gateway config names
each port as ``PATH:BAUD:PROTOCOL:DEVICE[:SITE]`` (``serial_sensors``, comma-separated;
SITE defaults to the gateway id). One thread per port:

- opens the port by name, and when it is missing, unplugged (read error) or silent for
  ``stale_s``, closes it and tries again every ``retry_s``: a replugged adapter is picked
  up by itself, also when it comes back under the same udev symlink;
- decodes frames, counts bad ones (a reading carries ``bad_frames`` like a node's does),
  and commits one reading per PMS5003 frame or GPS fix (GGA) to the outbox, under the
  device id, a boot id per port opening and a gap-free seq, so they travel to Kafka exactly
  like a node's readings;
- records the sensor's liveness as status events (``online`` when frames flow, ``offline``
  when the port goes away or falls silent), which reach Kafka like a node's birth and will.

A full outbox cannot push back on a sensor: such readings are counted in ``dropped_full``
and logged, never dropped silently.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tern.core.codec import Reading, StatusEvent
from tern.core.errors import CodecError, ConfigError
from tern.core.sensor_protocols import PMSStream, ProtocolError, decode_nmea
from tern.core.topics import check_id

if TYPE_CHECKING:
    from tern.edge.outbox import Outbox

log = logging.getLogger(__name__)

PROTOCOLS = ("pms5003", "nmea")
BAUDS = (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600)
#: Longest NMEA line kept while waiting for its end: anything longer is garbage.
LINE_MAX = 128


@dataclass(frozen=True)
class SerialSensorSpec:
    """One Pi-wired sensor: where it is plugged in and whose readings it makes."""

    path: str
    baud: int
    protocol: str
    device: str
    site: str

    def __str__(self) -> str:
        return f"{self.path}:{self.baud}:{self.protocol}:{self.device}:{self.site}"


def parse_specs(text: str, default_site: str) -> list[SerialSensorSpec]:
    """``PATH:BAUD:PROTOCOL:DEVICE[:SITE]`` entries separated by commas; ConfigError naming the bad one."""
    specs = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        parts = entry.split(":")
        if len(parts) == 5:
            path, baud, protocol, device, site = parts
        elif len(parts) == 4:
            (path, baud, protocol, device), site = parts, default_site
        else:
            raise ConfigError(f"serial sensor {entry!r}: expected PATH:BAUD:PROTOCOL:DEVICE[:SITE]")
        if not path.startswith("/"):
            raise ConfigError(f"serial sensor {entry!r}: the port must be an absolute device path, got {path!r}")
        if not baud.isdigit() or int(baud) not in BAUDS:
            raise ConfigError(f"serial sensor {entry!r}: baud must be one of {', '.join(map(str, BAUDS))}, got {baud!r}")
        if protocol not in PROTOCOLS:
            raise ConfigError(f"serial sensor {entry!r}: protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        try:
            check_id(device, "device")
            check_id(site, "site")
        except CodecError as exc:
            raise ConfigError(f"serial sensor {entry!r}: {exc}") from None
        specs.append(SerialSensorSpec(path, int(baud), protocol, device, site))
    devices = [s.device for s in specs]
    if len(set(devices)) != len(devices):
        raise ConfigError(f"serial sensors: each needs its own device id, got {', '.join(devices)}")
    return specs


class _NMEALines:
    """Bounded line splitter + decoder for the host: GGA fixes out, bad sentences counted."""

    def __init__(self) -> None:
        self.line = bytearray()
        self.bad = 0
        self.good = 0
        self.speed: float | None = None
        self._dirty = False

    def _spoiled(self) -> None:
        if not self._dirty:
            self.bad += 1
            self._dirty = True

    def feed(self, data: bytes) -> list[dict]:
        out = []
        for byte in data:
            if byte == 0x24:  # '$'
                if self.line:
                    self._spoiled()
                self.line = bytearray(b"$")
            elif byte in (10, 13):
                if self.line:
                    fix = self._sentence(bytes(self.line))
                    if fix is not None:
                        out.append(fix)
                    self.line = bytearray()
            elif not self.line:
                self._spoiled()
            elif len(self.line) < LINE_MAX:
                self.line.append(byte)
        return out

    def _sentence(self, raw: bytes) -> dict | None:
        try:
            kind, values = decode_nmea(raw)
        except ProtocolError:
            self._spoiled()
            return None
        self._dirty = False
        if kind == "RMC":
            self.good += 1
            self.speed = values.get("speed_kn")
        elif kind == "GGA":
            self.good += 1
            if self.speed is not None and "lat" in values:
                values["speed_kn"] = self.speed
            return values
        return None


class SerialSensor:
    """One port's reader thread (see the module docstring)."""

    def __init__(self, spec: SerialSensorSpec, outbox: "Outbox", *, retry_s: float = 1.0, stale_s: float = 10.0) -> None:
        self.spec = spec
        self.outbox = outbox
        self.retry_s = retry_s
        self.stale_s = stale_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"tern-serial-{spec.device}", daemon=True)
        self._lock = threading.Lock()
        self.boot = ""
        self.seq = 0
        self.online = False
        self.counts = {"readings": 0, "bad_frames": 0, "opens": 0, "unplugged": 0, "stale": 0, "dropped_full": 0}
        self._reason = ""

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> "SerialSensor":
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def stats(self) -> dict:
        with self._lock:
            return {**self.counts, "online": self.online, "boot": self.boot, "seq": self.seq}

    # --- the thread ---------------------------------------------------------------------

    def _run(self) -> None:
        import serial  # pyserial: the edge extra

        said_missing = False
        while not self._stop.is_set():
            try:
                port = serial.Serial(self.spec.path, self.spec.baud, timeout=0.2)
            except (serial.SerialException, OSError, ValueError) as exc:
                if not said_missing:
                    log.warning("serial sensor %s: cannot open %s (%s); retrying every %g s",
                                self.spec.device, self.spec.path, _why(exc), self.retry_s)
                    said_missing = True
                self._stop.wait(self.retry_s)
                continue
            said_missing = False
            try:
                self._read(port)
            except (serial.SerialException, OSError) as exc:
                with self._lock:
                    self.counts["unplugged"] += 1
                log.warning("serial sensor %s: %s went away (%s); waiting for it to come back",
                            self.spec.device, self.spec.path, _why(exc))
                self._set_online(False)
            finally:
                try:
                    port.close()
                except Exception:  # a vanished device may fail to close; nothing to keep
                    pass
            self._stop.wait(self.retry_s)
        self._set_online(False)

    def _read(self, port) -> None:
        with self._lock:
            self.counts["opens"] += 1
            self.boot = secrets.token_hex(4)
            self.seq = 0
        log.info("serial sensor %s: reading %s at %d baud (%s)", self.spec.device, self.spec.path,
                 self.spec.baud, self.spec.protocol)
        decoder = PMSStream() if self.spec.protocol == "pms5003" else _NMEALines()
        last_good = time.monotonic()
        while not self._stop.is_set():
            data = port.read(256)
            if not os.path.exists(self.spec.path):
                raise OSError(f"{self.spec.path} no longer exists")
            results = decoder.feed(data) if data else []
            with self._lock:
                self.counts["bad_frames"] = decoder.bad
            for result in results:
                self._store(dict(result if isinstance(result, dict) else result.values()), decoder.bad)
                last_good = time.monotonic()
            if time.monotonic() - last_good > self.stale_s:
                with self._lock:
                    self.counts["stale"] += 1
                log.warning("serial sensor %s: no valid frame for %.0f s; reopening %s",
                            self.spec.device, self.stale_s, self.spec.path)
                self._set_online(False)
                return

    def _store(self, values: dict, bad: int) -> None:
        if bad:
            values["bad_frames"] = bad
        if not values:
            return
        if self.outbox.room() < 2:
            with self._lock:
                self.counts["dropped_full"] += 1
            log.warning("outbox full: reading of serial sensor %s not stored (dropped_full=%d)",
                        self.spec.device, self.counts["dropped_full"])
            return
        self._set_online(True)
        with self._lock:
            self.seq += 1
            reading = Reading(self.spec.device, self.boot, self.seq, int(time.time() * 1000), values, self.spec.site)
        self.outbox.add([reading])
        with self._lock:
            self.counts["readings"] += 1

    def _set_online(self, online: bool) -> None:
        with self._lock:
            if online == self.online or not self.boot:
                return
            self.online = online
            boot = self.boot
        event = StatusEvent(self.spec.site, self.spec.device, "online" if online else "offline", boot,
                            fw=f"pi-serial {self.spec.protocol}")
        try:
            self.outbox.add([], statuses=[event])
        except Exception:  # closing down: the outbox may be gone already
            log.debug("status of %s not stored", self.spec.device, exc_info=True)


def _why(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


class SerialSensors:
    """Every Pi-wired sensor of a gateway."""

    def __init__(self, specs: list[SerialSensorSpec], outbox: "Outbox", **kwargs: float) -> None:
        self.sensors = [SerialSensor(spec, outbox, **kwargs) for spec in specs]

    def start(self) -> "SerialSensors":
        for sensor in self.sensors:
            sensor.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        for sensor in self.sensors:
            sensor._stop.set()
        for sensor in self.sensors:
            sensor.stop(timeout)

    def stats(self) -> dict:
        """Per device: readings, bad_frames, opens, unplugged, stale, dropped_full, online."""
        return {s.spec.device: s.stats() for s in self.sensors}
