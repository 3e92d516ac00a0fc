"""The bridge's configuration: one dataclass, validated on construction.

Every value has a default that works on one machine; ``BridgeConfig.from_env`` reads the
deployment's environment (``TERN_CLOUD_BROKER``, ``KAFKA_BOOTSTRAP``, ``TERN_KAFKA_TOPIC``,
``TERN_KAFKA_STATUS_TOPIC``, ``TERN_KAFKA_DEADLETTER``, ``TERN_BRIDGE_NAME``, ``TERN_BRIDGE_METRICS_PORT``,
``TERN_BRIDGE_METRICS_HOST``, ``TERN_BRIDGE_SHARE_GROUP``, ``TERN_BRIDGE_MAX_INFLIGHT_RECORDS``,
``TERN_BRIDGE_DEDUP_WINDOW``, ``TERN_BRIDGE_CREATE_TOPICS``, ``TERN_KAFKA_TOPIC_PARTITIONS``,
``TERN_KAFKA_TOPIC_REPLICATION``, ``TERN_KAFKA_TOPIC_MIN_INSYNC``, ``TERN_BRIDGE_COMMAND_SESSION_TIMEOUT``, ...). Wrong values raise
:class:`tern.core.errors.ConfigError` naming the field and what is wrong with it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from tern.core import topics
from tern.core.errors import CodecError, ConfigError
from tern.core.hostport import parse_hostport
from tern.cloud.kafka_security import KafkaSecurity
from tern.security.secret_files import exposure_warning
from tern.security.tls import client_context

DEFAULT_MQTT_PORT = 1883
DEFAULT_KAFKA_PORT = 9092

# Kafka's own rule for topic names (kafka.common.internals.Topic).
_KAFKA_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_COMPRESSION = (None, "gzip", "snappy", "lz4", "zstd")
#: The PyPI package aiokafka needs for each codec (gzip is in the standard library).
_COMPRESSION_PACKAGE = {"gzip": "", "snappy": "cramjam", "lz4": "cramjam", "zstd": "cramjam"}


def _read_secret(path: str, where: str) -> str:
    warning = exposure_warning(Path(path))
    if warning:
        print(warning)
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc.strerror}") from None


def _compression_available(name: str) -> bool:
    """True if aiokafka can load the library for compression ``name``."""
    from aiokafka import codec

    return bool(getattr(codec, f"has_{name}")())


def _flag(value: str, where: str) -> bool:
    """'1/0', 'true/false', 'yes/no', 'on/off' -> bool; ConfigError naming ``where`` otherwise."""
    text = value.strip().lower()
    if text not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
        raise ConfigError(f"{where}: expected 1/0 or true/false, got {value!r}")
    return text in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class BridgeConfig:
    """Everything one bridge instance needs.

    ``enable_idempotence`` is False by default only because Tansu (the test and demo broker)
    rejects idempotent producers; against real Apache Kafka turn it on (``--idempotence``),
    so that the producer's own retries can neither duplicate nor reorder records within a
    partition. The bridge is at-least-once either way: a batch whose Kafka write failed part
    way is written again in full.
    """

    #: Instance name; the MQTT client id is ``tern-bridge-<name>``. Keep it stable: the
    #: broker holds this id's persistent session (and the unacknowledged batches in it).
    name: str = "main"
    #: Cloud MQTT broker, ``host:port``.
    mqtt_broker: str = f"127.0.0.1:{DEFAULT_MQTT_PORT}"
    #: Kafka bootstrap servers, ``host:port[,host:port...]``.
    kafka_bootstrap: str = f"127.0.0.1:{DEFAULT_KAFKA_PORT}"
    readings_topic: str = topics.KAFKA_READINGS
    #: Node status events (birth / last will), keyed by device like the readings.
    status_topic: str = topics.KAFKA_STATUS
    deadletter_topic: str = topics.KAFKA_DEADLETTER
    enable_idempotence: bool = False
    #: None, gzip, snappy, lz4 or zstd (the last three need their Python library).
    compression: str | None = None
    #: 0 by default: the bridge hands over a whole MQTT batch at once and then waits for
    #: its acks, so a linger only adds its length to every batch (measured: 5 ms halves
    #: throughput, 0 -> ~25k readings/s on Tansu). aiokafka still packs records that queue
    #: up while a request is in flight into one Kafka batch.
    linger_ms: int = 0
    max_batch_bytes: int = 256 * 1024
    #: A poison payload larger than this is dead-lettered truncated (headers say so and
    #: carry the original size and SHA-256): Kafka's default record limit is ~1 MiB, and a
    #: record Kafka refuses would block the bridge forever.
    deadletter_max_bytes: int = 900_000
    #: Bounds one Kafka request and one record's delivery; a hung (blackholed) Kafka is
    #: noticed after this long and the batch is retried.
    request_timeout_ms: int = 15_000
    #: Backoff between attempts at the same batch: doubles from initial to max.
    retry_initial_s: float = 1.0
    retry_max_s: float = 30.0
    #: How long start-up may take to reach MQTT and Kafka before it gives up.
    connect_timeout_s: float = 15.0
    mqtt_keepalive_s: int = 30
    mqtt_username: str | None = None
    mqtt_password: str | None = field(default=None, repr=False)

    # --- security (docs/security.md) ---
    #: CA of the cloud broker's certificate: TLS to the broker (also on with ``mqtt_tls``).
    mqtt_ca: str | None = None
    #: The bridge's client certificate and key, when the broker wants one.
    mqtt_cert: str | None = None
    mqtt_key: str | None = None
    mqtt_tls: bool = False
    #: Kafka TLS and SASL (``TERN_KAFKA_*`` variables or the config file's [kafka] table).
    kafka_security: KafkaSecurity = field(default_factory=KafkaSecurity)
    #: When set, batches from any other gateway are dead-lettered (reason ``gateway not allowed``).
    allowed_gateways: tuple[str, ...] | None = None

    # --- operations (cloud/metrics.py) ---
    #: Port of the Prometheus /metrics and /healthz endpoint; 0 = off.
    metrics_port: int = 0
    #: Address it listens on: loopback by default; 0.0.0.0 in a container that is scraped.
    metrics_host: str = "127.0.0.1"
    # --- throughput and scale-out ---
    #: Readings (Kafka records) being written at once, over all the batches in flight; a
    #: batch larger than this is still taken, alone.
    max_inflight_records: int = 20_000
    #: Batches remembered by (gateway, bseq, payload digest) once written, so a re-sent copy
    #: is confirmed again without writing it twice (least recently seen forgotten first).
    dedup_window: int = 10_000
    #: When set, subscribe as ``$share/<group>/tern-gw/+/batch``: every bridge of the group
    #: (each with its own ``name``) takes a share of the gateways' batches.
    share_group: str | None = None

    # --- the bridge's topics (cloud/topic_setup.py) ---
    #: Create missing topics at start (never left to a broker's auto-creation); when off, a
    #: missing topic stops the start with one line naming it.
    create_topics: bool = True
    #: Partitions of a topic the bridge creates.
    topic_partitions: int = 6
    #: Replicas of a topic the bridge creates; None: one per broker, at most 3 (1 on one broker).
    topic_replication: int | None = None
    #: ``min.insync.replicas`` of a topic the bridge creates; None: the broker's default.
    topic_min_insync: int | None = None

    # --- commands to nodes (cloud/command_router.py) ---
    #: Route commands from ``commands_topic`` to the gateways (off by default in the library;
    #: ``tern-bridge run`` turns it on unless ``--no-commands``).
    commands: bool = False
    commands_topic: str = topics.KAFKA_COMMANDS
    command_results_topic: str = topics.KAFKA_COMMAND_RESULTS
    #: Consumer group of the command router: bridges sharing it split the commands.
    command_group: str = "tern-bridge-commands"
    #: The router's consumer-group session timeout: a bridge that dies without leaving the
    #: group (SIGKILL, power cut) has its command partitions handed to the others this long
    #: after its last heartbeat (heartbeats every third of it). Kafka accepts 6-1800 s by
    #: default (``group.min/max.session.timeout.ms``); shorter means faster takeover but a
    #: bridge stalled that long (a GC pause, an overloaded host) loses its partitions.
    command_session_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        try:
            topics.check_id(self.name, "bridge name")
        except CodecError as exc:
            raise ConfigError(f"name: {exc}") from None
        self.mqtt_address  # validates
        self.kafka_servers  # validates
        for field_name in self.TOPIC_FIELDS:
            value = getattr(self, field_name)
            if not isinstance(value, str) or not _KAFKA_TOPIC.match(value) or value in (".", ".."):
                raise ConfigError(f"{field_name}: {value!r} is not a valid Kafka topic name ([A-Za-z0-9._-], 1-249)")
        if self.readings_topic == self.deadletter_topic:
            raise ConfigError("deadletter_topic must differ from readings_topic")
        # Each topic has one schema: a consumer of one must never meet the other's records.
        if self.status_topic in (self.readings_topic, self.deadletter_topic):
            raise ConfigError("status_topic must differ from readings_topic and deadletter_topic")
        if self.compression not in _COMPRESSION:
            raise ConfigError(f"compression: {self.compression!r} is not one of {_COMPRESSION}")
        if self.compression is not None and not _compression_available(self.compression):
            raise ConfigError(
                f"compression: {self.compression} needs its Python library, which is not installed "
                f"(pip install {_COMPRESSION_PACKAGE[self.compression]}); gzip needs nothing"
            )
        for field_name, low in (("linger_ms", 0), ("max_batch_bytes", 1024), ("deadletter_max_bytes", 1024), ("request_timeout_ms", 100), ("mqtt_keepalive_s", 5)):
            value = getattr(self, field_name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{field_name}: must be an integer >= {low}, got {value!r}")
        if isinstance(self.command_session_timeout_s, str):
            try:
                object.__setattr__(self, "command_session_timeout_s", float(self.command_session_timeout_s))
            except ValueError:
                pass  # reported below
        for field_name in ("retry_initial_s", "retry_max_s", "connect_timeout_s", "command_session_timeout_s"):
            value = getattr(self, field_name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ConfigError(f"{field_name}: must be a positive number of seconds, got {value!r}")
        if self.retry_max_s < self.retry_initial_s:
            raise ConfigError("retry_max_s must be >= retry_initial_s")
        if isinstance(self.metrics_port, str) and self.metrics_port.strip().isdigit():
            object.__setattr__(self, "metrics_port", int(self.metrics_port))  # from the environment
        if not isinstance(self.metrics_port, int) or isinstance(self.metrics_port, bool) or not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port: must be a port number 0-65535 (0: off), got {self.metrics_port!r}")
        if not isinstance(self.metrics_host, str) or not self.metrics_host.strip():
            raise ConfigError(f"metrics_host: must be a host name or address, got {self.metrics_host!r}")
        if (self.mqtt_cert is None) != (self.mqtt_key is None):
            raise ConfigError("mqtt_cert and mqtt_key: give both or neither")
        if self.allowed_gateways is not None:
            if isinstance(self.allowed_gateways, str):
                object.__setattr__(self, "allowed_gateways",
                                   tuple(g.strip() for g in self.allowed_gateways.split(",") if g.strip()))
            for gateway in self.allowed_gateways:
                try:
                    topics.check_id(gateway, "gateway")
                except CodecError as exc:
                    raise ConfigError(f"allowed_gateways: {exc}") from None
        for field_name, low in (("max_inflight_records", 1), ("dedup_window", 0)):
            value = getattr(self, field_name)
            if isinstance(value, str) and value.strip().isdigit():
                value = int(value)  # from the environment
                object.__setattr__(self, field_name, value)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{field_name}: must be an integer >= {low}, got {value!r}")
        self._check_topic_settings()
        if self.share_group is not None:
            try:
                topics.check_share_group(self.share_group)
            except CodecError as exc:
                raise ConfigError(f"share_group: {exc}") from None

    def _check_topic_settings(self) -> None:
        if isinstance(self.create_topics, str):
            object.__setattr__(self, "create_topics", _flag(self.create_topics, "create_topics"))
        if not isinstance(self.create_topics, bool):
            raise ConfigError(f"create_topics: expected true or false, got {self.create_topics!r}")
        for field_name, optional in (("topic_partitions", False), ("topic_replication", True),
                                     ("topic_min_insync", True)):
            value = getattr(self, field_name)
            if isinstance(value, str) and value.strip().isdigit():
                value = int(value)  # from the environment
                object.__setattr__(self, field_name, value)
            if value is None and optional:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{field_name}: must be an integer >= 1{' (or unset)' if optional else ''}, got {value!r}")
        if self.topic_replication and self.topic_min_insync and self.topic_min_insync > self.topic_replication:
            raise ConfigError(f"topic_min_insync ({self.topic_min_insync}) must not exceed topic_replication "
                              f"({self.topic_replication}): no write could ever succeed")

    #: The Kafka topics the bridge writes to (validated alike, checked at start-up).
    TOPIC_FIELDS = ("readings_topic", "status_topic", "deadletter_topic")

    @property
    def kafka_topics(self) -> tuple[str, ...]:
        """Every Kafka topic this bridge writes to."""
        return tuple(getattr(self, name) for name in self.TOPIC_FIELDS)

    @property
    def batch_filter(self) -> str:
        """The subscription the bridge takes gateways' batches on (shared with ``share_group``)."""
        if self.share_group:
            return topics.shared_filter(self.share_group, topics.BATCH_FILTER)
        return topics.BATCH_FILTER

    @property
    def client_id(self) -> str:
        """The MQTT client id: stable per name, so the broker keeps this bridge's session."""
        return f"tern-bridge-{self.name}"

    @property
    def mqtt_address(self) -> tuple[str, int]:
        """(host, port) of the MQTT broker."""
        try:
            return parse_hostport(self.mqtt_broker, DEFAULT_MQTT_PORT)
        except (ConfigError, TypeError, AttributeError):
            raise ConfigError(f"mqtt_broker: expected HOST:PORT, got {self.mqtt_broker!r}") from None

    @property
    def kafka_servers(self) -> list[str]:
        """The bootstrap servers as a list of ``host:port``."""
        if not isinstance(self.kafka_bootstrap, str) or not self.kafka_bootstrap.strip():
            raise ConfigError(f"kafka_bootstrap: expected HOST:PORT[,HOST:PORT...], got {self.kafka_bootstrap!r}")
        servers = []
        for part in self.kafka_bootstrap.split(","):
            try:
                host, port = parse_hostport(part.strip(), DEFAULT_KAFKA_PORT)
            except ConfigError:
                raise ConfigError(f"kafka_bootstrap: expected HOST:PORT[,HOST:PORT...], got {self.kafka_bootstrap!r}") from None
            servers.append(f"{host}:{port}")
        return servers

    def mqtt_auth(self) -> dict[str, Any]:
        """Session keyword arguments (username, password, tls) for the cloud broker."""
        auth: dict[str, Any] = {"username": self.mqtt_username, "password": self.mqtt_password}
        if self.mqtt_tls or self.mqtt_ca or self.mqtt_cert:
            auth["tls"] = client_context(self.mqtt_ca, self.mqtt_cert, self.mqtt_key, what="cloud broker")
        return auth

    def secrets(self) -> list[str]:
        """Every secret value in this config, for the log filter."""
        return [s for s in (self.mqtt_password, self.kafka_security.sasl_password) if s]

    def with_(self, **changes: Any) -> "BridgeConfig":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> "BridgeConfig":
        """Build a config from the environment; explicit ``overrides`` (not None) win."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for var, field_name in (
            ("TERN_CLOUD_BROKER", "mqtt_broker"),
            ("KAFKA_BOOTSTRAP", "kafka_bootstrap"),
            ("TERN_KAFKA_TOPIC", "readings_topic"),
            ("TERN_KAFKA_STATUS_TOPIC", "status_topic"),
            ("TERN_KAFKA_DEADLETTER", "deadletter_topic"),
            ("TERN_BRIDGE_NAME", "name"),
            ("TERN_BRIDGE_MQTT_USERNAME", "mqtt_username"),
            ("TERN_BRIDGE_MQTT_CA", "mqtt_ca"),
            ("TERN_BRIDGE_MQTT_CERT", "mqtt_cert"),
            ("TERN_BRIDGE_MQTT_KEY", "mqtt_key"),
            ("TERN_BRIDGE_ALLOWED_GATEWAYS", "allowed_gateways"),
            ("TERN_BRIDGE_SHARE_GROUP", "share_group"),
            ("TERN_KAFKA_COMMANDS_TOPIC", "commands_topic"),
            ("TERN_KAFKA_COMMAND_RESULTS_TOPIC", "command_results_topic"),
            ("TERN_BRIDGE_COMMAND_GROUP", "command_group"),
        ):
            value = env.get(var, "").strip()
            if value:
                values[field_name] = value
        password_file = env.get("TERN_BRIDGE_MQTT_PASSWORD_FILE", "").strip()
        if password_file:
            values["mqtt_password"] = _read_secret(password_file, "TERN_BRIDGE_MQTT_PASSWORD_FILE")
        if any(name.startswith("TERN_KAFKA_S") or name in ("TERN_KAFKA_CA", "TERN_KAFKA_CERT", "TERN_KAFKA_KEY")
               for name in env):
            values["kafka_security"] = KafkaSecurity.from_env(env)
        for var, field_name in (("TERN_BRIDGE_METRICS_PORT", "metrics_port"), ("TERN_BRIDGE_METRICS_HOST", "metrics_host"),
                                ("TERN_BRIDGE_MAX_INFLIGHT_RECORDS", "max_inflight_records"),
                                ("TERN_BRIDGE_DEDUP_WINDOW", "dedup_window"),
                                ("TERN_BRIDGE_CREATE_TOPICS", "create_topics"),
                                ("TERN_KAFKA_TOPIC_PARTITIONS", "topic_partitions"),
                                ("TERN_KAFKA_TOPIC_REPLICATION", "topic_replication"),
                                ("TERN_KAFKA_TOPIC_MIN_INSYNC", "topic_min_insync"),
                                ("TERN_BRIDGE_COMMAND_SESSION_TIMEOUT", "command_session_timeout_s")):
            value = env.get(var, "").strip()
            if value:
                values[field_name] = value
        commands = env.get("TERN_BRIDGE_COMMANDS", "").strip().lower()
        if commands:
            values["commands"] = _flag(commands, "TERN_BRIDGE_COMMANDS")
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise ConfigError(f"unknown bridge setting(s): {', '.join(sorted(unknown))}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
