# Sensirion SHT3x temperature/humidity over I2C (address 0x44, 0x45 with ADDR high).
# Single shot, high repeatability, no clock stretching: write 0x24 0x00, wait >= 15 ms,
# read 6 bytes = T(2) CRC RH(2) CRC; CRC-8 poly 0x31, init 0xFF (datasheet 4.12).
# sht_crc8/sht_decode are pure (the host tests run them under CPython); machine is
# imported by the driver only.
import time

CMD_MEASURE = b"\x24\x00"
NAMES = ("sht_c", "sht_rh")


def sht_crc8(buf, start=0, n=2):
    c = 0xFF
    for i in range(start, start + n):
        c ^= buf[i]
        for _ in range(8):
            c = ((c << 1) ^ 0x31) & 0xFF if c & 0x80 else (c << 1) & 0xFF
    return c


def sht_decode(buf):
    """(celsius, %RH) from the 6 bytes read back; ValueError on a CRC mismatch."""
    if sht_crc8(buf, 0) != buf[2] or sht_crc8(buf, 3) != buf[5]:
        raise ValueError("sht3x crc")
    t = -45 + 175 * ((buf[0] << 8) | buf[1]) / 65535
    rh = 100 * ((buf[3] << 8) | buf[4]) / 65535
    return round(t * 100) / 100, round(rh * 100) / 100


class SHT3xSensor:
    def __init__(self, spec):
        import machine
        self.names = spec.get("names") or NAMES
        self.label = spec.get("label", "sht3x")
        self.addr = spec.get("addr", 0x44)
        self.i2c = machine.I2C(spec.get("i2c", 0), scl=machine.Pin(spec.get("scl", 18)),
                               sda=machine.Pin(spec.get("sda", 19)), freq=100000)
        self.buf = bytearray(6)
        self.bad_frames = 0

    def poll(self):
        pass

    def read(self, out):
        self.i2c.writeto(self.addr, CMD_MEASURE)
        time.sleep_ms(16)
        self.i2c.readfrom_into(self.addr, self.buf)
        try:
            t, rh = sht_decode(self.buf)
        except ValueError:
            self.bad_frames += 1
            raise
        out[self.names[0]] = t
        if len(self.names) > 1:
            out[self.names[1]] = rh
