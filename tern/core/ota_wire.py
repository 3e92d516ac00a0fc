"""Over-the-air releases on the wire: the release bundle (cloud -> gateway) and the chunks
(gateway -> node) with the node's requests for them.

**The bundle.** A whole release in one binary MQTT message on ``tern-gw/<gateway>/release``
(QoS 1, into the gateway's persistent command session), so the metered uplink carries it once
per gateway::

    b"TRB1\\n"
    b"<name> <size>\\n" per file (manifest and manifest.sig first, then the files it lists)
    b"\\n"
    the files' bytes, one after the other, in that order

**Requests and chunks** (the Pi's broker, per node; docs/ota.md). The node publishes on
``tern/<site>/<dev>/fw_get`` an ASCII line ``<version> <index> <offset>``: file index 0 is the
manifest, 1 its signature, 2 + i the manifest's i-th ``file`` line. The gateway answers on
``tern/<site>/<dev>/fw`` with one binary message::

    ">BBHIIH8s" header (22 bytes): magic b"F", kind (0 = data, 1 = error), file index, offset,
        file size, body length, first 8 bytes of SHA-256(body)
    version length (1 byte) and the version (ASCII)
    body: raw file bytes (kind 0, at most the manifest's ``chunk``), or the reason (kind 1, UTF-8)

An offset at or past the end gets a data chunk with an empty body: the node learns the file's
size (so a node that was reset knows whether its manifest is whole).
"""

from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass

from tern.core.errors import CodecError

BUNDLE_MAGIC = b"TRB1\n"
#: A release is firmware of ~35 KB; anything past this is not a release.
MAX_BUNDLE_BYTES = 1 << 20
MAX_MANIFEST = 4096
MAX_FILES = 64
#: Chunks are bounded by what a node's MQTT buffer and heap take (the manifest says 1024).
MAX_CHUNK = 4096
DEFAULT_CHUNK = 1024
MANIFEST = "manifest"
SIGNATURE = "manifest.sig"

CHUNK_HEAD = struct.Struct(">BBHIIH8s")
CHUNK_MAGIC = 0x46  # "F"
DATA, ERROR = 0, 1

_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,39}")
_VERSION = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.+-]{0,31}")


def check_version(version: str) -> str:
    """``version`` if it is a release version (a folder name on the node), else CodecError."""
    if not isinstance(version, str) or not _VERSION.fullmatch(version) or version == "stage":
        raise CodecError(f"invalid release version {version!r:.40}: 1-32 of letters, digits and ._+-")
    return version


@dataclass(frozen=True, slots=True)
class ManifestFile:
    """One file a manifest lists."""

    name: str
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class Manifest:
    """What the gateway needs of a manifest: the version, the chunk size, the files."""

    version: str
    chunk: int
    files: tuple[ManifestFile, ...]

    def names(self) -> list[str]:
        """Every file of the release, by transfer index: manifest, signature, then the listed files."""
        return [MANIFEST, SIGNATURE] + [f.name for f in self.files]


def parse_manifest(raw: bytes) -> Manifest:
    """Parse a manifest (``tern-device release build`` writes it); CodecError says what is wrong."""
    if len(raw) > MAX_MANIFEST:
        raise CodecError(f"manifest of {len(raw)} bytes > {MAX_MANIFEST}")
    try:
        lines = raw.decode("ascii").splitlines()
    except UnicodeDecodeError:
        raise CodecError("manifest: not ASCII text") from None
    if not lines or lines[0] != "tern-release 1":
        raise CodecError("manifest: not a tern-release 1 manifest")
    version, chunk, files = None, DEFAULT_CHUNK, []
    for line in lines[1:]:
        parts = line.split()
        try:
            if parts[:1] == ["version"]:
                version = check_version(parts[1])
            elif parts[:1] == ["chunk"]:
                chunk = int(parts[1])
            elif parts[:1] == ["file"]:
                name, size, digest = parts[1], int(parts[2]), parts[3]
                if not _NAME.fullmatch(name) or name in (MANIFEST, SIGNATURE, "ready") or size < 0 \
                        or not re.fullmatch(r"[0-9a-f]{64}", digest):
                    raise CodecError(f"manifest: bad file line {line!r:.80}")
                files.append(ManifestFile(name, size, digest))
        except (IndexError, ValueError):
            raise CodecError(f"manifest: bad line {line!r:.80}") from None
    if version is None or not files:
        raise CodecError("manifest: no version or no files")
    if len(files) > MAX_FILES or len({f.name for f in files}) != len(files):
        raise CodecError(f"manifest: more than {MAX_FILES} files, or a name twice")
    if not 64 <= chunk <= MAX_CHUNK:
        raise CodecError(f"manifest: chunk {chunk} outside 64..{MAX_CHUNK}")
    return Manifest(version, chunk, tuple(files))


