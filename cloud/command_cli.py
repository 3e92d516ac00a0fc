"""``tern-bridge command DEVICE NAME [ARG=VALUE ...] [--wait S]``: write a command to Kafka.

With ``--wait`` it then follows the results topic and prints the command's outcomes as they
come (delivered, then done / rejected / expired), exiting 0 on ``done``, 1 on ``rejected`` or
``expired`` and 3 if no final outcome came in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from tern.core import commands, topics
from tern.core.commands import ArgValue, Command
from tern.core.errors import CodecError, ConfigError
from tern.core.hostport import parse_hostport

EXIT_DONE, EXIT_FAILED, EXIT_NO_OUTCOME = 0, 1, 3


def add_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register the ``command`` subcommand on ``tern-bridge``'s parser."""
    cmd = sub.add_parser("command", help="send a command to a node through Kafka")
    cmd.add_argument("device", help="device id")
    cmd.add_argument("name", help="command: ping, set_interval, set_config, get_config, rebirth, reboot")
    cmd.add_argument("args", nargs="*", metavar="ARG=VALUE", help="arguments (numbers and true/false are typed)")
    cmd.add_argument("--kafka", help="Kafka bootstrap HOST:PORT (env KAFKA_BOOTSTRAP)")
    cmd.add_argument("--topic", help="commands topic (env TERN_KAFKA_COMMANDS_TOPIC, default tern.commands)")
    cmd.add_argument("--results-topic", help="results topic (env TERN_KAFKA_COMMAND_RESULTS_TOPIC, default tern.command-results)")
    cmd.add_argument("--gateway", help="route through this gateway (default: the one that last reported the device)")
    cmd.add_argument("--expires", type=float, default=3600.0, metavar="S", help="expire after S seconds (0: never; default 3600)")
    cmd.add_argument("--id", help="command id (default: generated)")
    cmd.add_argument("--wait", type=float, default=0.0, metavar="S", help="wait up to S seconds for the outcome")


def parse_args_list(items: list[str]) -> dict[str, ArgValue]:
    """``["s=10", "name=x", "on=true"]`` -> ``{"s": 10, "name": "x", "on": True}``."""
    out: dict[str, ArgValue] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"argument {item!r}: expected ARG=VALUE")
        value: ArgValue
        if text in ("true", "false"):
            value = text == "true"
        else:
            try:
                value = int(text)
            except ValueError:
                try:
                    value = float(text)
                except ValueError:
                    value = text
        out[key] = value
    return out


def run(args: argparse.Namespace) -> int:
    """Build the command from ``args``, write it, and optionally wait for its outcome."""
    bootstrap = args.kafka or os.environ.get("KAFKA_BOOTSTRAP", "").strip() or "127.0.0.1:9092"
    for part in bootstrap.split(","):
        parse_hostport(part.strip(), 9092)
    topic = args.topic or os.environ.get("TERN_KAFKA_COMMANDS_TOPIC", "").strip() or topics.KAFKA_COMMANDS
    results = (args.results_topic or os.environ.get("TERN_KAFKA_COMMAND_RESULTS_TOPIC", "").strip()
               or topics.KAFKA_COMMAND_RESULTS)
    if args.expires < 0 or args.wait < 0:
        raise ConfigError("--expires and --wait must not be negative")
    command = Command(
        id=args.id or f"c-{uuid.uuid4().hex[:16]}",
        device=args.device,
        name=args.name,
        args=parse_args_list(args.args),
        expires_ms=int((time.time() + args.expires) * 1000) if args.expires else 0,
        gateway=args.gateway or "",
    )
    try:
        value = commands.encode_command(command)
    except CodecError as exc:
        raise ConfigError(str(exc)) from None
    return asyncio.run(_send(bootstrap, topic, results, command, value, args.wait))


async def _send(bootstrap: str, topic: str, results: str, command: Command, value: bytes, wait: float) -> int:
    consumer = None
    if wait:
        # Position on the results topic's end *before* writing, so no outcome can be missed.
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
        await consumer.start()
        await consumer._client.force_metadata_update()  # learn the topic's partitions without subscribing
        partitions = [TopicPartition(results, p) for p in sorted(consumer.partitions_for_topic(results) or ())]
        if not partitions:
            await consumer.stop()
            raise ConfigError(f"results topic {results!r} does not exist on {bootstrap}")
        consumer.assign(partitions)
        ends = await consumer.end_offsets(partitions)
        for tp in partitions:
            consumer.seek(tp, ends[tp])
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=command.device.encode())
    finally:
        await producer.stop()
    print(json.dumps({"id": command.id, "device": command.device, "name": command.name, "sent": True}))
    if consumer is None:
        return EXIT_DONE
    try:
        return await _follow(consumer, command.id, wait)
    finally:
        await consumer.stop()


async def _follow(consumer: AIOKafkaConsumer, command_id: str, wait: float) -> int:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        batches = await consumer.getmany(timeout_ms=200)
        for records in batches.values():
            for record in records:
                try:
                    outcome = commands.decode_outcome(record.value)
                except CodecError:
                    continue
                if outcome.id != command_id:
                    continue
                line: dict[str, Any] = {"id": outcome.id, "device": outcome.device, "outcome": outcome.outcome}
                if outcome.detail:
                    line["detail"] = outcome.detail
                if outcome.reply is not None:
                    line["reply"] = outcome.reply
                print(json.dumps(line), flush=True)
                if outcome.final:
                    return EXIT_DONE if outcome.outcome == commands.DONE else EXIT_FAILED
    print(json.dumps({"id": command_id, "outcome": None, "detail": f"no final outcome within {wait:g} s"}))
    return EXIT_NO_OUTCOME
