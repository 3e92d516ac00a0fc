"""deploy/tern-gateway.service: verified by systemd's own `systemd-analyze verify` (and scored by
`systemd-analyze security`) where the tool exists; skipped, visibly, where it does not.

`verify` refuses a unit whose ExecStart binary does not exist, and /opt/tern/.venv is not
installed here: the test verifies a copy of the shipped unit in which only that path is
replaced by an executable that exists (a tiny script). Every other line is the shipped one.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "deploy" / "tern-gateway.service"
SHIPPED_BINARY = "/opt/tern/.venv/bin/tern-gateway"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed here (apt-get install systemd)")


def unit_settings(text: str) -> dict[str, list[str]]:
    """Each ``Section.Key`` with its values in order (systemd allows a key more than once)."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def verifiable_copy(tmp_path: Path) -> Path:
    """The shipped unit with only ExecStart's binary replaced by one that exists (see above)."""
    fake = tmp_path / "tern-gateway"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    text = UNIT.read_text()
    assert text.count(SHIPPED_BINARY) == 1
    unit = tmp_path / "tern-gateway.service"
    unit.write_text(text.replace(SHIPPED_BINARY, str(fake)))
    return unit


def test_unit_runs_the_gateway_as_its_own_user_with_state_and_restart_policy():
    s = unit_settings(UNIT.read_text())
    assert s["Service.ExecStart"] == [f"{SHIPPED_BINARY} run --config /etc/tern/gateway.toml"]
    assert s["Service.User"] == ["tern"] and "root" not in s.get("Service.Group", [])
    assert s["Service.StateDirectory"] == ["tern"] and s["Service.ConfigurationDirectory"] == ["tern"]
    assert s["Service.Restart"] == ["on-failure"] and s["Service.RestartPreventExitStatus"] == ["2"]
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "RestrictSUIDSGID"):
        assert s[f"Service.{key}"] == ["yes"], key
    assert s["Service.ProtectSystem"] == ["strict"] and s["Service.CapabilityBoundingSet"] == [""]
    # Devices: serial ports only (sensors wired to the Pi), nothing else.
    assert s["Service.DevicePolicy"] == ["closed"] and all(d.startswith("char-tty") for d in s["Service.DeviceAllow"])
    # systemd's stop budget leaves room for the gateway's own (stop_timeout_s, 5 s by default).
    assert int(s["Service.TimeoutStopSec"][0]) >= 10
    # The shipped example config puts the outbox in the unit's state directory, and the
    # user named in the unit is the one deploy/tern-sysusers.conf creates.
    example = tomllib.loads((ROOT / "deploy" / "gateway.toml").read_text())
    assert example["outbox_path"].startswith("/var/lib/tern/")
    assert re.search(r"^u tern ", (ROOT / "deploy" / "tern-sysusers.conf").read_text(), re.M)


@needs_analyze
def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    unit = verifiable_copy(tmp_path)
    out = subprocess.run([ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # verify exits 0 on unknown keys and only warns: any output at all is a defect.
    assert out.returncode == 0 and not (out.stdout + out.stderr).strip(), out.stdout + out.stderr


@needs_analyze
def test_systemd_analyze_verify_catches_a_broken_copy(tmp_path):
    """The check above can fail: a misspelt hardening key is reported."""
    unit = verifiable_copy(tmp_path)
    unit.write_text(unit.read_text().replace("NoNewPrivileges=", "NoNewPrivilege="))
    out = subprocess.run([ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert "Unknown key 'NoNewPrivilege'" in out.stdout + out.stderr


@needs_analyze
def test_systemd_analyze_security_scores_the_unit_well(tmp_path):
    unit = verifiable_copy(tmp_path)
    out = subprocess.run([ANALYZE, "security", "--offline=true", str(unit)], capture_output=True, text=True, timeout=60)
    if "--offline" in out.stderr and out.returncode != 0:
        pytest.skip(f"this systemd-analyze cannot score a unit offline: {out.stderr.strip()[:200]}")
    found = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", out.stdout)
    assert found, out.stdout[-2000:] + out.stderr
    # 0 is fully locked down, 10 is a default unit; systemd calls below 2 "OK".
    assert float(found.group(1)) < 2.0, out.stdout[-3000:]


def test_execstart_arguments_are_a_valid_gateway_command_with_the_shipped_config():
    """The unit's command line, with the shipped example in place of /etc/tern/gateway.toml,
    parses and resolves to a config whose outbox is in the unit's StateDirectory."""
    import shlex

    from tern.edge.cli import build_parser
    from tern.edge.config import GatewayConfig

    s = unit_settings(UNIT.read_text())
    argv = shlex.split(s["Service.ExecStart"][0])
    assert argv[0] == SHIPPED_BINARY and argv[1:3] == ["run", "--config"]
    argv[argv.index("/etc/tern/gateway.toml")] = str(ROOT / "deploy" / "gateway.toml")
    cfg = GatewayConfig.from_args(build_parser().parse_args(argv[1:]), env={})
    assert Path(cfg.outbox_path).parent == Path("/var/lib") / s["Service.StateDirectory"][0]
    # The stop budget the gateway takes on SIGTERM fits well inside systemd's.
    assert cfg.stop_timeout_s * 2 <= int(s["Service.TimeoutStopSec"][0])
