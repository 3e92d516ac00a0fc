# Tern MQTT link: connect with keep-alive and a retained will, birth message, acks,
# the bounded ring of unacked readings (resent in order after a reconnect), keep-alive
# pings, dead-broker detection and reconnect with exponential backoff + jitter.
import gc
import os
import sys
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


def describe_error(e):
    """One console line for a failed connect; names the cause of a broker's refusal."""
    code = e.args[0] if e.args else None
    if type(e).__name__ == "MQTTException" and code in _REFUSED:
        return "broker refused us: %s (check device id and mqtt_password)" % _REFUSED[code]
    return "%s %s" % (type(e).__name__, e)


class Link:
    fw = "?"
    ota = {}    # tern_boot.start()'s report: a trial, a refused or rolled-back release
    tls = None  # the TLS context (tls_ca set), made at the first connect and kept

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
        self.t_cmd = base + "cmd"       # commands for this node (tern_cmd), QoS 1
        self.t_reply = base + "reply"
        self.b_cmd = self.t_cmd.encode()  # umqtt hands the callback the topic as bytes
        self.qos = cfg["qos"]
        self.keepalive = cfg["keepalive"]
        self.timeout_s = cfg["timeout_ms"] / 1000
        # Commands (tern_cmd), if main.py had the heap to compile them.
        cmd = sys.modules.get("tern_cmd")
        self.cmds = cmd.Commands(self) if cmd is not None else None
        # Release downloads (tern_fetch), started by the ota_update command.
        fm = sys.modules.get("tern_fetch")
        self.fetch = fm.Fetch(self) if fm is not None and self.cmds is not None else None
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
        self.spill = None       # unacked readings on flash (tern_spill), if configured
        if cfg["spill_max"]:
            from tern_spill import Spill
            self.spill = Spill(cfg["spill_max"], cfg["spill_seg"])
        self.bundle = cfg["bundle_max"]
        self.sbuf = []          # one batch read back from the spill (<= bundle_max items)
        self.ring_reported = 0  # ring drops already told in a birth message
        shim = SocketShim(_simple.socket, self)
        _simple.socket = shim   # only umqtt.simple sees the shim

    def _status(self, state):
        d = {"v": 1, "dev": self.device, "state": state, "boot": self.boot}
        if state == "online":
            d["fw"] = self.fw
            d["reset"] = reset_cause_name()
            d["ring"] = self.ring.size
            d["mem"] = gc.mem_free()
            if self.cmds is not None:
                d["cmd"] = 1        # this node takes commands on its cmd topic (tern_cmd)
            dr = self.spill.drops() if self.spill is not None else {}
            n = self.ring.dropped - self.ring_reported
            if n:
                dr[self.boot] = dr.get(self.boot, 0) + n
            if dr:
                d["dropped"] = dr   # readings lost per boot, told once (see connect)
            o = self.ota
            if o.get("trial"):
                d["ota"] = {"st": "trial", "ver": self.fw}
            elif "st" in o:
                r = {"st": o["st"], "ver": o.get("ver", "?"), "why": o.get("why", "")}
                if "pct" in o:
                    r["pct"] = o["pct"]     # a download's progress (tern_fetch)
                d["ota"] = r
            self.status_extra(d)
        return dumps(d).encode()

    def status_extra(self, d):
        """More keys for the birth message (tern_node adds the sensors that are down)."""
        pass

    def connect(self):
        if self.wlan is not None and not self.wlan.isconnected():
            w = self.cfg["wifi"]
            try:
                self.wlan.connect(w["ssid"], w.get("password", ""))
            except OSError:
                pass
            raise OSError("wifi down")
        pw = self.cfg.get("mqtt_password") or None
        if self.cfg["tls_ca"] and self.tls is None:
            import tern_tls     # (compiled by tern_main while the heap was tidy)
            self.tls = tern_tls.context(self.cfg["tls_ca"])
        # TLS, if any, is ours (secure(), from the socket umqtt connects): umqtt's own ssl
        # arguments differ between its versions.
        c = MQTTClient(self.device, self.cfg["broker"], self.cfg["port"], user=self.device if pw else None,
                       password=pw, keepalive=self.keepalive)
        c.set_callback(self._on_msg)
        c.set_last_will(self.t_status, self._status("offline"), retain=True, qos=1)
        try:
            c.connect(True)
            self.client = c
            self.last_rx = self.last_ping = self.up_since = ticks_ms()
            # Subscribe before the birth: a clean session gets only what is published after
            # its SUBACK, and the gateway sends waiting commands as soon as it sees the birth.
            c.subscribe(self.t_ack, 1)
            if self.cmds is not None:
                try:
                    c.subscribe(self.t_cmd, 1)
                except _simple.MQTTException:   # refused by the broker's ACL: no commands
                    log("error cmd subscribe refused")
            if self.fetch is not None:
                self.fetch.subbed = False   # (subscribed when a download runs: tern_fetch.poll)
            rd = self.ring.dropped
            c.publish(self.t_status, self._status("online"), True, 1)
            # The broker holds the birth (retained, QoS 1 acked): the drops are told.
            self.ring_reported = rd
            if self.spill is not None:
                self.spill.clear_drops()
        except BaseException:
            self.client = None
            try:
                c.sock.close()
            except Exception:
                pass
            raise
        self.sent_upto = 0      # resend every unacked reading, oldest first
        if self.spill is not None:
            self.spill.rewind()
        self.connects += 1
        log("connected")

    def secure(self, sock):
        """The connected socket, in TLS when tls_ca is set (tern_tls.wrap)."""
        if self.tls is None:
            return sock
        import tern_tls
        return tern_tls.wrap(self.tls, sock, self.cfg["broker"])

    def save(self):
        """Put every unacked reading of the RAM ring on flash (before a reset, a sleep, or
        when the link goes down): the spill then holds all that is unacked, in order."""
        sp = self.spill
        r = self.ring
        if sp is None or not r.count:
            return
        for k in range(r.count):
            i = (r.head + k) % r.size
            sp.append(self.boot, r.seq[i], r.payload(i))
        log("spilled %d" % r.count)
        r.clear()

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
        self.save()
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
        if topic == self.b_cmd and self.cmds is not None:
            self.cmds.receive(msg)
            return
        if self.fetch is not None and topic == self.fetch.b_fw:
            self.fetch.receive(msg)
            return
        # Our boot's acks are applied by the main loop; an earlier boot's can only be for
        # records replayed from the spill (else they are stale and ignored).
        a = parse_ack(msg)
        if a is None:
            return
        b, s = a
        if self.spill is not None and self.spill.ack(b, s):
            log("spill_acked %s %d" % (b, s))
        if b == self.boot:
            if s > self.ack_in:
                self.ack_in = s if s <= self.seq else self.seq
            elif s == self.ack_in and s < self.sent_upto:
                # The same ack again while we sent beyond it: the gateway held those back
                # (uncommitted) and asks for them again, from there.
                self.sent_upto = s
                if self.spill is not None:
                    self.spill.rewind()
                log("rewind %d" % s)

    def replay(self, c):
        """Publish the next batch from the spill: one v1 message, or a v2 bundle of up to
        bundle_max readings of one boot. False when nothing can go now."""
        sp = self.spill
        if not sp.can_send():
            return False
        buf = self.sbuf
        boot = sp.next_batch(self.bundle, buf)
        if boot is None:
            return False
        if len(buf) == 1:
            msg = ('{"v":1,"dev":"%s","boot":"%s","seq":%d,' % (self.device, boot, buf[0][0])).encode() + buf[0][1] + b"}"
        else:
            parts = [('{"v":2,"dev":"%s","boot":"%s","items":[' % (self.device, boot)).encode()]
            for k in range(len(buf)):
                parts.append(('%s{"seq":%d,' % ("," if k else "", buf[k][0])).encode())
                parts.append(buf[k][1])
                parts.append(b"}")
            parts.append(b"]}")
            msg = b"".join(parts)
            parts = None
        first = buf[0][0]
        last = buf[-1][0]
        n = len(buf)
        del buf[:]
        c.publish(self.t_tel, msg, False, self.qos)
        if boot == self.boot and last > self.max_sent:
            self.max_sent = last
        log("replayed %s %d %d %d" % (boot, first, last, n))
        return True

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
            if self.cmds is not None:
                self.cmds.flush(c)        # command replies (and a rebirth or reboot)
            if self.fetch is not None:
                self.fetch.poll(c)        # a release download: one request or check per pass
            for _ in range(8):
                if self.spill is not None and self.spill.pending():
                    # The spill holds older readings: they go first, the ring waits.
                    if not self.replay(c):
                        break
                    continue
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
