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
# Memory is bounded: the manifest is read a line at a time, the files 512 bytes at a time, the
# signature 32 bytes at a time; the only list is the names of the files (at most MAX_FILES).
import gc
import os
import struct
import sys
from binascii import hexlify, unhexlify
from hashlib import sha256

import tern_boot

KEY = "ota.key"
N = 32               # bytes per hash
W = 16               # Winternitz parameter: a chain is 15 hashes long, one per 4-bit digit
L1 = 64              # digits of a 256-bit message digest
L = 67               # ... plus 3 digits of checksum (at most 64 * 15 = 960 < 16 ** 3)
MAX_MANIFEST = 4096
MAX_FILES = 64
SIG_HEAD = 17        # b"TOS1" | key id (8) | leaf index (4) | tree height (1)

seen = "?"           # the version the manifest names, once read (for the refusal's report)


class Refused(Exception):
    """The release is refused; .drop names what to delete from the stage (a bad file is fetched
    again, a bad manifest or signature means the whole release)."""

    def __init__(self, why, drop=None):
        super().__init__(why)
        self.drop = drop


def _addr(index, kind, chain, step):
    # Every hash of the scheme is tweaked by where it is (as in SPHINCS+'s "simple" WOTS):
    # kind 0 = chain step, 1 = one-time public key, 2 = tree node, 3 = message digest.
    return struct.pack(">IBBH", index, kind, chain, step)


def read_key():
    """The fleet's verify key: (tree height, public seed, Merkle root)."""
    try:
        with open(KEY) as f:
            p = f.read(200).split()
    except OSError:
        raise Refused("no verify key on this board (ota.key): flash it with tern-device flash --ota-key")
    if len(p) != 5 or p[0] != "tern-ota-wots" or p[1] != "1":
        raise Refused("ota.key is not a Tern verify key")
    return int(p[2]), unhexlify(p[3]), unhexlify(p[4])


def verify(msg, sig_path, key):
    """Check the signature in sig_path over the 32-byte msg; raise Refused if it is not good."""
    height, seed, root = key
    buf = bytearray(N + 8 + N)   # seed | address | value: the input of every chain step
    mv = memoryview(buf)
    buf[0:N] = seed
    val = mv[N + 8:]
    try:
        f = open(sig_path, "rb")
    except OSError:
        raise Refused("unsigned: no manifest.sig", "manifest")
    with f:
        head = f.read(SIG_HEAD)
        if len(head) != SIG_HEAD or head[:4] != b"TOS1":
            raise Refused("manifest.sig is not a Tern signature", "manifest")
        if head[4:12] != root[:8]:
            raise Refused("signed with another key (key id %s)" % hexlify(head[4:12]).decode(), "manifest")
        leaf = struct.unpack(">I", head[12:16])[0]
        if head[16] != height or leaf >> height:
            raise Refused("signature does not fit the key's tree", "manifest")
        h = sha256(seed)
        h.update(_addr(leaf, 3, 0, 0))
        h.update(root)
        h.update(msg)
        m = h.digest()
        csum = 0
        for b in m:
            csum += 30 - (b >> 4) - (b & 15)
        pk = sha256(seed)        # the one-time public key, hashed as its chain ends come
        pk.update(_addr(leaf, 1, 0, 0))
        buf[N:N + 8] = _addr(leaf, 0, 0, 0)
        for i in range(L):
            if i < L1:
                a = m[i >> 1] & 15 if i & 1 else m[i >> 1] >> 4
            else:
                a = (csum >> (4 * (L - 1 - i))) & 15
            if f.readinto(val) != N:
                raise Refused("manifest.sig is cut short", "manifest")
            buf[N + 5] = i
            for j in range(a, W - 1):   # walk the chain from the signed digit to its end
                buf[N + 7] = j
                val[:] = sha256(buf).digest()
            pk.update(val)
        node = pk.digest()
        idx = leaf
        for lvl in range(height):
            sib = f.read(N)
            if len(sib) != N:
                raise Refused("manifest.sig is cut short", "manifest")
            h = sha256(seed)
            h.update(_addr(idx >> 1, 2, 0, lvl + 1))
            if idx & 1:
                h.update(sib)
                h.update(node)
            else:
                h.update(node)
                h.update(sib)
            node = h.digest()
            idx >>= 1
        if f.read(1):
            raise Refused("manifest.sig is too long", "manifest")
    if node != root:
        raise Refused("wrongly signed: the signature does not match the fleet key", "manifest")


def file_hash(path, buf):
    """(sha256 digest, size) of a file, read into buf (no file is ever held in RAM)."""
    h = sha256()
    n = 0
    mv = memoryview(buf)
    with open(path, "rb") as f:
        while True:
            k = f.readinto(buf)
            if not k:
                break
            h.update(mv[:k])
            n += k
    return h.digest(), n


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
