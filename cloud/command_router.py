"""Commands from Kafka to the gateway that serves each device, at least once.

The router consumes ``tern.commands`` in a consumer group and, for each record in partition
order: decodes it (a malformed record becomes a ``rejected`` outcome with the reason), ends
an expired one as ``expired``, finds the gateway serving the device (the command may name it;
otherwise the device's latest record in the status topic names it) and publishes the command
at QoS 1 on that gateway's command topic of the cloud broker. The gateway holds a persistent
session subscribed to that topic, so the broker's PUBACK means the command is in the
gateway's session. Only then is the Kafka offset committed: a router killed between
consuming and publishing leaves the offset where it was, and the next one publishes again
(the node remembers command ids, so a re-publish is not executed twice).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from tern.cloud.config import BridgeConfig
from tern.core import commands, topics
from tern.core.commands import Command, Outcome
from tern.core.errors import CodecError, ConfigError
from tern.core.quoting import shorten

log = logging.getLogger("tern.bridge.commands")

#: Publish ``payload`` on ``topic`` at QoS 1 and return once the broker acknowledged it.
Publish = Callable[[str, bytes], Awaitable[None]]


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class CommandSettings:
    """Where commands come from and their outcomes go (env ``TERN_KAFKA_COMMANDS_TOPIC``,
    ``TERN_KAFKA_COMMAND_RESULTS_TOPIC``, ``TERN_BRIDGE_COMMAND_GROUP``, ``TERN_BRIDGE_COMMAND_SESSION_TIMEOUT``)."""

    commands_topic: str = topics.KAFKA_COMMANDS
    results_topic: str = topics.KAFKA_COMMAND_RESULTS
    #: Consumer group: bridges sharing it split the commands between them.
    group: str = "tern-bridge-commands"
    #: How long a command for a device no gateway has reported yet waits for the status
    #: topic to name one, before it is rejected.
    route_wait_s: float = 5.0
    #: How long one publish may wait for the cloud broker's PUBACK before it is retried.
    publish_timeout_s: float = 10.0
    #: Consumer-group session timeout: a router that died without leaving the group has its
    #: partitions taken over by the others this long after its last heartbeat.
    session_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.commands_topic == self.results_topic:
            raise ConfigError("results_topic must differ from commands_topic")
        for name in ("route_wait_s", "publish_timeout_s", "session_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name}: must be a positive number of seconds, got {value!r}")

    @classmethod
    def from_config(cls, config: BridgeConfig) -> "CommandSettings":
        """The settings a bridge's config names."""
        return cls(commands_topic=config.commands_topic, results_topic=config.command_results_topic,
                   group=config.command_group, session_timeout_s=config.command_session_timeout_s)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "CommandSettings":
        """Settings from the environment, defaults for what is unset."""
        env = os.environ if env is None else env
        values = {}
        for var, name in (("TERN_KAFKA_COMMANDS_TOPIC", "commands_topic"),
                          ("TERN_KAFKA_COMMAND_RESULTS_TOPIC", "results_topic"),
                          ("TERN_BRIDGE_COMMAND_GROUP", "group")):
            value = env.get(var, "").strip()
            if value:
                values[name] = value
        session = env.get("TERN_BRIDGE_COMMAND_SESSION_TIMEOUT", "").strip()
        if session:
            try:
                values["session_timeout_s"] = float(session)
            except ValueError:
                raise ConfigError(f"TERN_BRIDGE_COMMAND_SESSION_TIMEOUT: expected seconds, got {session!r}") from None
        return cls(**values)


class GatewayDirectory:
    """Which gateway serves which device, from the status topic (latest record wins)."""

    def __init__(self, config: BridgeConfig) -> None:
        self.config = config
        self._gateways: dict[str, str] = {}
        self._changed = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None

    def gateway_of(self, device: str) -> str | None:
        """The gateway that last reported ``device``, or None."""
        return self._gateways.get(device)

    def learn(self, device: str, gateway: str) -> None:
        """Record that ``gateway`` serves ``device`` (also used for a bridge's own batches)."""
        if self._gateways.get(device) != gateway:
            self._gateways[device] = gateway
            self._changed.set()

    async def wait_for(self, device: str, timeout: float) -> str | None:
        """The device's gateway, waiting up to ``timeout`` for the status topic to name one."""
        deadline = time.monotonic() + timeout
        while (gateway := self.gateway_of(device)) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                return self.gateway_of(device)
        return gateway

    async def run(self, stop: asyncio.Event) -> None:
        """Read the status topic from its beginning, then follow it, until ``stop``."""
        cfg = self.config
        consumer = AIOKafkaConsumer(
            cfg.status_topic,
            bootstrap_servers=cfg.kafka_servers,
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            **cfg.kafka_security.aiokafka_options(),
        )
        await consumer.start()
        self._consumer = consumer
        try:
            while not stop.is_set():
                batches = await consumer.getmany(timeout_ms=200, max_records=500)
                for records in batches.values():
                    for record in records:
                        try:
                            value = commands_status(record.value)
                        except CodecError:
                            continue  # not ours to judge: the status topic has its own dead letters
                        self.learn(*value)
        finally:
            await consumer.stop()


