"""Commands, cloud half: the command codec, and the bridge's router from Kafka to a gateway's
session on a real mosquitto, with outcomes read back from a real Kafka-protocol broker."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from typing import Iterator

import paho.mqtt.client as mqtt
import pytest
from aiokafka import AIOKafkaConsumer
from paho.mqtt.enums import CallbackAPIVersion

from tern.cloud.command_router import CommandRouter, CommandSettings, paho_publisher
from tern.cloud.config import BridgeConfig
from tern.core import codec, commands, topics
from tern.core.commands import Command
from tern.core.errors import CodecError
from tern.harness.stack import Mosquitto

from helpers import committed, produce, wait_until


# --- codec -------------------------------------------------------------------------------


def test_command_round_trip_and_key_check() -> None:
    command = Command("c-1", "dev-a", "set_interval", {"s": 10}, expires_ms=123, gateway="gw-1")
    raw = commands.encode_command(command)
    assert commands.decode_command(raw, key=b"dev-a") == command
    with pytest.raises(CodecError, match="record key"):
        commands.decode_command(raw, key=b"dev-b")


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\xffnope", "not JSON"),
        (b"[]", "JSON object"),
        (b'{"schema": "tern.command/9"}', "unknown schema"),
        (json.dumps({"schema": "tern.command/1", "id": "c", "device": "dev/a", "name": "ping"}).encode(), "invalid device"),
        (json.dumps({"schema": "tern.command/1", "id": "c", "device": "d", "name": "Ping!"}).encode(), "invalid command name"),
        (json.dumps({"schema": "tern.command/1", "id": "c", "device": "d", "name": "set", "args": {"k": [1]}}).encode(), "number, boolean"),
        (json.dumps({"schema": "tern.command/1", "id": "c", "device": "d", "name": "set", "extra": 1}).encode(), "unknown field"),
        (b"{" + b" " * 5000 + b"}", "over the"),
    ],
)
def test_malformed_commands_are_refused_with_a_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(CodecError, match=reason):
        commands.decode_command(raw)


def test_outcome_and_node_reply() -> None:
    outcome = commands.Outcome("c-1", "dev-a", commands.DONE, gateway="gw", reply={"interval_s": 10}, ms=5)
    assert commands.decode_outcome(commands.encode_outcome(outcome)) == outcome
    reply = commands.decode_node_reply(b'{"v":1,"dev":"dev-a","id":"c-1","ok":false,"error":"unknown command"}',
                                       topic_device="dev-a")
    assert (reply.ok, reply.error) == (False, "unknown command")
    with pytest.raises(CodecError, match="replied on the topic"):
        commands.decode_node_reply(b'{"v":1,"dev":"dev-b","id":"c-1","ok":true}', topic_device="dev-a")


def test_the_schema_files_match_the_codec() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    from importlib import resources

    schemas = resources.files("tern.core") / "schemas"
    command_schema = json.loads((schemas / "kafka-command.schema.json").read_text())
    result_schema = json.loads((schemas / "kafka-command-result.schema.json").read_text())
    raw = commands.encode_command(Command("c-1", "dev-a", "ping", {}, expires_ms=1, gateway="gw-1"))
    jsonschema.validate(json.loads(raw), command_schema)
    raw = commands.encode_outcome(commands.Outcome("c-1", "dev-a", commands.REJECTED, detail="why", ms=1))
    jsonschema.validate(json.loads(raw), result_schema)


# --- router against real brokers --------------------------------------------------------


class GatewayCommandSession:
    """The gateway's side on the cloud broker: a persistent session on its command topic."""

    def __init__(self, broker: Mosquitto, gateway: str) -> None:
        self.received: list[Command] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"gw-cmd-{gateway}", clean_session=False)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topics.gateway_command_topic(gateway), qos=1)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert self._subscribed.wait(10)

    def _on_message(self, client, userdata, message) -> None:
        with self._lock:
            self.received.append(commands.decode_command(message.payload))

    def commands(self) -> list[Command]:
        with self._lock:
            return list(self.received)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class RouterThread:
    """The router on its own asyncio loop, publishing through a paho client."""

    def __init__(self, config: BridgeConfig, settings: CommandSettings, broker: Mosquitto) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"router-{uuid.uuid4().hex[:6]}")
        self.client.reconnect_delay_set(0.2, 1)
        self.client.connect_async(broker.host, broker.port)
        self.client.loop_start()
        self.router = CommandRouter(config, settings, paho_publisher(self.client, timeout=2.0))
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()
        assert self._ready.wait(20), "router did not start"

    def _main(self) -> None:
        async def main() -> None:
            self._stop = asyncio.Event()
            ready = asyncio.Event()
            task = asyncio.create_task(self.router.run(self._stop, ready))
            await ready.wait()
            self._ready.set()
            await task

        self._loop.run_until_complete(main())

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(20)
        assert not self.thread.is_alive()
        self.client.loop_stop()
        self.client.disconnect()


