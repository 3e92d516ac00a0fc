"""Host-side simulated serial sensor: writes ``$TRN,<v1>,<v2>*HH\\r\\n`` frames into a pty.

An emulated node's ``machine.UART(n)`` reads the pty's slave end (its path goes into the
node's ``TERN_EMU_UART<n>`` environment variable). On request a fraction of the frames is
broken in one of several ways (bad checksum, truncated, garbage, overlong line, bad
number), which the firmware must count as ``bad_frames`` and skip.
"""

from __future__ import annotations

import errno
import math
import os
import random
import threading
import time
import tty

BREAKAGES = ("checksum", "truncated", "garbage", "overlong", "nonumber", "nodollar")


def checksum(body: str) -> int:
    """NMEA checksum: XOR of the characters between ``$`` and ``*``."""
    value = 0
    for char in body.encode():
        value ^= char
    return value


def make_frame(values: tuple[float, ...] | list[float], *, tag: str = "TRN") -> bytes:
    """A valid frame for ``values`` (two decimals each)."""
    body = ",".join([tag] + [f"{v:.2f}" for v in values])
    return f"${body}*{checksum(body):02X}\r\n".encode()


def break_frame(frame: bytes, how: str, rng: random.Random | None = None) -> bytes:
    """Spoil a valid frame in the way named by ``how`` (one of BREAKAGES)."""
    rng = rng or random.Random(0)
    if how == "checksum":
        star = frame.index(b"*")
        good = int(frame[star + 1 : star + 3], 16)
        return frame[: star + 1] + f"{good ^ 0x5A:02X}".encode() + b"\r\n"
    if how == "truncated":
        return frame[: len(frame) // 2] + b"\r\n"
    if how == "garbage":
        return bytes(rng.randrange(1, 256) for _ in range(20)).replace(b"\n", b"x") + b"\r\n"
    if how == "overlong":
        return b"$TRN," + b"9" * 300 + b"*00\r\n"
    if how == "nonumber":
        body = "TRN,abc,40.00"
        return f"${body}*{checksum(body):02X}\r\n".encode()
    if how == "nodollar":
        return frame[1:]
    raise ValueError(f"unknown breakage {how!r}; choose from {', '.join(BREAKAGES)}")


class SerialSim:
    """A simulated serial sensor on a pseudo-terminal.

    ``path`` is the slave device for the node's UART. Call :meth:`write_frame` yourself,
    or :meth:`start` a thread that sends one frame every ``interval_s`` (values follow a
    slow deterministic curve; ``bad_fraction`` of them are broken). Writes never block:
    with nobody reading, frames that do not fit are dropped and counted in ``overflowed``.
    """

    def __init__(self, *, interval_s: float = 0.25, bad_fraction: float = 0.0, seed: int = 1, fields: int = 2) -> None:
        if not 0.0 <= bad_fraction <= 1.0:
            raise ValueError("bad_fraction must be within [0, 1]")
        self.interval_s = interval_s
        self.bad_fraction = bad_fraction
        self.fields = fields
        self.rng = random.Random(seed)
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)  # no echo, no CR/LF translation
        os.set_blocking(self.master, False)
        self.path = os.ttyname(self.slave)
        self.sent_good = 0
        self.sent_bad = 0
        self.overflowed = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = time.monotonic()

    def values(self) -> tuple[float, ...]:
        """The current simulated values: temperature-ish and humidity-ish curves."""
        t = time.monotonic() - self._t0
        base = (21.5 + 2 * math.sin(t / 30), 40.0 + 5 * math.cos(t / 45))
        return tuple(base[i % 2] + i // 2 for i in range(self.fields))

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

    def write_frame(self, values=None, *, broken: str | None = None) -> bytes:
        """Send one frame (valid, or broken the named way); return the bytes sent."""
        frame = make_frame(values if values is not None else self.values())
        if broken:
            frame = break_frame(frame, broken, self.rng)
        if self.write_raw(frame):
            if broken:
                self.sent_bad += 1
            else:
                self.sent_good += 1
        return frame

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            broken = None
            if self.bad_fraction and self.rng.random() < self.bad_fraction:
                broken = self.rng.choice(BREAKAGES)
            try:
                self.write_frame(broken=broken)
            except OSError:
                return

    def start(self) -> "SerialSim":
        """Send frames from a background thread until :meth:`stop`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="serial-sim", daemon=True)
            self._thread.start()
        return self

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
