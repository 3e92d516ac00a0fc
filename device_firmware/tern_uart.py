# Tern UART sensors: a PMS5003 (protocol "pms5003") or an NMEA GPS ("nmea") on UART1/2
# (UART0 carries the REPL). The protocol parsers live in tern_pms / tern_nmea and only
# the configured one is compiled. Broken frames are counted and skipped.
import machine

try:
    import time
    _ticks = time.ticks_ms
    _ticks_diff = time.ticks_diff
except AttributeError:  # CPython, for host-side tests
    import time

    def _ticks():
        return int(time.monotonic() * 1000)

    def _ticks_diff(a, b):
        return a - b

PROTOCOLS = ("pms5003", "nmea")


def parser_for(protocol):
    if protocol == "pms5003":
        from tern_pms import PMSParser
        return PMSParser()
    if protocol == "nmea":
        from tern_nmea import NMEAParser
        return NMEAParser()
    raise ValueError("unknown uart protocol %r" % (protocol,))


class UARTSensor:
    """A serial sensor: drains its UART in poll(), reports the last good frame in read().

    read() raises OSError when no good frame came yet or the last one is older than
    max_age_ms (a sensor that stopped answering), so Sensors reports it as down.
    """

    def __init__(self, spec):
        self.protocol = spec.get("protocol", "pms5003")
        self.parser = parser_for(self.protocol)
        self.names = spec.get("names") or self.parser.NAMES
        self.label = spec.get("label", self.protocol)
        self.max_age_ms = spec.get("max_age_ms", 5000)
        kw = {"baudrate": spec.get("baud", 9600)}
        if "tx" in spec:
            kw["tx"] = spec["tx"]
        if "rx" in spec:
            kw["rx"] = spec["rx"]
        self.uart = machine.UART(spec.get("uart", 1), **kw)
        self.chunk = bytearray(64)
        self.when = 0

    @property
    def good_frames(self):
        return self.parser.good

    @property
    def bad_frames(self):
        return self.parser.bad

    def poll(self):
        # Drain whatever the UART holds, a chunk at a time; bounded per call.
        for _ in range(16):
            if not self.uart.any():
                return
            n = self.uart.readinto(self.chunk)
            if not n:
                return
            if self.parser.feed(self.chunk, n):
                self.when = _ticks()

    def read(self, out):
        self.poll()
        if not self.parser.good:
            raise OSError("no frame")
        if _ticks_diff(_ticks(), self.when) > self.max_age_ms:
            raise OSError("stale")
        self.parser.fill(self.names, out)
