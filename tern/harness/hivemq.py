"""HiveMQ CE as the cloud MQTT broker, on loopback: the same role :class:`Mosquitto` plays.

HiveMQ CE runs embedded in a small launcher (``deploy/hivemq/TernHiveMQ.java``) on the jars
``make setup`` copied from Maven Central (``tern.toolchain.hivemq_install``). Each broker has
its own folder: ``conf/config.xml`` and ``conf/logback.xml`` written here, ``data/`` (file
persistence: sessions, subscriptions, queued messages) and an empty ``extensions/``. The port
and the data stay the same across :meth:`HiveMQ.restart`, so persistent sessions and what is
queued for them survive it, as with mosquitto's persistence file.

Settings that differ from HiveMQ's defaults, and why:

* ``max-queue-size`` raised from 1000 to :data:`tern.harness.stack.DEFAULT_MAX_QUEUED`, the
  same per-client limit the tests give mosquitto: beyond it HiveMQ discards new messages for
  an offline or slow session (logged as ``event.message-dropped``), as mosquitto does.
* anonymous usage statistics off: the broker would otherwise try to report to HiveMQ.
* the listener on 127.0.0.1 only (HiveMQ binds 0.0.0.0 by default).

Embedded HiveMQ allows every client (no security extension is needed).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Sequence
from xml.sax.saxutils import escape

from tern.core.mqtt_session import probe
from tern.harness.stack import DEFAULT_MAX_QUEUED, LOOPBACK, ManagedProcess, ServiceError, free_port

#: What HiveMQ's bin/run.sh (2025.x) opens to its netty and persistence code on Java 11+.
ADD_OPENS = (
    "--add-opens", "java.base/java.lang=ALL-UNNAMED",
    "--add-opens", "java.base/java.nio=ALL-UNNAMED",
    "--add-opens", "java.base/sun.nio.ch=ALL-UNNAMED",
    "--add-opens", "jdk.management/com.sun.management.internal=ALL-UNNAMED",
    "--add-exports", "java.base/jdk.internal.misc=ALL-UNNAMED",
)

#: Start-up measured on 2 shared cores (time to the first MQTT handshake): 2.9-3.7 s with the
#: JVM's defaults, 2.2-3.5 s with the serial collector and C1 only, 1.6-2.3 s with a
#: class-data-sharing archive on top. A test broker needs neither G1's threads nor C2's peak
#: speed. The archive is dumped by the first cleanly stopped broker (see ``_cds_options``).
FAST_START = ("-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1")

DEFAULT_HEAP_MB = 256


def _hivemq_install():
    from tern.toolchain import hivemq_install

    return hivemq_install()


class HiveMQ(ManagedProcess):
    """A private HiveMQ CE on a loopback port with file persistence in ``workdir/data``.

    ``start()`` returns once an MQTT client can connect (within its timeout); ``stop()`` is
    SIGTERM (the launcher's shutdown hook closes the persistence), then SIGKILL; ``kill()`` is
    a crash; ``restart()`` stops and starts it on the same port with the same data.
    """

    name = "hivemq"

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        *,
        heap_mb: int = DEFAULT_HEAP_MB,
        max_queue_size: int = DEFAULT_MAX_QUEUED,
        mqtt_xml: str = "",
    ) -> None:
        super().__init__(workdir)
        if not 64 <= heap_mb <= 512:
            raise ValueError(f"heap_mb must be 64-512 (the machine's cores and memory are shared), got {heap_mb}")
        self.host = LOOPBACK
        self.port = port or free_port()
        self.heap_mb = heap_mb
        self.max_queue_size = max_queue_size
        #: Extra elements inside ``<mqtt>`` (e.g. ``<session-expiry>``), for experiments.
        self.mqtt_xml = mqtt_xml
        self.conf_dir = self.workdir / "conf"
        self.data_dir = self.workdir / "data"
        self.extensions_dir = self.workdir / "extensions"
        #: Seconds from spawning the JVM to the first accepted MQTT connection, per start.
        self.start_seconds: list[float] = []
        self._cds_partial: Path | None = None

    @property
    def address(self) -> str:
        """``host:port`` for clients."""
        return f"{self.host}:{self.port}"

    def config_text(self) -> str:
        """The conf/config.xml this broker runs with."""
        return f"""<?xml version="1.0"?>
<hivemq>
    <listeners>
        <tcp-listener>
            <port>{self.port}</port>
            <bind-address>{escape(self.host)}</bind-address>
        </tcp-listener>
    </listeners>
    <mqtt>
        <queued-messages>
            <max-queue-size>{int(self.max_queue_size)}</max-queue-size>
            <strategy>discard</strategy>
        </queued-messages>
        {self.mqtt_xml}
    </mqtt>
    <persistence>
        <mode>file</mode>
    </persistence>
    <anonymous-usage-statistics>
        <enabled>false</enabled>
    </anonymous-usage-statistics>
</hivemq>
"""

    @staticmethod
    def logback_text() -> str:
        """conf/logback.xml: INFO to stdout, plus the client events and dropped messages,
        which say what the broker did to a session (HiveMQ logs them at DEBUG)."""
        return """<configuration scan="false">
    <appender name="CONSOLE" class="ch.qos.logback.core.ConsoleAppender">
        <encoder><pattern>%d{HH:mm:ss.SSS} %-5level %logger{0} - %msg%n%ex</pattern></encoder>
    </appender>
    <root level="INFO"><appender-ref ref="CONSOLE"/></root>
    <logger name="event.client-connected" level="DEBUG"/>
    <logger name="event.client-disconnected" level="DEBUG"/>
    <logger name="event.message-dropped" level="DEBUG"/>
    <logger name="event.client-session-expired" level="DEBUG"/>
    <logger name="jetbrains.exodus" level="WARN"/>
    <logger name="migrations" level="WARN"/>
    <logger name="oshi" level="ERROR"/>
</configuration>
"""

    def _cds_options(self) -> list[str]:
        """Use the class-data-sharing archive if one exists, else have this JVM write one.

        Each JVM writes its own partial file; a cleanly stopped one's is renamed into place
        (atomic, so concurrent test workers never see half an archive). A JVM refuses an
        archive made for another class path and simply starts without it.
        """
        archive = _hivemq_install().cds_archive
        if archive is None:
            return []
        if archive.is_file():
            return [f"-XX:SharedArchiveFile={archive}"]
        archive.parent.mkdir(parents=True, exist_ok=True)
        self._cds_partial = archive.with_name(f"{archive.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
        return [f"-XX:ArchiveClassesAtExit={self._cds_partial}"]

    def command(self) -> Sequence[str]:
        from tern.toolchain import java_binary

        install = _hivemq_install()
        return [
            str(java_binary()),
            f"-Xmx{self.heap_mb}m",
            *FAST_START,
            *self._cds_options(),
            *ADD_OPENS,
            "-Djava.net.preferIPv4Stack=true",
            "-Djava.security.egd=file:/dev/./urandom",
            # No hs_err or heap dump files in the repository: they land in the broker's folder.
            f"-XX:ErrorFile={self.workdir}/hs_err_pid%p.log",
            *install.main_args(),
            str(self.conf_dir),
            str(self.data_dir),
            str(self.extensions_dir),
        ]

    def start(self, timeout: float = 60.0) -> "HiveMQ":
        """Write the config, start the JVM and wait until an MQTT client can connect.

        Raises ServiceError with the log's tail if it exits or does not answer in ``timeout``.
        """
        for folder in (self.conf_dir, self.data_dir, self.extensions_dir):
            folder.mkdir(parents=True, exist_ok=True)
        (self.conf_dir / "config.xml").write_text(self.config_text())
        (self.conf_dir / "logback.xml").write_text(self.logback_text())
        t0 = time.monotonic()
        self._spawn()
        assert self.process is not None
        deadline = t0 + timeout
        why = "no answer"
        while True:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.stop()
                raise ServiceError(f"hivemq on {self.address} exited with code {code} while starting\n{self.log_tail(30)}")
            # A real handshake, not just an open port: HiveMQ binds its listener before it
            # is ready to take sessions.
            answer = probe(self.host, self.port, timeout=1.0, client_id=f"tern-probe-{uuid.uuid4().hex[:8]}")
            if answer is None:
                break
            why = answer
            if time.monotonic() > deadline:
                self.stop()
                raise ServiceError(f"hivemq on {self.address}: no MQTT connection after {timeout:.0f} s "
                                   f"(last: {why})\n{self.log_tail(30)}")
            time.sleep(0.1)
        self.start_seconds.append(time.monotonic() - t0)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (HiveMQ closes its persistence: about 4 s here), then SIGKILL after ``timeout``."""
        graceful = True
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                graceful = False
                self.process.kill()
                self.process.wait(10)
        self._close_log()
        self._settle_cds(graceful)

    def kill(self) -> None:
        """SIGKILL the JVM: a crash; HiveMQ's file persistence is left as it was at that moment."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self._close_log()
        self._settle_cds(False)

    def restart(self, timeout: float = 60.0) -> "HiveMQ":
        """Stop gracefully and start again on the same port with the same data."""
        self.stop()
        return self.start(timeout)

    def _settle_cds(self, keep: bool) -> None:
        partial, self._cds_partial = self._cds_partial, None
        if partial is None or not partial.is_file():
            return
        archive = _hivemq_install().cds_archive
        if keep and archive is not None and partial.stat().st_size > 0:
            os.replace(partial, archive)
        else:
            partial.unlink(missing_ok=True)
