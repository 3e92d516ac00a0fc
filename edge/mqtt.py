"""paho-mqtt client set-up shared by ingest and uplink: persistent sessions, bounded back-off."""

from __future__ import annotations

import logging

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

log = logging.getLogger(__name__)


def new_client(client_id: str, *, manual_ack: bool = False) -> mqtt.Client:
    """A paho client with a stable id and ``clean_session=False``.

    A persistent session is what lets the broker hold our QoS 1 messages (and, with manual
    acks, everything we have not PUBACKed yet) while we are down or refusing to ack.
    """
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=False,
        protocol=mqtt.MQTTv311,
        manual_ack=manual_ack,
    )
    # paho's default of 20 in-flight QoS 1 publishes caps throughput near 460 msg/s.
    client.max_inflight_messages_set(100)
    return client


def connect_in_background(client: mqtt.Client, host: str, port: int, *, keepalive: int, reconnect_max_s: float) -> None:
    """Start paho's network thread; it connects and keeps reconnecting (1 s, doubling, capped)."""
    client.reconnect_delay_set(1, max(1, int(reconnect_max_s)))
    # connect_async + loop_start: a broker that is down at start-up is retried like any other
    # outage instead of failing the gateway's start.
    client.connect_async(host, port, keepalive=keepalive)
    client.loop_start()


def shutdown(client: mqtt.Client) -> None:
    """Disconnect cleanly (the session and its un-acked messages stay on the broker)."""
    try:
        client.disconnect()
    except Exception:  # pragma: no cover - a broken socket at shutdown is not worth a crash
        log.debug("disconnect failed", exc_info=True)
    client.loop_stop()
