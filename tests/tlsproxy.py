"""A TLS terminator on 127.0.0.1 for tests: clients speak TLS to it, it forwards plain TCP.

Tansu (the test Kafka broker) has no working TLS listener in the build we install, so the
bridge's Kafka TLS is tested through this front end, with Tansu advertising the front end's
port so every connection a client makes after bootstrap is TLS too.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading


class TlsTerminator:
    """Accept TLS on a free loopback port and forward the plaintext to ``target``."""

    def __init__(self, target_port: int, context: ssl.SSLContext, port: int | None = None) -> None:
        self.target_port = target_port
        self.context = context
        if port is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        self.port = port
        self.handshake_failures = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.base_events.Server | None = None

    def start(self) -> "TlsTerminator":
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        future.result(10)
        return self

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, ssl=self.context,
                                                  ssl_handshake_timeout=10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.target_port), 10)
        except (OSError, asyncio.TimeoutError):
            writer.close()
            return

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, ssl.SSLError, ConnectionError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    def stop(self) -> None:
        async def _close() -> None:
            if self._server is not None:
                self._server.close()

        asyncio.run_coroutine_threadsafe(_close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
