"""``make demo``: the whole path on loopback, told as a story.

Starts the Pi's mosquitto and the cloud's mosquitto, Kafka (Tansu, or with ``TERN_KAFKA=apache``
a 3-node Apache Kafka cluster; or the Kafka named by ``KAFKA_BOOTSTRAP``), the gateway, the
bridge and N emulated ESP32 nodes running the real firmware on the MicroPython unix port. Then
it tells what Tern is for, one narrated line per event, every figure read from the system:

1. the nodes report (readings in Kafka, node→Kafka latency);
2. the Pi's uplink is cut: the outbox grows while the nodes stay acknowledged;
3. one node is killed (SIGKILL): its last will waits in the outbox;
4. the uplink returns: the backlog drains, the will reaches Kafka as ``offline``;
5. a command through Kafka changes one node's interval, and its readings in Kafka show it;
6. the nodes stop; a per-node summary of sent, received, missing, duplicated.

``--plain`` runs the old form (the nodes just report). ``--format json`` prints one JSON
document at the end instead of the tables (the narration goes to stderr). Exit status 0 only
when nothing is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import statistics
import sys
import tempfile
import textwrap
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from tern.core import codec, commands, topics
from tern.core.errors import TernError
from tern.harness.faultproxy import FaultProxy
from tern.harness.kafka import kafka_kind, start_kafka
from tern.harness.observe import BrokerObserver, KafkaTail, Reconciliation, TopicTail, reconcile
from tern.harness.secure import SecureSite
from tern.harness.stack import Mosquitto, kafka_bootstrap_from_env
from tern.tables import Column, fitted_table

console = Console()

#: The JSON document's schema id (``--format json``).
DOCUMENT_SCHEMA = "tern.demo/1"

#: Counters the firmware adds to a reading when a sensor misbehaves (see tern_sensors.py).
FAULT_COUNTERS = ("sensor_err", "bad_frames")

#: What each emulated node carries: an ADC, an I2C TMP102 and a serial sensor on UART2 whose
#: frames come from the host's simulator, one in twenty of them deliberately broken.
DEMO_SENSORS = [
    {"type": "adc", "name": "adc_mv", "pin": 34},
    {"type": "tmp102", "name": "temp_c", "i2c": 0, "scl": 18, "sda": 19, "addr": 72},
    {"type": "uart", "uart": 2, "protocol": "pms5003", "sim": {"interval_s": 0.25, "bad_fraction": 0.05}},
]

#: Seconds the nodes publish: a default run takes about 90 s with start-up and drain.
DEFAULT_DURATION_S = 80.0
#: ``--quick`` (the test suite's form): about 30 s in all.
QUICK_DURATION_S = 16.0

#: The live table: the node id never gives way; the readings' values go first.
LIVE_COLUMNS = (
    Column("node"),
    Column("status", drop_order=1),
    Column("sent", justify="right"),
    Column("in Kafka", justify="right"),
    Column("node→Kafka", drop_order=2, justify="right"),
    Column("last seq", drop_order=3, justify="right"),
    Column("faults", drop_order=4),
    Column("last readings", drop_order=5),
)

SUMMARY_COLUMNS = (
    Column("node"),
    Column("sent", justify="right"),
    Column("in Kafka", justify="right"),
    Column("missing", justify="right"),
    Column("out of order", drop_order=1, justify="right"),
    Column("duplicated", drop_order=2, justify="right"),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (the flags of the plain demo keep their meaning)."""
    parser = argparse.ArgumentParser(prog="tern-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=5, help="emulated nodes (default 5)")
    parser.add_argument("--duration", type=float, default=None,
                        help=f"seconds the nodes publish; the story's acts scale with it "
                             f"(default {DEFAULT_DURATION_S:g}, {QUICK_DURATION_S:g} with --quick)")
    parser.add_argument("--quick", action="store_true", help="the short story (about 30 s in all)")
    parser.add_argument("--plain", action="store_true",
                        help="no story: the nodes just report for --duration (no outage, kill or command)")
    parser.add_argument("--interval-ms", type=int, default=1000, help="reading period of each node (default 1000)")
    parser.add_argument("--command-interval-ms", type=int, default=None,
                        help="the interval the command sets on the first node (default a quarter of --interval-ms)")
    parser.add_argument("--drain", type=float, default=30.0,
                        help="seconds to wait at most for a backlog or the last readings (default 30)")
    parser.add_argument("--workdir", type=Path, help="where brokers, outbox and node flash live (default: a temp dir)")
    parser.add_argument("--site", default="demo-site")
    parser.add_argument("--gateway-id", default="pi-gw-1")
    parser.add_argument("--insecure", action="store_true",
                        help="open brokers: no accounts, no ACLs, no TLS (default: secured, see docs/security.md)")
    parser.add_argument("--format", choices=("text", "json"), default="text",
                        help="text: narration and tables; json: one JSON document on stdout at the end "
                             "(the narration goes to stderr)")
    parser.add_argument("--json-file", type=Path, help="also write the JSON document to this file")
    args = parser.parse_args(argv)
    if args.duration is None:
        args.duration = QUICK_DURATION_S if args.quick else DEFAULT_DURATION_S
    if not 1 <= args.nodes <= 100:
        parser.error("--nodes must be between 1 and 100")
    if args.duration <= 0 or args.interval_ms < 10:
        parser.error("--duration must be positive and --interval-ms at least 10")
    if not args.plain and args.nodes < 2:
        parser.error("the story kills one node and commands another: --nodes must be at least 2 (or --plain)")
    if args.command_interval_ms is None:
        args.command_interval_ms = max(50, args.interval_ms // 4)
    if args.command_interval_ms < 10 or args.drain <= 0:
        parser.error("--command-interval-ms must be at least 10 and --drain positive")
    return args


# --- the plan and the narrator ---------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """When the story's acts happen, in seconds from the nodes' start, scaled to the duration."""

    duration_s: float
    #: The nodes report before anything goes wrong.
    report_s: float
    #: How long the uplink stays cut.
    outage_s: float

    @classmethod
    def scaled(cls, duration_s: float) -> "Plan":
        """Under a third of the time reporting, four tenths cut off; the command and its
        measurement take the rest (at least long enough for a few new gaps)."""
        return cls(duration_s, report_s=max(3.0, 0.28 * duration_s), outage_s=max(4.0, 0.4 * duration_s))


@dataclass
class Event:
    """One narrated event: what was said, when, and the figures it was made of."""

    name: str
    at_s: float
    says: str
    figures: dict[str, Any] = field(default_factory=dict)

    def document(self) -> dict[str, Any]:
        """The event in the JSON document."""
        return {"event": self.name, "at_s": round(self.at_s, 2), "says": self.says, **self.figures}


class Narrator:
    """Says each event on one line (seconds since the nodes started, then the text; a long
    text wraps under itself, never under the time) and keeps it for the JSON document."""

    def __init__(self, out: Console) -> None:
        self.out = out
        self.started = time.monotonic()
        self.events: list[Event] = []

    def say(self, event: str, text: str, **figures: Any) -> Event:
        """Narrate ``text`` now; ``figures`` are the real values it was made of."""
        said = Event(event, time.monotonic() - self.started, text, figures)
        self.events.append(said)
        stamp = f"{said.at_s:3.0f} s "
        # Wrapped here, at words, under the text (never under the time), with no padding to
        # the console's width: a piped copy reads as plain lines.
        lines = textwrap.wrap(text, width=max(40, self.out.width), initial_indent=stamp,
                              subsequent_indent=" " * len(stamp), break_on_hyphens=False)
        # One print for the whole event: a live table above which it is printed redraws once.
        self.out.print(Text("\n").join(Text(line[:len(stamp)], style="cyan") + Text(line[len(stamp):])
                                       for line in lines), soft_wrap=True)
        return said


def median_ms(values: Sequence[float]) -> int | None:
    """The median rounded to a millisecond, None for no values."""
    return round(statistics.median(values)) if values else None


def percentile(values: Sequence[float], q: float) -> int | None:
    """The ``q`` quantile (0..1, nearest rank), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered) + 0.5)) - 1))])


# --- tables -------------------------------------------------------------------------------------


def live_view(observer: BrokerObserver, tail: KafkaTail, elapsed: float, duration: float, phase: str,
              width: int) -> Table:
    """The refreshed table: one row per node, what it sent and what Kafka holds, fitted to ``width``."""
    sent = observer.snapshot()
    arrived: dict[str, list[dict]] = {}
    for (device, _, _), value, _ in tail.records():
        arrived.setdefault(device, []).append(value)
    rows = []
    for device in sorted(set(sent) | set(arrived) | set(observer.status), key=node_order):
        status = observer.status.get(device)
        values = arrived.get(device, [])
        last = values[-1] if values else None
        state = status.state if status else "?"
        readings = dict(last["readings"]) if last else {}
        faults = {name: readings.pop(name) for name in FAULT_COUNTERS if name in readings}
        rows.append((
            device,
            Text(state, style="green" if state == "online" else "red"),
            str(len(sent.get(device, []))),
            str(len(values)),
            f"{last['bridge_ms'] - last['ts_ms']} ms" if last else "-",
            str(last["seq"]) if last else "-",
            " ".join(f"{k}={v}" for k, v in sorted(faults.items())) or "-",
            " ".join(f"{k}={v}" for k, v in sorted(readings.items())) or "-",
        ))
    return fitted_table(LIVE_COLUMNS, rows, width, title=f"Tern demo: {phase}, {elapsed:.0f}/{duration:.0f} s")


def condense(values: Sequence[int], most: int) -> list[int]:
    """At most ``most`` of ``values``: the first, the last and evenly spaced ones between."""
    if len(values) <= most:
        return list(values)
    step = (len(values) - 1) / (most - 1)
    return [values[round(i * step)] for i in range(most)]


def node_order(device: str) -> tuple[str, int]:
    """node-2 before node-10."""
    stem, _, number = device.rpartition("-")
    return (stem, int(number)) if number.isdigit() else (device, 0)


def summary_table(result: Reconciliation, width: int) -> Table:
    """Per node and in all: sent, in Kafka, missing, out of order, duplicated; fitted to ``width``."""
    rows: list[tuple] = []
    for device in sorted(result.sent, key=node_order):
        missing = result.missing[device]
        rows.append((device, str(result.sent[device]), str(result.received[device]),
                     Text(str(missing), style="red" if missing else "green"),
                     str(result.out_of_order[device]), str(result.duplicated[device])))
    rows.append((Text("all", style="bold"), str(sum(result.sent.values())), str(sum(result.received.values())),
                 str(result.total_missing), str(sum(result.out_of_order.values())),
                 str(sum(result.duplicated.values()))))
    return fitted_table(SUMMARY_COLUMNS, rows, width, title="Summary: readings per node")


def document(result: Reconciliation, events: list[Event], **extra: Any) -> dict[str, Any]:
    """The ``--format json`` document: per node sent/received/missing/duplicated/out of order,
    the totals, every narrated event with its figures, and ``extra`` (Kafka, gateway, bridge)."""
    nodes = {
        device: {"sent": result.sent[device], "received": result.received[device],
                 "missing": result.missing[device], "duplicated": result.duplicated[device],
                 "out_of_order": result.out_of_order[device]}
        for device in sorted(result.sent, key=node_order)
    }
    totals = {key: sum(node[key] for node in nodes.values())
              for key in ("sent", "received", "missing", "duplicated", "out_of_order")}
    return {"schema": DOCUMENT_SCHEMA, "ok": result.total_missing == 0, "nodes": nodes, "totals": totals,
            "events": [event.document() for event in events], **extra}


# --- the story ------------------------------------------------------------------------------------


@dataclass
class Parts:
    """What the story acts on and reads from."""

    fleet: Any  # tern.device.emulate.Fleet
    gateway: Any  # tern.edge.service.Gateway
    bridge: Any  # tern.cloud.bridge.BridgeThread
    uplink: FaultProxy
    observer: BrokerObserver
    tail: KafkaTail
    statuses: TopicTail
    outcomes: TopicTail
    bootstrap: str
    status_topic: str
    commands_topic: str


class Story:
    """The acts of the demo, each narrated as it happens with figures read from the system."""

    def __init__(self, args: argparse.Namespace, plan: Plan, parts: Parts, narrator: Narrator,
                 refresh: Callable[[str], None], stopping: Callable[[], bool]) -> None:
        self.args = args
        self.plan = plan
        self.parts = parts
        self.narrator = narrator
        self._refresh = refresh
        self.stopping = stopping
        self.phase = "reporting"

    # --- time ------------------------------------------------------------------------------
    def elapsed(self) -> float:
        """Seconds since the nodes started."""
        return time.monotonic() - self.narrator.started

    def until(self, at_s: float) -> None:
        """Let the system run until ``at_s`` seconds after the start (or a Ctrl-C)."""
        self.wait(lambda: False, at_s - self.elapsed())

    def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Poll ``predicate`` for at most ``timeout`` s, keeping the live table fresh."""
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            if predicate():
                return True
            if time.monotonic() >= deadline or self.stopping():
                return False
            self._refresh(self.phase)
            time.sleep(0.1)

    def say(self, event: str, text: str, **figures: Any) -> Event:
        """Narrate one event."""
        return self.narrator.say(event, text, **figures)

    # --- readings -----------------------------------------------------------------------------
    def node_ts(self, device: str) -> list[int]:
        """The node's reading timestamps in Kafka, one per (boot, seq), in time order."""
        seen = {(v["boot"], v["seq"]): v["ts_ms"] for (d, _, _), v, _ in self.parts.tail.records() if d == device}
        return sorted(seen.values())

    def unacked(self) -> dict[str, int]:
        """Per running node: readings it published that its broker has not acknowledged yet."""
        return {n.device: max(0, n.sent - n.acked) for n in self.parts.fleet if n.running}

    # --- the acts --------------------------------------------------------------------------------
    def report(self) -> None:
        """1. The nodes report: readings reach Kafka."""
        self.until(self.plan.report_s)
        records = self.parts.tail.records()
        latencies = [v["bridge_ms"] - v["ts_ms"] for _, v, _ in records]
        devices = {identity[0] for identity, _, _ in records}
        med, p95 = median_ms(latencies), percentile(latencies, 0.95)
        self.say("report", f"{len(devices)} nodes report: {len(records)} readings in Kafka so far; "
                           f"node→Kafka {med} ms median, {p95} ms p95",
                 nodes=len(devices), readings_in_kafka=len(records), latency_ms={"median": med, "p95": p95})

    def cut(self) -> float:
        """2. The uplink is cut; the outbox grows while the nodes stay acknowledged. 3. One
        node is killed meanwhile. Returns when the uplink returns (monotonic time)."""
        gateway, uplink = self.parts.gateway, self.parts.uplink
        self.phase = "uplink cut"
        cut_at = time.monotonic()
        # Connections from the gateway to the cloud broker are reset and new ones refused, as
        # when the Pi's network drops; the cloud side (broker, bridge, Kafka) stays up.
        uplink.set_mode("refuse")
        seen = self.wait(lambda: not gateway.stats()["cloud_connected"], 10)
        self.say("uplink_cut", "uplink cut: the Pi cannot reach the cloud broker "
                               + (f"(the gateway saw it after {time.monotonic() - cut_at:.1f} s)" if seen
                                  else "(the gateway has not noticed yet)")
                               + "; readings now wait in the outbox",
                 gateway_noticed_s=round(time.monotonic() - cut_at, 2) if seen else None)
        start = self.elapsed()
        self.until(start + self.plan.outage_s * 0.35)
        self.depth("outbox_growing")
        self.until(start + self.plan.outage_s * 0.5)
        self.kill()
        self.until(start + self.plan.outage_s)
        self.depth("outbox_before_return")
        self.phase = "uplink back"
        uplink.set_mode("pass")
        return time.monotonic()

    def depth(self, name: str) -> None:
        """Narrate the outbox depth (the gateway's own stats) and the nodes' unacked counts."""
        stats = self.parts.gateway.stats()
        unacked = self.unacked()
        age = stats["oldest_pending_age_s"]
        self.say(name, f"outbox {stats['pending']} readings, {stats['status_pending']} status"
                       + (f", oldest {age:.0f} s" if age is not None else "")
                       + f"; nodes unacked: {max(unacked.values(), default=0)} at most",
                 outbox_pending=stats["pending"], outbox_status_pending=stats["status_pending"],
                 oldest_pending_s=None if age is None else round(age, 1), nodes_unacked=unacked)

    def kill(self) -> None:
        """3. One node is killed: no goodbye, so its broker publishes its last will."""
        node = self.parts.fleet[-1]
        gateway = self.parts.gateway
        before = gateway.stats()["status_pending"]
        self.killed, self.killed_at = node, time.monotonic()
        node.kill()
        queued = self.wait(lambda: gateway.stats()["status_pending"] > before, 10)
        stats = gateway.stats()
        self.say("node_killed", f"{node.device} killed (SIGKILL) after {node.sent} readings: its last will "
                                + ("waits in the outbox" if queued else "is not in the outbox (yet)")
                                + f" ({stats['status_pending']} status queued)",
                 device=node.device, boot=node.boot, readings_published=node.sent, will_queued=queued,
                 outbox_status_pending=stats["status_pending"])

    def restore(self, back_at: float) -> None:
        """4. The uplink returns: the backlog drains, visibly; the will reaches Kafka."""
        gateway, statuses = self.parts.gateway, self.parts.statuses
        device = self.killed.device
        self.phase = "draining"
        stats = gateway.stats()
        depths = [stats["pending"] + stats["status_pending"]]  # readings and statuses queued
        batches_before = stats["batches_confirmed"]
        reconnected_at: float | None = None
        drained_at: float | None = None
        will: tuple[float, dict] | None = None
        said_at = back_at

        def offline_will() -> tuple[float, dict] | None:
            # This node's "offline" consumed from the status topic after the kill.
            return next(((t, v) for t, v in statuses.records()
                         if t >= self.killed_at and v["device"] == device and v["state"] == "offline"), None)

        deadline = back_at + self.args.drain
        while time.monotonic() < deadline and not self.stopping() and (drained_at is None or will is None):
            now = time.monotonic()
            stats = gateway.stats()
            depth = stats["pending"] + stats["status_pending"]
            if reconnected_at is None and stats["cloud_connected"]:
                reconnected_at = said_at = now
                self.say("uplink_back", f"uplink back after {back_at - self._cut_at:.0f} s: the gateway reconnected "
                                        f"in {now - back_at:.1f} s and sends what it holds ({depths[0]} queued)",
                         outage_s=round(back_at - self._cut_at, 2), reconnect_s=round(now - back_at, 2),
                         outbox_queued=depths[0])
            if reconnected_at is not None and drained_at is None:
                if depth < depths[-1]:
                    depths.append(depth)  # sampled every 20 ms: the fall as the gateway saw it
                if depth == 0:
                    drained_at = now
                    # The gateway sends its backlog in large batches, each confirmed at once:
                    # the depth falls in as many steps as there were batches.
                    # (The gateway counts a round of confirms just after deleting its rows.)
                    self.wait(lambda: gateway.stats()["batches_confirmed"] > batches_before, 2)
                    time.sleep(0.05)
                    batches = gateway.stats()["batches_confirmed"] - batches_before
                    self.say("drained", f"backlog drained: outbox {' → '.join(map(str, condense(depths, 6)))} "
                                        f"in {batches} confirmed batches, empty {now - back_at:.1f} s after the "
                                        "uplink returned",
                             outbox_depths=depths, seconds_to_empty=round(now - back_at, 2), batches=batches)
                elif now - said_at >= 1.0 and depth < depths[0]:
                    said_at = now  # a slow drain is told once a second, as it falls
                    self.say("draining", f"draining: outbox {depth} (was {depths[0]})", outbox_queued=depth)
            if will is None and (will := offline_will()) is not None:
                arrived, value = will
                waited = (value["bridge_ms"] - value["gateway_rx_ms"]) / 1000
                self.say("will_in_kafka", f"{device}'s last will in Kafka ({self.parts.status_topic}): "
                                          f"{value['state']}, {arrived - back_at:.1f} s after the uplink returned "
                                          f"(it waited {waited:.1f} s on the Pi)",
                         device=device, state=value["state"], boot=value["boot"], gateway=value["gateway"],
                         after_return_s=round(arrived - back_at, 2), waited_on_pi_s=round(waited, 2))
            self._refresh(self.phase)
            # A backlog of a hundred readings drains in a fraction of a second on loopback:
            # sample it often enough to see it fall.
            time.sleep(0.02 if reconnected_at is not None and drained_at is None else 0.1)
        if drained_at is None:
            stats = gateway.stats()
            self.say("drained", f"the outbox still holds {stats['pending']} readings {self.args.drain:.0f} s after "
                                "the uplink returned", outbox_depths=depths, seconds_to_empty=None)
        if will is None:
            self.say("will_in_kafka", f"{device}'s last will is not in Kafka {self.args.drain:.0f} s after the "
                                      "uplink returned", device=device, state=None)

    def command(self) -> None:
        """5. A command changes one node's interval; its readings in Kafka show the change."""
        node = self.parts.fleet[0]
        device, new_ms, old_ms = node.device, self.args.command_interval_ms, self.args.interval_ms
        self.phase = "command"
        command = commands.Command(f"demo-{uuid.uuid4().hex[:8]}", device, "set_interval", {"ms": new_ms},
                                   expires_ms=int((time.time() + 120) * 1000))
        produce(self.parts.bootstrap, self.parts.commands_topic, command)
        written = time.monotonic()
        written_ms = int(time.time() * 1000)
        self.say("command_sent", f"command {command.id}: set_interval ms={new_ms} for {device}, "
                                 f"written to Kafka ({self.parts.commands_topic})",
                 id=command.id, device=device, name="set_interval", args={"ms": new_ms})

        def final() -> tuple[float, commands.Outcome] | None:
            return self.parts.outcomes.first(lambda o: o.id == command.id and o.final)

        self.wait(lambda: final() is not None, 30)
        done = final()
        delivered = self.parts.outcomes.first(lambda o: o.id == command.id and o.outcome == commands.DELIVERED)
        if done is None:
            self.say("command_outcome", f"no outcome for {command.id} in Kafka within 30 s", id=command.id, outcome=None)
            return
        done_at, outcome = done
        done_ms = int(time.time() * 1000) - int((time.monotonic() - done_at) * 1000)
        reply = dict(outcome.reply or {})
        self.say("command_outcome", f"outcome in Kafka: {outcome.outcome}"
                                    + (f" (delivered after {delivered[0] - written:.1f} s)" if delivered else "")
                                    + f", {done_at - written:.1f} s after writing; {device} replied "
                                    + (" ".join(f"{k}={json.dumps(v)}" for k, v in reply.items()) or outcome.detail or "nothing"),
                 id=command.id, outcome=outcome.outcome, reply=reply, detail=outcome.detail,
                 delivered_s=round(delivered[0] - written, 2) if delivered else None,
                 done_s=round(done_at - written, 2))
        if outcome.outcome != commands.DONE:
            return
        # The rate, from the node's own timestamps in Kafka: gaps wholly before the command
        # was written against gaps wholly after its outcome came back.
        wanted_after = 8
        self.phase = "measuring"
        halfway = self.elapsed() + (self.plan.duration_s - self.elapsed()) / 2
        if halfway - self.elapsed() >= 3:
            self.until(halfway)
            counts = {d: sum(1 for t in self.node_ts(d) if t > done_ms) for d in self.parts.fleet.devices}
            others = sorted({n for d, n in counts.items() if d != device and d != self.killed.device})
            self.say("since_command", f"since the command: {counts[device]} readings of {device} in Kafka, "
                                      f"{'/'.join(map(str, others)) or 'none'} of each other live node",
                     readings_since_command=counts)
        self.until(self.plan.duration_s)
        self.wait(lambda: sum(1 for t in self.node_ts(device) if t > done_ms) > wanted_after, 30)
        ts = self.node_ts(device)
        before = [b - a for a, b in zip(ts, ts[1:]) if b < written_ms]
        after = [b - a for a, b in zip(ts, ts[1:]) if a > done_ms]
        gap_before, gap_after = median_ms(before), median_ms(after)
        self.say("interval_changed", f"{device} in Kafka: a reading every {gap_before} ms before the command, "
                                     f"every {gap_after} ms after (median gaps; asked {old_ms} → {new_ms} ms)",
                 device=device, gap_before_ms=gap_before, gap_after_ms=gap_after, gaps_before=len(before),
                 gaps_after=len(after), interval_ms_before=old_ms, interval_ms_asked=new_ms)

    def run(self) -> None:
        """Acts 1 to 5 (act 6, the final count, is the caller's); a Ctrl-C skips what is left."""
        self.report()
        if self.stopping():
            return
        self._cut_at = time.monotonic()
        try:
            back_at = self.cut()
        finally:
            self.parts.uplink.set_mode("pass")  # never leave the demo's uplink cut
        self.restore(back_at)
        if self.stopping():
            return
        self.command()
        self.until(self.plan.duration_s)


def produce(bootstrap: str, topic: str, command: commands.Command) -> None:
    """Write ``command`` to Kafka as the cloud team does (key = device id); returns when Kafka has it."""
    from aiokafka import AIOKafkaProducer

    async def go() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            await producer.send_and_wait(topic, commands.encode_command(command), key=command.device.encode())
        finally:
            await producer.stop()

    asyncio.run(go())


# --- the run ------------------------------------------------------------------------------------


def log_to_file(path: Path, stack: ExitStack) -> None:
    """Send the components' logs to ``path``: the outage's reconnect warnings would otherwise
    interleave with the narration that already tells the outage."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    for name in ("tern", "aiokafka"):
        logger = logging.getLogger(name)
        old = (logger.level, logger.propagate)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        stack.callback(lambda lg=logger, o=old: (lg.removeHandler(handler), lg.setLevel(o[0]),
                                                 setattr(lg, "propagate", o[1])))
    stack.callback(handler.close)


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit status."""
    from tern.cloud.bridge import BridgeThread
    from tern.cloud.config import BridgeConfig
    from tern.device.emulate import Fleet
    from tern.edge.config import GatewayConfig
    from tern.edge.service import Gateway

    # For scripts (--format json) stdout carries the document alone; people still see the story.
    out = Console(stderr=True) if args.format == "json" else console
    stopping = False

    def interrupt(signum: int, frame: Any) -> None:  # first Ctrl-C ends the story, not the drain
        nonlocal stopping
        stopping = True

    node_secrets: dict[str, dict] = {}
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="tern-demo-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        log_to_file(workdir / "demo.log", stack)
        out.print(f"[bold]Tern demo[/]: {args.nodes} nodes → Pi mosquitto → gateway → cloud mosquitto → "
                  f"bridge → Kafka")
        if args.insecure:
            secure = None
            pi_broker = stack.enter_context(Mosquitto(workdir / "pi-mosquitto"))
            cloud_broker = stack.enter_context(Mosquitto(workdir / "cloud-mosquitto"))
        else:
            # Accounts, certificates and broker configs made by Tern's own tools, as on a site.
            secure = SecureSite(workdir / "security", args.site, args.gateway_id, bridges=("demo",))
            for i in range(1, args.nodes + 1):
                node_secrets[f"node-{i}"] = secure.add_node(f"node-{i}")
            pi_broker = stack.enter_context(secure.pi_broker(workdir / "pi-mosquitto"))
            cloud_broker = stack.enter_context(secure.cloud_broker(workdir / "cloud-mosquitto"))
            out.print("secured: per-device accounts and ACL on the Pi broker, anonymous off; "
                      "mutual TLS and the cloud ACL on the cloud broker")
        bootstrap = kafka_bootstrap_from_env()
        # The bridge creates its topics (never left to auto-creation): with these settings.
        topic_settings: dict = {}
        names = {"readings": topics.KAFKA_READINGS, "status": topics.KAFKA_STATUS,
                 "commands": topics.KAFKA_COMMANDS, "results": topics.KAFKA_COMMAND_RESULTS}
        command_group = "tern-bridge-commands"
        if bootstrap:
            # A shared cluster may hold earlier runs: topics of our own keep the summary honest.
            run_id = uuid.uuid4().hex[:8]
            names = {key: f"{name}.demo-{run_id}" for key, name in names.items()}
            command_group = f"tern-demo-{run_id}"
            kind = "external"
            out.print(f"Kafka: {bootstrap} (KAFKA_BOOTSTRAP), topic {names['readings']}")
        else:
            out.print("Kafka: starting " + ("a 3-node Apache Kafka cluster" if kafka_kind() == "apache" else "Tansu"))
            kafka = start_kafka(workdir)
            stack.callback(kafka.close)
            bootstrap, kind = kafka.bootstrap, kafka.kind
            topic_settings = {"topic_partitions": 3, "topic_replication": kafka.replication_factor}
            if kafka.kind == "apache":
                # Real Kafka: three copies, two in sync for a write, and an idempotent producer.
                topic_settings.update(topic_min_insync=kafka.min_insync_replicas, enable_idempotence=True)
                out.print(f"Kafka: Apache Kafka, {len(kafka.nodes)} nodes at {bootstrap}")
                out.print(f"ready in {kafka.start_seconds:.1f} s; replication {kafka.replication_factor}, "
                          f"min.insync.replicas {kafka.min_insync_replicas}")
            else:
                out.print(f"Kafka: Tansu at {bootstrap}")
        # The Pi's uplink runs through a proxy on loopback so the story can cut it and restore
        # it, as a dropped network would, while the cloud side stays up.
        uplink = FaultProxy(cloud_broker.host, cloud_broker.port).start()
        stack.callback(uplink.stop)
        out.print(f"Pi broker {pi_broker.address}, cloud broker {cloud_broker.address}")
        out.print(f"the Pi's uplink to it: a proxy at {uplink.address} that the story cuts")

        gateway = stack.enter_context(
            Gateway(
                GatewayConfig(
                    gateway_id=args.gateway_id,
                    local_broker=pi_broker.address,
                    cloud_broker=uplink.address,
                    outbox_path=workdir / "outbox.db",
                    # Retry the uplink every second at most (a Pi's default is 5 s): the
                    # story shows how soon a returning link is used, not the back-off.
                    reconnect_max_s=1.0,
                    **(secure.gateway_settings() if secure else {}),
                )
            )
        )
        bridge = stack.enter_context(
            BridgeThread(
                BridgeConfig(
                    name="demo",
                    mqtt_broker=cloud_broker.address,
                    kafka_bootstrap=bootstrap,
                    readings_topic=names["readings"],
                    status_topic=names["status"],
                    commands=True,
                    commands_topic=names["commands"],
                    command_results_topic=names["results"],
                    command_group=command_group,
                    **topic_settings,
                    **(secure.bridge_settings("demo") if secure else {}),
                )
            )
        )
        if secure:
            user, password = secure.monitor_credentials()
            observer = BrokerObserver(pi_broker.host, pi_broker.port, client_id=user, username=user,
                                      password=password).start()
        else:
            observer = BrokerObserver(pi_broker.host, pi_broker.port).start()
        stack.callback(observer.stop)
        tail = KafkaTail(bootstrap, names["readings"]).start()
        stack.callback(tail.stop)
        statuses = TopicTail(bootstrap, names["status"], codec.decode_kafka_status_value).start()
        stack.callback(statuses.stop)
        outcomes = TopicTail(bootstrap, names["results"], commands.decode_outcome).start()
        stack.callback(outcomes.stop)

        fleet = Fleet(
            workdir / "nodes",
            count=args.nodes,
            site=args.site,
            broker=pi_broker.address,
            interval_ms=args.interval_ms,
            heap="100K",  # an ESP32's ~110 KB of heap (the unix port's objects are twice as big)
            sensors=DEMO_SENSORS,
            per_node=lambda device: node_secrets.get(device, {}),
        )
        stack.callback(fleet.stop_all)
        previous = signal.signal(signal.SIGINT, interrupt)
        stack.callback(signal.signal, signal.SIGINT, previous)
        plan = Plan.scaled(args.duration)
        out.print()
        fleet.start()
        narrator = Narrator(out)
        parts = Parts(fleet, gateway, bridge, uplink, observer, tail, statuses, outcomes, bootstrap,
                      names["status"], names["commands"])
        # The live table only where it can refresh in place or for the text output's record;
        # a script reading JSON gets the narration on stderr and no table.
        live = Live(console=out, refresh_per_second=2, transient=False, auto_refresh=False) if args.format == "text" else None
        last_refresh = 0.0

        def refresh(phase: str, force: bool = False) -> None:
            nonlocal last_refresh
            if live is None or (not force and time.monotonic() - last_refresh < 0.5):
                return
            last_refresh = time.monotonic()
            live.update(live_view(observer, tail, time.monotonic() - narrator.started,
                                  args.duration, phase, out.width), refresh=True)

        story = Story(args, plan, parts, narrator, refresh, lambda: stopping)
        with live if live is not None else ExitStack():
            if args.plain:
                story.until(args.duration)
            else:
                story.run()
            story.phase = "stopping"
            fleet.stop_all()  # the nodes say goodbye: each one's "offline" goes the same way
            sent = observer.identities()
            story.wait(lambda: sent <= set(tail.identities()), args.drain)
            refresh("done", force=True)
        if live is not None:
            out.print()  # the live table's last frame ends without a newline
        result = reconcile(observer.identities(), tail.identities())
        killed = getattr(story, "killed", None)
        received = sum(result.received.values())
        narrator.say("final", f"Kafka holds {received} of the {sum(result.sent.values())} readings the nodes "
                              f"sent: {result.total_missing} missing"
                              + (f" ({killed.device}'s {result.sent.get(killed.device, 0)} included)" if killed else ""),
                     sent=sum(result.sent.values()), received=received, missing=result.total_missing)
        g, b = gateway.stats(), bridge.stats()
        gateway_figures = {key: g[key] for key in ("committed", "batches_confirmed", "pending", "dead_letters")}
        bridge_figures = {key: b[key] for key in ("records_written", "status_written", "deadlettered", "retries")}
        doc = document(result, narrator.events,
                       kafka={"kind": kind, "bootstrap": bootstrap, **{f"{k}_topic": v for k, v in names.items()}},
                       gateway=gateway_figures, bridge=bridge_figures)
        if args.json_file:
            args.json_file.write_text(json.dumps(doc, indent=1) + "\n")
        if args.format == "json":
            print(json.dumps(doc, indent=1))
            return 1 if result.total_missing else 0
        out.print()
        out.print(summary_table(result, out.width))
        out.print(f"gateway: {g['committed']} committed, {g['batches_confirmed']} batches confirmed, "
                  f"{g['pending']} pending, {g['dead_letters']} dead letters")
        out.print(f"bridge: {b['records_written']} records written, {b['status_written']} status events, "
                  f"{b['deadlettered']} dead-lettered, {b['retries']} retries")
        if result.total_missing:
            out.print(f"[red]{result.total_missing} readings missing[/]")
            return 1
        out.print("[green]0 missing[/]: every reading the nodes sent is in Kafka.")
        return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m tern.harness.demo``."""
    args = parse_args(argv)
    try:
        return run(args)
    except TernError as exc:
        console.print(f"[red]demo failed:[/] {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
