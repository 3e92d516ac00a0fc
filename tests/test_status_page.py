"""The status page in a real browser: Chromium from Debian driven by Playwright, on a phone-sized
screen, against a running gateway with a real emulated node (the firmware on the MicroPython
unix port), a bridge and Kafka. The test kills the node and sees it turn offline on the page,
cuts the uplink and sees the outbox grow, and keeps a screenshot of each step in its tmp_path.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tern.core.codec import Status, encode_status
from tern.device import EmulatedNode
from tern.edge.service import Gateway

from helpers import bridge, client, gateway_config, publish_all, reading, status
from helpers.observe import CHROMIUM, CHROMIUM_ARGS

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed (make setup)")

SITE = "site-p"
PAGE_WAIT_MS = 45_000


def rows_shown(page) -> int:
    return int(page.inner_text("#outbox-rows").replace(",", ""))


@pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason=f"{CHROMIUM} missing: `make setup` installs Debian's chromium")
def test_page_shows_nodes_going_offline_and_the_outbox_growing(
    tmp_path: Path, mosquitto_factory, kafka_bootstrap: str, kafka_topics: dict[str, str]
) -> None:
    pi, cloud = mosquitto_factory("pi"), mosquitto_factory("cloud")
    shots = tmp_path / "screenshots"
    shots.mkdir()
    fetched_elsewhere: list[str] = []
    with Gateway(gateway_config(tmp_path, pi, cloud)) as gw, bridge(cloud, kafka_bootstrap, kafka_topics):
        assert gw.wait_connected(15) and gw.status_server is not None
        url = gw.status_server.url + "/"
        node = EmulatedNode(tmp_path / "fw-node", device="fw-node", site=SITE, broker=pi.address, interval_ms=300).start()
        # A second node, a plain MQTT client with a last will, that stays up and sends on demand
        # (named to sort before the first: the page must still list the dead one on top).
        steady = client(pi, will=status(SITE, "a-steady-node", "b0002", "offline")[:2])
        try:
            # It reports one of its sensors as not answering: the page must say which.
            publish_all(steady, [(*status(SITE, "a-steady-node", "b0002", "online", fw="0.9.0")[:1],
                                  encode_status(Status("a-steady-node", "online", "b0002", "0.9.0", "power",
                                                       down=("pms5003",))), True)])
            with sync_api.sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                try:
                    page = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True)
                    page.on("request", lambda r: None if r.url.startswith(gw.status_server.url) else fetched_elsewhere.append(r.url))
                    page.goto(url)

                    # Both nodes online, with the emulated board's firmware version and boot.
                    page.wait_for_selector('tr[data-device="fw-node"][data-state="online"]', timeout=PAGE_WAIT_MS)
                    page.wait_for_selector('tr[data-device="a-steady-node"][data-state="online"][data-down="pms5003"]',
                                           timeout=PAGE_WAIT_MS)
                    assert "pms5003 down" in page.inner_text('tr[data-device="a-steady-node"]')
                    assert node.wait_connected(30) and node.boot
                    page.wait_for_function(
                        "b => document.querySelector('tr[data-device=\"fw-node\"]').innerText.includes(b)", arg=node.boot,
                        timeout=PAGE_WAIT_MS,
                    )
                    assert page.inner_text("#nodes-online") == "2"
                    assert page.inner_text("#uplink-state") == "connected"
                    # Readable on a phone: nothing wider than the screen but the device table's own scroller.
                    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
                    page.screenshot(path=str(shots / "1-online.png"), full_page=True)
                    # A locator, not a handle: the page rebuilds its rows every second.
                    assert page.locator('tr[data-device="fw-node"]').is_visible()

                    # Pull the node's plug: the broker publishes its will, the page turns it offline.
                    node.kill()
                    page.wait_for_selector('tr[data-device="fw-node"][data-state="offline"]', timeout=PAGE_WAIT_MS)
                    page.wait_for_function("() => document.getElementById('nodes-offline').textContent === '1'", timeout=PAGE_WAIT_MS)
                    # The dead node heads the list, above the one still alive.
                    assert page.eval_on_selector("#devices tr", "r => r.dataset.device") == "fw-node"
                    assert page.inner_text("#nodes-online") == "1"
                    page.screenshot(path=str(shots / "2-node-offline.png"), full_page=True)

                    # The outbox drains while the uplink is up...
                    page.wait_for_function("() => document.getElementById('outbox-rows').textContent === '0'", timeout=PAGE_WAIT_MS)
                    # ...and grows once it is cut: readings keep coming, nothing leaves.
                    cloud.stop()
                    page.wait_for_function("() => document.getElementById('uplink-state').textContent === 'down'", timeout=PAGE_WAIT_MS)
                    publish_all(steady, [reading(SITE, "a-steady-node", "b0002", s) for s in range(1, 151)])
                    page.wait_for_function(
                        "() => Number(document.getElementById('outbox-rows').textContent.replace(/,/g, '')) >= 150",
                        timeout=PAGE_WAIT_MS,
                    )
                    assert rows_shown(page) == gw.stats()["pending"] + gw.stats()["status_pending"]
                    assert page.inner_text("#outbox-tte") == "not draining"
                    # The hour's sparklines: the depth line reaches the rows waiting, the
                    # readings/s line saw the burst.
                    page.wait_for_function(
                        "() => Number(document.getElementById('spark-depth').dataset.last) >= 150"
                        " && Number(document.getElementById('spark-depth').dataset.points) >= 3",
                        timeout=PAGE_WAIT_MS,
                    )
                    assert float(page.get_attribute("#spark-rate", "data-max")) > 0
                    page.locator("#spark-depth").screenshot(path=str(shots / "spark-depth.png"))
                    page.screenshot(path=str(shots / "3-uplink-cut.png"), full_page=True)

                    # The service stops: the page says so instead of showing stale figures as live.
                    gw.stop()
                    page.wait_for_selector("#updated.stale", timeout=PAGE_WAIT_MS)
                    assert "gateway not answering" in page.inner_text("#updated")
                    page.screenshot(path=str(shots / "4-gateway-stopped.png"), full_page=True)
                finally:
                    browser.close()
        finally:
            steady.disconnect()
            steady.loop_stop()
            node.kill()
    assert fetched_elsewhere == [], f"the page fetched from elsewhere: {fetched_elsewhere}"
    for name in ("1-online.png", "2-node-offline.png", "3-uplink-cut.png", "4-gateway-stopped.png"):
        shot = shots / name
        assert shot.stat().st_size > 10_000, f"{shot} looks empty"
    assert_line_rises(shots / "spark-depth.png")


def assert_line_rises(png: Path) -> None:
    """The sparkline's pixels: a drawn line (blue on the pale ground) that ends higher than it starts."""
    from PIL import Image

    image = Image.open(png).convert("RGB")
    width, height = image.size
    # The line's colour (#1f5fbf, anti-aliased): blue clearly above red and green.
    lit = {(x, y) for x in range(width) for y in range(height)
           if (lambda r, g, b: b > 150 and b - r > 60)(*image.getpixel((x, y)))}
    assert len(lit) > width, f"{png}: no line drawn ({len(lit)} line pixels)"
    columns = sorted({x for x, _ in lit})
    top_of = lambda x: min(y for cx, y in lit if cx == x)  # noqa: E731
    assert columns[-1] - columns[0] > width * 0.8, f"{png}: the line does not span the chart"
    assert top_of(columns[-1]) < top_of(columns[0]) - height // 3, f"{png}: the depth line does not rise"
