# Tern UART line sensor: frames $TRN,<v1>,<v2>*HH\r\n with an NMEA XOR checksum.
# Broken frames are counted (bad_frames) and skipped; runs on MicroPython and CPython.
import machine

try:
    import time
    _ticks = time.ticks_ms
    _ticks_diff = time.ticks_diff
except AttributeError:  # CPython, for host-side tests of the parser
    import time

    def _ticks():
        return int(time.monotonic() * 1000)

    def _ticks_diff(a, b):
        return a - b


def nmea_checksum(buf, start, end):
    c = 0
    for i in range(start, end):
        c ^= buf[i]
    return c


def _hexval(b):
    if 48 <= b <= 57:
        return b - 48
    if 65 <= b <= 70:
        return b - 55
    if 97 <= b <= 102:
        return b - 87
    raise ValueError("hex")


def parse_frame(line, n, vals):
    """Parse b'$TRN,21.50,40.10*HH' (no CR/LF) into vals[0:n]; False if broken."""
    ln = len(line)
    if ln < 8 or line[0] != 36 or line[ln - 3] != 42:  # '$' ... '*HH'
        return False
    try:
        want = (_hexval(line[ln - 2]) << 4) | _hexval(line[ln - 1])
    except ValueError:
        return False
    if nmea_checksum(line, 1, ln - 3) != want:
        return False
    fields = bytes(line[1:ln - 3]).split(b",")
    if fields[0] != b"TRN" or len(fields) != n + 1:
        return False
    try:
        for i in range(n):
            v = float(fields[i + 1])
            if v != v or v in (float("inf"), float("-inf")):
                return False
            vals[i] = v
    except ValueError:
        return False
    return True


class UARTSensor:
    """Line sensor on UART1/2 (UART0 is the REPL): frames $TRN,v1,v2*HH\\r\\n."""

    LINE_MAX = 96

    def __init__(self, spec):
        self.names = spec.get("names", ["temp_c", "rh"])
        self.max_age_ms = spec.get("max_age_ms", 5000)
        uid = spec.get("uart", 1)
        kw = {"baudrate": spec.get("baud", 9600)}
        if "tx" in spec:
            kw["tx"] = spec["tx"]
        if "rx" in spec:
            kw["rx"] = spec["rx"]
        self.uart = machine.UART(uid, **kw)
        self.line = bytearray(self.LINE_MAX)
        self.len = 0
        self.overflow = False
        self.chunk = bytearray(64)
        self.vals = [0.0] * len(self.names)
        self.tmp = [0.0] * len(self.names)
        self.have = False
        self.when = 0
        self.good_frames = 0
        self.bad_frames = 0

    def _end_line(self):
        n = self.len
        if n and self.line[n - 1] == 13:
            n -= 1
        if self.overflow:
            self.bad_frames += 1
        elif n:
            if parse_frame(memoryview(self.line)[:n], len(self.names), self.tmp):
                for i in range(len(self.tmp)):
                    self.vals[i] = self.tmp[i]
                self.have = True
                self.when = _ticks()
                self.good_frames += 1
            else:
                self.bad_frames += 1
        self.len = 0
        self.overflow = False

    def poll(self):
        # Drain whatever the UART holds, a chunk at a time; bounded per call.
        for _ in range(16):
            if not self.uart.any():
                return
            n = self.uart.readinto(self.chunk)
            if not n:
                return
            for i in range(n):
                b = self.chunk[i]
                if b == 10:
                    self._end_line()
                elif self.len < self.LINE_MAX:
                    self.line[self.len] = b
                    self.len += 1
                else:
                    self.overflow = True

    def read(self, out):
        self.poll()
        if not self.have:
            raise OSError("no frame")
        if _ticks_diff(_ticks(), self.when) > self.max_age_ms:
            raise OSError("stale")
        for i in range(len(self.names)):
            out[self.names[i]] = self.vals[i]


