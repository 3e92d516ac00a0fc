"""A node fleet that costs the bench next to nothing: one ``mosquitto_pub`` process per device.

The paho fleet (:class:`tern.harness.bench.nodes.NodeFleet`, 50 clients with their network
threads in the bench's own process) tops out near 5,000 QoS 1 messages/s on two cores, even
into a subscriber that does nothing: whatever it feeds, it measures itself. Here each device's
readings go from a file, one per line, through its own ``mosquitto_pub -l -q 1`` (C,
libmosquitto): 20,000 readings cost the fleet about half a CPU second, so the rate a round
measures is the receiver's. Each device publishes in order on a connection of its own, as a
node does. ``mosquitto_pub`` comes with Debian's ``mosquitto-clients``, which ``make setup``
installs.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence

from tern.harness.bench.common import BenchError

#: QoS 1 messages each connection may have unacknowledged (a node's firmware keeps a few in
#: flight as well; more only deepens the broker's queues).
MAX_INFLIGHT = 20


def mosquitto_pub() -> str:
    """The ``mosquitto_pub`` binary; BenchError saying how to get it if it is missing."""
    found = shutil.which("mosquitto_pub")
    if found is None:
        raise BenchError("mosquitto_pub not found: run `make setup` (apt-get install mosquitto-clients)")
    return found


class PubFleet:
    """One ``mosquitto_pub`` per device on one broker, fed from files under ``folder``."""

    def __init__(self, host: str, port: int, folder: Path) -> None:
        self.host, self.port, self.folder = host, port, folder
        self._binary = mosquitto_pub()
        self._procs: list[tuple[str, subprocess.Popen]] = []

    def prepare(self, messages: Sequence[tuple[int, str, bytes]]) -> list[tuple[str, Path]]:
        """Write each device's payloads, in order, one per line; (topic, file) per device.

        Done before a round's clock starts: it is the nodes' memory, not their work.
        """
        lines: dict[str, list[bytes]] = {}
        for _device, topic, payload in messages:
            if b"\n" in payload:
                raise BenchError(f"a payload for {topic} holds a newline: mosquitto_pub -l would split it")
            lines.setdefault(topic, []).append(payload)
        self.folder.mkdir(parents=True, exist_ok=True)
        files = []
        for index, (topic, payloads) in enumerate(lines.items()):
            path = self.folder / f"device-{index:04d}.lines"
            path.write_bytes(b"\n".join(payloads) + b"\n")
            files.append((topic, path))
        return files

    def _start(self, topic: str, client_id: str, stdin: Any) -> subprocess.Popen:
        """One device's ``mosquitto_pub``, publishing each line of ``stdin`` at QoS 1 on ``topic``."""
        proc = subprocess.Popen(
            [self._binary, "-h", self.host, "-p", str(self.port), "-t", topic, "-q", "1", "-l",
             "-M", str(MAX_INFLIGHT), "-i", f"{client_id}-{time.time_ns() % 10**6}"],
            stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        self._procs.append((topic, proc))
        return proc

    def start(self, messages: Sequence[tuple[int, str, bytes]]) -> float:
        """Write the payloads (:meth:`prepare`, before the clock) and start every publisher
        (:meth:`publish_all`); the wall time (``time.time()``) they were started at."""
        files = self.prepare(messages)
        started = time.time()
        self.publish_all(files)
        return started

    def publish_all(self, files: Sequence[tuple[str, Path]]) -> None:
        """Start every device's publisher at once; :meth:`wait_published` waits for them."""
        for index, (topic, path) in enumerate(files):
            with open(path, "rb") as feed:
                self._start(topic, f"bench-pub-{index:04d}", feed)

    def wait_published(self, deadline_s: float) -> None:
        """Block until every publisher has ended; BenchError naming the first that failed."""
        deadline = time.monotonic() + deadline_s
        for topic, proc in self._procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise BenchError(f"mosquitto_pub for {topic} still running after {deadline_s:.0f} s") from None
            if proc.returncode != 0:
                err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
                raise BenchError(f"mosquitto_pub for {topic} exited {proc.returncode}: {err[-300:]}")
        self.close()

    def close(self) -> None:
        """Stop any publisher still running."""
        for _topic, proc in self._procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            if proc.stderr:
                proc.stderr.close()
        self._procs.clear()
