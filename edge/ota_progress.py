"""Which nodes are downloading which release, and how far: told by the chunk requests the
gateway serves (edge/ota_serve.py), for ``tern-gateway status`` and ``/status.json``.

A node asks for its release one chunk at a time, at the offset its flash has reached, so the
request it makes is its progress: the bytes of every file before the one it asks for, plus the
offset in that one. A node that asked nothing for :data:`STALLED_S` seconds is shown as
stalled; one that asked nothing for :data:`FORGET_S` is forgotten. At most :data:`MAX_NODES`
are kept (the oldest go first).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from tern.edge.ota_store import StoredRelease

#: No request for this long: the download is shown as stalled (a node asks again after 2 s
#: without an answer, and every 30 s once its gateway has not answered 5 in a row).
STALLED_S = 40.0
#: No request for this long: forgotten (it finished, or went away).
FORGET_S = 600.0
MAX_NODES = 256


@dataclass(slots=True)
class Download:
    """One node's download as the gateway last saw it."""

    site: str
    device: str
    version: str
    done: int
    total: int
    chunks: int
    started: float
    last: float


def release_bytes(release: StoredRelease) -> list[int]:
    """The size of each file of ``release`` by transfer index (manifest, signature, files)."""
    sizes = []
    for index in range(len(release.manifest.names())):
        path = release.path(index)
        sizes.append(path.stat().st_size if path is not None and path.exists() else 0)
    return sizes


class DownloadTracker:
    """Progress of the nodes' downloads, from the requests served (thread-safe)."""

    def __init__(self, clock=time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._nodes: dict[tuple[str, str], Download] = {}
        self._sizes: dict[str, list[int]] = {}

    def served(self, site: str, device: str, release: StoredRelease, index: int, offset: int, body: int) -> None:
        """A chunk of ``body`` bytes at (``index``, ``offset``) of ``release`` went to the node."""
        version = release.manifest.version
        now = self._clock()
        with self._lock:
            sizes = self._sizes.get(version)
            if sizes is None:
                sizes = self._sizes[version] = release_bytes(release)
            done = min(sum(sizes[:index]) + offset + body, sum(sizes))
            key = (site, device)
            entry = self._nodes.get(key)
            if entry is None or entry.version != version:
                entry = Download(site, device, version, done, sum(sizes), 0, now, now)
                self._nodes.pop(key, None)
                self._nodes[key] = entry
                while len(self._nodes) > MAX_NODES:
                    self._nodes.pop(next(iter(self._nodes)))
            entry.done, entry.last = done, now
            entry.chunks += 1

    def snapshot(self) -> list[dict]:
        """Every node seen downloading within :data:`FORGET_S`, by site and device: version,
        bytes done and in all, percent, chunks served, seconds since its last request, and
        ``state`` (downloading, stalled, or fetched: every byte served)."""
        now = self._clock()
        with self._lock:
            for key in [k for k, d in self._nodes.items() if now - d.last > FORGET_S]:
                del self._nodes[key]
            entries = sorted(self._nodes.values(), key=lambda d: (d.site, d.device))
            return [
                {
                    "site": d.site, "device": d.device, "version": d.version, "bytes": d.done, "total": d.total,
                    "pct": 100 if d.total == 0 else int(100 * d.done / d.total), "chunks": d.chunks,
                    "seconds": round(d.last - d.started, 1), "idle_s": round(now - d.last, 1),
                    "state": "fetched" if d.done >= d.total else "stalled" if now - d.last > STALLED_S else "downloading",
                }
                for d in entries
            ]
