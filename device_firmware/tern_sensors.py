# Tern sensor drivers. Each driver has read(out) that stores its values into the dict
# `out` and raises OSError/ValueError on failure; the Sensors wrapper counts failures
# instead of crashing and names the failed sensors in the reading ("down"). Drivers
# poll() between readings (UART drains its input there). The UART protocols (tern_uart,
# tern_pms, tern_nmea) and the SHT3x (tern_sht3x) are compiled only when configured.
import machine


class ADCSensor:
    """Voltage in mV on an ADC1 pin (GPIO32-39 on ESP32; ADC2 is unusable with Wi-Fi)."""

    def __init__(self, spec):
        self.name = spec.get("name", "adc_mv")
        self.label = self.name
        pin = machine.Pin(spec.get("pin", 34))
        try:
            self.adc = machine.ADC(pin, atten=machine.ADC.ATTN_11DB)
        except (TypeError, AttributeError):
            self.adc = machine.ADC(pin)
        self.has_uv = hasattr(self.adc, "read_uv")

    def poll(self):
        pass

    def read(self, out):
        if self.has_uv:
            out[self.name] = self.adc.read_uv() // 1000  # eFuse-calibrated on ESP32
        else:
            out[self.name] = self.adc.read_u16() * 3300 // 65535


def tmp102_celsius(b0, b1):
    """TMP102 register 0: 12-bit two's complement, left-justified, 0.0625 C/LSB."""
    raw = ((b0 << 8) | b1) >> 4
    if raw & 0x800:
        raw -= 4096
    return raw * 0.0625


class TMP102Sensor:
    def __init__(self, spec):
        self.name = spec.get("name", "temp_c")
        self.label = self.name
        self.addr = spec.get("addr", 0x48)
        self.i2c = machine.I2C(spec.get("i2c", 0), scl=machine.Pin(spec.get("scl", 18)),
                               sda=machine.Pin(spec.get("sda", 19)), freq=100000)
        self.buf = bytearray(2)

    def poll(self):
        pass

    def read(self, out):
        self.i2c.readfrom_mem_into(self.addr, 0, self.buf)
        out[self.name] = tmp102_celsius(self.buf[0], self.buf[1])


def _uart(spec):
    from tern_uart import UARTSensor  # only compiled when a UART sensor is configured
    return UARTSensor(spec)


def _sht3x(spec):
    from tern_sht3x import SHT3xSensor
    return SHT3xSensor(spec)


_DRIVERS = {"adc": ADCSensor, "tmp102": TMP102Sensor, "uart": _uart, "sht3x": _sht3x}
DOWN_MAX = 64   # the codec's limit for a text value


class Sensors:
    """All configured sensors; a failing sensor is counted, never fatal."""

    def __init__(self, specs, log=None):
        self.drivers = []
        self.errors = 0
        self.down = 0    # sensors that failed the last read
        self.log = log
        for spec in specs:
            try:
                self.drivers.append(_DRIVERS[spec["type"]](spec))
            except Exception as e:  # a missing bus must not stop the node
                self.errors += 1
                if log:
                    log("error sensor %s init: %s" % (spec.get("type"), e))

    def poll(self):
        for d in self.drivers:
            try:
                d.poll()
            except Exception:
                self.errors += 1

    def bad_frames(self):
        n = 0
        for d in self.drivers:
            n += getattr(d, "bad_frames", 0)
        return n

    def read(self, out):
        """Fill `out` with every value that could be read; return how many failed.

        The failed sensors' labels go into out["down"] ("pms5003,sht3x"), so the reading
        itself says which sensor stopped answering while the others keep reporting.
        """
        failed = 0
        down = ""
        for d in self.drivers:
            try:
                d.read(out)
            except Exception:
                failed += 1
                label = getattr(d, "label", "?")
                if len(down) + len(label) < DOWN_MAX:
                    down = label if not down else down + "," + label
        self.errors += failed
        self.down = failed
        if down:
            out["down"] = down
        return failed
