"""Which Kafka the harness starts: ``TERN_KAFKA=tansu|apache`` (default tansu), read here only.

- ``tansu``: one in-memory Kafka-protocol broker, starts in a second; topics get one replica.
- ``apache``: a 3-node Apache Kafka cluster (:class:`ApacheKafkaCluster`), ~10 s to start;
  topics get replication factor 3 and ``min.insync.replicas`` 2, as in production.

The demo, the test fixtures and the bench lab all call :func:`start_kafka`; ``KAFKA_BOOTSTRAP``
(an external cluster) still wins over both where those callers honour it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from tern.core.errors import ConfigError

KINDS = ("tansu", "apache")
DEFAULT_KIND = "tansu"


class KafkaService(Protocol):
    """A running Kafka the harness started: where it is and how Tern's topics are replicated there."""

    kind: str

    @property
    def bootstrap(self) -> str: ...

    @property
    def replication_factor(self) -> int: ...

    @property
    def min_insync_replicas(self) -> int: ...

    def close(self) -> None: ...


def kafka_kind(env: dict[str, str] | None = None) -> str:
    """``TERN_KAFKA`` (tansu or apache; default tansu); ConfigError in one line otherwise."""
    env = os.environ if env is None else env
    value = env.get("TERN_KAFKA", "").strip().lower() or DEFAULT_KIND
    if value not in KINDS:
        raise ConfigError(f"TERN_KAFKA={value!r}: expected one of {', '.join(KINDS)} (unset: {DEFAULT_KIND})")
    return value


def start_kafka(workdir: Path, kind: str | None = None) -> KafkaService:
    """Start the Kafka of ``kind`` (default: :func:`kafka_kind`) in ``workdir`` and wait until ready.

    The caller closes it (``close()``). Raises ServiceError (with the log tail) if it cannot start.
    """
    kind = kind or kafka_kind()
    if kind not in KINDS:
        raise ConfigError(f"Kafka kind {kind!r}: expected one of {', '.join(KINDS)}")
    if kind == "apache":
        from tern.harness.kafka_cluster import ApacheKafkaCluster

        return ApacheKafkaCluster(Path(workdir) / "apache-kafka").start()
    from tern.harness.stack import Tansu

    return Tansu(Path(workdir) / "tansu").start()
