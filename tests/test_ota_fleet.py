"""Many nodes updating at once behind one gateway (issue 26): the gateway serves the release's
chunks at its pace (``ota_chunks_per_s``), the readings of the nodes that are not updating keep
being acknowledged, and ``/status.json`` and ``tern-gateway status`` show who is downloading
what and how far.

Real parts only: the Pi's and the cloud's mosquitto, the gateway in-process with its HTTP
endpoint, the bridge's side of the batch/confirm contract (helpers.BridgeStub), the firmware
on the MicroPython unix port, the status command as a process. Outcomes: the chunks seen on the
Pi's broker, the nodes' acks and births, the readings in confirmed batches, the command's output.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

import helpers
from helpers import GW, SITE, BridgeStub, require_toolchain, started_gateway
from helpers.observe import CHROMIUM, CHROMIUM_ARGS, status_json
from helpers.ota import firmware_release, fleet_keys, requests_for, send_command, sent_per_boot

from tern.cloud.release_cli import send_release
from tern.core import ota_wire
from tern.core.commands import Command
from tern.device import EmulatedNode
from tern.edge.ota_serve import ReleaseServer
from tern.edge.ota_store import ReleaseStore
from tern.harness.stack import free_port

NEW = "0.5.0"
DEADLINE = 60.0
#: The pace under test: low enough that three nodes asking together hit it.
PACE = 15
#: A reading of the node that is not updating is acknowledged within this many of its own
#: intervals (200 ms): 3 s, loaded machine included.
ACK_LAG_MAX = 15
wait_until = functools.partial(helpers.wait_until, timeout=DEADLINE)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return fleet_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def release(keys: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return firmware_release(keys, tmp_path_factory.mktemp("rel"), NEW)


class ChunkClock:
    """When each chunk crossed the Pi's broker (a subscriber to every node's fw topic)."""

    def __init__(self, broker) -> None:
        self.times: list[float] = []
        self._lock = threading.Lock()
        self.client = helpers.new_client()
        self.client.on_connect = lambda c, *a: c.subscribe("tern/+/+/fw", 0)
        self.client.on_message = self._message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def _message(self, client, userdata, msg) -> None:
        with self._lock:
            self.times.append(time.monotonic())

    def most_in_a_second(self) -> int:
        with self._lock:
            times = list(self.times)
        most, start = 0, 0
        for end, t in enumerate(times):
            while t - times[start] > 1.0:
                start += 1
            most = max(most, end - start + 1)
        return most

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def run_status(url: str) -> subprocess.CompletedProcess:
    """``tern-gateway status --url`` as a field engineer runs it, piped, 160 columns."""
    env = {**os.environ, "NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "160"}
    return subprocess.run([sys.executable, "-m", "tern.edge", "status", "--url", url], capture_output=True,
                          text=True, timeout=60, env=env)


def request(device: str, want: str) -> mqtt.MQTTMessage:
    """A node's chunk request as the ingest's session hands it over."""
    msg = mqtt.MQTTMessage(topic=f"tern/{SITE}/{device}/fw_get".encode())
    msg.payload = want.encode()
    return msg


def updates_on_the_page(url: str) -> list[tuple[str, str, int]] | None:
    """(device, version, percent) of each row of the status page's updates table, as Chromium
    renders it (None without Playwright or Chromium: the page's other tests skip then too)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    if shutil.which(CHROMIUM) is None:
        return None
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(url)
            page.wait_for_selector("#updates-section:not([hidden]) #updates tr[data-device]", timeout=30_000)
            return [(r.get_attribute("data-device"), r.inner_text().split("\t")[1].strip(),
                     int(r.get_attribute("data-pct"))) for r in page.locator("#updates tr").all()]
        finally:
            browser.close()


@pytest.mark.quick
def test_the_server_keeps_one_waiting_request_per_node_and_tracks_each_download(tmp_path: Path, keys, release) -> None:
    """The release server on its own (the real store and wire format, no broker): a node that
    asks again while its request waits is answered once, each node in the order it first asked,
    and each answer moves that node's progress."""
    store = ReleaseStore(tmp_path / "releases", str(keys["pub"]))
    store.add({p.name: p.read_bytes() for p in release.iterdir()})
    sent: list[tuple[str, int, int]] = []
    server = ReleaseServer(store, lambda topic, payload: sent.append(
        (topic.split("/")[2], *(lambda c: (c.index, c.offset))(ota_wire.decode_chunk(payload)))), chunks_per_s=1000)
    sizes = [(release / n).stat().st_size for n in ("manifest", "manifest.sig")]
    # Queued before the worker starts: what waits is what it finds.
    server.on_request(request("a", f"{NEW} 0 0"))
    server.on_request(request("b", f"{NEW} 0 0"))
    server.on_request(request("a", f"{NEW} 0 0"))        # asked again: merged
    server.on_request(request("c", f"{NEW} 1 {sizes[1] - 1}"))
    server.start()
    try:
        wait_until(lambda: len(sent) == 3, what="three answers")
        assert sent == [("a", 0, 0), ("b", 0, 0), ("c", 1, sizes[1] - 1)]
        assert server.stats()["ota_requests_merged"] == 1 and server.stats()["ota_chunks"] == 3
        progress = {d["device"]: d for d in server.downloads.snapshot()}
        whole = sum(p.stat().st_size for p in release.iterdir())
        assert progress["a"]["bytes"] == min(1024, sizes[0]) and progress["a"]["total"] == whole
        assert progress["c"]["bytes"] == sizes[0] + sizes[1]
        assert progress["c"]["pct"] == 100 * (sizes[0] + sizes[1]) // whole
        assert {d["state"] for d in progress.values()} == {"downloading"}
    finally:
        server.stop()
    with pytest.raises(ValueError):
        ReleaseServer(store, lambda *a: None, chunks_per_s=0)


@pytest.mark.slow
def test_nodes_updating_together_are_paced_readings_keep_their_acks_and_status_shows_progress(
        tmp_path: Path, brokers, outbox_path: Path, cleanup, keys, release) -> None:
    require_toolchain()
    local, cloud = brokers
    bridge = BridgeStub(cloud)
    cleanup(bridge)
    gw = started_gateway(local, cloud, outbox_path, cleanup, ota_key=str(keys["pub"]), ota_chunks_per_s=PACE,
                         http_port=free_port())
    # (The bundle is not retained: the gateway's command session must be subscribed first.)
    assert gw.commands.wait_connected(DEADLINE)
    send_release(release, [GW], cloud.host, cloud.port)
    wait_until(lambda: gw.releases.versions() == [NEW], what="the release stored")
    chunks = ChunkClock(local)
    cleanup(chunks)
    nodes = [EmulatedNode(tmp_path / d, device=d, site=SITE, broker=local.address, interval_ms=200,
                          ota_key=keys["pub"]) for d in ("up-1", "up-2", "up-3", "steady")]
    for node in nodes:
        cleanup(node)
        node.start()
    updating, steady = nodes[:3], nodes[3]
    for node in nodes:
        assert node.wait_connected(DEADLINE), node.log_text()
    wait_until(lambda: steady.acked >= 3, what="the steady node's first acks")

    lags: list[int] = []
    stop = threading.Event()

    def watch_steady() -> None:   # how far its acks trail what it sent, all along the update
        while not stop.wait(0.05):
            lags.append(steady.sent - steady.acked)

    watcher = threading.Thread(target=watch_steady, daemon=True)
    watcher.start()
    began = time.monotonic()
    try:
        for i, node in enumerate(updating):
            send_command(cloud, GW, Command(f"u-{i}", node.device, "ota_update", {"version": NEW}))

        # Half-way, the gateway shows each download: in /status.json and in the status command.
        def midway() -> list[dict]:
            downloads = status_json(gw)["ota"]["downloads"]
            return downloads if len(downloads) == 3 and any(0 < d["pct"] < 100 for d in downloads) else []
        shown = wait_until(midway, what="three downloads in /status.json, one part-way")
        assert {d["device"] for d in shown} == {"up-1", "up-2", "up-3"} and {d["version"] for d in shown} == {NEW}
        assert all(d["site"] == SITE and d["total"] > 30_000 and d["state"] in ("downloading", "fetched")
                   for d in shown), shown
        assert status_json(gw)["ota"]["chunks_per_s"] == PACE
        cli = run_status(gw.status_server.url)
        assert cli.returncode == 0, cli.stdout + cli.stderr
        print(cli.stdout)
        assert f"updates in progress (paced at {PACE} chunks/s)" in cli.stdout, cli.stdout
        rows = [line for line in cli.stdout.splitlines() if line.lstrip("│┃ ").startswith("up-")
                and NEW in line and "%" in line]
        assert len(rows) == 3, cli.stdout
        page_rows = updates_on_the_page(gw.status_server.url + "/")
        assert page_rows is None or {d for d, _, _ in page_rows} == {"up-1", "up-2", "up-3"}, page_rows
        assert page_rows is None or all(v == NEW and 0 <= pct <= 100 for _, v, pct in page_rows), page_rows

        for node in updating:
            wait_until(lambda: any(s.fw == NEW for s in bridge.delivered_statuses()
                                   if s.device == node.device and s.state == "online"),
                       what=f"{node.device} on {NEW}")
        took = time.monotonic() - began
    finally:
        stop.set()
        watcher.join(2)

    # The pace held: never more than a second's bucket plus a second's worth in any second,
    # and three downloads could not be faster than the pace lets them.
    whole = requests_for(release)
    assert chunks.most_in_a_second() <= 2 * PACE, chunks.most_in_a_second()
    assert took >= (3 * whole - PACE) / PACE, (took, whole)
    assert gw.stats()["ota_paced_s"] > 0
    # The node that was not updating kept being acknowledged within the bound.
    assert lags and max(lags) <= ACK_LAG_MAX, (max(lags), len(lags))
    for node in nodes:
        for boot, last in sent_per_boot(node).items():
            if node is steady or last:
                wait_until(lambda: set(range(1, last + 1)) <= {r.seq for r in bridge.delivered()
                                                              if r.device == node.device and r.boot == boot},
                           what=f"{node.device} boot {boot}: readings 1..{last} confirmed")
    # Once fetched, a download is shown as such (until forgotten), not as stalled.
    assert {d["state"] for d in status_json(gw)["ota"]["downloads"]} == {"fetched"}
