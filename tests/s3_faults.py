"""Real faults for S3 tests on loopback: an endpoint that dies (a TCP proxy in front of the moto server that can be
killed, resetting every open connection and refusing new ones) and a server-side count of object GETs."""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import struct
import threading


class DyingEndpoint:
    """127.0.0.1:<port> forwarding to the moto server at `upstream` (host, port). kill() is the outage: the
    listener closes (new connections are refused) and open connections are reset mid-response."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="dying-endpoint", daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # killed
                return
            try:
                server = socket.create_connection(self.upstream, timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket):
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def kill(self):
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() above
        self.listener.close()
        with self._lock:
            for s in self._conns:
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
                    s.close()


def upstream_of(url: str) -> tuple[str, int]:
    host, port = url.rsplit("//", 1)[1].rsplit(":", 1)
    return host, int(port)


class RequestLog(logging.Handler):
    """The moto server's request lines (werkzeug logs one per request, in this process)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage()))  # werkzeug colours some codes

    def object_gets(self, bucket: str, prefix: str = "") -> list[str]:
        """Keys of object GETs (not listings) under bucket/prefix."""
        pat = re.compile(rf'"GET /{re.escape(bucket)}/({re.escape(prefix)}[^ ?]*) HTTP')
        return [m.group(1) for line in self.lines if (m := pat.search(line))]


@contextlib.contextmanager
def request_log():
    logger = logging.getLogger("werkzeug")
    handler, level, propagate = RequestLog(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
