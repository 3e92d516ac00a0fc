"""The gateway's /metrics on real parts (two mosquittos, the gateway, the bridge, Tansu):
scraped over HTTP and parsed with prometheus_client's own parser; every counter must agree
with what the test sent and with what reached Kafka.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from tern.cloud.consume import read_all
from tern.core import topics
from tern.edge.health import batches_in_flight
from tern.edge.outbox import Outbox
from tern.edge.service import Gateway

from helpers import (
    bridge, client, gateway_config, http_get, publish_all, reading, scrape, status, status_json, value, wait_for,
)

SITE = "site-m"
BOOT = "b0001"
#: Readings each device sends: m1 seq 1..50; m2 seq 1..10 and 16..35 (a gap of five).
SEQS = {"m1": list(range(1, 51)), "m2": [*range(1, 11), *range(16, 36)]}
SENT = {device: len(seqs) for device, seqs in SEQS.items()}
DUPLICATES = 10  # m1 seq 41..50 again, while the first copies are still in the outbox
SECRET = "s3cret-Uplink-pw-7f2a"


def test_metrics_count_what_was_sent_and_forwarded(
    tmp_path: Path, mosquitto_factory, kafka_bootstrap: str, kafka_topics: dict[str, str]
) -> None:
    pi, cloud = mosquitto_factory("pi"), mosquitto_factory("cloud")
    # A password for the uplink (this broker takes any): it must never show in the output.
    secret_file = tmp_path / "cloud.secret"
    secret_file.write_text(SECRET + "\n")
    secret_file.chmod(0o600)
    config = gateway_config(tmp_path, pi, cloud, cloud_username="gw-obs", cloud_password_file=str(secret_file))
    with Gateway(config) as gw:
        assert gw.wait_connected(15)
        node = client(pi)
        try:
            # The cloud is up but no bridge yet: everything stays in the outbox.
            publish_all(node, [status(SITE, d, BOOT, "online") for d in SENT])
            publish_all(node, [reading(SITE, d, BOOT, s) for d, seqs in SEQS.items() for s in seqs])
            publish_all(node, [reading(SITE, "m1", BOOT, s) for s in range(41, 51)])
            publish_all(node, [(topics.telemetry_topic(SITE, "m1"), b"{not json", False)])
            total = sum(SENT.values())
            m = wait_for(
                lambda: (lambda m: m if value(m, "tern_gateway_readings_committed_total") == total
                         and value(m, "tern_gateway_dead_letters_total") == 1 else None)(scrape(gw)),
                what="all readings and the dead letter committed",
            )
            assert value(m, "tern_gateway_readings_received_total") == total + DUPLICATES
            assert value(m, "tern_gateway_readings_duplicate_total") == DUPLICATES
            assert value(m, "tern_gateway_readings_forwarded_total") == 0
            assert value(m, "tern_gateway_outbox_rows", kind="reading") == total
            assert value(m, "tern_gateway_outbox_bytes") > 0
            assert value(m, "tern_gateway_outbox_oldest_age_seconds") >= 0
            assert value(m, "tern_gateway_dead_letters_stored") == 1
            assert value(m, "tern_gateway_uplink_connected") == 1
            assert value(m, "tern_gateway_ingest_connected") == 1
            assert value(m, "tern_gateway_nodes", state="online") == 2
            assert value(m, "tern_gateway_nodes", state="offline") == 0
            assert value(m, "tern_gateway_confirm_rtt_seconds_count") == 0
            # Batches in flight: what the uplink itself counts (one, or one per lane when pipelined).
            wait_for(
                lambda: value(scrape(gw), "tern_gateway_uplink_batches_in_flight") == batches_in_flight(gw.uplink.stats()),
                what="the uplink's batches in flight",
            )
            # Per-device series are off by default.
            assert not [name for name in m if name.startswith("tern_gateway_device_")]

            # The bridge arrives: everything is confirmed, Kafka holds exactly what was sent.
            with bridge(cloud, kafka_bootstrap, kafka_topics):
                m = wait_for(
                    lambda: (lambda m: m if value(m, "tern_gateway_readings_forwarded_total") == total else None)(scrape(gw)),
                    timeout=60, what="every reading forwarded",
                )
                records = read_all(kafka_bootstrap, kafka_topics["readings"], timeout_s=30, expect=total)
                assert len({(r.key, r.raw) for r in records}) >= total
                assert value(m, "tern_gateway_outbox_rows", kind="reading") == 0
                assert value(m, "tern_gateway_outbox_oldest_age_seconds") == 0
                assert value(m, "tern_gateway_confirm_rtt_seconds_count") >= 1
                assert value(m, "tern_gateway_confirm_rtt_seconds_sum") > 0
                assert value(m, "tern_gateway_batches_confirmed_total") >= 1

                # A node's last will: offline in the metrics.
                publish_all(node, [status(SITE, "m2", BOOT, "offline")])
                m = wait_for(
                    lambda: (lambda m: m if value(m, "tern_gateway_nodes", state="offline") == 1 else None)(scrape(gw)),
                    what="m2 offline",
                )
                assert value(m, "tern_gateway_nodes", state="online") == 1
            snap = status_json(gw)
            page = http_get(gw.status_server.url + "/")
        finally:
            node.disconnect()
            node.loop_stop()
        metrics_text = http_get(gw.status_server.url + "/metrics")
    assert snap["outbox"]["readings"] == 0 and snap["uplink"]["forwarded"] == total
    assert {d["device"]: d["state"] for d in snap["devices"]} == {"m1": "online", "m2": "offline"}
    # Per device, what arrived (m1's re-sent ten included) and the highest seq.
    assert {d["device"]: d["received"] for d in snap["devices"]} == {"m1": 50 + DUPLICATES, "m2": 30}
    assert {d["device"]: d["last_seq"] for d in snap["devices"]} == {"m1": 50, "m2": 35}
    if hasattr(Outbox, "device_seq_counts"):
        # The outbox tracks sequences (issue 14's dedup): duplicates and the gap, per device and in total.
        assert {d["device"]: (d["duplicates"], d["missing"]) for d in snap["devices"]} == {"m1": (DUPLICATES, 0), "m2": (0, 5)}
        assert snap["ingest"]["missing"] == 5 and snap["ingest"]["gaps_open"] == 1
        assert value(m, "tern_gateway_readings_missing") == 5
    else:  # an outbox without sequence tracking: unknown, never a made-up zero
        assert all(d["duplicates"] is None and d["missing"] is None for d in snap["devices"])
        assert snap["ingest"]["missing"] is None and value(m, "tern_gateway_readings_missing") is None
    assert {d["device"]: d["fw"] for d in snap["devices"]} == {"m1": "1.2.3", "m2": "1.2.3"}
    for body in (metrics_text, page, repr(snap).encode()):
        assert SECRET.encode() not in body


def test_per_device_series_only_when_enabled(tmp_path: Path, mosquitto_factory) -> None:
    pi, cloud = mosquitto_factory("pi"), mosquitto_factory("cloud")
    sent = {"pd1": 7, "pd2": 3}
    with Gateway(gateway_config(tmp_path, pi, cloud, metrics_per_device=True)) as gw:
        assert gw.wait_connected(15)
        node = client(pi)
        try:
            publish_all(node, [status(SITE, "pd1", BOOT, "online"), status(SITE, "pd2", BOOT, "offline")])
            publish_all(node, [reading(SITE, d, BOOT, s) for d, n in sent.items() for s in range(1, n + 1)])
            m = wait_for(
                lambda: (lambda m: m if value(m, "tern_gateway_readings_committed_total") == 10 else None)(scrape(gw)),
                what="10 readings committed",
            )
        finally:
            node.disconnect()
            node.loop_stop()
    for device, n in sent.items():
        labels = {"site": SITE, "device": device}
        assert value(m, "tern_gateway_device_readings_received_total", **labels) == n
        assert value(m, "tern_gateway_device_last_seen_timestamp_seconds", **labels) > 1_700_000_000
    assert value(m, "tern_gateway_device_online", site=SITE, device="pd1") == 1
    assert value(m, "tern_gateway_device_online", site=SITE, device="pd2") == 0


def test_drain_rate_and_time_to_empty_while_a_backlog_drains(
    tmp_path: Path, mosquitto_factory, kafka_bootstrap: str, kafka_topics: dict[str, str]
) -> None:
    """A backlog built while the cloud side has no bridge drains in small batches once it has
    one; meanwhile /status.json reports a drain rate and a finite time to empty, and
    /metrics the backlog shrinking."""
    pi, cloud = mosquitto_factory("pi"), mosquitto_factory("cloud")
    backlog = 5000
    with Gateway(gateway_config(tmp_path, pi, cloud, batch_size=10)) as gw:
        assert gw.wait_connected(15)
        node = client(pi)
        try:
            publish_all(node, [reading(SITE, "dr1", BOOT, s) for s in range(1, backlog + 1)])
        finally:
            node.disconnect()
            node.loop_stop()
        wait_for(lambda: status_json(gw)["outbox"]["readings"] == backlog, what="the backlog committed")
        seen: list[dict] = []
        with bridge(cloud, kafka_bootstrap, kafka_topics):
            def drained() -> bool:
                outbox = status_json(gw)["outbox"]
                seen.append(outbox)
                return outbox["readings"] == 0

            wait_for(drained, timeout=120, what="the backlog drained")
    draining = [o for o in seen if o["readings"] > 0 and o["time_to_empty_s"] is not None]
    assert draining, f"never saw a time to empty while draining: {seen[:3]} ... {seen[-3:]}"
    sample = draining[len(draining) // 2]
    print(f"draining: {len(draining)} snapshots; mid-drain {sample['readings']} waiting, "
          f"{sample['drain_rate']:.0f} readings/s, time to empty {sample['time_to_empty_s']:.1f} s")
    assert sample["drain_rate"] > 0 and sample["time_to_empty_s"] > 0
    # Time to empty is the backlog at the net rate: within reason of what it really took.
    assert sample["time_to_empty_s"] < 600
    assert seen[-1]["time_to_empty_s"] == 0.0


def test_a_busy_http_port_is_one_clear_setup_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config, outbox = tmp_path / "gateway.toml", tmp_path / "o.db"
        config.write_text(
            f'gateway_id = "gw-busy"\ncloud_broker = "127.0.0.1:1"\noutbox_path = "{outbox}"\nhttp_port = {port}\n'
        )
        result = subprocess.run(
            [sys.executable, "-m", "tern.edge", "run", "--config", str(config)], capture_output=True, text=True, timeout=60
        )
    assert result.returncode == 2
    assert f"http_port: cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr
    assert "Traceback" not in result.stderr