def read_outcomes(bootstrap: str, topic: str, want: int, timeout: float = 20.0) -> list[commands.Outcome]:
    async def go() -> list[commands.Outcome]:
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None)
        await consumer.start()
        out: list[commands.Outcome] = []
        try:
            deadline = time.monotonic() + timeout
            while len(out) < want and time.monotonic() < deadline:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    out += [commands.decode_outcome(r.value) for r in records]
        finally:
            await consumer.stop()
        return out

    return asyncio.run(go())


def status_record(device: str, gateway: str, topic: str) -> tuple[bytes, bytes]:
    event = codec.StatusEvent("site-1", device, "online", "a1b2c3d4", "fw", "POWERON", 1)
    record = codec.kafka_status_record(event, gateway, topic, 2)
    return record.key, record.value


@pytest.fixture
def setup(mosquitto: Mosquitto, kafka_bootstrap: str, command_topics: dict[str, str]) -> Iterator[tuple]:
    config = BridgeConfig(mqtt_broker=mosquitto.address, kafka_bootstrap=kafka_bootstrap,
                          readings_topic=command_topics["readings"], status_topic=command_topics["status"],
                          deadletter_topic=command_topics["deadletter"])
    settings = CommandSettings(commands_topic=command_topics["commands"], results_topic=command_topics["results"],
                               group=f"g-{uuid.uuid4().hex[:6]}", route_wait_s=2.0)
    yield config, settings


def test_a_command_reaches_the_gateway_named_by_the_status_topic_and_is_committed_after(
    setup, mosquitto: Mosquitto, kafka_bootstrap: str
) -> None:
    config, settings = setup
    produce(kafka_bootstrap, config.status_topic, [status_record("dev-a", "gw-1", config.status_topic),
                                                   status_record("dev-b", "gw-2", config.status_topic)])
    gw1, gw2 = GatewayCommandSession(mosquitto, "gw-1"), GatewayCommandSession(mosquitto, "gw-2")
    router = RouterThread(config, settings, mosquitto)
    try:
        mine = Command("c-1", "dev-a", "set_interval", {"s": 2}, expires_ms=int(time.time() * 1000) + 60_000)
        named = Command("c-2", "dev-x", "ping", {}, gateway="gw-2")  # the command names its gateway
        produce(kafka_bootstrap, settings.commands_topic,
                [(b"dev-a", commands.encode_command(mine)), (b"dev-x", commands.encode_command(named))])
        wait_until(lambda: gw1.commands() and gw2.commands(), what="both commands at their gateways")
        assert [(c.id, c.device, c.name, dict(c.args), c.gateway) for c in gw1.commands()] == [
            ("c-1", "dev-a", "set_interval", {"s": 2}, "gw-1")]
        assert [c.id for c in gw2.commands()] == ["c-2"]
        wait_until(lambda: committed(kafka_bootstrap, settings.group, settings.commands_topic) == 2,
                   what="offsets committed")
    finally:
        router.stop()
        gw1.close()
        gw2.close()


def test_malformed_expired_and_unroutable_commands_end_as_outcomes(setup, mosquitto: Mosquitto, kafka_bootstrap: str) -> None:
    config, settings = setup
    router = RouterThread(config, settings, mosquitto)
    try:
        expired = Command("c-old", "dev-a", "ping", {}, expires_ms=1, gateway="gw-1")
        nowhere = Command("c-lost", "dev-nobody", "ping", {})
        produce(kafka_bootstrap, settings.commands_topic, [
            (b"dev-a", b'{"schema": "tern.command/1", "id": "c-bad", "device": "dev-a", "name": "Reboot Now"}'),
            (b"dev-a", commands.encode_command(expired)),
            (b"dev-nobody", commands.encode_command(nowhere)),
        ])
        outcomes = {o.id: o for o in read_outcomes(kafka_bootstrap, settings.results_topic, 3)}
        assert outcomes["c-bad"].outcome == commands.REJECTED and "invalid command name" in outcomes["c-bad"].detail
        assert outcomes["c-bad"].device == "dev-a"
        assert outcomes["c-old"].outcome == commands.EXPIRED
        assert outcomes["c-lost"].outcome == commands.REJECTED and "no gateway" in outcomes["c-lost"].detail
    finally:
        router.stop()


