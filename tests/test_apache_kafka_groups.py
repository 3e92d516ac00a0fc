"""Consumer groups on Apache Kafka's real group coordinator (the 3-node session cluster).

- The command router: two ``tern-bridge run`` processes route commands in one consumer group
  (``--command-session-timeout``); the one holding the device's partition is SIGKILLed and
  the other takes its commands over within the session timeout; the real firmware on an
  emulated node executes every command exactly once (its console says so).
- ``tern-bridge consume --group``: two consumers in one group, one SIGKILLed; the other takes
  its partitions within ``--session-timeout`` and nothing is skipped.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from tern.core import codec
from tern.core.commands import Command
from tern.device.emulate import EmulatedNode
from tern.edge.service import Gateway
from tern.harness.kafka_cluster import ApacheKafkaCluster
from tern.harness.observe import wait_until
from tern.harness.stack import ensure_topics
from helpers.apache import fresh_names
from helpers import Proc, produce
from helpers.commands import OutcomeTail, executions, expiry
from helpers.pipeline import pipeline_gateway_config as gateway_config

pytestmark = [pytest.mark.apache_kafka, pytest.mark.xdist_group("apache_kafka")]

#: Kafka's smallest session timeout (group.min.session.timeout.ms): the quickest takeover.
SESSION_S = 6.0
#: After the session timeout the coordinator rebalances: the survivor learns of it at its
#: next heartbeat (a third of the session), rejoins, and fetches; this much on top is allowed.
REBALANCE_SLACK_S = SESSION_S / 3 + 4.0
SITE = "site-grp"


def router_bridge(tmp: Path, n: int, cloud: str, kafka: str, names: dict[str, str]) -> Proc:
    """``tern-bridge run`` with the command router on, in the test's command group."""
    return Proc(tmp / f"bridge-{n}.log",
                ["tern.cloud", "run", "--mqtt", cloud, "--kafka", kafka, "--topic", names["readings"],
                 "--status-topic", names["status"], "--deadletter", names["deadletter"], "--name", f"grp{n}",
                 "--share-group", names["share"], "--topic-partitions", "2", "--idempotence",
                 "--command-session-timeout", str(SESSION_S), "--stats-every", "0"],
                env={"TERN_KAFKA_COMMANDS_TOPIC": names["commands"],
                     "TERN_KAFKA_COMMAND_RESULTS_TOPIC": names["results"],
                     "TERN_BRIDGE_COMMAND_GROUP": names["group"]})


def routed(proc: Proc, command_id: str) -> bool:
    return f"command {command_id} (" in proc.log()


def test_a_killed_bridges_commands_are_routed_by_the_other_within_the_session_timeout(
        tmp_path: Path, mosquitto_factory, apache_kafka: ApacheKafkaCluster) -> None:
    pi, cloud = mosquitto_factory("pi"), mosquitto_factory("cloud")
    suffix = uuid.uuid4().hex[:8]
    names = dict(fresh_names("grp"), commands=f"grp.commands.{suffix}", results=f"grp.results.{suffix}",
                 group=f"grp-{suffix}", share=f"grp{suffix}")
    kafka = apache_kafka.bootstrap
    bridges = [router_bridge(tmp_path, n, cloud.address, kafka, names) for n in (1, 2)]
    gateway = Gateway(gateway_config(tmp_path, pi, cloud))
    node = EmulatedNode(tmp_path / "grp-1", device="grp-1", site=SITE, broker=pi.address, interval_ms=500)
    outcomes: OutcomeTail | None = None
    try:
        assert wait_until(lambda: all(" running: " in b.log() or b.process.poll() is not None for b in bridges), 60)
        assert all(b.process.poll() is None for b in bridges), [b.log()[-2000:] for b in bridges]
        outcomes = OutcomeTail(kafka, names["results"]).start()
        with gateway:
            assert gateway.wait_connected(30)
            node.start()
            # Both routers in the group (one command partition each) and the node's birth in
            # the status topic: the first command is routed and done.
            first = Command("g-0", "grp-1", "set_config", {"key": "bundle_max", "value": 3}, expires_ms=expiry(300))
            produce(kafka, names["commands"], [first])
            assert wait_until(lambda: outcomes.first("g-0", "done") is not None, 60), (
                outcomes.kinds("g-0"), [b.log()[-2000:] for b in bridges], node.log_text()[-2000:])
            owner = next(b for b in bridges if routed(b, "g-0"))
            other = next(b for b in bridges if b is not owner)

            owner.kill()  # no LeaveGroup: the coordinator must notice by the session timeout
            killed = time.monotonic()
            ids = [f"g-{i}" for i in range(1, 5)]
            produce(kafka, names["commands"], [Command(cid, "grp-1", "set_config", {"key": "bundle_max", "value": 3 + i},
                                                       expires_ms=expiry(300)) for i, cid in enumerate(ids, 1)])
            assert wait_until(lambda: routed(other, ids[0]), SESSION_S + REBALANCE_SLACK_S + 10, interval=0.05), (
                other.log()[-3000:])
            pickup_s = time.monotonic() - killed
            assert wait_until(lambda: all(outcomes.first(cid, "done") for cid in ids), 60), (
                {cid: outcomes.kinds(cid) for cid in ids}, other.log()[-3000:])
            done_s = time.monotonic() - killed
            for cid in ["g-0", *ids]:
                assert executions(node, cid) == 1, (cid, node.log_text()[-3000:])
            assert json.loads((node.workdir / "config.json").read_text())["bundle_max"] == 3 + len(ids)
            assert "Traceback" not in other.log(), other.log()[-3000:]
    finally:
        node.stop()
        for bridge in bridges:
            bridge.stop()
        if outcomes is not None:
            outcomes.stop()
    print(f"\ncommand router: bridge killed, its commands routed by the other after {pickup_s:.1f} s "
          f"(session timeout {SESSION_S:g} s), all {len(ids)} done after {done_s:.1f} s, each executed once")
    assert pickup_s <= SESSION_S + REBALANCE_SLACK_S, pickup_s


