# Tern OTA install: check a staged release and switch to it with one pointer write.
# Imported by tern_boot only at a boot that finds ota/stage/ready, on a still-empty heap, and
# dropped again before the firmware is imported.
#
# The checks, in order (the first that fails refuses the release; the running version stays):
#   1. the manifest is signed by the fleet key (ota.key, written by `tern-device flash`):
#      a hash-based signature (WOTS, w=16, on a Merkle tree of one-time keys) that needs only
#      SHA-256 to verify: ~550 hashes and under 1 KB of heap, no big-number arithmetic;
#   2. its bytecode version is the one this MicroPython reads, and this board has its min_heap;
#   3. every file it lists is in the stage, of its size and SHA-256; files it does not list are
#      removed (nothing unsigned can end up importable).
# The signature check itself is tern_sig's.
# Memory is bounded: the manifest is read a line at a time, the files 512 bytes at a time, the
# signature 32 bytes at a time; the only list is the names of the files (at most MAX_FILES).
import gc
import os
import sys
from binascii import unhexlify

import tern_boot
from tern_sig import Refused, file_hash, read_key, verify  # noqa: F401 (tern_fetch, tests)

MAX_MANIFEST = 4096
MAX_FILES = 64

seen = "?"           # the version the manifest names, once read (for the refusal's report)


def _name_ok(name):
    if not 1 <= len(name) <= 40 or name[0] == "." or name in ("manifest", "manifest.sig", "ready"):
        return False
    for c in name:
        if not ("a" <= c <= "z" or "A" <= c <= "Z" or "0" <= c <= "9" or c in "_.-"):
            return False
    return True


def mpy_version():
    # The bytecode version (the low byte); the sub-version matters only to native code.
    return str(sys.implementation._mpy & 0xFF)


def check(stage):
    """Verify the staged release; returns (version, trial boots, trial seconds, file names)."""
    global seen
    seen = "?"
    key = read_key()
    buf = bytearray(512)
    mpath = stage + "/manifest"
    try:
        digest, size = file_hash(mpath, buf)
    except OSError:
        raise Refused("no manifest in the stage")
    if size > MAX_MANIFEST:
        raise Refused("manifest of %d bytes > %d" % (size, MAX_MANIFEST), "manifest")
    verify(digest, stage + "/manifest.sig", key)
    # Signed: from here on the manifest's lines are the release author's.
    ver = None
    boots, secs = tern_boot.TRIAL_BOOTS, tern_boot.TRIAL_S
    names = []
    with open(mpath) as f:
        if f.readline() != "tern-release 1\n":
            raise Refused("manifest: not a tern-release 1 manifest", "manifest")
        while True:
            line = f.readline()
            if not line:
                break
            p = line.split()
            if not p:
                continue
            k = p[0]
            if k == "version":
                ver = seen = p[1]
                if not _name_ok(ver) or ver == "stage":
                    raise Refused("manifest: bad version %r" % ver, "manifest")
            elif k == "mpy" and p[1] != mpy_version():
                raise Refused("bytecode %s but this MicroPython reads %s" % (p[1], mpy_version()), "manifest")
            elif k == "min_heap":
                gc.collect()
                if gc.mem_free() < int(p[1]):
                    raise Refused("needs %s bytes of heap, this board has %d" % (p[1], gc.mem_free()), "manifest")
            elif k == "trial_boots":
                boots = max(1, int(p[1]))
            elif k == "trial_s":
                secs = max(10, int(p[1]))
            elif k == "file":
                name = p[1]
                if not _name_ok(name) or len(names) >= MAX_FILES:
                    raise Refused("manifest: bad or too many file names", "manifest")
                path = stage + "/" + name
                try:
                    got, n = file_hash(path, buf)
                except OSError:
                    raise Refused("%s missing" % name)
                if n != int(p[2]) or got != unhexlify(p[3]):
                    raise Refused("%s corrupt (%d bytes, sha256 differs)" % (name, n), name)
                names.append(name)
    if ver is None or not names:
        raise Refused("manifest: no version or no files", "manifest")
    return ver, boots, secs, names


def _rmtree(path):
    # Release folders are flat: files only.
    for e in os.ilistdir(path):
        os.remove(path + "/" + e[0])
    os.rmdir(path)


def install(stage):
    """Check the release in `stage` and switch to it; a refused release leaves the running
    version as it is and is told in the next births. Returns True when switched."""
    try:
        return _install(stage)
    finally:
        sys.modules.pop("tern_sig", None)   # (tern_boot drops this module; the checker goes too)


def _install(stage):
    d = tern_boot.read_state()
    cur = d.get("cur") or ""
    try:
        ver, boots, secs, names = check(stage)
        if ver == cur:
            raise Refused("%s is already running" % ver, "manifest")
    except Refused as e:
        _refuse(stage, d, seen, str(e), e.drop)
        return False
    except Exception as e:   # (a malformed line: a signed but broken manifest)
        _refuse(stage, d, seen, "%s %s" % (type(e).__name__, e), "manifest")
        return False
    for e in os.ilistdir(stage):   # nothing unsigned may become importable
        if e[0] not in names and e[0] not in ("manifest", "manifest.sig"):
            os.remove(stage + "/" + e[0])
    dst = tern_boot.OTA + "/" + ver
    if tern_boot.exists(dst):
        _rmtree(dst)   # a leftover of an earlier try (or the previous version, given again)
    # The previous version is the last one that proved itself.
    prev = cur if d.get("ok") or not cur else d.get("prev") or ""
    os.rename(stage, dst)
    tern_boot.write_state({"cur": ver, "prev": prev, "ok": 0, "tries": 0, "boots": boots, "secs": secs})
    for e in os.ilistdir(tern_boot.OTA):   # keep the new one and the one to go back to
        if e[1] == 0x4000 and e[0] not in (ver, prev, "stage"):
            _rmtree(tern_boot.OTA + "/" + e[0])
    tern_boot.log("ota switched %s to %s" % (cur or "flashed", ver))
    return True


def _refuse(stage, d, ver, why, drop):
    try:
        os.remove(stage + "/ready")
    except OSError:
        pass
    if drop == "manifest":
        drop = ("manifest", "manifest.sig")
    elif drop:
        drop = (drop,)
    for name in drop or ():
        try:
            os.remove(stage + "/" + name)
        except OSError:
            pass
    d["st"], d["ver"], d["why"] = "refused", ver, why[:120]
    tern_boot.write_state(d)
    tern_boot.log("error ota refused %s: %s" % (ver, why))
