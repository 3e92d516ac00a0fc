"""Watching a running gateway or bridge from outside: paho "nodes" that publish real contract
messages, a gateway with its HTTP endpoint on a free loopback port, a bridge to Kafka, and
HTTP reads of /status.json, /healthz and /metrics (parsed by prometheus_client's parser).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families

from tern.cloud.bridge import BridgeThread
from tern.core import codec, topics
from tern.edge.config import GatewayConfig
from tern.edge.service import Gateway
from tern.harness.stack import Mosquitto, free_port

from .kafka import bridge_config
from .waiting import wait_until

DEADLINE = 30.0
#: Debian's Chromium for the status page's tests (Playwright drives it): no download, no sandbox
#: (root in CI), nothing phoning home: the page must work on its own.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-sync",
]


def wait_for(predicate: Callable[[], Any], timeout: float = DEADLINE, what: str = "condition") -> Any:
    """:func:`wait_until` with this module's deadline, polling every 0.1 s."""
    return wait_until(predicate, timeout, what, interval=0.1)


def client(broker: Mosquitto, client_id: str | None = None, will: tuple[str, bytes] | None = None) -> mqtt.Client:
    """A connected paho client (network loop running)."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"t-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv311)
    if will is not None:
        c.will_set(will[0], will[1], qos=1, retain=True)
    c.connect(broker.host, broker.port, keepalive=5)
    c.loop_start()
    return c


def publish_all(c: mqtt.Client, messages: Iterable[tuple[str, bytes, bool]]) -> None:
    """Publish (topic, payload, retain) at QoS 1 and wait until the broker took each one."""
    infos = [c.publish(topic, payload, qos=1, retain=retain) for topic, payload, retain in messages]
    for info in infos:
        info.wait_for_publish(DEADLINE)
        assert info.is_published()


def publish_acked(broker: Mosquitto, items: Iterable[tuple[str, bytes]]) -> None:
    """Publish raw (topic, payload) pairs at QoS 1 from a client of their own, each acknowledged
    by ``broker`` (:func:`publish_all` for a client already connected)."""
    from .gateway import new_client

    c = new_client()
    c.connect(broker.host, broker.port)
    c.loop_start()
    try:
        publish_all(c, ((topic, payload, False) for topic, payload in items))
    finally:
        c.disconnect()
        c.loop_stop()


def reading(site: str, device: str, boot: str, seq: int) -> tuple[str, bytes, bool]:
    """One telemetry message of the node contract."""
    payload = codec.encode_reading(codec.Reading(device=device, boot=boot, seq=seq, ts_ms=1_700_000_000_000 + seq, values={"t": seq / 10}))
    return topics.telemetry_topic(site, device), payload, False


def status(site: str, device: str, boot: str, state: str, fw: str = "1.2.3") -> tuple[str, bytes, bool]:
    """A retained birth (online) or last will (offline)."""
    payload = codec.encode_status(codec.Status(device=device, state=state, boot=boot, fw=fw, reset="power"))
    return topics.status_topic(site, device), payload, True


def gateway_config(tmp: Path, pi: Mosquitto, cloud: Mosquitto, **extra: Any) -> GatewayConfig:
    """A gateway config with its HTTP endpoint on a free loopback port."""
    values: dict[str, Any] = dict(
        gateway_id="gw-obs",
        local_broker=pi.address,
        cloud_broker=cloud.address,
        outbox_path=tmp / "outbox.db",
        http_port=free_port(),
        confirm_timeout_s=2.0,
        # Most of these tests leave a batch unconfirmed on purpose: do not wait 5 s for it at stop.
        stop_timeout_s=1.0,
    )
    values.update(extra)
    return GatewayConfig(**values)


def bridge(cloud: Mosquitto, kafka_bootstrap: str, kafka_topics: dict[str, str]) -> BridgeThread:
    """A bridge from ``cloud`` to Kafka (not started)."""
    return BridgeThread(
        bridge_config(cloud, kafka_bootstrap, kafka_topics, name=f"obs-{uuid.uuid4().hex[:6]}")
    )


def http_get(url: str, timeout: float = 5.0) -> bytes:
    """GET ``url``; raises on a non-2xx answer."""
    with urllib.request.urlopen(url, timeout=timeout) as res:
        return res.read()


def http_status(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET ``url``: (HTTP status, body), an error status included."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as res:
            return res.status, res.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def parse_metrics(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Prometheus text parsed by prometheus_client's parser: {sample name: {sorted labels: value}}."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def scrape_url(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """The metrics at ``url`` (a 2xx answer), parsed as by :func:`parse_metrics`."""
    return parse_metrics(http_get(url).decode())


def status_json(gw: Gateway) -> dict:
    """/status.json of a running gateway."""
    assert gw.status_server is not None
    return json.loads(http_get(gw.status_server.url + "/status.json"))


def scrape(gw: Gateway) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """/metrics of a running gateway, parsed as by :func:`parse_metrics`."""
    assert gw.status_server is not None
    return scrape_url(gw.status_server.url + "/metrics")


def value(metrics: dict, name: str, **labels: str) -> float | None:
    """One sample's value, None when absent."""
    return metrics.get(name, {}).get(tuple(sorted(labels.items())))
