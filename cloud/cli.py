"""``tern-bridge``: run the cloud bridge, or look at what it wrote to Kafka.

    tern-bridge run --mqtt 127.0.0.1:1884 --kafka 127.0.0.1:9092 [--topic tern.readings]
    tern-bridge command DEVICE NAME [ARG=VALUE ...] [--wait S]
    tern-bridge consume --kafka 127.0.0.1:9092 --topic tern.readings,tern.status [--from-beginning]
        [--group NAME] [--follow] [--format table|json] [--dedup [WINDOW]] [--max N]

Unset options fall back to the environment (TERN_CLOUD_BROKER, KAFKA_BOOTSTRAP,
TERN_KAFKA_TOPIC, TERN_KAFKA_STATUS_TOPIC, ...). A bad setting prints one line and exits with status 2; a broker that
cannot be reached at start-up exits with status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Sequence

from tern.core import quoting
from tern.cloud.reader import DEFAULT_DEDUP_WINDOW, DEFAULT_SESSION_TIMEOUT_S
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
    run.add_argument("--share-group", help="split batches with other bridges on $share/GROUP/... (env TERN_BRIDGE_SHARE_GROUP)")
    run.add_argument("--max-inflight-records", type=int, metavar="N",
                     help="readings being written to Kafka at once, at most (env TERN_BRIDGE_MAX_INFLIGHT_RECORDS, default 20000)")
    run.add_argument("--dedup-window", type=int, metavar="N",
                     help="batches remembered to recognise a gateway's re-send (env TERN_BRIDGE_DEDUP_WINDOW, default 10000; 0: off)")
    run.add_argument("--metrics-port", type=int, metavar="PORT",
                     help="Prometheus metrics and /healthz on this port (env TERN_BRIDGE_METRICS_PORT; default 0: off)")
    run.add_argument("--create-topics", action=argparse.BooleanOptionalAction, default=None,
                     help="create missing Kafka topics at start (env TERN_BRIDGE_CREATE_TOPICS; default on); "
                     "--no-create-topics: a missing topic stops the bridge")
    run.add_argument("--topic-partitions", type=int, metavar="N",
                     help="partitions of a topic the bridge creates (env TERN_KAFKA_TOPIC_PARTITIONS, default 6)")
    run.add_argument("--topic-replication", type=int, metavar="N",
                     help="replicas of a topic the bridge creates (env TERN_KAFKA_TOPIC_REPLICATION; "
                     "default one per broker, at most 3)")
    run.add_argument("--topic-min-insync", type=int, metavar="N",
                     help="min.insync.replicas of a topic the bridge creates (env TERN_KAFKA_TOPIC_MIN_INSYNC; "
                     "default the broker's)")
    run.add_argument("--command-session-timeout", type=float, metavar="S",
                     help="the command router's consumer-group session timeout: a dead bridge's commands go to "
                     "another after S seconds (env TERN_BRIDGE_COMMAND_SESSION_TIMEOUT, default 10; Kafka allows 6-1800)")
    run.add_argument("--stats-every", type=float, default=30.0, metavar="S", help="log counters every S seconds (0: never)")
    run.add_argument("--no-commands", action="store_true",
                     help="do not route commands from Kafka to the gateways (env TERN_BRIDGE_COMMANDS=0)")
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    consume = sub.add_parser(
        "consume",
        help="print readings, node status, drop events and dead letters from Kafka (table or JSON lines)",
        description="Print what the bridge wrote to Kafka. Like Kafka's console consumer, reading starts at "
        "the end of each partition (new records only) unless --from-beginning is given; with --group, at the "
        "group's committed offsets. Without --follow it stops at the end the topics had when it started.",
    )
    consume.add_argument("--kafka", help="Kafka bootstrap HOST:PORT[,...] (env KAFKA_BOOTSTRAP)")
    consume.add_argument(
        "--topic", help="topic(s) to read, comma-separated (env TERN_KAFKA_TOPIC, default tern.readings)"
    )
    consume.add_argument("--from-beginning", action="store_true", help="start at the beginning of each partition "
                         "(with --group: where the group has no committed offset yet)")
    consume.add_argument("--group", metavar="NAME", help="consumer group: continue from its committed offsets, "
                         "commit what was printed, share the partitions with the group's other members")
    consume.add_argument("-f", "--follow", action="store_true", help="keep waiting for new records until interrupted")
    consume.add_argument("--format", choices=["table", "json"], default="table",
                         help="a table (default) or one JSON object per line, for piping")
    consume.add_argument("--dedup", nargs="?", type=int, const=DEFAULT_DEDUP_WINDOW, default=0, metavar="WINDOW",
                         help="drop repeated readings (device, boot, seq) and status events, remembering the last "
                         f"WINDOW identities (default {DEFAULT_DEDUP_WINDOW})")
    consume.add_argument("--session-timeout", type=float, default=None, metavar="S",
                         help="with --group: a member that died without leaving has its partitions handed to the "
                         "others after S seconds (env TERN_CONSUME_SESSION_TIMEOUT, default 6, Kafka's smallest)")
    consume.add_argument("--max", type=int, default=None, metavar="N", help="stop after N records")
    consume.add_argument("--timeout", type=float, default=10.0, metavar="S",
                         help="give up when Kafka gives nothing for S seconds before the end is reached "
                         "(with --follow: only while connecting)")

    from tern.cloud import command_cli

    command_cli.add_parser(sub)
    from tern.cloud import release_cli

    release_cli.add_parser(sub)
    from tern.cloud import rollout_cli

    rollout_cli.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tern-bridge``; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "command":
            from tern.cloud import command_cli

            return command_cli.run(args)
        if args.command == "release":
            from tern.cloud import release_cli

            return release_cli.run(args)
        if args.command == "ota":
            from tern.cloud import rollout_cli

            return rollout_cli.run(args)
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
        share_group=args.share_group,
        max_inflight_records=args.max_inflight_records,
        dedup_window=args.dedup_window,
        metrics_port=args.metrics_port,
        create_topics=args.create_topics,
        topic_partitions=args.topic_partitions,
        topic_replication=args.topic_replication,
        topic_min_insync=args.topic_min_insync,
        command_session_timeout_s=args.command_session_timeout,
        # On unless turned off by flag or by TERN_BRIDGE_COMMANDS (the library's default is off).
        commands=False if args.no_commands else (None if os.environ.get("TERN_BRIDGE_COMMANDS", "").strip() else True),
    )
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:
        logging.getLogger("aiokafka").setLevel(logging.WARNING)
        # While a partition cannot take writes (NOT_ENOUGH_REPLICAS, no leader) aiokafka warns
        # on every internal retry, ~10 lines a second per partition; the bridge logs one line
        # per failed write and back-off, with the reason.
        logging.getLogger("aiokafka.producer.sender").setLevel(logging.ERROR)
    # Whatever path a secret takes into a log line (an exception text, a URL), it is masked.
    redact.install(config.secrets())
    # Untrusted input (topics, payloads) never makes a line longer than a few KB.
    quoting.bound_log_lines()

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

    from tern.cloud.kafka_security import KafkaSecurity
    from tern.cloud.reader import TopicReader
    from tern.core import topics
    from tern.core.hostport import parse_hostport

    bootstrap = args.kafka or os.environ.get("KAFKA_BOOTSTRAP", "").strip() or "127.0.0.1:9092"
    for part in bootstrap.split(","):
        parse_hostport(part.strip(), 9092)
    topic_arg = args.topic or os.environ.get("TERN_KAFKA_TOPIC", "").strip() or topics.KAFKA_READINGS
    names = [t.strip() for t in topic_arg.split(",") if t.strip()]
    if not names:
        raise ConfigError(f"--topic: no topic in {topic_arg!r}")
    if args.max is not None and args.max < 1:
        raise ConfigError(f"--max must be at least 1, got {args.max}")
    if args.dedup < 0:
        raise ConfigError(f"--dedup window must be at least 1, got {args.dedup}")
    if not args.timeout > 0:
        raise ConfigError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    session = args.session_timeout
    if session is None:
        text = os.environ.get("TERN_CONSUME_SESSION_TIMEOUT", "").strip()
        try:
            session = float(text) if text else DEFAULT_SESSION_TIMEOUT_S
        except ValueError:
            raise ConfigError(f"TERN_CONSUME_SESSION_TIMEOUT: expected seconds, got {text!r}") from None
    if not session > 0:
        raise ConfigError(f"--session-timeout must be a positive number of seconds, got {session}")
    reader = TopicReader(
        bootstrap,
        names,
        from_beginning=args.from_beginning,
        group=args.group,
        follow=args.follow,
        dedup_window=args.dedup,
        timeout_s=args.timeout,
        session_timeout_s=session,
        kafka_options=KafkaSecurity.from_env().aiokafka_options(),
    )
    show = _JsonLines() if args.format == "json" else _Table(f"{', '.join(names)} @ {bootstrap}", streaming=args.follow)

    terminated = asyncio.Event()

    async def read() -> None:
        # Ctrl-C and SIGTERM (docker stop, systemd) end a --follow the same way: the read is
        # cancelled, the group's offsets are committed on the way out (bounded) and the summary
        # is printed. Ctrl-C as a KeyboardInterrupt would instead stop the loop wherever it was
        # and leave aiokafka's own tasks to a cleanup that could wait on them without end.
        task = asyncio.current_task()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, lambda: (terminated.set(), task.cancel()))
        try:
            async with reader:
                async for record in reader:
                    show.add(record)
                    if args.max is not None and reader.delivered >= args.max:
                        break
        except asyncio.CancelledError:
            if not terminated.is_set():
                raise

    interrupted = False
    try:
        asyncio.run(read())
    except KeyboardInterrupt:
        interrupted = True  # --follow ends this way: still say what was shown
    interrupted = interrupted or terminated.is_set()
    show.finish(reader)
    if not (args.follow or interrupted or reader.reached_end or (args.max and reader.delivered >= args.max)):
        print(f"tern-bridge consume: stopped after {args.timeout:g} s with nothing more from Kafka, "
              "before the end of the topic", file=sys.stderr)
        return EXIT_RUNTIME
    return 0


def ota_text(ota: dict) -> str:
    """A node's ``ota`` report as a few words: ``ota downloading 0.5.0 50%``, ``ota rolled_back 0.5.0 (why)``."""
    text = f"ota {ota['st']} {ota['ver']}"
    if "pct" in ota:
        text += f" {ota['pct']}%"
    if ota.get("why"):
        text += f" ({ota['why']})"
    return text


