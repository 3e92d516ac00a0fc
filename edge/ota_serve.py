"""The release server: answers the nodes' chunk requests from the release store.

A node publishes ``<version> <index> <offset>`` on ``tern/<site>/<dev>/fw_get``; the ingest's
local session hands the request here, and a worker thread answers on ``tern/<site>/<dev>/fw``
with one binary chunk (:mod:`tern.core.ota_wire`), read from the store's file at that offset.
The node asks for one chunk at a time and asks again when none comes, so requests and chunks
are QoS 0 and the queue is bounded: a request dropped when it is full is asked again.

Readings are untouched by this: chunks go only over the Pi's broker, and the store is read,
not the outbox.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable

import paho.mqtt.client as mqtt

from tern.core import ota_wire, topics
from tern.core.errors import CodecError
from tern.core.ota_wire import Chunk
from tern.core.quoting import describe, quote
from tern.edge.ota_store import ReleaseRefused, ReleaseStore

log = logging.getLogger(__name__)

#: Requests waiting at most; beyond, a request is dropped (the node asks again within seconds).
QUEUE_MAX = 256


class ReleaseServer:
    """Serves chunks of stored releases to the nodes that ask for them."""

    def __init__(self, store: ReleaseStore, publish: Callable[[str, bytes], object]) -> None:
        self.store = store
        self._publish = publish
        self._queue: queue.Queue[tuple[str, bytes]] = queue.Queue(QUEUE_MAX)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._counts = {"ota_requests": 0, "ota_chunks": 0, "ota_chunk_bytes": 0, "ota_errors": 0,
                        "ota_requests_dropped": 0, "ota_bad_requests": 0}
        self._worker = threading.Thread(target=self._run, name="tern-ota-serve", daemon=True)

    def start(self) -> None:
        """Start the worker."""
        self._worker.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the worker (requests still queued are not answered: the nodes ask again)."""
        self._stop.set()
        if self._worker.is_alive():
            self._worker.join(timeout)

    def stats(self) -> dict:
        """Counters since start."""
        with self._lock:
            return dict(self._counts)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def on_request(self, msg: mqtt.MQTTMessage) -> None:
        """The ingest's hook for a message on a node's fw_get topic (paho's thread: queue only)."""
        try:
            self._queue.put_nowait((msg.topic, bytes(msg.payload)))
        except queue.Full:
            self._count("ota_requests_dropped")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                topic, payload = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self.answer(topic, payload)
            except Exception:  # one bad request must not end serving
                log.exception("answering a firmware request on %s failed", quote(topic))

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
