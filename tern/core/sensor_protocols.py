"""Serial and I2C sensor protocols, host side: encoders for the simulators, decoders for the Pi.

The node's firmware has its own frugal stream parsers (``device_firmware/tern_pms.py``,
``tern_nmea.py``, ``tern_sht3x.py``); these are the host's versions of the same protocols:

- Plantower PMS5003: 32-byte frames ``42 4D``, length 28, 13 big-endian u16 data words,
  u16 checksum = sum of the 30 bytes before it.
- NMEA 0183: ``$<body>*HH\\r\\n`` with HH the XOR of the body's bytes; ``GGA`` and ``RMC``.
- Sensirion SHT3x: two (u16 + CRC-8, polynomial 0x31, init 0xFF) words for T and RH.

Decoders raise :class:`ProtocolError` (a ValueError) on anything off-spec.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PMS_FRAME_LEN = 32
PMS_HEADER = b"\x42\x4d"
#: The reading names a PMS5003 gives (atmospheric PM in ug/m3), as in the firmware.
PMS_NAMES = ("pm1_0", "pm2_5", "pm10")
#: The reading names a GPS gives, as in the firmware.
NMEA_NAMES = ("lat", "lon", "alt_m", "sats", "fix", "speed_kn")
NMEA_LINE_MAX = 82


class ProtocolError(ValueError):
    """A frame that does not follow its protocol (checksum, length, field)."""


# --- PMS5003 --------------------------------------------------------------------------


@dataclass(frozen=True)
class PMSFrame:
    """One PMS5003 frame: PM in ug/m3 (CF=1 and atmospheric) and particle counts per 0.1 L."""

    pm1_0: int
    pm2_5: int
    pm10: int
    cf1: tuple[int, int, int] | None = None
    counts: tuple[int, int, int, int, int, int] = (0, 0, 0, 0, 0, 0)

    def values(self) -> dict[str, int]:
        """The values a reading carries, under the firmware's names."""
        return {"pm1_0": self.pm1_0, "pm2_5": self.pm2_5, "pm10": self.pm10}


def pms_checksum(data: bytes) -> int:
    """16-bit sum of the bytes."""
    return sum(data) & 0xFFFF


def encode_pms(frame: PMSFrame) -> bytes:
    """The 32 bytes a PMS5003 sends for ``frame``."""
    cf1 = frame.cf1 if frame.cf1 is not None else (frame.pm1_0, frame.pm2_5, frame.pm10)
    words = [PMS_FRAME_LEN - 4, *cf1, frame.pm1_0, frame.pm2_5, frame.pm10, *frame.counts, 0]
    body = PMS_HEADER + b"".join(min(max(int(w), 0), 0xFFFF).to_bytes(2, "big") for w in words)
    return body + pms_checksum(body).to_bytes(2, "big")


def decode_pms(raw: bytes) -> PMSFrame:
    """Decode one whole 32-byte frame."""
    if len(raw) != PMS_FRAME_LEN:
        raise ProtocolError(f"PMS5003 frame is {PMS_FRAME_LEN} bytes, got {len(raw)}")
    if raw[:2] != PMS_HEADER:
        raise ProtocolError("PMS5003 frame must start with 42 4D")
    words = [int.from_bytes(raw[i : i + 2], "big") for i in range(2, PMS_FRAME_LEN, 2)]
    if words[0] != PMS_FRAME_LEN - 4:
        raise ProtocolError(f"PMS5003 length field is {words[0]}, expected {PMS_FRAME_LEN - 4}")
    if pms_checksum(raw[:30]) != words[-1]:
        raise ProtocolError("PMS5003 checksum mismatch")
    return PMSFrame(words[4], words[5], words[6], tuple(words[1:4]), tuple(words[7:13]))  # type: ignore[arg-type]


