"""The gateway service: one outbox, an ingest on the local broker, an uplink to the cloud, and
the command desk (commands from the cloud to the nodes, their outcomes back).

Library use (tests, the demo)::

    with Gateway(GatewayConfig(gateway_id="gw1", cloud_broker="127.0.0.1:1884",
                               outbox_path="/var/lib/tern/outbox.db")) as gw:
        ...
        gw.stats()

``tern-gateway run`` calls :meth:`Gateway.run_forever`.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import TracebackType
from typing import TYPE_CHECKING

from tern.core.errors import ConfigError
from tern.edge.command_store import CommandStore
from tern.edge.commands import CommandDesk
from tern.edge.config import GatewayConfig
from tern.edge.health import Health, ObservedOutbox
from tern.edge.ingest import Ingest
from tern.edge.ota_serve import ReleaseServer
from tern.edge.ota_store import ReleaseStore, store_dir
from tern.edge.outbox import now_ms
from tern.edge.outbox_lock import OutboxLock
from tern.edge.retention import RetentionPolicy
from tern.edge.serial_sensors import SerialSensors
from tern.edge.uplink import Uplink

if TYPE_CHECKING:
    from tern.edge.status_page import StatusServer

log = logging.getLogger(__name__)


class Gateway:
    """A running gateway: :meth:`start` it, read :meth:`stats`, :meth:`stop` it (or use ``with``)."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        # Before the outbox is opened: a second gateway must not even migrate its schema.
        self._outbox_lock = OutboxLock(config.outbox_path).acquire()
        try:
            self._build(config)
        except BaseException:
            self._outbox_lock.release()
            raise

    def _build(self, config: GatewayConfig) -> None:
        self.outbox = ObservedOutbox(config.outbox_path, retention=RetentionPolicy.from_config(config),
                                     device_cap=config.device_share_cap)
        # Firmware releases for the nodes, beside the outbox: they come in on the command
        # session, and are served to the nodes on the ingest's local session.
        self.releases = ReleaseStore(store_dir(config.outbox_path), config.ota_key, config.ota_keep)
        self.release_server = ReleaseServer(self.releases, self._publish_local, config.ota_chunks_per_s)
        self.ingest = Ingest(config, self.outbox, on_reply=self._on_reply,
                             on_fw_request=self.release_server.on_request)
        self.health = Health(self)
        # Commands go out and replies come in on the ingest's local session; their outcomes
        # ride the uplink's batches.
        store = CommandStore(config.outbox_path)
        self.uplink = Uplink(config, self.outbox, commands=store, on_confirm_rtt=self.health.note_confirm_rtt)
        self.commands = CommandDesk(config, self.outbox, self.ingest.session, store, on_outcome=self.uplink.nudge,
                                    releases=self.releases)
        #: /metrics, /status.json and the status page (None with http_port = 0).
        self.status_server: "StatusServer | None" = None
        # Sensors wired to the Pi itself (none unless `serial_sensors` names some).
        specs = config.serial_sensor_specs()
        self.serial = SerialSensors(specs, self.outbox) if specs else None
        self._started = False
        self._stopped = False
        self._final: dict = {}
        self._stop_lock = threading.Lock()
        self._stop_requested = threading.Event()

    def start(self) -> "Gateway":
        """Start both clients and their threads; returns at once (connections come up in the background)."""
        if self._started:
            raise RuntimeError("a Gateway can be started once")
        self._started = True
        self._start_status_server()
        # Uplink first: anything left in the outbox from an earlier run starts flowing while
        # ingest connects.
        self.uplink.start()
        self.release_server.start()
        self.ingest.start()
        self.commands.start()
        if self.serial is not None:
            self.serial.start()
        log.info(
            "gateway %s: local %s, cloud %s, outbox %s (%d pending)",
            self.config.gateway_id,
            self.config.local_broker,
            self.config.cloud_broker,
            self.config.outbox_path,
            self.outbox.pending(),
        )
        return self

    def _start_status_server(self) -> None:
        if not self.config.http_port:
            return
        from tern.edge.metrics import GatewayMetrics
        from tern.edge.status_page import StatusServer

        metrics = GatewayMetrics(self.health, per_device=self.config.metrics_per_device)
        try:
            self.status_server = StatusServer(self.health, metrics, self.config.http_host, self.config.http_port)
        except OSError as exc:
            raise ConfigError(
                f"http_port: cannot listen on {self.config.http_host}:{self.config.http_port}: {exc.strerror or exc}"
            ) from None
        self.status_server.start()

    def wait_connected(self, timeout: float = 10.0) -> bool:
        """Block until both brokers are connected and subscribed, the command session (commands
        and releases) included, or ``timeout`` passes: on a fresh cloud broker, a command or a
        release published before that session first subscribed is kept for no one."""
        deadline = time.monotonic() + timeout
        return all(part.wait_connected(max(0.0, deadline - time.monotonic()))
                   for part in (self.ingest, self.uplink, self.commands))

    def _publish_local(self, topic: str, payload: bytes) -> None:
        self.ingest.client.publish(topic, payload, qos=0)

    def _on_reply(self, msg: object, generation: int) -> None:
        self.commands.on_reply(msg, generation)  # type: ignore[arg-type]

    def stop(self, timeout: float | None = None) -> None:
        """Stop taking readings (ingest's last group is committed and acked), give the batch in
        flight until the deadline to be confirmed, then stop the uplink and close the outbox.

        ``timeout`` (default ``config.stop_timeout_s``) bounds the whole stop, give or take a
        second for the threads to notice. Whatever is not committed stays un-acked on the
        local broker; whatever is not confirmed stays in the outbox: the next start picks
        both up, and the bridge de-duplicates a batch that is sent again.
        """
        budget = self.config.stop_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + budget
        with self._stop_lock:  # a signal and a `with` block may both ask
            if self._stopped:
                return
            self._stop_requested.set()
            if self._started:
                if self.serial is not None:
                    self.serial.stop(max(0.5, deadline - time.monotonic()))
                # Commands first: no outcome is recorded after the ingest's session is gone.
                commands_final = self.commands.stats()
                self.commands.stop(max(0.5, deadline - time.monotonic()))
                self.ingest.stop(max(0.5, deadline - time.monotonic()))
                self.release_server.stop(max(0.5, deadline - time.monotonic()))
                self._drain_inflight(deadline)
                self.uplink.stop(max(0.5, deadline - time.monotonic()))
            # Keep the last levels, so stats() still answers after stop (demo summaries, tests).
            self._final = self._levels()
            if self._started:
                self._final.update(commands_final)
            self.commands.store.close()  # after the uplink: its last confirms delete outcomes
            self._stopped = True
            if self.status_server is not None:
                self.status_server.stop()
            self.outbox.close()
            self._outbox_lock.release()
        log.info("gateway %s stopped", self.config.gateway_id)

    def _drain_inflight(self, deadline: float) -> None:
        """Wait (until ``deadline``) for the batch in flight now to be confirmed; a batch the
        uplink starts after this one stays in the outbox for the next run."""
        bseq = self.uplink.stats().get("inflight_bseq")
        if bseq is None or not self.uplink.connected:
            return
        log.info("waiting up to %.1f s for the confirm of batch %d", max(0.0, deadline - time.monotonic()), bseq)
        while time.monotonic() < deadline and self.uplink.stats().get("inflight_bseq") == bseq:
            time.sleep(0.05)
        if self.uplink.stats().get("inflight_bseq") == bseq:
            log.warning("batch %d not confirmed before the stop deadline: it stays in the outbox and is sent again", bseq)

    def stats(self) -> dict:
        """Counters and levels: pending, status_pending, dead_letters, nodes_online, nodes_offline,
        oldest_pending_age_s, forwarded, batches_confirmed, ..."""
        out: dict = {"gateway_id": self.config.gateway_id}
        out.update(self.ingest.stats())
        out.update(self.uplink.stats())
        out.update(self.release_server.stats())
        out["ota_releases"] = self.releases.versions()
        if not self._stopped:
            out.update(self.commands.stats())
        if self.serial is not None:
            out["serial_sensors"] = self.serial.stats()
        out.update(self._final if self._stopped else self._levels())
        return out

    def _levels(self) -> dict:
        oldest = self.outbox.oldest_pending_ms()
        return {
            "pending": self.outbox.pending(),
            "status_pending": self.outbox.status_pending(),
            "dead_letters": self.outbox.dead_letter_count(),
            # Of those, the ones the cloud has not confirmed yet (the rest are in tern.deadletter).
            "dead_letters_unsent": self.outbox.dead_letters_unsent(),
            "oldest_pending_age_s": None if oldest is None else max(0.0, (now_ms() - oldest) / 1000),
            "max_rows": self.outbox.max_rows,
            # Liveness from each device's latest status (birth or will) the gateway has seen.
            **self.outbox.node_states(),
        }

    def run_forever(self) -> None:
        """Start (if needed) and block until SIGINT/SIGTERM or :meth:`request_stop`, then stop cleanly."""
        received: list[str] = []

        def on_signal(signum: int, frame: object) -> None:
            received.append(signal.Signals(signum).name)
            self._stop_requested.set()

        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, on_signal)
        if not self._started:
            self.start()
        try:
            # wait() with a timeout so signal handlers get to run promptly.
            while not self._stop_requested.wait(1.0):
                pass
            if received:
                log.info(
                    "%s: stopping (no new readings; up to %.1f s for the batch in flight)",
                    received[0],
                    self.config.stop_timeout_s,
                )
        finally:
            self.stop()

    def request_stop(self) -> None:
        """Make :meth:`run_forever` return (thread-safe)."""
        self._stop_requested.set()

    def __enter__(self) -> "Gateway":
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
