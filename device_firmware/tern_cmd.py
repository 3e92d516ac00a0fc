# Tern node commands: the gateway writes {"v":1,"id":..,"name":..,"args":{..}} on the node's
# cmd topic; the node answers once per command id on its reply topic with
# {"v":1,"dev":..,"id":..,"ok":true,"result":{..}} or {..,"ok":false,"error":".."}.
#
# Each command runs ONCE: the ids of the last SEEN commands and their replies are kept in a
# fixed ring (and on flash, so a reboot command redelivered after the reboot is answered, not
# run again). A redelivery gets the same reply again. Commands run inside the MQTT callback;
# what must publish (replies, the birth) or end the boot (reboot) waits for flush(), called by
# the link's service pass, so nothing nests inside umqtt's wait for a PUBACK.
#
# Console: TERN cmd <id> <name> <ok|error>   TERN cmd_dup <id>   TERN error cmd <why>
import gc
import os
import sys
import time

from tern_util import dumps, loads, log

SEEN = 16             # command ids remembered (RAM and flash)
KEEP_REPLY = 400      # bytes of a reply kept for a redelivery (get_config's may be rebuilt)
MAX_REPLY = 1024      # what the gateway accepts (tern/core/commands.py MAX_REPLY_BYTES)
SEEN_FILE = "cmd_seen.txt"
CONFIG_FILE = "config.json"
SECRETS = ("mqtt_password", "wifi.password")
# Identity: the node's topics and its broker account hang on them; set by flashing only.
FIXED = ("device", "site", "sensors")
# Keys a running node takes at once (the rest are persisted and need a reboot).
LIVE = ("interval_ms", "qos", "bundle_max", "timeout_ms", "backoff_min_ms", "backoff_max_ms",
        "offline_reset_s", "ack_wait_ms")
READ_ONLY = ("ping", "get_config")
NAMES = ("ping", "set_interval", "set_config", "get_config", "rebirth", "reboot")


class CmdError(Exception):
    pass


def _id_ok(v):
    if not isinstance(v, str) or not 1 <= len(v) <= 64 or v[0] in "._-":
        return False
    for c in v:
        if not (c.isalpha() or c.isdigit() or c in "_.-") or ord(c) > 127:
            return False
    return True


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _mask(key, v):
    return ("***" if v else "") if key in SECRETS else v


def _write(path, text):
    """Write a flash file atomically: a temp file renamed over the old one."""
    tmp = path + ".tmp"
    f = open(tmp, "w")
    try:
        f.write(text)
    finally:
        f.close()
    try:
        os.rename(tmp, path)
    except OSError:     # a filesystem that will not rename over a file (FAT)
        os.remove(path)
        os.rename(tmp, path)


