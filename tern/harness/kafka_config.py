"""Tern's Apache Kafka broker settings (``deploy/kafka/broker.properties``), read in one place.

The harness's nodes start from these settings, and docker-compose.yml's shared Kafka
environment is the same settings spelled as the apache/kafka image wants them (``KAFKA_`` +
the name upper-cased, ``.`` -> ``_``, ``_`` -> ``__``, ``-`` -> ``___``).

CLI: ``python -m tern.harness.kafka_config compose-env`` prints that environment as YAML lines.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tern.core.errors import ConfigError


def broker_properties_path() -> Path:
    """The repository's ``deploy/kafka/broker.properties``."""
    from tern.toolchain import repo_root

    return repo_root() / "deploy" / "kafka" / "broker.properties"


def log4j_config_path() -> Path:
    """The Log4j 2 configuration the harness's Kafka nodes run with."""
    return broker_properties_path().with_name("log4j2.properties")


def parse_properties(text: str, where: str = "properties") -> dict[str, str]:
    """``key=value`` lines (``#`` comments, blank lines ignored) -> dict; ConfigError on a bad line.

    Only the plain subset Tern's file uses: no continuation lines, no escapes.
    """
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", "!")):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{where}:{number}: expected key=value, got {raw!r}")
        if key.strip() in values:
            raise ConfigError(f"{where}:{number}: {key.strip()} is set twice")
        values[key.strip()] = value.strip()
    return values


def broker_settings(path: Path | None = None) -> dict[str, str]:
    """The shared broker settings from ``deploy/kafka/broker.properties`` (or ``path``)."""
    path = path or broker_properties_path()
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read Kafka broker settings {path}: {exc.strerror}") from None
    return parse_properties(text, str(path))


def env_name(key: str) -> str:
    """The apache/kafka image's environment variable for broker setting ``key``."""
    return "KAFKA_" + key.replace("_", "__").replace("-", "___").replace(".", "_").upper()


def compose_env(settings: dict[str, str] | None = None) -> dict[str, str]:
    """The broker settings as the image's ``KAFKA_*`` environment, in file order."""
    settings = broker_settings() if settings is None else settings
    return {env_name(key): value for key, value in settings.items()}


def main(argv: list[str] | None = None) -> int:
    """``compose-env``: print the settings as docker-compose environment lines."""
    args = sys.argv[1:] if argv is None else argv
    if args != ["compose-env"]:
        print("usage: python -m tern.harness.kafka_config compose-env", file=sys.stderr)
        return 2
    for name, value in compose_env().items():
        quoted = f'"{value}"' if value in ("true", "false") or "," in value else value
        print(f"  {name}: {quoted}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