class PMSStream:
    """Host-side stream decoder: feed bytes, get whole frames; counts the bad stretches.

    Same counting rule as the firmware: bytes that could not be used between two good
    frames count as one bad frame.
    """

    def __init__(self) -> None:
        self.buf = bytearray()
        self.good = 0
        self.bad = 0
        self._dirty = False

    def _spoiled(self) -> None:
        if not self._dirty:
            self.bad += 1
            self._dirty = True

    def feed(self, data: bytes) -> list[PMSFrame]:
        """Frames completed by ``data`` (the buffer never exceeds one frame)."""
        out = []
        for byte in data:
            if not self.buf and byte != 0x42:
                self._spoiled()
                continue
            self.buf.append(byte)
            while self.buf:
                n = len(self.buf)
                if n < 4 and not PMS_HEADER.startswith(bytes(self.buf[:2])) or n >= 4 and (
                    self.buf[:2] != PMS_HEADER or int.from_bytes(self.buf[2:4], "big") != PMS_FRAME_LEN - 4
                ):
                    bad = True
                elif n < PMS_FRAME_LEN:
                    break
                else:
                    try:
                        out.append(decode_pms(bytes(self.buf)))
                        self.good += 1
                        self._dirty = False
                        self.buf.clear()
                        break
                    except ProtocolError:
                        bad = True
                if bad:
                    self._spoiled()
                    nxt = self.buf.find(0x42, 1)
                    del self.buf[: nxt if nxt > 0 else len(self.buf)]
        return out


# --- NMEA 0183 --------------------------------------------------------------------------


def nmea_checksum(body: bytes | str) -> int:
    """XOR of the bytes between ``$`` and ``*``."""
    value = 0
    for byte in body.encode() if isinstance(body, str) else body:
        value ^= byte
    return value


def nmea_sentence(body: str) -> bytes:
    """``$body*HH\\r\\n``."""
    return f"${body}*{nmea_checksum(body):02X}\r\n".encode()


def _nmea_coord(value: float, lat: bool) -> tuple[str, str]:
    hemi = ("N" if value >= 0 else "S") if lat else ("E" if value >= 0 else "W")
    value = abs(value)
    deg = int(value)
    minutes = (value - deg) * 60
    if round(minutes, 4) >= 60:
        deg, minutes = deg + 1, 0.0
    return (f"{deg:02d}" if lat else f"{deg:03d}") + f"{minutes:07.4f}", hemi


def encode_gga(lat: float | None, lon: float | None, alt_m: float, sats: int, fix: int = 1,
               hdop: float = 0.9, utc: str = "120000.00", talker: str = "GP") -> bytes:
    """A GGA sentence (no position when ``fix`` is 0 or lat/lon is None)."""
    if fix and lat is not None and lon is not None:
        la, ns = _nmea_coord(lat, True)
        lo, ew = _nmea_coord(lon, False)
        body = f"{talker}GGA,{utc},{la},{ns},{lo},{ew},{fix},{sats:02d},{hdop:.1f},{alt_m:.1f},M,47.0,M,,"
    else:
        body = f"{talker}GGA,{utc},,,,,0,{sats:02d},99.9,,M,,M,,"
    return nmea_sentence(body)


def encode_rmc(lat: float | None, lon: float | None, speed_kn: float = 0.0, course: float = 0.0,
               utc: str = "120000.00", date: str = "030126", talker: str = "GP") -> bytes:
    """An RMC sentence (status V, no position, when lat/lon is None)."""
    if lat is not None and lon is not None:
        la, ns = _nmea_coord(lat, True)
        lo, ew = _nmea_coord(lon, False)
        body = f"{talker}RMC,{utc},A,{la},{ns},{lo},{ew},{speed_kn:.2f},{course:.1f},{date},,,A"
    else:
        body = f"{talker}RMC,{utc},V,,,,,,,{date},,,N"
    return nmea_sentence(body)


def _coord(value: str, hemi: str, degree_digits: int) -> float:
    if len(value) < degree_digits + 2 or value[degree_digits] == ".":
        raise ProtocolError(f"malformed coordinate {value!r}")
    minutes = float(value[degree_digits:])
    if not 0 <= minutes < 60:
        raise ProtocolError(f"malformed coordinate {value!r}")
    result = int(value[:degree_digits]) + minutes / 60
    if hemi not in ("N", "S", "E", "W"):
        raise ProtocolError(f"bad hemisphere {hemi!r}")
    result = -result if hemi in ("S", "W") else result
    if abs(result) > 180:
        raise ProtocolError(f"coordinate out of range {value!r}")
    return result