class Commands:
    def __init__(self, node):
        self.node = node
        self.t0 = time.ticks_ms()
        self.ids = [None] * SEEN
        self.replies = [None] * SEEN   # reply bytes, or None when too big to keep
        self.unsent = [False] * SEEN
        self.head = 0                  # next slot to reuse (the oldest)
        self.rebirth = False
        self.reboot = False
        self.reboot_keys = []          # persisted keys waiting for a reboot (<= len(DEFAULTS))
        self.rules_resident = "tern_rules" in sys.modules
        self.load()

    # --- the ring of seen ids ------------------------------------------------------------

    def load(self):
        try:
            f = open(SEEN_FILE)
        except OSError:
            return
        try:
            for _ in range(SEEN):
                line = f.readline()
                if not line:
                    break
                cid, _, reply = line.rstrip("\n").partition("\t")
                if _id_ok(cid):
                    self.remember(cid, reply.encode() if reply else None)
        except Exception as e:     # a torn file: forget it rather than fail the boot
            log("error cmd seen file %s" % e)
        finally:
            f.close()

    def save(self):
        parts = []
        for k in range(SEEN):
            i = (self.head + k) % SEEN
            if self.ids[i] is not None:
                r = self.replies[i]
                keep = r is not None and len(r) <= KEEP_REPLY
                parts.append(self.ids[i] + "\t" + (r.decode() if keep else "") + "\n")
        try:
            _write(SEEN_FILE, "".join(parts))
        except OSError as e:
            log("error cmd seen file %s" % e)

    def find(self, cid):
        for i in range(SEEN):
            if self.ids[i] == cid:
                return i
        return -1

    def remember(self, cid, reply):
        i = self.head
        self.ids[i] = cid
        self.replies[i] = reply if reply is None or len(reply) <= KEEP_REPLY else None
        self.unsent[i] = False
        self.head = (i + 1) % SEEN
        return i

    # --- incoming (inside the MQTT callback) -----------------------------------------------

    def receive(self, msg):
        """Take one message from the cmd topic: run it once, queue its reply."""
        try:
            c = loads(msg)
        except Exception:
            log("error cmd not JSON (%d bytes)" % len(msg))
            return
        cid = c.get("id") if isinstance(c, dict) else None
        if not _id_ok(cid):
            log("error cmd without a valid id")   # nobody to answer: say so on the console
            return
        i = self.find(cid)
        if i >= 0:
            log("cmd_dup %s" % cid)
            if self.replies[i] is None:   # too big to keep: rebuilt, if that changes nothing
                if c.get("name") in READ_ONLY:
                    self.replies[i] = self.run(c, cid)[0]
                else:
                    self.replies[i] = dumps({"v": 1, "dev": self.node.device, "id": cid, "ok": False,
                                             "error": "done before; its reply is no longer kept"}).encode()
            self.unsent[i] = True
            return
        reply, name, ok = self.run(c, cid)
        i = self.remember(cid, reply)
        self.replies[i] = reply          # kept until sent even when too big to remember
        self.unsent[i] = True
        self.save()
        log("cmd %s %s %s" % (cid, name, "ok" if ok else "error"))

    def run(self, c, cid):
        name = c.get("name")
        args = c.get("args", {})
        if not isinstance(name, str):
            name = "?"
        try:
            if c.get("v") != 1:
                raise CmdError("unsupported version v=%r" % (c.get("v"),))
            if not isinstance(args, dict):
                raise CmdError("args must be an object")
            if name not in NAMES:   # checked first: getattr would intern any name sent
                raise CmdError("unknown command %r" % name[:40])
            result = getattr(self, "c_" + name)(args)
            ok = True
            body = {"v": 1, "dev": self.node.device, "id": cid, "ok": True, "result": result}
        except CmdError as e:
            ok = False
            body = {"v": 1, "dev": self.node.device, "id": cid, "ok": False, "error": str(e)[:200]}
        except MemoryError:
            gc.collect()
            ok = False
            body = {"v": 1, "dev": self.node.device, "id": cid, "ok": False, "error": "out of memory"}
        except Exception as e:   # a bug must not take the node down: say what it was
            ok = False
            body = {"v": 1, "dev": self.node.device, "id": cid, "ok": False,
                    "error": ("%s %s" % (type(e).__name__, e))[:200]}
        out = dumps(body).encode()
        if len(out) > MAX_REPLY:
            out = dumps({"v": 1, "dev": self.node.device, "id": cid, "ok": False,
                         "error": "reply of %d bytes > %d" % (len(out), MAX_REPLY)}).encode()
        return out, name, ok

    # --- outgoing (from the link's service pass, connected) ----------------------------------

    def flush(self, client):
        """Publish the birth if asked, then every unsent reply (QoS 1), then reboot if asked."""
        node = self.node
        if self.rebirth:
            client.publish(node.t_status, node._status("online"), True, 1)
            self.rebirth = False
            log("rebirth")
        for i in range(SEEN):
            if self.unsent[i]:
                client.publish(node.t_reply, self.replies[i], False, 1)
                self.unsent[i] = False
                if self.ids[i] is not None and len(self.replies[i]) > KEEP_REPLY:
                    self.replies[i] = None
        if self.reboot:
            log("reboot by command")
            node.save()        # unacked readings to flash first
            node.shutdown()    # say offline now rather than at the broker's keep-alive timeout
            import machine
            machine.reset()

    # --- the commands ---------------------------------------------------------------------

    @staticmethod
    def _only(args, allowed):
        for k in args:
            if k not in allowed:
                raise CmdError("unexpected argument %r" % k)

    def c_ping(self, args):
        self._only(args, ())
        gc.collect()
        n = self.node
        return {"uptime_ms": time.ticks_diff(time.ticks_ms(), self.t0), "boot": n.boot, "seq": n.seq,
                "acked": n.acked, "mem_free": gc.mem_free(), "fw": n.fw}

    def c_set_interval(self, args):
        self._only(args, ("s", "ms"))
        if len(args) != 1:
            raise CmdError("give the interval as one of s or ms")
        if "s" in args:
            s = args["s"]
            if not _number(s):
                raise CmdError("s must be a number, got %r" % (s,))
            ms = int(s * 1000 + 0.5)
        else:
            ms = args["ms"]
            if not isinstance(ms, int) or isinstance(ms, bool):
                raise CmdError("ms must be an integer, got %r" % (ms,))
        r = self.set("interval_ms", ms)
        return {"interval_ms": ms, "persisted": True, "applied": r["applied"]}

    def c_set_config(self, args):
        self._only(args, ("key", "value"))
        key = args.get("key")
        if not isinstance(key, str) or "value" not in args:
            raise CmdError("set_config needs key (a string) and value")
        return self.set(key, args["value"])

    def c_get_config(self, args):
        self._only(args, ("key",))
        cfg = self.node.cfg
        if "key" in args:
            key = args["key"]
            if key in ("wifi.ssid", "wifi.password", "wifi.timeout_ms"):
                return {"key": key, "value": _mask(key, cfg["wifi"].get(key[5:]))}
            if not isinstance(key, str) or key not in cfg:
                raise CmdError("unknown config key %r" % (key,))
            return {"key": key, "value": _mask(key, cfg[key])}
        out = {}
        for k in cfg:
            out[k] = _mask(k, cfg[k])
        w = {}
        for k in cfg["wifi"]:
            w[k] = _mask("wifi." + k, cfg["wifi"][k])
        out["wifi"] = w
        res = {"config": out}
        if self.reboot_keys:
            res["reboot_pending"] = self.reboot_keys
        return res

    def c_rebirth(self, args):
        self._only(args, ())
        self.rebirth = True
        return {"boot": self.node.boot}

    def c_reboot(self, args):
        self._only(args, ())
        self.reboot = True
        return {"boot": self.node.boot, "rebooting": True}

    # --- set_config: validate with the firmware's rules, persist, apply ---------------------

    def set(self, key, value):
        if key in FIXED:
            raise CmdError("%s is set by flashing the node, not by command" % key)
        if key == "wifi":
            raise CmdError("set wifi field by field: wifi.ssid, wifi.password, wifi.timeout_ms")
        try:
            f = open(CONFIG_FILE)
            try:
                user = loads(f.read())
            finally:
                f.close()
        except OSError:
            user = {}
        if not isinstance(user, dict):
            raise CmdError("config.json on flash is not a JSON object")
        cfg = self.node.cfg
        # The key's rules (tern_rules, shared with tern_config), then the rules that tie keys
        # together, on the config the next boot will load: flash first, else what runs now.
        gc.collect()
        import tern_rules
        try:
            tern_rules.check_value(key, value)
            t = {}
            for k in ("backoff_min_ms", "backoff_max_ms", "bundle_max", "ring_slot"):
                t[k] = user.get(k, cfg[k])
            if key in t:
                t[key] = value
            tern_rules.check_together(t)
        except tern_rules.ConfigError as e:
            raise CmdError(str(e))
        finally:
            # Freed again unless main.py kept it: the heap of a running node is small.
            if not self.rules_resident:
                del sys.modules["tern_rules"]
            tern_rules = None
            gc.collect()
        if key.startswith("wifi."):
            w = {}
            old = user.get("wifi")
            if isinstance(old, dict):
                for k in old:
                    w[k] = old[k]
            w[key[5:]] = value
            user["wifi"] = w
        else:
            user[key] = value
        _write(CONFIG_FILE, dumps(user))
        applied = self.apply(key, t, value)
        if not applied and key not in self.reboot_keys:
            self.reboot_keys.append(key)
        return {"key": key, "value": _mask(key, value), "applied": applied, "reboot": not applied}

    def apply(self, key, t, v):
        """Take a persisted key into the running node where that is possible (t: the
        together-checked keys)."""
        n = self.node
        cfg = n.cfg
        top = key
        if top == "sleep_ms" and getattr(n, "sleeping", False) and v > 0:
            cfg["sleep_ms"] = v   # the next deep sleep takes it
            return True
        if top not in LIVE:
            return False
        cfg[top] = v
        if top == "interval_ms":
            nr = getattr(n, "next_read", None)
            if nr is not None:
                soon = time.ticks_add(time.ticks_ms(), v)
                if time.ticks_diff(nr, soon) > 0:
                    n.next_read = soon      # a shorter interval starts now, not after the old one
        elif top == "qos":
            n.qos = v
        elif top == "bundle_max":
            n.bundle = v
        elif top == "timeout_ms":
            n.timeout_s = v / 1000          # from the next connection
        elif top in ("backoff_min_ms", "backoff_max_ms"):
            cfg["backoff_min_ms"] = t["backoff_min_ms"]
            cfg["backoff_max_ms"] = t["backoff_max_ms"]
        return True
