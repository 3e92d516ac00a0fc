# Tern node: the main loop. Takes a reading every interval_ms into the unacked ring,
# while the Link (tern_link.py) delivers it; see tern_link for the MQTT side.
#
# stdout carries one "TERN <event> ..." line per key event (parsed by the host tools):
#   TERN boot <boot> <device> <fw>    TERN connected            TERN disconnected <why>
#   TERN sent <seq>    TERN resent <seq>    TERN acked <seq>    TERN dropped <total>
#   TERN done <n>      TERN stats k=v ...   TERN stopped        TERN error <text>
#   TERN spilled <n>   TERN replayed <boot> <first> <last> <n>  TERN spill_acked <boot> <seq>
#   TERN spill_dropped <n>   TERN wake <boot> <seq>   TERN deepsleep <ms> (by machine)
#   TERN status down=<labels>  (a fresh birth: the failed sensors changed; see tern_sensors)
import gc
import sys
import time

import machine

from tern_link import Link, describe_error, ticks_add, ticks_diff, ticks_ms
from tern_sensors import Sensors
from tern_util import dumps, loads, log, now_ms, reset_cause_name


class Node(Link):
    def __init__(self, cfg):
        Link.__init__(self, cfg)
        self.done = False
        self.values = {}
        self.sensors = Sensors(cfg["sensors"], log)
        self.wdt = None
        self.sleeping = cfg["sleep_ms"] > 0
        if self.sleeping:
            self.restore()

    # --- battery mode: counters in RTC memory ---------------------------------------

    def restore(self):
        """After a deep-sleep wake, continue the same boot and seq (kept in RTC memory)."""
        if reset_cause_name() != "DEEPSLEEP_RESET":
            return
        try:
            m = machine.RTC().memory()
            d = loads(m) if m else None
        except Exception:
            d = None
        if isinstance(d, dict) and d.get("dev") == self.device and isinstance(d.get("seq"), int):
            self.boot = d["boot"]
            self.seq = d["seq"]
            self.acked = self.ack_in = d.get("acked", 0)
            log("wake %s %d" % (self.boot, self.seq))

    def remember(self):
        machine.RTC().memory(dumps({"dev": self.device, "boot": self.boot, "seq": self.seq,
                                    "acked": self.acked}).encode())

    def wifi_start(self):
        w = self.cfg["wifi"]
        if not w.get("ssid"):
            return
        try:
            import network
        except ImportError:
            return
        self.wlan = network.WLAN(network.STA_IF)
        self.wlan.active(True)
        if not self.wlan.isconnected():
            self.wlan.connect(w["ssid"], w.get("password", ""))
            t0 = ticks_ms()
            while not self.wlan.isconnected() and ticks_diff(ticks_ms(), t0) < w.get("timeout_ms", 20000):
                self.feed()
                time.sleep_ms(100)
        log("wifi %s" % ("up" if self.wlan.isconnected() else "down"))

    def ntp(self):
        if not self.cfg["ntp"] or time.gmtime()[0] >= 2024:
            return
        try:
            import ntptime
            ntptime.settime()
            log("ntp ok")
        except Exception as e:
            log("error ntp %s" % e)

    # --- readings ------------------------------------------------------------------

    def take_reading(self):
        vals = self.values
        vals.clear()
        self.sensors.read(vals)
        if self.sensors.errors:
            vals["sensor_err"] = self.sensors.errors
        bf = self.sensors.bad_frames()
        if bf:
            vals["bad_frames"] = bf
        if not vals:
            vals["sensor_err"] = 0
        seq = self.seq + 1
        # The ring keeps only what varies ('"ts":..,"r":{..}'); the envelope is added
        # when it is published (see Link.wire), so a slot is ~100 bytes, not ~200.
        payload = ('"ts":%d,"r":%s' % (now_ms(), dumps(vals))).encode()
        r = self.ring
        if len(payload) > r.slot:  # names too long for the slot: say so, keep seq gap-free
            log("error reading of %d bytes > ring_slot" % len(payload))
            return
        sp = self.spill
        if sp is not None and self.client is None and not self.sleeping:
            # Offline: straight to flash, so a watchdog reset or power cut cannot lose it.
            sp.append(self.boot, seq, payload)
            self.seq = seq
            return
        if sp is not None and r.count == r.size:
            sp.append(self.boot, r.seq[r.head], r.payload(r.head))  # RAM full: oldest to flash
            r.pop()
        d = r.dropped
        r.push(seq, payload)
        self.seq = seq
        if r.dropped != d:
            log("dropped %d" % r.dropped)

    def stats(self):
        gc.collect()
        log("stats seq=%d sent=%d acked=%d ring=%d dropped=%d sensor_err=%d bad_frames=%d "
            "connects=%d mem_free=%d spill=%d" % (
                self.seq, self.max_sent, self.acked, self.ring.count, self.ring.dropped,
                self.sensors.errors, self.sensors.bad_frames(), self.connects, gc.mem_free(),
                0 if self.spill is None or self.spill.empty() else self.spill.last - self.spill.first + 1)
            + " sensors_down=%d" % self.sensors.down)   # sensors that failed the last reading

    def status_extra(self, d):
        self.sensors.status(d)   # the birth names the sensors that are down (not the will)

    def service(self):
        Link.service(self)
        if self.client is not None:
            self.sensors.tell(self)   # a changed set of failed sensors: a fresh birth
            if self.acked and self.ota.get("trial"):   # (tern_boot is kept on a trial boot)
                sys.modules["tern_boot"].proven(self)

    def feed(self):
        if self.wdt is not None:
            self.wdt.feed()

    # --- main loop -----------------------------------------------------------------

    def pending(self):
        return self.ring.count > 0 or (self.spill is not None and not self.spill.empty())

    def wake(self):
        """Battery mode, one wake: sample, connect, publish what is pending, wait (bounded)
        for the acks, put what is still unacked on flash, sleep."""
        cfg = self.cfg
        limit = cfg["max_readings"]
        if not (limit and self.seq >= limit):
            self.take_reading()
        if self.pending():
            try:
                self.connect()
            except Exception as e:
                log("error connect %s" % describe_error(e))
            t0 = ticks_ms()
            while self.client is not None and self.pending() and \
                    ticks_diff(ticks_ms(), t0) < cfg["ack_wait_ms"]:
                self.feed()
                self.service()
                time.sleep_ms(5)
        if limit and self.seq >= limit and not self.pending():
            log("done %d" % limit)
        self.save()
        self.shutdown()
        self.remember()
        machine.deepsleep(cfg["sleep_ms"])

    def run(self):
        cfg = self.cfg
        log("boot %s %s %s" % (self.boot, self.device, self.fw))
        if cfg["wdt_ms"]:
            self.wdt = machine.WDT(timeout=cfg["wdt_ms"])
        self.wifi_start()
        self.ntp()
        if self.sleeping:
            return self.wake()
        limit = cfg["max_readings"]
        self.next_read = ticks_ms()   # an attribute: a set_interval command moves it (tern_cmd)
        said_done = False
        trial_end = ticks_add(ticks_ms(), self.ota.get("secs", 0) * 1000)
        while True:
            self.feed()
            now = ticks_ms()
            if self.ota.get("trial") and ticks_diff(now, trial_end) > 0:
                sys.modules["tern_boot"].unproven(self)
            if self.client is None and ticks_diff(now, self.next_try) >= 0:
                try:
                    self.connect()
                except Exception as e:
                    log("error connect %s" % describe_error(e))
                    self.schedule_retry()
            self.sensors.poll()
            if not self.done and ticks_diff(now, self.next_read) >= 0:
                interval = cfg["interval_ms"]
                self.next_read = ticks_add(self.next_read, interval)
                if ticks_diff(now, self.next_read) > 0:   # fell behind: don't burst
                    self.next_read = ticks_add(now, interval)
                self.take_reading()
                if self.seq % 10 == 0:
                    self.stats()
                if limit and self.seq >= limit:
                    self.done = True   # stop reading; stay connected for acks/resends
                gc.collect()
            if self.client is not None:
                self.service()
                if self.done and not said_done and self.max_sent >= limit:
                    said_done = True   # every reading has been published at least once
                    self.stats()
                    log("done %d" % limit)
            else:
                off = cfg["offline_reset_s"]
                if off and ticks_diff(ticks_ms(), self.offline_since) > off * 1000:
                    log("error offline too long, resetting at seq %d" % self.seq)
                    self.save()   # (offline, the ring is already on flash: this is a no-op then)
                    machine.reset()
            wait = ticks_diff(self.next_read, ticks_ms()) if not self.done else 50
            time.sleep_ms(max(1, min(wait, 20)))


def run(cfg, fw="?", ota=None):
    node = Node(cfg)
    node.fw = fw
    node.ota = ota or {}
    try:
        node.run()
    except KeyboardInterrupt:
        node.save()
        node.shutdown()
    except Exception:
        node.save()   # main.py resets the board: keep what is unacked
        raise