def commands_status(raw: bytes) -> tuple[str, str]:
    """(device, gateway) of a status record value."""
    from tern.core.codec import decode_kafka_status_value

    value = decode_kafka_status_value(raw)
    return value["device"], value["gateway"]


class CommandRouter:
    """Consume commands, route each to its gateway, commit only after the broker has it."""

    def __init__(self, config: BridgeConfig, settings: CommandSettings, publish: Publish,
                 directory: GatewayDirectory | None = None) -> None:
        self.config = config
        self.settings = settings
        self.publish = publish
        self.directory = directory or GatewayDirectory(config)
        self.counts = {"commands_routed": 0, "commands_rejected": 0, "commands_expired": 0, "publish_retries": 0}
        self._producer: AIOKafkaProducer | None = None

    async def run(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        """Route commands until ``stop`` is set."""
        cfg, settings = self.config, self.settings
        consumer = AIOKafkaConsumer(
            settings.commands_topic,
            bootstrap_servers=cfg.kafka_servers,
            group_id=settings.group,
            client_id=f"{cfg.client_id}-commands",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            session_timeout_ms=int(settings.session_timeout_s * 1000),
            heartbeat_interval_ms=max(100, int(settings.session_timeout_s * 1000 / 3)),
            **cfg.kafka_security.aiokafka_options(),
        )
        producer = AIOKafkaProducer(bootstrap_servers=cfg.kafka_servers, acks="all",
                                    **cfg.kafka_security.aiokafka_options())
        directory_task = asyncio.create_task(self.directory.run(stop), name="tern-command-directory")
        await producer.start()
        self._producer = producer
        await consumer.start()
        if ready is not None:
            ready.set()
        try:
            while not stop.is_set():
                batches = await consumer.getmany(timeout_ms=200, max_records=50)
                for partition, records in batches.items():
                    for record in records:
                        await self._route(record.key, record.value, stop)
                        if stop.is_set():
                            return  # not committed: the next router takes it again
                        await consumer.commit({partition: record.offset + 1})
        finally:
            directory_task.cancel()
            await asyncio.gather(directory_task, return_exceptions=True)
            await consumer.stop()
            await producer.stop()

    async def _route(self, key: bytes | None, raw: bytes | None, stop: asyncio.Event) -> None:
        raw = raw or b""
        try:
            command = commands.decode_command(raw, key=key)
        except CodecError as exc:
            command_id, device = commands.salvage_identity(raw, key)
            log.warning("command record rejected: %s", shorten(str(exc)))
            self.counts["commands_rejected"] += 1
            await self._outcome(Outcome(command_id, device, commands.REJECTED, detail=str(exc), ms=_now_ms()))
            return
        if command.expired(_now_ms()):
            self.counts["commands_expired"] += 1
            await self._outcome(Outcome(command.id, command.device, commands.EXPIRED, gateway=command.gateway,
                                        detail="expired before the bridge could route it", ms=_now_ms()))
            return
        gateway = command.gateway or await self.directory.wait_for(command.device, self.settings.route_wait_s)
        if gateway is None:
            self.counts["commands_rejected"] += 1
            await self._outcome(Outcome(command.id, command.device, commands.REJECTED,
                                        detail=f"no gateway has reported device {command.device!r}", ms=_now_ms()))
            return
        topic = topics.gateway_command_topic(gateway)
        payload = commands.encode_command(Command(command.id, command.device, command.name, command.args,
                                                  command.expires_ms, gateway))
        delay = 0.5
        while not stop.is_set():
            try:
                await asyncio.wait_for(self.publish(topic, payload), self.settings.publish_timeout_s)
                self.counts["commands_routed"] += 1
                log.info("command %s (%s) for %s routed to gateway %s", command.id, command.name, command.device, gateway)
                return
            except (asyncio.TimeoutError, OSError, RuntimeError) as exc:
                # The broker did not take it: keep the offset and try again, never skip.
                self.counts["publish_retries"] += 1
                log.warning("command %s not accepted by the cloud broker (%s); retrying in %.1f s",
                            command.id, exc or "timeout", delay)
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                except asyncio.TimeoutError:
                    pass
                delay = min(delay * 2, 5.0)

    async def _outcome(self, outcome: Outcome) -> None:
        assert self._producer is not None
        key = outcome.device.encode()
        while True:
            try:
                await self._producer.send_and_wait(self.settings.results_topic, commands.encode_outcome(outcome), key=key)
                return
            except KafkaError as exc:
                log.warning("cannot write command outcome to %s (%s); retrying", self.settings.results_topic, exc)
                await asyncio.sleep(1.0)


def paho_publisher(client: "object", timeout: float = 10.0) -> Publish:
    """A :data:`Publish` over a connected paho client: returns once the broker PUBACKed."""
    import paho.mqtt.client as mqtt

    async def publish(topic: str, payload: bytes) -> None:
        info = client.publish(topic, payload, qos=1)  # type: ignore[attr-defined]
        if info.rc != mqtt.MQTT_ERR_SUCCESS and info.rc != mqtt.MQTT_ERR_NO_CONN:
            raise RuntimeError(mqtt.error_string(info.rc))
        done = await asyncio.to_thread(info.wait_for_publish, timeout)
        if done is False or not info.is_published():
            raise RuntimeError("no PUBACK from the cloud broker")

    return publish
