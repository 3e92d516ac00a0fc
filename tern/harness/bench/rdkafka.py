"""The librdkafka baseline: a plain ``confluent-kafka`` producer writing the same records.

Issue 27's anchor: the per-record aiokafka baseline is no longer the fastest plain client, so
the bridge and the drain are also reported against librdkafka, the C client most Kafka
producers run on. "Plain" means librdkafka's own defaults (its 5 ms linger, 1 MB batches, its
partitioner) with only what the bridge's contract needs set: ``acks=all`` and no idempotence
(the bridge's producer has none either). Every record is produced with the bridge's key,
headers and value, then ``flush()`` waits for every delivery report; a single failed
delivery fails the round, so a rate is never taken from records Kafka refused.

``confluent-kafka`` is a bench dependency (``pip install -e '.[bench]'``, in ``.[dev]``); a
missing wheel makes the rows visibly skipped instead of failing the run.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from tern.core import codec
from tern.harness.bench.common import BenchError

#: What the baseline sets over librdkafka's defaults (shown with its figure).
SETTINGS: dict[str, Any] = {
    "acks": "all",
    "enable.idempotence": False,
    # Room for a whole round in librdkafka's queue: a BufferError mid-round would time the
    # retry loop, not the client (the default holds 100,000 messages).
    "queue.buffering.max.messages": 1_000_000,
    "queue.buffering.max.kbytes": 1_048_576,
}


def missing() -> str | None:
    """Why the librdkafka baseline cannot run here (None when ``confluent_kafka`` imports)."""
    try:
        import confluent_kafka  # noqa: F401
    except ImportError as exc:
        return f"confluent-kafka not installed ({exc}): pip install -e '.[bench]'"
    return None


def version() -> str:
    """``confluent-kafka X / librdkafka Y`` for the details."""
    import confluent_kafka

    return f"confluent-kafka {confluent_kafka.version()[0]} / librdkafka {confluent_kafka.libversion()[0]}"


def produce_seconds(bootstrap: str, records: Sequence[codec.KafkaRecord], topic: str, deadline_s: float) -> float:
    """Seconds for a plain librdkafka producer (acks=all) to write ``records`` to ``topic``.

    Timed from the first ``produce()`` until ``flush()`` has every delivery report; the
    connection and the topic's metadata are fetched before the clock starts, as the aiokafka
    baseline does. Raises BenchError on a failed delivery or when ``deadline_s`` passes.
    """
    from confluent_kafka import KafkaException, Producer

    failures: list[str] = []

    def delivered(err: Any, msg: Any) -> None:
        # Called from flush()/poll() on this thread: only failures are kept (a list append per
        # record would be part of the timed work).
        if err is not None:
            failures.append(str(err))

    producer = Producer({"bootstrap.servers": bootstrap, "on_delivery": delivered, **SETTINGS})
    try:
        try:
            metadata = producer.list_topics(topic, timeout=min(deadline_s, 30.0))
        except KafkaException as exc:
            raise BenchError(f"librdkafka baseline: no metadata for {topic} at {bootstrap}: {exc}") from None
        if topic not in metadata.topics or metadata.topics[topic].error is not None:
            raise BenchError(f"librdkafka baseline: topic {topic} not usable at {bootstrap}")
        produce = producer.produce
        start = time.perf_counter()
        for r in records:
            try:
                produce(topic, r.value, r.key, headers=list(r.headers))
            except BufferError:
                # Queue full despite SETTINGS (a huge round): let deliveries drain, then go on.
                producer.poll(0.05)
                produce(topic, r.value, r.key, headers=list(r.headers))
        left = producer.flush(deadline_s)
        seconds = time.perf_counter() - start
    finally:
        # Nothing may linger past the round: whatever flush did not deliver is dropped here.
        producer.purge()
        producer.flush(0)
    if left:
        raise BenchError(f"librdkafka baseline: {left} of {len(records)} records undelivered after {deadline_s:.0f} s")
    if failures:
        raise BenchError(f"librdkafka baseline: {len(failures)} of {len(records)} deliveries failed, first: {failures[0]}")
    return seconds
