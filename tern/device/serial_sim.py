"""Host-side simulated serial sensors on pseudo-terminals: a Plantower PMS5003 and an NMEA GPS.

An emulated node's ``machine.UART(n)`` reads the pty's slave end (its path goes into the
node's ``TERN_EMU_UART<n>`` environment variable); the gateway's Pi-wired sensor reader
opens it by name with pyserial, as it would a USB adapter. Values follow slow curves with
noise (urban PM2.5 around 12 ug/m3; a GPS fix wandering a few metres around a point).
On request frames are broken in one of :data:`BREAKAGES`, which the reader must count as
bad frames and skip:

- ``checksum``: the checksum does not match;
- ``truncated``: the frame is cut short (the next frame follows at once);
- ``garbage``: random bytes between two frames;
- ``wrong_length``: a PMS5003 frame whose length field (and size) is not 28; an NMEA
  sentence with a valid checksum but fields missing.
"""

from __future__ import annotations

import errno
import math
import os
import random
import threading
import time
import tty

from tern.core.sensor_protocols import PMSFrame, encode_gga, encode_pms, encode_rmc, nmea_checksum, nmea_sentence, pms_checksum

BREAKAGES = ("checksum", "truncated", "garbage", "wrong_length")
PROTOCOLS = ("pms5003", "nmea")


