"""Running the gateway in the field: the config file, `tern-gateway check`, a damaged outbox and
its repair, broker outages said at once, bounded log lines, SIGTERM under load.

All on real parts: private mosquittos on loopback, real SQLite files (damaged by overwriting
real pages), the real `tern-gateway` process where exit codes and signals matter.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest

from tern.core.codec import Reading
from tern.edge import repair
from tern.edge.cli import main as cli_main
from tern.edge.config import GatewayConfig
from tern.edge.config_file import keys, resolve
from tern.edge.outbox import DeadLetter, Outbox
from tern.edge.service import Gateway
from tern.harness.stack import Mosquitto, free_port

from helpers import (
    BOOT, GW, SITE, BridgeStub, FakeGateway, bridge_config, dead_letters, log_handler, new_client, outbox_rows,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "deploy" / "gateway.toml"
DEADLINE = 60.0


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def base_toml(tmp_path: Path, cloud: str = "127.0.0.1:1884", extra: str = "") -> str:
    return f'gateway_id = "{GW}"\ncloud_broker = "{cloud}"\noutbox_path = "{tmp_path / "gw" / "outbox.db"}"\n{extra}'


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """The real `tern-gateway` in a process of its own (exit codes, stderr, no traceback)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TERN_") or k == "TERN_CACHE"}
    clean.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "tern.edge.cli", *args], capture_output=True, text=True, timeout=timeout, env=clean
    )


@pytest.fixture(autouse=True)
def no_tern_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("TERN_") and name != "TERN_CACHE":
            monkeypatch.delenv(name)


# --- the config file ------------------------------------------------------------------------


def test_file_env_and_flags_in_rising_precedence(tmp_path):
    path = write_config(tmp_path / "gateway.toml", base_toml(tmp_path, extra="batch_size = 300\nkeepalive_s = 20\n"))
    cfg = resolve(path, env={})
    assert (cfg.gateway_id, cfg.batch_size, cfg.keepalive_s, cfg.local_broker) == (GW, 300, 20, "127.0.0.1:1883")
    cfg = resolve(path, env={"TERN_BATCH_SIZE": "400", "TERN_KEEPALIVE_S": "25"})
    assert (cfg.batch_size, cfg.keepalive_s) == (400, 25)
    cfg = resolve(path, env={"TERN_BATCH_SIZE": "400"}, flags={"batch_size": "500"})
    assert cfg.batch_size == 500
    # Through the real parser: every key has a flag, older spellings kept.
    from tern.edge.cli import build_parser

    args = build_parser().parse_args(
        ["run", "--config", str(path), "--batch-size", "600", "--cloud", "10.0.0.1", "--reconnect-max-s", "2", "--log-level", "DEBUG"]
    )
    cfg = GatewayConfig.from_args(args, env={"TERN_BATCH_SIZE": "400"})
    assert (cfg.batch_size, cfg.cloud_hostport, cfg.reconnect_max_s, cfg.log_level) == (600, ("10.0.0.1", 1883), 2.0, "DEBUG")


def test_shipped_example_names_every_key_with_its_default_and_loads(tmp_path):
    text = EXAMPLE.read_text()
    data = tomllib.loads(text)
    for key in keys():
        if key.required:
            assert key.name in data, f"{key.name} (required) is not set in {EXAMPLE}"
            continue
        if key.default is None:
            # Optional settings (files, accounts) are shown as an example, indented so that
            # uncommenting the defaults below does not turn them on.
            line = re.search(rf"^#  {key.name} = (.+)$", text, re.M)
            assert line, f"{key.name} (optional) has no example in {EXAMPLE}"
            continue
        default = tomllib.loads(f"v = {key.default!r}".replace("'", '"').replace("True", "true").replace("False", "false"))["v"]
        line = re.search(rf"^# {key.name} = (.+)$", text, re.M)
        assert line, f"{key.name} is not in {EXAMPLE}"
        assert tomllib.loads(f"v = {line.group(1)}")["v"] == default, f"{key.name}: example shows {line.group(1)}, default is {key.default!r}"
        # Each key is explained: a comment right above it.
        above = text[: line.start()].rstrip("\n").rsplit("\n", 1)[-1]
        assert above.startswith("#") and len(above) > 10, f"{key.name} has no explanation"
    # Uncommented, every example value is a valid config (outbox moved to the test's folder).
    uncommented = re.sub(r"^# (\w+ = )", r"\1", text, flags=re.M).replace(data["outbox_path"], str(tmp_path / "o.db"))
    cfg = resolve(write_config(tmp_path / "g.toml", uncommented), env={})
    assert cfg.gateway_id == "gw1"