# --- tern-bridge consume --group ------------------------------------------------------------


class ConsumeProc:
    """``tern-bridge consume --group --follow --format json`` as a child; its lines collected."""

    def __init__(self, kafka: str, topic: str, group: str) -> None:
        self.lines: list[dict] = []
        self._lock = threading.Lock()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tern.cloud", "consume", "--kafka", kafka, "--topic", topic, "--group", group,
             "--from-beginning", "--follow", "--format", "json", "--session-timeout", str(SESSION_S),
             "--timeout", "30"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
            env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._lock:
                self.lines.append(json.loads(line))

    def seen(self) -> list[tuple[str, int, int]]:
        """(device, seq, partition) of every record printed so far."""
        with self._lock:
            return [(r["device"], r["seq"], r["kafka"]["partition"]) for r in self.lines]

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            _, err = self.process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate(timeout=10)
        return err or ""


def write_readings(kafka: str, topic: str, devices: list[str], seqs: range) -> None:
    """Reading records as the bridge writes them (key = device), acks=all."""
    async def go() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=kafka, acks="all")
        await producer.start()
        try:
            for seq in seqs:
                for device in devices:
                    reading = codec.Reading(device, "b0000001", seq, 1_700_000_000_000 + seq, {"n": seq}, site=SITE,
                                            received_ms=1)
                    record = codec.kafka_record(reading, "gw-grp", topic, 1)
                    await producer.send(topic, record.value, key=record.key, headers=list(record.headers))
            await producer.flush()
        finally:
            await producer.stop()

    asyncio.run(go())


def group_members(kafka: str, group: str) -> int:
    """Members of ``group`` when the coordinator says it is Stable (else 0)."""
    from aiokafka.admin import AIOKafkaAdminClient

    async def go() -> int:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka)
        try:
            await admin.start()
            (response,) = await admin.describe_consumer_groups([group])
            _, _, state, _, _, members, *_ = response.groups[0]
            return len(members) if state == "Stable" else 0
        except KafkaError:  # no coordinator for the new group yet: ask again
            return 0
        finally:
            await admin.close()

    return asyncio.run(go())


def test_consume_group_member_killed_the_other_takes_its_partitions_nothing_skipped(
        apache_kafka: ApacheKafkaCluster) -> None:
    kafka = apache_kafka.bootstrap
    topic = f"grp.consume.{uuid.uuid4().hex[:8]}"
    group = f"consume-{uuid.uuid4().hex[:8]}"
    asyncio.run(ensure_topics(kafka, [topic], partitions=4, replication=3, min_insync=2))
    devices = [f"dev-{i}" for i in range(8)]
    members = [ConsumeProc(kafka, topic, group), ConsumeProc(kafka, topic, group)]
    try:
        # Both in the group and the group settled; only then the first records, so each
        # member prints only from the partitions it keeps.
        assert wait_until(lambda: group_members(kafka, group) == 2, 60), [m.process.poll() for m in members]
        write_readings(kafka, topic, devices, range(1, 6))
        assert wait_until(lambda: len({(d, s) for m in members for d, s, _ in m.seen()}) == 5 * len(devices)
                          and all(m.seen() for m in members), 60), [len(m.seen()) for m in members]
        assert all(m.process.poll() is None for m in members)
        split = [{p for _, _, p in m.seen()} for m in members]
        assert not split[0] & split[1], split
        victim, survivor = members
        victim.kill()
        killed = time.monotonic()
        write_readings(kafka, topic, devices, range(6, 11))
        mine = lambda: {(d, s) for d, s, p in survivor.seen() if p in split[0] and s >= 6}  # noqa: E731
        expected_victims = {(d, s) for d, s, p in victim.seen()}  # devices of the victim's partitions
        victim_devices = {d for d, _ in expected_victims}
        wanted = {(d, s) for d in victim_devices for s in range(6, 11)}
        assert wait_until(lambda: wanted <= mine(), SESSION_S + REBALANCE_SLACK_S + 10, interval=0.05), (
            sorted(wanted - mine())[:10])
        takeover_s = time.monotonic() - killed
        wait_until(lambda: len({(d, s) for d, s, _ in survivor.seen() if s >= 6}) == 5 * len(devices), 20)
    finally:
        errors = [m.stop() for m in members]
    everything = {(d, s) for m in members for d, s, _ in m.seen()}
    assert everything == {(d, s) for d in devices for s in range(1, 11)}, sorted(
        {(d, s) for d in devices for s in range(1, 11)} - everything)[:10]
    # Per device, the survivor printed the taken-over partitions' records in seq order.
    for device in victim_devices:
        seqs = [s for d, s, _ in survivor.seen() if d == device]
        assert seqs == sorted(seqs), (device, seqs)
    redelivered = len(survivor.seen()) + len(victim.seen()) - len(everything)
    print(f"\nconsume --group: member killed, the other took its partitions {sorted(split[0])} and printed "
          f"their new records {takeover_s:.1f} s later (session timeout {SESSION_S:g} s); "
          f"{redelivered} printed twice (printed, not yet committed, by the killed one); {errors[1].strip().splitlines()[-1]}")
    assert takeover_s <= SESSION_S + REBALANCE_SLACK_S, takeover_s
