"""``tern-bridge release DIR --gateway GW [--gateway GW2 ...]``: send a firmware release to gateways.

The release folder (``tern-device release build``) goes as one bundle (:mod:`tern.core.ota_wire`)
on each gateway's ``tern-gw/<gateway>/release`` topic of the cloud broker, QoS 1 and not
retained: the broker keeps it in the gateway's persistent command session until the gateway
has stored it, so it crosses the gateway's uplink once. The broker's connection settings and
credentials are the bridge's (``TERN_CLOUD_BROKER``, ``TERN_BRIDGE_MQTT_*``).

The gateway checks the signature and every file against its fleet verify key before it keeps
the release; a refused one becomes a dead letter (``tern.deadletter``).
"""

from __future__ import annotations

import argparse
import json
import ssl
import threading
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tern.core import ota_wire, topics
from tern.core.errors import CodecError, ConfigError, TernError

#: Seconds to connect and to have each bundle acknowledged by the broker.
TIMEOUT_S = 30.0


def add_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register the ``release`` subcommand on ``tern-bridge``'s parser."""
    rel = sub.add_parser("release", help="send a firmware release (tern-device release build) to gateways")
    rel.add_argument("folder", help="the release folder: manifest, manifest.sig and the files it lists")
    rel.add_argument("--gateway", action="append", required=True, help="gateway id (repeat for several)")
    rel.add_argument("--mqtt", help="cloud MQTT broker HOST:PORT (env TERN_CLOUD_BROKER)")


def read_release(folder: Path) -> tuple[ota_wire.Manifest, bytes]:
    """The manifest and the bundle of a release folder; ConfigError says what is missing."""
    folder = Path(folder)
    try:
        raw = (folder / ota_wire.MANIFEST).read_bytes()
        manifest = ota_wire.parse_manifest(raw)
        files = {name: (folder / name).read_bytes() for name in manifest.names()}
        return manifest, ota_wire.encode_bundle(files)
    except OSError as exc:
        raise ConfigError(f"{folder}: {exc.strerror}: {exc.filename}") from None
    except CodecError as exc:
        raise ConfigError(f"{folder}: {exc}") from None


def send_release(folder: Path, gateways: list[str], host: str, port: int, *, username: str | None = None,
                 password: str | None = None, tls: ssl.SSLContext | None = None) -> ota_wire.Manifest:
    """Publish the release in ``folder`` to each gateway (QoS 1); returns its manifest once the
    broker has acknowledged every copy. TernError if the broker cannot be reached in time."""
    for gw in gateways:
        try:
            topics.check_id(gw, "gateway")
        except CodecError as exc:
            raise ConfigError(str(exc)) from None
    manifest, bundle = read_release(folder)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"tern-release-{uuid.uuid4().hex[:8]}",
                         protocol=mqtt.MQTTv311)
    if username:
        client.username_pw_set(username, password)
    if tls is not None:
        client.tls_set_context(tls)
    connected = threading.Event()
    client.on_connect = lambda c, u, f, rc, p: connected.set() if not rc.is_failure else None
    try:
        client.connect(host, port)
    except OSError as exc:
        raise TernError(f"cloud broker {host}:{port}: {exc}") from None
    client.loop_start()
    try:
        if not connected.wait(TIMEOUT_S):
            raise TernError(f"cloud broker {host}:{port}: not connected within {TIMEOUT_S:.0f} s")
        for gw in gateways:
            info = client.publish(topics.gateway_release_topic(gw), bundle, qos=1)
            info.wait_for_publish(TIMEOUT_S)
            if not info.is_published():
                raise TernError(f"release {manifest.version} to {gw}: not acknowledged by the broker")
    finally:
        client.disconnect()
        client.loop_stop()
    return manifest


def run(args: argparse.Namespace) -> int:
    """``tern-bridge release``: send, print one JSON line per gateway."""
    from tern.cloud.config import BridgeConfig

    config = BridgeConfig.from_env(mqtt_broker=args.mqtt)
    host, port = config.mqtt_address
    auth = config.mqtt_auth()
    manifest = send_release(Path(args.folder), args.gateway, host, port, **auth)
    size = sum(f.size for f in manifest.files)
    for gw in args.gateway:
        print(json.dumps({"release": manifest.version, "gateway": gw, "files": len(manifest.files), "bytes": size,
                          "sent": True}))
    return 0
