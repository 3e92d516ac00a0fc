"""Commands from the cloud side: their outcomes followed in Kafka, what a node ran, expiries."""

from __future__ import annotations

import asyncio
import threading
import time

from aiokafka import AIOKafkaConsumer

from tern.cloud.consume import assign_from_beginning
from tern.core import commands
from tern.device.emulate import EmulatedNode


class OutcomeTail:
    """Follows the results topic from the beginning; keeps each outcome with when it arrived."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap, self.topic = bootstrap, topic
        self._lock = threading.Lock()
        self._seen: list[tuple[float, commands.Outcome]] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"outcomes-{topic}")

    def start(self) -> "OutcomeTail":
        self._thread.start()
        assert self._ready.wait(20), f"results consumer not ready: {self.error!r}"
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        try:
            asyncio.run(self._consume())
        except BaseException as exc:  # surfaced by the assertions that use it
            self.error = exc

    async def _consume(self) -> None:
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                    auto_offset_reset="earliest")
        await consumer.start()
        try:
            await assign_from_beginning(consumer, self.topic, 15)
            self._ready.set()
            while not self._stop.is_set():
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    for record in records:
                        outcome = commands.decode_outcome(record.value)
                        assert record.key == outcome.device.encode(), (record.key, outcome)
                        with self._lock:
                            self._seen.append((time.monotonic(), outcome))
        finally:
            await consumer.stop()

    def of(self, command_id: str) -> list[tuple[float, commands.Outcome]]:
        with self._lock:
            return [(t, o) for t, o in self._seen if o.id == command_id]

    def kinds(self, command_id: str) -> list[str]:
        return [o.outcome for _, o in self.of(command_id)]

    def first(self, command_id: str, kind: str) -> tuple[float, commands.Outcome] | None:
        return next(((t, o) for t, o in self.of(command_id) if o.outcome == kind), None)


def expiry(seconds: float) -> int:
    """A command expiry ``seconds`` from now, in epoch milliseconds."""
    return int((time.time() + seconds) * 1000)


def executions(node: EmulatedNode, command_id: str) -> int:
    """How many times the node ran ``command_id`` (its console's ``TERN cmd <id> ...`` lines)."""
    return sum(1 for line in node.log_text().splitlines() if line.startswith(f"TERN cmd {command_id} "))
