"""A gateway, a bridge or a baseline in a process of its own, as they run in production.

In one process, the gateway, the bridge and the bench's publishers would share one GIL; in
production they are separate processes (on separate machines). So the stages of issue 13 run
each part here, and the bench reads its CPU time and peak RSS from ``/proc``.

Child side (``python -m tern.harness.bench.proc KIND CONFIG_JSON``): starts the part, prints
``{"ready": <wall time>}``, then a line ``{"t": <wall time>, "stats": {...}}`` every
:data:`PERIOD_S`, and stops cleanly when its stdin closes. Kinds:

``gateway``     :class:`tern.edge.service.Gateway` (stats: uplink counters and ``pending``).
``bridge``      :class:`tern.cloud.bridge.BridgeThread` (stats: the bridge's counters).
``naive``       the naive per-message bridge of issue 13 (paho, one ``send_and_wait`` per
                message, then the PUBACK by hand); stats: ``written``.
``subscriber``  a plain paho QoS 1 subscriber counting readings (the pub/sub baseline),
                optionally keeping each reading's latency from its ``ts_ms``.
``tail``        a Kafka consumer on the readings topic keeping each record's latency
                (:class:`tern.harness.bench.latency.TopicTail`): stamped in a process of its
                own, like the baseline's subscriber, not under the GIL of the bench's fleet.

Config keys a part does not know yet (``uplink_window``, ``share_group``: issue 13's work in
progress) are dropped, and the dropped names reported in the ready line, so the bench picks
them up once they exist.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from tern.harness.bench.common import BenchError

PERIOD_S = 0.02
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# --- the parent's side -------------------------------------------------------------------


class Child:
    """One child process: latest stats, CPU seconds and peak RSS, stopped cleanly or killed."""

    def __init__(self, kind: str, config: dict[str, Any], timeout: float = 30.0) -> None:
        self.kind = kind
        self.stats: dict[str, Any] = {}
        self.stats_t = 0.0
        self.history: list[tuple[float, dict[str, Any]]] = []
        self.keep_history = False
        self.final: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.ready_info: dict[str, Any] = {}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tern.harness.bench.proc", kind, json.dumps(config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
        )
        self._stderr: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        threading.Thread(target=self._read_stderr, daemon=True).start()
        if not self._ready.wait(timeout) or not self.ready_info:
            self.kill()
            raise BenchError(f"bench child {kind} did not start within {timeout:.0f} s: {self.stderr_tail()}")
        deadline = time.monotonic() + 5
        while not self.stats_t and time.monotonic() < deadline and self.process.poll() is None:
            time.sleep(PERIOD_S / 2)
        # Start-up (imports, connecting) is not part of any figure: CPU is counted from here.
        self._cpu_at_ready = self.resources()["cpu_s"]

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if "ready" in doc:
                self.ready_info = doc
                self._ready.set()
            elif "stats" in doc:
                with self._lock:
                    self.stats, self.stats_t = doc["stats"], doc["t"]
                    if self.keep_history:
                        self.history.append((doc["t"], doc["stats"]))
            elif "final" in doc:
                self.final = doc["final"]
        self._ready.set()

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self._stderr.append(line.rstrip())
            del self._stderr[:-40]

    def stderr_tail(self) -> str:
        """The child's last lines of stderr, for error messages."""
        return " | ".join(self._stderr[-8:]) or "(no output)"

    @property
    def ready_t(self) -> float:
        """Wall time at which the child's part was started."""
        return float(self.ready_info.get("ready", 0.0))

    def get(self, key: str, default: Any = 0) -> Any:
        """The latest value of one counter."""
        with self._lock:
            return self.stats.get(key, default)

    def snapshot(self) -> tuple[float, dict[str, Any]]:
        """(wall time, stats) of the latest stats line."""
        with self._lock:
            return self.stats_t, dict(self.stats)

    def wait_for(self, predicate: Any, deadline_s: float, what: str) -> float:
        """Poll the stats until ``predicate(stats)``; return the wall time of that stats line."""
        deadline = time.monotonic() + deadline_s
        while True:
            t, stats = self.snapshot()
            if stats and predicate(stats):
                return t
            if self.process.poll() is not None:
                raise BenchError(f"{what}: the {self.kind} process ended ({self.process.returncode}): {self.stderr_tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"{what}: not done within {deadline_s:.0f} s (last stats {stats})")
            time.sleep(PERIOD_S / 2)

    def resources(self) -> dict[str, float]:
        """CPU seconds (user + system) since the part was ready and peak RSS in MiB, from /proc."""
        try:
            with open(f"/proc/{self.process.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
            peak_kb = 0
            with open(f"/proc/{self.process.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peak_kb = int(line.split()[1])
            return {"cpu_s": cpu - getattr(self, "_cpu_at_ready", 0.0), "peak_rss_mib": peak_kb / 1024}
        except (OSError, IndexError, ValueError):
            return {"cpu_s": 0.0, "peak_rss_mib": 0.0}

    def io(self) -> dict[str, int]:
        """The process's I/O counters from ``/proc/PID/io``: ``write_bytes`` (bytes it caused to
        be written to the block device, the SD card's wear), ``wchar`` (bytes passed to write
        calls) and the rest; empty when the kernel does not keep them."""
        try:
            with open(f"/proc/{self.process.pid}/io") as f:
                return {k: int(v) for k, v in (line.split(":") for line in f if ":" in line)}
        except (OSError, ValueError):
            return {}

    def stop(self, timeout: float = 20.0) -> None:
        """Close stdin (the child stops its part cleanly); kill it after ``timeout``."""
        if self.process.poll() is None:
            try:
                assert self.process.stdin is not None
                self.process.stdin.close()
            except OSError:
                pass
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reader.join(2)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


# --- the child's side --------------------------------------------------------------------


def _known(cls: type, config: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in config.items() if k in names}, sorted(k for k in config if k not in names)


def _settings(config: Any) -> dict[str, Any]:
    """The part's effective settings, for the report (nothing that could be a secret)."""
    out = {}
    for f in dataclasses.fields(config):
        if any(word in f.name for word in ("password", "secret", "key", "cert", "security")):
            continue
        value = getattr(config, f.name)
        out[f.name] = value if isinstance(value, (int, float, str, bool, type(None))) else str(value)
    return out


def _emit(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


def _serve(stats: Any, dropped: list[str], started: float, extra: dict[str, Any] | None = None) -> None:
    """Print the ready line, then stats until stdin closes."""
    _emit({"ready": started, "dropped": dropped, **(extra or {})})
    closed = threading.Event()

    def watch_stdin() -> None:
        sys.stdin.read()
        closed.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *a: closed.set())
    while not closed.wait(PERIOD_S):
        _emit({"t": time.time(), "stats": stats()})


def run_gateway(config: dict[str, Any]) -> None:
    from tern.edge.config import GatewayConfig
    from tern.edge.service import Gateway

    known, dropped = _known(GatewayConfig, config)
    settings = GatewayConfig(**known)
    gateway = Gateway(settings)
    started = time.time()
    gateway.start()
    # Connected to both brokers before the bench starts publishing (a drain is already under
    # way by then: its clock starts at ``started``).
    connected = gateway.wait_connected(30)

    def stats() -> dict[str, Any]:
        out = dict(gateway.uplink.stats())
        out["pending"] = gateway.outbox.pending()
        ingest = gateway.ingest.stats()
        out["committed"] = ingest.get("committed", 0)
        # Per-group costs (fsync, PUBACK burst, node acks) are paid per group: its size shows.
        out["ingest_groups"] = ingest.get("groups", 0)
        out["node_acks"] = ingest.get("node_acks", 0)
        return out

    try:
        _serve(stats, dropped, started, {"settings": _settings(settings), "connected": connected})
    finally:
        gateway.stop(5)


def run_bridge(config: dict[str, Any]) -> None:
    from tern.cloud.bridge import BridgeThread
    from tern.cloud.config import BridgeConfig

    known, dropped = _known(BridgeConfig, config)
    if "allowed_gateways" in known and known["allowed_gateways"] is not None:
        known["allowed_gateways"] = tuple(known["allowed_gateways"])
    started = time.time()
    settings = BridgeConfig(**known)
    bridge = BridgeThread(settings).start()
    try:
        _serve(bridge.stats, dropped, started, {"settings": _settings(settings)})
    finally:
        bridge.stop()


def run_naive(config: dict[str, Any]) -> None:
    """The naive bridge: per message, decode, ``send_and_wait`` (acks=all), then PUBACK."""
    import paho.mqtt.client as mqtt
    from aiokafka import AIOKafkaProducer
    from paho.mqtt.enums import CallbackAPIVersion

    from tern.core import codec, topics

    host, port = config["mqtt_host"], config["mqtt_port"]
    kafka_topic = config["topic"]
    counts = {"written": 0, "received": 0}

    async def main() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=config["bootstrap"], acks="all", enable_idempotence=False, linger_ms=0)
        await producer.start()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=config["client_id"], clean_session=False,
                             protocol=mqtt.MQTTv311, manual_ack=True)
        client.max_inflight_messages_set(100)
        subscribed = threading.Event()
        client.on_connect = lambda c, u, f, rc, p: c.subscribe(topics.TELEMETRY_FILTER, qos=1)
        client.on_subscribe = lambda *a: subscribed.set()

        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()

        def on_message(c: Any, u: Any, msg: Any) -> None:
            counts["received"] += 1
            loop.call_soon_threadsafe(inbox.put_nowait, msg)

        client.on_message = on_message
        started = time.time()
        client.connect(host, port)
        client.loop_start()
        if not await loop.run_in_executor(None, subscribed.wait, 10):
            raise BenchError("naive bridge: not subscribed within 10 s")
        closed = threading.Event()
        threading.Thread(target=lambda: (sys.stdin.read(), closed.set()), daemon=True).start()

        async def report() -> None:
            while True:
                _emit({"t": time.time(), "stats": dict(counts)})
                await asyncio.sleep(PERIOD_S)

        _emit({"ready": started, "dropped": []})
        reporter = asyncio.create_task(report())
        try:
            while not closed.is_set():
                try:
                    msg = await asyncio.wait_for(inbox.get(), 0.2)
                except asyncio.TimeoutError:
                    continue
                topic = topics.parse_node_topic(msg.topic)
                reading = codec.decode_reading(msg.payload, site=topic.site, topic_device=topic.device)
                record = codec.kafka_record(reading, "naive", kafka_topic, time.time_ns() // 1_000_000)
                await producer.send_and_wait(kafka_topic, record.value, key=record.key, headers=list(record.headers))
                client.ack(msg.mid, msg.qos)
                counts["written"] += 1
        finally:
            reporter.cancel()
            client.disconnect()
            client.loop_stop()
            await producer.stop()

    asyncio.run(main())


def run_subscriber(config: dict[str, Any]) -> None:
    """A plain QoS 1 subscriber: counts readings; keeps latencies (ms, from ``ts_ms``) if asked."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from tern.core import topics

    counts = {"received": 0}
    latencies: list[int] = []
    keep = bool(config.get("latency"))
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=config["client_id"], clean_session=True,
                         protocol=mqtt.MQTTv311)
    client.on_connect = lambda c, u, f, rc, p: c.subscribe(topics.TELEMETRY_FILTER, qos=1)
    subscribed = threading.Event()
    client.on_subscribe = lambda *a: subscribed.set()

    def on_message(c: Any, u: Any, msg: Any) -> None:
        counts["received"] += 1
        if keep:
            latencies.append(time.time_ns() // 1_000_000 - json.loads(msg.payload)["ts"])

    client.on_message = on_message
    started = time.time()
    client.connect(config["mqtt_host"], config["mqtt_port"])
    client.loop_start()
    if not subscribed.wait(10):
        raise BenchError("subscriber: not subscribed within 10 s")
    try:
        _serve(lambda: dict(counts), [], started)
    finally:
        if keep:
            _emit({"final": {"latencies_ms": latencies}})
        client.disconnect()
        client.loop_stop()


def run_tail(config: dict[str, Any]) -> None:
    """A consumer tailing ``topic`` from its start; its latencies are the final line."""
    from tern.harness.bench.latency import TopicTail

    started = time.time()
    tail = TopicTail(config["bootstrap"], config["topic"])
    try:
        _serve(lambda: {"received": len(tail.latencies)}, [], started)
    finally:
        tail.close()
        _emit({"final": {"latencies_ms": list(tail.latencies), "to_producer_ms": list(tail.to_producer),
                         "hops_ms": tail.hops, "by_second_ms": [tail.by_second[k] for k in sorted(tail.by_second)]}})


def main(argv: list[str]) -> int:
    """Entry point of a child: ``KIND CONFIG_JSON``."""
    kind, config = argv[0], json.loads(argv[1])
    runners = {"gateway": run_gateway, "bridge": run_bridge, "naive": run_naive, "subscriber": run_subscriber, "tail": run_tail}
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    runners[kind](config)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
