"""The release server: answers the nodes' chunk requests from the release store.

A node publishes ``<version> <index> <offset>`` on ``tern/<site>/<dev>/fw_get``; the ingest's
local session hands the request here, and a worker thread answers on ``tern/<site>/<dev>/fw``
with one binary chunk (:mod:`tern.core.ota_wire`), read from the store's file at that offset.
The node asks for one chunk at a time and asks again when none comes, so requests and chunks
are QoS 0 and the queue is bounded: a request dropped when it is full is asked again.

**Paced.** At most ``chunks_per_s`` chunks a second leave (``ota_chunks_per_s``, a token bucket
holding one second's worth), so a wave of nodes updating together cannot swamp the Pi's broker
or the ingest's session the chunks share with the readings. Waiting requests are kept one per
node, the latest (a node that asked again while it waited wants the same chunk), and answered
in the order the nodes first asked: each node gets its turn.

Readings are untouched by this: chunks go only over the Pi's broker, and the store is read,
not the outbox.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Callable

import paho.mqtt.client as mqtt

from tern.core import ota_wire, topics
from tern.core.errors import CodecError
from tern.core.ota_wire import Chunk
from tern.core.quoting import describe, quote
from tern.edge.ota_progress import DownloadTracker
from tern.edge.ota_store import ReleaseRefused, ReleaseStore

log = logging.getLogger(__name__)

#: Nodes whose request waits at most; beyond, a request is dropped (the node asks again within seconds).
QUEUE_MAX = 256
#: Chunks a second when the config does not say (``ota_chunks_per_s``): about 50 KB/s of
#: QoS 0 messages on the Pi's broker, a small part of what a Pi's mosquitto and the ingest
#: take, and a 40 KB release to 10 nodes in about 10 s.
DEFAULT_CHUNKS_PER_S = 50


class ReleaseServer:
    """Serves chunks of stored releases to the nodes that ask for them."""

    def __init__(self, store: ReleaseStore, publish: Callable[[str, bytes], object],
                 chunks_per_s: float = DEFAULT_CHUNKS_PER_S) -> None:
        if chunks_per_s <= 0:
            raise ValueError(f"chunks_per_s must be > 0, not {chunks_per_s}")
        self.store = store
        self.chunks_per_s = chunks_per_s
        self.downloads = DownloadTracker()
        self._publish = publish
        # Waiting requests, one per node topic (the latest), oldest node first.
        self._waiting: OrderedDict[str, bytes] = OrderedDict()
        self._ready = threading.Condition()
        self._tokens = max(1.0, chunks_per_s)
        self._refilled = time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._counts = {"ota_requests": 0, "ota_chunks": 0, "ota_chunk_bytes": 0, "ota_errors": 0,
                        "ota_requests_dropped": 0, "ota_requests_merged": 0, "ota_bad_requests": 0,
                        "ota_paced_s": 0.0}
        self._worker = threading.Thread(target=self._run, name="tern-ota-serve", daemon=True)

    def start(self) -> None:
        """Start the worker."""
        self._worker.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the worker (requests still queued are not answered: the nodes ask again)."""
        self._stop.set()
        with self._ready:
            self._ready.notify_all()
        if self._worker.is_alive():
            self._worker.join(timeout)

    def stats(self) -> dict:
        """Counters since start."""
        with self._lock:
            return dict(self._counts)

    def _count(self, name: str, n: float = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def on_request(self, msg: mqtt.MQTTMessage) -> None:
        """The ingest's hook for a message on a node's fw_get topic (paho's thread: queue only)."""
        with self._ready:
            if msg.topic in self._waiting:
                self._waiting[msg.topic] = bytes(msg.payload)   # keeps its place in the line
                merged = True
            elif len(self._waiting) >= QUEUE_MAX:
                self._count("ota_requests_dropped")
                return
            else:
                self._waiting[msg.topic] = bytes(msg.payload)
                merged = False
            self._ready.notify()
        if merged:
            self._count("ota_requests_merged")

    def _next(self) -> tuple[str, bytes] | None:
        with self._ready:
            if not self._waiting:
                self._ready.wait(0.2)
            if not self._waiting:
                return None
            return self._waiting.popitem(last=False)

    def _pace(self) -> None:
        """Wait for a token of the bucket (one second's worth at most)."""
        now = time.monotonic()
        self._tokens = min(max(1.0, self.chunks_per_s), self._tokens + (now - self._refilled) * self.chunks_per_s)
        self._refilled = now
        if self._tokens < 1.0:
            wait = (1.0 - self._tokens) / self.chunks_per_s
            self._stop.wait(wait)
            self._count("ota_paced_s", wait)
            self._tokens, self._refilled = 1.0, time.monotonic()
        self._tokens -= 1.0

    def _run(self) -> None:
        while not self._stop.is_set():
            request = self._next()
            if request is None:
                continue
            self._pace()
            if self._stop.is_set():
                return
            try:
                self.answer(*request)
            except Exception:  # one bad request must not end serving
                log.exception("answering a firmware request on %s failed", quote(request[0]))

    def answer(self, topic: str, payload: bytes) -> None:
        """Answer one request: a chunk of the file asked for, or an error chunk saying why not."""
        try:
            where = topics.parse_node_topic(topic)
            want = ota_wire.decode_want(payload)
        except CodecError as exc:
            self._count("ota_bad_requests")
            log.warning("bad firmware request on %s: %s", quote(topic), describe(exc, 200))
            return
        self._count("ota_requests")
        reply_to = topics.fw_topic(where.site, where.device)
        try:
            release = self.store.get(want.version)
            path = release.path(want.index)
            if path is None:
                raise ReleaseRefused(f"release {want.version} has no file {want.index}")
            with open(path, "rb") as f:
                total = f.seek(0, 2)
                f.seek(min(want.offset, total))
                body = f.read(release.manifest.chunk) if want.offset < total else b""
        except (ReleaseRefused, OSError) as exc:
            self._count("ota_errors")
            why = str(exc) if isinstance(exc, ReleaseRefused) else f"cannot read the release: {exc}"
            log.warning("firmware request of %s for %s: %s", where.device, want.version, why)
            self._publish(reply_to, ota_wire.encode_chunk(Chunk(want.version, want.index, want.offset, 0, b"", why)))
            return
        self._publish(reply_to, ota_wire.encode_chunk(Chunk(want.version, want.index, want.offset, total, body)))
        self._count("ota_chunks")
        self._count("ota_chunk_bytes", len(body))
        self.downloads.served(where.site, where.device, release, want.index, want.offset, len(body))