@pytest.mark.parametrize(
    "body, expected",
    [
        ('batch_sise = 10\n', ["unknown key 'batch_sise'", "did you mean 'batch_size'"]),
        ('cloud = "x:1"\n', ["unknown key 'cloud'", "did you mean 'cloud_broker'"]),
        ('batch_size = "200"\n', ["batch_size: expected an integer, found a string '200'"]),
        ('batch_size = 0\n', ["batch_size: expected an integer in [1, 5000], found 0"]),
        ('confirm_timeout_s = true\n', ["confirm_timeout_s: expected a number, found a boolean True"]),
        ('local_broker = "nowhere:99999"\n', ["local_broker: expected HOST:PORT, found 'nowhere:99999'"]),
        ('log_level = "LOUD"\n', ["log_level: expected one of DEBUG, INFO, WARNING, ERROR, found 'LOUD'"]),
        ('batch_size = = 3\n', ["not valid TOML"]),
        ('[gateway]\nbatch_size = 3\n', ["unknown key 'gateway'"]),
    ],
)
def test_config_file_errors_name_file_key_expected_and_found(tmp_path, capsys, body, expected):
    path = write_config(tmp_path / "gateway.toml", base_toml(tmp_path) + body)
    assert cli_main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"tern-gateway: error: {path}: "), err
    for part in expected:
        assert part in err, err


def test_config_errors_from_env_flags_and_missing_file_are_one_line_exit_2(tmp_path):
    path = write_config(tmp_path / "gateway.toml", base_toml(tmp_path))
    out = run_cli("run", "--config", str(path), env={"TERN_BATCH_SIZE": "lots"})
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert "batch_size: expected an integer, found 'lots' (from environment TERN_BATCH_SIZE)" in out.stderr
    out = run_cli("run", "--config", str(path), "--keepalive-s", "1")
    assert out.returncode == 2 and "keepalive_s: expected an integer in [5, 3600], found 1 (from --keepalive-s)" in out.stderr
    out = run_cli("run", "--config", str(tmp_path / "missing.toml"))
    assert out.returncode == 2 and f"{tmp_path / 'missing.toml'}: no such config file" in out.stderr
    out = run_cli("run", "--config", str(write_config(tmp_path / "empty.toml", "")))
    assert out.returncode == 2 and "gateway id is required" in out.stderr and "Traceback" not in out.stderr


# --- tern-gateway check ---------------------------------------------------------------------


def check_lines(out: str) -> dict[str, str]:
    """{check name: 'ok ...' or 'FAIL ...'} from `tern-gateway check` output."""
    lines = {}
    for line in out.splitlines():
        m = re.match(r"^(ok  |FAIL) ([a-z ]+): (.*)$", line)
        assert m, f"not a check line: {line!r}"
        lines[m.group(2)] = f"{m.group(1).strip()} {m.group(3)}"
    return lines


