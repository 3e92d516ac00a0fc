# Tern boot check: which firmware version runs, and the way back from a bad one.
#
# Flash layout (see docs/ota.md):
#   /main.py, /tern_*.py|.mpy   the flashed ("factory") firmware: always there, the last resort
#   /ota/state                  one small JSON object, the pointer: {"cur": version ("" = factory),
#                               "prev": version, "ok": 1 once cur proved itself, "tries": boots of
#                               cur so far, "boots"/"secs": its bounds, "err": why its last boot
#                               failed, "st"/"ver"/"why": the last refusal or rollback, told in births}
#   /ota/<version>/             one installed release (its .mpy files + manifest + manifest.sig)
#   /ota/stage/                 a release being received; "ready" in it asks for an install at boot
# Every change of the state is one write of ota/state.tmp and one rename over ota/state: a power
# cut leaves the old pointer or the new one, never half of one.
import json
import os
import sys

# (No tern_* module is imported here: this runs before the version's folder is on sys.path, and
# a module imported now would be the flashed copy for the whole boot, not the release's.)

OTA = "ota"
STATE = "ota/state"
STAGE = "ota/stage"
# A release that has not proved itself (connected and a reading acked) within this many boots
# and seconds per boot is rolled back; the manifest may set its own (trial_boots, trial_s).
TRIAL_BOOTS = 3
TRIAL_S = 300

state = None    # the state as read at boot (kept only on a trial boot, to confirm it)


def exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def read_state():
    try:
        with open(STATE) as f:
            d = json.loads(f.read(1024))
        if isinstance(d, dict):
            return d
    except (OSError, ValueError):
        pass
    return {}


def write_state(d):
    """The one atomic pointer write: a whole new state file, renamed over the old one."""
    if not exists(OTA):
        os.mkdir(OTA)
    tmp = STATE + ".tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(d))
    os.rename(tmp, STATE)


def start():
    """At boot, before the firmware is imported: install a staged release if one is ready, roll
    back a release that used up its boots without proving itself, and put the folder of the
    version to run first on sys.path. Returns {"fw": version or "", "trial": 0/1, "st", "ver", "why"}."""
    global state
    if exists(STAGE + "/ready"):
        import tern_ota   # only now: the verifier is not kept in a running node
        tern_ota.install(STAGE)
        del sys.modules["tern_ota"]
    d = read_state()
    cur = d.get("cur") or ""
    if cur and not exists(OTA + "/" + cur):
        d = roll_back(d, "folder of %s missing" % cur)
        cur = d.get("cur") or ""
    if cur and not d.get("ok"):
        tries = d.get("tries", 0) + 1
        if tries > d.get("boots", TRIAL_BOOTS):
            d = roll_back(d, d.get("err") or "not proven within %d boots" % (tries - 1))
            cur = d.get("cur") or ""
        else:
            d["tries"] = tries
            write_state(d)
            log("ota trial %s boot %d of %d" % (cur, tries, d.get("boots", TRIAL_BOOTS)))
    if cur:
        base = os.getcwd()
        sys.path.insert(0, ("" if base == "/" else base) + "/" + OTA + "/" + cur)
    trial = 1 if cur and not d.get("ok") else 0
    state = d if trial else None
    info = {"fw": cur, "trial": trial, "secs": d.get("secs", TRIAL_S)}
    for k in ("st", "ver", "why"):
        if k in d:
            info[k] = d[k]
    return info


def roll_back(d, why):
    """Go back to the previous version (or the flashed firmware): one state write."""
    bad = d.get("cur") or ""
    prev = d.get("prev") or ""
    if prev and not exists(OTA + "/" + prev):
        prev = ""
    n = {"cur": prev, "prev": "", "ok": 1, "st": "rolled_back", "ver": bad, "why": str(why)[:120]}
    write_state(n)
    log("error ota rolled back %s to %s: %s" % (bad, prev or "flashed", n["why"]))
    return n


def log(msg):
    print("TERN " + msg)


def confirm():
    """The running release proved itself: it stays (and stays the one to go back to)."""
    global state
    d = state if state is not None else read_state()
    if d.get("cur") and not d.get("ok"):
        d["ok"] = 1
        d.pop("tries", None)
        d.pop("err", None)
        write_state(d)
        log("ota ok %s" % d["cur"])
    state = None


def proven(node):
    """(Trial boot, called by the node.) Connected and a reading acked: this release stays."""
    node.ota = {"fw": node.fw, "st": "ok", "ver": node.fw}
    confirm()
    del sys.modules["tern_boot"]
    node.client.publish(node.t_status, node._status("online"), True, 1)   # a fresh birth tells it


def unproven(node):
    """(Trial boot.) Its seconds are up without a reading acked: note why, reset (a boot used)."""
    why = "not proven within %d s" % node.ota["secs"]
    log("error ota " + why)
    failed(why)
    node.save()
    import machine
    machine.reset()


def failed(why):
    """A trial boot crashed: note why (the rollback reports it) before the board resets."""
    d = read_state()
    if d.get("cur") and not d.get("ok"):
        d["err"] = str(why)[:120]
        write_state(d)
