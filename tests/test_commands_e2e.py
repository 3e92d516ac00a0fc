"""Commands end to end on real parts (issue 17, "Done when"): a command record written to
Kafka the way the cloud team writes it -> bridge (command router) -> cloud mosquitto -> gateway
(SQLite outbox) -> Pi mosquitto -> the real firmware on an emulated node (MicroPython unix
port); the node's reply and every outcome back through the gateway's batches and the bridge to
the results topic in Kafka (Tansu).

The node's console says ``TERN cmd <id> <name> ok`` once per command it *executes* (a
redelivery prints ``TERN cmd_dup <id>`` instead): that line is how these tests count executions.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import statistics
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from tern.harness.faultproxy import FaultProxy
from tern.cloud.bridge import BridgeThread
from tern.cloud.config import BridgeConfig
from tern.core.commands import Command
from tern.device.emulate import EmulatedNode
from tern.edge.config import GatewayConfig
from tern.edge.service import Gateway
from tern.harness.observe import KafkaTail, wait_until
from tern.harness.stack import Mosquitto

from helpers import Proc, committed, produce
from helpers.commands import OutcomeTail, executions, expiry

SITE = "site-cmd"
DEADLINE = 45.0


# --- helpers ---------------------------------------------------------------------------------


def node_ts(tail: KafkaTail, device: str) -> list[int]:
    """The node's reading timestamps in Kafka, one per (boot, seq), in time order."""
    seen = {(value["boot"], value["seq"]): value["ts_ms"] for identity, value, _ in tail.records() if identity[0] == device}
    return sorted(seen.values())


