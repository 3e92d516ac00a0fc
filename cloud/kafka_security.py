"""How the bridge authenticates to Kafka: TLS and SASL (PLAIN, SCRAM-SHA-256/512) for aiokafka.

Configured by environment (and the bridge's config file keys of the same names)::

    TERN_KAFKA_SECURITY_PROTOCOL   PLAINTEXT (default) | SSL | SASL_PLAINTEXT | SASL_SSL
    TERN_KAFKA_CA                  CA file for the brokers' certificates (SSL, SASL_SSL)
    TERN_KAFKA_CERT, TERN_KAFKA_KEY   client certificate and key (mutual TLS)
    TERN_KAFKA_SASL_MECHANISM      PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512
    TERN_KAFKA_SASL_USERNAME
    TERN_KAFKA_SASL_PASSWORD       or TERN_KAFKA_SASL_PASSWORD_FILE (a file readable only by its owner)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from tern.core.errors import ConfigError
from tern.security.redact import MASK
from tern.security.secret_files import exposure_warning
from tern.security.tls import client_context

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(frozen=True)
class KafkaSecurity:
    """TLS and SASL settings for the bridge's Kafka clients; validated on construction."""

    protocol: str = "PLAINTEXT"
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"kafka security protocol: expected one of {', '.join(PROTOCOLS)}, found {self.protocol!r}")
        sasl = self.protocol.startswith("SASL_")
        if sasl:
            if self.sasl_mechanism not in MECHANISMS:
                raise ConfigError(f"kafka SASL mechanism: expected one of {', '.join(MECHANISMS)}, "
                                  f"found {self.sasl_mechanism!r}")
            if not self.sasl_username or not self.sasl_password:
                raise ConfigError("kafka SASL: a username and a password (or password file) are needed")
        elif self.sasl_mechanism or self.sasl_username:
            raise ConfigError(f"kafka SASL settings given but the security protocol is {self.protocol}: "
                              "use SASL_SSL (or SASL_PLAINTEXT on a trusted network)")
        if not self.protocol.endswith("SSL") and (self.ca_file or self.cert_file):
            raise ConfigError(f"kafka TLS files given but the security protocol is {self.protocol}: use SSL or SASL_SSL")

    @property
    def tls(self) -> bool:
        """True when the connection is encrypted."""
        return self.protocol.endswith("SSL")

    def aiokafka_options(self) -> dict[str, Any]:
        """Keyword arguments for ``AIOKafkaProducer`` / ``AIOKafkaConsumer``."""
        options: dict[str, Any] = {"security_protocol": self.protocol}
        if self.tls:
            options["ssl_context"] = client_context(self.ca_file, self.cert_file, self.key_file, what="kafka")
        if self.protocol.startswith("SASL_"):
            options.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_username,
                           sasl_plain_password=self.sasl_password)
        return options

    def describe(self) -> str:
        """One line for logs and ``check`` output; the password masked."""
        parts = [self.protocol]
        if self.sasl_mechanism:
            parts.append(f"{self.sasl_mechanism} as {self.sasl_username} (password {MASK})")
        if self.cert_file:
            parts.append(f"client certificate {self.cert_file}")
        return ", ".join(parts)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "KafkaSecurity":
        """Read the ``TERN_KAFKA_*`` variables (see the module docstring)."""
        env = os.environ if env is None else env
        get = lambda name: (env.get(name) or "").strip() or None  # noqa: E731
        password = get("TERN_KAFKA_SASL_PASSWORD")
        password_file = get("TERN_KAFKA_SASL_PASSWORD_FILE")
        if password_file:
            warning = exposure_warning(Path(password_file))
            if warning:
                print(warning)
            try:
                password = Path(password_file).read_text().strip()
            except OSError as exc:
                raise ConfigError(f"TERN_KAFKA_SASL_PASSWORD_FILE: cannot read {password_file}: {exc.strerror}") from None
        return cls(
            protocol=(get("TERN_KAFKA_SECURITY_PROTOCOL") or "PLAINTEXT").upper(),
            ca_file=get("TERN_KAFKA_CA"), cert_file=get("TERN_KAFKA_CERT"), key_file=get("TERN_KAFKA_KEY"),
            sasl_mechanism=(get("TERN_KAFKA_SASL_MECHANISM") or "").upper() or None,
            sasl_username=get("TERN_KAFKA_SASL_USERNAME"), sasl_password=password,
        )


async def credentials_refused(servers: list[str], security: KafkaSecurity, timeout_s: float) -> str | None:
    """Why Kafka refuses ``security``'s SASL credentials, or None when it accepts them (or
    when no broker could be asked: being unreachable is not a refusal, and is reported later).

    One connection to the first broker that answers, with the full SASL handshake: aiokafka
    itself reports a refusal only as "Unable to bootstrap", after an ERROR line per broker,
    so the bridge asks this first to say in one line what is wrong.
    """
    if not security.protocol.startswith("SASL_"):
        return None
    import asyncio

    from aiokafka.conn import create_conn
    from aiokafka.errors import (
        AuthenticationFailedError,
        IllegalSaslStateError,
        SaslAuthenticationFailed,
        UnsupportedSaslMechanismError,
    )

    refusals = (SaslAuthenticationFailed, AuthenticationFailedError, UnsupportedSaslMechanismError,
                IllegalSaslStateError)
    options = security.aiokafka_options()
    for server in servers:
        host, _, port = server.rpartition(":")
        try:
            conn = await asyncio.wait_for(create_conn(
                host, int(port), request_timeout_ms=int(timeout_s * 1000), ssl_context=options.get("ssl_context"),
                security_protocol=security.protocol, sasl_mechanism=security.sasl_mechanism,
                sasl_plain_username=security.sasl_username, sasl_plain_password=security.sasl_password), timeout_s)
        except refusals as exc:
            text = str(exc)
            return text if type(exc).__name__ in text else f"{type(exc).__name__}: {text}"
        except (OSError, asyncio.TimeoutError, Exception):  # down or unreachable: ask the next one
            continue
        conn.close()
        return None
    return None
