# Tern MQTT link: connect with keep-alive and a retained will, birth message, acks,
# the bounded ring of unacked readings (resent in order after a reconnect), keep-alive
# pings, dead-broker detection and reconnect with exponential backoff + jitter.
import gc
import os
import time

import umqtt.simple as _simple
from umqtt.simple import MQTTClient

from tern_ring import Ring, parse_ack
from tern_util import SocketShim, dumps, log, reset_cause_name

ticks_ms = time.ticks_ms
ticks_diff = time.ticks_diff
ticks_add = time.ticks_add

# CONNACK refusal codes (MQTT 3.1.1), so a refused node says why on its console.
_REFUSED = {1: "protocol version", 2: "client id rejected", 3: "broker unavailable",
            4: "bad username or password", 5: "not authorised"}


def tls_params(ca, host):
    """ssl_params for umqtt: verify the broker against the CA file on flash ("" = no TLS)."""
    if not ca:
        return {}
    with open(ca) as f:
        return {"cert_reqs": 2, "cadata": f.read(), "server_hostname": host}  # 2 = CERT_REQUIRED


def describe_error(e):
    """One console line for a failed connect; names the cause of a broker's refusal."""
    code = e.args[0] if e.args else None
    if type(e).__name__ == "MQTTException" and code in _REFUSED:
        return "broker refused us: %s (check device id and mqtt_password)" % _REFUSED[code]
    return "%s %s" % (type(e).__name__, e)


class Link:
    fw = "?"

    def __init__(self, cfg):
        self.cfg = cfg
        self.device = cfg["device"]
        self.site = cfg["site"]
        b = os.urandom(4)
        self.boot = "%02x%02x%02x%02x" % (b[0], b[1], b[2], b[3])
        base = "tern/%s/%s/" % (self.site, self.device)
        self.t_tel = base + "telemetry"
        self.t_status = base + "status"
        self.t_ack = base + "ack"
        self.qos = cfg["qos"]
        self.keepalive = cfg["keepalive"]
        self.timeout_s = cfg["timeout_ms"] / 1000
        self.ring = Ring(cfg["ring_size"], cfg["ring_slot"])  # unacked readings, oldest first
        self.seq = 0            # last seq taken this boot
        self.sent_upto = 0      # highest seq published on the current connection
        self.max_sent = 0       # highest seq ever published this boot
        self.acked = 0
        self.ack_in = 0         # highest ack received, applied by the main loop
        self.connects = 0
        self.client = None
        self.last_rx = 0
        self.rx_count = 0
        self.last_ping = 0
        self.up_since = 0
        self.fails = 0
        self.next_try = ticks_ms()
        self.offline_since = ticks_ms()
        self.wlan = None
        shim = SocketShim(_simple.socket, self)
        _simple.socket = shim   # only umqtt.simple sees the shim

    def _status(self, state):
        d = {"v": 1, "dev": self.device, "state": state, "boot": self.boot}
        if state == "online":
            d["fw"] = self.fw
            d["reset"] = reset_cause_name()
            d["ring"] = self.ring.size
            d["mem"] = gc.mem_free()
        return dumps(d).encode()

    def connect(self):
        if self.wlan is not None and not self.wlan.isconnected():
            w = self.cfg["wifi"]
            try:
                self.wlan.connect(w["ssid"], w.get("password", ""))
            except OSError:
                pass
            raise OSError("wifi down")
        pw = self.cfg.get("mqtt_password") or None
        ca = self.cfg.get("tls_ca")
        c = MQTTClient(self.device, self.cfg["broker"], self.cfg["port"], user=self.device if pw else None,
                       password=pw, keepalive=self.keepalive, ssl=bool(ca), ssl_params=tls_params(ca, self.cfg["broker"]))
        c.set_callback(self._on_msg)
        c.set_last_will(self.t_status, self._status("offline"), retain=True, qos=1)
        try:
            c.connect(True)
            self.client = c
            self.last_rx = self.last_ping = self.up_since = ticks_ms()
            c.publish(self.t_status, self._status("online"), True, 1)
            c.subscribe(self.t_ack, 1)
        except BaseException:
            self.client = None
            try:
                c.sock.close()
            except Exception:
                pass
            raise
        self.sent_upto = 0      # resend every unacked reading, oldest first
        self.connects += 1
        log("connected")

    def drop(self, why):
        c = self.client
        self.client = None
        if c is not None:
            try:
                c.sock.close()
            except Exception:
                pass
            if ticks_diff(ticks_ms(), self.up_since) >= 10000:
                self.fails = 0  # it was a stable connection: start backoff over
            self.offline_since = ticks_ms()
        log("disconnected %s" % why)
        self.schedule_retry()

    def schedule_retry(self):
        lo = self.cfg["backoff_min_ms"]
        hi = self.cfg["backoff_max_ms"]
        d = lo << min(self.fails, 16)
        if d > hi:
            d = hi
        r = os.urandom(1)[0]                    # 0..255 -> jitter in [-25 %, +25 %]
        d = d * (384 + r) // 512
        self.fails += 1
        self.next_try = ticks_add(ticks_ms(), d)

    def wire(self, i):
        """The telemetry payload of ring slot i: the envelope around the stored part."""
        head = '{"v":1,"dev":"%s","boot":"%s","seq":%d,' % (self.device, self.boot, self.ring.seq[i])
        return head.encode() + self.ring.payload(i) + b"}"

    def _on_msg(self, topic, msg):
        # Acks for another boot are stale: parse_ack says -1. Applied by the main loop.
        s = parse_ack(msg, self.boot)
        if s > self.ack_in:
            self.ack_in = s if s <= self.seq else self.seq

    def apply_acks(self):
        a = self.ack_in
        if a <= self.acked:
            return
        self.acked = a
        self.ring.ack(a)
        log("acked %d" % a)

    def service(self):
        """Publish pending readings, handle incoming packets, keep the link alive."""
        c = self.client
        try:
            for _ in range(8):            # bounded work per loop pass
                before = self.rx_count
                c.check_msg()             # at most one packet
                if self.rx_count == before:
                    break                 # nothing arrived
            self.apply_acks()
            for _ in range(8):
                i = self.ring.first_after(self.sent_upto)
                if i < 0:
                    break
                s = self.ring.seq[i]
                c.publish(self.t_tel, self.wire(i), False, self.qos)
                self.sent_upto = s
                if s > self.max_sent:
                    self.max_sent = s
                    log("sent %d" % s)
                else:
                    log("resent %d" % s)
                self.apply_acks()
            now = ticks_ms()
            if ticks_diff(now, self.last_ping) >= self.keepalive * 500:
                c.ping()
                self.last_ping = now
            if ticks_diff(now, self.last_rx) > self.keepalive * 1000 + 2000:
                self.drop("no reply from broker")
        except Exception as e:
            self.drop("%s %s" % (type(e).__name__, e))

    def shutdown(self):
        """Graceful stop: say offline ourselves (disconnect suppresses the will)."""
        c = self.client
        self.client = None
        if c is not None:
            try:
                c.publish(self.t_status, self._status("offline"), True, 1)
                c.disconnect()
            except BaseException:  # incl. a second Ctrl-C: the will covers us then
                pass
        log("stopped")