@pytest.fixture
def names(command_topics: dict[str, str]) -> dict[str, str]:
    """The command topics, and the bridge's command consumer group."""
    return dict(command_topics, group=f"cmd-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def stack(tmp_path: Path, mosquitto_factory, kafka_bootstrap: str, names: dict[str, str]) -> Iterator[dict[str, Any]]:
    """Pi and cloud mosquitto, the gateway and the bridge (commands on) in this process."""
    pi, cloud = mosquitto_factory("pi"), mosquitto_factory("cloud")
    gateway = Gateway(GatewayConfig(gateway_id="gw-cmd", local_broker=pi.address, cloud_broker=cloud.address,
                                    outbox_path=tmp_path / "outbox.db", reconnect_max_s=1.0))
    bridge = BridgeThread(BridgeConfig(
        name="cmd", mqtt_broker=cloud.address, kafka_bootstrap=kafka_bootstrap,
        readings_topic=names["readings"], status_topic=names["status"], deadletter_topic=names["deadletter"],
        commands=True, commands_topic=names["commands"], command_results_topic=names["results"],
        command_group=names["group"],
    ))
    with gateway, bridge:
        tail = KafkaTail(kafka_bootstrap, names["readings"]).start()
        outcomes = OutcomeTail(kafka_bootstrap, names["results"]).start()
        try:
            yield {"pi": pi, "gateway": gateway, "tail": tail, "outcomes": outcomes, "tmp": tmp_path,
                   "kafka": kafka_bootstrap, **names}
        finally:
            outcomes.stop()
            tail.stop()


# --- 1. set_interval, through `tern-bridge command --wait` -----------------------------------


def test_set_interval_changes_the_rate_seen_in_kafka_and_its_outcome_lands_in_the_results_topic(
    stack, capsys
) -> None:
    from tern.cloud.cli import main as cli_main

    tail: KafkaTail = stack["tail"]
    outcomes: OutcomeTail = stack["outcomes"]
    node = EmulatedNode(stack["tmp"] / "rate-1", device="rate-1", site=SITE, broker=stack["pi"].address,
                        interval_ms=1000)
    try:
        node.start()
        # Readings at the old rate in Kafka (their birth went the same way: the router can route).
        assert wait_until(lambda: len(node_ts(tail, "rate-1")) >= 4, DEADLINE), node.log_text()
        sent = time.monotonic()
        code = cli_main(["command", "rate-1", "set_interval", "ms=250", "--id", "c-rate", "--kafka", stack["kafka"],
                         "--topic", stack["commands"], "--results-topic", stack["results"], "--wait", "40"])
        printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert code == 0, (printed, node.log_text())
        assert [p.get("outcome") for p in printed[1:]] == ["delivered", "done"], printed
        assert printed[-1]["reply"] == {"interval_ms": 250, "persisted": True, "applied": True}

        # The same outcomes, read independently from the results topic.
        assert wait_until(lambda: outcomes.first("c-rate", "done") is not None, 10), outcomes.kinds("c-rate")
        delivered_at, delivered = outcomes.first("c-rate", "delivered")
        done_at, done = outcomes.first("c-rate", "done")
        assert delivered.device == done.device == "rate-1" and done.gateway == "gw-cmd"
        assert dict(done.reply) == {"interval_ms": 250, "persisted": True, "applied": True}
        assert executions(node, "c-rate") == 1

        # The rate, from the node's timestamps in Kafka: before the command vs. after it.
        changed_ms = int(time.time() * 1000) - int((time.monotonic() - done_at) * 1000)
        assert wait_until(lambda: sum(1 for t in node_ts(tail, "rate-1") if t > changed_ms) >= 8, DEADLINE)
        ts = node_ts(tail, "rate-1")
        before = [b - a for a, b in zip(ts, ts[1:]) if b < changed_ms - 2000]
        after = [b - a for a, b in zip(ts, ts[1:]) if a > changed_ms]
        gap_before, gap_after = statistics.median(before), statistics.median(after)
        print(f"\nset_interval: gap before {gap_before:.0f} ms, after {gap_after:.0f} ms; "
              f"delivered {delivered_at - sent:.2f} s, done {done_at - sent:.2f} s after the CLI started")
        assert 850 <= gap_before <= 1300, before
        assert 150 <= gap_after <= 450, after
    finally:
        node.stop()


# --- 2. an offline node: delivered when it returns; expired if the expiry comes first --------


def test_a_command_for_an_offline_node_waits_for_it_and_one_that_expires_first_ends_expired(stack) -> None:
    outcomes: OutcomeTail = stack["outcomes"]
    gateway: Gateway = stack["gateway"]
    tail: KafkaTail = stack["tail"]
    node = EmulatedNode(stack["tmp"] / "away-1", device="away-1", site=SITE, broker=stack["pi"].address,
                        interval_ms=500)
    try:
        node.start()
        assert wait_until(lambda: len(node_ts(tail, "away-1")) >= 2, DEADLINE), node.log_text()
        node.stop()  # says offline and disconnects
        assert wait_until(lambda: gateway.stats()["nodes_offline"] == 1, 20), gateway.stats()

        # A malformed record: a rejected outcome with the reason, keyed by its device. (It also
        # shows the router has joined its group and is consuming, before the expiry clock runs.)
        malformed = (b"away-1", b'{"schema": "tern.command/1", "id": "c-bad", "device": "away-1", "name": "Reboot Now!"}')
        produce(stack["kafka"], stack["commands"], [malformed])
        assert wait_until(lambda: outcomes.first("c-bad", "rejected") is not None, 30), outcomes.kinds("c-bad")
        assert "invalid command name" in outcomes.first("c-bad", "rejected")[1].detail

        later = Command("c-later", "away-1", "set_config", {"key": "bundle_max", "value": 4}, expires_ms=expiry(120))
        soon = Command("c-soon", "away-1", "set_interval", {"ms": 300}, expires_ms=expiry(4))
        sent = produce(stack["kafka"], stack["commands"], [later, soon])
        # Both reach the gateway, which holds them for the absent node.
        assert wait_until(lambda: gateway.stats()["commands_received"] == 2, 4), gateway.stats()
        assert wait_until(lambda: outcomes.first("c-soon", "expired") is not None, 30), outcomes.kinds("c-soon")
        expired_at, _ = outcomes.first("c-soon", "expired")
        # Both reached the gateway and waited there; neither went to the absent node.
        assert outcomes.kinds("c-soon") == ["expired"]
        assert outcomes.kinds("c-later") == []
        pending = gateway.stats()
        assert pending["commands_expired"] == 1 and pending["commands_pending"] == 1, pending  # the gateway expired it
        back = time.monotonic()
        node.start()
        assert wait_until(lambda: outcomes.first("c-later", "done") is not None, DEADLINE), (
            outcomes.kinds("c-later"), node.log_text())
        done_at, done = outcomes.first("c-later", "done")
        assert outcomes.kinds("c-later") == ["delivered", "done"]
        assert dict(done.reply)["key"] == "bundle_max" and dict(done.reply)["applied"] is True
        assert executions(node, "c-later") == 1 and executions(node, "c-soon") == 0
        assert json.loads((node.workdir / "config.json").read_text())["bundle_max"] == 4
        print(f"\noffline: expired {expired_at - sent:.2f} s after writing (expiry 4 s); "
              f"done {done_at - back:.2f} s after the node came back; gateway before: "
              f"{ {k: v for k, v in pending.items() if 'command' in k} }")
    finally:
        node.stop()


# --- 3. bridge and gateway killed with -9 at their worst moments -----------------------------


def bridge_process(tmp: Path, n: int, broker: str, names: dict[str, str], kafka: str) -> Proc:
    return Proc(tmp / f"bridge-{n}.log",
                ["tern.cloud", "run", "--mqtt", broker, "--kafka", kafka, "--topic", names["readings"],
                 "--status-topic", names["status"], "--deadletter", names["deadletter"], "--name", "cmdkill",
                 "--stats-every", "0"],
                env={"TERN_KAFKA_COMMANDS_TOPIC": names["commands"],
                     "TERN_KAFKA_COMMAND_RESULTS_TOPIC": names["results"],
                     "TERN_BRIDGE_COMMAND_GROUP": names["group"]})


def gateway_process(tmp: Path, n: int, pi: Mosquitto, cloud: Mosquitto) -> Proc:
    return Proc(tmp / f"gateway-{n}.log",
                ["tern.edge", "run", "--gateway-id", "gw-kill", "--local", pi.address, "--cloud", cloud.address,
                 "--outbox", str(tmp / "outbox.db"), "--reconnect-max-s", "1"])


def stored(outbox: Path, command_id: str) -> tuple | None:
    """The gateway's row for ``command_id`` (received_ms, delivered_ms), or None."""
    if not outbox.exists():
        return None
    db = sqlite3.connect(f"file:{outbox}?mode=ro", uri=True, timeout=5)
    try:
        return db.execute("SELECT received_ms, delivered_ms FROM commands WHERE id = ?", (command_id,)).fetchone()
    except sqlite3.OperationalError:  # the table is not there yet
        return None
    finally:
        db.close()


@pytest.mark.slow
def test_bridge_and_gateway_killed_with_sigkill_still_deliver_every_command_once(
    tmp_path: Path, mosquitto_factory, kafka_bootstrap: str, names: dict[str, str]
) -> None:
    pi, cloud = mosquitto_factory("pi"), mosquitto_factory("cloud")
    outbox = tmp_path / "outbox.db"
    procs: list[Proc] = []
    node = EmulatedNode(tmp_path / "kill-1", device="kill-1", site=SITE, broker=pi.address, interval_ms=500)
    with FaultProxy("127.0.0.1", cloud.port) as proxy:  # between the bridge and the cloud broker
        tail = KafkaTail(kafka_bootstrap, names["readings"]).start()
        outcomes = OutcomeTail(kafka_bootstrap, names["results"]).start()
        try:
            gateway = gateway_process(tmp_path, 1, pi, cloud)
            bridge = bridge_process(tmp_path, 1, proxy.address, names, kafka_bootstrap)
            procs += [gateway, bridge]
            node.start()
            assert wait_until(lambda: len(node_ts(tail, "kill-1")) >= 2, DEADLINE), (bridge.log()[-2000:], node.log_text())

            # (a) The bridge: its router consumes the command but the broker never takes it
            # (the link is a black hole), and the bridge dies before committing the offset.
            proxy.set_mode("blackhole")
            one = Command("c-kill-b", "kill-1", "set_config", {"key": "bundle_max", "value": 5}, expires_ms=expiry(300))
            produce(kafka_bootstrap, names["commands"], [one])
            assert wait_until(lambda: "command c-kill-b not accepted by the cloud broker" in bridge.log(), DEADLINE), (
                bridge.log()[-3000:])
            bridge.kill()
            assert stored(outbox, "c-kill-b") is None and executions(node, "c-kill-b") == 0
            assert committed(kafka_bootstrap, names["group"], names["commands"]) == 0  # consumed, never committed
            proxy.set_mode("pass")
            restarted = time.monotonic()
            bridge = bridge_process(tmp_path, 2, proxy.address, names, kafka_bootstrap)
            procs.append(bridge)
            assert wait_until(lambda: outcomes.first("c-kill-b", "done") is not None, DEADLINE), (
                outcomes.kinds("c-kill-b"), bridge.log()[-3000:], node.log_text()[-3000:])
            bridge_latency = outcomes.first("c-kill-b", "done")[0] - restarted
            assert wait_until(lambda: committed(kafka_bootstrap, names["group"], names["commands"]) == 1, 20)

            # (b) The gateway: killed as soon as the command is committed in its outbox (its
            # PUBACK may or may not have left; the broker keeps it until one does).
            two = Command("c-kill-g", "kill-1", "set_config", {"key": "bundle_max", "value": 6}, expires_ms=expiry(300))
            produce(kafka_bootstrap, names["commands"], [two])
            assert wait_until(lambda: stored(outbox, "c-kill-g") is not None, DEADLINE, interval=0.005), gateway.log()[-3000:]
            gateway.kill()
            at_kill = stored(outbox, "c-kill-g")
            restarted = time.monotonic()
            gateway = gateway_process(tmp_path, 2, pi, cloud)
            procs.append(gateway)
            assert wait_until(lambda: outcomes.first("c-kill-g", "done") is not None, DEADLINE), (
                outcomes.kinds("c-kill-g"), gateway.log()[-3000:], node.log_text()[-3000:])
            gateway_latency = outcomes.first("c-kill-g", "done")[0] - restarted

            # (c) The gateway again, killed after the local broker took the command for the node
            # but before the node's reply came back: the node is frozen meanwhile (the command
            # waits in its socket). The restarted gateway sends it again; the node runs it once.
            os.kill(node.process.pid, signal.SIGSTOP)
            try:
                three = Command("c-kill-r", "kill-1", "set_config", {"key": "bundle_max", "value": 7},
                                expires_ms=expiry(300))
                produce(kafka_bootstrap, names["commands"], [three])
                assert wait_until(lambda: (stored(outbox, "c-kill-r") or (0, None))[1] is not None, DEADLINE), (
                    gateway.log()[-3000:])
                gateway.kill()
            finally:
                os.kill(node.process.pid, signal.SIGCONT)
            restarted = time.monotonic()
            gateway = gateway_process(tmp_path, 3, pi, cloud)
            procs.append(gateway)
            assert wait_until(lambda: outcomes.first("c-kill-r", "done") is not None, DEADLINE), (
                outcomes.kinds("c-kill-r"), gateway.log()[-3000:], node.log_text()[-3000:])
            reply_latency = outcomes.first("c-kill-r", "done")[0] - restarted

            # Every command delivered, each executed exactly once by the node.
            for cid, value in (("c-kill-b", 5), ("c-kill-g", 6), ("c-kill-r", 7)):
                kinds = outcomes.kinds(cid)
                assert "delivered" in kinds and kinds.count("done") >= 1 and set(kinds) <= {"delivered", "done"}, kinds
                assert dict(outcomes.first(cid, "done")[1].reply)["value"] == value
                assert executions(node, cid) == 1, node.log_text()
            assert "Traceback" not in bridge.log() + gateway.log(), (bridge.log()[-2000:], gateway.log()[-2000:])
            assert json.loads((node.workdir / "config.json").read_text())["bundle_max"] == 7
            dups = node.log_text().count("TERN cmd_dup")
            print(f"\nkill -9: bridge -> done {bridge_latency:.2f} s after the new bridge started; gateway killed "
                  f"with the command stored (delivered_ms={at_kill[1]}), done {gateway_latency:.2f} s after "
                  f"the restart; killed between delivery and reply: done {reply_latency:.2f} s after the restart; "
                  f"node redeliveries answered as duplicates: {dups}")
        finally:
            node.stop()
            for proc in procs:
                proc.stop()
            outcomes.stop()
            tail.stop()
