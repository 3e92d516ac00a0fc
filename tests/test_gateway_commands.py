"""Commands, gateway half, on real parts: two mosquittos (the Pi's, the cloud's), a Kafka-protocol
broker (Tansu), the real bridge with its command router, the real gateway (in-process, or as a
`tern-gateway run` process where a SIGKILL matters) and a paho client playing the node by the
contract in docs/contracts.md (it remembers command ids, as the firmware does).

Every wait polls a real outcome (records in Kafka, rows in SQLite, messages on a broker) under
a deadline.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
import zlib
from pathlib import Path
from typing import Callable, Iterator

import paho.mqtt.client as mqtt
import pytest
from aiokafka import AIOKafkaConsumer
from paho.mqtt.enums import CallbackAPIVersion

from tern.cloud.bridge import BridgeThread
from tern.cloud.config import BridgeConfig
from tern.core import codec, commands, topics
from tern.core.commands import Command, Outcome
from tern.core.errors import CodecError
from tern.edge.config import GatewayConfig
from tern.edge.service import Gateway
from tern.harness.stack import Mosquitto

import helpers
from helpers import BridgeStub, produce

GW = "gw1"
SITE = "site1"
BOOT = "b007"
DEADLINE = 30.0

#: Waits here get this module's deadline unless they say otherwise.
wait_until = functools.partial(helpers.wait_until, timeout=DEADLINE)


# --- helpers ---------------------------------------------------------------------------


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class FakeNode:
    """A node by the contract: retained birth (and will), its command topic, replies; it
    executes each command id once and answers a redelivery again."""

    def __init__(self, broker: Mosquitto, device: str) -> None:
        self.device = device
        self.received: list[str] = []
        self.executed: list[str] = []
        self._answers: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device, clean_session=True)
        will = codec.encode_status(codec.Status(device, "offline", BOOT))
        self.client.will_set(topics.status_topic(SITE, device), will, qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.broker = broker
        #: False: commands are executed but answered only by answer_held() (a slow command).
        self.answering = True
        self._held: list[tuple[str, dict]] = []

    def online(self) -> "FakeNode":
        self._subscribed.clear()
        self.client.connect(self.broker.host, self.broker.port)
        self.client.loop_start()
        assert self._subscribed.wait(10), "node did not subscribe"
        birth = codec.encode_status(codec.Status(self.device, "online", BOOT, fw="test"))
        self.client.publish(topics.status_topic(SITE, self.device), birth, qos=1, retain=True).wait_for_publish(5)
        return self

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def _on_connect(self, client, userdata, flags, rc, properties) -> None:
        client.subscribe(topics.command_topic(SITE, self.device), qos=1)

    def _on_message(self, client, userdata, message) -> None:
        body = json.loads(message.payload)
        with self._lock:
            self.received.append(body["id"])
            answer = self._answers.get(body["id"])
            if answer is None:  # executed once; a redelivery is answered again
                self.executed.append(body["id"])
                if body["name"] == "ping":
                    answer = {"ok": True, "result": {"pong": body["args"].get("n", 0)}}
                else:
                    answer = {"ok": False, "error": f"unknown command {body['name']}"}
                self._answers[body["id"]] = answer
            if not self.answering:
                self._held.append((body["id"], answer))
                return
        self._answer(body["id"], answer)

    def _answer(self, command_id: str, answer: dict) -> None:
        reply = {"v": 1, "dev": self.device, "id": command_id, **answer}
        self.client.publish(topics.reply_topic(SITE, self.device), json.dumps(reply), qos=1).wait_for_publish(5)

    def answer_held(self) -> None:
        with self._lock:
            held, self._held = self._held, []
            self.answering = True
        for command_id, answer in held:
            self._answer(command_id, answer)

    def got(self) -> list[str]:
        with self._lock:
            return list(self.received)


def read_results(bootstrap: str, topic: str, until: Callable[[list[tuple[bytes, Outcome]]], bool],
                 timeout: float = DEADLINE) -> list[tuple[bytes, Outcome]]:
    """(key, outcome) records of the results topic from its start, once ``until`` holds."""
    async def go() -> list[tuple[bytes, Outcome]]:
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None)
        await consumer.start()
        out: list[tuple[bytes, Outcome]] = []
        try:
            deadline = time.monotonic() + timeout
            while not until(out):
                if time.monotonic() > deadline:
                    raise AssertionError(f"results topic never satisfied the test; it holds {out}")
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    out += [(r.key, commands.decode_outcome(r.value)) for r in records]
        finally:
            await consumer.stop()
        return out

    return asyncio.run(go())


def outcomes_of(results: list[tuple[bytes, Outcome]], command_id: str) -> list[str]:
    return [o.outcome for _, o in results if o.id == command_id]


def has(command_id: str, outcome: str) -> Callable[[list], bool]:
    return lambda results: outcome in outcomes_of(results, command_id)


def command_rows(path: Path) -> list[tuple]:
    if not path.exists():
        return []
    with sqlite3.connect(path, timeout=10) as conn:
        try:
            return [tuple(r) for r in conn.execute("SELECT id, device, delivered_ms, outcome FROM commands")]
        except sqlite3.OperationalError:
            return []


@pytest.fixture
def stack(mosquitto_factory, kafka_bootstrap: str, command_topics: dict[str, str], tmp_path: Path) -> Iterator[dict]:
    """The Pi broker, the cloud broker and a bridge routing commands; the test starts the gateway."""
    kafka = command_topics
    local, cloud = mosquitto_factory("local"), mosquitto_factory("cloud")
    config = BridgeConfig(mqtt_broker=cloud.address, kafka_bootstrap=kafka_bootstrap,
                          readings_topic=kafka["readings"], status_topic=kafka["status"],
                          deadletter_topic=kafka["deadletter"], commands=True, commands_topic=kafka["commands"],
                          command_results_topic=kafka["results"], command_group=f"g-{uuid.uuid4().hex[:6]}")
    closers: list[Callable[[], None]] = []
    bridge = BridgeThread(config).start()
    closers.append(bridge.stop)
    yield {"local": local, "cloud": cloud, "bridge": bridge, "kafka": kafka, "bootstrap": kafka_bootstrap,
           "outbox": tmp_path / "gw" / "outbox.db", "closers": closers}
    for close in reversed(closers):
        try:
            close()
        except Exception:
            pass


def gateway(stack: dict) -> Gateway:
    gw = Gateway(GatewayConfig(gateway_id=GW, local_broker=stack["local"].address,
                               cloud_broker=stack["cloud"].address, outbox_path=stack["outbox"]))
    stack["closers"].append(gw.stop)
    gw.start()
    assert gw.wait_connected(DEADLINE) and gw.commands.wait_connected(DEADLINE)
    return gw


def node(stack: dict, device: str) -> FakeNode:
    n = FakeNode(stack["local"], device)
    stack["closers"].append(n.close)
    return n


def command_record(command: Command) -> tuple[bytes, bytes]:
    return command.device.encode(), commands.encode_command(command)


# --- the envelope extension ------------------------------------------------------------


def test_outcomes_ride_the_batch_envelope_as_a_versioned_extension() -> None:
    outcomes = (Outcome("c-1", "dev-a", commands.DELIVERED, ms=1),
                Outcome("c-1", "dev-a", commands.DONE, reply={"pong": 3}, ms=2),
                Outcome("", "unknown", commands.REJECTED, detail="not JSON", ms=3))
    raw = codec.encode_batch(codec.Batch(GW, 7, 9, outcomes=outcomes))
    doc = json.loads(zlib.decompress(raw))
    assert doc["ext"] == ["outcomes/1"] and len(doc["outcomes"]) == 3
    batch = codec.decode_batch(raw, topic_gateway=GW)
    assert [(o.id, o.outcome, o.gateway, o.reply) for o in batch.outcomes] == [
        ("c-1", "delivered", GW, None), ("c-1", "done", GW, {"pong": 3}), ("", "rejected", GW, None)]
    record = codec.kafka_outcome_record(batch.outcomes[1], GW, "results")
    assert record.key == b"dev-a" and commands.decode_outcome(record.value).reply == {"pong": 3}
    # A batch without outcomes is what it always was; outcomes without the extension named are refused.
    assert "ext" not in json.loads(zlib.decompress(codec.encode_batch(codec.Batch(GW, 8, 9))))
    del doc["ext"]
    with pytest.raises(CodecError, match="without 'outcomes/1'"):
        codec.decode_batch(zlib.compress(json.dumps(doc).encode()))
    doc["ext"], doc["outcomes"][0]["outcome"] = ["outcomes/1"], "maybe"
    with pytest.raises(CodecError, match="'outcome' must be one of"):
        codec.decode_batch(zlib.compress(json.dumps(doc).encode()))


# --- end to end --------------------------------------------------------------------------


def test_a_command_from_kafka_reaches_the_node_and_its_reply_ends_done(stack) -> None:
    gw = gateway(stack)
    dev = node(stack, "dev-a").online()
    # The bridge learns which gateway serves dev-a from the birth the gateway forwards.
    wait_until(lambda: stack["bridge"].stats()["status_written"] >= 1, what="the birth in Kafka")
    produce(stack["bootstrap"], stack["kafka"]["commands"],
            [command_record(Command("c-1", "dev-a", "ping", {"n": 3}, expires_ms=now_ms() + 60_000)),
             command_record(Command("c-2", "dev-a", "warp", {}))])
    results = read_results(stack["bootstrap"], stack["kafka"]["results"],
                           lambda r: has("c-1", "done")(r) and has("c-2", "rejected")(r))
    assert outcomes_of(results, "c-1") == ["delivered", "done"]
    done = next(o for _, o in results if o.id == "c-1" and o.outcome == "done")
    assert (done.device, done.gateway, dict(done.reply or {})) == ("dev-a", GW, {"pong": 3})
    failed = next(o for _, o in results if o.id == "c-2" and o.outcome == "rejected")
    assert failed.detail == "unknown command warp"
    assert {key for key, _ in results} == {b"dev-a"}
    assert dev.got() == ["c-1", "c-2"]
    # Finished in the outbox file; outcomes deleted once the cloud confirmed their batch.
    assert sorted(r[3] for r in command_rows(stack["outbox"])) == ["done", "rejected"]
    wait_until(lambda: gw.commands.store.outcomes_unclaimed() == 0 and gw.stats()["inflight_batches"] == 0,
               what="outcomes confirmed")
    with sqlite3.connect(stack["outbox"]) as conn:
        assert conn.execute("SELECT COUNT(*) FROM command_outcomes").fetchone()[0] == 0


def test_a_repeated_command_is_stored_once_and_a_malformed_one_is_rejected(stack) -> None:
    gw = gateway(stack)
    dev = node(stack, "dev-r").online()
    publisher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="a-bridge")
    publisher.connect(stack["cloud"].host, stack["cloud"].port)
    publisher.loop_start()
    stack["closers"].append(publisher.loop_stop)
    topic = topics.gateway_command_topic(GW)
    payload = commands.encode_command(Command("c-r", "dev-r", "ping", {}, gateway=GW))
    for body in (payload, payload, b'{"schema":"tern.command/1","id":"c-bad","device":"dev-r","name":"Bad Name"}',
                 commands.encode_command(Command("c-else", "dev-r", "ping", {}, gateway="gw-other"))):
        publisher.publish(topic, body, qos=1).wait_for_publish(5)
    results = read_results(stack["bootstrap"], stack["kafka"]["results"],
                           lambda r: has("c-r", "done")(r) and has("c-bad", "rejected")(r) and has("c-else", "rejected")(r))
    bad = next(o for _, o in results if o.id == "c-bad")
    assert (bad.device, bad.gateway) == ("dev-r", GW) and "invalid command name" in bad.detail
    assert "gw-other" in next(o for _, o in results if o.id == "c-else").detail
    assert outcomes_of(results, "c-r") == ["delivered", "done"]
    assert gw.stats()["commands_duplicate"] == 1
    assert [r[0] for r in command_rows(stack["outbox"])] == ["c-r"]
    assert dev.got() == ["c-r"]
    # A node cannot answer another node's command: not on its own topic, not as the other.
    publisher.publish(topic, commands.encode_command(Command("c-z", "dev-z", "reboot", {}, gateway=GW)),
                      qos=1).wait_for_publish(5)
    wait_until(lambda: "c-z" in [r[0] for r in command_rows(stack["outbox"])], what="c-z taken")
    reply_topic = topics.reply_topic(SITE, "dev-r")
    dev.client.publish(reply_topic, json.dumps({"v": 1, "dev": "dev-r", "id": "c-z", "ok": True}), qos=1)
    dev.client.publish(reply_topic, json.dumps({"v": 1, "dev": "dev-z", "id": "c-z", "ok": True}), qos=1)
    wait_until(lambda: gw.stats()["replies_ignored"] == 2, what="both forged replies ignored")
    assert gw.stats()["commands_pending_by_device"] == {"dev-z": 1}
    with sqlite3.connect(stack["outbox"]) as conn:
        letters = conn.execute("SELECT topic, error FROM dead_letters").fetchall()
    assert len(letters) == 1 and letters[0][0] == reply_topic and "replied on the topic of" in letters[0][1]


def test_a_command_for_an_offline_node_waits_for_its_birth_and_one_that_expires_first_ends_expired(stack, capsys) -> None:
    from tern.edge.cli import main as cli_main

    gw = gateway(stack)
    dev = node(stack, "dev-b")  # not online yet: the gateway has never seen it
    produce(stack["bootstrap"], stack["kafka"]["commands"],
            [command_record(Command("c-exp", "dev-b", "ping", {}, expires_ms=now_ms() + 1500, gateway=GW)),
             command_record(Command("c-wait", "dev-b", "ping", {"n": 1}, expires_ms=now_ms() + 120_000, gateway=GW))])
    results = read_results(stack["bootstrap"], stack["kafka"]["results"], has("c-exp", "expired"))
    assert outcomes_of(results, "c-exp") == ["expired"] and not outcomes_of(results, "c-wait")
    # The bridge's router may have ended c-exp itself (it expired before the router's group
    # join was done); c-wait then reaches the gateway a moment later.
    wait_until(lambda: gw.stats()["commands_pending"] == 1, what="c-wait held by the gateway")
    assert gw.stats()["commands_pending_by_device"] == {"dev-b": 1}
    # `tern-gateway status` shows what waits, from the outbox file.
    assert cli_main(["status", "--outbox", str(stack["outbox"]), "--url", "http://127.0.0.1:9"]) == 1
    out = capsys.readouterr().out
    assert "commands pending" in out and "dev-b 1" in out
    dev.online()
    results = read_results(stack["bootstrap"], stack["kafka"]["results"], has("c-wait", "done"))
    assert outcomes_of(results, "c-wait") == ["delivered", "done"]
    assert dev.got() == ["c-wait"]  # the expired one never reached the node
    wait_until(lambda: gw.stats()["commands_pending"] == 0, what="nothing pending")


def test_the_gateway_killed_after_taking_a_command_still_delivers_it_after_a_restart(stack, tmp_path) -> None:
    # The gateway's command session exists before its process runs (as after any earlier run):
    # the broker holds for it what the bridge routes meanwhile.
    pre = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"tern-gw-{GW}-uplink-cmd", clean_session=False)
    subscribed = threading.Event()
    pre.on_subscribe = lambda *a: subscribed.set()
    pre.connect(stack["cloud"].host, stack["cloud"].port)
    pre.loop_start()
    pre.subscribe(topics.gateway_command_topic(GW), qos=1)
    assert subscribed.wait(10)
    pre.disconnect()
    pre.loop_stop()
    outbox = stack["outbox"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tern.edge.cli", "run", "--gateway-id", GW, "--local", stack["local"].address,
         "--cloud", stack["cloud"].address, "--outbox", str(outbox), "--log-level", "INFO"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "gateway.log", "wb"),
    )
    try:
        produce(stack["bootstrap"], stack["kafka"]["commands"],
                [command_record(Command("c-k", "dev-k", "ping", {"n": 9}, gateway=GW))])
        wait_until(lambda: [r[0] for r in command_rows(outbox)] == ["c-k"], what="the command committed by the process")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    assert command_rows(outbox) == [("c-k", "dev-k", None, None)]  # taken, not delivered: the node was away
    dev = node(stack, "dev-k").online()
    gw = gateway(stack)
    results = read_results(stack["bootstrap"], stack["kafka"]["results"], has("c-k", "done"))
    assert dev.got().count("c-k") >= 1 and dev.executed == ["c-k"]
    done = [o for _, o in results if o.id == "c-k" and o.outcome == "done"]
    assert {o.id for o in done} == {"c-k"} and dict(done[0].reply or {}) == {"pong": 9}
    wait_until(lambda: gw.stats()["commands_pending"] == 0, what="nothing pending")


def test_a_reply_sent_while_the_gateway_is_down_ends_the_command_after_its_restart(stack) -> None:
    """The node answers while the gateway is stopped: the Pi broker keeps the reply in the
    gateway's session; after the restart it ends the command (and a re-sent copy is answered
    from the node's memory, not executed again)."""
    gw = gateway(stack)
    dev = node(stack, "dev-s")
    dev.answering = False
    dev.online()
    produce(stack["bootstrap"], stack["kafka"]["commands"],
            [command_record(Command("c-s", "dev-s", "ping", {"n": 5}, gateway=GW))])
    wait_until(lambda: [r[2] is not None for r in command_rows(stack["outbox"])] == [True], what="c-s delivered")
    gw.stop()
    dev.answer_held()  # the gateway is away: its local session holds the reply
    gateway(stack)
    results = read_results(stack["bootstrap"], stack["kafka"]["results"], has("c-s", "done"))
    # At least once: a batch unconfirmed at the stop goes again after the restart.
    assert set(outcomes_of(results, "c-s")) == {"delivered", "done"} and outcomes_of(results, "c-s")[-1] == "done"
    assert dev.executed == ["c-s"] and dev.got().count("c-s") >= 1


