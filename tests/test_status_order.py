"""Status events are ordered per device, not globally: a device's events are never in two batches
in flight at once, but another device's event never waits behind them (nor behind the backlog
or a busy lane). On the outbox directly, then through a real gateway and mosquitto."""

from __future__ import annotations

from pathlib import Path

from tern.core.codec import StatusEvent
from tern.edge.outbox import Outbox

from helpers import BOOT, BridgeStub, Node, StatusNode, outbox_rows, started_gateway, status_rows, wait_until


def event(device: str, state: str) -> StatusEvent:
    return StatusEvent("s1", device, state, "b001")


def test_take_statuses_skips_busy_devices_whole_and_keeps_each_devices_order(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as box:
        box.add([], statuses=[event("a", "online"), event("b", "online"), event("a", "offline"),
                              event("c", "online"), event("b", "offline"), event("a", "online")])
        every = box.take_statuses(10)
        assert [(r.event.device, r.event.state) for r in every] == [
            ("a", "online"), ("b", "online"), ("a", "offline"), ("c", "online"), ("b", "offline"), ("a", "online")
        ]
        # "a" has a status in flight: none of its events is taken, the others' are, oldest first.
        taken = box.take_statuses(10, busy={"a"})
        assert [(r.event.device, r.event.state) for r in taken] == [("b", "online"), ("c", "online"), ("b", "offline")]
        # The bound holds, and it cuts a device's events to a prefix of them, never a gap.
        assert [r.id for r in box.take_statuses(2, busy={"a"})] == [r.id for r in taken[:2]]
        assert [r.id for r in box.take_statuses(3)] == [r.id for r in every[:3]]
        assert box.take_statuses(10, busy={"a", "b", "c"}) == []
        # Nothing is claimed by a take: a confirm deletes exactly what its batch held.
        box.delete([], [every[0].id])
        assert [(r.event.device, r.event.state) for r in box.take_statuses(1, busy={"b", "c"})] == [("a", "offline")]
        assert box.status_pending() == 5


def test_two_devices_statuses_travel_at_once_but_one_devices_wait_for_its_confirm(
    brokers, outbox_path: Path, cleanup
) -> None:
    local, cloud = brokers
    bridge = BridgeStub(cloud, confirm=False)
    cleanup(bridge)
    # A short confirm timeout: the unconfirmed batches are re-sent meanwhile, each with its own events.
    gw = started_gateway(local, cloud, outbox_path, cleanup, confirm_timeout_s=1.0)

    def carrying(device: str, state: str) -> list:
        return [b for b in list(bridge.batches) if any((e.device, e.state) == (device, state) for e in b.statuses)]

    node_a = StatusNode(local, "dev-a")
    cleanup(node_a)
    wait_until(lambda: carrying("dev-a", "online"), what="dev-a's birth sent")
    birth_a = carrying("dev-a", "online")[0]
    # A reading keeps its lane busy (never confirmed yet): statuses do not need a free lane.
    reader = Node(local, "dev-r")
    cleanup(reader)
    reader.send(0)
    wait_until(lambda: any(b.readings for b in bridge.batches), what="a lane batch in flight")

    node_b = StatusNode(local, "dev-b")
    cleanup(node_b)
    wait_until(lambda: carrying("dev-b", "online"), what="dev-b's birth sent while dev-a's is unconfirmed")
    birth_b = carrying("dev-b", "online")[0]
    assert birth_b.bseq != birth_a.bseq and birth_b.readings == ()
    assert [e.device for e in birth_b.statuses] == ["dev-b"]
    stats = gw.stats()
    assert stats["status_batches_in_flight"] == 2 and stats["batches_confirmed"] == 0, stats

    # dev-a dies: its will waits for the confirm of its birth. dev-c's birth, committed after
    # the will, goes at once, and without the will: the uplink was sending, it held the will back.
    node_a.kill()
    wait_until(lambda: ("dev-a", BOOT, "offline") in status_rows(outbox_path), what="dev-a's will committed")
    node_c = StatusNode(local, "dev-c")
    cleanup(node_c)
    wait_until(lambda: carrying("dev-c", "online"), what="dev-c's birth sent")
    assert [e.device for e in carrying("dev-c", "online")[0].statuses] == ["dev-c"]
    wait_until(lambda: gw.stats()["batches_resent"] >= 2, what="unconfirmed batches re-sent")
    assert not carrying("dev-a", "offline"), "dev-a's will left while its birth was still in flight"
    assert gw.stats()["status_batches_in_flight"] == 3

    # The birth's confirm frees dev-a: its will leaves now, alone (dev-b and dev-c are busy).
    with bridge._lock:
        bridge._confirm(birth_a)
    wait_until(lambda: carrying("dev-a", "offline"), what="dev-a's will sent after its birth's confirm")
    will_a = carrying("dev-a", "offline")[0]
    assert will_a.bseq > birth_a.bseq and [e.device for e in will_a.statuses] == ["dev-a"]

    # Re-sends carried exactly the events of their first send.
    copies: dict[int, set] = {}
    for batch in list(bridge.batches):
        copies.setdefault(batch.bseq, set()).add(tuple((e.device, e.state) for e in batch.statuses))
    assert all(len(events) == 1 for events in copies.values()), copies
    assert len(bridge.batches) > len(copies)  # there were re-sends

    bridge.start_confirming()
    wait_until(lambda: not status_rows(outbox_path) and not outbox_rows(outbox_path), what="everything confirmed")
    delivered = [(e.device, e.state) for e in bridge.delivered_statuses()]
    for device, states in {"dev-a": ["online", "offline"], "dev-b": ["online"], "dev-c": ["online"]}.items():
        assert [s for d, s in delivered if d == device] == states, delivered
    stats = gw.stats()
    assert stats["status_pending"] == 0 and stats["status_forwarded"] == 4 and stats["status_batches_in_flight"] == 0


def test_statuses_in_flight_when_the_broker_loses_the_session_go_again_unchanged(
    mosquitto_factory, outbox_path: Path, cleanup
) -> None:
    local, cloud = mosquitto_factory("local"), mosquitto_factory("cloud", persistence=False)
    bridge = BridgeStub(cloud, confirm=False)
    cleanup(bridge)
    gw = started_gateway(local, cloud, outbox_path, cleanup, confirm_timeout_s=60)

    def sent() -> dict[int, list]:
        out: dict[int, list] = {}
        for batch in list(bridge.batches):
            out.setdefault(batch.bseq, []).append([(e.device, e.state) for e in batch.statuses])
        return out

    nodes = {}
    for count, device in enumerate(("dev-a", "dev-b"), 1):
        nodes[device] = StatusNode(local, device)
        cleanup(nodes[device])
        wait_until(lambda n=count: gw.stats()["status_batches_in_flight"] == n, what=f"{count} births in flight")
    wait_until(lambda: len(sent()) == 2 and all(b.statuses for b in bridge.batches), what="both on the cloud broker")
    first = sent()
    # The broker restarts without its state: what it acknowledged may be gone.
    cloud.stop()
    wait_until(lambda: not gw.stats()["cloud_connected"], what="uplink noticing the restart")
    nodes["dev-a"].kill()  # its will is committed during the outage
    wait_until(lambda: ("dev-a", BOOT, "offline") in status_rows(outbox_path), what="dev-a's will committed")
    cloud.start()
    wait_until(lambda: gw.stats()["cloud_connected"], what="uplink back")
    wait_until(lambda: gw.stats()["batches_resent"] >= 2, timeout=10, what="both batches re-sent")
    wait_until(lambda: all(len(sent()[bseq]) >= 2 for bseq in first), what="both copies on the cloud broker")
    again = sent()
    # Same bseqs, same events; dev-a's will still waits for its birth's confirm.
    assert all(copies == [first[bseq][0]] * len(copies) for bseq, copies in again.items() if bseq in first), again
    assert set(again) == set(first), again

    bridge.start_confirming()
    wait_until(lambda: not status_rows(outbox_path), what="every status confirmed")
    delivered = [(e.device, e.state) for e in bridge.delivered_statuses()]
    assert [s for d, s in delivered if d == "dev-a"] == ["online", "offline"], delivered
    assert [s for d, s in delivered if d == "dev-b"] == ["online"], delivered


# --- the rule as a model: several status batches in flight, confirmed in any order ---------

import tempfile  # noqa: E402

from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule  # noqa: E402

DEVICES = ["a", "b", "c", "d"]


class StatusFlightMachine(RuleBasedStateMachine):
    """Statuses committed, taken into batches the way the uplink takes them (skipping devices
    with a status in flight), confirmed in any order: every device's statuses reach the
    "cloud" in the order they were committed, and none is ever in two batches at once."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.box = Outbox(Path(self.dir.name) / "o.db")
        self.flip = dict.fromkeys(DEVICES, 0)
        self.committed: dict[str, list[str]] = {d: [] for d in DEVICES}
        self.delivered: dict[str, list[str]] = {d: [] for d in DEVICES}
        self.inflight: list[list] = []  # each batch: its StatusRows

    @rule(devices=st.lists(st.sampled_from(DEVICES), min_size=1, max_size=5))
    def commit(self, devices: list[str]) -> None:
        events = []
        for device in devices:
            self.flip[device] += 1  # alternate states so that none is a duplicate of the latest
            state = "online" if self.flip[device] % 2 else "offline"
            events.append(event(device, state))
            self.committed[device].append(state)
        assert self.box.add([], statuses=events).statuses == len(events)

    @rule(limit=st.integers(1, 4))
    def send(self, limit: int) -> None:
        busy = {r.event.device for batch in self.inflight for r in batch}
        rows = self.box.take_statuses(limit, busy=busy)
        assert len(rows) <= limit and not {r.event.device for r in rows} & busy
        if rows:
            self.inflight.append(rows)

    @precondition(lambda self: self.inflight)
    @rule(data=st.data())
    def confirm(self, data) -> None:
        batch = self.inflight.pop(data.draw(st.integers(0, len(self.inflight) - 1)))
        for row in batch:
            self.delivered[row.event.device].append(row.event.state)
        self.box.delete([], [r.id for r in batch])

    @invariant()
    def each_device_in_order(self) -> None:
        for device in DEVICES:
            assert self.delivered[device] == self.committed[device][: len(self.delivered[device])]

    @invariant()
    def accounting(self) -> None:
        held = sum(len(b) for b in self.inflight)
        undelivered = sum(len(self.committed[d]) - len(self.delivered[d]) for d in DEVICES)
        assert self.box.status_pending() == undelivered >= held

    def teardown(self) -> None:
        self.box.close()
        self.dir.cleanup()


StatusFlightMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_status_flight_model = StatusFlightMachine.TestCase
