# Plantower PMS5003 particulate sensor, active mode: 32-byte frames
#   0x42 0x4D, frame length (28, big-endian), 13 big-endian u16 data words, u16 checksum
#   = sum of the 30 bytes before it. Data words 3-5 are PM1.0/PM2.5/PM10 in ug/m3
#   ("atmospheric environment"), 6-11 particle counts per 0.1 L.
# A stream parser with one fixed 32-byte buffer; pure Python, so the host tests run it
# under CPython too. Bad input is counted and skipped, never raised.

FRAME_LEN = 32
NAMES = ("pm1_0", "pm2_5", "pm10")


def pms_checksum(buf, n):
    s = 0
    for i in range(n):
        s += buf[i]
    return s & 0xFFFF


class PMSParser:
    """Feed bytes in; whole valid frames update `vals` (pm1_0, pm2_5, pm10).

    bad: stretches of unusable bytes between two good frames (a frame with a bad checksum,
    a wrong length, cut short, or garbage); back-to-back broken frames count once, since a
    byte stream has no way to tell where one broken frame ends and the next begins.
    """

    NAMES = NAMES

    def __init__(self):
        self.buf = bytearray(FRAME_LEN)
        self.n = 0
        self.good = 0
        self.bad = 0
        self.dirty = False
        self.vals = [0, 0, 0]

    def _spoiled(self):
        if not self.dirty:
            self.bad += 1
            self.dirty = True

    def _resync(self):
        # Drop the failed header and keep what follows from the next 0x42 on: the real
        # next frame may already be inside the buffer (after a truncated one).
        self._spoiled()
        buf = self.buf
        n = self.n
        i = 1
        while i < n and buf[i] != 0x42:
            i += 1
        for j in range(n - i):
            buf[j] = buf[i + j]
        self.n = n - i

    def _check(self):
        # Validate what the buffer holds so far; True when it completed a good frame.
        buf = self.buf
        while self.n:
            n = self.n
            if n >= 2 and buf[1] != 0x4D:
                self._resync()
            elif n >= 4 and ((buf[2] << 8) | buf[3]) != FRAME_LEN - 4:
                self._resync()
            elif n < FRAME_LEN:
                return False
            elif pms_checksum(buf, FRAME_LEN - 2) != (buf[30] << 8) | buf[31]:
                self._resync()
            else:
                v = self.vals
                v[0] = (buf[10] << 8) | buf[11]
                v[1] = (buf[12] << 8) | buf[13]
                v[2] = (buf[14] << 8) | buf[15]
                self.good += 1
                self.dirty = False
                self.n = 0
                return True
        return False

    def feed(self, data, count=-1):
        """Parse data[:count]; return True if at least one good frame completed."""
        if count < 0:
            count = len(data)
        got = False
        buf = self.buf
        for i in range(count):
            b = data[i]
            if self.n == 0 and b != 0x42:
                self._spoiled()   # garbage between frames
                continue
            buf[self.n] = b
            self.n += 1
            if self._check():
                got = True
        return got

    def fill(self, names, out):
        for i in range(min(len(names), 3)):
            out[names[i]] = self.vals[i]
