"""The bridge's Kafka producer: writes a group of records and reports all-or-error.

``write`` pipelines: it hands every record to aiokafka (which batches them per partition
with a short linger) and only then waits for the acknowledgements, instead of a round trip
per record. It returns only when Kafka has acknowledged every record (``acks=all``) and
raises :class:`KafkaWriteError` otherwise. A failed write may have stored some of the
records: the caller retries the whole group, so delivery is at-least-once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Iterable, Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from tern.cloud.config import BridgeConfig
from tern.core.codec import KafkaRecord
from tern.core.errors import TernError

log = logging.getLogger("tern.bridge.kafka")


class KafkaWriteError(TernError, RuntimeError):
    """Kafka did not acknowledge every record of a write; the message says why."""


class KafkaSink:
    """An aiokafka producer owned by one asyncio loop (the bridge's)."""

    def __init__(self, config: BridgeConfig) -> None:
        self.config = config
        self._producer: AIOKafkaProducer | None = None
        #: Told (records, seconds, ok) after every write: the metrics' latency histogram.
        self.on_write: Callable[[int, float, bool], None] | None = None

    async def start(self, check_topics: Sequence[str] = ()) -> None:
        """Connect to Kafka and make sure ``check_topics`` exist; raise KafkaWriteError if not."""
        cfg = self.config
        producer = AIOKafkaProducer(
            bootstrap_servers=cfg.kafka_servers,
            client_id=cfg.client_id,
            acks="all",
            enable_idempotence=cfg.enable_idempotence,
            compression_type=cfg.compression,
            linger_ms=cfg.linger_ms,
            max_batch_size=cfg.max_batch_bytes,
            request_timeout_ms=cfg.request_timeout_ms,
            **cfg.kafka_security.aiokafka_options(),
        )
        what = "connect"
        try:
            await asyncio.wait_for(producer.start(), cfg.connect_timeout_s)
            for topic in check_topics:
                # Fails fast on a missing topic (or creates it, where the cluster
                # auto-creates), instead of on the first batch.
                what = f"topic {topic!r}"
                await asyncio.wait_for(producer.partitions_for(topic), cfg.connect_timeout_s)
        except (KafkaError, asyncio.TimeoutError, OSError) as exc:
            await self._close(producer)
            raise KafkaWriteError(f"cannot use Kafka at {cfg.kafka_bootstrap} ({what}): {_describe(exc)}") from None
        self._producer = producer

    async def stop(self, timeout: float = 5.0) -> None:
        """Flush and close the producer, waiting at most ``timeout`` seconds."""
        producer, self._producer = self._producer, None
        if producer is not None:
            await self._close(producer, timeout)

    @staticmethod
    async def _close(producer: AIOKafkaProducer, timeout: float = 5.0) -> None:
        try:
            await asyncio.wait_for(producer.stop(), timeout)
        except (asyncio.TimeoutError, KafkaError, OSError) as exc:
            # Only unacknowledged records are pending here, and the bridge never acked
            # their MQTT messages: the broker redelivers them.
            log.warning("Kafka producer did not close cleanly: %s", _describe(exc))

    async def write(self, records: Iterable[KafkaRecord]) -> None:
        """Write ``records`` and wait until Kafka acknowledges every one of them.

        Raises KafkaWriteError on any failure, after every record handed to the producer
        has settled (so a retry never races records of the failed attempt).
        """
        producer = self._producer
        if producer is None:
            raise KafkaWriteError("Kafka producer is not started")
        futures: list[asyncio.Future] = []
        error: BaseException | None = None
        started = time.monotonic()
        try:
            for record in records:
                futures.append(
                    await producer.send(record.topic, record.value, key=record.key, headers=list(record.headers))
                )
        except (KafkaError, OSError, asyncio.TimeoutError) as exc:
            error = exc
        if futures:
            # A hung broker makes aiokafka fail each batch after request_timeout_ms; the
            # outer deadline is only a safety net against a future that never settles.
            deadline = self.config.request_timeout_ms / 1000 * 2 + 5
            done, pending = await asyncio.wait(futures, timeout=deadline)
            for future in pending:
                future.cancel()
            if pending and error is None:
                error = asyncio.TimeoutError(f"{len(pending)} records unacknowledged after {deadline:.0f} s")
            for future in done:
                exc = future.exception() if not future.cancelled() else asyncio.CancelledError()
                if exc is not None and error is None:
                    error = exc
        if self.on_write is not None:
            self.on_write(len(futures), time.monotonic() - started, error is None)
        if error is not None:
            raise KafkaWriteError(_describe(error))

    async def reachable(self, timeout: float = 5.0) -> bool:
        """True if a Kafka broker answered a metadata request within ``timeout`` seconds."""
        producer = self._producer
        if producer is None:
            return False
        try:
            return bool(await asyncio.wait_for(producer.client.force_metadata_update(), timeout))
        except (asyncio.TimeoutError, KafkaError, OSError):
            return False


def _describe(exc: BaseException) -> str:
    text, name = str(exc), type(exc).__name__
    if not text:
        return name
    return text if text.startswith(name) else f"{name}: {text}"
