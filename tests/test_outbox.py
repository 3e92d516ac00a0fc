"""The outbox on its own: a real SQLite file, no brokers.

The property test drives random interleavings of add / take / delete / reopen against a plain
list model: the outbox must keep arrival order, ignore only true duplicates, and never lose
a row that was not deleted.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tern.edge import shares
from tern.edge.outbox import DEAD_LETTER_PAYLOAD_MAX, DeadLetter, Outbox, open_readonly, summarize
from tern.core.codec import Reading, StatusEvent

DEVICES = ("dev-a", "dev-b", "dev-c")
BOOTS = ("b001", "b002")


def reading(device: str = "dev-a", seq: int = 0, boot: str = "b001", site: str = "s1") -> Reading:
    return Reading(device, boot, seq, 1_700_000_000_000 + seq, {"t": 21.5, "ok": True, "s": "x"}, site=site)


def test_rows_keep_arrival_order_values_and_stamp(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as box:
        box.add([reading("dev-b", 5), reading("dev-a", 1)], received_ms=1234)
        box.add([reading("dev-a", 2)], received_ms=1300)
        rows = box.take(10)
        assert [r.reading.identity for r in rows] == [("dev-b", "b001", 5), ("dev-a", "b001", 1), ("dev-a", "b001", 2)]
        assert rows[0].reading == Reading("dev-b", "b001", 5, 1_700_000_000_005, {"t": 21.5, "ok": True, "s": "x"}, "s1", 1234)
        assert [r.id for r in rows] == sorted(r.id for r in rows)
        assert box.take(2) == rows[:2]
        assert box.oldest_pending_ms() == 1234


def test_duplicates_are_ignored_while_pending_and_after_forwarding(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as box:
        assert box.add([reading(seq=1), reading(seq=2)]).inserted == 2
        result = box.add([reading(seq=2), reading(seq=3), reading(seq=2, boot="b002")])
        assert (result.inserted, result.duplicates) == (2, 1)
        assert box.pending() == 4
        box.delete([r.id for r in box.take(4)])
        # Once forwarded and deleted, a re-send is still a duplicate: the high mark remembers.
        result = box.add([reading(seq=2), reading(seq=1)])
        assert (result.inserted, result.duplicates) == (0, 2)
        assert box.pending() == 0


def test_bound_room_and_delete(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", max_rows=3) as box:
        assert box.room() == 3
        box.add([reading(seq=s) for s in range(3)])
        assert box.room() == 0
        assert not box.wait_for_room(0.05)
        rows = box.take(2)
        assert box.delete([rows[0].id, rows[0].id, 99999]) == 1
        assert box.room() == 1 and box.wait_for_room(0.05)
        assert box.delete([]) == 0


def test_staged_rows_carry_the_codecs_envelope_item(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as box:
        box.add([reading("dev-b", 5), Reading("dev-a", "b001", 2**53 - 1, 0, {"t": -0.5, "n": "é\u2603\"x\\", "k": 10**15}, "s1")],
                received_ms=1234)
        # Ids the codec would refuse (only a damaged or hand-edited file holds them) still make
        # valid JSON, the same as the codec's general path writes.
        box.db.execute('INSERT INTO outbox (id, site, device, boot, seq, ts_ms, received_ms, "values")'
                       " VALUES (99, 's\"1', 'dev\\ \u00e9\t', 'b\n01', 7, 8, 9, '{\"v\":1}')")
        rows = box.take(10)
        staged = box.take_staged(10, after_id=0)
        assert [(s[0], s[1], s[2]) for s in staged] == [(r.id, r.device, r.received_ms) for r in rows]
        assert [s[3] for s in staged] == [r.item() for r in rows]
        assert box.take_staged(10, after_id=rows[0].id) == staged[1:]
        assert json.loads(staged[2][3])["dev"] == "dev\\ \u00e9\t"


def test_delete_with_the_callers_device_counts(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as box:
        box.add([reading("dev-a", 1), reading("dev-b", 1), reading("dev-a", 2), reading("dev-c", 1)])
        rows = box.take(4)
        assert box.delete([rows[0].id, rows[1].id], per_device={"dev-a": 1, "dev-b": 1}) == 2
        assert box.pending() == 2 and box.device_rows() == {"dev-a": 1, "dev-c": 1}
        # Counts that are not those of the rows deleted (a row already gone): the counts are
        # read from the table again rather than taken off wrongly.
        assert box.delete([rows[2].id, rows[0].id], per_device={"dev-a": 2}) == 1
        assert box.pending() == 1 and box.device_rows() == {"dev-c": 1}


def test_state_survives_reopen_and_bseq_only_grows(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path) as box:
        box.add([reading(seq=s) for s in range(3)])
        assert [box.next_bseq() for _ in range(3)] == [1, 2, 3]
    with Outbox(path) as box:
        assert box.pending() == 3
        assert box.next_bseq() == 4
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            unique = [i for i in conn.execute("PRAGMA index_list(outbox)") if i[2]]
            assert unique, "outbox needs UNIQUE(device, boot, seq)"


def test_dead_letters_keep_payload_error_and_size(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    huge = b"x" * (DEAD_LETTER_PAYLOAD_MAX + 10)
    with Outbox(path) as box:
        result = box.add([reading()], [DeadLetter("t/1", b"\x00\xff", "not JSON", 42), DeadLetter("t/2", huge, "too big")])
        assert result.dead_letters == 2 and box.dead_letter_count() == 2
        assert box.pending() == 1  # dead letters never count as pending readings
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT received_ms, topic, payload, size, error FROM dead_letters ORDER BY id").fetchall()
    assert rows[0] == (42, "t/1", b"\x00\xff", 2, "not JSON")
    assert rows[1][3] == len(huge) and len(rows[1][2]) == DEAD_LETTER_PAYLOAD_MAX


def test_summary_read_only_while_open(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path) as box:
        box.add([reading("dev-a", s) for s in (3, 4)] + [reading("dev-b", 9, site="s2")], received_ms=1000)
        db = open_readonly(path)  # as `tern-gateway outbox` does, while the gateway runs
        summary = summarize(db)
        db.close()
    assert summary.pending == 3 and summary.dead_letters == 0 and summary.oldest_pending_ms == 1000
    assert [(d["site"], d["device"], d["pending"], d["first_seq"], d["last_seq"]) for d in summary.devices] == [
        ("s1", "dev-a", 2, 3, 4),
        ("s2", "dev-b", 1, 9, 9),
    ]
    with pytest.raises(FileNotFoundError):
        open_readonly(tmp_path / "missing.db")


def status(state: str, device: str = "dev-a", boot: str = "b001", site: str = "s1") -> StatusEvent:
    fw = "0.1.0" if state == "online" else ""
    return StatusEvent(site, device, state, boot, fw=fw, reset="PWRON_RESET" if fw else "")


def test_status_events_dedup_against_the_latest_and_keep_a_flap(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path, max_rows=10) as box:
        result = box.add([reading(seq=1)], statuses=[status("online"), status("online")], received_ms=500)
        # The second is a re-delivery of the first: ignored.
        assert (result.inserted, result.statuses, result.status_duplicates) == (1, 1, 1)
        # A flap with the same boot (the node reconnected) is three real changes, in order.
        assert box.add([], statuses=[status("offline"), status("online"), status("online", "dev-b")]).statuses == 3
        assert box.status_pending() == 4 and box.pending() == 1
        assert box.room() == 10 - 5  # status events count toward max_rows
        rows = box.take_statuses(10)
        assert [(r.event.device, r.event.state) for r in rows] == [
            ("dev-a", "online"), ("dev-a", "offline"), ("dev-a", "online"), ("dev-b", "online")
        ]
        assert rows[0].event == StatusEvent("s1", "dev-a", "online", "b001", "0.1.0", "PWRON_RESET", 500)
        assert [r.id for r in box.take_statuses(2)] == [r.id for r in rows[:2]]
        assert box.node_states() == {"nodes_online": 2, "nodes_offline": 0}

        # Deleting what a confirm covered, readings and statuses in one go.
        assert box.delete([box.take(1)[0].id], [r.id for r in rows[:3]]) == 1
        assert box.status_pending() == 1 and box.pending() == 0 and box.room() == 9
        # Forwarded, but still the latest: a retained re-delivery after a resubscribe is ignored.
        assert box.add([], statuses=[status("online")]).status_duplicates == 1
        assert box.add([], statuses=[status("offline", "dev-b")]).statuses == 1
        assert box.node_states() == {"nodes_online": 1, "nodes_offline": 1}
    with Outbox(path, max_rows=10) as box:  # a restart keeps the latest statuses and the pending ones
        assert box.status_pending() == 2 and box.wait_for_rows(0.01)
        assert box.add([], statuses=[status("online")]).status_duplicates == 1
        assert box.node_states() == {"nodes_online": 1, "nodes_offline": 1}
        db = open_readonly(path)
        assert summarize(db).status_pending == 2
        db.close()


def test_status_events_alone_wake_the_uplink_and_fill_the_bound(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", max_rows=2) as box:
        assert not box.wait_for_rows(0.01)
        box.add([], statuses=[status("online"), status("online", "dev-b")])
        assert box.wait_for_rows(0.01) and box.room() == 0 and not box.wait_for_room(0.01)
        box.delete([], [r.id for r in box.take_statuses(1)])
        assert box.room() == 1 and box.wait_for_room(0.01)


class OutboxMachine(RuleBasedStateMachine):
    """Random add / take / delete / reopen, checked against a list of identities."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.path = Path(self.dir.name) / "o.db"
        self.box = Outbox(self.path, max_rows=1_000)
        self.model: list[tuple[str, str, int]] = []  # pending identities, arrival order
        # Per (device, boot): highest seq committed and the seqs below it never seen (gaps).
        self.high: dict[tuple[str, str], int] = {}
        self.missing: dict[tuple[str, str], set[int]] = {}
        self.taken: list[int] = []  # ids of the last take, like the uplink's in-flight batch

    @rule(
        items=st.lists(
            st.tuples(st.sampled_from(DEVICES), st.sampled_from(BOOTS), st.integers(0, 30)), min_size=0, max_size=8
        )
    )
    def add(self, items: list[tuple[str, str, int]]) -> None:
        result = self.box.add([reading(d, s, b) for d, b, s in items])
        expected_new = 0
        for identity in items:
            key, seq = identity[:2], identity[2]
            high = self.high.get(key)
            missing = self.missing.setdefault(key, set())
            if high is None or seq > high:
                missing.update(range(1 if high is None else high + 1, seq))
                self.high[key] = seq
            elif seq in missing:
                missing.discard(seq)  # late into a gap: stored
            else:
                continue  # at or below the high mark: a duplicate
            assert identity not in self.model
            self.model.append(identity)
            expected_new += 1
        assert result.inserted == expected_new
        assert result.duplicates == len(items) - expected_new

    @rule(limit=st.integers(1, 12))
    def take(self, limit: int) -> None:
        rows = self.box.take(limit)
        assert [r.reading.identity for r in rows] == self.model[:limit]
        self.taken = [r.id for r in rows]

    @precondition(lambda self: self.taken)
    @rule(data=st.data())
    def delete_taken(self, data: st.DataObject) -> None:
        # The uplink deletes exactly the rows of a confirmed batch: a prefix of the take
        # (the whole batch, or a shortened one that fit the envelope).
        count = data.draw(st.integers(1, len(self.taken)))
        assert self.box.delete(self.taken[:count]) == count
        del self.model[:count]
        self.taken = []

    @rule()
    def reopen(self) -> None:
        # A gateway restart: nothing committed may be lost, order must hold.
        self.box.close()
        self.box = Outbox(self.path, max_rows=1_000)
        self.taken = []

    @invariant()
    def counts_match(self) -> None:
        assert self.box.pending() == len(self.model)
        assert self.box.room() == 1_000 - len(self.model)

    @invariant()
    def gaps_match(self) -> None:
        recorded: dict[tuple[str, str], set[int]] = {}
        for gap in self.box.gaps():
            seqs = recorded.setdefault((gap["device"], gap["boot"]), set())
            span = set(range(gap["first_seq"], gap["last_seq"] + 1))
            assert not seqs & span, "gap ranges overlap"
            seqs |= span
        assert recorded == {k: v for k, v in self.missing.items() if v}

    @invariant()
    def shares_match(self) -> None:
        # The per-device counts the shares are computed from match what is pending (after
        # adds, deletes and a reopen), and near any bound the device holding the most rows is
        # held back whenever any device is (edge/shares.py).
        per_device: dict[str, int] = {}
        for device, _boot, _seq in self.model:
            per_device[device] = per_device.get(device, 0) + 1
        assert self.box.device_rows() == per_device
        adm = self.box.admission()
        for headroom in range(4):
            near = dataclasses.replace(adm, capacity=adm.used + headroom, floor=1, counts=dict(adm.counts))
            verdicts = {d: dataclasses.replace(near, counts=dict(near.counts)).admit(d) for d in DEVICES}
            if per_device and any(v == shares.SHARE for v in verdicts.values()):
                top = max(per_device, key=lambda d: per_device[d])
                assert verdicts[top] != shares.ADMIT, (per_device, verdicts)

    @invariant()
    def nothing_lost_order_kept(self) -> None:
        assert [r.reading.identity for r in self.box.take(10_000)] == self.model

    def teardown(self) -> None:
        self.box.close()
        self.dir.cleanup()


OutboxMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_outbox_model = OutboxMachine.TestCase


# --- dead letters to the cloud (deadletters/1) ----------------------------------------------


def test_dead_letters_are_claimed_by_a_batch_and_marked_forwarded_only_on_its_confirm(tmp_path: Path) -> None:
    import hashlib

    path = tmp_path / "o.db"
    with Outbox(path) as box:
        box.add([], [DeadLetter(f"tern/s/d{i}/telemetry", b"junk%d" % i, f"bad {i}") for i in range(60)])
        assert box.dead_letters_unclaimed() == 60
        first = box.claim_dead_letters(1)
        assert [d.topic for d in first] == [f"tern/s/d{i}/telemetry" for i in range(50)]  # bounded, oldest first
        assert first[3].sha256 == hashlib.sha256(b"junk3").hexdigest() and first[3].reason == "bad 3"
        assert box.claim_dead_letters(1) == first  # a re-send carries the same ones
        second = box.claim_dead_letters(2)
        assert [d.topic for d in second] == [f"tern/s/d{i}/telemetry" for i in range(50, 60)]
        assert box.dead_letters_unclaimed() == 0 and box.dead_letters_unsent() == 60
        box.delete([], deadletter_bseq=[2])
        assert box.dead_letters_unsent() == 50
    # A restart: batch 1 was never confirmed, so its letters go again (in a new batch); batch 2's never.
    with Outbox(path) as box:
        assert box.dead_letters_unclaimed() == 50
        again = box.claim_dead_letters(3)
        assert [d.id for d in again] == [d.id for d in first]
        box.delete([], deadletter_bseq=3)
        assert box.dead_letters_unclaimed() == 0 and box.dead_letters_unsent() == 0 and box.claim_dead_letters(4) == []
        # Kept as evidence on the Pi: the table and its count are unchanged.
        assert box.dead_letter_count() == 60 and box.summary().dead_letters == 60
        assert box.summary().dead_letters_unsent == 0


