"""Gateway settings: one validated dataclass, built from CLI arguments or environment variables."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Mapping

from tern.core.errors import CodecError, ConfigError
from tern.core.hostport import parse_hostport
from tern.core.topics import check_id

DEFAULT_LOCAL_BROKER = "127.0.0.1:1883"
DEFAULT_MQTT_PORT = 1883
DEFAULT_BATCH_SIZE = 200
#: ~5 M readings of ~300 bytes is ~1.5 GB of SQLite: fits a Pi's SD card with room to spare,
#: and is days of backlog for a site of a few hundred nodes.
DEFAULT_MAX_ROWS = 5_000_000
DEFAULT_CONFIRM_TIMEOUT_S = 15.0
DEFAULT_RECONNECT_MAX_S = 30.0
#: Readings per batch are bounded so one envelope stays far below codec.MAX_BATCH_BYTES.
MAX_BATCH_SIZE = 5000

ENV_GATEWAY_ID = "TERN_GATEWAY_ID"
ENV_LOCAL_BROKER = "TERN_LOCAL_BROKER"
ENV_CLOUD_BROKER = "TERN_CLOUD_BROKER"
ENV_OUTBOX = "TERN_OUTBOX"
ENV_BATCH_SIZE = "TERN_BATCH_SIZE"
ENV_MAX_ROWS = "TERN_MAX_ROWS"
ENV_CONFIRM_TIMEOUT = "TERN_CONFIRM_TIMEOUT"


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

    def __post_init__(self) -> None:
        try:
            check_id(self.gateway_id, "gateway id")
        except CodecError as exc:
            raise ConfigError(str(exc)) from None
        for name in ("local_broker", "cloud_broker"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise ConfigError(f"{name}: expected HOST:PORT, got {value!r}")
            try:
                parse_hostport(value, DEFAULT_MQTT_PORT)
            except ConfigError as exc:
                raise ConfigError(f"{name}: {exc}") from None
        if isinstance(self.outbox_path, os.PathLike):
            # Accept pathlib.Path as well; store a str so the config stays simple to print.
            object.__setattr__(self, "outbox_path", os.fspath(self.outbox_path))
        if not isinstance(self.outbox_path, str) or not self.outbox_path.strip():
            raise ConfigError("outbox path is empty: give the SQLite file the outbox lives in")
        if os.path.isdir(self.outbox_path):
            raise ConfigError(f"outbox path {self.outbox_path!r} is a directory, expected a file name")
        _check_int("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        _check_int("max_rows", self.max_rows, 1, 2**53 - 1)
        _check_int("keepalive_s", self.keepalive_s, 5, 3600)
        _check_number("confirm_timeout_s", self.confirm_timeout_s, 0.1, 3600)
        _check_number("reconnect_max_s", self.reconnect_max_s, 1, 3600)

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

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> "GatewayConfig":
        """Build from ``TERN_*`` environment variables; keyword ``overrides`` win over them."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for key, name, parse in (
            ("gateway_id", ENV_GATEWAY_ID, str),
            ("local_broker", ENV_LOCAL_BROKER, str),
            ("cloud_broker", ENV_CLOUD_BROKER, str),
            ("outbox_path", ENV_OUTBOX, str),
            ("batch_size", ENV_BATCH_SIZE, int),
            ("max_rows", ENV_MAX_ROWS, int),
            ("confirm_timeout_s", ENV_CONFIRM_TIMEOUT, float),
        ):
            raw = env.get(name, "").strip()
            if raw:
                try:
                    values[key] = parse(raw)
                except ValueError:
                    raise ConfigError(f"{name}={raw!r} is not a valid {parse.__name__}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        for key, flag, name in (
            ("gateway_id", "--gateway-id", ENV_GATEWAY_ID),
            ("cloud_broker", "--cloud", ENV_CLOUD_BROKER),
            ("outbox_path", "--outbox", ENV_OUTBOX),
        ):
            if not values.get(key):
                raise ConfigError(f"{key.replace('_', ' ')} is required: pass {flag} or set {name}")
        return cls(**values)  # type: ignore[arg-type]

    @classmethod
    def from_args(cls, args: argparse.Namespace, env: Mapping[str, str] | None = None) -> "GatewayConfig":
        """Build from parsed ``tern-gateway run`` arguments; unset flags fall back to the environment."""
        return cls.from_env(
            env,
            gateway_id=getattr(args, "gateway_id", None),
            local_broker=getattr(args, "local", None),
            cloud_broker=getattr(args, "cloud", None),
            outbox_path=getattr(args, "outbox", None),
            batch_size=getattr(args, "batch_size", None),
            max_rows=getattr(args, "max_rows", None),
            confirm_timeout_s=getattr(args, "confirm_timeout", None),
        )


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ConfigError(f"{name} must be an integer in [{low}, {high}], got {value!r}")


def _check_number(name: str, value: object, low: float, high: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise ConfigError(f"{name} must be a number in [{low}, {high}], got {value!r}")
