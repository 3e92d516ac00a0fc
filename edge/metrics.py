"""Prometheus metrics of the gateway (prometheus-client, on a registry of its own).

Counters and levels are read from :class:`~tern.edge.health.Health` at scrape time by a
custom collector, so they are exactly what ``tern-gateway status`` and the status page show;
the confirm round-trip time is a real histogram, observed as confirms arrive.

Per-device series (``tern_gateway_device_*``) exist only with ``metrics_per_device = true``:
a fleet of a thousand nodes would otherwise make a thousand series per metric.
"""

from __future__ import annotations

from typing import Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from tern.edge.health import Health

PREFIX = "tern_gateway"
#: Confirm round trips run from a few ms on a LAN to seconds on a cellular link.
RTT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

__all__ = ["CONTENT_TYPE_LATEST", "GatewayMetrics"]


class _HealthCollector(Collector):
    def __init__(self, health: Health, per_device: bool) -> None:
        self.health = health
        self.per_device = per_device

    def collect(self) -> Iterator[Metric]:
        snap = self.health.snapshot()
        ingest, outbox, uplink = snap["ingest"], snap["outbox"], snap["uplink"]

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)

        yield counter("readings_received", "Valid readings taken from the local broker (committed + duplicates).", ingest["received"])
        yield counter("readings_committed", "Readings committed to the outbox (then acknowledged).", ingest["committed"])
        yield counter("readings_forwarded", "Readings confirmed by the cloud and deleted from the outbox.", uplink["forwarded"])
        yield counter("readings_duplicate", "Readings already committed: acknowledged, not stored again.", ingest["duplicates"])
        yield counter("dead_letters", "Messages dead-lettered (broke the contract) since start.", ingest["dead_letters"])
        drops = CounterMetricFamily(f"{PREFIX}_readings_dropped", "Readings dropped by a retention policy, by reason.", labels=["reason"])
        for reason, n in sorted(outbox["drops"].items()):
            drops.add_metric([reason], n)
        yield drops
        if ingest["missing"] is not None:
            yield gauge("readings_missing", "Readings missing in the devices' sequences (open gaps).", ingest["missing"])
            yield gauge("sequence_gaps_open", "Open gaps in the devices' sequences.", ingest["gaps_open"] or 0)
        yield counter("batches_confirmed", "Batches confirmed by the cloud.", uplink["batches_confirmed"])
        yield counter("batches_resent", "Batches sent again after a confirm timeout.", uplink["batches_resent"])

        rows = GaugeMetricFamily(f"{PREFIX}_outbox_rows", "Rows waiting in the outbox, by kind.", labels=["kind"])
        rows.add_metric(["reading"], outbox["readings"])
        rows.add_metric(["status"], outbox["statuses"])
        yield rows
        yield gauge("outbox_max_rows", "The outbox bound in rows.", outbox["max_rows"])
        yield gauge("outbox_bytes", "Bytes the outbox takes on disk (database, WAL, shared memory).", outbox["bytes"])
        age = outbox["oldest_age_s"]
        yield gauge("outbox_oldest_age_seconds", "Age of the oldest pending reading (0 when empty).", age or 0.0)
        yield gauge("dead_letters_stored", "Dead letters kept in the outbox (forwarded or not).", outbox["dead_letters"])
        yield gauge("dead_letters_unsent", "Dead letters not yet confirmed by the cloud.", outbox.get("dead_letters_unsent", 0))
        yield counter("dead_letters_forwarded", "Dead letters confirmed by the cloud (in tern.deadletter) since start.",
                      uplink.get("deadletters_forwarded", 0))
        yield gauge("ingest_connected", "1 while connected to the local broker.", int(ingest["connected"]))
        yield counter("readings_held_back", "Readings held back per device share or rate (acked uncommitted; the node sends them again).",
                      ingest.get("held_back", 0))
        yield gauge("devices_held_back", "Devices held back now by their share of the outbox or the rate limit.", ingest.get("devices_held", 0))
        yield gauge("ingest_backpressure", "1 while the outbox is full and readings are not acknowledged.", int(ingest["backpressure"]))
        yield gauge("uplink_connected", "1 while connected to the cloud broker.", int(uplink["connected"]))
        yield gauge("uplink_batches_in_flight", "Batches published and not yet confirmed.", uplink["batches_in_flight"])
        takeovers = CounterMetricFamily(
            f"{PREFIX}_session_takeovers",
            "Times a broker kept closing our session right after connecting (another client with our id), by link.",
            labels=["link"],
        )
        contested = GaugeMetricFamily(
            f"{PREFIX}_session_contested", "1 while another client with our client id keeps taking the session.", labels=["link"]
        )
        for link, part in (("local", ingest), ("cloud", uplink)):
            takeovers.add_metric([link], part["session_takeovers"])
            contested.add_metric([link], int(part["session_contested"]))
        yield takeovers
        yield contested
        nodes = GaugeMetricFamily(f"{PREFIX}_nodes", "Devices by their latest status (birth or last will).", labels=["state"])
        nodes.add_metric(["online"], snap["nodes"]["online"])
        nodes.add_metric(["offline"], snap["nodes"]["offline"])
        yield nodes
        if self.per_device:
            yield from self._per_device(snap["devices"])

    def _per_device(self, devices: list[dict]) -> Iterator[Metric]:
        labels = ["site", "device"]
        online = GaugeMetricFamily(f"{PREFIX}_device_online", "1 if the device's latest status is online.", labels=labels)
        seen = GaugeMetricFamily(f"{PREFIX}_device_last_seen_timestamp_seconds", "When the device was last heard of.", labels=labels)
        received = CounterMetricFamily(
            f"{PREFIX}_device_readings_received", "Readings received from the device since start (duplicates included).", labels=labels
        )
        duplicates = CounterMetricFamily(f"{PREFIX}_device_duplicates", "Duplicate readings of the device.", labels=labels)
        gaps = GaugeMetricFamily(f"{PREFIX}_device_missing_readings", "Readings missing in the device's sequence.", labels=labels)
        held = CounterMetricFamily(
            f"{PREFIX}_device_readings_held_back", "Readings of the device held back by its share or the rate limit.", labels=labels
        )
        dropped = CounterMetricFamily(
            f"{PREFIX}_device_readings_dropped", "Readings of the device dropped by a retention policy.", labels=[*labels, "reason"]
        )
        for d in devices:
            key = [d["site"], d["device"]]
            online.add_metric(key, 1 if d["state"] == "online" else 0)
            if d["last_seen_ms"] is not None:
                seen.add_metric(key, d["last_seen_ms"] / 1000)
            received.add_metric(key, d["received"])
            if d["duplicates"] is not None:
                duplicates.add_metric(key, d["duplicates"])
            if d["missing"] is not None:
                gaps.add_metric(key, d["missing"])
            for reason, n in sorted(d["dropped_by_reason"].items()):
                dropped.add_metric([*key, reason], n)
            held.add_metric(key, d.get("held_back", 0))
        yield from (online, seen, received, duplicates, gaps, dropped, held)


class GatewayMetrics:
    """The gateway's registry: the health collector and the confirm round-trip histogram."""

    def __init__(self, health: Health, per_device: bool = False) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_HealthCollector(health, per_device))
        self.confirm_rtt = Histogram(
            f"{PREFIX}_confirm_rtt_seconds",
            "Seconds from publishing a batch to the cloud's confirm.",
            buckets=RTT_BUCKETS,
            registry=self.registry,
        )
        health.rtt_observers.append(self.confirm_rtt.observe)

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)
