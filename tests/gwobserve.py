"""Helpers for the tests of the gateway's metrics, status command and status page: paho
"nodes" that publish real contract messages, a gateway with its HTTP endpoint on a free
loopback port, and a bridge to Kafka. Every wait polls a real outcome under a deadline.
"""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families

from tern.cloud.bridge import BridgeThread
from tern.cloud.config import BridgeConfig
from tern.core import codec, topics
from tern.edge.config import GatewayConfig
from tern.edge.service import Gateway
from tern.harness.stack import Mosquitto, free_port

DEADLINE = 30.0


def wait_for(predicate: Callable[[], Any], timeout: float = DEADLINE, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something true (returned), failing after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


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
        BridgeConfig(
            name=f"obs-{uuid.uuid4().hex[:6]}",
            mqtt_broker=cloud.address,
            kafka_bootstrap=kafka_bootstrap,
            readings_topic=kafka_topics["readings"],
            status_topic=kafka_topics["status"],
            deadletter_topic=kafka_topics["deadletter"],
        )
    )


def http_get(url: str, timeout: float = 5.0) -> bytes:
    """GET ``url``; raises on a non-2xx answer."""
    with urllib.request.urlopen(url, timeout=timeout) as res:
        return res.read()


def status_json(gw: Gateway) -> dict:
    """/status.json of a running gateway."""
    assert gw.status_server is not None
    return json.loads(http_get(gw.status_server.url + "/status.json"))


def scrape(gw: Gateway) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """/metrics parsed by prometheus_client's parser: {sample name: {sorted labels: value}}."""
    assert gw.status_server is not None
    text = http_get(gw.status_server.url + "/metrics").decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def value(metrics: dict, name: str, **labels: str) -> float | None:
    """One sample's value, None when absent."""
    return metrics.get(name, {}).get(tuple(sorted(labels.items())))
