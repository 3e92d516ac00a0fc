"""The bridge's Prometheus metrics and health endpoint, on ``metrics_host:metrics_port``.

``GET /metrics`` serves the bridge's counters in the Prometheus text format, named after
EMQX's data-integration (action) metrics: batches matched, records written (by kind),
batches confirmed, dead-lettered, retried, duplicates, Kafka failures, messages and records in
flight and the age of the oldest unacknowledged one, plus a histogram of Kafka write
latency (one write = one batch's records, from hand-over to the producer to the last
acknowledgement). ``GET /healthz`` answers 200 when the bridge is connected to the MQTT broker
and Kafka answers (a metadata request every few seconds, and the last write did not fail),
503 otherwise, with a JSON body saying which part is missing.

The counters are read from :meth:`tern.cloud.bridge.Bridge.stats` at scrape time by a custom
collector (so the bridge keeps one set of counters); a stats key this module does not know
yet is still exported, as a gauge ``tern_bridge_<key>``. Everything lives in the monitor's
own :class:`~prometheus_client.CollectorRegistry`, so several bridges in one process (tests)
do not collide.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tern.core.errors import TernError

if TYPE_CHECKING:  # the bridge imports this module
    from tern.cloud.bridge import Bridge
    from tern.cloud.kafka_sink import KafkaSink

log = logging.getLogger("tern.bridge.metrics")

PREFIX = "tern_bridge"
#: How often Kafka is asked for metadata to decide its health, and how long it may take.
PROBE_EVERY_S = 3.0
PROBE_TIMEOUT_S = 5.0
#: Kafka write latency buckets (seconds): a healthy acks=all write takes milliseconds, a
#: struggling cluster seconds, a blackholed one the request timeout.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

#: stats() key -> (metric name without prefix, help, labels). Counters get ``_total`` on export.
COUNTERS: dict[str, tuple[str, str, dict[str, str]]] = {
    "matched": ("batches_matched", "MQTT messages received on the batch topics", {}),
    "records_written": ("records_written", "records Kafka acknowledged, by kind", {"kind": "reading"}),
    "status_written": ("records_written", "records Kafka acknowledged, by kind", {"kind": "status"}),
    "batches_confirmed": ("batches_confirmed", "batches confirmed to their gateway after Kafka held them", {}),
    "deadlettered": ("deadlettered", "messages written to the dead-letter topic", {}),
    "retries": ("retried", "Kafka writes retried after a failure", {}),
    "kafka_failures": ("kafka_failures", "Kafka writes that failed", {}),
    "drops_written": ("records_written", "records Kafka acknowledged, by kind", {"kind": "drop"}),
    "holds_written": ("records_written", "records Kafka acknowledged, by kind", {"kind": "hold"}),
    "gateway_deadletters_written": ("records_written", "records Kafka acknowledged, by kind", {"kind": "gateway_deadletter"}),
    "duplicates_received": ("duplicates", "batches already in Kafka (re-sent or redelivered), confirmed again without writing", {}),
    "mqtt_dup_flags": ("mqtt_redelivered", "MQTT messages the broker flagged as redeliveries (DUP)", {}),
    "stale_dropped": ("stale_dropped", "deliveries given up because their connection was gone (redelivered)", {}),
    "mqtt_connects": ("mqtt_connects", "connections made to the MQTT broker", {}),
    "mqtt_disconnects": ("mqtt_disconnects", "connections to the MQTT broker lost or closed", {}),
}
GAUGES: dict[str, tuple[str, str]] = {
    "inflight": ("inflight", "MQTT messages received and not yet acknowledged"),
    "oldest_unacked_age_s": ("oldest_unacked_age_seconds", "age of the oldest message not yet acknowledged"),
    "mqtt_connected": ("mqtt_connected", "1 while connected to the MQTT broker"),
    "records_inflight": ("records_inflight", "records handed to Kafka and not yet acknowledged"),
    "batches_writing": ("batches_writing", "batches being written to Kafka now"),
}
#: stats() keys that repeat another one under an older name.
ALIASES = {"batches_received"}


class MetricsError(TernError, RuntimeError):
    """The metrics endpoint could not start (its port is taken, say)."""


class _StatsCollector(Collector):
    """Turns ``bridge.stats()`` into metric families at each scrape."""

    def __init__(self, monitor: "BridgeMonitor") -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[Metric]:
        stats = self.monitor.bridge.stats()
        families: dict[str, CounterMetricFamily] = {}
        for key, (name, doc, labels) in COUNTERS.items():
            if key not in stats:
                continue
            family = families.get(name)
            if family is None:
                family = families[name] = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=list(labels))
            family.add_metric(list(labels.values()), float(stats[key]))
        yield from families.values()
        for key, (name, doc) in GAUGES.items():
            if key in stats:
                yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=float(stats[key]))
        yield GaugeMetricFamily(f"{PREFIX}_kafka_connected", "1 while Kafka answers the bridge",
                                value=float(self.monitor.kafka_ok))
        yield GaugeMetricFamily(f"{PREFIX}_up", "1 when /healthz says ok", value=float(self.monitor.health()[0]))
        # Counters a newer bridge has and this table does not know yet: exported as they are.
        for key, value in stats.items():
            if key in COUNTERS or key in GAUGES or key in ALIASES or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)):
                yield GaugeMetricFamily(f"{PREFIX}_{key}", f"bridge.stats()['{key}']", value=float(value))


class BridgeMonitor:
    """Metrics and health of one running bridge, served over HTTP from a daemon thread.

    Made and started by the bridge itself (:meth:`start`, inside its event loop) when
    ``config.metrics_port`` is not 0; :meth:`stop` ends it.
    """

    def __init__(self, bridge: "Bridge", sink: "KafkaSink") -> None:
        self.bridge = bridge
        self.sink = sink
        self._probe_ok = False
        self._last_write_ok = True
        # Not auto-described: the stats collector's families follow whatever stats() holds.
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_StatsCollector(self))
        self.kafka_write_seconds = Histogram(
            f"{PREFIX}_kafka_write_seconds",
            "time from handing a batch's records to the Kafka producer to the last acknowledgement",
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._probe: asyncio.Task | None = None

    # --- hooks ---------------------------------------------------------------------------

    def observe_write(self, records: int, seconds: float, ok: bool) -> None:
        """Called by the Kafka sink after every write (the bridge's loop)."""
        if ok:
            self.kafka_write_seconds.observe(seconds)
        self._last_write_ok = ok

    # --- state ---------------------------------------------------------------------------

    @property
    def kafka_ok(self) -> bool:
        """Kafka answered the last probe and the last write did not fail."""
        return self._probe_ok and self._last_write_ok

    def health(self) -> tuple[bool, dict[str, Any]]:
        """(healthy, the JSON body of /healthz)."""
        stats = self.bridge.stats()
        mqtt_ok = bool(stats.get("mqtt_connected"))
        kafka_ok = self.kafka_ok
        healthy = mqtt_ok and kafka_ok
        body = {
            "status": "ok" if healthy else "unavailable",
            "bridge": self.bridge.config.name,
            "mqtt": mqtt_ok,
            "kafka": kafka_ok,
            "inflight": stats.get("inflight", 0),
            "oldest_unacked_age_s": stats.get("oldest_unacked_age_s", 0.0),
        }
        return healthy, body

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> "BridgeMonitor":
        """Probe Kafka once, start probing it periodically and serve HTTP; raise MetricsError if the port is unusable."""
        cfg = self.bridge.config
        await self._probe_once()
        monitor = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    status, body, ctype = 200, generate_latest(monitor.registry), CONTENT_TYPE_LATEST
                elif path == "/healthz":
                    healthy, info = monitor.health()
                    status, body, ctype = (200 if healthy else 503), json.dumps(info).encode(), "application/json"
                else:
                    status, body, ctype = 404, b"not found: try /metrics or /healthz\n", "text/plain"
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # scrapes every few seconds: not worth a log line
                pass

        try:
            server = ThreadingHTTPServer((cfg.metrics_host, cfg.metrics_port), Handler)
        except OSError as exc:
            raise MetricsError(f"cannot serve metrics on {cfg.metrics_host}:{cfg.metrics_port}: {exc.strerror or exc}") from None
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name=f"tern-bridge-metrics-{cfg.name}", daemon=True)
        self._thread.start()
        self._probe = asyncio.create_task(self._probe_loop(), name="tern-bridge-kafka-probe")
        self.sink.on_write = self.observe_write
        log.info("metrics on http://%s:%d/metrics, health on /healthz", cfg.metrics_host, self.port)
        return self

    @property
    def port(self) -> int:
        """The port actually served (useful when configured as an ephemeral one)."""
        return self._server.server_address[1] if self._server is not None else 0

    async def stop(self) -> None:
        """Stop probing and serving."""
        self.sink.on_write = None
        if self._probe is not None:
            self._probe.cancel()
            try:
                await self._probe
            except asyncio.CancelledError:
                pass
        server, self._server = self._server, None
        if server is not None:
            # shutdown() blocks until serve_forever notices: off the event loop.
            await asyncio.get_running_loop().run_in_executor(None, server.shutdown)
            server.server_close()

    async def _probe_once(self) -> None:
        ok = await self.sink.reachable(PROBE_TIMEOUT_S)
        if ok != self._probe_ok:
            log.log(logging.INFO if ok else logging.WARNING, "Kafka %s", "answers" if ok else "does not answer")
        self._probe_ok = ok
        if ok and not self._last_write_ok and self.bridge.stats().get("inflight", 0) == 0:
            self._last_write_ok = True  # nothing is being retried any more

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(PROBE_EVERY_S)
            started = time.monotonic()
            await self._probe_once()
            log.debug("Kafka probe took %.3f s", time.monotonic() - started)
