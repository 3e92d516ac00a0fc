"""The bridge's presence on the cloud broker: a retained status with a last will, like a node's.

On ``tern-bridge/<name>/status`` (retained, QoS 1) the bridge publishes ``online`` on every
connect and ``offline`` before a clean stop; the broker publishes the last will, ``offline``
with ``"clean": false``, when the bridge dies without saying goodbye (kill -9, a crash, a
lost network). So a gateway, an operator or an alert rule subscribed to
``tern-bridge/+/status`` sees a dead bridge at once, and a new subscriber sees the last state.

Payload (JSON): ``{"bridge": name, "state": "online"|"offline", "clean": bool, "ts_ms": int}``;
the will's ``ts_ms`` is when the connection it guards was set up.
"""

from __future__ import annotations

import json
import time
from typing import Any

import paho.mqtt.client as mqtt

from tern.core import topics

#: How long a clean stop waits for the broker to take the "offline" message.
GOODBYE_TIMEOUT_S = 2.0


def status_payload(name: str, state: str, clean: bool = True) -> bytes:
    """The retained status message of bridge ``name``."""
    return json.dumps({"bridge": name, "state": state, "clean": clean, "ts_ms": time.time_ns() // 1_000_000},
                      separators=(",", ":")).encode()


def decode_status(payload: bytes) -> dict[str, Any]:
    """Decode a bridge status message (raises ValueError if it is not one)."""
    obj = json.loads(payload)
    if not isinstance(obj, dict) or obj.get("state") not in ("online", "offline") or not isinstance(obj.get("bridge"), str):
        raise ValueError(f"not a bridge status: {payload[:200]!r}")
    return obj


def set_will(client: mqtt.Client, name: str) -> None:
    """Give ``client`` (before it connects) the retained last will ``offline``."""
    client.will_set(topics.bridge_status_topic(name), status_payload(name, "offline", clean=False), qos=1, retain=True)


def announce(client: mqtt.Client, name: str, state: str, wait_s: float = 0.0) -> None:
    """Publish the retained ``state`` of bridge ``name``; with ``wait_s``, wait that long for the broker's PUBACK."""
    info = client.publish(topics.bridge_status_topic(name), status_payload(name, state), qos=1, retain=True)
    if wait_s > 0 and info.rc == mqtt.MQTT_ERR_SUCCESS:
        try:
            info.wait_for_publish(wait_s)
        except (RuntimeError, ValueError):
            pass  # not connected any more: the will says "offline" instead
