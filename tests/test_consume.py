"""The consumer side: tern.cloud.reader and `tern-bridge consume`, against a real bridge, mosquitto and Tansu.

Records are written by the real bridge from batches a paho client publishes on a real
mosquitto, so the reader is tested on exactly what the bridge writes; repeats are made the
way they arise in the field (the same readings sent again in another batch).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tern.cloud.bridge import BridgeThread
from tern.cloud.cli import main as cli_main
from tern.cloud.consume import read_all
from tern.cloud.reader import Deduplicator, TopicReader, read_tern
from tern.core import codec, topics
from tern.harness.stack import Mosquitto

from helpers import bridge_config, produce

BOOT = "c0ffee01"
GATEWAY = "gw-consume"
REPO = Path(__file__).resolve().parents[1]


class Gateway:
    """Publishes batches on the cloud broker (QoS 1) and waits for the bridge's confirms."""

    def __init__(self, broker: Mosquitto) -> None:
        self.confirmed: set[int] = set()
        self._cond = threading.Condition()
        subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"gw-{uuid.uuid4().hex[:6]}")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topics.confirm_topic(GATEWAY), qos=1)
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert subscribed.wait(10), "could not subscribe to the confirm topic"

    def _on_message(self, client, userdata, message) -> None:
        with self._cond:
            self.confirmed.add(codec.decode_confirm(message.payload).bseq)
            self._cond.notify_all()

    def send(self, batch: codec.Batch, timeout: float = 20) -> None:
        """Publish ``batch`` and return once the bridge confirmed it (Kafka holds it)."""
        self.send_raw(topics.batch_topic(batch.gateway), codec.encode_batch(batch))
        deadline = time.monotonic() + timeout
        with self._cond:
            while batch.bseq not in self.confirmed:
                left = deadline - time.monotonic()
                assert left > 0, f"batch {batch.bseq} not confirmed within {timeout} s"
                self._cond.wait(left)

    def send_raw(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(10)
        assert info.is_published()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def readings(device: str, seqs: range) -> tuple[codec.Reading, ...]:
    return tuple(
        codec.Reading(device, BOOT, seq, 1_700_000_000_000 + seq, {"t": 20.0 + seq / 10, "n": seq}, site="site1", received_ms=5)
        for seq in seqs
    )


def batch(bseq: int, items: tuple[codec.Reading, ...], statuses: tuple[codec.StatusEvent, ...] = ()) -> codec.Batch:
    return codec.Batch(GATEWAY, bseq, int(time.time() * 1000), readings=items, statuses=statuses)


ONLINE = codec.StatusEvent(site="site1", device="dev-a", state="online", boot=BOOT, fw="0.3.0", reset="power", received_ms=11)
OFFLINE = codec.StatusEvent(site="site1", device="dev-a", state="offline", boot=BOOT, received_ms=12)
POISON = b"\x00 not a batch"


@pytest.fixture
def pipeline(mosquitto, kafka_bootstrap, kafka_topics):
    """A running bridge on a private mosquitto and Kafka topics, and a gateway to feed it."""
    config = bridge_config(mosquitto, kafka_bootstrap, kafka_topics, name=f"c{uuid.uuid4().hex[:8]}", connect_timeout_s=10)
    with BridgeThread(config) as bridge:
        gateway = Gateway(mosquitto)
        try:
            yield bridge, gateway
        finally:
            gateway.close()


#: TANSU_END: Tansu (the test broker) reports a partition's end offset as the base offset of
#: its last record batch plus one, which is one or more short when that batch holds several
#: records (Apache Kafka reports the true end). Where a test starts reading at the end, the
#: last write before it is a one-reading batch, so the end Tansu reports is the true one.


def fill(pipeline, kafka_bootstrap, kafka_topics) -> None:
    """Through the bridge: 6 readings of two devices, one repeated batch, two status events, one dead letter."""
    bridge, gateway = pipeline
    gateway.send(batch(1, readings("dev-a", range(1, 4)) + readings("dev-b", range(1, 4)), (ONLINE,)))
    # The field's repeat: the gateway lost batch 1's confirm and sent its rows again, newly batched.
    gateway.send(batch(2, readings("dev-a", range(2, 4)), (ONLINE, OFFLINE)))
    gateway.send_raw(topics.batch_topic(GATEWAY), POISON)
    # Counts in Kafka itself, not the bridge's word: 8 reading records, 3 status, 1 dead letter.
    assert len(read_all(kafka_bootstrap, kafka_topics["readings"], timeout_s=15, expect=8)) == 8
    assert len(read_all(kafka_bootstrap, kafka_topics["status"], timeout_s=15, expect=3)) == 3
    assert len(read_all(kafka_bootstrap, kafka_topics["deadletter"], timeout_s=15, expect=1)) == 1


# --- the Python helper ---------------------------------------------------------------------


def test_reader_decodes_readings_statuses_and_dead_letters(pipeline, kafka_bootstrap, kafka_topics):
    fill(pipeline, kafka_bootstrap, kafka_topics)
    every = [kafka_topics["readings"], kafka_topics["status"], kafka_topics["deadletter"]]

    raw = list(read_tern(kafka_bootstrap, every, from_beginning=True, timeout_s=15))
    assert sorted(r.kind for r in raw) == ["deadletter"] + ["reading"] * 8 + ["status"] * 3

    reader_items = list(read_tern(kafka_bootstrap, every, from_beginning=True, dedup_window=1000, timeout_s=15))
    got = [r for r in reader_items if r.kind == "reading"]
    assert sorted((r.value["device"], r.value["seq"]) for r in got) == [("dev-a", s) for s in (1, 2, 3)] + [
        ("dev-b", s) for s in (1, 2, 3)
    ]
    for r in got:
        assert r.value["gateway"] == GATEWAY and r.value["boot"] == BOOT and r.key == r.value["device"]
        assert r.value["readings"] == {"t": 20.0 + r.value["seq"] / 10, "n": r.value["seq"]}
    # Per device, in seq order: the key keeps a device in one partition.
    for device in ("dev-a", "dev-b"):
        seqs = [r.value["seq"] for r in sorted(got, key=lambda r: r.offset) if r.value["device"] == device]
        assert seqs == sorted(seqs)

    statuses = sorted((r for r in reader_items if r.kind == "status"), key=lambda r: r.offset)
    assert [(s.value["state"], s.value["fw"], s.value["reset"]) for s in statuses] == [
        ("online", "0.3.0", "power"),
        ("offline", "", ""),
    ]
    (dead,) = [r for r in reader_items if r.kind == "deadletter"]
    assert dead.raw == POISON and dead.value is None
    assert dead.header("source_topic") == topics.batch_topic(GATEWAY)
    assert dead.error and dead.error == codec_error(POISON)
    assert len(reader_items) == 6 + 2 + 1


@pytest.mark.skipif(not hasattr(codec, "DropEvent"),
                    reason="drop events come with the outbox's retention policies (issue 14), not in this codec yet")
def test_drop_events_decoded_and_deduplicated(pipeline, kafka_bootstrap, kafka_topics, capsys, monkeypatch):
    bridge, gateway = pipeline
    drop = codec.DropEvent(site="site1", device="dev-a", boot=BOOT, reason="max_rows", first_seq=1, last_seq=5,
                           count=5, dropped_ms=77)
    # A node that says in its birth message that it lost readings itself.
    birth = codec.StatusEvent(site="site1", device="dev-b", state="online", boot=BOOT, received_ms=9, dropped=((BOOT, 3),))
    gateway.send(codec.Batch(GATEWAY, 1, int(time.time() * 1000), statuses=(birth,), drops=(drop,)))
    gateway.send(codec.Batch(GATEWAY, 2, int(time.time() * 1000), drops=(drop,)))  # the same event, re-sent
    topic = kafka_topics["status"]
    assert len(read_all(kafka_bootstrap, topic, timeout_s=15, expect=3)) == 3

    everything = list(read_tern(kafka_bootstrap, topic, from_beginning=True, timeout_s=15))
    assert sorted(r.kind for r in everything) == ["drop", "drop", "status"]
    items = list(read_tern(kafka_bootstrap, topic, from_beginning=True, dedup_window=100, timeout_s=15))
    (once,) = [r for r in items if r.kind == "drop"]
    assert (once.value["device"], once.value["first_seq"], once.value["last_seq"], once.value["count"]) == ("dev-a", 1, 5, 5)
    assert once.value["reason"] == "max_rows" and once.value["gateway"] == GATEWAY

    monkeypatch.setenv("COLUMNS", "250")
    assert cli_main(["consume", "--kafka", kafka_bootstrap, "--topic", topic, "--from-beginning", "--dedup"]) == 0
    out = capsys.readouterr().out
    assert "5 readings dropped (max_rows)" in out and "2 records, 1 duplicates dropped" in out
    assert f"dropped {BOOT}:3" in out


def test_ota_state_and_rollout_records_are_read_and_shown(pipeline, kafka_bootstrap, kafka_topics, capsys, monkeypatch):
    """A node's update state rides in its status record; a rollout's step is a record of its own."""
    bridge, gateway = pipeline
    report = codec.OtaReport("rolled_back", "0.5.0", "ImportError tern_link 0.5.0 is broken")
    birth = codec.StatusEvent(site="site1", device="dev-a", state="online", boot=BOOT, fw="0.4.0", received_ms=9, ota=report)
    gateway.send(codec.Batch(GATEWAY, 1, int(time.time() * 1000), statuses=(birth,)))
    topic = kafka_topics["status"]
    assert len(read_all(kafka_bootstrap, topic, timeout_s=15, expect=1)) == 1
    step = codec.kafka_ota_record(topic, "r-1", "0.5.0", "dev-a", 0, "failed", "rolled back: ImportError", "ota-1", 10)
    produce(kafka_bootstrap, topic, [(step.key, step.value)])  # (the rollout's producer, as it writes it)

    items = list(read_tern(kafka_bootstrap, topic, from_beginning=True, timeout_s=15))
    assert [r.kind for r in items] == ["status", "ota"]
    assert items[0].value["ota"] == report.to_dict() and items[1].value["state"] == "failed"
    monkeypatch.setenv("COLUMNS", "250")
    assert cli_main(["consume", "--kafka", kafka_bootstrap, "--topic", topic, "--from-beginning"]) == 0
    out = capsys.readouterr().out
    assert "ota rolled_back 0.5.0 (ImportError tern_link 0.5.0 is broken)" in out
    assert "rollout 0.5.0 wave 0: failed (rolled back: ImportError)" in out


def test_deduplicator_window_is_bounded():
    dedup = Deduplicator(window=2)
    assert [dedup.seen(k) for k in ("a", "b", "a", "c", "b", "a")] == [False, False, True, False, False, False]
    # A repeat refreshes "a", so "c" pushes "b" out: "b" then passes again, and pushes out "a".
    assert dedup.duplicates == 1 and len(dedup) == 2
    with pytest.raises(ValueError):
        Deduplicator(0)


def test_start_at_end_unless_from_beginning_and_follow_sees_new_records(pipeline, kafka_bootstrap, kafka_topics):
    bridge, gateway = pipeline
    topic = kafka_topics["readings"]
    gateway.send(batch(1, readings("dev-a", range(1, 2))))
    gateway.send(batch(2, readings("dev-a", range(2, 3))))  # see TANSU_END
    assert len(read_all(kafka_bootstrap, topic, timeout_s=15, expect=2)) == 2

    async def scenario() -> None:
        # Without --from-beginning the reader starts at the end: the old records are not read.
        async with TopicReader(kafka_bootstrap, topic, timeout_s=15) as latest:
            assert [r async for r in latest] == []
            assert latest.reached_end
        async with TopicReader(kafka_bootstrap, topic, from_beginning=True, timeout_s=15) as whole:
            assert [r.value["seq"] async for r in whole] == [1, 2]
        # Following from the end: records the bridge writes afterwards arrive, and only those.
        async with TopicReader(kafka_bootstrap, topic, follow=True, timeout_s=15) as follow:
            later = asyncio.get_running_loop().run_in_executor(
                None, gateway.send, batch(3, readings("dev-a", range(3, 6)))
            )
            seen = []

            async def take() -> None:
                async for r in follow:
                    seen.append(r.value["seq"])
                    if len(seen) == 3:
                        return

            await asyncio.wait_for(take(), 30)
            await later
            assert seen == [3, 4, 5]

    asyncio.run(scenario())


@pytest.mark.slow
def test_group_resumes_where_it_stopped(pipeline, kafka_bootstrap, kafka_topics):
    bridge, gateway = pipeline
    topic = kafka_topics["readings"]
    group = f"g-{uuid.uuid4().hex[:6]}"
    gateway.send(batch(1, readings("dev-a", range(1, 11))))

    first = []
    for item in read_tern(kafka_bootstrap, topic, group=group, from_beginning=True, timeout_s=30):
        first.append(item.value["seq"])
        if len(first) == 4:
            break  # closing commits what was handed out
    assert first == [1, 2, 3, 4]
    rest = [r.value["seq"] for r in read_tern(kafka_bootstrap, topic, group=group, from_beginning=True, timeout_s=30)]
    assert rest == list(range(5, 11))
    # The group is at the end now: new records only.
    gateway.send(batch(2, readings("dev-a", range(11, 12))))
    gateway.send(batch(3, readings("dev-a", range(12, 13))))  # see TANSU_END
    assert [r.value["seq"] for r in read_tern(kafka_bootstrap, topic, group=group, timeout_s=30)] == [11, 12]
    # A new group without --from-beginning starts at the end.
    assert list(read_tern(kafka_bootstrap, topic, group=group + "-new", timeout_s=30)) == []


def test_two_readers_in_one_group_split_the_partitions(pipeline, kafka_bootstrap, kafka_topics):
    bridge, gateway = pipeline
    topic = kafka_topics["readings"]
    items: tuple[codec.Reading, ...] = ()
    for n in range(8):
        items += readings(f"dev-{n}", range(1, 4))
    group = f"split-{uuid.uuid4().hex[:6]}"

    async def scenario() -> dict[str, list]:
        got: dict[str, list] = {"a": [], "b": []}
        members = {name: await TopicReader(kafka_bootstrap, topic, group=group, from_beginning=True, follow=True,
                                           timeout_s=30).start() for name in got}

        async def take(name: str) -> None:
            async for r in members[name]:
                got[name].append(r)

        async def until(what: str, done) -> None:
            deadline = time.monotonic() + 60
            while not done():
                assert time.monotonic() < deadline, f"{what}: {[len(v) for v in got.values()]}"
                await asyncio.sleep(0.2)

        tasks = [asyncio.create_task(take(name)) for name in got]
        try:
            # Both joined and the group settled: then the bridge writes.
            await until("both members hold partitions", lambda: all(m.assignment for m in members.values()))
            assert not members["a"].assignment & members["b"].assignment
            await asyncio.get_running_loop().run_in_executor(None, gateway.send, batch(1, items))
            await until("every record read", lambda: sum(map(len, got.values())) >= len(items))
        finally:
            for task in tasks:
                task.cancel()
            for member in members.values():
                await member.close()
        return got

    got = asyncio.run(scenario())
    partitions = {name: {r.partition for r in records} for name, records in got.items()}
    assert not partitions["a"] & partitions["b"], partitions
    seen = [(r.value["device"], r.value["seq"]) for records in got.values() for r in records]
    assert sorted(seen) == sorted((r.device, r.seq) for r in items)


# --- tern-bridge consume ----------------------------------------------------------------------


def test_cli_json_lines_with_dedup(pipeline, kafka_bootstrap, kafka_topics, capsys):
    fill(pipeline, kafka_bootstrap, kafka_topics)
    every = ",".join([kafka_topics["readings"], kafka_topics["status"], kafka_topics["deadletter"]])
    args = ["consume", "--kafka", kafka_bootstrap, "--topic", every, "--from-beginning", "--format", "json", "--timeout", "15"]

    assert cli_main(args) == 0
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert len(lines) == 12 and "12 records" in captured.err

    assert cli_main(args + ["--dedup"]) == 0
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert "9 records, 3 duplicates dropped" in captured.err
    kinds = sorted(line["kind"] for line in lines)
    assert kinds == ["deadletter"] + ["reading"] * 6 + ["status"] * 2
    reading = next(line for line in lines if line["kind"] == "reading")
    assert set(reading) >= {"device", "boot", "seq", "readings", "gateway", "kafka"}
    assert reading["kafka"]["topic"] == kafka_topics["readings"]
    dead = next(line for line in lines if line["kind"] == "deadletter")
    assert base64.b64decode(dead["payload_b64"]) == POISON
    assert dead["source_topic"] == topics.batch_topic(GATEWAY) and dead["error"]
    assert {line["state"] for line in lines if line["kind"] == "status"} == {"online", "offline"}


def test_cli_table_shows_every_kind(pipeline, kafka_bootstrap, kafka_topics, capsys, monkeypatch):
    fill(pipeline, kafka_bootstrap, kafka_topics)
    monkeypatch.setenv("COLUMNS", "250")  # rich wraps cells to the terminal's width
    every = ",".join([kafka_topics["status"], kafka_topics["deadletter"]])
    assert cli_main(["consume", "--kafka", kafka_bootstrap, "--topic", every, "--from-beginning", "--dedup", "50"]) == 0
    out = capsys.readouterr().out
    assert "3 records, 1 duplicates dropped" in out
    assert "online" in out and "offline" in out and "fw=0.3.0" in out
    assert "dead letter" in out and f"{len(POISON)} bytes" in out


def test_cli_without_from_beginning_says_why_nothing_shows(pipeline, kafka_bootstrap, kafka_topics, capsys):
    bridge, gateway = pipeline
    gateway.send(batch(1, readings("dev-a", range(1, 2))))  # see TANSU_END
    assert cli_main(["consume", "--kafka", kafka_bootstrap, "--topic", kafka_topics["readings"]]) == 0
    out = capsys.readouterr().out
    assert "0 records" in out and "--from-beginning" in out


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_cli_follow_streams_until_stopped_and_commits(pipeline, kafka_bootstrap, kafka_topics, stop):
    bridge, gateway = pipeline
    topic = kafka_topics["readings"]
    group = f"follow-{uuid.uuid4().hex[:6]}"
    gateway.send(batch(1, readings("dev-a", range(1, 2))))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tern.cloud", "consume", "--kafka", kafka_bootstrap, "--topic", topic,
         "--from-beginning", "--follow", "--format", "json", "--dedup", "--group", group, "--timeout", "30"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
    )
    lines: list[dict] = []
    got = threading.Condition()

    def pump() -> None:
        for line in proc.stdout:
            with got:
                lines.append(json.loads(line))
                got.notify_all()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()

    def wait_lines(n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with got:
            while len(lines) < n:
                left = deadline - time.monotonic()
                assert left > 0 and proc.poll() is None, f"{len(lines)} of {n} lines; rc={proc.poll()}"
                got.wait(min(left, 0.5))

    try:
        wait_lines(1, 60)  # the old record: the consumer is in its group and reading
        gateway.send(batch(2, readings("dev-a", range(2, 5))))
        gateway.send(batch(3, readings("dev-a", range(3, 5))))  # a repeat: dropped by --dedup
        gateway.send(batch(4, readings("dev-a", range(5, 6))))
        wait_lines(5, 30)
        assert proc.poll() is None  # still following
        proc.send_signal(stop)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(5)
    assert [line["seq"] for line in lines] == [1, 2, 3, 4, 5]
    assert proc.returncode == 0, err
    assert "5 records, 2 duplicates dropped" in err
    # The group's offsets were committed on the way out: the next run sees only what is new.
    gateway.send(batch(5, readings("dev-a", range(6, 7))))
    assert [r.value["seq"] for r in read_tern(kafka_bootstrap, topic, group=group, timeout_s=30)] == [6]


def test_foreign_record_is_shown_as_invalid(kafka_bootstrap, kafka_topics, capsys):
    """A record on a Tern topic that no Tern part wrote: kind ``invalid``, with the codec's reason."""
    from aiokafka import AIOKafkaProducer

    async def produce() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
        await producer.start()
        try:
            await producer.send_and_wait(kafka_topics["readings"], b'{"schema":"other/1"}', key=b"k1")
            await producer.send_and_wait(kafka_topics["readings"], b"\xff\xfe", key=None)
        finally:
            await producer.stop()

    asyncio.run(produce())
    items = list(read_tern(kafka_bootstrap, kafka_topics["readings"], from_beginning=True, dedup_window=10, timeout_s=15))
    # Two partitions, likely: no order between them.
    assert sorted((r.kind, r.key or "") for r in items) == [("invalid", ""), ("invalid", "k1")]
    assert all(r.error and r.value is None and r.identity is None for r in items)
    by_key = {r.key: r for r in items}
    assert "unknown schema 'other/1'" in by_key["k1"].error
    assert "not JSON" in by_key[None].error
    assert cli_main(["consume", "--kafka", kafka_bootstrap, "--topic", kafka_topics["readings"], "--from-beginning",
                     "--format", "json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(base64.b64decode(line["payload_b64"]) for line in lines) == [b'{"schema":"other/1"}', b"\xff\xfe"]
    assert {line["kind"] for line in lines} == {"invalid"}


def test_cli_missing_topic_and_bad_options(kafka_bootstrap, capsys):
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    try:
        assert cli_main(["consume", "--kafka", f"127.0.0.1:{dead.getsockname()[1]}", "--timeout", "3"]) == 1
    finally:
        dead.close()
    err = capsys.readouterr().err
    assert "cannot reach Kafka" in err and len(err.strip().splitlines()) == 1
    assert cli_main(["consume", "--kafka", kafka_bootstrap, "--topic", f"nope.{uuid.uuid4().hex[:6]}", "--timeout", "2"]) == 1
    err = capsys.readouterr().err
    assert "not found" in err and len(err.strip().splitlines()) == 1
    assert cli_main(["consume", "--kafka", kafka_bootstrap, "--max", "0"]) == 2
    assert cli_main(["consume", "--kafka", kafka_bootstrap, "--dedup", "-1"]) == 2


def codec_error(payload: bytes) -> str:
    """The reason the codec gives for ``payload``: what the dead letter's header must say."""
    with pytest.raises(codec.CodecError) as info:
        codec.decode_batch(payload, topic_gateway=GATEWAY)
    return str(info.value)
