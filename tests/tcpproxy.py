"""A TCP relay on 127.0.0.1 that can freeze: a database server that stops answering.

Connections made through it are relayed both ways until `freeze()`; from then on the
connections already open get nothing relayed (their sockets stay open, as a server that
hangs keeps them), while new connections are relayed as usual.
"""

from __future__ import annotations

import contextlib
import socket
import threading


class FreezingProxy:
    """Relay 127.0.0.1:<port> to `target`; `freeze()` stops the open connections dead."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._frozen: set[socket.socket] = set()
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def freeze(self) -> None:
        """From now on, relay nothing on the connections open so far."""
        with self._lock:
            self._frozen.update(self._open)

    def close(self) -> None:
        """Stop listening and drop every connection."""
        self._closed.set()
        self._listener.close()
        with self._lock:
            for sock in self._open:
                # shutdown() first: close() alone leaves the connection open while a relay
                # thread is blocked in recv() on it, and the server keeps its session.
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            with self._lock:
                self._open += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._relay, args=(source, sink), daemon=True).start()

    def _relay(self, source: socket.socket, sink: socket.socket) -> None:
        while not self._closed.is_set():
            try:
                data = source.recv(65536)
            except OSError:
                return
            with self._lock:
                frozen = source in self._frozen
            if frozen:
                # Hold everything: the peer waits as on a server that hangs.
                self._closed.wait()
                return
            if not data:
                with contextlib.suppress(OSError):
                    sink.shutdown(socket.SHUT_WR)
                return
            try:
                sink.sendall(data)
            except OSError:
                return
