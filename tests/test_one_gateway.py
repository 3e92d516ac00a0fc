"""One gateway per outbox and per gateway_id, with two real `tern-gateway run` processes.

A second gateway on the same outbox is refused (exit 2, one line naming the holder's pid); two
gateways with the same gateway_id on different outboxes take each other's broker sessions, and
each says once that its client id is contested and by whom, with a metric.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from tern.harness.stack import Mosquitto, free_port

import helpers
from helpers import scrape_url

DEADLINE = 30.0
#: Waits here get this module's deadline unless they say otherwise.
wait_until = functools.partial(helpers.wait_until, timeout=DEADLINE, interval=0.1)


class GatewayProcess:
    """`tern-gateway run` as a child process, its output in a log file."""

    def __init__(self, workdir: Path, name: str, *args: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"{name}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("TERN_") or k in ("TERN_CACHE", "TERN_PORT_BLOCK")}
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "tern.edge.cli", "run", *args], stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def run_args(gateway_id: str, local: Mosquitto, cloud: Mosquitto, outbox: Path, *extra: str) -> list[str]:
    return ["--gateway-id", gateway_id, "--local", local.address, "--cloud", cloud.address, "--outbox", str(outbox),
            "--reconnect-max-s", "1", *extra]


def metrics(port: int) -> dict[tuple[str, tuple], float]:
    """The gateway's /metrics as {(sample name, sorted labels): value}."""
    return {(name, labels): value for name, samples in scrape_url(f"http://127.0.0.1:{port}/metrics").items()
            for labels, value in samples.items()}


def test_a_second_gateway_on_the_same_outbox_exits_2_naming_the_holder(mosquitto_factory, tmp_path: Path) -> None:
    local, cloud = mosquitto_factory("local"), mosquitto_factory("cloud")
    outbox = tmp_path / "gw" / "outbox.db"
    first = GatewayProcess(tmp_path, "first", *run_args("gw-a", local, cloud, outbox))
    try:
        wait_until(lambda: "ingest connected" in first.log, what="the first gateway up")
        second = subprocess.run(
            [sys.executable, "-m", "tern.edge.cli", "run", *run_args("gw-b", local, cloud, outbox)],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )
        assert second.returncode == 2, second.stdout + second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
        assert f"pid {first.process.pid}" in lines[0] and "in use by another gateway" in lines[0]
        assert first.process.poll() is None  # the holder runs on, untouched
    finally:
        first.stop()
    # The holder gone (however it went), the outbox is free again.
    assert first.process.returncode == 0, first.log[-2000:]
    again = GatewayProcess(tmp_path, "again", *run_args("gw-b", local, cloud, outbox))
    try:
        wait_until(lambda: "ingest connected" in again.log, what="a new gateway on the freed outbox")
    finally:
        again.stop()


def test_two_gateways_with_one_id_each_say_once_that_the_id_is_contested(mosquitto_factory, tmp_path: Path) -> None:
    local, cloud = mosquitto_factory("local"), mosquitto_factory("cloud")
    port_a, port_b = free_port(), free_port()
    a = GatewayProcess(tmp_path, "a", *run_args("gw-twin", local, cloud, tmp_path / "a" / "outbox.db",
                                                "--http-port", str(port_a)))
    b = None
    try:
        wait_until(lambda: "ingest connected" in a.log and "uplink connected" in a.log, what="the first gateway up")
        b = GatewayProcess(tmp_path, "b", *run_args("gw-twin", local, cloud, tmp_path / "b" / "outbox.db",
                                                    "--http-port", str(port_b)))
        contested = re.compile(r"(ingest|uplink|commands): .* client id 'tern-gw-gw-twin-(ingest|uplink|uplink-cmd)' is contested, most likely "
                               r"by a second gateway with gateway_id 'gw-twin'")

        def said(gw: GatewayProcess) -> list[str]:
            return [line for line in gw.log.splitlines() if contested.search(line)]

        wait_until(lambda: len(said(a)) == 3 and len(said(b)) == 3, timeout=60,
                   what="both gateways naming the contested ids of their three sessions")
        assert metrics(port_a)[("tern_gateway_session_takeovers_total", (("link", "local"),))] == 1
        # They go on taking the sessions from each other (mosquitto says so each time) ...
        takeovers = lambda: local.log_path.read_text(errors="replace").count("already connected, closing old connection")
        seen = takeovers()
        wait_until(lambda: takeovers() >= seen + 6, what="six more takeovers on the local broker")
        # ... and neither says it again, nor a 'lost ... back after' line per round.
        assert len(said(a)) == 3 and len(said(b)) == 3
        for gw in (a, b):
            assert gw.log.count("lost the local broker") <= 3, gw.log[-3000:]
        assert metrics(port_a)[("tern_gateway_session_contested", (("link", "local"),))] == 1
    finally:
        if b is not None:
            b.stop()
    try:
        # The twin gone, the first one's session holds again; the count stays, the gauge clears.
        wait_until(lambda: metrics(port_a)[("tern_gateway_session_contested", (("link", "local"),))] == 0
                   and metrics(port_a)[("tern_gateway_ingest_connected", ())] == 1, what="the session held again")
        assert metrics(port_a)[("tern_gateway_session_takeovers_total", (("link", "local"),))] == 1
    finally:
        a.stop()
