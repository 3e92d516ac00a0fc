"""The gateway's release store: firmware releases for its nodes, beside the outbox.

A release arrives once per gateway as one bundle (:mod:`tern.core.ota_wire`) and is kept in
``<outbox>.releases/<version>/`` (manifest, manifest.sig and the files it lists), where the
release server (:mod:`tern.edge.ota_serve`) reads the chunks the nodes ask for.

Checked on arrival as a node would check it: the signature against the fleet's verify key
(``ota_key`` in the gateway config), then every file's size and SHA-256 against the signed
manifest. A release that fails is refused whole (nothing is kept). A release is written to a
temporary folder, fsynced, and renamed into place: after a crash the store holds the whole
release or none of it (leftover temporary folders are removed at open). The store keeps the
``ota_keep`` newest releases and deletes older ones.

A release is checked again, once per process, before it is first served: a file damaged on
the SD card since is not handed to nodes (the release is dropped and the gateway says why).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from tern.core import ota_wire
from tern.core.errors import CodecError, TernError
from tern.core.ota_wire import Manifest
from tern.core.release_sig import ReleaseError, VerifyKey, verify

log = logging.getLogger(__name__)


class ReleaseRefused(TernError):
    """A release the gateway will not keep or serve; the message says why."""


@dataclass(frozen=True, slots=True)
class StoredRelease:
    """A release in the store: its folder and parsed manifest."""

    folder: Path
    manifest: Manifest

    def path(self, index: int) -> Path | None:
        """The file with transfer ``index`` (0 manifest, 1 signature, 2+ the listed files)."""
        names = self.manifest.names()
        return self.folder / names[index] if 0 <= index < len(names) else None


def store_dir(outbox_path: str | Path) -> Path:
    """Where a gateway keeps its releases: a folder beside its outbox file."""
    return Path(f"{outbox_path}.releases")


def check_release(files: dict[str, bytes], key: VerifyKey | None) -> Manifest:
    """The manifest of a release whose signature, sizes and hashes are right; ReleaseRefused if not."""
    if key is None:
        raise ReleaseRefused("this gateway has no ota_key (the fleet's verify key): it takes no releases")
    manifest_raw = files.get(ota_wire.MANIFEST)
    signature = files.get(ota_wire.SIGNATURE)
    if manifest_raw is None or signature is None:
        raise ReleaseRefused("no manifest or no manifest.sig")
    if not verify(manifest_raw, signature, key):
        raise ReleaseRefused(f"not signed by the fleet key {key.key_id}")
    try:
        manifest = ota_wire.parse_manifest(manifest_raw)
    except CodecError as exc:
        raise ReleaseRefused(str(exc)) from None
    extra = set(files) - set(manifest.names())
    if extra:
        raise ReleaseRefused(f"files the manifest does not list: {', '.join(sorted(extra))[:120]}")
    for f in manifest.files:
        data = files.get(f.name)
        if data is None:
            raise ReleaseRefused(f"{f.name} missing")
        if len(data) != f.size or hashlib.sha256(data).hexdigest() != f.sha256:
            raise ReleaseRefused(f"{f.name} corrupt ({len(data)} bytes, sha256 differs from the manifest)")
    return manifest


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ReleaseStore:
    """Releases beside the outbox. Thread-safe (one lock)."""

    def __init__(self, folder: str | Path, key_path: str | None, keep: int = 3) -> None:
        self.folder = Path(folder)
        self.keep = keep
        self.key: VerifyKey | None = None
        if key_path:
            try:
                self.key = VerifyKey.load(Path(key_path))
            except ReleaseError as exc:
                raise ReleaseRefused(f"ota_key {key_path}: {exc}") from None
        self._lock = threading.Lock()
        #: Releases checked again since this process started (served from then on).
        self._checked: dict[str, StoredRelease] = {}
        self.folder.mkdir(parents=True, exist_ok=True)
        for leftover in self.folder.glob(".tmp-*"):   # a crash while one was written
            shutil.rmtree(leftover, ignore_errors=True)

    def versions(self) -> list[str]:
        """The stored releases, oldest first."""
        with self._lock:
            return [p.name for p in self._folders()]

    def _folders(self) -> list[Path]:
        found = [p for p in self.folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
        return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name))

    def add(self, files: dict[str, bytes]) -> tuple[str, bool]:
        """Check and store a release; (version, True if new). A release already stored with the
        same manifest is not written again (a redelivered bundle). ReleaseRefused if it fails."""
        manifest = check_release(files, self.key)
        version = manifest.version
        with self._lock:
            final = self.folder / version
            if final.is_dir():
                try:
                    same = (final / ota_wire.MANIFEST).read_bytes() == files[ota_wire.MANIFEST]
                except OSError:
                    same = False
                if same:
                    return version, False
                # Another build under the same version: the newer, signed one replaces it.
                shutil.rmtree(final)
                self._checked.pop(version, None)
            tmp = self.folder / f".tmp-{version}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            for name in manifest.names():
                with open(tmp / name, "wb") as out:
                    out.write(files[name])
                    out.flush()
                    os.fsync(out.fileno())
            _fsync_dir(tmp)
            os.rename(tmp, final)
            _fsync_dir(self.folder)
            for old in self._folders()[:-self.keep]:
                if old.name != version:
                    shutil.rmtree(old, ignore_errors=True)
                    self._checked.pop(old.name, None)
                    log.info("release %s deleted (keeping the newest %d)", old.name, self.keep)
        return version, True

    def get(self, version: str) -> StoredRelease:
        """A stored release, checked again the first time it is asked for; ReleaseRefused if it
        is not here or damaged (a damaged one is deleted: it is not served)."""
        with self._lock:
            hit = self._checked.get(version)
            if hit is not None:
                return hit
            folder = self.folder / version
            if version.startswith(".") or not folder.is_dir():
                raise ReleaseRefused(f"no release {version} on this gateway")
            try:
                files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
                manifest = check_release(files, self.key)
            except (ReleaseRefused, OSError) as exc:
                shutil.rmtree(folder, ignore_errors=True)
                log.error("release %s is damaged on this gateway, deleted (send it again): %s", version, exc)
                raise ReleaseRefused(f"release {version} damaged on the gateway: {exc}"[:200]) from None
            stored = StoredRelease(folder, manifest)
            self._checked[version] = stored
            return stored
