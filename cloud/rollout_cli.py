"""``tern-bridge ota rollout --release V (--devices a,b | --site S)``: roll a release out to a
fleet, a canary group first, then in waves, halting on failures.

Each node gets the ``ota_update version=V`` command through Kafka (``tern.commands``, as
``tern-bridge command`` sends it; the bridge's router takes it to the node's gateway). The
rollout then follows the command's outcomes (results topic) and the node's births (status
topic: ``fw`` and ``ota``) until the node is healthy on V (``fw`` V, proved) or failed
(refused, rolled back, the command rejected or expired, or no healthy report within
``--wait-healthy``). After each wave it halts, before the next wave gets the command, if more
nodes failed than ``--max-failures`` or no node of the canary group became healthy.

Every change of a node's state is printed and written as a ``tern.ota/1`` record on the status
topic, keyed by device (docs/contracts.md). Nothing else is kept: run again after a crash, the
rollout reads the status topic and skips the nodes already healthy on V.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from tern.cloud import rollout as rules
from tern.core import codec, commands, topics
from tern.core.commands import Command
from tern.core.errors import CodecError, ConfigError, TernError
from tern.core.hostport import parse_hostport

EXIT_DONE, EXIT_HALTED = 0, 1
#: Seconds to read the status topic's history before the rollout starts.
HISTORY_TIMEOUT_S = 60.0
#: Default bound for a node to become healthy: a download over a slow link, then up to three
#: trial boots of trial_s (300 s) before a bad release is rolled back.
DEFAULT_WAIT_HEALTHY_S = 1200.0


def add_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register ``ota rollout`` on ``tern-bridge``'s parser."""
    ota = sub.add_parser("ota", help="over-the-air updates of a fleet (docs/ota.md)")
    osub = ota.add_subparsers(dest="ota_command", required=True)
    r = osub.add_parser("rollout", help="roll a release out: a canary group, then waves; halt on failures")
    r.add_argument("--release", required=True, help="the version to roll out (sent to the gateways first)")
    who = r.add_mutually_exclusive_group(required=True)
    who.add_argument("--devices", help="comma-separated device ids, in rollout order")
    who.add_argument("--site", help="every node of this site online in the status topic (in device id order)")
    r.add_argument("--canary", default="10%", help="share of the nodes updated first (default 10%%, at least one)")
    r.add_argument("--max-failures", type=int, default=0, metavar="N",
                   help="halt once more than N nodes failed (default 0)")
    r.add_argument("--wait-healthy", type=float, default=DEFAULT_WAIT_HEALTHY_S, metavar="S",
                   help=f"a node not healthy S seconds after its command failed (default {DEFAULT_WAIT_HEALTHY_S:g})")
    r.add_argument("--wave-size", type=int, default=10, metavar="N", help="nodes per wave after the canary (default 10)")
    r.add_argument("--kafka", help="Kafka bootstrap HOST:PORT (env KAFKA_BOOTSTRAP)")
    r.add_argument("--status-topic", help="status topic (env TERN_KAFKA_STATUS_TOPIC, default tern.status)")
    r.add_argument("--topic", help="commands topic (env TERN_KAFKA_COMMANDS_TOPIC, default tern.commands)")
    r.add_argument("--results-topic", help="results topic (env TERN_KAFKA_COMMAND_RESULTS_TOPIC, default tern.command-results)")


def _setting(value: str | None, env: str, default: str) -> str:
    return value or os.environ.get(env, "").strip() or default


