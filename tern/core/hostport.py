"""``HOST:PORT`` parsing shared by every config that names a broker or Kafka."""

from __future__ import annotations

from tern.core.errors import ConfigError


def parse_hostport(text: str, default_port: int | None = None) -> tuple[str, int]:
    """Parse ``host:port`` (or ``host`` with a default port), raising ConfigError if malformed."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, ""
    if not port and default_port is not None:
        port = str(default_port)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)
