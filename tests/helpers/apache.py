"""The tests on a real Apache Kafka cluster: their topic names and bridge configs."""

from __future__ import annotations

import uuid

from tern.cloud.config import BridgeConfig


def fresh_names(prefix: str = "ak") -> dict[str, str]:
    """Topic names of one test (readings, status, deadletter), unique to the run."""
    suffix = uuid.uuid4().hex[:8]
    return {role: f"{prefix}.{role}.{suffix}" for role in ("readings", "status", "deadletter")}


def apache_bridge_config(cloud_address: str, bootstrap: str, names: dict[str, str], **extra) -> BridgeConfig:
    """A bridge to the session's Apache Kafka cluster, writing to ``names``."""
    extra.setdefault("name", f"ak{uuid.uuid4().hex[:8]}")
    return BridgeConfig(mqtt_broker=cloud_address, kafka_bootstrap=bootstrap, readings_topic=names["readings"],
                        status_topic=names["status"], deadletter_topic=names["deadletter"],
                        connect_timeout_s=20, **extra)