@pytest.mark.slow
def test_a_command_the_broker_never_took_is_not_committed_and_is_routed_by_the_next_router(
    setup, mosquitto_factory, kafka_bootstrap: str, tmp_path
) -> None:
    config, settings = setup
    broker = mosquitto_factory("cloud")
    config = config.with_(mqtt_broker=broker.address)
    gw = GatewayCommandSession(broker, "gw-1")  # its persistent session outlives the outage
    gw.close()
    broker.stop()
    router = RouterThread(config, settings, broker)
    produce(kafka_bootstrap, settings.commands_topic,
            [(b"dev-a", commands.encode_command(Command("c-9", "dev-a", "reboot", {}, gateway="gw-1")))])
    wait_until(lambda: router.router.counts["publish_retries"] >= 1, what="the router retrying a publish")
    router.stop()  # dies with the command consumed but never accepted by the broker
    assert committed(kafka_bootstrap, settings.group, settings.commands_topic) == 0
    broker.start()
    router = RouterThread(config, settings, broker)
    try:
        gw = GatewayCommandSession(broker, "gw-1")
        wait_until(lambda: [c.id for c in gw.commands()][:1] == ["c-9"], what="the command after the restart")
        wait_until(lambda: committed(kafka_bootstrap, settings.group, settings.commands_topic) == 1,
                   what="offset committed once the broker had it")
    finally:
        router.stop()
        gw.close()


def test_the_command_cli_writes_a_command_and_waits_for_its_outcome(
    setup, mosquitto: Mosquitto, kafka_bootstrap: str, capsys
) -> None:
    from tern.cloud.cli import main as cli_main

    config, settings = setup
    router = RouterThread(config, settings, mosquitto)
    try:
        # No gateway has reported dev-q: the router rejects it, and --wait prints that.
        code = cli_main(["command", "dev-q", "set_interval", "s=5", "fast=true", "--id", "c-cli",
                         "--kafka", kafka_bootstrap, "--topic", settings.commands_topic,
                         "--results-topic", settings.results_topic, "--wait", "20"])
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert lines[0] == {"id": "c-cli", "device": "dev-q", "name": "set_interval", "sent": True}
        assert lines[-1]["outcome"] == "rejected" and "no gateway" in lines[-1]["detail"]
        assert code == 1
    finally:
        router.stop()
    assert cli_main(["command", "dev-q", "Bad Name", "--kafka", kafka_bootstrap]) == 2
    assert "invalid command name" in capsys.readouterr().err


def test_the_bridge_routes_commands_and_learns_gateways_from_its_own_batches(
    setup, mosquitto: Mosquitto, kafka_bootstrap: str
) -> None:
    """The router inside a running bridge: a gateway's batch tells the bridge which gateway
    serves a device, and a command for it then reaches that gateway's session."""
    from tern.cloud.bridge import BridgeThread

    config, settings = setup
    config = config.with_(commands=True, commands_topic=settings.commands_topic,
                          command_results_topic=settings.results_topic, command_group=settings.group)
    gw = GatewayCommandSession(mosquitto, "gw-7")
    with BridgeThread(config) as bridge:
        publisher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="gw-7-uplink")
        publisher.connect(mosquitto.host, mosquitto.port)
        publisher.loop_start()
        try:
            event = codec.StatusEvent("site-1", "dev-7", "online", "a1b2c3d4", "fw", "POWERON", 1)
            batch = codec.Batch("gw-7", 1, 1, (), (event,))
            publisher.publish(topics.batch_topic("gw-7"), codec.encode_batch(batch), qos=1).wait_for_publish(5)
            wait_until(lambda: bridge.stats()["status_written"] == 1, what="the batch written")
            produce(kafka_bootstrap, settings.commands_topic,
                    [(b"dev-7", commands.encode_command(Command("c-70", "dev-7", "ping", {})))])
            wait_until(lambda: [c.id for c in gw.commands()] == ["c-70"], what="the command at gw-7")
            assert gw.commands()[0].gateway == "gw-7"
            wait_until(lambda: bridge.stats()["commands_routed"] == 1, what="the router's count")
        finally:
            publisher.loop_stop()
            publisher.disconnect()
            gw.close()