def test_check_passes_on_a_working_site(mosquitto_factory, tmp_path):
    local, cloud = mosquitto_factory("local"), mosquitto_factory("cloud")
    path = write_config(tmp_path / "gateway.toml", base_toml(tmp_path, cloud.address, f'local_broker = "{local.address}"\n'))
    out = run_cli("check", "--config", str(path))
    lines = check_lines(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    assert set(lines) == {"config", "local broker", "cloud broker", "outbox folder", "outbox file"}
    assert all(v.startswith("ok") for v in lines.values()), lines
    assert "does not exist yet" in lines["outbox file"]
    assert "MB free" in lines["outbox folder"]


def test_check_says_what_fails_and_exits_2(mosquitto_factory, tmp_path):
    cloud = mosquitto_factory("cloud")
    refused = free_port()  # nothing listens here
    # A listener that accepts TCP and never answers: a broker that hangs.
    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen(5)
    try:
        path = write_config(
            tmp_path / "gateway.toml",
            f'gateway_id = "{GW}"\ncloud_broker = "127.0.0.1:{mute.getsockname()[1]}"\n'
            f'local_broker = "127.0.0.1:{refused}"\noutbox_path = "{tmp_path / "gw" / "outbox.db"}"\nmin_free_mb = 2000000000\n',
        )
        out = run_cli("check", "--config", str(path), "--timeout", "2")
    finally:
        mute.close()
    lines = check_lines(out.stdout)
    assert out.returncode == 2
    assert lines["config"].startswith("ok")
    assert lines["local broker"] == f"FAIL 127.0.0.1:{refused}: connection refused"
    assert "no CONNACK within 2 s" in lines["cloud broker"]
    assert lines["outbox folder"].startswith("FAIL") and "want at least 2000000000 MB (min_free_mb)" in lines["outbox folder"]
    # An outbox folder that cannot exist (its parent is a file): root can write anywhere else.
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    path = write_config(tmp_path / "g2.toml", f'gateway_id = "{GW}"\ncloud_broker = "{cloud.address}"\noutbox_path = "{blocker / "outbox.db"}"\n')
    out = run_cli("check", "--config", str(path), "--timeout", "2")
    lines = check_lines(out.stdout)
    assert out.returncode == 2 and lines["cloud broker"].startswith("ok")
    assert lines["outbox folder"].startswith(f"FAIL {blocker} is not writable")
    # A config error is the first check's FAIL, still exit 2 and no traceback.
    out = run_cli("check", "--config", str(write_config(tmp_path / "bad.toml", base_toml(tmp_path) + "batch_size = -1\n")))
    assert out.returncode == 2 and out.stdout.startswith("FAIL config: ") and "batch_size" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr


# --- a damaged outbox -----------------------------------------------------------------------


def fill_outbox(path: Path, readings: int) -> None:
    """A real outbox with readings from 5 devices, status events, a dead letter and a bseq."""
    from tern.core.codec import StatusEvent

    with Outbox(path) as box:
        for start in range(0, readings, 1000):
            box.add([Reading(f"dev-{i % 5}", BOOT, i, 1_700_000_000_000 + i, {"t": 20.5, "n": i}, site=SITE)
                     for i in range(start, min(readings, start + 1000))])
        box.add([], [DeadLetter("tern/x", b"junk", "not JSON")],
                statuses=[StatusEvent(site=SITE, device="dev-0", state="online", boot=BOOT, fw="1", reset="PWRON", received_ms=0)])
        for _ in range(7):
            box.next_bseq()


def leaf_pages(path: Path, name: str) -> list[tuple[int, int]]:
    """(page number, cells) of ``name``'s leaf pages, from SQLite's own dbstat."""
    with sqlite3.connect(path) as conn:
        return [tuple(r) for r in conn.execute("SELECT pageno, ncell FROM dbstat WHERE name = ? AND pagetype = 'leaf' ORDER BY pageno", [name])]


def overwrite_pages(path: Path, pages: list[int]) -> None:
    """Damage the file the way a failing SD card does: whole pages of garbage."""
    with sqlite3.connect(path) as conn:
        size = conn.execute("PRAGMA page_size").fetchone()[0]
    with open(path, "r+b") as fh:
        for page in pages:
            fh.seek((page - 1) * size)
            fh.write(os.urandom(size))


def test_damaged_outbox_stops_the_service_with_one_line_and_repair_salvages_every_readable_row(tmp_path):
    outbox = tmp_path / "gw" / "outbox.db"
    total = 20_000
    fill_outbox(outbox, total)
    leaves = leaf_pages(outbox, "outbox")
    index_leaves = leaf_pages(outbox, "outbox_identity")
    # Two leaf pages of readings and one page of the identity index: the readings on the two
    # pages are gone; the index is rebuilt from the rows.
    hit = [leaves[len(leaves) // 3], leaves[2 * len(leaves) // 3]]
    lost = sum(cells for _, cells in hit)
    overwrite_pages(outbox, [p for p, _ in hit] + [index_leaves[len(index_leaves) // 2][0]])
    assert 0 < lost < 400

    path = write_config(tmp_path / "gateway.toml", base_toml(tmp_path, extra='local_broker = "127.0.0.1:1"\n'))
    out = run_cli("run", "--config", str(path))
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    assert f"outbox {outbox} is damaged" in out.stderr
    assert f"tern-gateway check --config {path} --repair" in out.stderr
    # check says so too, without repairing anything.
    out = run_cli("check", "--config", str(path), "--timeout", "1")
    assert out.returncode == 2 and check_lines(out.stdout)["outbox file"].startswith(f"FAIL {outbox} is damaged")

    out = run_cli("check", "--config", str(path), "--timeout", "1", "--repair")
    lines = check_lines(out.stdout)
    assert lines["repair"].startswith("ok salvaged outbox"), lines["repair"]
    assert lines["outbox file"].startswith("ok"), lines  # repaired: it passes quick_check now
    aside = [p for p in outbox.parent.iterdir() if re.fullmatch(r"outbox\.db\.damaged-\d{8}T\d{6}Z", p.name)]
    assert len(aside) == 1 and repair.inspect(aside[0]) is not None  # the damaged file, kept as it was

    assert repair.inspect(outbox) is None
    with sqlite3.connect(outbox) as conn:
        rows = conn.execute('SELECT device, seq, "values" FROM outbox ORDER BY id').fetchall()
        statuses = conn.execute("SELECT device, state FROM status_events").fetchall()
        letters = conn.execute("SELECT topic, payload FROM dead_letters").fetchall()
        bseq = conn.execute("SELECT value FROM meta WHERE key = 'bseq'").fetchone()
    # Every row not on an overwritten page is back, unchanged and in arrival order.
    assert len(rows) == total - lost, f"salvaged {len(rows)} of {total}, {lost} were on the overwritten pages"
    seqs = [seq for _, seq, _ in rows]
    assert seqs == sorted(seqs)
    assert all(device == f"dev-{seq % 5}" and values == f'{{"t":20.5,"n":{seq}}}' for device, seq, values in rows)
    assert statuses == [("dev-0", "online")] and letters == [("tern/x", b"junk")] and bseq == (7,)
    # The repaired outbox is a working outbox: the identity index refuses a duplicate again.
    with Outbox(outbox) as box:
        assert box.pending() == total - lost
        first = seqs[0]
        assert box.add([Reading(f"dev-{first % 5}", BOOT, first, 1, {"t": 1}, site=SITE)]).duplicates == 1


def test_a_file_that_is_not_sqlite_is_refused_and_set_aside(tmp_path):
    outbox = tmp_path / "gw" / "outbox.db"
    outbox.parent.mkdir()
    outbox.write_bytes(b"this is a text file, not a database\n" * 200)
    path = write_config(tmp_path / "gateway.toml", base_toml(tmp_path, extra='local_broker = "127.0.0.1:1"\n'))
    out = run_cli("run", "--config", str(path))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert "file is not a database" in out.stderr and "--repair" in out.stderr
    report = repair.repair(outbox)
    assert report.copied == 0 and "unreadable" in (report.error or "")
    assert report.aside.read_bytes().startswith(b"this is a text file")
    assert repair.inspect(outbox) is None
    with Outbox(outbox) as box:
        assert box.pending() == 0


# --- bounded log lines ----------------------------------------------------------------------


class Records(logging.Handler):
    """Every record logged under ``tern`` while installed, rendered as the handler would."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def records():
    with log_handler(Records(), logging.DEBUG) as handler:
        yield handler


LONG = "x" * 65_000


def test_a_65000_character_topic_makes_one_short_log_line_and_a_whole_dead_letter(mosquitto_factory, tmp_path, records):
    local, cloud = mosquitto_factory("local"), mosquitto_factory("cloud")
    outbox = tmp_path / "gw" / "outbox.db"
    cfg = GatewayConfig(gateway_id=GW, local_broker=local.address, cloud_broker=cloud.address, outbox_path=outbox)
    with Gateway(cfg) as gw:
        assert gw.wait_connected(DEADLINE)
        node = new_client()
        node.connect(local.host, local.port)
        node.loop_start()
        try:
            # A device id far over the 64-character limit, and a payload that is no JSON.
            for topic, payload in ((f"tern/{SITE}/{LONG}/telemetry", b"{}"), (f"tern/{SITE}/dev-a/telemetry", LONG.encode())):
                info = node.publish(topic, payload, qos=1)
                info.wait_for_publish(DEADLINE)
                assert info.is_published()
        finally:
            node.disconnect()
            node.loop_stop()
        wait_until(lambda: gw.stats()["dead_lettered"] == 2, timeout=DEADLINE, what="two dead letters")
    letters = dead_letters(outbox)
    # The dead letter keeps the whole topic and payload (that is its point); its error is short.
    assert {(t, p) for t, p, _ in letters} == {(f"tern/{SITE}/{LONG}/telemetry", b"{}"), (f"tern/{SITE}/dev-a/telemetry", LONG.encode())}
    assert all(len(error) <= 1100 for _, _, error in letters)
    said = [line for line in records.lines if "dead letter from" in line]
    assert len(said) == 2
    assert any("(65021 chars)" in line for line in said), said  # the topic is quoted, cut, and its size said
    assert max(len(line) for line in records.lines) < 1000, max(records.lines, key=len)[:300]


def test_the_bridge_quotes_a_65000_character_topic_in_one_short_line(mosquitto, kafka_bootstrap, kafka_topics, records):
    from tern.cloud.bridge import BridgeThread
    from tern.cloud.consume import read_all

    topic = f"tern-gw/{LONG}/batch"
    with BridgeThread(bridge_config(mosquitto, kafka_bootstrap, kafka_topics, connect_timeout_s=10)):
        gw = FakeGateway(mosquitto, "gw2")
        try:
            gw.publish_raw(topic, b"not zlib at all")
            dead = read_all(kafka_bootstrap, kafka_topics["deadletter"], timeout_s=20, expect=1)
        finally:
            gw.close()
    assert [r.headers["source_topic"] for r in dead] == [topic.encode()]
    said = [line for line in records.lines if "dead-lettered" in line]
    assert len(said) == 1 and "(65014 chars)" in said[0]
    assert max(len(line) for line in records.lines) < 1000


def test_bounded_lines_cut_any_record_the_cli_logs():
    """The CLIs' safety net (quoting.bound_log_lines) for a log call that forgot to quote."""
    from tern.core.quoting import BoundedLines

    logger = logging.getLogger("tern.test.bounded")
    handler = Records()
    handler.addFilter(BoundedLines(500))
    logger.addHandler(handler)
    try:
        logger.warning("topic %s", LONG)
        logger.warning("short %s", "one")
    finally:
        logger.removeHandler(handler)
    assert len(handler.lines[0]) < 600 and handler.lines[0].endswith("(65006 chars)")
    assert handler.lines[1].endswith("short one")


def test_a_persisting_condition_is_one_line_per_interval():
    """The helper a full disk uses: one line at once, one per interval with a count, one at the end."""
    from tern.core.lograte import Throttled

    clock = [1000.0]
    logger = logging.getLogger("tern.test.throttled")
    handler = Records()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        throttled = Throttled(logger, interval_s=60, clock=lambda: clock[0])
        for _ in range(150):  # a retry every second for 150 s
            throttled.log(logging.ERROR, "disk", "outbox disk full: " + LONG)
            clock[0] += 1
        assert throttled.active("disk")
        assert throttled.clear("disk", "outbox disk has room again")
        assert not throttled.clear("disk", "said once only")
    finally:
        logger.removeHandler(handler)
    assert len(handler.lines) == 4, handler.lines
    assert "60 times since the last line" in handler.lines[1] and "still so after 60 s" in handler.lines[1]
    assert handler.lines[3].endswith("outbox disk has room again (after 150 s)")
    assert all(len(line) < 700 for line in handler.lines)


# --- retained junk ----------------------------------------------------------------------------


def test_retained_junk_status_is_dead_lettered_once_over_reconnects_and_new_gateways(mosquitto_factory, tmp_path):
    local, cloud = mosquitto_factory("local"), mosquitto_factory("cloud")
    outbox = tmp_path / "gw" / "outbox.db"
    topic = f"tern/{SITE}/dev-j/status"
    node = new_client()
    node.connect(local.host, local.port)
    node.loop_start()

    def publish(payload: bytes) -> None:
        info = node.publish(topic, payload, qos=1, retain=True)
        info.wait_for_publish(DEADLINE)
        assert info.is_published()

    try:
        publish(b"not json at all")
        cfg = GatewayConfig(gateway_id=GW, local_broker=local.address, cloud_broker=cloud.address, outbox_path=outbox,
                            reconnect_max_s=1.0)
        with Gateway(cfg) as gw:
            assert gw.wait_connected(DEADLINE)
            wait_until(lambda: gw.stats()["dead_lettered"] == 1, timeout=DEADLINE, what="the junk dead-lettered")
            # A reconnect: the local broker restarts, the gateway subscribes again and the
            # broker re-delivers the retained junk.
            local.stop()
            local.start()
            wait_until(lambda: gw.stats()["dead_letter_repeats"] == 1, timeout=DEADLINE, what="the re-delivery seen")
            assert gw.stats()["dead_lettered"] == 1
        # Each new gateway run subscribes again (and its session's queue is empty).
        for run in (2, 3):
            with Gateway(cfg) as gw:
                assert gw.wait_connected(DEADLINE)
                wait_until(lambda: gw.stats()["dead_letter_repeats"] == 1, timeout=DEADLINE, what=f"run {run} saw the junk")
                assert gw.stats()["dead_lettered"] == 0
        # Different junk on the same topic is new evidence: stored (once).
        with Gateway(cfg) as gw:
            assert gw.wait_connected(DEADLINE)
            wait_until(lambda: gw.stats()["dead_letter_repeats"] == 1, timeout=DEADLINE, what="the old junk seen")
            publish(b"{other junk")
            wait_until(lambda: gw.stats()["dead_lettered"] == 1, timeout=DEADLINE, what="the new junk dead-lettered")
        with Gateway(cfg) as gw:
            assert gw.wait_connected(DEADLINE)
            wait_until(lambda: gw.stats()["dead_letter_repeats"] == 1, timeout=DEADLINE, what="the new junk seen again")
            assert gw.stats()["dead_lettered"] == 0
    finally:
        node.disconnect()
        node.loop_stop()
    assert [(t, p) for t, p, _ in dead_letters(outbox)] == [(topic, b"not json at all"), (topic, b"{other junk")]
    with sqlite3.connect(outbox) as conn:
        assert conn.execute("SELECT topic, repeats FROM retained_junk").fetchall() == [(topic, 1)]


# --- SIGTERM under load -----------------------------------------------------------------------


class SlowBridge(BridgeStub):
    """The bridge's side of the contract, confirming each batch 0.3 s late (a Kafka write), so
    a batch is in flight whenever the gateway is told to stop."""

    delay = 0.3

    def _confirm(self, batch) -> None:
        if not self.delay:
            return BridgeStub._confirm(self, batch)
        timer = threading.Timer(self.delay, BridgeStub._confirm, args=(self, batch))
        timer.daemon = True
        timer.start()


class Flood:
    """Nodes publishing readings (QoS 1) as fast as the local broker takes them, on a thread."""

    def __init__(self, broker: Mosquitto, devices: int = 4) -> None:
        self.client = new_client()
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.devices = [f"dev-{i}" for i in range(devices)]
        self.infos: list = []
        self.sent: list[tuple[str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from tern.core import codec, topics

        seq = 0
        deadline = time.monotonic() + 60
        while not self._stop.is_set() and time.monotonic() < deadline:
            for device in self.devices:
                reading = Reading(device, BOOT, seq, 1_700_000_000_000 + seq, {"t": 20.5, "n": seq})
                self.infos.append(self.client.publish(topics.telemetry_topic(SITE, device), codec.encode_reading(reading), qos=1))
                self.sent.append((device, seq))
            seq += 1
            if seq % 10 == 0:
                time.sleep(0.02)  # about 2,000 readings/s: steady load, a backlog that drains quickly

    def start(self) -> "Flood":
        self._thread.start()
        return self

    def stop(self) -> set[tuple[str, int]]:
        """Stop publishing; every reading the broker has taken (PUBACK), as (device, seq)."""
        self._stop.set()
        self._thread.join(10)
        for info in self.infos:
            info.wait_for_publish(DEADLINE)
        assert all(info.is_published() for info in self.infos)
        self.client.disconnect()
        self.client.loop_stop()
        return set(self.sent)


def test_sigterm_under_load_exits_0_within_10_s_and_loses_nothing(mosquitto_factory, tmp_path):
    local, cloud = mosquitto_factory("local"), mosquitto_factory("cloud")
    outbox = tmp_path / "gw" / "outbox.db"
    bridge = SlowBridge(cloud)
    flood = Flood(local)
    log_path = tmp_path / "gateway.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TERN_") or k == "TERN_CACHE"}
    args = ["run", "--gateway-id", GW, "--local", local.address, "--cloud", cloud.address, "--outbox", str(outbox)]
    try:
        with open(log_path, "w") as log_file:
            gateway = subprocess.Popen([sys.executable, "-m", "tern.edge.cli", *args], stdout=log_file,
                                       stderr=subprocess.STDOUT, env=env)
            try:
                wait_until(lambda: "ingest connected" in log_path.read_text(), timeout=DEADLINE, what="gateway up")
                flood.start()
                # Under load: readings are coming in, batches are being confirmed, the outbox has a backlog.
                wait_until(lambda: len(bridge.confirmed) >= 5 and len(outbox_rows(outbox)) > 0, timeout=DEADLINE,
                           what="batches flowing under load")
                signalled = time.monotonic()
                gateway.send_signal(signal.SIGTERM)
                code = gateway.wait(15)
                took = time.monotonic() - signalled
            finally:
                if gateway.poll() is None:
                    gateway.kill()
                    gateway.wait(10)
        sent = flood.stop()
        text = log_path.read_text()
        print(f"\nSIGTERM under load: exit {code} after {took:.2f} s; {len(sent)} readings published,"
              f" {len(bridge.confirmed)} batches confirmed before the stop, {len(outbox_rows(outbox))} rows left in the outbox")
        assert code == 0 and took < 10, text[-3000:]
        assert "SIGTERM: stopping" in text and f"gateway {GW} stopped" in text
        assert "Traceback" not in text, text[-3000:]
        # Closed cleanly: the WAL was checkpointed into the file and removed, and the file is whole.
        assert not Path(f"{outbox}-wal").exists() or Path(f"{outbox}-wal").stat().st_size == 0
        with sqlite3.connect(outbox) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        # Nothing lost: what the outbox kept and what the local broker kept in the gateway's
        # session come out when the gateway runs again (confirmed at once now, to be quick).
        bridge.delay = 0
        cfg = GatewayConfig(gateway_id=GW, local_broker=local.address, cloud_broker=cloud.address, outbox_path=outbox)
        with Gateway(cfg) as gw:
            wait_until(lambda: gw.wait_connected(1) and not outbox_rows(outbox)
                       and {(r.device, r.seq) for r in bridge.delivered()} >= sent, timeout=90,
                       what="every published reading confirmed after the restart")
        delivered = [(r.device, r.seq) for r in bridge.delivered()]
        assert set(delivered) == sent
        print(f"after the restart: all {len(sent)} readings confirmed ({len(delivered) - len(set(delivered))} re-sent copies,"
              " which the bridge de-duplicates)")
    finally:
        bridge.close()
