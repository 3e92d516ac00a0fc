"""TLS client contexts for MQTT (paho) and Kafka (aiokafka) from certificate files."""

from __future__ import annotations

import ssl
from pathlib import Path

from tern.core.errors import ConfigError


def client_context(ca_file: str | Path | None, cert_file: str | Path | None = None,
                   key_file: str | Path | None = None, *, what: str = "broker") -> ssl.SSLContext:
    """A verifying client context: ``ca_file`` (or the system's CAs), optionally a client cert.

    Unreadable or mismatched files are a ConfigError naming the file, never a traceback.
    """
    if (cert_file is None) != (key_file is None):
        raise ConfigError(f"{what} TLS: give both a client certificate and its key, or neither")
    try:
        ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        if cert_file is not None:
            ctx.load_cert_chain(str(cert_file), str(key_file))
    except FileNotFoundError as exc:
        raise ConfigError(f"{what} TLS: no such file {exc.filename}") from None
    except (ssl.SSLError, OSError) as exc:
        files = ", ".join(str(f) for f in (ca_file, cert_file, key_file) if f)
        raise ConfigError(f"{what} TLS: cannot use {files}: {exc.strerror or exc}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx
