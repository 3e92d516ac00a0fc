# NMEA 0183 GPS sentences: $GPGGA (fix, satellites, altitude) and $GPRMC (position,
# speed); any talker (GP, GN, GL, ...). `$<body>*HH\r\n`, HH = XOR of the body's bytes.
# A stream parser with one bounded line buffer; pure Python (host tests run it under
# CPython). Bad input is counted and skipped, never raised.

LINE_MAX = 82   # NMEA's own limit, '$' to '\n'
NAMES = ("lat", "lon", "alt_m", "sats", "fix", "speed_kn")


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


def _coord(value, hemi, degree_digits):
    # ddmm.mmmm (lat) / dddmm.mmmm (lon) -> signed degrees; ValueError if malformed
    if len(value) < degree_digits + 2 or value[degree_digits:degree_digits + 1] == b".":
        raise ValueError("coord")
    deg = int(value[:degree_digits])
    minutes = float(value[degree_digits:])
    if not 0 <= minutes < 60:
        raise ValueError("minutes")
    v = deg + minutes / 60
    if hemi in (b"S", b"W"):
        v = -v
    elif hemi not in (b"N", b"E"):
        raise ValueError("hemisphere")
    if v > 180 or v < -180:
        raise ValueError("range")
    return v


class NMEAParser:
    """Feed bytes in; valid GGA/RMC sentences update the fix.

    bad: stretches of unusable bytes between two good sentences (bad checksum, cut short,
    overlong, garbage, a GGA/RMC with missing or malformed fields); back-to-back broken
    sentences count once. Valid sentences of other types are counted in `other`.
    """

    NAMES = NAMES

    def __init__(self):
        self.line = bytearray(LINE_MAX)
        self.n = 0
        self.inside = False
        self.over = False
        self.good = 0
        self.bad = 0
        self.other = 0
        self.dirty = False
        self.lat = None
        self.lon = None
        self.alt = None
        self.sats = 0
        self.fix = 0
        self.speed = None

    def _spoiled(self):
        if not self.dirty:
            self.bad += 1
            self.dirty = True

    def feed(self, data, count=-1):
        """Parse data[:count]; return True if at least one good GGA/RMC completed."""
        if count < 0:
            count = len(data)
        got = False
        line = self.line
        for i in range(count):
            b = data[i]
            if b == 36:                      # '$' starts a sentence
                if self.inside:
                    self._spoiled()          # the previous one was cut short
                self.inside = True
                self.n = 0
                self.over = False
            elif b == 10 or b == 13:
                if self.inside:
                    self.inside = False
                    if self._sentence():
                        got = True
            elif not self.inside:
                self._spoiled()              # garbage between sentences
            elif self.n < LINE_MAX:
                line[self.n] = b
                self.n += 1
            else:
                self.over = True
        return got

    def _sentence(self):
        n = self.n
        line = self.line
        if self.over or n < 4 or line[n - 3] != 42:   # '*HH'
            self._spoiled()
            return False
        try:
            want = (_hexval(line[n - 2]) << 4) | _hexval(line[n - 1])
        except ValueError:
            self._spoiled()
            return False
        if nmea_checksum(line, 0, n - 3) != want:
            self._spoiled()
            return False
        f = bytes(line[:n - 3]).split(b",")
        kind = f[0][2:] if len(f[0]) == 5 else b""
        try:
            if kind == b"GGA":
                ok = self._gga(f)
            elif kind == b"RMC":
                ok = self._rmc(f)
            else:
                self.other += 1
                self.dirty = False
                return False
        except ValueError:
            ok = False
        if not ok:
            self._spoiled()
            return False
        self.good += 1
        self.dirty = False
        return True

    def _gga(self, f):
        # GGA,time,lat,N,lon,E,quality,sats,hdop,alt,M,sep,M,age,station
        if len(f) < 15:
            return False
        fix = int(f[6]) if f[6] else 0
        sats = int(f[7]) if f[7] else 0
        if fix and f[2] and f[4]:
            lat = _coord(f[2], f[3], 2)
            lon = _coord(f[4], f[5], 3)
            alt = float(f[9]) if f[9] else None
        else:
            fix = 0
            lat = lon = alt = None
        self.fix = fix
        self.sats = sats
        self.lat = lat
        self.lon = lon
        self.alt = alt
        return True

    def _rmc(self, f):
        # RMC,time,status,lat,N,lon,E,speed_kn,course,date,magvar,E[,mode]
        if len(f) < 12:
            return False
        if f[2] == b"A" and f[3] and f[5]:
            lat = _coord(f[3], f[4], 2)
            lon = _coord(f[5], f[6], 3)
            speed = float(f[7]) if f[7] else None
            self.lat = lat
            self.lon = lon
            self.speed = speed
        elif f[2] == b"V":
            self.speed = None
        else:
            return False
        return True

    def fill(self, names, out):
        v = (self.lat, self.lon, self.alt, self.sats, self.fix, self.speed)
        for i in range(min(len(names), 6)):
            if v[i] is not None:
                out[names[i]] = v[i]
