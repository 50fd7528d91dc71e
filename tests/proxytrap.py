"""A proxy that must never be used: a loopback listener that records every connection
(and what it was sent) and answers 502, for the tests that set ``http_proxy`` and its
kin and prove that sandport's clients go straight to the gateway."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator


class ProxyTrap:
    """Listens on 127.0.0.1; ``seen`` holds the first bytes of every connection."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self.seen: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="proxy trap")
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(2)
                data = b""
                with contextlib.suppress(OSError):
                    data = conn.recv(65536)
                self.seen.append(data)
                with contextlib.suppress(OSError):
                    conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n"
                                 b"Connection: close\r\n\r\n")

    def env(self) -> dict[str, str]:
        """Every variable urllib (and curl-alikes) read a proxy from, pointing here; no
        ``no_proxy`` exemption."""
        names = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                 "ALL_PROXY")
        return {**{n: self.url for n in names}, "no_proxy": "", "NO_PROXY": ""}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


@contextlib.contextmanager
def proxy_trap() -> Iterator[ProxyTrap]:
    """A :class:`ProxyTrap` for the duration of a test."""
    trap = ProxyTrap()
    try:
        yield trap
    finally:
        trap.close()
