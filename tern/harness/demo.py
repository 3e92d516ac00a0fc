"""``make demo``: the whole path on loopback, live.

Starts the Pi's mosquitto and the cloud's mosquitto, Kafka (Tansu, or with ``TERN_KAFKA=apache``
a 3-node Apache Kafka cluster; or the Kafka named by ``KAFKA_BOOTSTRAP``), the gateway, the bridge and N emulated ESP32 nodes running the real
firmware on the MicroPython unix port; shows what arrives in Kafka, refreshed; stops
everything it started; ends with a per-node summary of sent, received, missing, duplicated.
Exit status 0 only when nothing is missing.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from tern.core import topics
from tern.core.errors import TernError
from tern.harness.observe import BrokerObserver, KafkaTail, reconcile
from tern.harness.secure import SecureSite
from tern.harness.kafka import kafka_kind, start_kafka
from tern.harness.stack import Mosquitto, kafka_bootstrap_from_env

console = Console()

#: Counters the firmware adds to a reading when a sensor misbehaves (see tern_sensors.py).
FAULT_COUNTERS = ("sensor_err", "bad_frames")

#: What each emulated node carries: an ADC, an I2C TMP102 and a serial sensor on UART2 whose
#: frames come from the host's simulator, one in twenty of them deliberately broken.
DEMO_SENSORS = [
    {"type": "adc", "name": "adc_mv", "pin": 34},
    {"type": "tmp102", "name": "temp_c", "i2c": 0, "scl": 18, "sda": 19, "addr": 72},
    {"type": "uart", "uart": 2, "protocol": "pms5003", "sim": {"interval_s": 0.25, "bad_fraction": 0.05}},
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tern-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=5, help="emulated nodes (default 5)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds the nodes publish (default 60)")
    parser.add_argument("--interval-ms", type=int, default=1000, help="reading period of each node (default 1000)")
    parser.add_argument("--drain", type=float, default=30.0, help="seconds to wait for the last readings (default 30)")
    parser.add_argument("--workdir", type=Path, help="where brokers, outbox and node flash live (default: a temp dir)")
    parser.add_argument("--site", default="demo-site")
    parser.add_argument("--gateway-id", default="pi-gw-1")
    parser.add_argument("--insecure", action="store_true",
                        help="open brokers: no accounts, no ACLs, no TLS (default: secured, see docs/security.md)")
    args = parser.parse_args(argv)
    if not 1 <= args.nodes <= 100:
        parser.error("--nodes must be between 1 and 100")
    if args.duration <= 0 or args.interval_ms < 10:
        parser.error("--duration must be positive and --interval-ms at least 10")
    return args


def live_view(observer: BrokerObserver, tail: KafkaTail, started: float, duration: float, phase: str) -> Group:
    """The refreshed table: one row per node, what it sent and what Kafka holds."""
    sent = observer.snapshot()
    arrived: dict[str, list[dict]] = {}
    for (device, _, _), value, _ in tail.records():
        arrived.setdefault(device, []).append(value)
    table = Table(title=f"Tern demo: {phase}, {time.monotonic() - started:.0f}/{duration:.0f} s", expand=False)
    for column in ("node", "status", "sent", "in Kafka", "last seq", "last readings", "faults", "node→Kafka"):
        table.add_column(column, justify="left" if column in ("node", "status", "last readings", "faults") else "right")
    for device in sorted(set(sent) | set(arrived) | set(observer.status)):
        status = observer.status.get(device)
        values = arrived.get(device, [])
        last = values[-1] if values else None
        state = status.state if status else "?"
        readings = dict(last["readings"]) if last else {}
        faults = {name: readings.pop(name) for name in FAULT_COUNTERS if name in readings}
        table.add_row(
            device,
            f"[{'green' if state == 'online' else 'red'}]{state}[/]",
            str(len(sent.get(device, []))),
            str(len(values)),
            str(last["seq"]) if last else "-",
            " ".join(f"{k}={v}" for k, v in sorted(readings.items())) or "-",
            " ".join(f"{k}={v}" for k, v in sorted(faults.items())) or "-",
            f"{last['bridge_ms'] - last['ts_ms']} ms" if last else "-",
        )
    return Group(table)


def summary_table(result) -> Table:
    table = Table(title="Summary: readings per node")
    for column in ("node", "sent", "received in Kafka", "missing", "duplicated", "out of order"):
        table.add_column(column, justify="left" if column == "node" else "right")
    for device in result.sent:
        missing = result.missing[device]
        table.add_row(
            device,
            str(result.sent[device]),
            str(result.received[device]),
            f"[{'red' if missing else 'green'}]{missing}[/]",
            str(result.duplicated[device]),
            str(result.out_of_order[device]),
        )
    table.add_row(
        "[bold]all[/]",
        str(sum(result.sent.values())),
        str(sum(result.received.values())),
        str(result.total_missing),
        str(sum(result.duplicated.values())),
        str(sum(result.out_of_order.values())),
    )
    return table


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit status."""
    from tern.cloud.bridge import BridgeThread
    from tern.cloud.config import BridgeConfig
    from tern.edge.config import GatewayConfig
    from tern.edge.service import Gateway
    from tern.device.emulate import Fleet

    stopping = False

    def interrupt(signum, frame):  # first Ctrl-C ends the publishing phase, not the drain
        nonlocal stopping
        stopping = True

    node_secrets: dict[str, dict] = {}
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="tern-demo-") as tmp:
        workdir = args.workdir or Path(tmp)
        console.print(f"[bold]Tern demo[/]: {args.nodes} emulated nodes → Pi mosquitto → gateway → cloud mosquitto → bridge → Kafka")
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
            console.print("secured: per-device accounts and ACL on the Pi broker, anonymous off; "
                          "mutual TLS and the cloud ACL on the cloud broker")
        bootstrap = kafka_bootstrap_from_env()
        # The bridge creates its topics (never left to auto-creation): with these settings.
        topic_settings: dict = {}
        if bootstrap:
            # A shared cluster may hold earlier runs: a topic of our own keeps the summary honest.
            run_id = uuid.uuid4().hex[:8]
            kafka_topic = f"{topics.KAFKA_READINGS}.demo-{run_id}"
            status_topic = f"{topics.KAFKA_STATUS}.demo-{run_id}"
            console.print(f"Kafka: {bootstrap} (KAFKA_BOOTSTRAP), topic {kafka_topic}")
        else:
            console.print("Kafka: starting " + ("a 3-node Apache Kafka cluster" if kafka_kind() == "apache" else "Tansu"))
            kafka = start_kafka(workdir)
            stack.callback(kafka.close)
            bootstrap = kafka.bootstrap
            kafka_topic = topics.KAFKA_READINGS
            status_topic = topics.KAFKA_STATUS
            topic_settings = {"topic_partitions": 3, "topic_replication": kafka.replication_factor}
            if kafka.kind == "apache":
                # Real Kafka: three copies, two in sync for a write, and an idempotent producer.
                topic_settings.update(topic_min_insync=kafka.min_insync_replicas, enable_idempotence=True)
                console.print(f"Kafka: Apache Kafka, {len(kafka.nodes)} nodes at {bootstrap} (ready in "
                              f"{kafka.start_seconds:.1f} s), topic {kafka_topic}: replication "
                              f"{kafka.replication_factor}, min.insync.replicas {kafka.min_insync_replicas}")
            else:
                console.print(f"Kafka: Tansu at {bootstrap}, topic {kafka_topic}")
        console.print(f"Pi broker {pi_broker.address}, cloud broker {cloud_broker.address}")

        gateway = stack.enter_context(
            Gateway(
                GatewayConfig(
                    gateway_id=args.gateway_id,
                    local_broker=pi_broker.address,
                    cloud_broker=cloud_broker.address,
                    outbox_path=workdir / "outbox.db",
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
                    readings_topic=kafka_topic,
                    status_topic=status_topic,
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
        tail = KafkaTail(bootstrap, kafka_topic).start()
        stack.callback(tail.stop)

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
        fleet.start()
        started = time.monotonic()
        with Live(console=console, refresh_per_second=2, transient=False) as live:
            while not stopping and time.monotonic() - started < args.duration:
                live.update(live_view(observer, tail, started, args.duration, "publishing"))
                time.sleep(0.5)
            fleet.stop_all()
            sent = observer.identities()
            drain_until = time.monotonic() + args.drain
            while time.monotonic() < drain_until and not sent <= set(tail.identities()):
                live.update(live_view(observer, tail, started, args.duration, "draining"))
                time.sleep(0.5)
            live.update(live_view(observer, tail, started, args.duration, "done"))
        console.print()
        result = reconcile(observer.identities(), tail.identities())
        console.print(summary_table(result))
        g, b = gateway.stats(), bridge.stats()
        console.print(
            f"gateway: {g['committed']} committed, {g['batches_confirmed']} batches confirmed, "
            f"{g['pending']} pending, {g['dead_letters']} dead letters; "
            f"bridge: {b['records_written']} records written, {b['status_written']} status events, "
            f"{b['deadlettered']} dead-lettered, {b['retries']} retries"
        )
        if result.total_missing:
            console.print(f"[red]{result.total_missing} readings missing[/]")
            return 1
        console.print("[green]0 missing[/]: every reading the nodes sent is in Kafka.")
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
