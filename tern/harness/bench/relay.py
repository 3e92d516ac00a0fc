"""A TCP relay on loopback that counts the bytes crossing it, both ways: what a link carries."""

from __future__ import annotations

import socket
import threading

from tern.harness.stack import LOOPBACK


class CountingRelay:
    """Accepts on a free loopback port and forwards every connection to ``host:port``."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.upstream_bytes = 0  # client -> server
        self.downstream_bytes = 0  # server -> client
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._server = socket.create_server((LOOPBACK, 0))
        self.host, self.port = LOOPBACK, self._server.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        """``host:port`` for clients."""
        return f"{self.host}:{self.port}"

    @property
    def total_bytes(self) -> int:
        """Bytes both ways so far."""
        with self._lock:
            return self.upstream_bytes + self.downstream_bytes

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, up: bool) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
                with self._lock:
                    if up:
                        self.upstream_bytes += len(data)
                    else:
                        self.downstream_bytes += len(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        """Stop accepting and cut every connection."""
        self._closed = True
        self._server.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            try:
                s.close()
            except OSError:
                pass
