"""Over-the-air transport: a signed release reaches the gateway once (a bundle on its cloud command
session), is checked and stored beside the outbox, and is served in 1 KB binary chunks to emulated
nodes running the real firmware, which ask for what they miss and so resume after a SIGKILL.

Real parts only: two mosquittos (the Pi's, the cloud's), the gateway in-process, the bridge's side
of the batch/confirm contract (helpers.BridgeStub), the MicroPython unix port running the firmware.
Outcomes are what crossed the brokers (batches confirmed, births), rows in the outbox and the
files on the node's flash.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest

import helpers
from helpers import GW, SITE, BridgeStub, dead_letters, require_toolchain, started_gateway
from helpers.ota import firmware_release, fleet_keys, publish, requests_for, send_command, sent_per_boot, wants

from tern.cloud.release_cli import send_release
from tern.core import ota_wire, topics
from tern.core.commands import Command
from tern.device import EmulatedNode
from tern.device.release import sign
from tern.edge.ota_serve import ReleaseServer
from tern.edge.ota_store import ReleaseRefused, ReleaseStore, check_release
from tern.harness.stack import Mosquitto

NEW = "0.5.0"
FACTORY = "0.1.0"
DEADLINE = 40.0
wait_until = functools.partial(helpers.wait_until, timeout=DEADLINE)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return fleet_keys(tmp_path_factory.mktemp("keys"), other=True)


@pytest.fixture(scope="module")
def release(keys: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return firmware_release(keys, tmp_path_factory.mktemp("rel"), NEW)


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def make_node(tmp_path: Path, broker: Mosquitto, keys: dict[str, Path], device: str) -> EmulatedNode:
    require_toolchain()
    return EmulatedNode(tmp_path / device, device=device, site=SITE, broker=broker.address, interval_ms=200,
                        ota_key=keys["pub"])


def births(bridge: BridgeStub, device: str) -> list:
    return [s for s in bridge.delivered_statuses() if s.device == device and s.state == "online"]


def assert_every_reading_arrived(bridge: BridgeStub, node: EmulatedNode, killed: str = "") -> None:
    """Every boot's readings arrived gap-free, up to the last one that boot published (but for a
    boot ended by SIGKILL: a power cut loses what was in RAM and not yet acked, update or not)."""
    for boot, last in sent_per_boot(node).items():
        if boot == killed:
            continue
        wait_until(lambda: set(range(1, last + 1)) <= {r.seq for r in bridge.delivered()
                                                      if r.device == node.device and r.boot == boot},
                   what=f"boot {boot}'s readings 1..{last} in confirmed batches")


# --- host side --------------------------------------------------------------------------------


@pytest.mark.quick
def test_wire_formats_round_trip_and_refuse_damage(release: Path) -> None:
    bundle = ota_wire.encode_bundle(files_of(release))
    assert ota_wire.decode_bundle(bundle) == files_of(release)
    with pytest.raises(ota_wire.CodecError):
        ota_wire.decode_bundle(bundle[:-1])
    chunk = ota_wire.Chunk(NEW, 3, 1024, 5000, b"x" * 1024)
    raw = ota_wire.encode_chunk(chunk)
    assert ota_wire.decode_chunk(raw) == chunk and len(raw) == 1024 + 23 + len(NEW)
    bad = bytearray(raw)
    bad[-1] ^= 1
    with pytest.raises(ota_wire.CodecError, match="hash"):
        ota_wire.decode_chunk(bytes(bad))
    assert ota_wire.decode_want(b"0.5.0 2 4096") == ota_wire.Want(NEW, 2, 4096)
    for junk in (b"0.5.0 2", b"../x 2 0", b"0.5.0 -1 0", b"\xff"):
        with pytest.raises(ota_wire.CodecError):
            ota_wire.decode_want(junk)


def test_the_store_keeps_only_good_releases_and_the_newest_n(tmp_path: Path, keys, release) -> None:
    store = ReleaseStore(tmp_path / "outbox.db.releases", str(keys["pub"]), keep=2)
    assert store.add(files_of(release)) == (NEW, True)
    assert store.add(files_of(release)) == (NEW, False)   # a redelivery: not written again
    other = files_of(release)
    other[ota_wire.SIGNATURE] = sign(other[ota_wire.MANIFEST], keys["other"])
    with pytest.raises(ReleaseRefused, match="not signed by the fleet key"):
        store.add(other)
    broken = files_of(release)
    broken["tern_link.mpy"] = broken["tern_link.mpy"][:-1] + b"\x00"
    with pytest.raises(ReleaseRefused, match="tern_link.mpy corrupt"):
        store.add(broken)
    with pytest.raises(ReleaseRefused, match="no ota_key"):
        check_release(files_of(release), None)
    for version in ("0.6.0", "0.7.0"):
        store.add(files_of(firmware_release(keys, tmp_path, version)))
    assert store.versions() == ["0.6.0", "0.7.0"]
    # A file damaged on disk after it was stored is not served: the release is dropped.
    (store.folder / "0.7.0" / "tern_node.mpy").write_bytes(b"M\x06rot")
    with pytest.raises(ReleaseRefused, match="damaged on the gateway"):
        store.get("0.7.0")
    assert store.versions() == ["0.6.0"]


# --- through the gateway, to emulated nodes ---------------------------------------------------


def test_a_node_updates_over_the_gateway_while_its_readings_keep_flowing(
        tmp_path: Path, brokers, outbox_path: Path, cleanup, keys, release) -> None:
    local, cloud = brokers
    bridge = BridgeStub(cloud)
    cleanup(bridge)
    # (A metered uplink: the update's chunks never touch it, the readings keep within it.)
    gw = started_gateway(local, cloud, outbox_path, cleanup, ota_key=str(keys["pub"]),
                         uplink_rate_limit="100 readings/s")
    # An ota_update for a release the gateway does not hold is refused there, not sent on.
    send_command(cloud, GW, Command("u-0", "ota-n1", "ota_update", {"version": NEW}))
    wait_until(lambda: any(o.id == "u-0" and o.outcome == "rejected" and "no release 0.5.0" in o.detail
                           for b in bridge.batches for o in b.outcomes), what="u-0 rejected")

    cli = subprocess.run([str(Path(sys.executable).parent / "tern-bridge"), "release", str(release), "--gateway", GW,
                          "--mqtt", cloud.address], capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0 and json.loads(cli.stdout)["release"] == NEW, cli.stderr
    wait_until(lambda: gw.releases.versions() == [NEW], what="the release stored")
    assert gw.stats()["releases_stored"] == 1
    assert sorted(p.name for p in (outbox_path.parent / "outbox.db.releases" / NEW).iterdir()) == \
        sorted(files_of(release))

    node = make_node(tmp_path, local, keys, "ota-n1")
    try:
        node.start()
        wait_until(lambda: len([r for r in bridge.delivered() if r.device == node.device]) >= 3, what="readings")
        send_command(cloud, GW, Command("u-1", node.device, "ota_update", {"version": NEW}))
        # The node fetches, resets into the install, proves itself with an acked reading.
        wait_until(lambda: any(b.fw == NEW for b in births(bridge, node.device)), what="a birth with fw 0.5.0")
        assert "TERN ota fetched 0.5.0" in node.log_text(), node.log_text()
        assert (node.workdir / "ota" / "state").exists() and not (node.workdir / "ota" / "fetch").exists()
        asked = wants(node)
        # Each chunk asked for once (a request repeated after 2 s without an answer would be
        # asked again: possible on a loaded machine, so counted apart), each one answered.
        assert len(set(asked)) == requests_for(release), (len(asked), requests_for(release))
        # (A request asked again while the first still waited is answered once: merged.)
        assert len(set(asked)) <= gw.stats()["ota_chunks"] <= len(asked), (gw.stats()["ota_chunks"], asked)
        # Keeps reading on the new version, and nothing of any boot was lost.
        boots = {b.boot for b in births(bridge, node.device) if b.fw == NEW}
        wait_until(lambda: any(r.boot in boots for r in bridge.delivered() if r.device == node.device),
                   what="readings from 0.5.0")
        assert_every_reading_arrived(bridge, node)
        wait_until(lambda: any(o.id == "u-1" and o.outcome == "done" for b in bridge.batches for o in b.outcomes),
                   what="u-1 done in a batch")
    finally:
        node.kill()


@pytest.mark.parametrize("at", [0.3, 0.6, 0.99, "switch"], ids=["30%", "60%", "99%", "switch"])
def test_a_download_killed_midway_or_at_the_switch_resumes_and_boots_one_version(
        tmp_path: Path, brokers, outbox_path: Path, cleanup, keys, release, at) -> None:
    """SIGKILL (a power cut) at about 30, 60 or 99 % of the download's requests, or once every
    file is in and ``ready`` is written (the reset into the install, or the install itself):
    the node resumes from its flash and ends on the new version, booting a whole version at
    every boot (the old or the new, never neither)."""
    local, cloud = brokers
    bridge = BridgeStub(cloud)
    cleanup(bridge)
    gw = started_gateway(local, cloud, outbox_path, cleanup, ota_key=str(keys["pub"]))
    assert gw.commands.wait_connected(DEADLINE)   # (the bundle is not retained)
    send_release(release, [GW], cloud.host, cloud.port)
    wait_until(lambda: gw.releases.versions() == [NEW], what="the release stored")
    whole = requests_for(release)
    node = make_node(tmp_path, local, keys, "ota-n2")
    try:
        node.start()
        assert node.wait_connected(DEADLINE), node.log_text()
        send_command(cloud, GW, Command("u-2", node.device, "ota_update", {"version": NEW}))
        if at == "switch":
            wait_until(lambda: (node.workdir / "ota" / "stage" / "ready").exists()
                       or "TERN ota fetched" in node.log_text(), what="ready written", interval=0.002)
        else:
            wait_until(lambda: len(set(wants(node))) >= int(whole * at), what=f"{at:.0%} of the chunks asked for",
                       interval=0.002)
        killed = node.boot
        node.kill()   # SIGKILL: a power cut
        if at == "switch":   # (before the install had switched: else this would test nothing)
            assert "TERN ota switched" not in node.log_text(), node.log_text()[-2000:]
        before = set(wants(node))
        asked_before = len(wants(node))
        if at != "switch":
            staged = sum(p.stat().st_size for p in (node.workdir / "ota" / "stage").iterdir())
            assert 0 < staged and len(before) < whole + 1
        node.start()
        wait_until(lambda: any(b.fw == NEW for b in births(bridge, node.device)), what="a birth with fw 0.5.0")
        after = wants(node)[asked_before:]
        if at == "switch":
            # Every file was in: nothing is fetched again, the boot installs what is staged.
            assert not set(after) - {(0, (release / "manifest").stat().st_size)}, after
        else:
            # It went on from what was on flash: the manifest's and signature's ends, the chunk in
            # flight at the kill, then only what it had not asked for yet.
            assert after[0] == (0, (release / "manifest").stat().st_size), after[:3]
            assert len(set(after) - before) <= whole - len(before) + 2, (len(after), len(before), whole)
            assert len(set(after)) <= whole - len(before) + 3, (len(set(after)), len(before), whole)
        # Every boot ran one whole version: the flashed one until the switch, 0.5.0 after it.
        fws = [line.split()[4] for line in node.log_text().splitlines() if line.startswith("TERN boot ")]
        assert fws and set(fws) <= {FACTORY, NEW} and fws[-1] == NEW, fws
        assert "Traceback" not in node.log_text(), node.log_text()
        assert_every_reading_arrived(bridge, node, killed)
    finally:
        node.kill()


def test_a_damaged_chunk_is_asked_for_again(tmp_path: Path, mosquitto: Mosquitto, keys, release) -> None:
    """The real release server, with one chunk damaged on its way to the node."""
    store = ReleaseStore(tmp_path / "releases", str(keys["pub"]))
    store.add(files_of(release))
    client = helpers.new_client()
    damaged = []

    def publish_chunk(topic: str, payload: bytes) -> None:
        chunk = ota_wire.decode_chunk(payload)
        if (chunk.index, chunk.offset) == (2, 0) and not damaged:
            damaged.append(payload)
            payload = payload[:-1] + bytes((payload[-1] ^ 0x40,))
        client.publish(topic, payload, qos=0)

    server = ReleaseServer(store, publish_chunk)
    client.on_connect = lambda c, *a: c.subscribe(topics.FW_GET_FILTER, 0)
    client.on_message = lambda c, u, msg: server.on_request(msg)
    client.connect(mosquitto.host, mosquitto.port)
    client.loop_start()
    server.start()
    node = make_node(tmp_path, mosquitto, keys, "ota-n3")
    try:
        node.flash()
        (node.workdir / "ota").mkdir()
        (node.workdir / "ota" / "fetch").write_text(NEW)   # what the ota_update command leaves
        node.start()
        assert node.wait_for(lambda n: "TERN ota fetched 0.5.0" in n.log_text(), DEADLINE), node.log_text()
        assert damaged and "TERN ota bad_chunk 2 0" in node.log_text()
        assert wants(node).count((2, 0)) >= 2
        assert node.wait_for(lambda n: "TERN ota switched flashed to 0.5.0" in n.log_text(), DEADLINE), node.log_text()
    finally:
        node.kill()
        server.stop()
        client.loop_stop()
        client.disconnect()


def test_a_wrongly_signed_release_is_refused_by_the_gateway_and_by_the_node(
        tmp_path: Path, brokers, outbox_path: Path, cleanup, keys, release) -> None:
    local, cloud = brokers
    gw = started_gateway(local, cloud, outbox_path, cleanup, ota_key=str(keys["pub"]))
    bad = files_of(release)
    bad[ota_wire.SIGNATURE] = sign(bad[ota_wire.MANIFEST], keys["other"])
    publish(cloud, topics.gateway_release_topic(GW), ota_wire.encode_bundle(bad))
    letters = wait_until(lambda: dead_letters(outbox_path), what="a dead letter for the release")
    assert letters[0][0] == topics.gateway_release_topic(GW) and "not signed by the fleet key" in letters[0][2]
    assert gw.releases.versions() == [] and gw.stats()["releases_refused"] == 1
    gw.stop()   # (it would answer the node below with "no release 0.5.0")

    # A gateway that trusts another key (misconfigured) serves it: the node checks for itself,
    # before it fetches a single file.
    store = ReleaseStore(tmp_path / "releases", str(keys["other_pub"]))
    store.add(bad)
    client = helpers.new_client()
    server = ReleaseServer(store, lambda topic, payload: client.publish(topic, payload, qos=0))
    client.on_connect = lambda c, *a: c.subscribe(topics.FW_GET_FILTER, 0)
    client.on_message = lambda c, u, msg: server.on_request(msg)
    client.connect(local.host, local.port)
    client.loop_start()
    server.start()
    node = make_node(tmp_path, local, keys, "ota-n4")
    try:
        node.flash()
        (node.workdir / "ota").mkdir()
        (node.workdir / "ota" / "fetch").write_text(NEW)
        node.start()
        assert node.wait_for(lambda n: "TERN error ota fetch 0.5.0: signed with another key" in n.log_text(),
                             DEADLINE), node.log_text()
        assert {i for i, _ in wants(node)} == {0, 1}   # no file was asked for
        assert not (node.workdir / "ota" / "fetch").exists()
        assert not any((node.workdir / "ota" / "stage").iterdir())
        assert node.boots == 1 and node.wait_for(lambda n: n.sent > 0, DEADLINE)   # the old version runs on
    finally:
        node.kill()
        server.stop()
        client.loop_stop()
        client.disconnect()
