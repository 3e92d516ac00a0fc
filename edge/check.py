"""``tern-gateway check``: can this gateway run here, as configured? One line per check.

The checks touch the real things: an MQTT handshake with each broker (a clean session under
its own client id, so a running gateway is not disturbed), a file created and removed in the
outbox folder, the free space there, and the outbox file itself (it opens as SQLite and
passes ``PRAGMA quick_check``; see :mod:`tern.edge.repair`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tern.core.mqtt_session import probe
from tern.edge import repair
from tern.edge.config import GatewayConfig


@dataclass(frozen=True)
class CheckResult:
    """One check: its name, whether it passed, and what it found."""

    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        """``ok   name: detail`` or ``FAIL name: detail``."""
        return f"{'ok  ' if self.ok else 'FAIL'} {self.name}: {self.detail}"


def check_broker(name: str, address: str, hostport: tuple[str, int], client_id: str, timeout: float,
                 auth: dict | None = None) -> CheckResult:
    """A real CONNECT/CONNACK with the broker at ``hostport`` (with the gateway's TLS and credentials)."""
    why = probe(*hostport, timeout=timeout, client_id=client_id, **(auth or {}))
    if why is None:
        how = " over TLS" if (auth or {}).get("tls") else ""
        return CheckResult(name, True, f"{address} accepted an MQTT connection{how}")
    return CheckResult(name, False, f"{address}: {why}")


def check_local_broker(config: GatewayConfig, timeout: float) -> CheckResult:
    """The Pi's broker. With an account configured, only anonymous refusal is checked: the
    broker forces client id = username, so a probe with the gateway's own account would take
    over (and, as a clean session, discard) the running gateway's persistent session."""
    client_id = f"tern-gw-{config.gateway_id}-check-{os.getpid()}"
    if config.local_username is None:
        return check_broker("local broker", config.local_broker, config.local_hostport, client_id, timeout)
    config.local_auth()  # the password file is readable (else a ConfigError names it)
    why = probe(*config.local_hostport, timeout=timeout, client_id=client_id)
    if why is not None and "not authori" in why.lower():
        return CheckResult("local broker", True, f"{config.local_broker} answers and refuses anonymous clients; "
                                                 f"the account {config.local_username!r} is not tried, so the "
                                                 "running gateway's session is left alone")
    if why is None:
        return CheckResult("local broker", False, f"{config.local_broker} accepts anonymous clients: "
                                                  "any device could speak as any other (see docs/security.md)")
    return CheckResult("local broker", False, f"{config.local_broker}: {why}")


def check_folder(outbox_path: str, min_free_mb: int) -> CheckResult:
    """The outbox's folder exists (or can be made), takes a new file and has room."""
    folder = Path(outbox_path).resolve().parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".tern-check-"):
            pass
    except OSError as exc:
        return CheckResult("outbox folder", False, f"{folder} is not writable: {exc.strerror or exc}")
    free_mb = shutil.disk_usage(folder).free // (1024 * 1024)
    if free_mb < min_free_mb:
        return CheckResult(
            "outbox folder", False, f"{folder}: only {free_mb} MB free, want at least {min_free_mb} MB (min_free_mb)"
        )
    return CheckResult("outbox folder", True, f"{folder} is writable, {free_mb} MB free")


def check_outbox_file(outbox_path: str, config_hint: str) -> CheckResult:
    """The outbox file opens as SQLite and passes quick_check (or does not exist yet)."""
    path = Path(outbox_path)
    if not path.exists():
        return CheckResult("outbox file", True, f"{path} does not exist yet; the gateway creates it")
    problem = repair.inspect(path)
    if problem is None:
        return CheckResult("outbox file", True, f"{path} opens and passes quick_check ({_size(path)})")
    return CheckResult(
        "outbox file", False, f"{path} is damaged ({problem}); stop the gateway and run `tern-gateway check{config_hint} --repair`"
    )


def run_checks(config: GatewayConfig, config_hint: str = "", timeout: float = 5.0) -> list[CheckResult]:
    """Every check, in order (the brokers are tried even when the outbox fails, and so on)."""
    checks: list[Callable[[], CheckResult]] = [
        lambda: check_local_broker(config, timeout),
        lambda: check_broker("cloud broker", config.cloud_broker, config.cloud_hostport,
                             f"tern-gw-{config.gateway_id}-check-{os.getpid()}", timeout, config.cloud_auth()),
        lambda: check_folder(config.outbox_path, config.min_free_mb),
        lambda: check_outbox_file(config.outbox_path, config_hint),
    ]
    return [check() for check in checks]


def _size(path: Path) -> str:
    size = path.stat().st_size
    return f"{size / 1024 / 1024:.1f} MB" if size >= 1024 * 1024 else f"{size / 1024:.0f} KB"