def decode_nmea(line: bytes | str) -> tuple[str, dict[str, float | int]]:
    """Check one sentence and decode GGA/RMC into reading values.

    Returns (kind, values): kind is the three-letter type (``GGA``, ``RMC``, or another
    type with empty values). Raises ProtocolError on a bad checksum or malformed field.
    """
    text = line.decode("ascii", "replace") if isinstance(line, (bytes, bytearray)) else line
    text = text.strip("\r\n")
    if len(text) > NMEA_LINE_MAX or not text.startswith("$") or len(text) < 4 or text[-3] != "*":
        raise ProtocolError(f"not an NMEA sentence: {text[:40]!r}")
    body = text[1:-3]
    try:
        want = int(text[-2:], 16)
    except ValueError:
        raise ProtocolError("NMEA checksum is not hex") from None
    if nmea_checksum(body) != want:
        raise ProtocolError("NMEA checksum mismatch")
    f = body.split(",")
    kind = f[0][2:] if len(f[0]) == 5 else ""
    values: dict[str, float | int] = {}
    try:
        if kind == "GGA":
            if len(f) < 15:
                raise ProtocolError("GGA has too few fields")
            fix = int(f[6]) if f[6] else 0
            values["sats"] = int(f[7]) if f[7] else 0
            if fix and f[2] and f[4]:
                values["lat"] = _coord(f[2], f[3], 2)
                values["lon"] = _coord(f[4], f[5], 3)
                if f[9]:
                    values["alt_m"] = float(f[9])
            else:
                fix = 0
            values["fix"] = fix
        elif kind == "RMC":
            if len(f) < 12:
                raise ProtocolError("RMC has too few fields")
            if f[2] == "A" and f[3] and f[5]:
                values["lat"] = _coord(f[3], f[4], 2)
                values["lon"] = _coord(f[5], f[6], 3)
                if f[7]:
                    values["speed_kn"] = float(f[7])
            elif f[2] != "V":
                raise ProtocolError(f"RMC status {f[2]!r}")
    except ValueError as exc:
        if isinstance(exc, ProtocolError):
            raise
        raise ProtocolError(f"malformed {kind} field: {exc}") from None
    return kind, values


# --- SHT3x ------------------------------------------------------------------------------


def sht_crc8(data: bytes) -> int:
    """Sensirion CRC-8: polynomial 0x31, init 0xFF, no reflection, no final XOR."""
    crc = 0xFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x31) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def encode_sht3x(celsius: float, rh: float) -> bytes:
    """The 6 bytes an SHT3x returns for a measurement: T, CRC, RH, CRC."""
    t_raw = min(0xFFFF, max(0, round((celsius + 45) * 65535 / 175)))
    rh_raw = min(0xFFFF, max(0, round(rh * 65535 / 100)))
    out = bytearray()
    for raw in (t_raw, rh_raw):
        word = raw.to_bytes(2, "big")
        out += word + bytes([sht_crc8(word)])
    return bytes(out)


def decode_sht3x(raw: bytes) -> tuple[float, float]:
    """(celsius, %RH) from the 6 bytes; ProtocolError on a CRC mismatch."""
    if len(raw) != 6:
        raise ProtocolError(f"SHT3x answer is 6 bytes, got {len(raw)}")
    if sht_crc8(raw[0:2]) != raw[2] or sht_crc8(raw[3:5]) != raw[5]:
        raise ProtocolError("SHT3x CRC mismatch")
    t = -45 + 175 * int.from_bytes(raw[0:2], "big") / 65535
    rh = 100 * int.from_bytes(raw[3:5], "big") / 65535
    return round(t, 2), round(rh, 2)


def finite(value: float) -> bool:
    """True for a float a reading may carry."""
    return math.isfinite(value)