def _cells(record) -> tuple[str, str, str, str, str]:
    """(device, boot, seq, what, gateway) of a record, as table cells (rich markup in ``what``)."""
    from rich.markup import escape

    v = record.value
    if record.kind == "reading":
        readings = ", ".join(f"{k}={val}" for k, val in v["readings"].items())
        return v["device"], v["boot"], str(v["seq"]), escape(readings), v["gateway"]
    if record.kind == "status":
        colour = "green" if v["state"] == "online" else "red"
        detail = " ".join(f"{k}={v[k]}" for k in ("fw", "reset") if v[k])
        if v.get("dropped"):  # readings the node itself had to drop, per boot
            detail += " dropped " + ",".join(f"{boot}:{n}" for boot, n in v["dropped"].items())
        if v.get("ota"):  # an update under way, proven, refused or rolled back (docs/ota.md)
            detail += " " + ota_text(v["ota"])
        return v["device"], v["boot"], "-", f"[{colour}]{v['state']}[/] {escape(detail.strip())}".rstrip(), v["gateway"]
    if record.kind == "drop":
        seqs = f"{v['first_seq']}-{v['last_seq']}"
        return v["device"], v["boot"], seqs, f"[yellow]{v['count']} readings dropped ({escape(v['reason'])})[/]", v["gateway"]
    if record.kind == "hold":
        # Not a loss: the node keeps these readings and sends them again.
        state = "lifted" if v["lifted"] else "still held"
        what = f"[cyan]{v['count']} readings held back ({escape(v['reason'])}), {state}: not lost, the node re-sends[/]"
        return v["device"], v["boot"], f"{v['first_seq']}-", what, v["gateway"]
    if record.kind == "ota":
        detail = f" ({v['detail']})" if v["detail"] else ""
        what = f"[cyan]rollout {escape(v['release'])} wave {v['wave']}: {escape(v['state'] + detail)}[/]"
        return v["device"], "-", "-", what, escape(v["rollout"])
    if record.kind == "deadletter":
        size = record.header("original_bytes") or str(len(record.raw))
        cut = ", truncated" if record.header("truncated") == "1" else ""
        what = f"[red]dead letter: {escape(record.error or '')}[/] ({size} bytes from {escape(record.header('source_topic'))}{cut})"
        # A gateway's dead letter (deadletters/1) names it; the bridge's own name none.
        return "-", "-", "-", what, escape(record.header("gateway")) or "-"
    return record.key or "-", "-", "-", f"[red]{escape(record.error or 'not a Tern record')}[/]", "-"