def break_frame(frame: bytes, how: str, protocol: str, rng: random.Random) -> bytes:
    """Spoil one valid frame of ``protocol`` the way named by ``how`` (one of BREAKAGES)."""
    if how == "checksum":
        if protocol == "pms5003":
            return frame[:-2] + ((int.from_bytes(frame[-2:], "big") + 1 + rng.randrange(0xFFFE)) & 0xFFFF).to_bytes(2, "big")
        star = frame.rindex(b"*")
        good = int(frame[star + 1 : star + 3], 16)
        return frame[: star + 1] + f"{good ^ rng.randrange(1, 256):02X}".encode() + b"\r\n"
    if how == "truncated":
        return frame[: rng.randrange(1, len(frame) - 4)]
    if how == "garbage":
        # Printable noise, as a loose connector or a baud mismatch gives; never a header or newline.
        return bytes(rng.choice(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,~#") for _ in range(rng.randrange(3, 40)))
    if how == "wrong_length":
        if protocol == "pms5003":
            size = rng.choice((20, 24, 36))
            body = b"\x42\x4d" + (size - 4).to_bytes(2, "big") + bytes(rng.randrange(0, 256) for _ in range(size - 6))
            return body + pms_checksum(body).to_bytes(2, "big")
        body = frame[1 : frame.rindex(b"*")].decode()
        short = ",".join(body.split(",")[:5])
        return nmea_sentence(short)
    raise ValueError(f"unknown breakage {how!r}; choose from {', '.join(BREAKAGES)}")


class SerialSim:
    """A simulated serial sensor on a pseudo-terminal.

    ``path`` is the slave device for the node's UART (or pyserial on the Pi side). Call
    :meth:`write_frame` yourself, or :meth:`start` a thread that sends one frame every
    ``interval_s`` (the GPS sends a GGA and an RMC); ``bad_fraction`` of them are broken,
    each followed by a good one. :meth:`pause` makes the sensor go silent (a sensor that
    stopped answering). Writes never block: with nobody reading, frames that do not fit are
    dropped and counted in ``overflowed``.
    """

    def __init__(self, *, protocol: str = "pms5003", interval_s: float = 0.25, bad_fraction: float = 0.0,
                 seed: int = 1) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        if not 0.0 <= bad_fraction <= 1.0:
            raise ValueError("bad_fraction must be within [0, 1]")
        self.protocol = protocol
        self.interval_s = interval_s
        self.bad_fraction = bad_fraction
        self.rng = random.Random(seed)
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)  # no echo, no CR/LF translation
        os.set_blocking(self.master, False)
        self.path = os.ttyname(self.slave)
        self.sent_good = 0
        self.sent_bad = 0
        self.overflowed = 0
        self.paused = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = time.monotonic()
        self._lat, self._lon = 52.52 + self.rng.uniform(-0.01, 0.01), 13.405 + self.rng.uniform(-0.01, 0.01)

    # --- values ---------------------------------------------------------------------------

    def pms_frame(self) -> PMSFrame:
        """The current particulate values: PM2.5 ~12 ug/m3 on a slow curve, with noise."""
        t = time.monotonic() - self._t0
        pm25 = max(0.0, 12 + 6 * math.sin(t / 40) + self.rng.gauss(0, 1.5))
        pm1, pm10 = pm25 * 0.7 + self.rng.gauss(0, 0.5), pm25 * 1.4 + self.rng.gauss(0, 1.5)
        counts = (int(pm25 * 180), int(pm25 * 55), int(pm25 * 10), int(pm25 * 1.2), int(pm25 * 0.3), int(pm25 * 0.1))
        return PMSFrame(max(0, round(pm1)), round(pm25), max(0, round(pm10)), counts=counts)  # type: ignore[arg-type]

    def gps_fix(self) -> tuple[float, float, float, int]:
        """(lat, lon, alt_m, sats): a few metres of wander around a point in Berlin."""
        self._lat += self.rng.gauss(0, 0.000005)
        self._lon += self.rng.gauss(0, 0.000008)
        return self._lat, self._lon, 34.0 + self.rng.gauss(0, 1.0), self.rng.randint(7, 11)

    def frames(self) -> list[bytes]:
        """The next valid frame(s) the sensor sends."""
        if self.protocol == "pms5003":
            return [encode_pms(self.pms_frame())]
        lat, lon, alt, sats = self.gps_fix()
        utc = time.strftime("%H%M%S.00", time.gmtime())
        date = time.strftime("%d%m%y", time.gmtime())
        speed = abs(self.rng.gauss(0, 0.1))
        return [encode_gga(lat, lon, alt, sats, utc=utc), encode_rmc(lat, lon, speed, utc=utc, date=date)]

    # --- writing --------------------------------------------------------------------------

    def write_raw(self, data: bytes) -> bool:
        """Write bytes to the line; False (and counted) if the pty buffer is full."""
        try:
            os.write(self.master, data)
            return True
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                self.overflowed += 1
                return False
            raise

    def write_frame(self, frame: bytes | None = None, *, broken: str | None = None) -> bytes:
        """Send one frame (default: the sensor's next one), valid or broken the named way."""
        if frame is None:
            frame = self.frames()[0]
        if broken:
            frame = break_frame(frame, broken, self.protocol, self.rng)
        if self.write_raw(frame):
            if broken:
                self.sent_bad += 1
            else:
                self.sent_good += 1
        return frame

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if self.paused.is_set():
                continue
            try:
                if self.bad_fraction and self.rng.random() < self.bad_fraction:
                    self.write_frame(broken=self.rng.choice(BREAKAGES))
                for frame in self.frames():
                    self.write_frame(frame)
            except OSError:
                return

    def start(self) -> "SerialSim":
        """Send frames from a background thread until :meth:`stop`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"serial-sim-{self.protocol}", daemon=True)
            self._thread.start()
        return self

    def pause(self, silent: bool = True) -> None:
        """Make the sensor stop answering (``silent``) or resume."""
        if silent:
            self.paused.set()
        else:
            self.paused.clear()

    def stop(self) -> None:
        """Stop the thread and close the pty."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
            self._thread = None
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass
        self.master = self.slave = -1

    def __enter__(self) -> "SerialSim":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["BREAKAGES", "PROTOCOLS", "SerialSim", "break_frame", "nmea_checksum"]


def main(argv: list[str] | None = None) -> int:
    """``python -m tern.device.serial_sim``: a simulated sensor on a pty until Ctrl-C or --seconds.

    Prints the pty's path first, so a gateway (``serial_sensors``) or an emulated node
    (``TERN_EMU_UART<n>``) can be pointed at it by hand.
    """
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m tern.device.serial_sim", description=main.__doc__.splitlines()[0])
    parser.add_argument("--protocol", choices=PROTOCOLS, default="pms5003")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between frames (default 1)")
    parser.add_argument("--bad-fraction", type=float, default=0.0, help="share of broken frames, 0-1")
    parser.add_argument("--seconds", type=float, default=0.0, help="stop after this long (default: run until Ctrl-C)")
    parser.add_argument("--link", help="also make this symlink to the pty (as udev does under /dev/serial/by-id)")
    args = parser.parse_args(argv)
    try:
        sim = SerialSim(protocol=args.protocol, interval_s=args.interval, bad_fraction=args.bad_fraction)
    except ValueError as exc:
        parser.error(str(exc))
    if args.link:
        if os.path.lexists(args.link):
            os.unlink(args.link)
        os.symlink(sim.path, args.link)
    print(args.link or sim.path, flush=True)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM stops as cleanly as Ctrl-C (the symlink goes too)

    import signal

    signal.signal(signal.SIGTERM, on_term)
    sim.start()
    try:
        deadline = time.monotonic() + args.seconds if args.seconds > 0 else None
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()
        if args.link and os.path.islink(args.link):
            os.unlink(args.link)
    print(f"sent {sim.sent_good} good and {sim.sent_bad} broken frames", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
