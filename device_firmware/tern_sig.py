# Tern release signature check, on the node: the fleet's verify key (ota.key) and the hash-based
# signature over a manifest (WOTS w=16 on a Merkle tree of one-time keys; docs/ota.md). Needs
# only SHA-256: ~550 hashes, the signature read 32 bytes at a time, under 1 KB of heap.
# Used by tern_ota (the install at boot) and tern_fetch (a download checks the manifest's
# signature before it fetches any file); kept apart so a running node loads only this.
import struct
from binascii import hexlify, unhexlify
from hashlib import sha256

KEY = "ota.key"
N = 32               # bytes per hash
W = 16               # Winternitz parameter: a chain is 15 hashes long, one per 4-bit digit
L1 = 64              # digits of a 256-bit message digest
L = 67               # ... plus 3 digits of checksum (at most 64 * 15 = 960 < 16 ** 3)
SIG_HEAD = 17        # b"TOS1" | key id (8) | leaf index (4) | tree height (1)


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