def run(args: argparse.Namespace) -> int:
    """Check the arguments, then run the rollout; the exit status (0 done, 1 halted)."""
    bootstrap = _setting(args.kafka, "KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    for part in bootstrap.split(","):
        parse_hostport(part.strip(), 9092)
    try:
        canary = rules.parse_canary(args.canary)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if args.max_failures < 0 or args.wait_healthy <= 0 or args.wave_size < 1:
        raise ConfigError("--max-failures must be >= 0, --wait-healthy > 0 and --wave-size >= 1")
    devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else []
    try:
        for device in devices:
            topics.check_id(device, "device")
        topics.check_id(args.release, "release")
    except CodecError as exc:
        raise ConfigError(str(exc)) from None
    if args.devices is not None and not devices:
        raise ConfigError("--devices: no device given")
    rollout = Rollout(
        bootstrap=bootstrap,
        status_topic=_setting(args.status_topic, "TERN_KAFKA_STATUS_TOPIC", topics.KAFKA_STATUS),
        commands_topic=_setting(args.topic, "TERN_KAFKA_COMMANDS_TOPIC", topics.KAFKA_COMMANDS),
        results_topic=_setting(args.results_topic, "TERN_KAFKA_COMMAND_RESULTS_TOPIC", topics.KAFKA_COMMAND_RESULTS),
        release=args.release, devices=devices, site=args.site, canary=canary,
        max_failures=args.max_failures, wait_healthy=args.wait_healthy, wave_size=args.wave_size,
    )
    return asyncio.run(rollout.run())


class Rollout:
    """One run of a rollout: the Kafka side (a consumer on the status and results topics, a
    producer for commands and ``tern.ota/1`` records) around :mod:`tern.cloud.rollout`'s rules."""

    def __init__(self, *, bootstrap: str, status_topic: str, commands_topic: str, results_topic: str,
                 release: str, devices: list[str], site: str | None, canary: float, max_failures: int,
                 wait_healthy: float, wave_size: int) -> None:
        self.bootstrap, self.status_topic = bootstrap, status_topic
        self.commands_topic, self.results_topic = commands_topic, results_topic
        self.release, self.devices, self.site = release, devices, site
        self.canary, self.max_failures = canary, max_failures
        self.wait_healthy, self.wave_size = wait_healthy, wave_size
        self.id = f"r-{uuid.uuid4().hex[:12]}"
        self.latest: dict[str, dict[str, Any]] = {}      # device -> its latest status value
        self.state: dict[str, tuple[str, str]] = {}      # device -> (rollout state, detail)
        self.commands: dict[str, str] = {}               # command id -> device
        self.command_of: dict[str, str] = {}             # device -> command id
        self.boot_at_send: dict[str, str] = {}
        self.wave_of: dict[str, int] = {}
        self.watching: set[str] = set()                  # devices of the wave under way
        self._pending: list[tuple[str, str, str]] = []   # records to write: (device, state, detail)
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None

    async def run(self) -> int:
        """Read the fleet's state, then roll out wave by wave; the exit status."""
        self.consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False)
        self.producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all")
        await self.consumer.start()
        try:
            await self.producer.start()
            try:
                await self._read_history()
                return await self._roll_out()
            finally:
                await self.producer.stop()
        finally:
            await self.consumer.stop()

    async def _partitions(self, topic: str) -> list[TopicPartition]:
        assert self.consumer is not None
        await self.consumer._client.force_metadata_update()  # learn partitions without subscribing
        found = self.consumer.partitions_for_topic(topic) or set()
        if not found:
            raise ConfigError(f"topic {topic!r} does not exist on {self.bootstrap}")
        return [TopicPartition(topic, p) for p in sorted(found)]

    async def _read_history(self) -> None:
        """Every status record so far (the latest per device), and the results topic's end: the
        outcomes of the commands this run sends all come after it."""
        consumer = self.consumer
        assert consumer is not None
        status, results = await self._partitions(self.status_topic), await self._partitions(self.results_topic)
        consumer.assign(status + results)
        await consumer.seek_to_beginning(*status)
        ends = await consumer.end_offsets(status + results)
        for tp in results:
            consumer.seek(tp, ends[tp])
        deadline = time.monotonic() + HISTORY_TIMEOUT_S
        while [tp for tp in status if await consumer.position(tp) < ends[tp]]:
            if time.monotonic() > deadline:
                raise TernError(f"could not read the status topic {self.status_topic!r} to its end "
                                f"within {HISTORY_TIMEOUT_S:g} s")
            await self._poll()

    async def _poll(self) -> None:
        """Take what Kafka has (at most 0.2 s of waiting) and act on it."""
        assert self.consumer is not None
        for tp, records in (await self.consumer.getmany(timeout_ms=200)).items():
            for record in records:
                if tp.topic == self.status_topic:
                    self._on_status(record.value)
                else:
                    self._on_outcome(record.value)
        await self._flush()

    def _on_status(self, raw: bytes | None) -> None:
        try:
            value = codec.decode_kafka_status_value(raw or b"")
        except CodecError:
            return   # a drop record, a rollout's own record, junk: not a node's status
        device = value["device"]
        self.latest[device] = value
        if device in self.watching and self.state[device][0] not in ("healthy", "failed"):
            verdict = rules.judge(value, self.release, self.boot_at_send.get(device, ""))
            if verdict is not None:
                self._set(device, verdict.state, verdict.detail)

    def _on_outcome(self, raw: bytes | None) -> None:
        try:
            outcome = commands.decode_outcome(raw or b"")
        except CodecError:
            return
        device = self.commands.get(outcome.id)
        if device is None or not outcome.final or self.state[device][0] in ("healthy", "failed"):
            return
        if outcome.outcome == commands.DONE:
            return   # the node took it and reboots into the download: its births say the rest
        if outcome.outcome == commands.REJECTED and "already running" in outcome.detail:
            return   # on the release already, on trial when the rollout began: wait for it to prove itself
        why = f"command {outcome.outcome}" + (f": {outcome.detail}" if outcome.detail else "")
        self._set(device, "failed", why)

    def _set(self, device: str, state: str, detail: str = "") -> None:
        if self.state.get(device) == (state, detail):
            return
        self.state[device] = (state, detail)
        self._pending.append((device, state, detail))

    async def _flush(self) -> None:
        """Print and write to Kafka each state change since the last flush."""
        assert self.producer is not None
        pending, self._pending = self._pending, []
        for device, state, detail in pending:
            print(f"{device}  {state}" + (f"  {detail}" if detail else ""), flush=True)
            record = codec.kafka_ota_record(self.status_topic, self.id, self.release, device,
                                            self.wave_of.get(device, 0), state, detail,
                                            self.command_of.get(device, ""), int(time.time() * 1000))
            await self.producer.send_and_wait(record.topic, record.value, key=record.key, headers=list(record.headers))

    def _targets(self) -> list[str]:
        if self.devices:
            return self.devices
        return sorted(d for d, v in self.latest.items() if v["site"] == self.site)

    async def _roll_out(self) -> int:
        targets = self._targets()
        if not targets:
            raise ConfigError(f"no node of site {self.site!r} in the status topic {self.status_topic!r}")
        plan = rules.plan(targets, self.latest, self.release, self.canary, self.wave_size, online_only=bool(self.site))
        print(f"rollout {self.id} of {self.release}: {len(targets)} nodes, {len(plan.already)} already on it, "
              f"canary {len(plan.waves[0]) if plan.waves else 0}, then {max(0, len(plan.waves) - 1)} wave(s)", flush=True)
        for device in plan.already:
            self._set(device, "already")
        for device, why in plan.skipped.items():
            self._set(device, "skipped", why)
        await self._flush()
        failed: list[str] = []
        for number, wave in enumerate(plan.waves):
            if not wave:
                continue
            print(f"wave {number}{' (canary)' if number == 0 else ''}: {', '.join(wave)}", flush=True)
            await self._send(number, wave)
            await self._watch(wave)
            failed += [d for d in wave if self.state[d][0] == "failed"]
            healthy = sum(1 for d in wave if self.state[d][0] == "healthy")
            reason = rules.halt_reason(len(failed), self.max_failures, wave if number == 0 else [], healthy)
            if reason:
                held = [d for later in plan.waves[number + 1:] for d in later]
                for device in held:
                    self._set(device, "held", f"rollout halted: {reason}")
                await self._flush()
                print(f"rollout {self.id} of {self.release} HALTED: {reason}; "
                      f"{len(held)} node(s) not sent the update", file=sys.stderr, flush=True)
                for device in failed:
                    print(f"failed {device}: {self.state[device][1]}", file=sys.stderr, flush=True)
                return EXIT_HALTED
        done = sum(1 for d in targets if self.state.get(d, ("",))[0] in ("healthy", "already"))
        print(f"rollout {self.id} of {self.release} done: {done} of {len(targets)} healthy on it, "
              f"{len(failed)} failed, {len(plan.skipped)} skipped", flush=True)
        for device in failed:
            print(f"failed {device}: {self.state[device][1]}", file=sys.stderr, flush=True)
        return EXIT_DONE

    async def _send(self, number: int, wave: list[str]) -> None:
        """The ota_update command to each node of the wave, expiring with the wave's bound."""
        assert self.producer is not None
        expires = int((time.time() + self.wait_healthy) * 1000)
        for device in wave:
            command = Command(id=f"ota-{uuid.uuid4().hex[:16]}", device=device, name="ota_update",
                              args={"version": self.release}, expires_ms=expires)
            self.commands[command.id] = device
            self.command_of[device] = command.id
            self.boot_at_send[device] = (self.latest.get(device) or {}).get("boot", "")
            self.wave_of[device] = number
            await self.producer.send_and_wait(self.commands_topic, commands.encode_command(command),
                                              key=device.encode())
            self.watching.add(device)
            self._set(device, "sent")
        await self._flush()

    async def _watch(self, wave: list[str]) -> None:
        """Follow outcomes and births until each node of the wave is healthy or failed, or the bound."""
        deadline = time.monotonic() + self.wait_healthy
        while time.monotonic() < deadline and any(self.state[d][0] not in ("healthy", "failed") for d in wave):
            await self._poll()
        for device in wave:
            state, detail = self.state[device]
            if state not in ("healthy", "failed"):
                last = f" (last: {state}{' ' + detail if detail else ''})"
                self._set(device, "failed", f"no healthy report within {self.wait_healthy:g} s{last}")
        await self._flush()
        self.watching.difference_update(wave)
