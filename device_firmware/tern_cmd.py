# Tern node commands. The gateway writes {"v":1,"id":..,"name":..,"args":{..}} on the node's
# cmd topic; the node answers on its reply topic: {"v":1,"dev":..,"id":..,"ok":true,
# "result":{..}} or {..,"ok":false,"error":".."}. Commands: ping, set_interval, set_config,
# get_config, rebirth, reboot (docs/contracts.md), ota_update (tern_fetch, docs/ota.md).
#
# Each command runs ONCE: the ids of the last SEEN commands are kept in a fixed ring, with the
# replies of those that changed something, in RAM and on flash (cmd_seen.txt), so a reboot
# command redelivered after the reboot is answered, not run again. A redelivery gets the same
# reply (a read-only command's is built again). Commands run inside the MQTT callback; what
# publishes (replies, the birth) or ends the boot (reboot) waits for flush(), called by the
# link's service pass, so nothing nests inside umqtt's wait for a PUBACK.
#
# Resident, compiled at boot: compiling on demand does not work on a running node's
# fragmented heap. Values are checked with tern_rules, which tern_config uses at boot.
#
# Console: TERN cmd <id> <name> <ok|error>   TERN cmd_dup <id>   TERN error cmd <why>
import gc
import os
import time

import tern_rules
from tern_util import dumps, loads, log

SEEN = 16           # command ids remembered (RAM and flash)
SEEN_FILE = "cmd_seen.txt"
CONFIG_FILE = "config.json"
READ_ONLY = ("ping", "get_config")
NAMES = ("ping", "set_interval", "set_config", "get_config", "rebirth", "reboot", "ota_update")
SECRETS = ("mqtt_password", "wifi.password")
# Identity: the node's topics and broker account hang on them; set by flashing only.
FIXED = ("device", "site", "sensors", "wifi")
# Keys a running node takes at once; the others are persisted for the next boot.
LIVE = ("interval_ms", "qos", "bundle_max", "timeout_ms", "backoff_min_ms", "backoff_max_ms",
        "offline_reset_s", "ack_wait_ms")


def write_file(path, text):
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


def mask(key, v):
    return ("***" if v else "") if key in SECRETS else v


def only(args, allowed):
    for a in args:
        if a not in allowed:
            raise ValueError("unexpected argument %r" % a)