def test_a_huge_dead_letter_travels_cut_with_its_whole_size_and_hash(tmp_path: Path) -> None:
    import hashlib

    payload, topic = b"\x00\xff" * 50_000, "tern/s/" + "x" * 65_000 + "/telemetry"
    with Outbox(tmp_path / "o.db") as box:
        box.add([], [DeadLetter(topic, payload, "too big", received_ms=42)])
        (letter,) = box.claim_dead_letters(1)
    assert letter.payload == payload[:2048] and letter.size == 100_000 and letter.payload_cut
    assert letter.sha256 == hashlib.sha256(payload).hexdigest()  # of the whole, though the row keeps 64 KiB
    assert letter.topic == topic[:256] and letter.topic_len == len(topic) and letter.received_ms == 42


def test_an_older_outbox_gets_the_forwarding_columns_and_sends_its_dead_letters(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:  # the table as gateways before deadletters/1 made it
        conn.execute("CREATE TABLE dead_letters (id INTEGER PRIMARY KEY, received_ms INTEGER, topic TEXT,"
                     " payload BLOB, size INTEGER, error TEXT)")
        conn.execute("INSERT INTO dead_letters (received_ms, topic, payload, size, error) VALUES (5, 't/a', ?, 4, 'bad')",
                     [b"junk"])
        conn.execute("INSERT INTO dead_letters (received_ms, topic, payload, size, error) VALUES (6, 't/b', ?, 70000, 'big')",
                     [b"y" * DEAD_LETTER_PAYLOAD_MAX])
    with Outbox(path) as box:
        columns = box.db["dead_letters"].columns_dict
        assert {"sha256", "bseq", "forwarded_ms"} <= set(columns)
        small, big = box.claim_dead_letters(1)
    assert small.payload == b"junk" and len(small.sha256) == 64  # whole: its hash is computed now
    assert big.size == 70_000 and big.sha256 == "" and big.payload_cut  # the whole is gone: no hash claimed


# --- hold events (holds/1): custody like drop events ---------------------------------------------


def test_hold_events_coalesce_travel_with_a_batch_and_go_only_on_its_confirm(tmp_path: Path) -> None:
    key = ("s1", "dev-a", "b001")
    with Outbox(tmp_path / "o.db") as box:
        hold = shares.Hold(*key, 10, shares.SHARE, 12, started_ms=1000)
        # The hold and its event in one commit: a readings commit of another device rides along.
        box.add([reading("dev-b", 1)], holds=[hold], held={(*key, shares.SHARE): [3, 10]}, received_ms=1100)
        assert [h.key for h in box.holds()] == [key] and box.holds_unclaimed() == 1
        # More held while no batch has taken the event: the same event grows (one row per device).
        box.add([], holds=[dataclasses.replace(hold, max_seq=20)], held={(*key, shares.SHARE): [8, 13]},
                received_ms=1200)
        # Another reason is another event.
        box.add([], holds=[dataclasses.replace(hold, reason=shares.RATE, max_seq=21)],
                held={(*key, shares.RATE): [1, 21]}, received_ms=1300)
        assert [(e["reason"], e["count"], e["first_seq"], e["since_ms"], e["at_ms"], e["lifted"])
                for e in box.hold_events()] == [(shares.SHARE, 11, 10, 1000, 1200, 0), (shares.RATE, 1, 21, 1000, 1300, 0)]
        taken = box.claim_holds(7)
        assert [(h.reason, h.count, h.lifted) for h in taken] == [(shares.SHARE, 11, False), (shares.RATE, 1, False)]
        assert box.claim_holds(7) == taken and box.holds_unclaimed() == 0  # a re-send carries the same
        # Held again after the batch took its event: a new event (the batch carries what it took).
        box.add([], holds=[dataclasses.replace(hold, reason=shares.RATE, max_seq=22)],
                held={(*key, shares.RATE): [1, 22]}, received_ms=1400)
        # The hold lifts: the event no batch has taken says so; the taken ones stay as they were.
        box.add([], released=[key], received_ms=1500)
        assert box.holds() == [] and box.claim_holds(7) == taken
        assert [(e["count"], e["lifted"], e["bseq"]) for e in box.hold_events()] == [(11, 0, 7), (1, 0, 7), (1, 1, None)]
        box.delete([], hold_bseq=7)  # the confirm
        assert [(e["count"], e["lifted"]) for e in box.hold_events()] == [(1, 1)]
        later = box.claim_holds(8)
    # A restart: the batch never confirmed hands its events to the next one.
    with Outbox(tmp_path / "o.db") as box:
        assert box.holds_unclaimed() == 1 and box.claim_holds(9) == later
        box.delete([], hold_bseq=9)
        assert box.hold_events() == [] and box.holds_unclaimed() == 0


def test_a_lift_after_every_event_went_is_an_event_of_its_own(tmp_path: Path) -> None:
    key = ("s1", "dev-a", "b001")
    with Outbox(tmp_path / "o.db") as box:
        box.add([], holds=[shares.Hold(*key, 5, shares.CAP, 9, started_ms=2000)], held={(*key, shares.CAP): [5, 5]},
                received_ms=2000)
        assert len(box.claim_holds(1)) == 1
        box.delete([], hold_bseq=1)  # confirmed: nothing of the hold is left unsent
        box.add([], released=[key], received_ms=2500)  # a birth lifted it
        assert [(h.reason, h.first_seq, h.count, h.held_since_ms, h.updated_ms, h.lifted) for h in box.claim_holds(2)] == [
            (shares.CAP, 5, 0, 2000, 2500, True)]
        # Held and lifted within one commit (never stored as a hold): reported, and lifted.
        box.add([], released=[key], held={(*key, shares.SHARE): [2, 30]}, received_ms=2600)
        assert [(e["count"], e["lifted"]) for e in box.hold_events() if e["bseq"] is None] == [(2, 1)]


def test_a_reboot_loop_while_held_stays_within_the_hold_events_bound(tmp_path: Path, monkeypatch) -> None:
    """A node rebooting in a loop while held makes one event per boot; past MAX_HOLD_EVENTS its
    holds fold into its newest waiting event: the rows stop growing, the count stays exact."""
    monkeypatch.setattr(shares, "MAX_HOLD_EVENTS", 3)
    with Outbox(tmp_path / "o.db") as box:
        for i in range(10):
            boot = f"b{i:03d}"
            box.add([], holds=[shares.Hold("s1", "loop", boot, 1, shares.RATE, 5, started_ms=100 + i)],
                    held={("s1", "loop", boot, shares.RATE): [5, 1]}, received_ms=100 + i)
            box.add([], released=[("s1", "loop", boot)], received_ms=100 + i)  # its next birth
        # Another device still gets an event of its own (at most one more row per device).
        box.add([], held={("s1", "other", "b001", shares.SHARE): [2, 7]}, received_ms=200)
        events = box.hold_events()
        assert len(events) == 4 and sum(e["count"] for e in events if e["device"] == "loop") == 50
        assert [e["boot"] for e in events if e["device"] == "loop"] == ["b000", "b001", "b002"]
        assert events[2]["lifted"] == 1 and events[2]["at_ms"] == 109  # the newest says the loop's last lift
        assert sum(h.count for h in box.claim_holds(1)) == 52


def test_an_outbox_from_before_hold_events_opens_and_keeps_its_holds(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE held_back (site TEXT, device TEXT, boot TEXT, from_seq INTEGER NOT NULL,"
               " max_seq INTEGER NOT NULL, reason TEXT NOT NULL, PRIMARY KEY (site, device, boot))")
    db.execute("INSERT INTO held_back VALUES ('s1', 'dev-a', 'b001', 4, 9, 'share')")
    db.commit()
    db.close()
    with Outbox(path) as box:
        assert [(h.key, h.from_seq, h.started_ms) for h in box.holds()] == [(("s1", "dev-a", "b001"), 4, 0)]
        box.add([], released=[("s1", "dev-a", "b001")], received_ms=3000)
        # Its start is unknown: the lift event says "since" the lift rather than inventing one.
        assert [(h.count, h.held_since_ms, h.lifted) for h in box.claim_holds(1)] == [(0, 3000, True)]
