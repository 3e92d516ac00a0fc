"""A TCP fault proxy on 127.0.0.1 for outage tests and ``make demo``'s cut uplink: pass, refuse
or blackhole the traffic.

Modes:

* ``pass``      forward bytes both ways. Connections that were blackholed are reset when the
                proxy returns to ``pass``: bytes were dropped in them, so their streams are
                broken, and a real network partition that heals looks the same to a client
                whose requests timed out.
* ``refuse``    reset every open connection and reset new ones as soon as they arrive
                (the peer sees ECONNRESET, like a dead broker host with a live firewall).
* ``blackhole`` accept connections and keep them open, but drop every byte in both
                directions: the hang-style outage (a lost route, a frozen broker) that
                clients only notice through their own timeouts.

The proxy runs its own asyncio loop on a daemon thread; its methods are called from the
test's thread. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from types import TracebackType

MODES = ("pass", "refuse", "blackhole")


class _Conn:
    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.blackholed = False
        self.tasks: list[asyncio.Task] = []

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is None:
                continue
            sock = writer.get_extra_info("socket")
            if sock is not None:
                try:  # linger 0: close with RST, as a dead peer would
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            writer.transport.abort()
        for task in self.tasks:
            task.cancel()


class FaultProxy:
    """Forward ``127.0.0.1:port`` to ``target``, with a switchable fault mode."""

    def __init__(self, target_host: str, target_port: int, port: int = 0, mode: str = "pass") -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.target = (target_host, target_port)
        self.host = "127.0.0.1"
        self.port = port
        self._mode = mode
        self._conns: set[_Conn] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.connections_total = 0
        #: Bytes clients sent that a blackhole dropped (a test can wait for "a batch went in").
        self.dropped_from_clients = 0

    @property
    def address(self) -> str:
        """``host:port`` clients should use."""
        return f"{self.host}:{self.port}"

    @property
    def mode(self) -> str:
        """The current fault mode."""
        return self._mode

    def start(self, timeout: float = 5.0) -> "FaultProxy":
        """Start listening; return once the port accepts connections."""
        self._thread = threading.Thread(target=self._main, name="faultproxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"fault proxy did not start within {timeout} s")
        if self._error is not None:
            raise RuntimeError(f"fault proxy failed to start: {self._error}")
        return self

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(self._accept, self.host, self.port, reuse_address=True)
            )
            self.port = self._server.sockets[0].getsockname()[1]
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    def _call(self, fn, timeout: float = 5.0) -> None:
        """Run ``fn`` on the proxy's loop and wait until it has run."""
        assert self._loop is not None
        done = threading.Event()

        def run() -> None:
            try:
                fn()
            finally:
                done.set()

        self._loop.call_soon_threadsafe(run)
        if not done.wait(timeout):
            raise RuntimeError("fault proxy loop is not responding")

    def set_mode(self, mode: str) -> None:
        """Switch to ``pass``, ``refuse`` or ``blackhole`` (effective on return)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")

        def apply() -> None:
            self._mode = mode
            for conn in list(self._conns):
                if mode == "refuse" or (mode == "pass" and conn.blackholed):
                    conn.abort()
                    self._conns.discard(conn)
                elif mode == "blackhole":
                    conn.blackholed = True

        self._call(apply)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_total += 1
        conn = _Conn(writer)
        if self._mode == "refuse":
            conn.abort()
            return
        self._conns.add(conn)
        try:
            if self._mode == "blackhole":
                conn.blackholed = True
            else:
                try:
                    up_reader, conn.upstream = await asyncio.wait_for(asyncio.open_connection(*self.target), 5)
                except (OSError, asyncio.TimeoutError):
                    conn.abort()
                    return
                conn.tasks.append(asyncio.ensure_future(self._pump(up_reader, conn, to_client=True)))
            conn.tasks.append(asyncio.ensure_future(self._pump(reader, conn, to_client=False)))
            await asyncio.gather(*conn.tasks, return_exceptions=True)
        finally:
            self._conns.discard(conn)
            conn.abort()

    async def _pump(self, reader: asyncio.StreamReader, conn: _Conn, *, to_client: bool) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                # EOF from one side ends the connection (a half-closed Kafka or MQTT
                # connection is useless anyway).
                conn.abort()
                return
            if conn.blackholed:
                if not to_client:
                    self.dropped_from_clients += len(data)
                continue  # dropped on the floor
            target = conn.client if to_client else conn.upstream
            if target is None:
                continue
            target.write(data)
            await target.drain()

    def stop(self, timeout: float = 5.0) -> None:
        """Close every connection and the listener, and end the proxy's thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or loop.is_closed():
            return

        def shutdown() -> None:
            for conn in list(self._conns):
                conn.abort()
            self._conns.clear()
            if self._server is not None:
                self._server.close()
            loop.stop()

        try:
            loop.call_soon_threadsafe(shutdown)
        except RuntimeError:
            return
        thread.join(timeout)

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
