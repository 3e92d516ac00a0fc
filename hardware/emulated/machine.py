# Emulated ESP32 `machine` for the MicroPython unix port. Put this folder on MICROPYPATH
# (never on a board): it shadows the unix port's small built-in `machine`.
#
# Host-controlled behaviour, all through environment variables:
#   TERN_EMU_UID           hex (or plain text) bytes returned by unique_id()
#   TERN_EMU_RESET_CAUSE   name returned by reset_cause(), default PWRON_RESET
#   TERN_EMU_ADC_<pin>     fixed mV on that pin; default a deterministic slow sine
#   TERN_EMU_TMP102        temperature in C of the simulated TMP102 at 0x48
#                          (default a slow sine around 21 C); "fail" -> OSError
#   TERN_EMU_UART<id>      path (pty, fifo or growing file) the UART reads from
#   TERN_EMU_FAULT         path: once a file appears there, the next WDT.feed() removes it
#                          and raises RuntimeError (a firmware crash, injected by a test)
#   TERN_EMU_RTC           file that plays RTC memory (kept over resets and deep sleep,
#                          cleared by the host at power-on); unset -> RAM only
# reset() exits the process with RESET_EXIT_CODE, deepsleep(ms) with DEEPSLEEP_EXIT_CODE
# after printing "TERN deepsleep <ms>", and a starved WDT kills it with SIGALRM (a real
# timer, so a hung node is reset too): the host boots it again, flash (cwd) kept.
import os
import sys
import time

RESET_EXIT_CODE = 77
DEEPSLEEP_EXIT_CODE = 78

PWRON_RESET = 1
HARD_RESET = 2
WDT_RESET = 3
DEEPSLEEP_RESET = 4
SOFT_RESET = 5

_T0 = time.ticks_ms()


def _env(name, default=None):
    v = os.getenv(name)
    return default if v is None or v == "" else v


def unique_id():
    v = _env("TERN_EMU_UID", "240ac4000001")
    try:
        if len(v) % 2 == 0:
            return bytes(int(v[i:i + 2], 16) for i in range(0, len(v), 2))
    except ValueError:
        pass
    return v.encode()


def reset_cause():
    return globals().get(_env("TERN_EMU_RESET_CAUSE", "PWRON_RESET"), PWRON_RESET)


def reset():
    print("TERN reset")
    sys.exit(RESET_EXIT_CODE)


def soft_reset():
    reset()


def deepsleep(ms=0):
    print("TERN deepsleep %d" % ms)
    sys.exit(DEEPSLEEP_EXIT_CODE)


def lightsleep(ms=0):
    time.sleep_ms(ms)


def idle():
    time.sleep_ms(1)


def freq(hz=None):
    return 240000000


def _seconds():
    return time.ticks_diff(time.ticks_ms(), _T0) / 1000


def _phase():
    # Each board's signals get their own phase, so emulated nodes started together
    # do not all report the same values.
    return (sum(unique_id()) * 0.7) % 6.2832


class Pin:
    IN = 1
    OUT = 3
    OPEN_DRAIN = 7
    PULL_UP = 1
    PULL_DOWN = 2
    IRQ_RISING = 1
    IRQ_FALLING = 2

    def __init__(self, id, mode=-1, pull=-1, value=None):
        self.id = id
        self._v = 0 if value is None else value

    def init(self, *args, **kw):
        pass

    def value(self, v=None):
        if v is None:
            return self._v
        self._v = 1 if v else 0

    def on(self):
        self._v = 1

    def off(self):
        self._v = 0

    def __call__(self, v=None):
        return self.value(v)


# The buses live in their own module: two small compiles fit a small heap better than one.
from _emu_periph import ADC, I2C, SoftI2C, UART  # noqa: E402


def _alarm():
    # alarm(2) from libc: SIGALRM's default action ends the process, as the chip's watchdog
    # resets it, whatever the firmware is doing (even blocked in a socket call).
    try:
        import ffi
        return ffi.open("libc.so.6").func("I", "alarm", "I")
    except Exception:
        return None


class WDT:
    """Watchdog: not fed within `timeout` ms (rounded up to whole seconds) -> reset."""

    def __init__(self, id=0, timeout=5000):
        self.timeout = timeout
        self.last = time.ticks_ms()
        self._arm = _alarm()
        self.feed()

    def feed(self):
        fault = _env("TERN_EMU_FAULT")
        if fault is not None:
            try:
                os.remove(fault)
            except OSError:
                pass
            else:
                raise RuntimeError("emulated fault")
        if self._arm is not None:
            self._arm((self.timeout + 999) // 1000)
            return
        # No libc timer: check lazily (a feed after the timeout resets the node).
        now = time.ticks_ms()
        if time.ticks_diff(now, self.last) > self.timeout:
            print("TERN error watchdog")
            sys.exit(RESET_EXIT_CODE)
        self.last = now


class RTC:
    _mem = None

    def datetime(self, dt=None):
        if dt is None:
            t = time.gmtime()
            return (t[0], t[1], t[2], t[6], t[3], t[4], t[5], 0)

    def init(self, dt=None):
        pass

    def memory(self, data=None):
        path = _env("TERN_EMU_RTC")
        if data is None:
            if RTC._mem is None:
                RTC._mem = b""
                if path is not None:
                    try:
                        with open(path, "rb") as f:
                            RTC._mem = f.read(2048)
                    except OSError:
                        pass
            return RTC._mem
        RTC._mem = bytes(data)[:2048]
        if path is not None:
            with open(path, "wb") as f:
                f.write(RTC._mem)