# --- custody of outcomes -----------------------------------------------------------------


def test_the_store_hands_outcomes_to_one_batch_and_gives_them_again_after_a_restart(tmp_path: Path) -> None:
    from tern.edge.command_store import CommandStore

    path = tmp_path / "outbox.db"
    store = CommandStore(path)
    assert store.accept(Command("c-1", "dev-a", "ping", {}), now_ms())
    assert not store.accept(Command("c-1", "dev-a", "ping", {}), now_ms())  # a repeat: not stored twice
    assert store.accept(Command("c-old", "dev-a", "ping", {}, expires_ms=1), now_ms())  # expired on arrival
    assert store.finish("c-1", "dev-b", commands.DONE, now_ms()) is False  # not dev-b's command
    assert store.finish("c-1", "dev-a", commands.DONE, now_ms(), reply={"pong": 1})
    assert store.finish("c-1", "dev-a", commands.DONE, now_ms()) is False  # finished once
    first = store.claim_outcomes(5, 100)
    assert [(o.id, o.outcome) for o in first] == [("c-old", "expired"), ("c-1", "delivered"), ("c-1", "done")]
    assert store.claim_outcomes(5, 100) == first and store.outcomes_unclaimed() == 0  # a re-send: the same ones
    store.close()
    store = CommandStore(path)  # a restart: batch 5 was never confirmed
    assert store.outcomes_unclaimed() == 3
    assert store.claim_outcomes(6, 2) == first[:2] and store.delete_outcomes(6) == 2
    assert store.claim_outcomes(7, 100) == first[2:] and store.pending_by_device() == {}
    store.close()