class _Table:
    """Rows as a rich table; streamed line by line when following (a table waits for its end)."""

    COLUMNS = ("device", "boot", "seq", "readings / state", "gateway", "partition", "offset")

    def __init__(self, title: str, streaming: bool) -> None:
        from rich.console import Console

        self.title = title
        self.streaming = streaming
        self.console = Console()
        self.rows: list[tuple[str, ...]] = []
        if streaming:
            self.console.print(f"[bold]{title}[/] (following; Ctrl-C to stop)")

    def add(self, record) -> None:
        row = (*_cells(record), str(record.partition), str(record.offset))
        if self.streaming:
            from rich.table import Table

            line = Table.grid(padding=(0, 1))
            for width in (12, 8, 6, 40, 10, 3, 8):
                line.add_column(min_width=width)
            line.add_row(*row)
            self.console.print(line)
        else:
            self.rows.append(row)

    def finish(self, reader) -> None:
        summary = f"{reader.delivered} records"
        if reader.dedup is not None:
            summary += f", {reader.duplicates} duplicates dropped"
        if self.streaming:
            self.console.print(summary)
            return
        from rich.table import Table

        table = Table(title=f"{self.title}: {summary}")
        for column in self.COLUMNS:
            table.add_column(column, justify="right" if column in ("seq", "partition", "offset") else "left")
        for row in self.rows:
            table.add_row(*row)
        self.console.print(table)
        if not self.rows and not reader.from_beginning and reader.group is None:
            self.console.print("(only records newer than the start are read: add --from-beginning or --follow)")


class _JsonLines:
    """One JSON object per record on stdout, flushed at once; the summary goes to stderr."""

    def add(self, record) -> None:
        import json

        sys.stdout.write(json.dumps(record.to_json(), separators=(",", ":"), ensure_ascii=False) + "\n")
        sys.stdout.flush()

    def finish(self, reader) -> None:
        note = f", {reader.duplicates} duplicates dropped" if reader.dedup is not None else ""
        print(f"tern-bridge consume: {reader.delivered} records{note}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
