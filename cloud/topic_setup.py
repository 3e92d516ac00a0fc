"""The bridge's Kafka topics exist before it starts: it creates the missing ones, or says which.

Tern never relies on a broker's auto-creation (production clusters turn it off, and where it is
on it makes topics with the broker's defaults: one partition, maybe one replica). At start the
bridge lists the topics; the missing ones are created with ``topic_partitions``,
``topic_replication`` and ``topic_min_insync`` when ``create_topics`` is on. Otherwise, or when
Kafka refuses, start-up fails with one line naming the topic and the setting to change.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Sequence

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    InvalidPartitionsError,
    InvalidReplicationFactorError,
    KafkaError,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
    for_code,
)

from tern.cloud.config import BridgeConfig
from tern.core.errors import TernError

log = logging.getLogger("tern.bridge.topics")

#: What to change when Kafka refuses to create a topic, by the error it gave.
_HINTS: dict[type, str] = {
    InvalidReplicationFactorError: "set --topic-replication / TERN_KAFKA_TOPIC_REPLICATION to at most the number of brokers",
    InvalidPartitionsError: "set --topic-partitions / TERN_KAFKA_TOPIC_PARTITIONS",
    TopicAuthorizationFailedError: "the bridge's Kafka user may not create topics: create it, then run with --no-create-topics",
    ClusterAuthorizationFailedError: "the bridge's Kafka user may not create topics: create it, then run with --no-create-topics",
}
_DEFAULT_HINT = ("check --topic-replication, --topic-partitions, --topic-min-insync "
                 "(TERN_KAFKA_TOPIC_*), or create it yourself and run with --no-create-topics")


class TopicSetupError(TernError, RuntimeError):
    """A topic the bridge needs is missing and could not be (or may not be) created; one line."""


def bridge_topics(config: BridgeConfig) -> list[str]:
    """Every topic the bridge writes to or reads: readings, status, dead letters; commands too
    when the router is on."""
    names = list(config.kafka_topics)
    if config.commands:
        names += [config.commands_topic, config.command_results_topic]
    return list(dict.fromkeys(names))


async def ensure_topics(config: BridgeConfig, names: Sequence[str] | None = None) -> list[str]:
    """Make sure ``names`` (default: :func:`bridge_topics`) exist; return the ones created.

    Raises TopicSetupError (one line) when one is missing and ``create_topics`` is off, or when
    Kafka refuses to create it; KafkaError/TimeoutError/OSError when Kafka cannot be reached.
    """
    names = list(names if names is not None else bridge_topics(config))
    timeout = config.connect_timeout_s
    admin = AIOKafkaAdminClient(bootstrap_servers=config.kafka_servers, client_id=f"{config.client_id}-admin",
                                request_timeout_ms=config.request_timeout_ms,
                                **config.kafka_security.aiokafka_options())
    await asyncio.wait_for(admin.start(), timeout)
    try:
        existing = set(await asyncio.wait_for(admin.list_topics(), timeout))
        missing = [name for name in names if name not in existing]
        if not missing:
            return []
        if not config.create_topics:
            more = f" (and {len(missing) - 1} more: {', '.join(missing[1:])})" if len(missing) > 1 else ""
            raise TopicSetupError(
                f"Kafka topic {missing[0]!r} does not exist at {config.kafka_bootstrap}{more} and topic creation is "
                "off: create it, or let the bridge create it (--create-topics / TERN_BRIDGE_CREATE_TOPICS=1)")
        replication = config.topic_replication or await _default_replication(admin, timeout)
        configs = {"min.insync.replicas": str(config.topic_min_insync)} if config.topic_min_insync else {}
        request = [NewTopic(name, config.topic_partitions, replication, topic_configs=configs) for name in missing]
        response = await asyncio.wait_for(admin.create_topics(request), timeout)
        created = []
        for entry in response.topic_errors:
            name, code = entry[0], entry[1]
            message = entry[2] if len(entry) > 2 and entry[2] else ""
            error = for_code(code) if code else None
            if error is None:
                created.append(name)
            elif error is not TopicAlreadyExistsError:  # another bridge was quicker: fine
                detail = f"{error.__name__}{': ' + message if message else ''}"
                raise TopicSetupError(
                    f"cannot create Kafka topic {name!r} ({config.topic_partitions} partitions, replication "
                    f"{replication}): {detail}; {_HINTS.get(error, _DEFAULT_HINT)}")
        for name in created:
            log.info("created Kafka topic %s: %d partitions, replication %d%s", name, config.topic_partitions,
                     replication, f", min.insync.replicas {config.topic_min_insync}" if config.topic_min_insync else "")
        return created
    finally:
        await admin.close()


async def _default_replication(admin: AIOKafkaAdminClient, timeout: float) -> int:
    """With ``topic_replication`` unset: one copy per broker, at most three (1 on a lone broker)."""
    try:
        cluster = await asyncio.wait_for(admin.describe_cluster(), timeout)
    except KafkaError:
        return 1
    return max(1, min(3, len(cluster.get("brokers") or [])))
