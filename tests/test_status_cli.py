"""``tern-gateway status`` as a field engineer runs it: the real command in a subprocess, against
a running gateway (live endpoint and outbox file) and then a stopped one (file only)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tern.edge.health import batches_in_flight
from tern.edge.service import Gateway

from helpers import client, gateway_config, publish_all, reading, status, status_json, wait_for

SITE = "site-s"
BOOT = "b0042"
SENT = {"alpha-node": 25, "beta-node": 15}
SECRET = "cloud-pw-never-shown-91c"


def run_status(*args: str, columns: int | None = 160, command: str = "status") -> subprocess.CompletedProcess:
    """The real command, piped; ``columns=None`` leaves COLUMNS unset (rich then takes 80)."""
    env = {**os.environ, "NO_COLOR": "1", "TERM": "dumb"}
    env.pop("COLUMNS", None)
    if columns is not None:
        env["COLUMNS"] = str(columns)
    env = {k: v for k, v in env.items() if not k.startswith("TERN_") or k == "TERN_CACHE"}
    return subprocess.run(
        [sys.executable, "-m", "tern.edge", command, *args], capture_output=True, text=True, timeout=60, env=env
    )


def toml(config) -> str:
    return "\n".join(
        f'{key} = "{value}"' if isinstance(value, str) else f"{key} = {value}"
        for key, value in (
            ("gateway_id", config.gateway_id), ("cloud_broker", config.cloud_broker), ("local_broker", config.local_broker),
            ("outbox_path", config.outbox_path), ("http_port", config.http_port),
            ("cloud_username", config.cloud_username), ("cloud_password_file", config.cloud_password_file),
        )
    ) + "\n"


def test_status_shows_devices_outbox_and_uplink_while_running_and_after(tmp_path: Path, mosquitto_factory) -> None:
    pi, cloud = mosquitto_factory("pi"), mosquitto_factory("cloud")
    secret = tmp_path / "cloud.secret"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o600)
    # The cloud broker takes any password; the status output must never show it.
    config = gateway_config(tmp_path, pi, cloud, cloud_username="gw-obs", cloud_password_file=str(secret))
    config_file = tmp_path / "gateway.toml"
    config_file.write_text(toml(config))
    total = sum(SENT.values())
    with Gateway(config) as gw:
        assert gw.wait_connected(15)
        node = client(pi)
        try:
            # No bridge on the cloud side: the readings wait in the outbox.
            publish_all(node, [status(SITE, "alpha-node", BOOT, "online", fw="2.0.1")])
            publish_all(node, [status(SITE, "beta-node", BOOT, "offline", fw="2.0.1")])
            publish_all(node, [reading(SITE, d, BOOT, s) for d, n in SENT.items() for s in range(1, n + 1)])
            wait_for(lambda: status_json(gw)["outbox"]["readings"] == total, what="readings in the outbox")
        finally:
            node.disconnect()
            node.loop_stop()
        # No bridge: what the uplink publishes stays in flight. Let it get there, then the
        # command must show what the uplink counts (before or after it ran, if that moved).
        wait_for(lambda: batches_in_flight(gw.uplink.stats()) >= 1, what="a batch in flight")
        before = batches_in_flight(gw.uplink.stats())
        live = run_status("--config", str(config_file))
        in_flight = {before, batches_in_flight(gw.uplink.stats())}
    assert live.returncode == 0, live.stdout + live.stderr
    out = live.stdout
    print(out)
    assert f"live from http://127.0.0.1:{config.http_port}" in out
    lines = out.splitlines()
    alpha = next(line for line in lines if line.lstrip("│┃ ").startswith("alpha-node"))
    beta = next(line for line in lines if line.lstrip("│┃ ").startswith("beta-node"))
    assert "online" in alpha and "2.0.1" in alpha and BOOT in alpha and " 25 " in alpha
    assert "offline" in beta and " 15 " in beta
    # Waiting: the readings and the two status events.
    assert any("waiting" in line and f" {total + 2} " in line for line in lines), out
    assert any("readings / statuses" in line and f"{total} / 2" in line for line in lines), out
    assert any("cloud uplink" in line and "connected" in line for line in lines), out
    shown = next(int(line.rstrip(" │").split()[-1]) for line in lines if "batches in flight" in line)
    assert shown in in_flight and shown >= 1, (shown, in_flight)
    assert any("nodes online / offline" in line and "1 / 1" in line for line in lines), out

    # The service is gone: one clear line, and what the outbox file still holds.
    after = run_status("--config", str(config_file))
    assert after.returncode == 1, after.stdout + after.stderr
    print(after.stdout)
    assert f"service not reachable at http://127.0.0.1:{config.http_port}" in after.stdout
    assert "connection refused" in after.stdout
    assert any(line.lstrip("│┃ ").startswith("alpha-node") and "online" in line and " 25 " in line for line in after.stdout.splitlines())
    assert any("waiting" in line and f" {total + 2} " in line for line in after.stdout.splitlines()), after.stdout
    assert "Traceback" not in after.stderr
    assert SECRET not in live.stdout + live.stderr + after.stdout + after.stderr


def test_status_without_anything_to_read_says_so(tmp_path: Path) -> None:
    result = run_status("--outbox", str(tmp_path / "missing.db"), "--url", "http://127.0.0.1:9")
    assert result.returncode == 2
    assert "service not reachable at http://127.0.0.1:9" in result.stdout
    assert f"no outbox at {tmp_path / 'missing.db'}" in result.stdout
    assert "Traceback" not in result.stderr


def test_status_keeps_to_one_screen_with_offline_devices_first(tmp_path: Path) -> None:
    from tern.core.codec import Reading, StatusEvent
    from tern.edge.outbox import Outbox
    from tern.edge.status_cli import DEVICE_ROWS

    devices = [f"n{i:03d}" for i in range(DEVICE_ROWS + 20)]
    dead = set(devices[-3:])  # sorted last by name: they must still be on the screen
    with Outbox(tmp_path / "outbox.db") as outbox:
        outbox.add(
            [Reading(device=d, boot="b1", seq=1, ts_ms=1, values={"t": 1}, site=SITE) for d in devices],
            statuses=[StatusEvent(SITE, d, "offline" if d in dead else "online", "b1", "1.0", "power") for d in devices],
        )
    result = run_status("--outbox", str(tmp_path / "outbox.db"), "--url", "http://127.0.0.1:9")
    assert result.returncode == 1, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if line.lstrip("│┃ ").startswith("n")]
    assert len(rows) == DEVICE_ROWS
    assert all("offline" in row for row in rows[:3]) and {row.split()[1] for row in rows[:3]} == dead
    assert "and 20 more devices (--all lists every one)" in result.stdout
    everything = run_status("--outbox", str(tmp_path / "outbox.db"), "--url", "http://127.0.0.1:9", "--all")
    assert len([line for line in everything.stdout.splitlines() if line.lstrip("│┃ ").startswith("n")]) == len(devices)


LONG_IDS = ["greenhouse-north-soil-probe-017", "greenhouse-south-soil-probe-018", "weather-mast-anemometer-02"]


def _site_of_long_ids(path: Path) -> None:
    from tern.core.codec import Reading, StatusEvent
    from tern.edge.outbox import Outbox

    with Outbox(path) as outbox:
        outbox.add(
            [Reading(device=d, boot="b1", seq=s, ts_ms=1, values={"t": 1}, site="orchard-west") for d in LONG_IDS
             for s in range(1, 4)],
            statuses=[StatusEvent("orchard-west", d, "online", "b1", "1.0.7-rc3", "power") for d in LONG_IDS],
        )


def test_tables_fit_80_and_100_columns_piped_with_every_id_whole(tmp_path: Path) -> None:
    _site_of_long_ids(tmp_path / "outbox.db")
    for columns in (None, 80, 100):
        for command, args in (("status", ["--url", "http://127.0.0.1:9"]), ("outbox", [])):
            result = run_status("--outbox", str(tmp_path / "outbox.db"), *args, columns=columns, command=command)
            assert result.returncode in (0, 1), result.stdout + result.stderr
            width = columns or 80
            table = [line for line in result.stdout.splitlines() if line[:1] in "│┃┏┡└"]
            assert table and all(len(line) <= width for line in table), (columns, command, result.stdout)
            for device in LONG_IDS:
                # Whole, on one line of its own row: nothing cut, nothing wrapped.
                assert sum(device in line for line in table) == 1, (device, columns, command, result.stdout)
            if command == "status" and width < 120:  # eleven columns: the least useful gave way
                assert "not shown at this width:" in result.stdout


def test_status_and_outbox_as_json_for_scripts(tmp_path: Path) -> None:
    import json

    _site_of_long_ids(tmp_path / "outbox.db")
    status_doc = run_status("--outbox", str(tmp_path / "outbox.db"), "--url", "http://127.0.0.1:9", "--format", "json")
    assert status_doc.returncode == 1  # the service did not answer; the file did
    doc = json.loads(status_doc.stdout)
    assert doc["live"] is None and "connection refused" in doc["live_error"]
    assert doc["outbox"]["readings"] == 9 and doc["outbox"]["statuses"] == 3
    assert {(d["device"], d["state"], d["waiting"]) for d in doc["devices"]} == {(d, "online", 3) for d in LONG_IDS}
    outbox_doc = json.loads(run_status("--outbox", str(tmp_path / "outbox.db"), "--format", "json", command="outbox").stdout)
    assert outbox_doc["pending"] == 9 and outbox_doc["status_pending"] == 3
    assert sorted((d["device"], d["pending"], d["first_seq"], d["last_seq"]) for d in outbox_doc["devices"]) == [
        (d, 3, 1, 3) for d in sorted(LONG_IDS)
    ]