class Commands:
    def __init__(self, node):
        self.node = node
        self.t0 = time.ticks_ms()
        self.ids = [None] * SEEN
        self.replies = [None] * SEEN   # bytes; None for a read-only command (built again)
        self.unsent = bytearray(SEEN)  # 1: reply to send, 2: send and then drop it
        self.head = 0                  # next slot to reuse (the oldest)
        self.rebirth = False
        self.reboot = False
        self.pending = []              # keys persisted for the next boot (config keys: bounded)
        try:
            f = open(SEEN_FILE)
        except OSError:
            return
        try:
            for _ in range(SEEN):
                cid, _, r = f.readline().rstrip("\n").partition("\t")
                if not cid:
                    break
                self.ids[self.head] = cid
                self.replies[self.head] = r.encode() if r else None
                self.head = (self.head + 1) % SEEN
        except Exception as e:     # a torn file: forget it rather than fail the boot
            log("error cmd seen file %s" % e)
        finally:
            f.close()

    def save(self):
        parts = []
        for j in range(SEEN):
            i = (self.head + j) % SEEN
            if self.ids[i] is not None:
                r = self.replies[i]
                parts.append("%s\t%s\n" % (self.ids[i], r.decode() if r is not None else ""))
        try:
            write_file(SEEN_FILE, "".join(parts))
        except OSError as e:
            log("error cmd seen file %s" % e)

    def receive(self, msg):
        """One message from the cmd topic (inside the MQTT callback): run it once, queue the reply."""
        try:
            c = loads(msg)
            cid = c["id"]
            tern_rules.check_id(cid, "id")
        except Exception:      # nobody to answer: say so on the console
            log("error cmd without a valid id (%d bytes)" % len(msg))
            return
        name = c.get("name")
        dup = cid in self.ids
        if dup:
            i = self.ids.index(cid)
            log("cmd_dup %s" % cid)
            if self.replies[i] is not None:
                self.unsent[i] = self.unsent[i] or 1
                return
        else:
            i = self.head
            self.head = (i + 1) % SEEN
            self.ids[i] = cid
        try:
            if dup and name not in READ_ONLY:   # only a read-only command's reply is dropped
                raise ValueError("command id %s was used by a read-only command" % cid)
            ok, out = True, self.do(c.get("v"), name, c.get("args", {}))
        except ValueError as e:      # a bad command or argument (tern_rules.ConfigError too)
            ok, out = False, str(e)
        except MemoryError:
            ok, out = False, "out of memory"
        except Exception as e:   # a bug must not take the node down: say what it was
            ok, out = False, "%s %s" % (type(e).__name__, e)
        body = {"v": 1, "dev": self.node.device, "id": cid, "ok": ok}
        body["result" if ok else "error"] = out if ok else out[:200]
        r = dumps(body).encode()
        if len(r) > 1024:   # the gateway's limit (tern/core/commands.py MAX_REPLY_BYTES)
            ok = False
            r = dumps({"v": 1, "dev": self.node.device, "id": cid, "ok": False,
                       "error": "reply of %d bytes > 1024" % len(r)}).encode()
        self.replies[i] = r
        if dup:
            self.unsent[i] = 2
            return
        log("cmd %s %s %s" % (cid, name if name in NAMES else "?", "ok" if ok else "error"))
        if name in READ_ONLY:
            self.unsent[i] = 2
        else:
            self.unsent[i] = 1
            self.save()

    def flush(self, client):
        """(Connected.) Every unsent reply (QoS 1), then the birth if asked, then reboot if asked.
        Replies first: a gateway that sees a new birth re-sends the commands it has no reply to."""
        node = self.node
        for i in range(SEEN):
            if self.unsent[i]:
                client.publish(node.t_reply, self.replies[i], False, 1)
                if self.unsent[i] == 2:
                    self.replies[i] = None   # read-only: built again if redelivered
                self.unsent[i] = 0
        if self.rebirth:
            client.publish(node.t_status, node._status("online"), True, 1)
            self.rebirth = False
            log("rebirth")
        if self.reboot:
            log("reboot by command")
            node.save()        # unacked readings to flash first
            node.shutdown()    # say offline now rather than at the broker's keep-alive timeout
            import machine
            machine.reset()

    # --- the commands ----------------------------------------------------------------------

    def do(self, v, name, args):
        if v != 1:
            raise ValueError("unsupported version v=%r" % (v,))
        if not isinstance(args, dict):
            raise ValueError("args must be an object")
        n = self.node
        if name == "ping":
            only(args, ())
            gc.collect()
            return {"uptime_ms": time.ticks_diff(time.ticks_ms(), self.t0), "boot": n.boot,
                    "seq": n.seq, "acked": n.acked, "mem_free": gc.mem_free(), "fw": n.fw}
        if name == "rebirth":
            only(args, ())
            self.rebirth = True
            return {"boot": n.boot}
        if name == "reboot":
            only(args, ())
            self.reboot = True
            return {"boot": n.boot, "rebooting": True}
        if name == "ota_update":
            # The download runs after a reboot, on a tidy heap (tern_fetch is loaded only then):
            # a node that is not updating pays nothing for it.
            only(args, ("version",))
            v = args.get("version")
            tern_rules.check_id(v, "version")
            if len(v) > 32 or v == "stage":
                raise ValueError("invalid version %r" % v)
            if v == n.fw:
                raise ValueError("%s is already running" % v)
            f = getattr(n, "fetch", None)
            if f is not None and f.ver == v:
                return {"version": v, "fetching": True}
            try:
                os.mkdir("ota")
            except OSError:
                pass
            write_file("ota/fetch", v)
            self.reboot = True
            return {"version": v, "fetching": True, "rebooting": True}
        if name == "set_interval":
            only(args, ("s", "ms"))
            if len(args) != 1:
                raise ValueError("give the interval as one of s or ms")
            ms = args.get("ms")
            if "s" in args:
                s = args["s"]
                if not isinstance(s, (int, float)) or isinstance(s, bool):
                    raise ValueError("s must be a number, got %r" % (s,))
                ms = int(s * 1000 + 0.5)
            r = self.set("interval_ms", ms)
            return {"interval_ms": ms, "persisted": True, "applied": r["applied"]}
        if name == "set_config":
            only(args, ("key", "value"))
            if not isinstance(args.get("key"), str) or "value" not in args:
                raise ValueError("set_config needs key (a string) and value")
            return self.set(args["key"], args["value"])
        if name == "get_config":
            only(args, ("key",))
            cfg = n.cfg
            key = args.get("key")
            if key is not None:
                if key in ("wifi.ssid", "wifi.password", "wifi.timeout_ms"):
                    return {"key": key, "value": mask(key, cfg["wifi"].get(key[5:]))}
                if not isinstance(key, str) or key not in cfg:
                    raise ValueError("unknown config key %r" % (key,))
                return {"key": key, "value": mask(key, cfg[key])}
            out = {}
            for k in cfg:
                out[k] = mask(k, cfg[k])
            w = {}
            for k in cfg["wifi"]:
                w[k] = mask("wifi." + k, cfg["wifi"][k])
            out["wifi"] = w
            res = {"config": out}
            if self.pending:
                res["reboot_pending"] = self.pending
            return res
        raise ValueError("unknown command %r" % (name[:40] if isinstance(name, str) else name,))

    def set(self, key, value):
        """Check one key with the firmware's rules, persist it to config.json, apply it."""
        if key in FIXED:
            raise ValueError("%s is set by flashing the node, not by command" % key)
        try:
            f = open(CONFIG_FILE)
            try:
                user = loads(f.read())
            finally:
                f.close()
        except OSError:
            user = {}
        if not isinstance(user, dict):
            raise ValueError("config.json on flash is not a JSON object")
        cfg = self.node.cfg
        # The key's own rule, then the rules that tie keys together, on the config the next
        # boot loads: flash first, else what runs now.
        tern_rules.check_value(key, value)
        t = {}
        for x in ("backoff_min_ms", "backoff_max_ms", "bundle_max", "ring_slot"):
            t[x] = user.get(x, cfg[x])
        if key in t:
            t[key] = value
        tern_rules.check_together(t)
        if key[:5] == "wifi.":
            w = {}
            for x in user.get("wifi") or {}:
                w[x] = user["wifi"][x]
            w[key[5:]] = value
            user["wifi"] = w
        else:
            user[key] = value
        write_file(CONFIG_FILE, dumps(user))
        applied = self.apply(key, value, t)
        if not applied and key not in self.pending:
            self.pending.append(key)
        return {"key": key, "value": mask(key, value), "applied": applied, "reboot": not applied}

    def apply(self, key, v, t):
        """Take a persisted key into the running node where that is possible."""
        n = self.node
        cfg = n.cfg
        if key == "sleep_ms" and getattr(n, "sleeping", False) and v > 0:
            cfg["sleep_ms"] = v          # the next deep sleep takes it
            return True
        if key not in LIVE:
            return False
        cfg[key] = v
        if key == "interval_ms":
            nr = getattr(n, "next_read", None)
            if nr is not None:
                soon = time.ticks_add(time.ticks_ms(), v)
                if time.ticks_diff(nr, soon) > 0:
                    n.next_read = soon   # a shorter interval starts now, not after the old one
        elif key == "qos":
            n.qos = v
        elif key == "bundle_max":
            n.bundle = v
        elif key == "timeout_ms":
            n.timeout_s = v / 1000       # from the next connection
        elif key[:7] == "backoff":
            cfg["backoff_min_ms"] = t["backoff_min_ms"]
            cfg["backoff_max_ms"] = t["backoff_max_ms"]
        return True
