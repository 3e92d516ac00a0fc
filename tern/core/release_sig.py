"""The release signature, checked on the host: the fleet's verify key and the node's check.

Shared by ``tern-device release`` (which signs, tern/device/release.py) and the gateway's
release store (which refuses a release its nodes would refuse, tern/edge/ota_store.py). The
scheme is hash-based (WOTS w = 16 under a Merkle tree, SHA-256 only), so the node checks it with
``hashlib.sha256`` alone (device_firmware/tern_ota.py); docs/ota.md says why.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

from tern.core.errors import TernError

N = 32
W = 16
L1 = 64
L = 67
SIG_MAGIC = b"TOS1"
KEY_SCHEME = "tern-ota-wots"


class ReleaseError(TernError):
    """A release could not be built, signed or checked; the message says why."""


def _addr(index: int, kind: int, chain: int, step: int) -> bytes:
    # kind 0 = chain step, 1 = one-time public key, 2 = tree node, 3 = message digest.
    return struct.pack(">IBBH", index, kind, chain, step)


def _chain(seed: bytes, leaf: int, chain: int, value: bytes, start: int, steps: int) -> bytes:
    prefix = seed + struct.pack(">IBB", leaf, 0, chain) + b"\x00"
    sha = hashlib.sha256
    for j in range(start, start + steps):
        value = sha(prefix + bytes((j,)) + value).digest()
    return value


def _digits(seed: bytes, root: bytes, leaf: int, msg: bytes) -> list[int]:
    m = hashlib.sha256(seed + _addr(leaf, 3, 0, 0) + root + msg).digest()
    digits = []
    for b in m:
        digits += [b >> 4, b & 15]
    csum = sum(W - 1 - a for a in digits)
    return digits + [(csum >> 8) & 15, (csum >> 4) & 15, csum & 15]


@dataclass(frozen=True)
class VerifyKey:
    """What goes onto every board (``ota.key``): tree height, public seed, Merkle root."""

    height: int
    seed: bytes
    root: bytes

    @property
    def key_id(self) -> str:
        return self.root[:8].hex()

    def text(self) -> str:
        """The one-line file a board keeps (tern_ota.read_key parses it)."""
        return f"{KEY_SCHEME} 1 {self.height} {self.seed.hex()} {self.root.hex()}\n"

    @classmethod
    def parse(cls, text: str) -> "VerifyKey":
        parts = text.split()
        if len(parts) != 5 or parts[:2] != [KEY_SCHEME, "1"]:
            raise ReleaseError("not a Tern verify key (expected 'tern-ota-wots 1 H SEED ROOT')")
        try:
            return cls(int(parts[2]), bytes.fromhex(parts[3]), bytes.fromhex(parts[4]))
        except ValueError:
            raise ReleaseError("verify key: bad height or hex") from None

    @classmethod
    def load(cls, path: Path) -> "VerifyKey":
        try:
            return cls.parse(Path(path).read_text())
        except OSError as exc:
            raise ReleaseError(f"{path}: {exc.strerror}") from None


def verify(message: bytes, signature: bytes, key: VerifyKey) -> bool:
    """The node's check, on the host (tests, ``release verify``)."""
    if len(signature) != 17 + N * (L + key.height) or signature[:4] != SIG_MAGIC or signature[4:12] != key.root[:8]:
        return False
    leaf, height = struct.unpack(">IB", signature[12:17])
    if height != key.height or leaf >> height:
        return False
    msg = hashlib.sha256(message).digest()
    pk = hashlib.sha256(key.seed + _addr(leaf, 1, 0, 0))
    for i, a in enumerate(_digits(key.seed, key.root, leaf, msg)):
        value = signature[17 + N * i:17 + N * (i + 1)]
        pk.update(_chain(key.seed, leaf, i, value, a, W - 1 - a))
    node, idx = pk.digest(), leaf
    for lvl in range(height):
        sib = signature[17 + N * (L + lvl):17 + N * (L + lvl + 1)]
        pair = sib + node if idx & 1 else node + sib
        node = hashlib.sha256(key.seed + _addr(idx >> 1, 2, 0, lvl + 1) + pair).digest()
        idx >>= 1
    return node == key.root
