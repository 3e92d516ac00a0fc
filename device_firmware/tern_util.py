# Tern node helpers: logging, clock, JSON, socket timeouts (and the TLS hook) for umqtt.
# (Split from tern_node so each module compiles within a small heap.)
import json
import os
import time

import machine

ticks_ms = time.ticks_ms
ticks_diff = time.ticks_diff
ticks_add = time.ticks_add


def log(msg):
    print("TERN " + msg)


# ESP32 counts time from 2000-01-01, the unix port from 1970: convert to Unix ms.
_EPOCH_MS = 946684800000 if time.gmtime(0)[0] == 2000 else 0


def now_ms():
    """Wall clock in integer ms since the Unix epoch (never a float: ESP32 floats are 32-bit)."""
    try:
        return time.time_ns() // 1000000 + _EPOCH_MS
    except AttributeError:
        return time.time() * 1000 + ticks_ms() % 1000 + _EPOCH_MS


def dumps(obj):
    try:
        return json.dumps(obj, separators=(",", ":"))
    except TypeError:  # older MicroPython without separators
        return json.dumps(obj)


def loads(s):
    return json.loads(s)


def reset_cause_name():
    try:
        cause = machine.reset_cause()
    except Exception:
        return "unknown"
    for name in ("PWRON_RESET", "HARD_RESET", "WDT_RESET", "DEEPSLEEP_RESET", "SOFT_RESET",
                 "BROWNOUT_RESET"):
        if getattr(machine, name, None) == cause:
            return name
    return str(cause)


class TimedSocket:
    """A socket whose every blocking operation has a timeout.

    umqtt.simple's wait_msg() calls setblocking(True), which clears any timeout; here
    that re-applies the timeout instead, so a dead broker or lost PUBACK raises OSError
    rather than hanging the node. It also notes when bytes last arrived (keep-alive).
    Once connected, the node's secure() may wrap it in TLS: reads and writes then go
    through TLS, timeouts still to the plain socket below.
    """

    def __init__(self, sock, timeout_s, node):
        self.s = self.raw = sock
        self.t = timeout_s
        self.node = node
        sock.settimeout(timeout_s)

    def read(self, n):
        data = self.s.read(n)
        if data:
            self.node.last_rx = ticks_ms()
            self.node.rx_count += 1
        return data

    def write(self, buf, n=None):
        if n is None:
            return self.s.write(buf)
        return self.s.write(buf, n)

    def setblocking(self, flag):
        if flag:
            self.raw.settimeout(self.t)
        else:
            self.raw.setblocking(False)

    def settimeout(self, t):
        # Newer umqtt passes connect(timeout=None) here; keep ours instead of "forever".
        self.raw.settimeout(self.t if t is None else t)

    def connect(self, addr):
        self.raw.connect(addr)
        self.s = self.node.secure(self.raw)

    def close(self):
        self.s.close()


class SocketShim:
    """Stands in for the socket module inside umqtt.simple (its connect() makes the socket).

    Resolves the broker once and caches it: getaddrinfo has no timeout on ESP32.
    """

    def __init__(self, real, node):
        self.real = real
        self.node = node
        self.addr = None
        self.key = None

    def getaddrinfo(self, host, port, *args):
        if self.addr is None or self.key != (host, port):
            self.addr = self.real.getaddrinfo(host, port, *args)
            self.key = (host, port)
        return self.addr

    def socket(self, *args):
        return TimedSocket(self.real.socket(*args), self.node.timeout_s, self.node)