# --- the bundle (cloud -> gateway) -------------------------------------------------------------


def encode_bundle(files: dict[str, bytes]) -> bytes:
    """A release as one message: ``files`` maps name -> bytes (manifest and manifest.sig among them)."""
    order = [MANIFEST, SIGNATURE] + sorted(n for n in files if n not in (MANIFEST, SIGNATURE))
    missing = [n for n in (MANIFEST, SIGNATURE) if n not in files]
    if missing:
        raise CodecError(f"release bundle: no {' and no '.join(missing)} (unsigned releases are not sent)")
    head = BUNDLE_MAGIC + b"".join(f"{n} {len(files[n])}\n".encode() for n in order) + b"\n"
    return head + b"".join(files[n] for n in order)


def decode_bundle(raw: bytes) -> dict[str, bytes]:
    """The files of a bundle, name -> bytes; CodecError if it is not one."""
    if len(raw) > MAX_BUNDLE_BYTES:
        raise CodecError(f"release bundle of {len(raw)} bytes > {MAX_BUNDLE_BYTES}")
    if not raw.startswith(BUNDLE_MAGIC):
        raise CodecError("not a release bundle (no TRB1 header)")
    end = raw.find(b"\n\n", len(BUNDLE_MAGIC) - 1)
    if end < 0:
        raise CodecError("release bundle: the file list does not end")
    files: dict[str, bytes] = {}
    pos = end + 2
    for line in raw[len(BUNDLE_MAGIC):end].split(b"\n"):
        try:
            name, size = line.decode("ascii").split()
            n = int(size)
        except ValueError:
            raise CodecError(f"release bundle: bad file line {line[:80]!r}") from None
        if not _NAME.fullmatch(name) or name in files or n < 0 or pos + n > len(raw) or len(files) > MAX_FILES + 2:
            raise CodecError(f"release bundle: bad or repeated file {name!r:.60}, or cut short")
        files[name] = raw[pos:pos + n]
        pos += n
    if pos != len(raw):
        raise CodecError(f"release bundle: {len(raw) - pos} bytes after the last file")
    return files


# --- requests and chunks (gateway <-> node) ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Want:
    """A node's request: this release's file ``index`` from ``offset`` on."""

    version: str
    index: int
    offset: int


@dataclass(frozen=True, slots=True)
class Chunk:
    """The gateway's answer: file bytes (``error`` empty) or why there are none."""

    version: str
    index: int
    offset: int
    total: int
    body: bytes
    error: str = ""


def encode_want(want: Want) -> bytes:
    """What a node publishes on its fw_get topic (the firmware spells it itself)."""
    return f"{want.version} {want.index} {want.offset}".encode()


def decode_want(raw: bytes) -> Want:
    """Decode a node's request; CodecError for anything else."""
    try:
        version, index, offset = raw[:80].decode("ascii").split()
        want = Want(check_version(version), int(index), int(offset))
    except (UnicodeDecodeError, ValueError):
        raise CodecError(f"not a firmware request: {raw[:60]!r}") from None
    if not 0 <= want.index < MAX_FILES + 2 or not 0 <= want.offset < MAX_BUNDLE_BYTES or len(raw) > 80:
        raise CodecError(f"firmware request out of range: {raw[:60]!r}")
    return want


def encode_chunk(chunk: Chunk) -> bytes:
    """The binary message the gateway answers a request with."""
    kind = ERROR if chunk.error else DATA
    body = chunk.error.encode()[:200] if kind == ERROR else chunk.body
    ver = chunk.version.encode()[:64]
    return CHUNK_HEAD.pack(CHUNK_MAGIC, kind, chunk.index, chunk.offset, chunk.total, len(body),
                           hashlib.sha256(body).digest()[:8]) + bytes((len(ver),)) + ver + body


def decode_chunk(raw: bytes) -> Chunk:
    """Decode (and check) a chunk as the node does; CodecError if it is damaged."""
    if len(raw) < CHUNK_HEAD.size + 1:
        raise CodecError("chunk shorter than its header")
    magic, kind, index, offset, total, length, check = CHUNK_HEAD.unpack_from(raw)
    vlen = raw[CHUNK_HEAD.size]
    start = CHUNK_HEAD.size + 1 + vlen
    body = raw[start:]
    if magic != CHUNK_MAGIC or kind not in (DATA, ERROR) or len(body) != length:
        raise CodecError("not a firmware chunk, or its length is wrong")
    if hashlib.sha256(body).digest()[:8] != check:
        raise CodecError("chunk body does not match its hash")
    version = raw[CHUNK_HEAD.size + 1:start].decode("ascii", "replace")
    if kind == ERROR:
        return Chunk(version, index, offset, total, b"", body.decode("utf-8", "replace") or "error")
    return Chunk(version, index, offset, total, body)
