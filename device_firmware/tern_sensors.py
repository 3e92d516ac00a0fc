# Tern sensor drivers. Each driver has read(out) that stores its values into the dict
# `out` and raises OSError/ValueError on failure; the Sensors wrapper counts failures
# instead of crashing and names the failed sensors in the reading ("down"). Drivers
# poll() between readings (UART drains its input there). The UART protocols (tern_uart,
# tern_pms, tern_nmea) and the SHT3x (tern_sht3x) are compiled only when configured.
import time

import machine


class ADCSensor:
    """Voltage in mV on an ADC1 pin (GPIO32-39 on ESP32; ADC2 is unusable with Wi-Fi)."""

    def __init__(self, spec):
        self.name = spec.get("name", "adc_mv")
        self.label = spec.get("label", self.name)
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
        self.label = spec.get("label", self.name)
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
# A change in the set of failed sensors is told by a fresh retained birth (its "down" list),
# published by tell(), which tern_node calls after each service pass. Bounded three ways, so a
# flapping sensor cannot flood the broker, the gateway's outbox or Kafka: (1) a set counts only
# once two readings in a row agree on it (a UART sensor that has not sent its first frame at
# boot, or one missed frame, is not news); (2) a token bucket: at most STATUS_BURST such births
# back to back, then one per STATUS_EVERY_MS; (3) changes meanwhile are coalesced: the birth
# that goes carries the set as it is then, never a queue of them. Readings name the failed
# sensors every time.
STATUS_BURST = 3
STATUS_EVERY_MS = 20000
DOWN_MAX = 64   # the codec's limit for a text value


class Sensors:
    """All configured sensors; a failing sensor is counted, never fatal."""

    def __init__(self, specs, log=None):
        self.drivers = []
        self.errors = 0
        self.down = 0    # sensors that failed the last read
        self.failed = 0  # ...and which: bit i = drivers[i] (config allows at most 16 sensors)
        self.steady = False  # the read before failed the same ones
        self.told = 0    # `failed` as the last birth built named it
        self.tokens = STATUS_BURST
        self.t = time.ticks_ms()
        self.log = log
        for spec in specs:
            try:
                self.drivers.append(_DRIVERS[spec["type"]](spec))
            except Exception as e:  # a missing bus must not stop the node
                self.errors += 1
                # ...nor hide the sensor: it stays in the list, down in every reading and
                # status, so a board shipped without it is seen as one. (A module of its own:
                # a node whose sensors all start pays no heap for it.)
                try:
                    from tern_absent import AbsentSensor
                    self.drivers.append(AbsentSensor(spec, e))
                except MemoryError:
                    pass
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
        mask = 0
        down = ""
        for i in range(len(self.drivers)):
            d = self.drivers[i]
            try:
                d.read(out)
            except Exception:
                failed += 1
                mask |= 1 << i
                label = d.label
                if len(down) + len(label) < DOWN_MAX:
                    down = label if not down else down + "," + label
        self.errors += failed
        self.down = failed
        self.steady = mask == self.failed
        self.failed = mask
        if down:
            out["down"] = down
        return failed

    def labels(self, mask):
        """The labels of the sensors in `mask` (a `failed` value), each once: the status's
        "down" list. Bounded by the number of sensors (at most 16)."""
        out = []
        for i in range(len(self.drivers)):
            if mask >> i & 1:
                label = self.drivers[i].label
                if label not in out:
                    out.append(label)
        return out

    def status(self, d):
        """Add the failed sensors to the birth being built (tern_node.status_extra). Told
        once built: if it does not reach the broker, the link drops and the next connect's
        birth tells the set as it is then."""
        self.told = m = self.failed
        if m:
            d["down"] = self.labels(m)

    def tell(self, node):
        """(Connected.) Publish a fresh retained birth when the set of failed sensors changed,
        within the bounds above."""
        now = time.ticks_ms()
        if self.tokens < STATUS_BURST:
            n = time.ticks_diff(now, self.t) // STATUS_EVERY_MS
            if n < 0:   # ticks wrapped (days without a connection): long enough for a refill
                self.tokens = STATUS_BURST
            elif n > 0:
                self.tokens = min(STATUS_BURST, self.tokens + n)
                self.t = time.ticks_add(self.t, n * STATUS_EVERY_MS)
        if not self.steady or self.failed == self.told or not self.tokens:
            return
        if self.tokens == STATUS_BURST:
            self.t = now    # the bucket refills from its first use
        self.tokens -= 1
        try:
            node.client.publish(node.t_status, node._status("online"), True, 1)
        except Exception as e:
            node.drop("%s %s" % (type(e).__name__, e))
            return
        if self.log:
            self.log("status down=%s" % ",".join(self.labels(self.told)))
