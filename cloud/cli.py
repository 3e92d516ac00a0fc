"""``tern-bridge``: run the cloud bridge, or look at what it wrote to Kafka.

    tern-bridge run --mqtt 127.0.0.1:1884 --kafka 127.0.0.1:9092 [--topic tern.readings]
    tern-bridge consume --kafka 127.0.0.1:9092 --topic tern.readings [--from-beginning] [--max N]

Unset options fall back to the environment (TERN_CLOUD_BROKER, KAFKA_BOOTSTRAP,
TERN_KAFKA_TOPIC, TERN_KAFKA_STATUS_TOPIC, ...). A bad setting prints one line and exits with status 2; a broker that
cannot be reached at start-up exits with status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Sequence

from tern.core.errors import ConfigError, TernError
from tern.security import redact

EXIT_RUNTIME = 1
EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tern-bridge", description="Tern cloud bridge: gateway batches on MQTT -> Kafka.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="bridge the cloud MQTT broker to Kafka until interrupted")
    run.add_argument("--mqtt", help="cloud MQTT broker HOST:PORT (env TERN_CLOUD_BROKER)")
    run.add_argument("--kafka", help="Kafka bootstrap HOST:PORT[,...] (env KAFKA_BOOTSTRAP)")
    run.add_argument("--topic", help="Kafka topic for readings (env TERN_KAFKA_TOPIC, default tern.readings)")
    run.add_argument("--status-topic", help="Kafka topic for node status (env TERN_KAFKA_STATUS_TOPIC, default tern.status)")
    run.add_argument("--deadletter", help="Kafka dead-letter topic (default tern.deadletter)")
    run.add_argument("--name", help="bridge name; MQTT client id is tern-bridge-NAME (default main)")
    run.add_argument("--idempotence", action="store_true", default=None, help="idempotent producer (real Kafka; Tansu rejects it)")
    run.add_argument("--compression", choices=["gzip", "snappy", "lz4", "zstd"], help="Kafka compression")
    run.add_argument("--stats-every", type=float, default=30.0, metavar="S", help="log counters every S seconds (0: never)")
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    consume = sub.add_parser("consume", help="print the readings in a Kafka topic as a table")
    consume.add_argument("--kafka", help="Kafka bootstrap HOST:PORT (env KAFKA_BOOTSTRAP)")
    consume.add_argument("--topic", help="topic to read (env TERN_KAFKA_TOPIC, default tern.readings)")
    consume.add_argument(
        "--from-beginning", action="store_true", help="accepted for familiarity; reading always starts at the beginning"
    )
    consume.add_argument("--max", type=int, default=None, metavar="N", help="stop after N records")
    consume.add_argument("--timeout", type=float, default=10.0, metavar="S", help="give up after S seconds")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tern-bridge``; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        return _consume(args)
    except ConfigError as exc:
        print(f"tern-bridge: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except TernError as exc:
        print(f"tern-bridge: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace) -> int:
    from tern.cloud.bridge import Bridge
    from tern.cloud.config import BridgeConfig

    config = BridgeConfig.from_env(
        mqtt_broker=args.mqtt,
        kafka_bootstrap=args.kafka,
        readings_topic=args.topic,
        status_topic=args.status_topic,
        deadletter_topic=args.deadletter,
        name=args.name,
        enable_idempotence=args.idempotence,
        compression=args.compression,
    )
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:
        logging.getLogger("aiokafka").setLevel(logging.WARNING)
    # Whatever path a secret takes into a log line (an exception text, a URL), it is masked.
    redact.install(config.secrets())

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        bridge = Bridge(config)
        reporter = asyncio.create_task(_report(bridge, args.stats_every, stop)) if args.stats_every > 0 else None
        try:
            await bridge.run(stop)
        finally:
            if reporter is not None:
                reporter.cancel()
        logging.getLogger("tern.bridge").info("stopped: %s", bridge.stats())

    asyncio.run(main())
    return 0


async def _report(bridge, every: float, stop: asyncio.Event) -> None:
    log = logging.getLogger("tern.bridge")
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), every)
        except asyncio.TimeoutError:
            log.info("stats: %s", bridge.stats())


def _consume(args: argparse.Namespace) -> int:
    import os

    from rich.console import Console
    from rich.table import Table

    from tern.cloud.consume import read_records
    from tern.core import topics
    from tern.core.hostport import parse_hostport

    bootstrap = args.kafka or os.environ.get("KAFKA_BOOTSTRAP", "").strip() or "127.0.0.1:9092"
    for part in bootstrap.split(","):
        parse_hostport(part.strip(), 9092)
    topic = args.topic or os.environ.get("TERN_KAFKA_TOPIC", "").strip() or topics.KAFKA_READINGS
    if args.max is not None and args.max < 1:
        raise ConfigError(f"--max must be at least 1, got {args.max}")
    records = asyncio.run(read_records(bootstrap, topic, timeout_s=args.timeout, max_records=args.max))

    table = Table(title=f"{topic} @ {bootstrap}: {len(records)} records")
    for column in ("device", "boot", "seq", "readings", "partition", "offset"):
        table.add_column(column, justify="right" if column in ("seq", "partition", "offset") else "left")
    for rec in records:
        if rec.value is not None:
            readings = ", ".join(f"{k}={v}" for k, v in rec.value["readings"].items())
            table.add_row(rec.value["device"], rec.value["boot"], str(rec.value["seq"]), readings, str(rec.partition), str(rec.offset))
        elif (status := _status_value(rec.raw)) is not None:
            colour = "green" if status["state"] == "online" else "red"
            detail = " ".join(f"{k}={status[k]}" for k in ("fw", "reset") if status[k])
            table.add_row(status["device"], status["boot"], "-", f"[{colour}]{status['state']}[/] {detail}".rstrip(), str(rec.partition), str(rec.offset))
        elif (drop := _drop_value(rec.raw)) is not None:
            span = f"{drop['first_seq']}-{drop['last_seq']}"
            what = f"[yellow]dropped by the gateway: {drop['count']} ({drop['reason']})[/]"
            table.add_row(drop["device"], drop["boot"], span, what, str(rec.partition), str(rec.offset))
        else:
            error = rec.headers.get("error", b"").decode(errors="replace") or rec.decode_error or "not a reading"
            table.add_row(rec.key or "-", "-", "-", f"[red]{error}[/red]", str(rec.partition), str(rec.offset))
    Console().print(table)
    return 0


def _status_value(raw: bytes) -> dict | None:
    """The decoded node-status record (topic tern.status), or None if ``raw`` is not one."""
    from tern.core import codec

    try:
        return codec.decode_kafka_status_value(raw)
    except codec.CodecError:
        return None


def _drop_value(raw: bytes) -> dict | None:
    """The decoded drop record (on the status topic), or None if ``raw`` is not one."""
    from tern.core import codec

    try:
        return codec.decode_kafka_drop_value(raw)
    except codec.CodecError:
        return None


if __name__ == "__main__":
    sys.exit(main())
