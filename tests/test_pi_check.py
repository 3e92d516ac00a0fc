"""`make pi-check` reads docs/gateway.md and the units in deploy/: these keep its reading right.

The check itself (an emulated arm64 root, 15-30 min) is not part of the suite; docs/gateway.md
("Checked on arm64") has its last run.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from tern.harness import pi_check

pytestmark = pytest.mark.quick

REPO = Path(__file__).resolve().parents[1]
DOC = (REPO / "docs" / "gateway.md").read_text()


def test_the_doc_steps_are_read_in_order_with_every_substitution_used():
    lines = pi_check.doc_commands(DOC)
    commands = [line.command for line in lines]
    assert commands[0] == "sudo apt-get update"
    assert [line.section.split()[0] for line in lines] == sorted(line.section.split()[0] for line in lines)
    # The check command's continuation line is joined, and inline comments are dropped.
    check = next(c for c in commands if "tern-gateway check" in c)
    assert check.endswith("--local-password-file /etc/mosquitto/tern/gateway.secret")
    assert not any("#" in c for c in commands)
    # A substitution no doc line uses means the doc changed under the check: look at both.
    for sub in pi_check.SUBSTITUTIONS:
        assert any(re.fullmatch(sub.pattern, c) for c in commands), sub.pattern
    # The live check needs a node added with its credentials written out.
    assert any(re.search(r"tern-gateway devices add \S+ --site \S+ --config-out \S+", c) for c in commands)


def test_the_config_edit_sets_what_the_doc_says_and_stays_toml():
    settings = pi_check.doc_toml(DOC)
    assert settings["local_username"] == "tern-gateway"
    text = (REPO / "deploy" / "gateway.toml").read_text()
    for key, value in {**settings, "gateway_id": "pi-gw-1", "local_broker": "127.0.0.1:4242"}.items():
        text = pi_check.set_toml_key(text, key, value)
    parsed = tomllib.loads(text)
    assert parsed["local_broker"] == "127.0.0.1:4242"
    assert parsed["local_password_file"] == settings["local_password_file"]
    assert parsed["gateway_id"] == "pi-gw-1"


def test_the_gateway_unit_is_read_as_far_as_starting_it_by_hand_needs():
    unit = pi_check.parse_unit((REPO / "deploy" / "tern-gateway.service").read_text())
    assert unit.exec_start.startswith("/opt/tern/.venv/bin/tern-gateway run --config /etc/tern/gateway.toml")
    assert (unit.user, unit.group, unit.umask) == ("tern", "tern", "0027")
    assert unit.state_directories == ["tern"]
    assert unit.credentials == [("gateway.secret", "/etc/mosquitto/tern/gateway.secret")]
    assert "dialout" in unit.supplementary_groups
    debian = "ExecStartPre=/bin/mkdir -m 740 -p /run/mosquitto\nExecStart=/usr/sbin/mosquitto -c /etc/mosquitto/mosquitto.conf\n"
    assert pi_check.parse_unit(debian).exec_start_pre == ["/bin/mkdir -m 740 -p /run/mosquitto"]
