"""Duplicates and gaps: the outbox's per-(device, boot) high mark, on its own and on real parts
(two mosquittos, the gateway, the bridge and Tansu)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from tern.cloud.bridge import BridgeThread
from tern.cloud.consume import read_all
from tern.core.codec import Reading
from tern.edge.outbox import Outbox
from tern.edge.service import Gateway

from helpers import BOOT, SITE, Node, bridge_config, config, wait_until


def reading(seq: int, device: str = "dev-a", boot: str = "b001") -> Reading:
    return Reading(device, boot, seq, 1_700_000_000_000 + seq, {"t": seq}, site="s1")


def spans(box: Outbox, device: str = "dev-a") -> list[tuple[int, int, str]]:
    return [(g["first_seq"], g["last_seq"], g["kind"]) for g in box.gaps(device)]


def test_gaps_are_recorded_filled_by_late_readings_and_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path) as box:
        # The first reading this gateway sees of a boot is seq 3: 1 and 2 never reached it.
        result = box.add([reading(3), reading(4), reading(9)])
        assert (result.inserted, result.gaps) == (3, 2)
        assert spans(box) == [(1, 2, "start"), (5, 8, "jump")]
        # 6 arrives late, out of order: stored, and the gap splits around it.
        result = box.add([reading(6)])
        assert (result.inserted, result.duplicates, result.gap_filled) == (1, 0, 1)
        assert sorted(spans(box)) == [(1, 2, "start"), (5, 5, "jump"), (7, 8, "jump")]
        # Forwarded (deleted), then re-sent: duplicates, whatever is pending.
        box.delete([r.id for r in box.take(10)])
        result = box.add([reading(4), reading(6), reading(9)])
        assert (result.inserted, result.duplicates) == (0, 3)
        # Another boot of the same device starts its own count.
        assert box.add([reading(1, boot="b002"), reading(2, boot="b002")]).inserted == 2
        # A gap opened and closed in one group leaves nothing behind.
        assert box.add([reading(12, device="dev-b"), reading(14, device="dev-b"), reading(13, device="dev-b")]).inserted == 3
        assert spans(box, "dev-b") == [(1, 11, "start")]
    with Outbox(path) as box:  # durable: a restart remembers the high mark and the gaps
        assert box.add([reading(9), reading(2, boot="b002")]).duplicates == 2
        assert sorted(spans(box)) == [(1, 2, "start"), (5, 5, "jump"), (7, 8, "jump")]
        assert box.add([reading(5), reading(7), reading(8), reading(1), reading(2)]).gap_filled == 5
        assert spans(box) == []
        assert box.dedup_totals() == {"duplicates_total": 5, "gaps_open": 1, "missing_readings": 11}
        counts = {d["device"]: d for d in box.device_seq_counts()}
        assert (counts["dev-a"]["duplicates"], counts["dev-a"]["gaps"], counts["dev-a"]["missing"]) == (5, 0, 0)
        assert (counts["dev-b"]["gaps"], counts["dev-b"]["missing"], counts["dev-b"]["high_seq"]) == (1, 11, 14)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT high FROM seq_high WHERE device = 'dev-a' AND boot = 'b001'").fetchone() == (9,)


def test_a_resent_reading_reaches_kafka_once_and_a_gap_is_recorded(
    mosquitto_factory, tmp_path: Path, kafka_bootstrap: str, kafka_topics: dict[str, str]
) -> None:
    local, cloud = mosquitto_factory("local"), mosquitto_factory("cloud")
    outbox = tmp_path / "gw" / "outbox.db"
    bridge_cfg = bridge_config(cloud, kafka_bootstrap, kafka_topics, name="dedup")
    with BridgeThread(bridge_cfg), Gateway(config(local, cloud, outbox)) as gw:
        assert gw.wait_connected(20)
        node = Node(local, "dev-a")
        try:
            for seq in range(1, 6):
                node.send(seq)
            wait_until(lambda: gw.stats()["forwarded"] == 5, what="5 readings forwarded and confirmed")
            # The node missed the acks and re-sends 3..5 after its first copies reached Kafka.
            acks_before = len(node.acks)
            for seq in (3, 4, 5):
                node.send(seq)
            wait_until(lambda: gw.stats()["duplicates"] == 3, what="3 duplicates counted")
            wait_until(lambda: len(node.acks) > acks_before, what="the re-send acknowledged")
            # Then it jumps: 6, then 9 (7 and 8 lost on the node's side).
            node.send(6)
            node.send(9)
            wait_until(lambda: gw.stats()["forwarded"] == 7, what="6 and 9 forwarded")
            stats = gw.stats()
            assert stats["gaps_opened"] == 1 and stats["committed"] == 7
            assert [(g["device"], g["boot"], g["first_seq"], g["last_seq"]) for g in gw.outbox.gaps()] == [
                ("dev-a", BOOT, 7, 8)
            ]
            assert gw.outbox.dedup_totals() == {"duplicates_total": 3, "gaps_open": 1, "missing_readings": 2}
        finally:
            node.close()
    records = read_all(kafka_bootstrap, kafka_topics["readings"], expect=7)
    seqs = sorted(r.identity[2] for r in records)
    assert seqs == [1, 2, 3, 4, 5, 6, 9], seqs  # each once: the re-sends never left the gateway
    assert all(r.value["site"] == SITE for r in records)


def test_a_group_of_more_keys_than_one_select_reads_is_screened_and_recorded_whole(tmp_path: Path) -> None:
    """seqtrack reads a group's high marks in chunks and writes them in one upsert: every key,
    across a chunk boundary, must come back as before (duplicates added, first seen kept)."""
    from tern.edge.seqtrack import KEYS_PER_SELECT

    boots = [f"b{i:04d}" for i in range(KEYS_PER_SELECT + 3)]
    path = tmp_path / "o.db"
    with Outbox(path) as box:
        first = box.add([reading(2, boot=b) for b in boots] * 2, received_ms=1000)
        assert (first.inserted, first.duplicates, first.gaps) == (len(boots), len(boots), len(boots))
        again = [reading(2, boot=b) for b in boots] + [reading(1, boot=b) for b in boots[::2]]
        again += [reading(3, boot=b) for b in boots[1::2]]
        result = box.add([Reading(r.device, r.boot, r.seq, r.ts_ms, r.values, site="s2") for r in again],
                         received_ms=2000)
        half = len(boots[1::2])
        assert (result.inserted, result.duplicates, result.gap_filled) == (len(boots), len(boots), len(boots) - half)
        # The latest boot is the last one first seen, though all share one stamp.
        assert box.device_seq_counts()[0]["boot"] == boots[-1]
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT boot, site, high, duplicates, first_ms, updated_ms FROM seq_high ORDER BY rowid").fetchall()
    assert rows == [(b, "s2", 2 + i % 2, 2, 1000, 2000) for i, b in enumerate(boots)]


def test_boots_long_gone_are_forgotten_but_each_device_keeps_its_latest(tmp_path: Path) -> None:
    day = 86400 * 1000
    with Outbox(tmp_path / "o.db") as box:
        box.add([reading(1, boot="b001"), reading(5, boot="b001")], received_ms=1 * day)
        box.add([reading(3, boot="b002")], received_ms=2 * day)
        box.add([reading(2, device="dev-b", boot="b001")], received_ms=1 * day)
        box.sweep(received_ms=20 * day)  # within a month: everything kept
        assert len(box.gaps()) == 3
        box.sweep(received_ms=40 * day)  # dev-a's old boot goes; each device's latest stays
        assert sorted((g["device"], g["boot"]) for g in box.gaps()) == [("dev-a", "b002"), ("dev-b", "b001")]
        assert box.add([reading(3, boot="b002"), reading(2, device="dev-b")]).duplicates == 2


def test_summary_read_only_counts_duplicates_gaps_and_drops(tmp_path: Path) -> None:
    from tern.edge.outbox import open_readonly, summarize
    from tern.edge.retention import RetentionPolicy

    path = tmp_path / "o.db"
    with Outbox(path, retention=RetentionPolicy(max_rows=2, telemetry="drop_oldest")) as box:
        box.add([reading(1), reading(2), reading(4), reading(2)])
        db = open_readonly(path)
        summary = summarize(db)
        db.close()
    assert (summary.duplicates_total, summary.gaps_open, summary.missing_readings) == (1, 1, 1)
    assert summary.dropped == {"max_rows": 1, "max_bytes": 0, "max_age": 0} and summary.pending == 2
