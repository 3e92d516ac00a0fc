# Emulated ESP32 peripherals behind `machine` (ADC, I2C with a TMP102 and an SHT3x, UART);
# see machine.py. Sensor settings come from the environment or, so the host can change
# them while a node runs, from the file named by TERN_EMU_CTL (lines NAME=VALUE, which win).
import math
import os
import time

from machine import Pin, _env, _phase, _seconds


def _setting(name):
    path = _env("TERN_EMU_CTL")
    if path is not None:
        try:
            with open(path) as f:
                for line in f:
                    key, _, value = line.strip().partition("=")
                    if key == name:
                        return value or None
        except OSError:
            pass
    return _env(name)


class ADC:
    """ADC with 11 dB attenuation: 0..3300 mV full scale."""
    ATTN_0DB = 0
    ATTN_2_5DB = 1
    ATTN_6DB = 2
    ATTN_11DB = 3
    WIDTH_12BIT = 3

    def __init__(self, pin, atten=3):
        self.pin = pin.id if isinstance(pin, Pin) else pin

    def atten(self, a):
        pass

    def width(self, w):
        pass

    def _mv(self):
        fixed = _setting("TERN_EMU_ADC_%s" % self.pin)
        if fixed is not None:
            return int(fixed)
        # deterministic: 1650 mV +- 1000 mV sine with a 60 s period, phase per pin
        return int(1650 + 1000 * math.sin(2 * math.pi * _seconds() / 60 + self.pin + _phase()))

    def read_uv(self):
        return self._mv() * 1000

    def read_u16(self):
        return min(65535, self._mv() * 65535 // 3300)

    def read(self):
        return min(4095, self._mv() * 4095 // 3300)


class _TMP102:
    def __init__(self):
        self.pointer = 0

    def register(self, reg):
        if reg != 0:
            return b"\x60\xa0"  # config register power-on value
        t = _setting("TERN_EMU_TMP102")
        if t == "fail":
            raise OSError(19)  # ENODEV, as when the sensor stops answering
        c = float(t) if t is not None else 21 + 4 * math.sin(2 * math.pi * _seconds() / 120 + _phase())
        raw = int(round(c / 0.0625)) & 0xFFF
        return bytes(((raw >> 4) & 0xFF, (raw << 4) & 0xF0))


def _crc8(b0, b1):
    c = 0xFF
    for b in (b0, b1):
        c ^= b
        for _ in range(8):
            c = ((c << 1) ^ 0x31) & 0xFF if c & 0x80 else (c << 1) & 0xFF
    return c


class _SHT3x:
    """TERN_EMU_SHT3X: "C,RH" fixed values; "fail" NACKs; "crc" spoils the T word's CRC;
    default slow curves around 22 C / 45 %RH."""

    def __init__(self):
        self.pointer = 0
        self.measured = False

    def command(self, buf):
        if len(buf) == 2 and buf[0] == 0x24:
            self.measured = True

    def data(self, n):
        v = _setting("TERN_EMU_SHT3X")
        if v == "fail":
            raise OSError(19)
        if not self.measured:
            raise OSError(19)   # no measurement started: the SHT3x NACKs the read header
        self.measured = False
        if v is not None and "," in v:
            c, rh = float(v.split(",")[0]), float(v.split(",")[1])
        else:
            c = 22 + 3 * math.sin(2 * math.pi * _seconds() / 150 + _phase())
            rh = 45 + 10 * math.cos(2 * math.pi * _seconds() / 200 + _phase())
        out = bytearray(6)
        for i, raw in ((0, int(round((c + 45) * 65535 / 175))), (3, int(round(rh * 65535 / 100)))):
            raw = min(0xFFFF, max(0, raw))
            out[i] = raw >> 8
            out[i + 1] = raw & 0xFF
            out[i + 2] = _crc8(out[i], out[i + 1])
        if v == "crc":
            out[2] ^= 0x5A
        return bytes(out[:n])


class I2C:
    """I2C bus with a TMP102 at 0x48 and an SHT3x at 0x44; other addresses NACK (OSError ENODEV)."""

    def __init__(self, id=0, scl=None, sda=None, freq=400000, timeout=50000):
        self.devices = {0x48: _TMP102(), 0x44: _SHT3x()}

    def scan(self):
        return sorted(self.devices)

    def _dev(self, addr):
        d = self.devices.get(addr)
        if d is None:
            raise OSError(19)
        return d

    def readfrom_mem(self, addr, reg, n, addrsize=8):
        return self._dev(addr).register(reg)[:n]

    def readfrom_mem_into(self, addr, reg, buf, addrsize=8):
        data = self.readfrom_mem(addr, reg, len(buf))
        for i in range(len(data)):
            buf[i] = data[i]

    def writeto(self, addr, buf, stop=True):
        d = self._dev(addr)
        if hasattr(d, "command"):
            d.command(buf)
        elif len(buf):
            d.pointer = buf[0]
        return len(buf)

    def readfrom(self, addr, n, stop=True):
        d = self._dev(addr)
        if hasattr(d, "data"):
            return d.data(n)
        return d.register(d.pointer)[:n]

    def readfrom_into(self, addr, buf, stop=True):
        data = self.readfrom(addr, len(buf), stop)
        for i in range(len(data)):
            buf[i] = data[i]

    def writeto_mem(self, addr, reg, buf, addrsize=8):
        self._dev(addr)


SoftI2C = I2C


class UART:
    """Non-blocking UART reading bytes the host writes to $TERN_EMU_UART<id>.

    A regular file is followed like `tail -f`; a pty or fifo is polled. With no path
    configured the UART is silent (any() == 0). write() output is discarded.
    """

    def __init__(self, id, baudrate=9600, **kw):
        self.id = id
        self.f = None
        self.poller = None
        path = _env("TERN_EMU_UART%d" % id)
        if path is not None:
            self.f = open(path, "rb")
            try:
                import select
                st = os.stat(path)
                if st[0] & 0o170000 != 0o100000:  # not a regular file: poll it
                    self.poller = select.poll()
                    self.poller.register(self.f, select.POLLIN)
            except (ImportError, OSError):
                pass

    def init(self, *args, **kw):
        pass

    def deinit(self):
        if self.f is not None:
            self.f.close()
            self.f = None

    def any(self):
        if self.f is None:
            return 0
        if self.poller is not None:
            for obj, ev in self.poller.poll(0):
                return 1 if ev & 1 else 0  # POLLIN; POLLHUP/ERR -> nothing to read
            return 0
        return 1  # regular file: read() returns b"" at EOF, never blocks

    def read(self, n=64):
        if self.poller is None:
            data = self.f.read(n) if self.f is not None else None
            return data or None
        # A tty/fifo read(n) blocks until n bytes arrive: take one byte per poll instead.
        out = bytearray()
        while len(out) < n and self.any():
            b = self.f.read(1)
            if not b:
                break
            out += b
        return bytes(out) if out else None

    def readinto(self, buf, n=None):
        data = self.read(len(buf) if n is None else n)
        if not data:
            return None
        for i in range(len(data)):
            buf[i] = data[i]
        return len(data)

    def readline(self):
        out = bytearray()
        while True:
            b = self.read(1)
            if not b:
                return bytes(out) if out else None
            out += b
            if b == b"\n":
                return bytes(out)

    def write(self, buf):
        return len(buf)


