"""Gateway settings: one validated dataclass, built from a TOML file, environment variables and flags.

:class:`GatewayConfig` is the one place values are checked. Where they come from (the file,
``TERN_*`` variables, ``tern-gateway run`` flags, in rising precedence) is
:mod:`tern.edge.config_file`'s job; it works over this dataclass's fields, so a new field is a
new file key, environment variable (``TERN_<KEY>`` unless named in :data:`ENV_NAMES`) and flag
(``--<key>`` unless named in :data:`FLAG_NAMES`) without further code.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Mapping

from tern.core.errors import CodecError, ConfigError
from tern.core.hostport import parse_hostport
from tern.core.topics import check_id
from tern.security.secret_files import exposure_warning
from tern.security.tls import client_context

DEFAULT_LOCAL_BROKER = "127.0.0.1:1883"
DEFAULT_MQTT_PORT = 1883
#: A backlog leaves in envelopes of this many readings (~12 KB compressed): measured by
#: ``make bench`` (drain stage), 1000 carried a third more than 200 and as much as 2000, whose
#: staging costs the gateway and the bridge more memory. A quiet site's batches are cut
#: earlier by ``batch_linger_ms``.
DEFAULT_BATCH_SIZE = 1000
#: ~5 M readings of ~300 bytes is ~1.5 GB of SQLite: fits a Pi's SD card with room to spare,
#: and is days of backlog for a site of a few hundred nodes.
DEFAULT_MAX_ROWS = 5_000_000
DEFAULT_CONFIRM_TIMEOUT_S = 15.0
#: A returning link is used within this many seconds (paho's own default cap is 120 s; we
#: used 30 s and a field engineer watched the uplink stay down 13 s after the link was back).
DEFAULT_RECONNECT_MAX_S = 5.0
#: Readings per batch are bounded so one envelope stays far below codec.MAX_BATCH_BYTES.
MAX_BATCH_SIZE = 5000
#: Batches in flight on the uplink (see uplink_window). With 1000-reading batches, 4 lanes
#: drained a backlog faster than 8 (``make bench``): 4,000 readings in flight cover the round
#: trip, and fewer lanes cost less CPU per batch on a small machine.
DEFAULT_UPLINK_WINDOW = 4
MAX_UPLINK_WINDOW = 64
#: A quiet lane's batch leaves this long after its oldest reading. At 50 ms the linger was most
#: of the uplink's share of the p99 node -> Kafka latency at half the live capacity (the latency
#: stage's pipeline, split by the records' stamps: commit -> bridge p99 ~200 ms at 50 ms, ~90 ms
#: at 10 ms); at 10 ms a full live load left in batches a third the size (more CPU per reading
#: in gateway and bridge, three times the uplink bytes). 20 ms is between the two.
DEFAULT_BATCH_LINGER_MS = 20
DEFAULT_BATCH_MAX_BYTES = 256 * 1024
#: codec.MAX_BATCH_BYTES (the bridge refuses larger envelopes).
MAX_BATCH_MAX_BYTES = 1 << 20

ENV_GATEWAY_ID = "TERN_GATEWAY_ID"
ENV_LOCAL_BROKER = "TERN_LOCAL_BROKER"
ENV_CLOUD_BROKER = "TERN_CLOUD_BROKER"
ENV_OUTBOX = "TERN_OUTBOX"
ENV_BATCH_SIZE = "TERN_BATCH_SIZE"
ENV_MAX_ROWS = "TERN_MAX_ROWS"
ENV_CONFIRM_TIMEOUT = "TERN_CONFIRM_TIMEOUT"

#: Environment variables that predate the config file; every other key is ``TERN_<KEY>``.
ENV_NAMES = {
    "gateway_id": ENV_GATEWAY_ID,
    "local_broker": ENV_LOCAL_BROKER,
    "cloud_broker": ENV_CLOUD_BROKER,
    "outbox_path": ENV_OUTBOX,
    "batch_size": ENV_BATCH_SIZE,
    "max_rows": ENV_MAX_ROWS,
    "confirm_timeout_s": ENV_CONFIRM_TIMEOUT,
}
#: ``tern-gateway run`` flags that predate the config file; every other key is ``--<key>``.
FLAG_NAMES = {
    "local_broker": "--local",
    "cloud_broker": "--cloud",
    "outbox_path": "--outbox",
    "confirm_timeout_s": "--confirm-timeout",
}
#: Keys without a default: the file, the environment or a flag must give them.
REQUIRED = ("gateway_id", "cloud_broker", "outbox_path")

# --- operations (service, check) ---
DEFAULT_STOP_TIMEOUT_S = 5.0
DEFAULT_MIN_FREE_MB = 64
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class ConfigValueError(ConfigError):
    """A value of the wrong kind or out of range: names the key, what was expected, what was found."""

    def __init__(self, key: str, expected: str, found: object, note: str = "") -> None:
        self.key = key
        self.expected = expected
        self.found = found
        super().__init__(f"{key}: expected {expected}, found {found!r}" + (f" ({note})" if note else ""))


@dataclass(frozen=True)
class GatewayConfig:
    """Everything a gateway needs; construction validates, so a bad value fails at start-up.

    Broker addresses are ``host:port`` strings (port 1883 if omitted).
    """

    gateway_id: str
    cloud_broker: str
    outbox_path: str  # a pathlib.Path is accepted and stored as str
    local_broker: str = DEFAULT_LOCAL_BROKER
    batch_size: int = DEFAULT_BATCH_SIZE
    max_rows: int = DEFAULT_MAX_ROWS
    confirm_timeout_s: float = DEFAULT_CONFIRM_TIMEOUT_S
    #: Upper bound of paho's reconnect back-off (it starts at 1 s and doubles).
    reconnect_max_s: float = DEFAULT_RECONNECT_MAX_S
    keepalive_s: int = 30

    # --- operations: shutdown, `tern-gateway check`, logging ---
    #: On SIGTERM, how long the batch in flight may take to be confirmed before we stop anyway.
    stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S
    #: `tern-gateway check` fails when the outbox's file system has less free space than this.
    min_free_mb: int = DEFAULT_MIN_FREE_MB
    log_level: str = "INFO"

    # --- security (docs/security.md): credentials and TLS for both brokers ---
    #: The gateway's account on the Pi's mosquitto (`tern-gateway devices init` makes it).
    local_username: str | None = None
    #: File holding that account's password (mode 0600), e.g. /etc/mosquitto/tern/gateway.secret.
    local_password_file: str | None = None
    #: CA file of the cloud broker's certificate: TLS on the uplink (also on with cloud_tls).
    cloud_ca: str | None = None
    #: The gateway's client certificate and key (`tern-gateway certs`); common name = gateway id.
    cloud_cert: str | None = None
    cloud_key: str | None = None
    #: TLS against the system's CAs, for a cloud broker with a public certificate.
    cloud_tls: bool = False
    #: Username/password on the cloud broker instead of (or as well as) a client certificate.
    cloud_username: str | None = None
    cloud_password_file: str | None = None

    # --- observing (edge/status_page.py): /metrics, /status.json and the status page ---
    #: TCP port of the HTTP endpoint (0 = off).
    http_port: int = 0
    #: Address it listens on: loopback by default; "0.0.0.0" to see the page from a phone on the site network.
    http_host: str = "127.0.0.1"
    #: Per-device series in /metrics (one series per node and counter: mind a large fleet's cardinality).
    metrics_per_device: bool = False
    # --- sensors wired to the Pi (edge/serial_sensors.py) ---
    #: Comma-separated PATH:BAUD:PROTOCOL:DEVICE[:SITE] (protocol pms5003 or nmea; site
    #: defaults to the gateway id), e.g. "/dev/ttyUSB0:9600:pms5003:pi-pm".
    serial_sensors: str = ""
    # --- retention (edge/retention.py): bounds beyond max_rows, and the telemetry policy ---
    #: Bytes of live data in the outbox file at most (unset: no byte bound).
    max_bytes: int | None = None
    #: Readings older than this many seconds (gateway receive time) are dropped (unset: never).
    max_age_s: float | None = None
    #: At the row and byte bounds: "block" (stop acking; nothing dropped) or "drop_oldest".
    telemetry_policy: str = "block"
    # --- per-device shares (edge/shares.py): one node cannot starve the site ---
    #: Rows every device may hold whatever the number of devices (unset: a hundredth of max_rows).
    device_share_floor: int | None = None
    #: Rows one device may hold at most (unset: no cap beyond its share).
    device_share_cap: int | None = None
    #: Readings per second one device may send; above it the device is held back (unset: none).
    device_rate_limit: str | None = None
    # --- uplink pipelining (tern.edge.uplink) ---
    #: Batches in flight at once. Devices are spread over this many lanes by a stable hash of
    #: their id, each lane with at most one batch in flight, so a device's order holds.
    uplink_window: int = DEFAULT_UPLINK_WINDOW
    #: A lane's batch waits at most this long for more readings before it leaves (a quiet site
    #: forwards within about this; a backlog fills batches at once and never waits).
    batch_linger_ms: int = DEFAULT_BATCH_LINGER_MS
    #: Upper bound of one batch envelope on the wire (compressed), next to ``batch_size``.
    batch_max_bytes: int = DEFAULT_BATCH_MAX_BYTES
    #: Cap on what the uplink sends, for metered links: "500 readings/s" or "20 kB/s" (unset: none).
    uplink_rate_limit: str | None = None
    # --- over-the-air releases for the nodes (edge/ota_store.py, docs/ota.md) ---
    #: The fleet's verify key (fleet.pub of `tern-device keys`): releases are checked against it
    #: on arrival (unset: every release is refused, with a dead letter saying so).
    ota_key: str | None = None
    #: Releases kept beside the outbox (the oldest beyond this are deleted).
    ota_keep: int = 3
    #: Release chunks (1 KB each) served to the nodes a second at most, all nodes together: a
    #: wave of nodes updating at once cannot swamp the Pi's broker or starve the readings.
    ota_chunks_per_s: int = 50

    def __post_init__(self) -> None:
        try:
            check_id(self.gateway_id, "gateway id")
        except CodecError as exc:
            raise ConfigValueError(
                "gateway_id", "1-64 of [A-Za-z0-9_.-], not starting with . _ or -", self.gateway_id, "invalid gateway id"
            ) from exc
        for name in ("local_broker", "cloud_broker"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise ConfigValueError(name, "HOST:PORT", value)
            try:
                parse_hostport(value, DEFAULT_MQTT_PORT)
            except ConfigError:
                raise ConfigValueError(name, "HOST:PORT", value) from None
        if isinstance(self.outbox_path, os.PathLike):
            # Accept pathlib.Path as well; store a str so the config stays simple to print.
            object.__setattr__(self, "outbox_path", os.fspath(self.outbox_path))
        if not isinstance(self.outbox_path, str) or not self.outbox_path.strip():
            raise ConfigValueError("outbox_path", "the SQLite file the outbox lives in", self.outbox_path)
        if os.path.isdir(self.outbox_path):
            raise ConfigValueError("outbox_path", "a file name, not a directory", self.outbox_path)
        _check_int("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        _check_int("max_rows", self.max_rows, 1, 2**53 - 1)
        _check_int("keepalive_s", self.keepalive_s, 5, 3600)
        _check_number("confirm_timeout_s", self.confirm_timeout_s, 0.1, 3600)
        _check_number("reconnect_max_s", self.reconnect_max_s, 1, 3600)
        # --- operations ---
        _check_number("stop_timeout_s", self.stop_timeout_s, 0, 60)
        _check_int("min_free_mb", self.min_free_mb, 0, 2**31)
        if self.log_level not in LOG_LEVELS:
            raise ConfigValueError("log_level", f"one of {', '.join(LOG_LEVELS)}", self.log_level)
        # --- retention ---
        if self.max_bytes is not None:
            _check_int("max_bytes", self.max_bytes, 64 * 1024, 2**53 - 1)
        if self.max_age_s is not None:
            _check_number("max_age_s", self.max_age_s, 1, 10 * 365 * 86400)
        if self.telemetry_policy not in ("block", "drop_oldest"):
            raise ConfigValueError("telemetry_policy", "one of block, drop_oldest", self.telemetry_policy)
        if self.device_share_floor is not None:
            _check_int("device_share_floor", self.device_share_floor, 1, self.max_rows)
        if self.device_share_cap is not None:
            _check_int("device_share_cap", self.device_share_cap, self.device_share_floor or 1, 2**53 - 1)
        if self.device_rate_limit is not None:
            from tern.edge.ratelimit import RateLimitError
            from tern.edge.shares import parse_device_rate

            try:
                parse_device_rate(self.device_rate_limit)
            except RateLimitError:
                raise ConfigValueError("device_rate_limit", "'<number> readings/s', e.g. '50 readings/s'",
                                       self.device_rate_limit) from None
        if self.uplink_rate_limit is not None:
            from tern.edge.ratelimit import RateLimitError, parse_rate

            try:
                parse_rate(self.uplink_rate_limit)
            except RateLimitError:
                raise ConfigValueError(
                    "uplink_rate_limit", "'<number> readings/s' or '<number> bytes/s' (kB/s, MB/s)", self.uplink_rate_limit
                ) from None
        # --- security ---
        for key in ("ota_key", "local_password_file", "cloud_ca", "cloud_cert", "cloud_key", "cloud_password_file"):
            value = getattr(self, key)
            if value is not None and not os.path.isfile(value):
                raise ConfigValueError(key, "an existing file", value)
        if (self.cloud_cert is None) != (self.cloud_key is None):
            raise ConfigValueError("cloud_key" if self.cloud_key is None else "cloud_cert",
                                   "a client certificate and its key together", None)
        for user, secret in (("local_username", "local_password_file"), ("cloud_username", "cloud_password_file")):
            if (getattr(self, user) is None) != (getattr(self, secret) is None):
                raise ConfigValueError(secret if getattr(self, secret) is None else user,
                                       f"{user} and {secret} together", None)
        # --- observing ---
        _check_int("http_port", self.http_port, 0, 65535)
        if not isinstance(self.http_host, str) or not self.http_host.strip():
            raise ConfigValueError("http_host", "an address to listen on, e.g. 127.0.0.1", self.http_host)
        if not isinstance(self.metrics_per_device, bool):
            raise ConfigValueError("metrics_per_device", "true or false", self.metrics_per_device)
        # --- sensors wired to the Pi ---
        if not isinstance(self.serial_sensors, str):
            raise ConfigValueError("serial_sensors", "PATH:BAUD:PROTOCOL:DEVICE[:SITE],...", self.serial_sensors)
        try:
            self.serial_sensor_specs()
        except ConfigError as exc:
            raise ConfigValueError("serial_sensors", "PATH:BAUD:PROTOCOL:DEVICE[:SITE],...", self.serial_sensors,
                                   str(exc)) from None
        # --- uplink pipelining ---
        _check_int("uplink_window", self.uplink_window, 1, MAX_UPLINK_WINDOW)
        _check_int("batch_linger_ms", self.batch_linger_ms, 0, 60_000)
        _check_int("batch_max_bytes", self.batch_max_bytes, 1024, MAX_BATCH_MAX_BYTES)
        _check_int("ota_keep", self.ota_keep, 1, 100)
        _check_int("ota_chunks_per_s", self.ota_chunks_per_s, 1, 10_000)

    def serial_sensor_specs(self) -> list:
        """The Pi-wired sensors named by ``serial_sensors`` (a list of SerialSensorSpec)."""
        from tern.edge.serial_sensors import parse_specs

        return parse_specs(self.serial_sensors, self.gateway_id)

    @property
    def local_hostport(self) -> tuple[str, int]:
        """(host, port) of the Pi's local broker."""
        return parse_hostport(self.local_broker, DEFAULT_MQTT_PORT)

    @property
    def cloud_hostport(self) -> tuple[str, int]:
        """(host, port) of the cloud broker."""
        return parse_hostport(self.cloud_broker, DEFAULT_MQTT_PORT)

    @property
    def ingest_client_id(self) -> str:
        """Stable client id on the local broker: the persistent session must survive restarts."""
        return f"tern-gw-{self.gateway_id}-ingest"

    @property
    def uplink_client_id(self) -> str:
        """Stable client id on the cloud broker."""
        return f"tern-gw-{self.gateway_id}-uplink"

    def takeover_hint(self) -> str:
        """Who most likely holds our client ids when a broker keeps closing our sessions."""
        return (f"a second gateway with gateway_id {self.gateway_id!r} (another `tern-gateway run` beside the "
                "service, or a cloned SD card): give each gateway its own gateway_id")

    @property
    def cloud_uses_tls(self) -> bool:
        """True when the uplink speaks TLS to the cloud broker."""
        return bool(self.cloud_tls or self.cloud_ca or self.cloud_cert)

    def local_auth(self) -> dict[str, Any]:
        """Session keyword arguments (username, password) for the Pi's broker."""
        if self.local_username is None:
            return {}
        return {"username": self.local_username,
                "password": read_secret(self.local_password_file, "local_password_file")}

    def cloud_auth(self) -> dict[str, Any]:
        """Session keyword arguments (username, password, tls) for the cloud broker."""
        auth: dict[str, Any] = {}
        if self.cloud_username is not None:
            auth.update(username=self.cloud_username,
                        password=read_secret(self.cloud_password_file, "cloud_password_file"))
        if self.cloud_uses_tls:
            auth["tls"] = client_context(self.cloud_ca, self.cloud_cert, self.cloud_key, what="cloud broker")
        return auth

    def secrets(self) -> list[str]:
        """Every secret value this config gives access to, for the log filter."""
        found = []
        for key in ("local_password_file", "cloud_password_file"):
            path = getattr(self, key)
            if path is not None:
                found.append(read_secret(path, key))
        return found

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> "GatewayConfig":
        """Build from ``TERN_*`` environment variables; keyword ``overrides`` (by field name) win over them."""
        from tern.edge.config_file import resolve

        return resolve(env=env, overrides={k: v for k, v in overrides.items() if v is not None})

    @classmethod
    def from_args(cls, args: argparse.Namespace, env: Mapping[str, str] | None = None) -> "GatewayConfig":
        """Build from parsed ``tern-gateway run``/``check`` arguments: flags win over the environment,
        which wins over the ``--config`` file (if one was given)."""
        from tern.edge.config_file import flag_values, resolve

        return resolve(path=getattr(args, "config", None), env=env, flags=flag_values(args))


def read_secret(path: str | None, key: str) -> str:
    """The secret in ``path`` (one line); warns once on stderr when others can read the file."""
    assert path is not None
    warning = exposure_warning(Path(path))
    if warning:
        print(warning, file=sys.stderr)
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigValueError(key, "a readable file", path, exc.strerror or str(exc)) from None


def env_name(key: str) -> str:
    """The environment variable that sets ``key``."""
    return ENV_NAMES.get(key, "TERN_" + key.upper())


def flag_name(key: str) -> str:
    """The ``tern-gateway run`` flag that sets ``key``."""
    return FLAG_NAMES.get(key, "--" + key.replace("_", "-"))


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ConfigValueError(name, f"an integer in [{low}, {high}]", value)


def _check_number(name: str, value: object, low: float, high: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise ConfigValueError(name, f"a number in [{low}, {high}]", value)