def test_outcomes_stay_in_the_outbox_until_their_batch_is_confirmed(mosquitto_factory, tmp_path: Path) -> None:
    local, cloud = mosquitto_factory("local"), mosquitto_factory("cloud")
    bridge = BridgeStub(cloud, confirm=False)
    outbox = tmp_path / "gw" / "outbox.db"
    gw = Gateway(GatewayConfig(gateway_id=GW, local_broker=local.address, cloud_broker=cloud.address,
                               outbox_path=outbox, confirm_timeout_s=60))
    try:
        gw.start()
        assert gw.wait_connected(DEADLINE) and gw.commands.wait_connected(DEADLINE)
        publisher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="a-bridge")
        publisher.connect(cloud.host, cloud.port)
        publisher.publish(topics.gateway_command_topic(GW), b"not a command", qos=1).wait_for_publish(5)
        publisher.disconnect()
        wait_until(lambda: any(b.outcomes for b in bridge.batches), what="a batch carrying the outcome")
        sent = next(b for b in bridge.batches if b.outcomes)
        assert [(o.outcome, o.device) for o in sent.outcomes] == [("rejected", "unknown")]
        assert "not JSON" in sent.outcomes[0].detail

        def kept() -> list[tuple]:
            with sqlite3.connect(outbox) as conn:
                return conn.execute("SELECT outcome, bseq FROM command_outcomes").fetchall()

        assert kept() == [("rejected", sent.bseq)]  # published, not confirmed: kept
        bridge.start_confirming()
        wait_until(lambda: not kept(), what="the outcome deleted on the confirm")
    finally:
        gw.stop()
        bridge.close()


def test_repairing_a_damaged_outbox_keeps_its_commands_and_outcomes(tmp_path: Path) -> None:
    from tern.edge.command_store import CommandStore
    from tern.edge.outbox import Outbox
    from tern.edge.repair import repair

    path = tmp_path / "outbox.db"
    Outbox(path).close()
    store = CommandStore(path)
    store.accept(Command("c-1", "dev-a", "set_interval", {"s": 5}), 5)
    store.reject("", "unknown", "not JSON", 6)
    store.close()
    report = repair(path, now=time.time())
    assert report.tables["commands"].copied == 1 and report.tables["command_outcomes"].copied == 1
    store = CommandStore(path)
    assert [(s.command.id, dict(s.command.args)) for s in store.unfinished()] == [("c-1", {"s": 5})]
    assert store.outcomes_unclaimed() == 1
    store.close()
